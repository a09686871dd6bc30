"""Scoring a steered model: KL divergence on harmless prompts, refusal rate on harmful ones.

An :class:`Evaluator` tokenizes and batches its prompts once and computes the untouched
model's reference distributions once; each trial then costs one forward pass over the
harmless prompts and one batched greedy generation over the harmful ones, with whatever
steering is set on the model at the time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Iterator, Sequence, TypeVar

import mlx.core as mx
import numpy as np
from mlx_lm.models import cache as mlx_cache

from optimizer.engine.judge import Judge, answer_verdicts
from optimizer.engine.markers import find_refusal
from optimizer.engine.model import (
    LoadedModel,
    after_prefix,
    available_memory,
    batch_cache,
    chat_tokens,
    last_positions_only,
    left_aligned,
    logits_at,
    pad_left,
    prefix_cache,
    shared_prefix_length,
)
from optimizer.engine.replay import LayerRecord, Replay, recording, replaying
from optimizer.engine.verdicts import is_degenerate, marker_verdict, strip_thinking

MAX_AUTO_BATCH = 64
T = TypeVar("T")


@dataclass(frozen=True)
class EvalSettings:
    """How trials are scored."""

    max_new_tokens: int = 32
    kl_tokens: int = 1
    batch_size: int = 0  # 0: sized to memory, halved on out-of-memory
    system_prompt: str = ""
    thinking: bool = False  # what a reasoning model's chat template is told
    # Bytes the evaluator may keep of the untouched model's leading layers (their outputs on
    # the eval prompts and their prefill KV caches) so that a trial starts at its first
    # steered layer; 0: none, every pass runs every layer.
    replay_bytes: int = 0
    # The chat template's leading tokens that every prompt shares (a system prompt, the
    # template's header) run once per pass, and each prompt continues from their KV cache;
    # only where every layer's cache is a plain KV cache.
    share_prefix: bool = True


@dataclass(frozen=True)
class RefusalResult:
    """What a prompt set got: each answer, and its verdict (refused, complied or degenerate)."""

    verdicts: tuple[str, ...]
    answers: tuple[str, ...]
    generated_tokens: int
    scores: tuple[float, ...] | None = None  # the judge's P(complied) per answer; None: markers
    # Per prompt batch, the number of rows in each forward pass of its generation (the
    # prefill first, then one per decode step): what the benchmark replays as its floor.
    step_sizes: tuple[tuple[int, ...], ...] = field(default=(), compare=False, repr=False)
    judge_seconds: float = field(default=0.0, compare=False)
    # Stopped early (see Evaluator.refusals's give_up): answers not judged have verdict "".
    screened: bool = False

    @property
    def refused(self) -> int:
        return self.verdicts.count("refused")

    @property
    def degenerate(self) -> int:
        return self.verdicts.count("degenerate")

    @property
    def complied(self) -> int:
        return self.verdicts.count("complied")

    @property
    def total(self) -> int:
        return len(self.verdicts)

    @property
    def judged(self) -> int:
        """Answers with a verdict: all of them unless the stage was screened."""
        return self.total - self.verdicts.count("")

    @property
    def rate(self) -> float:
        """The share not complied with (refused or degenerate): the refusal objective.

        Of a screened result, the share known so far: a bound the full rate cannot beat."""
        return (self.refused + self.degenerate) / self.total if self.total else 0.0


StopFn = Callable[[list[int], list[list[int]]], list[bool]]
FinishedFn = Callable[[list[int], list[list[int]]], None]
GiveUpFn = Callable[[int], bool]


class _GaveUp(Exception):
    """Raised inside a generation when its trial cannot reach the front any more."""


def greedy_generate(
    loaded: LoadedModel,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    stop: StopFn | None = None,
    step_sizes: list[int] | None = None,
    finished: FinishedFn | None = None,
    chunks: Sequence[Sequence[int]] | None = None,
    records: Sequence[LayerRecord | None] = (),
    start: int = 0,
    prefix: int = 0,
) -> tuple[list[list[int]], int]:
    """Greedy continuations of a batch of token prompts, with one shared KV cache.

    A row stops at EOS (not included), when ``stop(rows, tokens)`` says so (the token that
    triggered it is kept), or after ``max_new_tokens``; the batch ends when all rows
    stopped, and stopped rows leave the batch. Returns the tokens and the number of
    decode steps run; ``step_sizes``, if given, gets the batch size of each forward pass,
    and ``finished(rows, tokens)`` hears of the rows that stopped after each step.

    ``chunks`` (indices into ``prompts``) prefill separately, each padded to its own longest
    prompt, and their caches are joined for decoding (a prefill costs its padded positions;
    decode steps are cheapest in one batch); chunk ``i`` takes layers ``0 … start − 1``
    from ``records[i]`` (see :mod:`replay`). ``prefix``: how many leading tokens every
    prompt shares; they are computed once, and each chunk continues from their cache.
    """
    model, eos = loaded.model, loaded.tokenizer.eos_token_ids
    chunks = chunks or [range(len(prompts))]
    cache, logits = _prefill(loaded, [[prompts[i] for i in c] for c in chunks], records, start, prefix)
    outputs: list[list[int]] = [[] for _ in prompts]
    active = [i for chunk in chunks for i in chunk]  # the batch's rows, in prompt indices
    steps = 0
    with last_positions_only(model, 1):
        if step_sizes is not None:
            step_sizes.append(len(active))
        while True:
            next_tokens = mx.argmax(logits[:, -1, :], axis=-1)
            values = next_tokens.tolist()
            steps += 1
            still = []
            for position, (row, token) in enumerate(zip(active, values)):
                if token in eos:
                    continue
                outputs[row].append(token)
                if len(outputs[row]) < max_new_tokens:
                    still.append(position)
            if still and stop is not None:
                rows = [active[p] for p in still]
                halted = stop(rows, [outputs[r] for r in rows])
                still = [p for p, done in zip(still, halted) if not done]
            if finished is not None and len(still) < len(active):
                kept = set(still)
                done_rows = [row for p, row in enumerate(active) if p not in kept]
                finished(done_rows, [outputs[r] for r in done_rows])
            if not still:
                break
            if len(still) < len(active):
                keep = mx.array(still)
                for layer_cache in cache:
                    layer_cache.filter(keep)
                next_tokens = next_tokens[keep]
                active = [active[p] for p in still]
            logits = model(next_tokens[:, None], cache=cache)
            if step_sizes is not None:
                step_sizes.append(len(active))
    return outputs, steps


def _prefill(
    loaded: LoadedModel, chunks: Sequence[Sequence[Sequence[int]]], records: Sequence[LayerRecord | None], start: int, prefix: int = 0
) -> tuple[list[Any], mx.array]:
    """Each chunk of prompts prefilled on its own cache, the caches joined; the joined cache
    and the last position's logits, rows in chunk order. ``prefix``: leading tokens every
    prompt shares, computed once (with the current steering) for all chunks."""
    shared = prefix_cache(loaded.model, chunks[0][0][:prefix])
    joined: list[Any] | None = None
    logits = []
    for chunk, record in zip(chunks, [*records, *[None] * (len(chunks) - len(records))]):
        cache, last, _ = prefill_chunk(loaded, chunk, shared, lambda c, r=record: replaying(loaded.layers, r, start, c))
        logits.append(last)
        if joined is None:
            joined = cache
        else:
            for mine, theirs in zip(joined, cache):
                mine.extend(theirs)  # mlx-lm's own join: left-pads the shorter, masks it
    assert joined is not None
    return joined, logits[0] if len(logits) == 1 else mx.concatenate(logits)


def prefill_chunk(
    loaded: LoadedModel, prompts: Sequence[Sequence[int]], shared: list[Any] | None, around: Callable[[list[Any]], ContextManager[T]]
) -> tuple[list[Any], mx.array, T]:
    """One chunk's prefill, run within ``around(cache)`` (replaying or recording layers): its
    batch KV cache, left-padded as decoding wants it, the (B, 1, V) logits at each prompt's
    last token, and what ``around`` yielded. With ``shared`` (a prefix's cache), the prompts'
    own tokens run right-padded after it, and their padding is then moved to the front."""
    model, pad_id = loaded.model, loaded.tokenizer.pad_token_id or 0
    if shared is None:
        tokens, padding = pad_left(prompts, pad_id)
        cache = batch_cache(model, padding)
        with around(cache) as entered, last_positions_only(model, 1):
            return cache, model(tokens, cache=cache), entered
    tokens, last, cache = after_prefix(prompts, shared, pad_id)
    with around(cache) as entered:
        logits = logits_at(model, tokens, last, cache)[:, None]
    return left_aligned(cache, (tokens.shape[1] - 1 - last).tolist()), logits, entered


class Evaluator:
    """Scores the current steering of ``loaded`` on fixed eval prompts."""

    def __init__(
        self,
        loaded: LoadedModel,
        harmful: Sequence[str],
        harmless: Sequence[str],
        markers: tuple[str, ...],
        settings: EvalSettings = EvalSettings(),
        judge: Judge | None = None,
    ) -> None:
        self.loaded = loaded
        self.markers = markers
        self.settings = settings
        self.judge = judge
        self.harmful_prompts, self.harmless_prompts = tuple(harmful), tuple(harmless)
        system, thinking = settings.system_prompt, settings.thinking
        self.harmful_tokens = [chat_tokens(loaded.tokenizer, p, system, thinking) for p in harmful]
        self.harmless_tokens = [chat_tokens(loaded.tokenizer, p, system, thinking) for p in harmless]
        self.batch_size = settings.batch_size or auto_batch_size(loaded, self.harmful_tokens + self.harmless_tokens)
        # Prefill chunks are joined into one cache, and a shared prefix's cache continued,
        # only where every layer's cache is a plain KV cache (a sliding window's rotating
        # cache is prefilled whole, as before).
        self.joinable = all(type(c) is mlx_cache.KVCache for c in mlx_cache.make_prompt_cache(loaded.model))
        # Layer outputs of the untouched model kept for trials to start later (see replay.py):
        # recorded with the reference distributions and one prefill per refusal batch.
        self.kl_replay = Replay(replay_depth(loaded, self.harmful_tokens, self.harmless_tokens, settings))
        self.prefill_replay = Replay(self.kl_replay.depth)
        self._kl_inputs, self._kl_valid, self._reference = self._with_backoff(self._reference_distributions)
        if self.kl_replay.depth:
            self._with_backoff(self._record_prefills)
            if not self._replay_matches():
                self.kl_replay, self.prefill_replay = Replay(0), Replay(0)

    def _with_backoff(self, compute: Callable[[], T]) -> T:
        """``compute()``, halving the batch size and retrying whenever memory runs out."""
        while True:
            try:
                return compute()
            except (RuntimeError, MemoryError) as error:
                if self.batch_size == 1 or not is_out_of_memory(error):
                    raise
                self.batch_size = max(1, self.batch_size // 2)
                mx.clear_cache()

    # -- KL ------------------------------------------------------------------------------

    def _reference_distributions(self) -> tuple[list[list[int]], mx.array, mx.array]:
        """Inputs, (N, k) validity mask and (N, k, V) log-probs of the untouched model, once."""
        k = self.settings.kl_tokens
        inputs = [list(t) for t in self.harmless_tokens]
        valid = np.ones((len(inputs), k), dtype=np.float32)
        if k > 1:
            # Teacher-force the original's own greedy answer: still one forward pass per trial.
            answers = self.original_answers(self.harmless_tokens, k)
            for row, answer in enumerate(answers):
                # Position j predicts answer token j; after an early EOS nothing is predicted.
                valid[row, len(answer) + 1 :] = 0.0
                filler = answer[-1:] or inputs[row][-1:]
                inputs[row] = inputs[row] + (answer + filler * k)[: k - 1]
        rows, logits = zip(*self._kl_logits(inputs, record=True))
        order = mx.array(np.argsort(np.concatenate(rows)))  # back to prompt order
        logits = mx.concatenate(logits)[order]
        reference = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        mask = mx.array(valid)
        mx.eval(reference, mask)
        return inputs, mask, reference

    def _kl_logits(self, inputs: list[list[int]], *, start: int = 0, record: bool = False) -> Iterator[tuple[list[int], mx.array]]:
        """Each batch's rows and float32 logits at its last ``kl_tokens`` positions, evaluated
        batch by batch (so a stop request lands between two forward passes).

        ``start``: layers before it are replayed from the untouched model's; ``record``:
        this pass is the untouched model's, and its leading layers are kept for replay."""
        layers, replay = self.loaded.layers, self.kl_replay
        prefix = self.shared_prefix(inputs, self.settings.kl_tokens)
        shared = prefix_cache(self.loaded.model, inputs[0][:prefix])
        for rows in self._batches(inputs, cap_padding=True):
            if record and replay.depth:
                with recording(layers, replay.depth) as records:
                    logits = self._last_logits([inputs[r] for r in rows], shared)
                mx.eval(logits, [r.outputs for r in records])
                replay.records.update({tuple(rows): r for r in records})
            else:
                with replaying(layers, replay.get(rows), start):
                    logits = self._last_logits([inputs[r] for r in rows], shared)
            mx.eval(logits)
            yield rows, logits

    def _last_logits(self, batch: list[list[int]], shared: list[Any] | None) -> mx.array:
        """float32 logits (B, k, V) at each row's last ``kl_tokens`` positions: left-padded,
        or continuing ``shared`` (a shared prefix's cache) right-padded."""
        k, model, pad_id = self.settings.kl_tokens, self.loaded.model, self.loaded.tokenizer.pad_token_id or 0
        if shared is None:
            tokens, padding = pad_left(batch, pad_id)
            with last_positions_only(model, k):
                return model(tokens, cache=batch_cache(model, padding))[:, -k:, :].astype(mx.float32)
        tokens, last, cache = after_prefix(batch, shared, pad_id)
        return logits_at(model, tokens, last[:, None] + mx.arange(1 - k, 1)[None], cache).astype(mx.float32)

    def shared_prefix(self, prompts: Sequence[Sequence[int]], keep: int = 1) -> int:
        """How many leading tokens of ``prompts`` a pass computes once for all of them (0:
        none, each prompt is computed whole): see ``EvalSettings.share_prefix``."""
        return shared_prefix_length(prompts, keep) if self.settings.share_prefix and self.joinable else 0

    def _prefill_chunks(self, prompts: Sequence[Sequence[int]], rows: Sequence[int]) -> list[list[int]]:
        """How a generation batch's prefill is split (indices into ``rows``): on a CPU into the
        chunks with the fewest padded positions, elsewhere not at all."""
        if mx.default_device() != mx.cpu or not self.joinable:
            return [list(range(len(rows)))]
        order = sorted(range(len(rows)), key=lambda i: len(prompts[rows[i]]))
        return [[order[i] for i in chunk] for chunk in least_padding([len(prompts[rows[i]]) for i in order], len(rows))]

    def _prefill_records(self, prompts: Sequence[Sequence[int]], rows: Sequence[int], chunks: list[list[int]]) -> list[LayerRecord | None]:
        replay = self.prefill_replay if prompts is self.harmful_tokens else Replay(0)
        return [replay.get([rows[i] for i in chunk]) for chunk in chunks]

    def _record_prefills(self) -> None:
        """The untouched model's refusal prefills, their leading layers kept for replay."""
        layers, replay, prompts = self.loaded.layers, self.prefill_replay, self.harmful_tokens
        replay.records.clear()
        prefix = self.shared_prefix(prompts)
        shared = prefix_cache(self.loaded.model, prompts[0][:prefix])
        for rows in self._batches(prompts):
            for chunk in self._prefill_chunks(prompts, rows):
                chunk_rows = [rows[i] for i in chunk]
                _, logits, records = prefill_chunk(
                    self.loaded, [prompts[r] for r in chunk_rows], shared, lambda c: recording(layers, replay.depth, c)
                )
                mx.eval(logits, [(r.outputs, r.kv) for r in records])
                replay.records.update({tuple(chunk_rows): r for r in records})

    def _replay_matches(self) -> bool:
        """Whether this architecture replays exactly: the untouched model's first KL batch,
        and its first refusal prefill and decode step, started at the deepest kept layer,
        give the logits of the full passes (a model whose layers depend on each other in
        other ways than through the residual stream and their own caches would not)."""
        model, depth = self.loaded.model, self.kl_replay.depth
        rows = self._batches(self._kl_inputs, cap_padding=True)[0]
        batches = self._kl_logits(self._kl_inputs, start=depth)
        _, replayed = next(batches)
        batches.close()  # leaves the last-positions patch now, not when collected
        replayed = replayed - mx.logsumexp(replayed, axis=-1, keepdims=True)  # the reference holds log-probs
        if not mx.allclose(replayed, self._reference[mx.array(rows)], atol=1e-5, rtol=0).item():
            return False
        rows = self._batches(self.harmful_tokens)[0]
        chunks = self._prefill_chunks(self.harmful_tokens, rows)
        prompts, records = [self.harmful_tokens[r] for r in rows], self._prefill_records(self.harmful_tokens, rows, chunks)
        logits = []
        for start in (0, depth):
            cache, first = _prefill(self.loaded, [[prompts[i] for i in c] for c in chunks], records, start, self.shared_prefix(self.harmful_tokens))
            step = model(mx.argmax(first[:, -1:, :], axis=-1), cache=cache)
            logits.append(mx.concatenate([first[:, -1, :], step[:, -1, :]]))
        return bool(mx.allclose(logits[0], logits[1], atol=1e-5, rtol=0).item())

    def kl_divergence(self, *, start: int = 0) -> float:
        """Mean KL(original ‖ steered) of next-token distributions on the harmless prompts.

        ``start``: the first layer the steering touches; layers before it are replayed
        (when kept) rather than computed."""
        return self._with_backoff(lambda: self._kl_divergence(start))

    def _kl_divergence(self, start: int = 0) -> float:
        per_prompt = []
        for rows, logits in self._kl_logits(self._kl_inputs, start=start):
            index = mx.array(rows)
            reference, mask = self._reference[index], self._kl_valid[index]
            steered = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            kl = (mx.exp(reference) * (reference - steered)).sum(axis=-1)  # (B, k)
            per_prompt.append((kl * mask).sum(axis=-1) / mask.sum(axis=-1))
            mx.eval(per_prompt[-1])  # frees this batch's logits before the next forward pass
        return float(mx.concatenate(per_prompt).mean().item())

    # -- answers and verdicts ------------------------------------------------------------

    def refusals(self, *, start: int = 0, give_up: GiveUpFn | None = None) -> RefusalResult:
        """Greedy answers to the harmful prompts, and their verdicts.

        ``start``: the first layer the steering touches (earlier ones are replayed in the
        prefill when kept). ``give_up(n)``: whether ``n`` answers known not to comply
        already make the trial not worth finishing; asked before generating and whenever
        answers finish, it stops the stage at the first yes (a ``screened`` result)."""
        return self._with_backoff(lambda: self._answers(self.harmful_tokens, self.harmful_prompts, start, give_up))

    def harmless_answers(self) -> RefusalResult:
        """Greedy answers to the harmless prompts, and their verdicts (refused: over-refusal)."""
        return self._with_backoff(lambda: self._answers(self.harmless_tokens, self.harmless_prompts))

    def _answers(
        self, prompts: list[list[int]], requests: tuple[str, ...], start: int = 0, give_up: GiveUpFn | None = None
    ) -> RefusalResult:
        tokenizer, markers = self.loaded.tokenizer, self.markers

        def refused(sequences: list[list[int]]) -> list[bool]:
            return [find_refusal(text, markers) is not None for text in tokenizer.batch_decode(sequences)]

        # Markers alone may stop an answer at its first marker; a judge reads whole answers
        # (a marker can be a false positive, and a refusal can come after a helpful start).
        stop = None if self.judge is not None else (lambda _, sequences: refused(sequences))
        answers = [""] * len(prompts)
        known = [""] * len(prompts)  # verdicts of finished answers, as far as they are sure
        lengths: dict[int, int] = {}

        def finished(rows: list[int], sequences: list[list[int]]) -> None:
            for row, text, sequence in zip(rows, tokenizer.batch_decode(sequences), sequences):
                answers[row], lengths[row] = text, len(sequence)
                # A finished answer's text is final, and so is its verdict by markers; with
                # a judge only "degenerate" is sure before the judge reads it.
                if self.judge is None:
                    known[row] = marker_verdict(text, markers)
                elif is_degenerate(strip_thinking(text)):
                    known[row] = "degenerate"
            if give_up(len(prompts) - known.count("") - known.count("complied")):
                raise _GaveUp

        generated = 0
        step_sizes: list[tuple[int, ...]] = []
        try:
            if give_up is not None and give_up(0):
                raise _GaveUp
            for rows in self._batches(prompts):
                sizes: list[int] = []
                chunks = self._prefill_chunks(prompts, rows)
                try:
                    outputs, _ = greedy_generate(
                        self.loaded,
                        [prompts[r] for r in rows],
                        max_new_tokens=self.settings.max_new_tokens,
                        stop=stop,
                        step_sizes=sizes,
                        finished=None if give_up is None else lambda done, seqs, rows=rows: finished([rows[d] for d in done], seqs),
                        chunks=chunks,
                        records=self._prefill_records(prompts, rows, chunks),
                        start=start,
                        prefix=self.shared_prefix(prompts),
                    )
                finally:
                    step_sizes.append(tuple(sizes))
                for row, text, output in zip(rows, tokenizer.batch_decode(outputs), outputs):
                    answers[row] = text
                    generated += len(output)
        except _GaveUp:
            # The answers that finished, with what is known of them; the others stay "".
            return RefusalResult(tuple(known), tuple(answers), sum(lengths.values()), None, tuple(step_sizes), screened=True)
        judge_start = time.perf_counter()
        verdicts, scores = self.verdicts(requests, answers)
        return RefusalResult(verdicts, tuple(answers), generated, scores, tuple(step_sizes), time.perf_counter() - judge_start)

    def verdicts(self, requests: Sequence[str], answers: Sequence[str]) -> tuple[tuple[str, ...], tuple[float, ...] | None]:
        """Each answer's verdict, and the judge's scores (None when markers judge).

        Degenerate answers (empty, loops, not text) are degenerate whoever judges; with a
        judge, a marker never decides: the judge's P(complied) does.
        """
        return answer_verdicts(requests, answers, self.markers, self.judge, batch_size=self.batch_size)

    def original_answers(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy answers of whatever the model currently is, batch by batch."""
        answers: list[list[int]] = [[] for _ in prompts]
        for rows in self._batches(prompts):
            outputs, _ = greedy_generate(self.loaded, [prompts[r] for r in rows], max_new_tokens=max_new_tokens)
            for row, output in zip(rows, outputs):
                answers[row] = output
        return answers

    @property
    def kl_inputs(self) -> list[list[int]]:
        """The token rows of the KL pass (prompts, plus the teacher-forced answer when kl_tokens > 1)."""
        return self._kl_inputs

    def kl_batches(self) -> list[tuple[mx.array, list[int]]]:
        """The KL pass's padded batches and their left padding, as a trial runs them."""
        pad_id = self.loaded.tokenizer.pad_token_id or 0
        return [pad_left([self._kl_inputs[r] for r in rows], pad_id) for rows in self._batches(self._kl_inputs, cap_padding=True)]

    def generation_batches(self) -> list[list[tuple[mx.array, list[int]]]]:
        """The refusal stage's batches, each as its padded prefill chunks and their left
        padding, as a trial runs them."""
        pad_id = self.loaded.tokenizer.pad_token_id or 0
        return [
            [pad_left([self.harmful_tokens[rows[i]] for i in chunk], pad_id) for chunk in self._prefill_chunks(self.harmful_tokens, rows)]
            for rows in self._batches(self.harmful_tokens)
        ]

    def _batches(self, sequences: Sequence[Sequence[int]], *, cap_padding: bool = False) -> list[list[int]]:
        """Row indices in batches of similar length (sorted), at most ``batch_size`` rows each.

        With ``cap_padding`` (the KL forward pass), also at most ``batch_size`` x (mean
        length) padded tokens a batch: a forward pass costs what its padded tokens cost, and
        prompt lengths vary a lot (64 harmless eval prompts in one batch are more than half
        padding), so long prompts go in smaller batches. Generation keeps full batches: each
        decode step reads every weight once whatever the rows, so fewer, fuller batches are
        faster there. On a CPU, where a pass costs its positions and little else, the KL
        pass's batches are those with the fewest padded positions (see ``least_padding``)."""
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
        if cap_padding and mx.default_device() == mx.cpu:
            return [[order[i] for i in batch] for batch in least_padding([len(sequences[r]) for r in order], self.batch_size)]
        budget = self.batch_size * sum(map(len, sequences)) / max(1, len(sequences)) if cap_padding else float("inf")
        batches: list[list[int]] = []
        for row in order:
            last = batches[-1] if batches else []
            if not last or len(last) == self.batch_size or (len(last) + 1) * len(sequences[row]) > budget:
                batches.append([row])
            else:
                last.append(row)
        return batches


# What one more forward pass costs on a CPU besides its positions (dispatching its kernels),
# in positions: measured on the organism, where the KL pass then runs 31% less CPU time.
PASS_OVERHEAD = 64


def least_padding(lengths: Sequence[int], max_rows: int, overhead: float = PASS_OVERHEAD) -> list[list[int]]:
    """Sorted ``lengths`` cut into batches of at most ``max_rows`` consecutive ones, so that
    their padded positions plus ``overhead`` per batch are fewest (exact: dynamic programming)."""
    n = len(lengths)
    cost, cut = [0.0] + [float("inf")] * n, [0] * (n + 1)
    for end in range(1, n + 1):
        for begin in range(max(0, end - max_rows), end):
            # A batch is as long as its longest (last) sequence.
            c = cost[begin] + (end - begin) * lengths[end - 1] + overhead
            if c < cost[end]:
                cost[end], cut[end] = c, begin
    batches, end = [], n
    while end > 0:
        batches.append(list(range(cut[end], end)))
        end = cut[end]
    return batches[::-1]


def is_out_of_memory(error: BaseException) -> bool:
    """Whether an mlx error means an allocation failed (Metal, CUDA or CPU)."""
    text = str(error).lower()
    return isinstance(error, MemoryError) or any(
        needle in text for needle in ("out of memory", "insufficient memory", "malloc", "bad_alloc", "failed to allocate")
    )


def auto_batch_size(loaded: LoadedModel, prompts: Sequence[Sequence[int]]) -> int:
    """A batch size whose activations and KV cache fit in a quarter of free memory."""
    longest = max((len(p) for p in prompts), default=1) + 64
    config = loaded.config.get("text_config", loaded.config)
    layers = loaded.n_layers
    heads = config.get("num_key_value_heads") or config.get("num_attention_heads") or 1
    head_dim = config.get("head_dim") or loaded.hidden_size // (config.get("num_attention_heads") or 1)
    intermediate = config.get("intermediate_size") or 4 * loaded.hidden_size
    per_row = longest * 4 * (2 * layers * heads * head_dim + 4 * intermediate + 4 * loaded.hidden_size)
    budget = available_memory() // 4
    return int(max(1, min(MAX_AUTO_BATCH, budget // max(per_row, 1))))


def replay_budget() -> int:
    """Bytes a worker may keep of the leading layers' outputs: a quarter of free memory."""
    return available_memory() // 4


def replay_depth(loaded: LoadedModel, harmful: Sequence[Sequence[int]], harmless: Sequence[Sequence[int]], settings: EvalSettings) -> int:
    """How many leading layers' outputs (and prefill KV caches) fit in ``settings.replay_bytes``."""
    if settings.replay_bytes <= 0 or loaded.n_layers < 2:
        return 0
    per_layer = replay_layer_bytes(loaded, harmful, harmless, settings.kl_tokens)
    return int(min(loaded.n_layers - 1, settings.replay_bytes // max(per_layer, 1)))


def replay_layer_bytes(loaded: LoadedModel, harmful: Sequence[Sequence[int]], harmless: Sequence[Sequence[int]], kl_tokens: int) -> int:
    """At most what keeping one more leading layer for replay takes, in bytes."""
    config = loaded.config.get("text_config", loaded.config)
    heads = config.get("num_key_value_heads") or config.get("num_attention_heads") or 1
    head_dim = config.get("head_dim") or loaded.hidden_size // (config.get("num_attention_heads") or 1)
    kl_positions = sum(len(p) + kl_tokens - 1 for p in harmless)
    prefill_positions = sum(len(p) for p in harmful)
    itemsize = 4 if loaded.dtype == "float32" else 2
    # Padding to the longest prompt of a batch: at most half again as many positions.
    return int(1.5 * itemsize * ((kl_positions + prefill_positions) * loaded.hidden_size + prefill_positions * 2 * heads * head_dim))
