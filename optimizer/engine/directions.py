"""Refusal directions: measured once per model and prompt set, cached in the study database.

Per decoder layer l, r_l = mean(h_l | harmful) − mean(h_l | harmless), normalised, where h_l
is the residual stream after layer l at the last prompt token (chat template applied, with
the generation prompt), captured from the model's own forward pass. Index 0 is the output
of the first decoder layer; the embedding output is not used (no layer reads it after
steering, and its difference-in-means carries only token identity).
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

MEASURE_VERSION = 1  # bump when the measurement itself changes, so caches re-measure


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
    return Directions(
        vectors=vectors.astype(np.float32),
        separation=separation.astype(np.float32),
        mean_gap=norms.astype(np.float32),
        n_harmful=len(harmful),
        n_harmless=len(harmless),
        fingerprint=fingerprint,
        seconds=seconds,
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
        )
