"""Process set-up that has to happen before mlx is imported.

The Linux ``mlx[cpu]`` wheel links a reference BLAS that is ~30x slower than OpenBLAS for
the float32 matmuls abopt runs. A library can only replace it when it is loaded first, so
``abopt`` re-executes itself once with OpenBLAS in ``LD_PRELOAD`` when it is installed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

OPENBLAS_PATHS = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)
_REEXEC_FLAG = "ABOPT_BLAS_REEXEC"


def find_openblas() -> str | None:
    """Path of a system OpenBLAS shared library, or None."""
    return next((path for path in OPENBLAS_PATHS if Path(path).exists()), None)


def openblas_preloaded() -> bool:
    """True when OpenBLAS is in LD_PRELOAD of this process."""
    return "openblas" in os.environ.get("LD_PRELOAD", "")


def ensure_fast_blas() -> None:
    """On Linux, re-exec this process with OpenBLAS preloaded, or say how to get it."""
    if not sys.platform.startswith("linux") or openblas_preloaded():
        return
    if os.environ.get(_REEXEC_FLAG) or os.environ.get("ABOPT_NO_OPENBLAS"):
        return
    library = find_openblas()
    if library is None:
        print(
            "abopt: warning: MLX will use its slow reference BLAS on this CPU; "
            "fix: sudo apt-get install libopenblas0-pthread",
            file=sys.stderr,
        )
        return
    preload = os.environ.get("LD_PRELOAD")
    env = dict(os.environ, LD_PRELOAD=f"{library}:{preload}" if preload else library)
    env[_REEXEC_FLAG] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
