"""methods/bottleneck."""
