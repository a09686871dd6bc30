#!/usr/bin/env python
"""Benchmark abopt's trials against plain mlx-lm: the same as ``abopt bench``.

    python scripts/bench.py                      # the bundled organism
    python scripts/bench.py --synthetic llama:100M
    python scripts/bench.py mlx-community/Qwen3-4B-4bit --memory-trials 500

On Linux it re-executes itself once with OpenBLAS preloaded when that is installed (see
DESIGN.md), so the numbers are the ones a study gets.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from optimizer.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.argv[1:1] = ["bench"]
    main()
