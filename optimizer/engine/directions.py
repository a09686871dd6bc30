"""Refusal directions: measured once per model and prompt set, cached in the study database.

Per decoder layer l, r_l = mean(h_l | harmful) − mean(h_l | harmless), normalised, where h_l
is the residual stream after layer l at the last prompt token (chat template applied, with
the generation prompt), captured from the model's own forward pass. Index 0 is the output
of the first decoder layer; the embedding output is not used (no layer reads it after
steering, and its difference-in-means carries only token identity).

The same pass keeps the harmless mean at every layer: the "orthogonal" direction is r_l
with its component along that mean removed, as projected abliteration does. A refusal
subspace of k directions at layer l is r_l and the directions measured at the k − 1 nearest
layers, orthonormalized in that order (measured on the organism against contrastive
principal components, see the README's "Better edits").
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import dataclass
from typing import Sequence

import mlx.core as mx
import numpy as np

from optimizer.engine.model import (
    LoadedModel,
    capture_last_token,
    chat_tokens,
    forward,
    pad_left,
)
from optimizer.engine.profile import DIRECTION_KINDS, MAX_DIRECTIONS

MEASURE_VERSION = 2  # bump when the measurement itself changes, so caches re-measure
# 2: also the harmless means



@dataclass(frozen=True)
class Directions:
    """Per-layer refusal directions and how well each layer separates the two prompt sets."""

    vectors: np.ndarray  # (L, D) float32, unit rows
    separation: np.ndarray  # (L,) Cohen's d of the projections onto r_l
    mean_gap: np.ndarray  # (L,) ‖mean_harmful − mean_harmless‖
    n_harmful: int
    n_harmless: int
    fingerprint: str
    seconds: float
    harmless_mean: np.ndarray | None = None  # (L, D) float32

    @property
    def n_layers(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def best_layer(self) -> int:
        """The layer whose direction separates harmful from harmless prompts best."""
        return int(np.argmax(self.separation))

    def interpolated(self, index: float) -> np.ndarray:
        """Unit direction at a fractional layer index: a blend of the two neighbours."""
        index = float(np.clip(index, 0, self.n_layers - 1))
        low = int(np.floor(index))
        high = min(low + 1, self.n_layers - 1)
        t = index - low
        blended = (1 - t) * self.vectors[low] + t * self.vectors[high]
        return (blended / np.linalg.norm(blended)).astype(np.float32)

    def basis(self, kind: str, n: int) -> np.ndarray:
        """(L, n, D) orthonormal rows per layer: the direction of ``kind`` first, then those of
        the n − 1 nearest layers (all made orthogonal to the layer's harmless mean for
        ``kind = "orthogonal"``)."""
        if kind not in DIRECTION_KINDS:
            raise ValueError(f"unknown direction kind {kind!r}; expected one of {', '.join(DIRECTION_KINDS)}")
        if not 1 <= n <= MAX_DIRECTIONS:
            raise ValueError(f"n must be within 1..{MAX_DIRECTIONS}, got {n}")
        if n > self.n_layers:
            raise ValueError(f"{n} directions need as many layers; the model has {self.n_layers}")
        if kind == "orthogonal" and self.harmless_mean is None:
            raise ValueError("these directions were measured without the harmless means; measure again")
        order = [[layer, *neighbour_layers(layer, self.n_layers, n - 1)] for layer in range(self.n_layers)]
        rows = self.vectors[np.array(order)].astype(np.float64)  # (L, n, D)
        if kind == "orthogonal":
            mean = self.harmless_mean.astype(np.float64)
            mean = mean / np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12)
            rows = rows - np.einsum("lkd,ld->lk", rows, mean)[..., None] * mean[:, None, :]
        return orthonormal_rows(rows)

    def interpolated_basis(self, kind: str, n: int, index: float) -> np.ndarray:
        """(n, D) orthonormal rows at a fractional layer index: each row a blend of the two
        neighbouring layers' rows, then orthonormalized in order, so the first row is the
        blended refusal direction."""
        rows = self.basis(kind, n)
        index = float(np.clip(index, 0, self.n_layers - 1))
        low = int(np.floor(index))
        high = min(low + 1, self.n_layers - 1)
        t = index - low
        return orthonormal_rows((1 - t) * rows[low].astype(np.float64) + t * rows[high].astype(np.float64))


def neighbour_layers(layer: int, n_layers: int, k: int) -> list[int]:
    """The k layers nearest to ``layer`` (after, before, two after, ...), within the model."""
    found = []
    for step in range(1, n_layers):
        for candidate in (layer + step, layer - step):
            if 0 <= candidate < n_layers and len(found) < k:
                found.append(candidate)
    return found


def orthonormal_rows(rows: np.ndarray) -> np.ndarray:
    """Gram–Schmidt over the last-but-one axis (in order, in float64): float32 unit rows, each
    orthogonal to the rows before it; the first row keeps its direction."""
    rows = np.array(rows, dtype=np.float64)
    for i in range(rows.shape[-2]):
        for j in range(i):
            rows[..., i, :] -= np.sum(rows[..., i, :] * rows[..., j, :], axis=-1, keepdims=True) * rows[..., j, :]
        rows[..., i, :] /= np.maximum(np.linalg.norm(rows[..., i, :], axis=-1, keepdims=True), 1e-12)
    return rows.astype(np.float32)


def fingerprint(
    loaded: LoadedModel, harmful: Sequence[str], harmless: Sequence[str], system_prompt: str = "", thinking: bool = False
) -> str:
    """Identity of a measurement: model, tokenizer and template, prompt texts, settings."""
    identity = {
        "version": MEASURE_VERSION,
        "model": loaded.identity,
        "tokenizer": loaded.tokenizer_identity,
        "dtype": loaded.dtype,
        "harmful": list(harmful),
        "harmless": list(harmless),
        "system_prompt": system_prompt,
    }
    if thinking:  # only when on, so the measurements cached before the setting keep their keys
        identity["thinking"] = True
    payload = json.dumps(identity, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def last_token_residuals(
    loaded: LoadedModel, prompts: Sequence[str], *, system_prompt: str = "", batch_size: int = 32, thinking: bool = False
) -> np.ndarray:
    """Residual after every decoder layer at each prompt's last token: (N, L, D) float32."""
    encoded = [chat_tokens(loaded.tokenizer, p, system_prompt, thinking) for p in prompts]
    # Similar lengths share a batch, so little compute goes to padding.
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    out = np.empty((len(prompts), loaded.n_layers, loaded.hidden_size), dtype=np.float32)
    pad_id = loaded.tokenizer.pad_token_id or 0
    with capture_last_token(loaded.model) as sink:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            tokens, padding = pad_left([encoded[i] for i in rows], pad_id)
            sink.clear()
            forward(loaded.model, tokens, padding)
            stacked = mx.stack(sink, axis=1)  # (B, L, D); the logits are never evaluated
            mx.eval(stacked)
            out[rows] = np.array(stacked)
    return out


def directions_from_residuals(harmful: np.ndarray, harmless: np.ndarray, fingerprint: str = "", seconds: float = 0.0) -> Directions:
    """Difference-in-means directions and separation scores from (N, L, D) residuals."""
    gap = harmful.mean(axis=0, dtype=np.float64) - harmless.mean(axis=0, dtype=np.float64)
    norms = np.linalg.norm(gap, axis=1)
    vectors = gap / np.maximum(norms, 1e-12)[:, None]
    projected_harmful = np.einsum("nld,ld->nl", harmful, vectors)
    projected_harmless = np.einsum("nld,ld->nl", harmless, vectors)
    pooled = np.sqrt((projected_harmful.var(axis=0) + projected_harmless.var(axis=0)) / 2)
    separation = (projected_harmful.mean(axis=0) - projected_harmless.mean(axis=0)) / np.maximum(pooled, 1e-12)
    vectors = vectors.astype(np.float32)
    return Directions(
        vectors=vectors,
        separation=separation.astype(np.float32),
        mean_gap=norms.astype(np.float32),
        n_harmful=len(harmful),
        n_harmless=len(harmless),
        fingerprint=fingerprint,
        seconds=seconds,
        harmless_mean=harmless.mean(axis=0, dtype=np.float64).astype(np.float32),
    )


def measure(
    loaded: LoadedModel,
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    system_prompt: str = "",
    batch_size: int = 32,
    thinking: bool = False,
) -> Directions:
    """Run the model on both prompt sets and compute the per-layer directions."""
    start = time.perf_counter()
    residuals = [
        last_token_residuals(loaded, prompts, system_prompt=system_prompt, batch_size=batch_size, thinking=thinking)
        for prompts in (harmful, harmless)
    ]
    return directions_from_residuals(
        *residuals,
        fingerprint(loaded, harmful, harmless, system_prompt, thinking),
        time.perf_counter() - start,
    )


def to_bytes(directions: Directions) -> bytes:
    """Serialise as an .npz archive (plain arrays, nothing executable)."""
    buffer = io.BytesIO()
    np.savez(
        buffer,
        vectors=directions.vectors,
        separation=directions.separation,
        mean_gap=directions.mean_gap,
        counts=np.array([directions.n_harmful, directions.n_harmless]),
        seconds=np.array(directions.seconds),
        **({"harmless_mean": directions.harmless_mean} if directions.harmless_mean is not None else {}),
    )
    return buffer.getvalue()


def from_bytes(payload: bytes, key: str) -> Directions:
    """Inverse of :func:`to_bytes`."""
    with np.load(io.BytesIO(payload), allow_pickle=False) as archive:
        return Directions(
            vectors=archive["vectors"],
            separation=archive["separation"],
            mean_gap=archive["mean_gap"],
            n_harmful=int(archive["counts"][0]),
            n_harmless=int(archive["counts"][1]),
            fingerprint=key,
            seconds=float(archive["seconds"]),
            harmless_mean=archive["harmless_mean"] if "harmless_mean" in archive else None,
        )
