"""Model fingerprints: which weights a study and its cached directions belong to.

Every byte of every weight file is hashed, so a model that differs in one weight gets
another identity. Hashing an 8 GB model takes seconds, so each file's digest is
remembered per (path, size, modification time) in a small JSON file in the user's cache
directory, and a resumed study on an unchanged model re-hashes nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from optimizer.files import write_atomic

IDENTITY_SCHEME = "sha256-all"  # prefix of today's identities; unprefixed ones are legacy
_MEMO_FILE = "file-digests.json"
_MEMO_LIMIT = 4096  # entries kept; the oldest go first


def cache_dir() -> Path:
    """abopt's per-user cache directory (``ABOPT_CACHE_DIR`` overrides it)."""
    if os.environ.get("ABOPT_CACHE_DIR"):
        return Path(os.environ["ABOPT_CACHE_DIR"])
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "abopt"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "abopt"


def file_digest(path: Path) -> str:
    """SHA-256 of the whole file, remembered per path, size and modification time."""
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    memo = _read_memo()
    if key in memo:
        return memo[key]
    with path.open("rb") as handle:
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
    memo[key] = digest
    _write_memo(memo)
    return digest


def model_identity(path: Path) -> str:
    """A fingerprint of config.json and every byte of the model's weight files."""
    digest = hashlib.sha256((path / "config.json").read_bytes())
    for weights in sorted(path.glob("*.safetensors")):
        digest.update(f"{weights.name}:{file_digest(weights)}".encode())
    return f"{IDENTITY_SCHEME}:{digest.hexdigest()[:16]}"


def legacy_model_identity(path: Path) -> str:
    """The sampled fingerprint that studies made by abopt 0.1.0 stored (header and 16 samples of 64 KiB
    per file): kept only to recognise those studies' models, never to key new results."""
    digest = hashlib.sha256((path / "config.json").read_bytes())
    for weights in sorted(path.glob("*.safetensors")):
        size = weights.stat().st_size
        digest.update(f"{weights.name}:{size}".encode())
        with weights.open("rb") as handle:
            header_length = int.from_bytes(handle.read(8), "little")
            digest.update(handle.read(header_length))
            for step in range(16):
                handle.seek(size * step // 16)
                digest.update(handle.read(1 << 16))
    return digest.hexdigest()[:16]


def same_model(stored: str, path: Path, current: str) -> bool:
    """Whether a stored identity names the model at ``path`` (today's ``current`` identity)."""
    if stored.startswith(IDENTITY_SCHEME + ":"):
        return stored == current
    return stored == legacy_model_identity(path)


def _read_memo() -> dict[str, str]:
    try:
        memo = json.loads((cache_dir() / _MEMO_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return memo if isinstance(memo, dict) else {}


def _write_memo(memo: dict[str, str]) -> None:
    # Only a cache: a read-only or full home directory just means hashing again next time.
    items = list(memo.items())[-_MEMO_LIMIT:]
    try:
        cache_dir().mkdir(parents=True, exist_ok=True)
        write_atomic(cache_dir() / _MEMO_FILE, json.dumps(dict(items)).encode())
    except OSError:
        pass
