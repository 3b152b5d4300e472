"""The C decode-step kernel and its bindings, and fused training ops."""
