"""Prompt and prefix tuning: virtual tokens in front of every input or attention."""
