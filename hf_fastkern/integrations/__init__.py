"""Trainer / TRL / Accelerate integrations: the metrics callback (callbacks.py)."""
