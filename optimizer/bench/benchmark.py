"""Benchmark: what one trial costs, and how close that is to what plain mlx-lm would need.

``run_benchmark`` loads a model (a path or Hugging Face id, the bundled organism, or a
random-weight synthetic model of a real architecture), measures refusal directions, then runs
trials the way a study does — random ablation parameters from the default search space set
on the model, the KL stage, the refusal stage — and after each trial times the *floor*: the
unsteered model called directly through mlx-lm (its own caches, no steering, none of abopt's
Python: no marker checks, no detokenizing) on the same prompt batches, with the same padding,
for the KL forward pass and for the refusal stage's prefill plus exactly as many decode steps
with the same per-step batch sizes as the trial's generation ran. The floor computes what
mlx-lm's own prefill computes: the layers over every prompt token and the LM head only where
logits are read. ``floor_ratio`` is the median over trials of trial time ÷ floor time.

Optionally (``memory_trials``) it then runs many consecutive trials with varying random
profiles and records the process's memory (peak and current RSS, mlx's peak and active
memory) as it goes, to show that a long study does not grow.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

ORGANISM = "organism"


# -- results -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spread:
    """Median, min and max of a measured quantity over trials."""

    median: float
    min: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> "Spread":
        return cls(float(statistics.median(values)), float(min(values)), float(max(values)))


@dataclass(frozen=True)
class ModelSummary:
    source: str
    model_type: str
    n_layers: int
    hidden_size: int
    vocab_size: int
    parameters: int
    dtype: str
    quantization: str  # "" when not quantized, else e.g. "4-bit, group 64, affine"
    weight_bytes: int
    n_targets: int


@dataclass(frozen=True)
class TokenCounts:
    """Tokens one trial pushes through the model (``padded`` counts include left padding)."""

    kl_prompt: int
    kl_prompt_padded: int
    refusal_prefill: int
    refusal_prefill_padded: int
    decode_rows: Spread  # rows fed through decode steps (one token each), per trial
    generated: Spread  # tokens kept in the answers (EOS excluded), per trial
    decode_steps: Spread  # forward passes after the prefill, summed over batches, per trial

    @property
    def total(self) -> float:
        """Prompt tokens of both stages plus the median number of generated tokens."""
        return self.kl_prompt + self.refusal_prefill + self.generated.median

    @property
    def computed(self) -> float:
        """Token positions the model runs: padded prompts plus the median decode rows."""
        return self.kl_prompt_padded + self.refusal_prefill_padded + self.decode_rows.median


@dataclass(frozen=True)
class MemoryPoint:
    trial: int
    max_rss: int  # bytes, getrusage peak resident set
    rss: int  # bytes, current resident set (/proc/self/statm)
    mlx_peak: int
    mlx_active: int
    mlx_cache: int


@dataclass(frozen=True)
class BenchResult:
    blas: str
    mlx_version: str
    mlx_lm_version: str
    device: str
    python: str
    model: ModelSummary
    n_eval: tuple[int, int]  # harmful, harmless
    n_measure: tuple[int, int]
    trials: int
    max_new_tokens: int
    kl_tokens: int
    batch_size: int  # as resolved by the evaluator
    load_seconds: float
    measure_seconds: float
    setup_seconds: float  # evaluator: tokenizing, reference distributions
    set_seconds: Spread
    kl_seconds: Spread
    refusal_seconds: Spread  # generation (and markers), without the judge
    judge_seconds: Spread  # the judge's forward passes (0 with markers)
    trial_seconds: Spread
    floor_kl_seconds: Spread
    floor_refusal_seconds: Spread
    floor_seconds: Spread
    kl_ratio: float
    refusal_ratio: float
    floor_ratio: float
    cpu_ratio: float  # the same ratio in process CPU seconds: steadier when others load the machine
    refusal_rates: Spread
    baseline_refusal_rate: float
    tokens: TokenCounts
    peak_rss: int
    mlx_peak_memory: int
    memory: tuple[MemoryPoint, ...]
    load_average: tuple[tuple[float, float, float], tuple[float, float, float]]  # start, end
    judge: str = "markers"
    savings: Savings | None = None


@dataclass(frozen=True)
class WorkerScoring:
    """One trial scored as a study worker scores it: from its first steered layer, screened."""

    start: int  # leading layers replayed
    kl: float
    kl_seconds: float
    result: Any  # the RefusalResult
    refusal_seconds: float
    exact: bool = True
    kl_difference: float = 0.0
    whole: "WorkerScoring | None" = None  # the same without the shared prefix
    uncompiled: "WorkerScoring | None" = None  # the same with the steering op by op
    compiled: "WorkerScoring | None" = None  # and with it compiled
    plain_exp: "WorkerScoring | None" = None  # the same on mlx's own exp


def _positions_after(batches: Sequence[tuple[Any, list[int]]], prefix: int) -> int:
    """Positions a pass over whole-prompt ``batches`` computes when their first ``prefix``
    tokens run once: each batch its rows' own tokens, padded; the prefix once."""
    return sum(int(t.shape[0]) * (int(t.shape[1]) - prefix) for t, _ in batches) + prefix


def worker_scoring(evaluator: Any, start: int, front: Sequence[Any]) -> WorkerScoring:
    """The current steering scored as a study worker scores it, against ``front``."""
    from optimizer.study.screen import Screen

    t0 = time.perf_counter()
    kl = evaluator.kl_divergence(start=start)
    t1 = time.perf_counter()
    result = evaluator.refusals(start=start, give_up=Screen(front, kl, len(evaluator.harmful_tokens)))
    return WorkerScoring(start, kl, t1 - t0, result, time.perf_counter() - t1)


@dataclass(frozen=True)
class Savings:
    """Each timed trial scored again with layer replay and screening, against its full scoring."""

    replay_depth: int  # leading layers kept
    replay_bytes: int
    replayed: Spread  # leading layers replayed per trial
    kl_seconds: Spread  # the KL stage, replayed
    refusal_seconds: Spread  # the refusal stage, replayed and screened
    trial_seconds: Spread
    screened: int  # trials whose refusal stage stopped early
    screened_by_kl: int  # of which before generating anything
    kl_ratio: float  # full ÷ with savings, median over trials
    refusal_ratio: float
    trial_ratio: float
    exact: bool  # KL within 1e-6 of the full KL, and unscreened verdicts equal
    kl_difference: float  # the largest |KL with savings − full KL|
    # Each saving on its own: the worker's scoring without it ÷ with it (medians over trials).
    prefix_tokens: tuple[int, int]  # leading tokens computed once per pass (KL, refusal prompts)
    prefix_positions: tuple[int, int]  # positions a KL pass and a refusal prefill compute with the prefix shared
    prefix_kl_ratio: float
    prefix_refusal_ratio: float
    compile_kl_ratio: float  # op by op ÷ compiled
    compile_refusal_ratio: float
    compiled: bool  # whether the worker's steering is compiled (on a GPU)
    exp_kl_ratio: float  # mlx's exp ÷ abopt's fast exp
    exp_refusal_ratio: float
    exp_kl_difference: float  # the largest |KL on the fast exp − KL on mlx's|
    exp_verdicts_equal: bool  # unscreened verdicts the same on either exp
    fast_exp: bool  # whether the worker runs the fast exp (on a CPU)


# -- environment ---------------------------------------------------------------------------


def blas_in_use() -> str:
    """Which BLAS this process's MLX runs with, from LD_PRELOAD and the libraries mapped.

    The Linux mlx[cpu] wheel calls the reference BLAS it bundles unless a system OpenBLAS
    is preloaded, which interposes its symbols (numpy's own OpenBLAS uses renamed symbols
    and is never picked up by mlx).
    """
    if sys.platform == "darwin":
        return "Accelerate (macOS)"
    mapped: set[str] = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/maps").read_text().splitlines():
            parts = line.split()
            name = parts[-1] if len(parts) >= 6 else ""
            if "libopenblas" in name.lower():
                mapped.add(name)
    preloaded = "openblas" in os.environ.get("LD_PRELOAD", "")
    if mapped and preloaded:
        return f"OpenBLAS {sorted(mapped)[0]} (preloaded via LD_PRELOAD)"
    return (
        "mlx's bundled reference BLAS: OpenBLAS is not preloaded, float32 matmuls are ~30x slower "
        "(fix: apt-get install libopenblas0-pthread; scripts/bench.py then preloads it)"
    )


def _rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def max_rss() -> int:
    """This process's peak resident memory in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def memory_point(trial: int) -> MemoryPoint:
    import mlx.core as mx

    rss = _rss() if Path("/proc/self/statm").exists() else max_rss()
    return MemoryPoint(trial, max_rss(), rss, mx.get_peak_memory(), mx.get_active_memory(), mx.get_cache_memory())


# -- model ---------------------------------------------------------------------------------


def _tokenizer_dir(workdir: Path) -> Path:
    """The organism's tokenizer when it is there (realistic token counts), else a tiny BPE."""
    from optimizer.bench.synthetic import write_tiny_tokenizer
    from optimizer.engine.model import ORGANISM_PATH

    if (ORGANISM_PATH / "tokenizer.json").exists():
        return ORGANISM_PATH
    return write_tiny_tokenizer(workdir / "tokenizer")


def synthetic_dir(spec: str, quantize: int, workdir: Path, *, seed: int = 0, shards: int = 1) -> Path:
    """A random-weight model directory for ``spec`` ("llama:100M"), quantized to ``quantize``
    bits if > 0, in ``shards`` weight files."""
    from optimizer.bench.synthetic import (
        build_model,
        config_for_spec,
        quantize_model,
        save_model_dir,
        tokenizer_vocab_size,
    )
    from optimizer.errors import UserError

    tokenizer = _tokenizer_dir(workdir)
    try:
        config = config_for_spec(spec, vocab_size=max(32768, tokenizer_vocab_size(tokenizer)))
    except ValueError as error:
        raise UserError(str(error)) from None
    model = build_model(config, seed=seed)
    if quantize:
        config = quantize_model(model, config, bits=quantize)
    out = save_model_dir(model, config, workdir / "model", tokenizer_dir=tokenizer, shards=shards)
    del model
    gc.collect()
    return out


def _quantized_copy(source: str, bits: int, workdir: Path) -> Path:
    """``source`` quantized to ``bits`` and written to ``workdir`` (then loaded as usual)."""
    import mlx_lm

    from optimizer.bench.synthetic import quantize_model, save_model_dir
    from optimizer.engine.model import read_config, resolve_model_path, rope_overrides

    path = resolve_model_path(source)
    config = read_config(path)
    model, _ = mlx_lm.load(str(path), model_config=rope_overrides(config))
    if "quantization" in config:
        from optimizer.errors import UserError

        raise UserError(f"model {source!r} is already quantized; drop --quantize")
    config = {**config, **rope_overrides(config)}
    config = quantize_model(model, config, bits=bits)
    return save_model_dir(model, config, workdir / "model", tokenizer_dir=path)


def summarize(loaded: Any, source: str) -> ModelSummary:
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.utils import get_total_parameters

    model = loaded.model
    quantized = [m for _, m in model.named_modules() if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))]
    quantization = ""
    if quantized:
        first = quantized[0]
        quantization = f"{first.bits}-bit, group {first.group_size}, {getattr(first, 'mode', 'affine')}"
    config = loaded.config.get("text_config", loaded.config)
    return ModelSummary(
        source=source,
        model_type=loaded.model_type,
        n_layers=loaded.n_layers,
        hidden_size=loaded.hidden_size,
        vocab_size=int(config.get("vocab_size", 0)),
        parameters=int(get_total_parameters(model)),
        dtype=loaded.dtype,
        quantization=quantization,
        weight_bytes=sum(v.nbytes for _, v in tree_flatten(model.parameters())),
        n_targets=len(loaded.targets),
    )


# -- random trials -------------------------------------------------------------------------


class _RandomTrial:
    """The two Optuna ``suggest_*`` calls :func:`optimizer.params.suggest` makes, drawn
    uniformly by numpy: random profiles from the real search space, without an Optuna study
    whose growing trial list would blur the memory measurement."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng

    def suggest_float(self, name: str, low: float, high: float) -> float:
        return float(self.rng.uniform(low, high))

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any:
        return choices[int(self.rng.integers(len(choices)))]


def _random_params(space: Any, n_layers: int, rng: np.random.Generator, post_norm: bool = False) -> Any:
    from optimizer.study.sampling import suggest

    return suggest(_RandomTrial(rng), space, n_layers, post_norm=post_norm)  # type: ignore[arg-type]


# -- the floor: plain mlx-lm -----------------------------------------------------------------


def _prefill(model: Any, tokens: Any, cache: list[Any], keep: int) -> Any:
    """mlx-lm's prefill: the layers over all tokens, logits (LM head) for the last ``keep``.

    The first call's logits are never evaluated, so MLX never computes them.
    """
    if tokens.shape[1] > keep:
        model(tokens[:, :-keep], cache=cache)
    return model(tokens[:, -keep:], cache=cache)


def floor_kl(model: Any, batches: Sequence[tuple[Any, list[int]]], keep: int) -> float:
    """Seconds for plain mlx-lm's forward pass over the KL batches (logits of ``keep`` positions)."""
    import mlx.core as mx

    from optimizer.engine.model import (
        batch_cache,  # builds mlx-lm's own BatchKVCache objects, nothing of ours
    )

    start = time.perf_counter()
    outputs = [_prefill(model, tokens, batch_cache(model, padding), keep) for tokens, padding in batches]
    mx.eval(outputs)
    return time.perf_counter() - start


def floor_generate(model: Any, batches: Sequence[Sequence[tuple[Any, list[int]]]], step_sizes: Sequence[Sequence[int]]) -> float:
    """Seconds for plain mlx-lm's greedy generation with the given per-step batch sizes.

    Per batch: the prefill of each of its chunks, their caches joined (as mlx-lm's batch
    generator joins them), then one decode step per further size, dropping rows (and
    filtering the cache, as mlx-lm's batch generator does) whenever the size shrinks.
    Steps are queued with ``mx.async_eval`` as mlx-lm's generate loop does; nothing is
    read back but the last step.
    """
    import mlx.core as mx

    from optimizer.engine.model import batch_cache

    start = time.perf_counter()
    for chunks, sizes in zip(batches, step_sizes):
        cache, logits = None, []
        for tokens, padding in chunks:
            chunk_cache = batch_cache(model, padding)
            logits.append(_prefill(model, tokens, chunk_cache, 1))
            if cache is None:
                cache = chunk_cache
            else:
                for mine, theirs in zip(cache, chunk_cache):
                    mine.extend(theirs)
        logits = mx.concatenate(logits)
        current = sizes[0] if sizes else logits.shape[0]
        y = mx.argmax(logits[:, -1, :], axis=-1)
        mx.async_eval(y)
        for size in sizes[1:]:
            if size < current:
                keep = mx.arange(size)
                for layer_cache in cache:
                    layer_cache.filter(keep)
                y = y[:size]
                current = size
            y = mx.argmax(model(y[:, None], cache=cache)[:, -1, :], axis=-1)
            mx.async_eval(y)
        mx.eval(y)
    return time.perf_counter() - start


# -- the benchmark -------------------------------------------------------------------------


def run_benchmark(
    model: str = ORGANISM,
    *,
    synthetic: str | None = None,
    n_eval: int = 64,
    n_measure: int = 128,
    trials: int = 10,
    max_new_tokens: int = 32,
    kl_tokens: int = 1,
    batch_size: int = 0,
    quantize: int = 0,
    memory_trials: int = 0,
    seed: int = 0,
    judge: str = "markers",
    system_prompt: str = "",
    log: Callable[[str], None] = lambda _: None,
) -> BenchResult:
    """Load, measure, run ``trials`` timed trials each followed by its floor; see the module doc."""
    import mlx.core as mx
    import mlx_lm

    from optimizer.engine import fastexp
    from optimizer.engine.directions import measure
    from optimizer.engine.evaluate import EvalSettings, Evaluator, replay_budget
    from optimizer.engine.replay import first_steered_layer
    from optimizer.engine.judge import load_judge
    from optimizer.engine.markers import load_markers
    from optimizer.engine.model import load_model
    from optimizer.engine.prompts import load_prompts
    from optimizer.engine.steering import install
    from optimizer.errors import UserError
    from optimizer.study.config import load_search_space
    from optimizer.study.screen import Point, pareto
    from optimizer.study.steered import SteeredModel

    if trials < 1:
        raise UserError(f"--trials must be at least 1, got {trials}")
    load_start = os.getloadavg()
    started = time.perf_counter()
    source = f"synthetic {synthetic}" if synthetic else model
    with tempfile.TemporaryDirectory(prefix="abopt-bench-") as tmp:
        workdir = Path(tmp)
        if synthetic:
            log(f"building synthetic {synthetic}" + (f", {quantize}-bit" if quantize else ""))
            path = str(synthetic_dir(synthetic, quantize, workdir, seed=seed))
        elif quantize:
            log(f"quantizing {model} to {quantize} bits")
            path = str(_quantized_copy(model, quantize, workdir))
        else:
            path = model
        log(f"loading {path}")
        load_t = time.perf_counter()
        loaded = load_model(path, fast_exp=False)
        load_seconds = time.perf_counter() - load_t
    if synthetic:
        load_seconds = time.perf_counter() - started  # building counts as loading
    summary = summarize(loaded, source + (f" (quantized in memory to {quantize} bits)" if quantize and not synthetic else ""))

    harmful_eval = load_prompts("bundled:harmful:eval", limit=n_eval)
    harmless_eval = load_prompts("bundled:harmless:eval", limit=n_eval)
    harmful_measure = load_prompts("bundled:harmful:measure", limit=n_measure)
    harmless_measure = load_prompts("bundled:harmless:measure", limit=n_measure)

    log(f"measuring directions on {len(harmful_measure)} + {len(harmless_measure)} prompts")
    directions = measure(loaded, harmful_measure, harmless_measure, batch_size=batch_size or 32)

    log("preparing the evaluator (reference distributions)")
    setup_t = time.perf_counter()
    steered = SteeredModel(loaded, install(loaded.targets), directions, measured=True)
    compiled = steered.steering.compiled  # how a worker steers on this device
    fast = mx.default_device() == mx.cpu  # and which exp it runs
    scoring_judge = None if judge == "markers" else load_judge(judge)
    # Prompts whole (the full scoring, and the floor's forward work), and with the chat
    # template's shared prefix computed once per pass, as a study worker scores them.
    evaluator, shared = (
        Evaluator(
            loaded, harmful_eval, harmless_eval, load_markers(),
            EvalSettings(max_new_tokens, kl_tokens, batch_size, system_prompt, replay_bytes=replay_budget(), share_prefix=share),
            judge=scoring_judge,
        )
        for share in (False, True)
    )
    baseline = evaluator.refusals()
    setup_seconds = time.perf_counter() - setup_t

    kl_batches, gen_batches = evaluator.kl_batches(), evaluator.generation_batches()
    space = load_search_space("default")
    rng = np.random.default_rng(seed)

    front: list[Point] = []  # of the full scorings so far: what screening compares with
    saved: list[WorkerScoring] = []

    def trial() -> tuple[float, float, float, float, Any]:
        """One study trial's engine work; (set, KL, refusal) wall seconds, CPU seconds, result.

        Scored in full first (prompts whole, steering op by op, mlx's exp, every layer,
        every answer); then as a study worker scores it (all savings, steering compiled on
        a GPU only, the fast exp on a CPU), and again without the shared prefix, with the
        steering compiled the other way and on the other exp, to time each on its own."""
        params = _random_params(space, loaded.n_layers, rng, loaded.post_norm)
        steered.steering.compile(False)
        cpu = time.process_time()
        t0 = time.perf_counter()
        weights = steered.steer(params)
        t1 = time.perf_counter()
        kl = evaluator.kl_divergence()
        t2 = time.perf_counter()
        result = evaluator.refusals()
        t3 = time.perf_counter()
        cpu = time.process_time() - cpu
        first = min(first_steered_layer(weights, loaded.n_layers), evaluator.kl_replay.depth, shared.kl_replay.depth)
        points = pareto(front)
        # The exact savings are checked on the full scoring's exp; the fast exp on its own.
        plain = worker_scoring(shared, first, points)
        with fastexp.using(fast):
            steered.steering.compile(not compiled)
            other = worker_scoring(shared, first, points)
            steered.steering.compile(compiled)
            whole = worker_scoring(evaluator, first, points)
            worker = worker_scoring(shared, first, points)
        exact = abs(plain.kl - kl) <= 1e-6 and (plain.result.screened or plain.result.verdicts == result.verdicts)
        by_op, fused = (other, worker) if compiled else (worker, other)
        saved.append(
            dataclasses.replace(
                worker, exact=exact, kl_difference=abs(plain.kl - kl), whole=whole, uncompiled=by_op, compiled=fused, plain_exp=plain
            )
        )
        front.append(Point(len(saved), kl, result.rate))
        steered.steering.clear()
        return t1 - t0, t2 - t1, t3 - t2, cpu, result

    log("warming up")
    *_, warm = trial()
    floor_kl(loaded.model, kl_batches, kl_tokens)
    floor_generate(loaded.model, gen_batches, warm.step_sizes)
    saved.clear()  # the warm-up's front stays: a study's first trials meet an empty one too

    sets, kls, refusal_times, judge_times, floors_kl, floors_gen, results = [], [], [], [], [], [], []
    cpu_ratios = []
    for index in range(trials):
        set_s, kl_s, refusal_s, trial_cpu, result = trial()
        floor_cpu = time.process_time()
        fk = floor_kl(loaded.model, kl_batches, kl_tokens)
        fg = floor_generate(loaded.model, gen_batches, result.step_sizes)
        cpu_ratios.append(trial_cpu / (time.process_time() - floor_cpu))
        sets.append(set_s)
        kls.append(kl_s)
        refusal_times.append(refusal_s - result.judge_seconds)
        judge_times.append(result.judge_seconds)
        floors_kl.append(fk)
        floors_gen.append(fg)
        results.append(result)
        log(
            f"trial {index + 1}/{trials}: KL {kl_s:.3f} s (floor {fk:.3f}), refusals {refusal_s:.3f} s "
            f"(floor {fg:.3f}), refused {result.refused}/{result.total}"
        )
    # The floor has no judge: the ratios compare the same forward work, the judge is its own line.
    trial_times = [s + k + r + j for s, k, r, j in zip(sets, kls, refusal_times, judge_times)]
    engine_times = [s + k + r for s, k, r in zip(sets, kls, refusal_times)]
    floor_times = [k + g for k, g in zip(floors_kl, floors_gen)]

    memory = [memory_point(0)]
    if memory_trials:
        log(f"running {memory_trials} trials for memory")
        marks = {10, memory_trials} | set(range(50, memory_trials + 1, 50))
        for index in range(1, memory_trials + 1):
            trial()
            if index in marks:
                memory.append(memory_point(index))
                point = memory[-1]
                log(
                    f"memory after trial {index}: RSS {_mib(point.rss)}, mlx active {_mib(point.mlx_active)}, "
                    f"mlx cache {_mib(point.mlx_cache)}"
                )

    timed = saved[:trials]
    fast_trials = [s + t.kl_seconds + t.refusal_seconds for s, t in zip(sets, timed)]
    savings = Savings(
        replay_depth=shared.kl_replay.depth,
        replay_bytes=shared.kl_replay.nbytes + shared.prefill_replay.nbytes,
        replayed=Spread.of([t.start for t in timed]),
        kl_seconds=Spread.of([t.kl_seconds for t in timed]),
        refusal_seconds=Spread.of([t.refusal_seconds for t in timed]),
        trial_seconds=Spread.of(fast_trials),
        screened=sum(t.result.screened for t in timed),
        screened_by_kl=sum(t.result.screened and t.result.judged == 0 for t in timed),
        kl_ratio=statistics.median(k / t.kl_seconds for k, t in zip(kls, timed)),
        refusal_ratio=statistics.median((r + j) / t.refusal_seconds for r, j, t in zip(refusal_times, judge_times, timed)),
        trial_ratio=statistics.median(full / fast for full, fast in zip(trial_times, fast_trials)),
        exact=all(t.exact for t in timed),
        kl_difference=max(t.kl_difference for t in timed),
        prefix_tokens=(shared.shared_prefix(shared.kl_inputs, kl_tokens), shared.shared_prefix(shared.harmful_tokens)),
        prefix_positions=(
            _positions_after(kl_batches, shared.shared_prefix(shared.kl_inputs, kl_tokens)),
            _positions_after([t for chunks in gen_batches for t in chunks], shared.shared_prefix(shared.harmful_tokens)),
        ),
        prefix_kl_ratio=statistics.median(t.whole.kl_seconds / t.kl_seconds for t in timed),
        prefix_refusal_ratio=statistics.median(t.whole.refusal_seconds / t.refusal_seconds for t in timed),
        compile_kl_ratio=statistics.median(t.uncompiled.kl_seconds / t.compiled.kl_seconds for t in timed),
        compile_refusal_ratio=statistics.median(t.uncompiled.refusal_seconds / t.compiled.refusal_seconds for t in timed),
        compiled=steered.steering.compiled,
        exp_kl_ratio=statistics.median(t.plain_exp.kl_seconds / t.kl_seconds for t in timed),
        exp_refusal_ratio=statistics.median(t.plain_exp.refusal_seconds / t.refusal_seconds for t in timed),
        exp_kl_difference=max(abs(t.plain_exp.kl - t.kl) for t in timed),
        exp_verdicts_equal=all(
            t.result.verdicts == t.plain_exp.result.verdicts for t in timed if not (t.result.screened or t.plain_exp.result.screened)
        ),
        fast_exp=fast,
    )

    def sizes_sum(result: Any, skip_prefill: bool) -> int:
        return sum(sum(s[1:] if skip_prefill else s) for s in result.step_sizes)

    tokens = TokenCounts(
        kl_prompt=sum(len(t) for t in evaluator.kl_inputs),
        kl_prompt_padded=sum(int(t.size) for t, _ in kl_batches),
        refusal_prefill=sum(len(t) for t in evaluator.harmful_tokens),
        refusal_prefill_padded=sum(int(t.size) for chunks in gen_batches for t, _ in chunks),
        decode_rows=Spread.of([sizes_sum(r, True) for r in results]),
        generated=Spread.of([r.generated_tokens for r in results]),
        decode_steps=Spread.of([sum(len(s) - 1 for s in r.step_sizes) for r in results]),
    )
    return BenchResult(
        blas=blas_in_use(),
        mlx_version=mx.__version__,
        mlx_lm_version=getattr(mlx_lm, "__version__", "?"),
        device=str(mx.default_device()),
        python=platform.python_version(),
        model=summary,
        n_eval=(len(harmful_eval), len(harmless_eval)),
        n_measure=(len(harmful_measure), len(harmless_measure)),
        trials=trials,
        max_new_tokens=max_new_tokens,
        kl_tokens=kl_tokens,
        batch_size=evaluator.batch_size,
        load_seconds=load_seconds,
        measure_seconds=directions.seconds,
        setup_seconds=setup_seconds,
        set_seconds=Spread.of(sets),
        kl_seconds=Spread.of(kls),
        refusal_seconds=Spread.of(refusal_times),
        judge_seconds=Spread.of(judge_times),
        trial_seconds=Spread.of(trial_times),
        floor_kl_seconds=Spread.of(floors_kl),
        floor_refusal_seconds=Spread.of(floors_gen),
        floor_seconds=Spread.of(floor_times),
        kl_ratio=statistics.median(k / f for k, f in zip(kls, floors_kl)),
        refusal_ratio=statistics.median(r / f for r, f in zip(refusal_times, floors_gen)),
        floor_ratio=statistics.median(t / f for t, f in zip(engine_times, floor_times)),
        cpu_ratio=statistics.median(cpu_ratios),
        refusal_rates=Spread.of([r.rate for r in results]),
        baseline_refusal_rate=baseline.rate,
        tokens=tokens,
        peak_rss=max_rss(),
        mlx_peak_memory=mx.get_peak_memory(),
        memory=tuple(memory),
        judge=judge,
        load_average=(load_start, os.getloadavg()),
        savings=savings,
    )


# -- report --------------------------------------------------------------------------------


def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def _s(spread: Spread) -> str:
    return f"{spread.median * 1000:8.1f} ms  (min {spread.min * 1000:.1f}, max {spread.max * 1000:.1f})"


def format_report(result: BenchResult) -> str:
    """The benchmark as plain text; the last line is ``floor_ratio=<x>``."""
    m, t = result.model, result.tokens
    quant = m.quantization or "no"
    load = " → ".join(" ".join(f"{x:.2f}" for x in la) for la in result.load_average)
    lines = [
        "abopt benchmark",
        f"  BLAS             {result.blas}",
        f"  mlx              {result.mlx_version} (mlx-lm {result.mlx_lm_version}, Python {result.python}), device {result.device}",
        f"  load average     {load}",
        f"model              {m.source}",
        f"  type             {m.model_type}, {m.n_layers} layers, hidden {m.hidden_size}, vocab {m.vocab_size}",
        f"  parameters       {m.parameters / 1e6:,.1f} M, {_mib(m.weight_bytes)} in memory, dtype {m.dtype}, quantized: {quant}",
        f"  steered          {m.n_targets} projections",
        f"  load             {result.load_seconds:.2f} s",
        f"directions         {result.measure_seconds:.2f} s for {result.n_measure[0]} harmful + {result.n_measure[1]} harmless prompts",
        f"evaluator set-up   {result.setup_seconds:.2f} s (tokenizing, reference distributions, baseline: "
        f"refusal rate {result.baseline_refusal_rate:.2f})",
        f"trials             {result.trials} timed (after one warm-up), random profiles from the default search space",
        f"  prompts          {result.n_eval[0]} harmful + {result.n_eval[1]} harmless, batch size {result.batch_size}, "
        f"max_new_tokens {result.max_new_tokens}, kl_tokens {result.kl_tokens}",
        f"  refusal rate     median {result.refusal_rates.median:.2f} (min {result.refusal_rates.min:.2f}, max {result.refusal_rates.max:.2f})",
        "per trial                     abopt                                        plain mlx-lm floor",
        f"  set steering   {_s(result.set_seconds)}",
        f"  KL stage       {_s(result.kl_seconds)}   {_s(result.floor_kl_seconds)}   ×{result.kl_ratio:.2f}",
        f"  refusal stage  {_s(result.refusal_seconds)}   {_s(result.floor_refusal_seconds)}   ×{result.refusal_ratio:.2f}",
        f"  judge ({result.judge}){' ' * max(0, 8 - len(result.judge))}{_s(result.judge_seconds)}   "
        f"{result.judge_seconds.median / result.trial_seconds.median:.0%} of a trial",
        f"  trial          {_s(result.trial_seconds)}   {_s(result.floor_seconds)}   ×{result.floor_ratio:.2f}",
        f"  (in process CPU time, steadier on a busy machine: ×{result.cpu_ratio:.2f})",
        "tokens per trial",
        f"  KL forward       {t.kl_prompt} prompt tokens ({t.kl_prompt_padded} with padding)",
        f"  refusal prefill  {t.refusal_prefill} prompt tokens ({t.refusal_prefill_padded} with padding)",
        f"  generated        {t.generated.median:.0f} tokens (min {t.generated.min:.0f}, max {t.generated.max:.0f}) "
        f"in {t.decode_steps.median:.0f} decode steps of {t.decode_rows.median:.0f} rows in all",
        f"  total            {t.total:,.0f} tokens (prompts + generated), {t.computed:,.0f} positions computed "
        f"with padding; {t.total / result.trial_seconds.median:,.0f} tokens/s",
    ]
    v = result.savings
    if v is not None:
        lines += [
            "savings: each trial scored again as a study worker scores it (replay, screening against the full",
            "scorings before it, shared prefix, the fast exp on a CPU), against its full scoring above",
            f"  layer replay     {v.replay_depth} of {m.n_layers} leading layers kept ({_mib(v.replay_bytes)}); "
            f"replayed per trial: median {v.replayed.median:.1f} (min {v.replayed.min:.0f}, max {v.replayed.max:.0f})",
            f"  KL stage       {_s(v.kl_seconds)}   ×{v.kl_ratio:.2f} less time than in full",
            f"  refusal stage  {_s(v.refusal_seconds)}   ×{v.refusal_ratio:.2f} less; screened {v.screened} of "
            f"{result.trials} trials ({v.screened_by_kl} on their KL alone)",
            f"  trial          {_s(v.trial_seconds)}   ×{v.trial_ratio:.2f} less than the full trial",
            f"  exact            {'yes' if v.exact else 'NO'}: on mlx's exp, KL within 1e-6 of the full KL (largest difference "
            f"{v.kl_difference:.1e}), unscreened verdicts equal",
            "  each saving on its own: the worker's stage times without it ÷ with it",
            f"  shared prefix    {v.prefix_tokens[0]} + {v.prefix_tokens[1]} leading tokens (KL + refusal prompts) run once "
            f"per pass: {t.kl_prompt_padded} → {v.prefix_positions[0]} KL positions, {t.refusal_prefill_padded} → "
            f"{v.prefix_positions[1]} prefill positions; KL stage ×{v.prefix_kl_ratio:.2f}, refusal stage ×{v.prefix_refusal_ratio:.2f}",
            f"  compiled steer   op by op ÷ compiled: KL stage ×{v.compile_kl_ratio:.2f}, refusal stage "
            f"×{v.compile_refusal_ratio:.2f} (the worker's: {'compiled' if v.compiled else 'op by op'})",
            f"  fast exp         mlx's ÷ abopt's: KL stage ×{v.exp_kl_ratio:.2f}, refusal stage ×{v.exp_refusal_ratio:.2f}; "
            f"KL differs by at most {v.exp_kl_difference:.1e}, verdicts {'equal' if v.exp_verdicts_equal else 'DIFFER'} "
            f"(the worker's: {'fast' if v.fast_exp else 'mlx'})",
        ]
    lines += [
        "memory",
        f"  peak RSS         {_mib(result.peak_rss)}; mlx peak {_mib(result.mlx_peak_memory)}",
    ]
    if len(result.memory) > 1:
        lines.append("  after trial        peak RSS      RSS   mlx peak  mlx active  mlx cache")
        for p in result.memory[1:]:
            lines.append(
                f"  {p.trial:11d}  {_mib(p.max_rss):>10} {_mib(p.rss):>8} {_mib(p.mlx_peak):>10} "
                f"{_mib(p.mlx_active):>11} {_mib(p.mlx_cache):>10}"
            )
        first = next((p for p in result.memory[1:] if p.trial >= 10), result.memory[1])
        last = result.memory[-1]
        lines.append(
            f"  growth {first.trial}→{last.trial}: RSS {(last.rss - first.rss) / 2**20:+.1f} MiB, "
            f"peak RSS {(last.max_rss - first.max_rss) / 2**20:+.1f} MiB, "
            f"mlx active {(last.mlx_active - first.mlx_active) / 2**20:+.1f} MiB, "
            f"mlx peak {(last.mlx_peak - first.mlx_peak) / 2**20:+.1f} MiB"
        )
    lines.append(f"floor_ratio={result.floor_ratio:.2f}")
    return "\n".join(lines)
