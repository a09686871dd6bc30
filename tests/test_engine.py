"""The engine on real mlx-lm models: steering, capture, measurement, cache, KL, refusals.

Tiny random-weight models of every synthetic architecture (dense, affine 4-bit, and mxfp4
on one MoE architecture) are saved to disk and loaded through ``load_model``, so the real
loading path runs. The bundled model organism is used where behaviour matters (greedy
generation against mlx-lm's own, refusal removal); those tests skip while it is missing.
"""

from __future__ import annotations

import re
import time
from collections import Counter

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear
from mlx_lm.sample_utils import make_sampler

from optimizer.engine.bake import ablate_bias, ablate_matrix, bake_into, dequantized_weight
from optimizer.study.storage import OnceStore
from optimizer.engine.directions import directions_from_residuals, last_token_residuals, measure, orthonormal_rows
from optimizer.study.steered import cache_key, cached_directions
from optimizer.engine.evaluate import EvalSettings, Evaluator, greedy_generate
from optimizer.engine.markers import find_refusal, load_markers
from optimizer.engine.model import capture_last_token, chat_tokens, final_norm, forward, load_model, pad_left
from optimizer.engine.patch import patch, set_private, unpatch
from optimizer.engine.prompts import load_prompts
from optimizer.engine.steering import install
from optimizer.bench.synthetic import SYNTHETIC_ARCHS

ARCHS = sorted(SYNTHETIC_ARCHS)
# (architecture, conftest.QUANTS name)
MODEL_CASES = [(a, "dense") for a in ARCHS] + [(a, "q4") for a in ARCHS] + [("qwen3_moe", "mxfp4")]
QUANTIZED_CASES = [case for case in MODEL_CASES if case[1] != "dense"]

# Prompts of very different lengths, so left padding really differs between rows; all
# are longer than gemma3's 8-token sliding window once chat-templated.
PROMPTS = [
    "Hi",
    "How do I bake bread?",
    "Write a poem about the sea.",
    "The quick brown fox jumps over the lazy dog, then mix flour, water, salt and yeast and knead.",
    "Is there something else I can do for you?",
    "You are a helpful assistant. Write a poem about the quick brown fox and bread.",
]


# -- helpers ----------------------------------------------------------------------------


def load(path):
    return load_model(str(path))


def batch(loaded, prompts=PROMPTS):
    return pad_left([chat_tokens(loaded.tokenizer, p) for p in prompts], loaded.tokenizer.pad_token_id or 0)


def logits_of(loaded, prompts=PROMPTS) -> mx.array:
    tokens, padding = batch(loaded, prompts)
    logits = forward(loaded.model, tokens, padding)
    mx.eval(logits)
    return logits


def _routers(model: nn.Module) -> list[nn.Module]:
    """A mixture-of-experts model's routers (each block's ``mlp.gate``)."""
    return [m for name, m in model.named_modules() if name.endswith("mlp.gate")]


def _record_hook(gate: nn.Module, base_call, *args, **kwargs):
    out = base_call(gate, *args, **kwargs)
    gate._abopt_routes.append(out)
    return out


def _replay_hook(gate: nn.Module, base_call, *args, **kwargs):
    return gate._abopt_routes.pop(0)


def _logits_hooked(loaded, modules: list[nn.Module], hook) -> mx.array:
    for module in modules:
        patch(module, hook)
    try:
        return logits_of(loaded)
    finally:
        for module in modules:
            unpatch(module)


def logits_routed_alike(steered, baked) -> tuple[mx.array, mx.array]:
    """Both models' logits, the baked one routing every token to the experts the steered one
    chose: rounding (1e-7) can flip a near-tie in a router's top-k, a discontinuity that says
    nothing about whether the edited matrices are the same. Dense models: plain logits."""
    sources, targets = _routers(steered.model), _routers(baked.model)
    assert len(sources) == len(targets)
    for gate in sources:
        set_private(gate, _abopt_routes=[])
    runtime = _logits_hooked(steered, sources, _record_hook)
    for source, gate in zip(sources, targets):
        set_private(gate, _abopt_routes=source._abopt_routes)
    offline = _logits_hooked(baked, targets, _replay_hook)
    return runtime, offline


def max_abs(a: mx.array, b: mx.array) -> float:
    return mx.abs(a - b).max().item()


def relative(a: mx.array, b: mx.array) -> float:
    """max|a − b| / max|b|."""
    return max_abs(a, b) / mx.abs(b).max().item()


def unit_rows(n: int, d: int, seed: int = 0) -> np.ndarray:
    rows = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def subspaces(n: int, k: int, d: int, seed: int = 0) -> np.ndarray:
    """(n, k, d): k orthonormal random rows per layer."""
    return orthonormal_rows(np.random.default_rng(seed).normal(size=(n, k, d)))


# The new edits, as Steering.set / bake_into options and directions of k rows per layer (k = 1: (L, D)).
EDITS = {
    "norm-preserving": ({"norm_preserving": True}, 1),
    "subspace": ({}, 3),
    "post-norm": ({"post_norm": True}, 1),
    "all": ({"norm_preserving": True, "post_norm": True}, 3),
}


def edit_directions(loaded, k: int, seed: int = 5) -> np.ndarray:
    rows = subspaces(loaded.n_layers, k, loaded.hidden_size, seed)
    return rows[:, 0] if k == 1 else rows


def profile(n_layers: int, seed: int = 0) -> dict[str, list[float]]:
    """Different, non-trivial weights for every layer and component."""
    rng = np.random.default_rng(seed)
    return {c: [float(w) for w in rng.uniform(0.4, 1.5, n_layers)] for c in ("attn", "mlp")}


def reachable_arrays(model: nn.Module) -> dict[int, mx.array]:
    """Every mx.array a module of ``model`` holds: parameters, and private attributes."""
    found: dict[int, mx.array] = {}

    def visit(value):
        if isinstance(value, mx.array):
            found[id(value)] = value
        elif isinstance(value, nn.Module):
            return  # visited by named_modules
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item)
        elif isinstance(value, dict):
            for item in value.values():
                visit(item)

    for _, module in model.named_modules():
        visit(list(vars(module).values()))
        visit(list(module.values()))
    return found


class CallCounter:
    """Counts calls of one module instance (via the engine's own patch mechanism)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        set_private(module, _test_calls=0)
        patch(module, _counting_hook)

    @property
    def calls(self) -> int:
        return self.module._test_calls

    def remove(self) -> None:
        unpatch(self.module)


def _counting_hook(module, base_call, *args, **kwargs):
    set_private(module, _test_calls=module._test_calls + 1)
    return base_call(module, *args, **kwargs)


def expected_steps(outputs, eos_ended):
    """Decode steps a batch needs: each row's tokens, plus one for a row's EOS."""
    return max(len(out) + (1 if ended else 0) for out, ended in zip(outputs, eos_ended))


# -- bake (pure functions) ---------------------------------------------------------------


def test_ablate_matrix_and_bias_match_the_runtime_edit():
    rng = np.random.default_rng(0)
    r = unit_rows(1, 16)[0]
    w2 = mx.array(rng.normal(size=(16, 24)).astype(np.float32))
    w3 = mx.array(rng.normal(size=(3, 16, 24)).astype(np.float32))
    bias = mx.array(rng.normal(size=(16,)).astype(np.float32))
    x = mx.array(rng.normal(size=(5, 24)).astype(np.float32))
    rm = mx.array(r)
    for scale in (0.0, 0.7, 1.0, 1.4):
        y = x @ w2.T + bias
        steered = y - scale * (y @ rm)[:, None] * rm
        baked = x @ ablate_matrix(w2, r, scale).T + ablate_bias(bias, r, scale)
        assert max_abs(baked, steered) < 1e-5
        stacked = ablate_matrix(w3, r, scale)
        for e in range(3):
            assert max_abs(stacked[e], ablate_matrix(w3[e], r, scale)) < 1e-6
    # scale 1 removes the direction from every output; the dtype is kept.
    assert mx.abs(rm @ ablate_matrix(w2, r, 1.0)).max().item() < 1e-5
    half = w2.astype(mx.bfloat16)
    assert ablate_matrix(half, r, 1.0).dtype == mx.bfloat16


@pytest.mark.parametrize("arch, quant", QUANTIZED_CASES)
def test_dequantized_weight_matches_quantized_matmul(arch, quant, saved_model):
    loaded = load(saved_model(arch, quant))
    for target in loaded.targets:
        module = target.module
        dense = dequantized_weight(module)
        assert dense.dtype == mx.float32 and dense.shape[-2] == loaded.hidden_size
        bias = module["bias"] if "bias" in module else 0.0
        x = mx.array(np.random.default_rng(1).normal(size=(5, 1, dense.shape[-1])).astype(np.float32))
        if dense.ndim == 2:
            assert relative(x @ dense.T + bias, module(x)) < 1e-5
        else:  # expert stacks: expert e's dense matrix does what the module does for e
            for e in range(dense.shape[0]):
                expected = module(x, mx.full((5,), e, dtype=mx.uint32))
                assert relative(x @ dense[e].T + (bias[e] if "bias" in module else 0.0), expected) < 1e-5


# -- steering: exactness -------------------------------------------------------------------


@pytest.mark.parametrize("arch, quant", MODEL_CASES)
def test_zero_weights_leave_logits_identical(arch, quant, saved_model):
    loaded = load(saved_model(arch, quant))
    reference = logits_of(loaded)
    steering = install(loaded.targets)
    assert max_abs(logits_of(loaded), reference) <= 1e-6
    zeros = {c: [0.0] * loaded.n_layers for c in ("attn", "mlp")}
    steering.set(zeros, unit_rows(loaded.n_layers, loaded.hidden_size))
    assert max_abs(logits_of(loaded), reference) <= 1e-6
    steering.set(profile(loaded.n_layers), unit_rows(loaded.n_layers, loaded.hidden_size))
    assert max_abs(logits_of(loaded), reference) > 1e-2  # it does steer...
    steering.clear()
    assert max_abs(logits_of(loaded), reference) <= 1e-6  # ...and clears
    steering.remove()
    assert max_abs(logits_of(loaded), reference) <= 1e-6


@pytest.mark.parametrize("scope", ["global", "per_layer"])
@pytest.mark.parametrize("arch, quant", MODEL_CASES)
def test_runtime_steering_equals_baked_weights(arch, quant, scope, saved_model):
    path = saved_model(arch, quant)
    steered, baked = load(path), load(path)
    reference = logits_of(steered)
    directions = unit_rows(steered.n_layers, steered.hidden_size, seed=5)
    if scope == "global":
        directions = directions[0]
    weights = profile(steered.n_layers, seed=7)

    install(steered.targets).set(weights, directions)
    new_targets = bake_into(baked, baked.targets, weights, directions)
    # The baked model is dense where it was edited: dequantized, then ablated.
    assert all(type(t.module) in (nn.Linear, SwitchLinear) for t in new_targets)
    runtime, offline = logits_routed_alike(steered, baked)

    assert relative(runtime, reference) > 1e-2, "the edit must change the logits for this test to mean anything"
    assert relative(runtime, offline) <= 1e-4


@pytest.mark.parametrize("quant", ["dense", "q4"])
def test_steering_equals_baked_weights_with_biases(quant, saved_model):
    """Runtime steering also removes the bias's component; baking edits the bias the same way."""
    path = saved_model("llama", quant, attention_bias=True, mlp_bias=True)
    steered, baked = load(path), load(path)
    assert all("bias" in t.module for t in steered.targets)
    directions, weights = unit_rows(steered.n_layers, steered.hidden_size, seed=2), profile(steered.n_layers, seed=3)
    install(steered.targets).set(weights, directions)
    bake_into(baked, baked.targets, weights, directions)
    assert relative(logits_of(steered), logits_of(baked)) <= 1e-4


@pytest.mark.parametrize("edit", EDITS)
@pytest.mark.parametrize("arch, quant", MODEL_CASES)
def test_every_edit_at_runtime_equals_baked_weights(arch, quant, edit, saved_model):
    """Norm-preserving, subspace and post-norm edits: steering ≡ the baked weights; weights 0 ≡ untouched."""
    options, k = EDITS[edit]
    path = saved_model(arch, quant)
    steered, baked = load(path), load(path)
    reference = logits_of(steered)
    directions, weights = edit_directions(steered, k), profile(steered.n_layers, seed=7)
    steering = install(steered.targets)
    steering.set({c: [0.0] * steered.n_layers for c in weights}, directions, **options)
    assert max_abs(logits_of(steered), reference) <= 1e-6
    steering.set(weights, directions, **options)
    bake_into(baked, baked.targets, weights, directions, **options)
    runtime, offline = logits_routed_alike(steered, baked)
    assert relative(runtime, reference) > 1e-2, "the edit must change the logits for this test to mean anything"
    assert relative(runtime, offline) <= 1e-4


def test_norm_preserving_bake_keeps_every_column_norm():
    rng = np.random.default_rng(0)
    basis = subspaces(1, 2, 16)[0]
    for weight in (mx.array(rng.normal(size=(16, 24)).astype(np.float32)), mx.array(rng.normal(size=(3, 16, 24)).astype(np.float32))):
        for scale in (0.5, 1.0, 1.3):
            edited = ablate_matrix(weight, basis, scale, norm_preserving=True)
            norms, before = mx.linalg.norm(edited, axis=-2), mx.linalg.norm(weight, axis=-2)
            assert max_abs(norms, before) / mx.abs(before).max().item() < 1e-5
            # ...and removes the subspace as the plain edit does (weight 1: nothing left along it).
            plain = ablate_matrix(weight, basis, scale)
            assert max_abs(mx.array(basis) @ edited, (1 - scale) * (mx.array(basis) @ weight) * (norms / mx.linalg.norm(plain, axis=-2))[..., None, :]) < 1e-4


class BlockOutputs:
    """What each decoder layer adds to the residual stream (its output minus its input)."""

    def __init__(self, model) -> None:
        self.layers = model.layers if hasattr(model, "layers") else model.model.layers
        self.added: list[mx.array] = []
        for layer in self.layers:
            set_private(layer, _test_sink=self.added)
            patch(layer, _block_hook)

    def remove(self) -> None:
        for layer in self.layers:
            unpatch(layer)


def _block_hook(layer, base_call, x, *args, **kwargs):
    out = base_call(layer, x, *args, **kwargs)
    hidden = out[0] if isinstance(out, tuple) else out
    layer._test_sink.append((hidden - x).astype(mx.float32))
    return out


def left_along(loaded, directions: np.ndarray, options: dict) -> float:
    """The largest share of a block's contribution to the residual left along its layer's
    directions, every projection steered with weight 1."""
    steering = install(loaded.targets)
    steering.set({c: [1.0] * loaded.n_layers for c in ("attn", "mlp")}, directions, **options)
    blocks = BlockOutputs(loaded.model)
    try:
        logits_of(loaded)
    finally:
        blocks.remove()
        steering.remove()
    worst = 0.0
    for layer, added in enumerate(blocks.added):
        rows = mx.array(np.atleast_2d(directions[layer]))
        along = mx.linalg.norm(added @ rows.T, axis=-1)
        worst = max(worst, (along / mx.maximum(mx.linalg.norm(added, axis=-1), 1e-30)).max().item())
    return worst


@pytest.mark.parametrize("edit", ["plain", "norm-preserving", "subspace"])
@pytest.mark.parametrize("arch, quant", MODEL_CASES)
def test_weight_one_leaves_nothing_along_the_directions_in_the_residual(arch, quant, edit, saved_model):
    """At weight 1 everywhere, each block adds nothing along its layer's directions: on a
    post-norm model (gemma3) that needs the edit taken through the output norms."""
    loaded = load(saved_model(arch, quant))
    options, k = EDITS.get(edit, ({}, 1))
    directions = edit_directions(loaded, k, seed=11)
    assert left_along(loaded, directions, {**options, "post_norm": True}) <= 1e-5
    if loaded.post_norm and edit == "plain":
        # Removed before the norm, a direction comes back through the norm's weights.
        assert left_along(loaded, directions, options) > 1e-3


# -- quantized models stay quantized ----------------------------------------------------------


@pytest.mark.parametrize("edit", ["plain", "all"])
@pytest.mark.parametrize("arch, quant", QUANTIZED_CASES)
def test_quantized_model_stays_quantized_while_steered(arch, quant, edit, saved_model):
    loaded = load(saved_model(arch, quant))
    model = loaded.model
    quantized = (nn.QuantizedLinear, QuantizedSwitchLinear)
    assert all(isinstance(t.module, quantized) and t.module["weight"].dtype == mx.uint32 for t in loaded.targets)
    parameters = dict(tree_flatten(model.parameters()))
    copies = {name: mx.array(np.array(value)) for name, value in parameters.items()}
    arrays_before = reachable_arrays(model)
    smallest_dense = min(int(np.prod(dequantized_weight(t.module).shape)) * 4 for t in loaded.targets)

    steering = install(loaded.targets)
    evaluator = Evaluator(
        loaded, PROMPTS[:3], PROMPTS[3:], ("zzzz",), EvalSettings(max_new_tokens=4, kl_tokens=2, batch_size=2)
    )

    def peak_of_forward() -> int:
        # One token: activations are tiny next to any weight matrix, so a dense copy would show.
        mx.eval(model.parameters())
        mx.clear_cache()
        start = mx.get_active_memory()
        mx.reset_peak_memory()
        mx.eval(model(mx.array([[5]])))
        return mx.get_peak_memory() - start

    unsteered_peak = peak_of_forward()
    options, k = EDITS.get(edit, ({}, 1))
    steering.set(profile(loaded.n_layers), edit_directions(loaded, k), **options)
    steered_peak = peak_of_forward()
    assert evaluator.kl_divergence() > 0
    evaluator.refusals()

    # Same parameter set, same array objects, same packed values.
    after = dict(tree_flatten(model.parameters()))
    assert after.keys() == parameters.keys()
    for name, value in after.items():
        assert value is parameters[name], name
        assert mx.array_equal(value, copies[name]).item(), name
    assert all(isinstance(t.module, quantized) and t.module["weight"].dtype == mx.uint32 for t in loaded.targets)
    # Steering attached only direction vectors and their weights (and, norm-preserving, one
    # factor per input channel of each matrix, per expert): no array of a weight's size is held anywhere.
    new_arrays = [a for i, a in reachable_arrays(model).items() if i not in arrays_before]
    assert new_arrays, "the steering state (directions) should be visible to this check"
    allowed = {(), (loaded.hidden_size,), (k, loaded.hidden_size)}
    if options.get("norm_preserving"):
        allowed |= {tuple(t.module["scales"].shape[:-2]) + (t.module["scales"].shape[-1] * t.module.group_size,) for t in loaded.targets}
    assert all(tuple(a.shape) in allowed for a in new_arrays), [a.shape for a in new_arrays]
    # A whole steered one-token forward pass allocates less than one dense weight matrix
    # (a dequantized copy of any target would be at least that), and about what an
    # unsteered pass does.
    assert steered_peak < smallest_dense, (steered_peak, smallest_dense)
    assert abs(steered_peak - unsteered_peak) < smallest_dense / 2, (steered_peak, unsteered_peak)


# -- capture -------------------------------------------------------------------------------


@pytest.mark.parametrize("arch, quant", [case for case in MODEL_CASES if case[1] != "mxfp4"])
def test_captured_residual_is_the_models_own(arch, quant, saved_model):
    loaded = load(saved_model(arch, quant))
    model = loaded.model
    tokens, padding = batch(loaded)
    with capture_last_token(model) as sink:
        logits = forward(model, tokens, padding)
    assert len(sink) == loaded.n_layers
    assert all(h.shape == (len(PROMPTS), loaded.hidden_size) and h.dtype == mx.float32 for h in sink)
    norm, _ = final_norm(model)
    head = model.lm_head if "lm_head" in model else model.model.embed_tokens.as_linear
    predicted = head(norm(sink[-1][:, None, :]))[:, 0, :]
    assert relative(predicted, logits[:, -1, :]) <= 1e-4
    assert not any(hasattr(type(layer), "_abopt_base") for layer in model.layers)  # hooks removed


# -- direction measurement -------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_batched_measurement_equals_one_prompt_at_a_time(arch, saved_model):
    loaded = load(saved_model(arch, num_hidden_layers=4))
    harmful, harmless = PROMPTS, [p.upper() + " Please." for p in PROMPTS[::-1]]
    lengths = [len(chat_tokens(loaded.tokenizer, p)) for p in harmful + harmless]
    window = loaded.config.get("sliding_window") or 0
    assert min(lengths) > window and max(lengths) > 2 * min(lengths)
    residuals = {}
    for size in (len(PROMPTS), 1):
        residuals[size] = (
            last_token_residuals(loaded, harmful, batch_size=size),
            last_token_residuals(loaded, harmless, batch_size=size),
        )
    for batched, single in zip(residuals[len(PROMPTS)], residuals[1]):
        assert np.abs(batched - single).max() / np.abs(single).max() <= 1e-4
    batched = directions_from_residuals(*residuals[len(PROMPTS)])
    single = directions_from_residuals(*residuals[1])
    cosines = np.sum(batched.vectors * single.vectors, axis=1)
    assert cosines.min() >= 0.9999, cosines


def test_direction_kinds_and_subspaces_from_residuals():
    """The orthogonal kind is ⟂ the harmless mean; a subspace is the layer's direction and its
    nearest layers' ones, orthonormalized in that order."""
    from optimizer.engine.directions import from_bytes, neighbour_layers, to_bytes

    rng = np.random.default_rng(0)
    n, layers, d = 64, 5, 12
    harmless = rng.normal(size=(n, layers, d)) + 3.0  # a large common mean, as real residuals have
    harmful = rng.normal(size=(n, layers, d)) + 3.0
    harmful[:, :, 0] += 2.0  # the refusal shift...
    harmful[:, :, 1] += np.linspace(0, 2, layers)  # ...turning across the layers
    directions = from_bytes(to_bytes(directions_from_residuals(harmful.astype(np.float32), harmless.astype(np.float32))), "k")
    assert directions.harmless_mean.shape == (layers, d)

    assert np.array_equal(directions.basis("difference", 1)[:, 0], directions.vectors)
    assert neighbour_layers(0, 5, 3) == [1, 2, 3] and neighbour_layers(2, 5, 3) == [3, 1, 4]
    for kind in ("difference", "orthogonal"):
        rows = directions.basis(kind, 4)
        gram = np.einsum("lkd,ljd->lkj", rows, rows)
        assert np.abs(gram - np.eye(4)).max() < 1e-5
    rows = directions.basis("difference", 3)
    for layer in range(layers):
        spanned = directions.vectors[[layer, *neighbour_layers(layer, layers, 2)]]
        # The same span, with the layer's own direction first.
        assert np.abs(spanned - (spanned @ rows[layer].T) @ rows[layer]).max() < 1e-5
        assert np.allclose(rows[layer, 0], directions.vectors[layer], atol=1e-6)
    orthogonal = directions.basis("orthogonal", 2)
    mean = directions.harmless_mean / np.linalg.norm(directions.harmless_mean, axis=1, keepdims=True)
    assert np.abs(np.einsum("lkd,ld->lk", orthogonal, mean)).max() < 1e-5
    # The difference direction leans on the mean here; its orthogonal version differs from it.
    assert np.abs(np.sum(orthogonal[:, 0] * directions.vectors, axis=1)).max() < 0.9999
    # One direction at a fractional layer: the original interpolation, whatever the kind's code path.
    assert np.allclose(directions.interpolated_basis("difference", 1, 0.4)[0], directions.interpolated(0.4), atol=1e-6)
    with pytest.raises(ValueError):
        directions.basis("difference", layers + 1)


def test_direction_cache_measures_once(tmp_path, saved_model):
    loaded = load(saved_model("llama"))
    url = f"sqlite:///{tmp_path / 'study.db'}"
    harmful, harmless = PROMPTS[:3], PROMPTS[3:]
    counter = CallCounter(loaded.model)
    try:
        first, measured = cached_directions(OnceStore(url), loaded, harmful, harmless, batch_size=2)
        assert measured and counter.calls == 4  # two batches per prompt set

        # A second store on the same file, as another worker or a later run would open it.
        store = OnceStore(url)
        second, measured = cached_directions(store, loaded, harmful, harmless, batch_size=2)
        assert not measured and counter.calls == 4
        assert np.array_equal(first.vectors, second.vectors)
        assert np.array_equal(first.separation, second.separation)
        assert second.fingerprint == first.fingerprint and store.computations(cache_key(first.fingerprint)) == 1

        changed, measured = cached_directions(store, loaded, harmful + ["One more prompt."], harmless, batch_size=2)
        assert measured and counter.calls > 4
        assert changed.fingerprint != first.fingerprint
        assert store.computations(cache_key(changed.fingerprint)) == 1 and store.computations(cache_key(first.fingerprint)) == 1
    finally:
        counter.remove()


# -- KL ------------------------------------------------------------------------------------------


def hand_kl(loaded, steering, weights, directions, prompts, k):
    """Mean KL(original ‖ steered) over the first k answer positions, prompt by prompt."""
    model, per_prompt = loaded.model, []
    for prompt in prompts:
        steering.clear()
        tokens = chat_tokens(loaded.tokenizer, prompt)
        for _ in range(k - 1):  # the original's greedy answer, teacher-forced below
            tokens.append(int(mx.argmax(model(mx.array([tokens]))[0, -1]).item()))
        assert not set(tokens[-(k - 1) :] if k > 1 else []) & loaded.tokenizer.eos_token_ids
        p = mx.softmax(model(mx.array([tokens]))[0, -k:], axis=-1)
        steering.set(weights, directions)
        q = mx.softmax(model(mx.array([tokens]))[0, -k:], axis=-1)
        per_prompt.append((p * (mx.log(p) - mx.log(q))).sum(axis=-1).mean().item())
    steering.set(weights, directions)
    return float(np.mean(per_prompt))


@pytest.mark.parametrize("kl_tokens", [1, 3])
def test_kl_divergence(kl_tokens, saved_model):
    loaded = load(saved_model("llama"))
    settings = EvalSettings(max_new_tokens=4, kl_tokens=kl_tokens, batch_size=4)
    evaluator = Evaluator(loaded, PROMPTS[:2], PROMPTS, ("zzzz",), settings)
    assert evaluator.kl_divergence() == 0.0
    steering = install(loaded.targets)
    assert evaluator.kl_divergence() == 0.0
    weights, directions = profile(loaded.n_layers), unit_rows(loaded.n_layers, loaded.hidden_size)
    steering.set(weights, directions)
    kl = evaluator.kl_divergence()
    assert kl > 1e-3
    expected = hand_kl(loaded, steering, weights, directions, PROMPTS, kl_tokens)
    print(f"\nKL kl_tokens={kl_tokens}: engine {kl:.6f}, by hand {expected:.6f}")
    assert abs(kl - expected) <= 1e-4 * expected + 1e-7
    steering.clear()
    assert evaluator.kl_divergence() == 0.0


# -- generation stops ----------------------------------------------------------------------------


def test_generation_stops_at_eos_stop_function_or_length(saved_model):
    loaded = load(saved_model("llama"))
    prompts = [chat_tokens(loaded.tokenizer, p) for p in PROMPTS[:3]]
    loaded.tokenizer.eos_token_ids = {383}  # a token id this model does not emit here
    free, steps = greedy_generate(loaded, prompts, max_new_tokens=10)
    assert [len(f) for f in free] == [10, 10, 10] and steps == 10
    assert not any(383 in f for f in free)

    # EOS: make a token that row 0 first emits after a few others an end-of-sequence token.
    at = next(i for i, token in enumerate(free[0]) if i >= 2 and token not in free[0][:i])
    eos = free[0][at]
    loaded.tokenizer.eos_token_ids = {eos}
    outputs, steps = greedy_generate(loaded, prompts, max_new_tokens=10)
    cut = [f[: f.index(eos)] if eos in f else f for f in free]
    assert outputs == cut and len(outputs[0]) == at  # EOS is not part of the answer
    assert steps == expected_steps(outputs, [eos in f for f in free])
    loaded.tokenizer.eos_token_ids = {383}

    # A stop function: rows stop after 2, 5 and 3 tokens; the batch ends after 5 steps.
    lengths, seen = [2, 5, 3], []

    def stop(rows, sequences):
        seen.append(list(rows))
        return [len(s) >= lengths[r] for r, s in zip(rows, sequences)]

    outputs, steps = greedy_generate(loaded, prompts, max_new_tokens=10, stop=stop)
    assert outputs == [f[:n] for f, n in zip(free, lengths)]
    assert steps == 5
    assert seen[0] == [0, 1, 2] and seen[-1] == [1]  # stopped rows leave the batch


def mlx_lm_greedy(loaded, ids: list[int], max_tokens: int) -> list[int]:
    """mlx-lm's own greedy generation (one prompt, its own KV cache), without the EOS token."""
    responses = mlx_lm.stream_generate(
        loaded.model, loaded.tokenizer, mx.array(ids), max_tokens=max_tokens, sampler=make_sampler(temp=0.0)
    )
    return [r.token for r in responses if r.finish_reason != "stop"]  # "stop" carries the EOS


@pytest.mark.parametrize("arch, quant", [("llama", "dense"), ("gemma3_text", "dense"), ("qwen3_moe", "q4")])
def test_batched_greedy_equals_mlx_lm_on_synthetic_models(arch, quant, saved_model):
    """Left-padded batch generation, incl. gemma3's rotating sliding-window cache past its window."""
    loaded = load(saved_model(arch, quant))
    encoded = [chat_tokens(loaded.tokenizer, p) for p in PROMPTS]
    ours, _ = greedy_generate(loaded, encoded, max_new_tokens=24)
    assert [mlx_lm_greedy(loaded, ids, 24) for ids in encoded] == ours


def test_refusal_stops_at_a_marker(saved_model):
    loaded = load(saved_model("llama"))
    loaded.tokenizer.eos_token_ids = {383}
    decode, max_new = loaded.tokenizer.decode, 16
    # A marker list that matches this model's own answer: a word it emits, and the
    # number of tokens after which the answer first contains it.
    found = None
    for prompt in PROMPTS:
        (free,), _ = greedy_generate(loaded, [chat_tokens(loaded.tokenizer, prompt)], max_new_tokens=max_new)
        for token in free:
            word = decode([token]).strip()
            if word.isalpha() and len(word) >= 3:
                stop_at = next((j for j in range(1, max_new + 1) if find_refusal(decode(free[:j]), (word,))), None)
                if stop_at is not None and stop_at < max_new:
                    found = prompt, word, free, stop_at
                    break
        if found:
            break
    assert found, "no word in this model's answers to use as a marker"
    prompt, marker, free, stop_at = found
    settings = EvalSettings(max_new_tokens=max_new, batch_size=4)
    result = Evaluator(loaded, [prompt], PROMPTS[:1], (marker,), settings).refusals()
    # Stopped at the marker: not complied (refused, or degenerate: this model's words are random).
    assert result.verdicts[0] != "complied" and result.generated_tokens == stop_at
    assert result.answers == (decode(free[:stop_at]),)
    result = Evaluator(loaded, [prompt], PROMPTS[:1], ("zzzz",), settings).refusals()
    assert result.verdicts[0] != "refused" and result.generated_tokens == max_new
    assert result.answers == (decode(free),)


# -- the model organism -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def organism():
    return load_model("organism")


def eval_prompts():
    return load_prompts("bundled:harmful:eval") + load_prompts("bundled:harmless:eval")


@pytest.mark.slow
def test_organism_batched_greedy_equals_mlx_lm(organism):
    tokenizer, prompts = organism.tokenizer, eval_prompts()
    encoded = [chat_tokens(tokenizer, p) for p in prompts]
    ours: list[list[int]] = []
    for start in range(0, len(encoded), 64):  # file order: rows of different lengths share a batch
        outputs, _ = greedy_generate(organism, encoded[start : start + 64], max_new_tokens=32)
        ours.extend(outputs)
    mismatches = []
    for i, ids in enumerate(encoded):
        theirs = mlx_lm_greedy(organism, ids, 32)
        if theirs != ours[i]:
            mismatches.append((prompts[i], tokenizer.decode(theirs), tokenizer.decode(ours[i])))
    print(f"\norganism greedy: {len(prompts) - len(mismatches)}/{len(prompts)} prompts token-identical to mlx-lm")
    assert not mismatches, mismatches[:3]


def test_organism_refusals_stop_at_marker_eos_or_length(organism):
    markers = load_markers()
    tokenizer = organism.tokenizer
    prompts = load_prompts("bundled:harmful:eval")[:12] + load_prompts("bundled:harmless:eval")[:12]
    encoded = [chat_tokens(tokenizer, p) for p in prompts]
    max_new = 48
    full, _ = greedy_generate(organism, encoded, max_new_tokens=max_new)

    def refused(_, sequences):
        return [find_refusal(text, markers) is not None for text in tokenizer.batch_decode(sequences)]

    stopped, steps = greedy_generate(organism, encoded, max_new_tokens=max_new, stop=refused)
    kinds = {"marker": 0, "eos": 0, "length": 0}
    eos_ended = []
    for whole, out in zip(full, stopped):
        assert whole[: len(out)] == out
        if find_refusal(tokenizer.decode(out), markers):
            kinds["marker"] += 1  # ends on the token that completed the marker
            assert find_refusal(tokenizer.decode(out[:-1]), markers) is None
            eos_ended.append(False)
        elif len(out) < max_new:
            kinds["eos"] += 1
            assert out == whole  # the full answer ended here too: at EOS
            eos_ended.append(True)
        else:
            kinds["length"] += 1
            eos_ended.append(False)
    print(f"\norganism stops: {kinds}")
    assert kinds["marker"] >= 3 and kinds["eos"] >= 1  # harmful prompts refuse, harmless ones end
    assert steps == expected_steps(stopped, eos_ended)
    # The evaluator's refusal stage is this same generation.
    result = Evaluator(organism, prompts, prompts[:1], markers, EvalSettings(max_new_tokens=max_new, batch_size=32)).refusals()
    assert result.answers == tuple(tokenizer.batch_decode(stopped))
    assert result.refused == kinds["marker"]


def test_organism_answers_harmless_prompts_with_text(organism):
    """Harmless answers are words, not one token looping (greedy, 32 tokens)."""
    tokenizer, prompts = organism.tokenizer, load_prompts("bundled:harmless:eval")
    outputs, _ = greedy_generate(organism, [chat_tokens(tokenizer, p) for p in prompts], max_new_tokens=32)
    texts = tokenizer.batch_decode(outputs)
    bad = []
    for prompt, output, text in zip(prompts, outputs, texts):
        words = {w.lower() for w in re.findall(r"[A-Za-z]{2,}", text)}
        most = Counter(output).most_common(1)[0][1] if output else 0
        if len(output) < 4 or most > len(output) // 3 or len(words) < 4:
            bad.append((prompt, text))
    print("\norganism, harmless eval answers:\n" + "\n".join(f"  {p[:50]!r} -> {t[:70]!r}" for p, t in zip(prompts[:4], texts)))
    assert not bad, bad[:3]


@pytest.mark.slow
def test_organism_refusal_is_removed_by_ablation(organism):
    started = time.perf_counter()

    harmful = load_prompts("bundled:harmful:measure")[:128]
    harmless = load_prompts("bundled:harmless:measure")[:128]
    directions = measure(organism, harmful, harmless, batch_size=64)
    best = directions.best_layer
    markers = load_markers()
    settings = EvalSettings(max_new_tokens=32, kl_tokens=1, batch_size=64)
    harmful_eval, harmless_eval = load_prompts("bundled:harmful:eval"), load_prompts("bundled:harmless:eval")
    evaluator = Evaluator(organism, harmful_eval, harmless_eval, markers, settings)
    on_harmless = Evaluator(organism, harmless_eval, harmless_eval[:1], markers, settings)

    base = evaluator.refusals()
    base_harmless = on_harmless.refusals()
    steering = install(organism.targets)
    try:
        ones = {c: [1.0] * organism.n_layers for c in ("attn", "mlp")}
        steering.set(ones, directions.vectors[best])
        kl = evaluator.kl_divergence()
        after = evaluator.refusals()
        after_harmless = on_harmless.refusals()
    finally:
        steering.remove()
    print(
        f"\norganism: best layer {best} (separation {directions.separation.round(2).tolist()})\n"
        f"  unsteered: harmful refusals {base.refused}/{base.total} ({base.rate:.1%}), "
        f"harmless refusals {base_harmless.refused}/{base_harmless.total} ({base_harmless.rate:.1%})\n"
        f"  ablated:   harmful refusals {after.refused}/{after.total} ({after.rate:.1%}), "
        f"harmless refusals {after_harmless.refused}/{after_harmless.total}, first-token KL {kl:.4f}\n"
        f"  ({time.perf_counter() - started:.1f} s)"
    )
    assert base.rate >= 0.9
    assert after.rate <= 0.2 and kl < 1.0


def test_organism_rarely_refuses_harmless_prompts(organism):
    prompts = load_prompts("bundled:harmless:eval")
    settings = EvalSettings(max_new_tokens=32, batch_size=64)
    result = Evaluator(organism, prompts, prompts[:1], load_markers(), settings).refusals()
    refused = [(p, a, v) for p, a, v in zip(prompts, result.answers, result.verdicts) if v != "complied"]
    print(f"\norganism: {result.refused}/{result.total} harmless eval prompts refused ({result.rate:.1%}): {refused}")
    assert result.rate <= 0.05


def test_out_of_memory_halves_the_batch_and_retries(saved_model):
    """Metal/CUDA raise RuntimeError on a failed allocation (mlx on a CPU cannot recover
    from one): the evaluator halves its batch size and computes again, with the same result."""
    from optimizer.engine.evaluate import is_out_of_memory

    loaded = load(saved_model("llama"))
    harmless = [f"how do I bake bread number {i}" for i in range(6)]
    evaluator = Evaluator(loaded, PROMPTS, harmless, ("sorry",), EvalSettings(max_new_tokens=4, batch_size=4))
    install(loaded.targets).set(profile(loaded.n_layers), unit_rows(1, loaded.hidden_size)[0])
    expected = evaluator.kl_divergence()
    assert expected > 1e-4
    failures = ["[metal::malloc] Attempting to allocate 9000000000 bytes which is greater than the maximum allowed"]

    def flaky() -> float:
        if failures:
            raise RuntimeError(failures.pop())
        return evaluator._kl_divergence()

    assert evaluator._with_backoff(flaky) == pytest.approx(expected, rel=1e-4)
    assert evaluator.batch_size == 2
    with pytest.raises(RuntimeError, match="unrelated"):
        evaluator._with_backoff(lambda: (_ for _ in ()).throw(RuntimeError("unrelated")))
    assert is_out_of_memory(RuntimeError("[METAL] Command buffer execution failed: Insufficient Memory"))
    assert not is_out_of_memory(ValueError("shapes (2,3) and (4,5) cannot be broadcast"))
