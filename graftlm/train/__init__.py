"""Fine-tuning: the config, the loop, steps, forward and loss, checkpoints, metrics, memory."""
