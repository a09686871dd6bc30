"""Prompt sets: the bundled harmful and harmless sets, JSONL and TXT files, Hugging Face datasets.

A prompt source is one string:

- ``bundled:harmful`` or ``bundled:harmless``, optionally with a split:
  ``bundled:harmful:measure`` (for measuring directions) or ``bundled:harmful:eval``
  (for scoring trials); the two splits are disjoint.
- ``PATH.jsonl`` — one JSON object per line, the prompt under the key ``"prompt"``;
  ``PATH.jsonl:KEY`` reads it from ``KEY`` instead. Blank lines are skipped.
- ``PATH.txt`` — one prompt per non-empty line; lines starting with ``#`` are comments.
- ``hf:DATASET[:SPLIT[:COLUMN]]`` — a Hugging Face dataset (needs ``pip install 'abopt[hf]'``);
  SPLIT defaults to ``train``; without COLUMN the first of ``prompt``, ``text`` and
  ``instruction`` that the dataset has is used.

Relative paths are resolved against ``base_dir`` (the study file's directory) when given,
else against the working directory. Every mistake raises :class:`UserError` with one line.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from optimizer import DATA
from optimizer.errors import UserError

BUNDLED_DIR = DATA / "prompts"
BUNDLED_SETS = ("harmful", "harmless")
SPLITS = ("measure", "eval")
HF_COLUMNS = ("prompt", "text", "instruction")
# hf:DATASET[:SPLIT[:COLUMN]]; SPLIT may carry a slice such as train[:100].
_HF_SOURCE = re.compile(r"hf:([^:\[\]]+)(?::([^:\[\]]+(?:\[[^\]]*\])?))?(?::([^:\[\]]+))?")


@dataclass(frozen=True)
class BundledPrompt:
    """One prompt of a bundled set, with its category and split."""

    prompt: str
    category: str
    split: str


def load_prompts(
    source: str, *, base_dir: Path | None = None, limit: int | None = None
) -> list[str]:
    """The prompts of source (see the module docstring), the first limit of them if given."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise UserError(f"prompt limit {limit!r} for {source!r} is not a positive whole number")
    source = source.strip()
    if not source:
        raise UserError(
            "the prompt source is empty; give bundled:harmful, a .jsonl or .txt file, or hf:NAME"
        )
    if source == "bundled" or source.startswith("bundled:"):
        prompts = _load_bundled(source)
    elif source.startswith("hf:"):
        prompts = _load_hf(source, limit)
    else:
        prompts = _load_file(source, base_dir)
    if not prompts:
        raise UserError(f"prompt source {source!r} gave no prompts; point it at a non-empty set")
    return prompts[:limit] if limit is not None else prompts


@functools.cache
def bundled_prompts(name: str) -> tuple[BundledPrompt, ...]:
    """Every prompt of the bundled set name ("harmful" or "harmless"), in file order."""
    if name not in BUNDLED_SETS:
        raise UserError(
            f"unknown bundled prompt set {name!r}; use one of: {', '.join(BUNDLED_SETS)}"
        )
    path = BUNDLED_DIR / f"{name}.jsonl"
    return tuple(
        BundledPrompt(record["prompt"], record["category"], record["split"])
        for _, record in _read_jsonl(path)
    )


def shared_prompts(first: Sequence[str], second: Sequence[str]) -> list[str]:
    """Prompts of first that are also in second, ignoring case and spacing."""
    seen = {_key(prompt) for prompt in second}
    return [prompt for prompt in first if _key(prompt) in seen]


def _key(prompt: str) -> str:
    """Comparison key of a prompt: casefolded, whitespace collapsed."""
    return " ".join(prompt.casefold().split())


def _load_bundled(source: str) -> list[str]:
    """Prompts of a bundled:NAME[:SPLIT] source."""
    parts = source.split(":")
    usage = "use bundled:harmful or bundled:harmless, optionally followed by :measure or :eval"
    if not 2 <= len(parts) <= 3:
        raise UserError(f"prompt source {source!r} is malformed; {usage}")
    name = parts[1]
    split = parts[2] if len(parts) == 3 else None
    if name not in BUNDLED_SETS:
        raise UserError(f"prompt source {source!r}: unknown bundled set {name!r}; {usage}")
    if split is not None and split not in SPLITS:
        raise UserError(
            f"prompt source {source!r}: unknown split {split!r}; use :measure or :eval, "
            "or no split for all prompts"
        )
    return [item.prompt for item in bundled_prompts(name) if split in (None, item.split)]


def _load_file(source: str, base_dir: Path | None) -> list[str]:
    """Prompts of a PATH.jsonl[:KEY] or PATH.txt source."""
    path_text, key = source, "prompt"
    head, sep, tail = source.rpartition(":")
    if sep and head.lower().endswith(".jsonl"):
        if not tail.strip():
            raise UserError(
                f"prompt source {source!r} ends with ':' but names no key; "
                "write PATH.jsonl or PATH.jsonl:KEY"
            )
        path_text, key = head, tail.strip()
    path = Path(path_text).expanduser()
    if base_dir is not None and not path.is_absolute():
        path = Path(base_dir) / path
    path = path.absolute()
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".txt"):
        raise UserError(
            f"prompt file {path} has an unsupported extension {path.suffix or '(none)'!r}; "
            "use a .jsonl file (one {\"prompt\": ...} object per line) or a .txt file "
            "(one prompt per line)"
        )
    if not path.exists():
        where = f" (relative paths are resolved against {base_dir})" if base_dir else ""
        raise UserError(f"prompt file {path} not found{where}; check the path")
    if suffix == ".txt":
        prompts = _read_txt(path)
    else:
        prompts = [_prompt_field(path, number, record, key) for number, record in _read_jsonl(path)]
    if not prompts:
        what = "JSON lines" if suffix == ".jsonl" else "prompt lines"
        raise UserError(f"prompt file {path} contains no {what}; add at least one prompt")
    return prompts


def _read_text(path: Path) -> str:
    """The UTF-8 text of path, or a UserError saying why it cannot be read."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"prompt file {path} is not UTF-8 text; save it as UTF-8") from None
    except OSError as error:
        reason = error.strerror or error
        raise UserError(
            f"cannot read prompt file {path}: {reason}; check the path and its permissions"
        ) from None


def _read_txt(path: Path) -> list[str]:
    """Non-empty, non-comment lines of a .txt prompt file, stripped."""
    lines = (line.strip() for line in _read_text(path).split("\n"))
    return [line for line in lines if line and not line.startswith("#")]


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line of a JSONL file."""
    records = []
    # split on \n only: str.splitlines would also split inside prompts holding U+2028 and co.
    for number, line in enumerate(_read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(
                f"prompt file {path}: line {number} is not valid JSON ({error.msg}); "
                'write one object per line, like {"prompt": "..."}'
            ) from None
        if not isinstance(record, dict):
            raise UserError(
                f"prompt file {path}: line {number} is a JSON {type(record).__name__}, not an "
                'object; write one object per line, like {"prompt": "..."}'
            )
        records.append((number, record))
    return records


def _prompt_field(path: Path, number: int, record: dict, key: str) -> str:
    """The prompt under key in one JSONL record, checked."""
    if key not in record:
        keys = ", ".join(map(repr, record)) or "none"
        raise UserError(
            f"prompt file {path}: line {number} has no {key!r} key (it has: {keys}); add it, "
            f"or name the key to read with {path.name}:KEY"
        )
    value = record[key]
    if not isinstance(value, str):
        raise UserError(
            f"prompt file {path}: line {number}: {key!r} is a JSON "
            f"{'null' if value is None else type(value).__name__}, not a string; make it text"
        )
    if not value.strip():
        raise UserError(
            f"prompt file {path}: line {number}: {key!r} is empty; fill it in or remove the line"
        )
    return value.strip()


def _load_hf(source: str, limit: int | None) -> list[str]:
    """Prompts of an hf:DATASET[:SPLIT[:COLUMN]] source."""
    match = _HF_SOURCE.fullmatch(source)
    if match is None:
        raise UserError(
            f"prompt source {source!r} is malformed; write hf:DATASET, hf:DATASET:SPLIT "
            "or hf:DATASET:SPLIT:COLUMN (e.g. hf:org/name:train[:200]:prompt)"
        )
    name, split, column = (part.strip() if part else "" for part in match.groups())
    split = split or "train"
    try:
        import datasets
    except ImportError:
        raise UserError(
            f"prompt source {source!r} needs the optional 'datasets' package; "
            "install it with: pip install 'abopt[hf]'"
        ) from None
    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as error:  # noqa: BLE001 - any failure of the hub or the cache
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UserError(
            f"cannot load Hugging Face dataset {name!r} (split {split!r}) for {source!r}: "
            f"{reason}; check the name and split, and be online or have the dataset cached"
        ) from None
    columns = list(dataset.column_names)
    if column and column not in columns:
        raise UserError(
            f"Hugging Face dataset {name!r} has no column {column!r} "
            f"(it has: {', '.join(columns)}); name one of those in hf:{name}:{split}:COLUMN"
        )
    if not column:
        column = next((candidate for candidate in HF_COLUMNS if candidate in columns), "")
        if not column:
            raise UserError(
                f"Hugging Face dataset {name!r} has none of the columns {', '.join(HF_COLUMNS)} "
                f"(it has: {', '.join(columns)}); name the column with hf:{name}:{split}:COLUMN"
            )
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    prompts = []
    for row, value in enumerate(dataset[column]):
        if not isinstance(value, str) or not value.strip():
            raise UserError(
                f"Hugging Face dataset {name!r}, split {split!r}: row {row} of column {column!r} "
                "is not a non-empty string; pick a text column"
            )
        prompts.append(value.strip())
    return prompts
