"""(IA)³: learned vectors that rescale activations."""
