"""Full fine-tuning: every base weight trains (the baseline the adapter methods are measured against)."""
