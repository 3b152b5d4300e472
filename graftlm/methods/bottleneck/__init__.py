"""Bottleneck adapters (Houlsby / Pfeiffer): small residual MLPs after sublayers."""
