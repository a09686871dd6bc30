"""abopt: find the best way to remove a chat model's refusal direction, on MLX."""

__version__ = "0.1.0"

from pathlib import Path

DATA = Path(__file__).parent / "data"  # what the package ships: prompts, markers, the organism, search spaces
