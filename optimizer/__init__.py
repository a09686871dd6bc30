"""abopt: find the best way to remove a chat model's refusal direction, on MLX."""

__version__ = "0.1.0"
