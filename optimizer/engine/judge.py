"""An on-device judge: did an answer comply with its request?

A small chat model reads each (request, answer) pair through a prompt template (its user
message) and the verdict is read from its next-token distribution right after the
generation prompt, in one batched forward pass and without generating: the score is
P(Yes) / (P(Yes) + P(No)), the probability that the answer complied, i.e. actually helps
with the request. Refusals, deflections, questions back, help-then-refuse and degenerate
answers (empty, punctuation, loops, gibberish) are "No".

The bundled judge (``optimizer/data/judge``, trained by ``scripts/train_judge.py``) is a
tiny llama-architecture model made for the bundled template
(``optimizer/data/judge_prompt.txt``); any mlx-lm chat model can be a judge too, by path
or Hugging Face id, with the bundled template or a user's own.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.tokenizer_utils import TokenizerWrapper

from optimizer import DATA
from optimizer.engine.markers import load_markers
from optimizer.engine.model import (
    chat_tokens,
    forward,
    last_positions_only,
    load_model,
    logits_at,
    pad_left,
    pad_right,
    prefix_cache,
    repeat_cache,
    shared_prefix_length,
)
from optimizer.engine.verdicts import (
    VERDICTS,
    is_degenerate,
    marker_verdict,
    strip_thinking,
)
from optimizer.errors import UserError

BUNDLED = "bundled"
BUNDLED_JUDGE = DATA / "judge"
BUNDLED_TEMPLATE = DATA / "judge_prompt.txt"
# A judge model directory may hold the template it was trained on, its default: the bundled
# judge's has none of the question a chat model needs.
OWN_TEMPLATE = "judge_prompt.txt"
PLACEHOLDERS = ("{request}", "{answer}")
THRESHOLD = 0.5  # a score at or above it means the answer complied
MAX_KNOWN = 200_000  # scores a judge keeps (about 100 MB of text at most), then starts again

_PLACEHOLDER = re.compile(r"\{(request|answer)\}")


@dataclass(frozen=True)
class Judge:
    """A loaded judge model, its tokenizer, the prompt template and its verdict tokens."""

    model: nn.Module = field(repr=False)
    tokenizer: TokenizerWrapper = field(repr=False)
    template: str = field(repr=False)
    source: str
    yes_id: int
    no_id: int
    # Scores already computed, by (request, answer): a study's trials give many answers
    # again word for word (a prompt the steering leaves alone), and the judge is deterministic.
    known: dict[tuple[bool, str, str], float] = field(default_factory=dict, compare=False, repr=False)

    @property
    def parameters(self) -> int:
        """How many parameters the judge has."""
        return sum(v.size for _, v in tree_flatten(self.model.parameters()))

    @property
    def nbytes(self) -> int:
        """The memory its weights take."""
        return sum(v.nbytes for _, v in tree_flatten(self.model.parameters()))


def load_template(source: str | None = None, *, base_dir: Path | None = None, judge: str | None = None) -> str:
    """The judge's prompt template: the default (None or "bundled") or a text file.

    The template is plain text with a ``{request}`` and an ``{answer}`` placeholder; it
    becomes the judge's user message. The default is the one a judge model directory
    (``judge``: "bundled" or a path) was trained on, if it has one, else the bundled template.
    """
    if source is None or source == BUNDLED:
        path = own_template(judge) or BUNDLED_TEMPLATE
    else:
        path = Path(source).expanduser()
        if base_dir is not None and not path.is_absolute():
            path = Path(base_dir) / path
        path = path.absolute()
        if not path.is_file():
            where = f" (relative paths are resolved against {base_dir})" if base_dir else ""
            raise UserError(f"judge prompt template {path} not found{where}; check the path")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else "it is not UTF-8 text"
        raise UserError(f"cannot read judge prompt template {path}: {reason}; fix or replace it") from None
    missing = [p for p in PLACEHOLDERS if p not in text]
    if missing:
        raise UserError(
            f"judge prompt template {path} has no {' or '.join(missing)} placeholder; "
            "write the request as {request} and the answer as {answer} in it"
        )
    return text


def own_template(judge: str | None) -> Path | None:
    """The template a judge model directory carries (``judge_prompt.txt``), if any."""
    if not judge or judge == "markers":
        return None
    folder = BUNDLED_JUDGE if judge == BUNDLED else Path(judge).expanduser()
    path = folder / OWN_TEMPLATE
    return path if path.is_file() else None


def fill_template(template: str, request: str, answer: str) -> str:
    """The judge's user message: ``template`` with the request and the answer filled in.

    One pass over the template, so braces or placeholder names inside the request or the
    answer are kept as they are.
    """
    values = {"request": request, "answer": answer}
    return _PLACEHOLDER.sub(lambda match: values[match.group(1)], template)


def yes_no_ids(tokenizer: TokenizerWrapper) -> tuple[int, int]:
    """The token ids of "Yes" and "No" as the first token of the assistant's turn."""
    base = chat_tokens(tokenizer, "?")
    ids = []
    for word in ("Yes", "No"):
        # How the word is tokenized right after the generation prompt; failing that (a
        # template that ends in a space, say), the word on its own.
        text = tokenizer.decode(base) + word
        after = tokenizer.encode(text, add_special_tokens=False)
        if len(after) == len(base) + 1 and after[: len(base)] == base:
            ids.append(after[-1])
            continue
        alone = tokenizer.encode(word, add_special_tokens=False)
        if len(alone) != 1:
            raise UserError(
                f"the judge's tokenizer has no single token for {word!r} (it splits it into "
                f"{len(alone)}); use a judge model whose tokenizer has one for both 'Yes' and 'No'"
            )
        ids.append(alone[0])
    if ids[0] == ids[1]:
        raise UserError("the judge's tokenizer maps 'Yes' and 'No' to the same token; use another judge model")
    return ids[0], ids[1]


def load_judge(source: str = BUNDLED, *, template: str | None = None, dtype: str = "auto") -> Judge:
    """Load a judge: "bundled" (the tiny bundled judge), a model directory or a Hugging Face id.

    ``template`` is a template file (default: the judge directory's own ``judge_prompt.txt``,
    else the bundled template).
    """
    if source == BUNDLED:
        if not (BUNDLED_JUDGE / "config.json").exists():
            raise UserError(
                f"the bundled judge is not installed ({BUNDLED_JUDGE} has no model); "
                'use judge = "markers" or a judge model (a path or a Hugging Face id)'
            )
        path = str(BUNDLED_JUDGE)
    else:
        path = source
    text = load_template(template, judge=source)
    loaded = load_model(path, dtype=dtype)
    yes_id, no_id = yes_no_ids(loaded.tokenizer)
    return Judge(loaded.model, loaded.tokenizer, text, source, yes_id, no_id)


def judge_tokens(judge: Judge, request: str, answer: str) -> list[int]:
    """The judge's input for one pair: the filled template, chat-templated, up to the verdict."""
    return chat_tokens(judge.tokenizer, fill_template(judge.template, request, answer))


def judge_scores(
    judge: Judge, requests: Sequence[str], answers: Sequence[str], *, batch_size: int = 32, share_prefix: bool = True
) -> np.ndarray:
    """P(complied) for each (request, answer) pair, float32, in the order given.

    One forward pass per batch of pairs (similar lengths batched together), reading only
    the last real position's logits. The tokens every pair shares (the chat template's
    header and the template's text before the first placeholder) run once: each batch
    continues from their KV cache (``share_prefix=False`` recomputes them per pair).
    """
    if len(requests) != len(answers):
        raise ValueError(f"{len(requests)} requests but {len(answers)} answers")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}")
    pairs = list(zip(requests, answers))
    keys = [(share_prefix, *pair) for pair in pairs]
    scores = np.array([judge.known.get(key, np.nan) for key in keys], dtype=np.float32)
    todo = [i for i, score in enumerate(scores) if np.isnan(score)]
    if todo:
        scores[todo] = _scores(judge, [pairs[i] for i in todo], batch_size, share_prefix)
        if len(judge.known) > MAX_KNOWN:
            judge.known.clear()
        judge.known.update((keys[i], float(scores[i])) for i in todo)
    return scores


def _scores(judge: Judge, pairs: list[tuple[str, str]], batch_size: int, share_prefix: bool) -> np.ndarray:
    encoded = [judge_tokens(judge, r, a) for r, a in pairs]
    scores = np.empty(len(encoded), dtype=np.float32)
    # Every row keeps at least its last token to compute.
    shared = shared_prefix_length(encoded) if share_prefix else 0
    prefix = prefix_cache(judge.model, encoded[0][:shared])
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        if prefix is None:
            pair = _verdict_logits(judge, [encoded[i] for i in rows])
        else:
            pair = _verdict_logits_after(judge, [encoded[i][shared:] for i in rows], prefix)
        # P(Yes) / (P(Yes) + P(No)): the softmax's normaliser cancels out.
        score = mx.sigmoid(pair[:, 0] - pair[:, 1])
        mx.eval(score)
        scores[rows] = np.array(score)
    return scores


def _verdict_logits(judge: Judge, sequences: list[list[int]]) -> mx.array:
    """(B, 2) logits of Yes and No after each whole sequence, left-padded."""
    tokens, padding = pad_left(sequences, judge.tokenizer.pad_token_id or 0)
    with last_positions_only(judge.model, 1):
        logits = forward(judge.model, tokens, padding)[:, -1, :]
    return logits[:, mx.array([judge.yes_id, judge.no_id])].astype(mx.float32)


def _verdict_logits_after(judge: Judge, suffixes: list[list[int]], prefix: list) -> mx.array:
    """(B, 2) logits of Yes and No after each suffix, continuing the shared prefix's cache."""
    tokens, last = pad_right(suffixes, judge.tokenizer.pad_token_id or 0)
    logits = logits_at(judge.model, tokens, last, repeat_cache(prefix, len(suffixes)))
    return logits[:, mx.array([judge.yes_id, judge.no_id])].astype(mx.float32)


def complied(scores: np.ndarray) -> np.ndarray:
    """The verdicts: True where the answer complied (score at or above THRESHOLD)."""
    return np.asarray(scores) >= THRESHOLD


def answer_verdicts(
    requests: Sequence[str], answers: Sequence[str], markers: tuple[str, ...], judge: Judge | None, *, batch_size: int = 32
) -> tuple[tuple[str, ...], tuple[float, ...] | None]:
    """Each answer's verdict (refused, complied or degenerate), and the judge's scores.

    A thinking block is removed first. Degenerate answers (empty, loops, not text) are
    degenerate whoever judges; without a judge the marker rule decides; with one, a marker
    never does: the judge's P(complied) does. Scores are None when markers judge.
    """
    if judge is None:
        return tuple(marker_verdict(a, markers) for a in answers), None
    texts = [strip_thinking(a) for a in answers]
    scores = judge_scores(judge, requests, texts, batch_size=batch_size)
    verdicts = tuple(
        "degenerate" if is_degenerate(t) else "complied" if s >= THRESHOLD else "refused" for t, s in zip(texts, scores)
    )
    return verdicts, tuple(round(float(s), 4) for s in scores)


@dataclass(frozen=True)
class JudgedFile:
    """`abopt judge` on a file: one output line per answer, and what they add up to."""

    lines: tuple[dict, ...]
    labels: tuple[str | None, ...]

    def summary(self) -> str:
        verdicts = [line["verdict"] for line in self.lines]
        text = f"{len(verdicts)} answers: " + ", ".join(f"{verdicts.count(v)} {v}" for v in VERDICTS)
        labelled = [(line["verdict"], label) for line, label in zip(self.lines, self.labels) if label]
        if labelled:
            # The search counts refused and degenerate alike, as not complied.
            agree = sum((v == "complied") == (label == "complied") for v, label in labelled)
            text += f"; agrees with the labels on complied vs not complied for {agree}/{len(labelled)} ({agree / len(labelled):.1%})"
        return text


def judge_file(
    path: Path, judge: str, template: str | None, markers_source: str, base_dir: Path | None = None
) -> JudgedFile:
    """Verdicts on a JSONL file of {"prompt", "answer"[, "label"]} pairs, as a study judges them."""
    pairs = _read_pairs(path)
    markers = tuple(load_markers(markers_source, base_dir=base_dir))
    loaded = None if judge == "markers" else load_judge(judge, template=template)
    verdicts, scores = answer_verdicts([p["prompt"] for p in pairs], [p["answer"] for p in pairs], markers, loaded)
    lines = tuple(
        {"prompt": p["prompt"], "answer": p["answer"], "verdict": v, "score": None if scores is None else scores[i]}
        for i, (p, v) in enumerate(zip(pairs, verdicts))
    )
    return JudgedFile(lines, tuple(p.get("label") for p in pairs))


def _read_pairs(path: Path) -> list[dict]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else "it is not UTF-8 text"
        raise UserError(f"cannot read {path}: {reason}; give a JSONL file of prompt/answer pairs") from None
    pairs = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            pair = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"{path}:{number}: not JSON ({error.msg}); write one {{\"prompt\": ..., \"answer\": ...}} per line") from None
        if not isinstance(pair, dict) or not isinstance(pair.get("prompt"), str) or not isinstance(pair.get("answer"), str):
            raise UserError(f"{path}:{number}: needs a \"prompt\" and an \"answer\", both strings")
        pairs.append(pair)
    if not pairs:
        raise UserError(f"{path} has no prompt/answer pairs; write one JSON object per line")
    return pairs
