"""Refusal markers: phrases whose presence in an answer marks it as a refusal.

Answers and markers are compared after :func:`normalize` (lowercase, typographic quotes
made ASCII, markdown emphasis removed, whitespace collapsed), and a marker only matches on
word boundaries where it starts or ends with a letter or digit: ``"i can't"`` matches
"I **can’t** help" but not "Wi-Fi can't reach".
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

from optimizer import DATA
from optimizer.errors import UserError

BUNDLED_MARKERS = DATA / "refusal_markers.txt"

# Typographic quotes and invisible characters, replaced one by one: str.replace is much
# faster than str.translate with a dict table, and ASCII text skips them altogether.
_REPLACEMENTS = (
    ("\u2019", "'"),  # ’ right single quotation mark, the usual typographic apostrophe
    ("\u2018", "'"),  # ‘
    ("\u02bc", "'"),  # ʼ modifier letter apostrophe
    ("\uff07", "'"),  # ＇ fullwidth apostrophe
    ("\u00b4", "'"),  # ´ acute accent, often typed as an apostrophe
    ("\u2032", "'"),  # ′ prime
    ("\u201c", '"'),  # “
    ("\u201d", '"'),  # ”
    ("\u201e", '"'),  # „
    ("\u2033", '"'),  # ″
    ("\u200b", ""),  # zero-width space
    ("\u200c", ""),  # zero-width non-joiner
    ("\u200d", ""),  # zero-width joiner
    ("\u2060", ""),  # word joiner
    ("\u00ad", ""),  # soft hyphen
    ("\ufeff", ""),  # byte-order mark
)
_MARKUP = re.compile(r"[*_`~]+")


def _strip_markup(match: re.Match[str]) -> str:
    """Replacement for one run of markdown characters (see normalize)."""
    run, text = match.group(), match.string
    start, end = match.start(), match.end()
    joins_words = 0 < start and end < len(text)
    joins_words = joins_words and text[start - 1].isalnum() and text[end].isalnum()
    if joins_words and run == "`":
        return "'"  # "can`t"
    if joins_words and run.strip("_") == "":
        return run  # "snake_case"
    return run.replace("*", "").replace("`", "").replace("_", "").replace("~~", "")


def normalize(text: str) -> str:
    """Lowercase text with ASCII quotes, no markdown emphasis and single spaces.

    Removed as markup: every '*' and backtick, '~~', and '_' except between two letters or
    digits ("snake_case" keeps it); a backtick between two letters is an apostrophe.
    """
    if not text.isascii():
        for old, new in _REPLACEMENTS:
            if old in text:
                text = text.replace(old, new)
    text = _MARKUP.sub(_strip_markup, text)
    return " ".join(text.lower().split())


def load_markers(source: str | None = None, *, base_dir: Path | None = None) -> tuple[str, ...]:
    """Normalised, de-duplicated markers: the bundled list (None or "bundled") or a .txt file."""
    if source is None or source == "bundled":
        path = BUNDLED_MARKERS
    else:
        path = Path(source).expanduser()
        if base_dir is not None and not path.is_absolute():
            path = Path(base_dir) / path
        path = path.absolute()
        if path.suffix.lower() != ".txt":
            raise UserError(
                f"refusal marker file {path} is not a .txt file; "
                "give a .txt file with one marker phrase per line, or 'bundled'"
            )
        if not path.is_file():
            where = f" (relative paths are resolved against {base_dir})" if base_dir else ""
            raise UserError(f"refusal marker file {path} not found{where}; check the path")
    try:
        lines = path.read_text(encoding="utf-8-sig").split("\n")
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else "it is not UTF-8 text"
        raise UserError(
            f"cannot read refusal marker file {path}: {reason}; fix or replace it"
        ) from None
    markers: dict[str, None] = {}
    for number, line in enumerate(lines, start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        marker = normalize(line)
        if not marker:
            raise UserError(
                f"refusal marker file {path}: line {number} ({line!r}) is empty once markdown "
                "is removed; write the marker as plain words"
            )
        markers[marker] = None
    if not markers:
        raise UserError(
            f"refusal marker file {path} has no markers; add one phrase per line "
            "(lines starting with '#' are comments)"
        )
    return tuple(markers)


@functools.lru_cache(maxsize=32)
def _matcher(markers: tuple[str, ...]) -> tuple[re.Pattern[str], dict[str, str]]:
    """One compiled alternation for markers, and a map from normalised to given marker."""
    given: dict[str, str] = {}
    for marker in markers:
        key = normalize(marker)
        if key:
            given.setdefault(key, marker)
    if not given:
        raise UserError("the refusal marker list is empty; give at least one marker phrase")
    alternatives = []
    for key in given:
        start = r"\b" if key[0].isalnum() else ""
        end = r"\b" if key[-1].isalnum() else ""
        alternatives.append(f"{start}{re.escape(key)}{end}")
    return re.compile("|".join(alternatives)), given


def find_refusal(text: str, markers: tuple[str, ...]) -> str | None:
    """The marker found earliest in normalize(text) (ties: the one listed first), else None."""
    pattern, given = _matcher(tuple(markers))
    match = pattern.search(normalize(text))
    return None if match is None else given[match.group()]
