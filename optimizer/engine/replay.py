"""Replaying the decoder layers a trial leaves untouched, instead of computing them again.

A profile is zero before its first steered layer, so the layers before it compute the same
activations in every trial. An evaluator keeps, per prompt batch, what each of those layers
returned on the untouched model (the residual stream at the layer boundary) and, for the
refusal prefill, the keys and values it wrote to its KV cache; a trial's forward pass then
starts at its first steered layer: the leading layers hand back their stored outputs and
fill their caches with the stored keys and values, so the decode steps after the prefill
(which run every layer) attend to exactly what a full prefill would have left.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from optimizer.engine.patch import patch, set_private, unpatch


@dataclass(frozen=True)
class LayerRecord:
    """One batch's pass through the leading layers of the untouched model."""

    outputs: tuple[Any, ...]  # what layer k returned, k < depth
    kv: tuple[tuple[mx.array, mx.array], ...] = ()  # what layer k wrote to its cache (prefill only)

    @property
    def depth(self) -> int:
        return len(self.outputs)

    @property
    def nbytes(self) -> int:
        arrays = [a for out in self.outputs for a in (out if isinstance(out, tuple) else (out,)) if isinstance(a, mx.array)]
        return sum(a.nbytes for a in arrays) + sum(k.nbytes + v.nbytes for k, v in self.kv)


@dataclass
class Replay:
    """Per-batch records of the leading ``depth`` layers, keyed by the batch's rows."""

    depth: int
    records: dict[tuple[int, ...], LayerRecord] = field(default_factory=dict)

    def get(self, rows: Sequence[int]) -> LayerRecord | None:
        return self.records.get(tuple(rows))

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.records.values())


def first_steered_layer(weights: Mapping[str, Sequence[float] | np.ndarray], n_layers: int) -> int:
    """The first layer any component steers with a nonzero weight (``n_layers``: none)."""
    steered = [int(np.flatnonzero(np.asarray(w))[0]) for w in weights.values() if np.any(np.asarray(w))]
    return min(steered, default=n_layers)


def _record_hook(layer: nn.Module, base_call: Any, *args: Any, **kwargs: Any) -> Any:
    out = base_call(layer, *args, **kwargs)
    layer._abopt_outputs.append(out)
    return out


def _replay_hook(layer: nn.Module, base_call: Any, *args: Any, **kwargs: Any) -> Any:
    output, cache, kv = layer._abopt_replay
    if cache is not None and kv is not None:
        # What the layer's attention would have written; advances the cache's offset too.
        cache.update_and_fetch(*kv)
    return output


@contextmanager
def recording(layers: Sequence[nn.Module], depth: int, cache: Sequence[Any] | None = None) -> Iterator[list[LayerRecord]]:
    """Within the block, one forward pass records the first ``depth`` layers' outputs (and,
    with ``cache``, the keys and values each writes); the record is the yielded list's item."""
    sink: list[LayerRecord] = []
    outputs: list[list[Any]] = [[] for _ in range(depth)]
    writes: list[list[tuple[mx.array, mx.array]]] = [[] for _ in range(depth)]
    originals = []
    for k in range(depth):
        set_private(layers[k], _abopt_outputs=outputs[k])
        patch(layers[k], _record_hook)
        if cache is not None:
            originals.append(cache[k].update_and_fetch)

            def update_and_fetch(keys: mx.array, values: mx.array, _k: int = k, _base: Any = originals[-1]) -> Any:
                writes[_k].append((keys, values))
                return _base(keys, values)

            cache[k].update_and_fetch = update_and_fetch
    try:
        yield sink
    finally:
        for k in range(depth):
            unpatch(layers[k])
            set_private(layers[k], _abopt_outputs=None)
        if cache is not None:
            for k in range(depth):
                del cache[k].update_and_fetch  # back to the class's method
    if all(len(o) == 1 for o in outputs) and (cache is None or all(len(w) == 1 for w in writes)):
        sink.append(LayerRecord(tuple(o[0] for o in outputs), tuple(w[0] for w in writes) if cache is not None else ()))


@contextmanager
def replaying(layers: Sequence[nn.Module], record: LayerRecord | None, start: int, cache: Sequence[Any] | None = None) -> Iterator[None]:
    """Within the block, one forward pass takes layers ``0 … start − 1`` from ``record``
    (their outputs, and with ``cache`` their keys and values) instead of computing them."""
    start = min(start, record.depth if record is not None else 0)
    if cache is not None and record is not None and len(record.kv) < start:
        start = 0  # recorded without the cache: a prefill cannot start later
    for k in range(start):
        kv = record.kv[k] if cache is not None else None
        set_private(layers[k], _abopt_replay=(record.outputs[k], cache[k] if cache is not None else None, kv))
        patch(layers[k], _replay_hook)
    try:
        yield
    finally:
        for k in range(start):
            unpatch(layers[k])
            set_private(layers[k], _abopt_replay=None)
