"""Exporting a trial: its steering baked into a verified copy of the model's weights."""
