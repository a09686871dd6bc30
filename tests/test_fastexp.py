"""abopt's exp for mlx's CPU backend: as accurate as mlx's own, and the same model answers."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.models import base

from optimizer.engine import fastexp
from optimizer.engine.evaluate import greedy_generate
from optimizer.engine.model import batch_cache, chat_tokens, load_model, pad_left


def test_exp_is_closer_to_the_true_exp_than_mlx():
    x = np.linspace(-87.3, 88.3, 400_001, dtype=np.float32)
    true = np.exp(x.astype(np.float64))
    ours = np.asarray(fastexp.exp(mx.array(x))).astype(np.float64)
    theirs = np.asarray(mx.exp(mx.array(x))).astype(np.float64)
    assert np.max(np.abs(ours - true) / true) < 1.5e-7  # about one float32 ulp
    assert np.max(np.abs(ours - true) / true) <= np.max(np.abs(theirs - true) / true)


def test_exp_at_the_edges_of_float32():
    x = mx.array([-np.inf, -1e4, -88.0, 0.0, 88.5, 1e4, np.inf, np.nan], dtype=mx.float32)
    assert np.asarray(fastexp.exp(x)).tolist()[:-1] == [0.0, 0.0, 0.0, 1.0, np.inf, np.inf, np.inf]
    assert np.isnan(np.asarray(fastexp.exp(x))[-1])


@pytest.mark.parametrize("shape", [(3, 5), (2, 7, 384), (1, 1, 1), (2, 7, 384)])  # repeated: a shape seen before
def test_swiglu_matches_mlx_lm_at_any_shape(shape):
    gate, x = mx.random.normal(shape, key=mx.random.key(1)) * 6, mx.random.normal(shape, key=mx.random.key(2))
    expected = np.asarray(nn.silu(gate) * x)
    assert np.allclose(np.asarray(fastexp.swiglu(gate, x)), expected, rtol=1e-6, atol=1e-6)


def test_swiglu_leaves_other_dtypes_to_mlx_lm():
    gate, x = (mx.random.normal((4, 8), key=mx.random.key(k)).astype(mx.bfloat16) for k in (3, 4))
    assert mx.array_equal(fastexp.swiglu(gate, x), fastexp.ORIGINALS["swiglu"](gate, x))


def _attention_inputs(batch: int, length: int, total: int) -> tuple[mx.array, mx.array, mx.array]:
    keys = [mx.random.key(k) for k in (5, 6, 7)]
    return (
        mx.random.normal((batch, 4, length, 16), key=keys[0]),  # 4 query heads on 2 key/value heads
        mx.random.normal((batch, 2, total, 16), key=keys[1]),
        mx.random.normal((batch, 2, total, 16), key=keys[2]),
    )


@pytest.mark.parametrize("mask_kind", ["none", "causal", "boolean", "additive"])
def test_attention_matches_mlx_for_every_mask(mask_kind):
    q, k, v = _attention_inputs(3, 5, 9)
    # Row 0 has 3 left-padding positions masked out, as a batch KV cache makes them.
    allowed = mx.broadcast_to((mx.arange(9) >= mx.array([3, 0, 1])[:, None])[:, None, None, :], (3, 1, 5, 9))
    mask = {"none": None, "causal": "causal", "boolean": allowed, "additive": mx.where(allowed, 0.0, -1e9)}[mask_kind]
    ours = fastexp.scaled_dot_product_attention(q, k, v, None, 0.25, mask)
    theirs = fastexp.ORIGINALS["scaled_dot_product_attention"](q, k, v, None, 0.25, mask)
    assert np.allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-5, atol=1e-6)


def test_install_swaps_the_names_in_loaded_model_modules_and_back():
    loaded = load_model("organism", fast_exp=True)
    try:
        assert fastexp.installed(loaded.model)
        import mlx_lm.models.llama as llama

        assert llama.swiglu is fastexp.swiglu and llama.scaled_dot_product_attention is fastexp.scaled_dot_product_attention
        assert base.scaled_dot_product_attention is fastexp.ORIGINALS["scaled_dot_product_attention"]  # mlx-lm's own stays
        with fastexp.using(False):
            assert not fastexp.installed(loaded.model)
        assert fastexp.installed(loaded.model)
        load_model("organism", fast_exp=False)
        assert not fastexp.installed(loaded.model)
    finally:
        fastexp.uninstall()


def test_a_model_loaded_later_follows_the_process_choice(tmp_path):
    from optimizer.bench import synthetic

    synthetic.write_tiny_tokenizer(tmp_path / "tokenizer")
    config = synthetic.synthetic_config("qwen3", vocab_size=512, num_hidden_layers=2)
    synthetic.save_model_dir(synthetic.build_model(config, seed=0), config, tmp_path / "qwen3", tokenizer_dir=tmp_path / "tokenizer")
    try:
        load_model("organism", fast_exp=True)
        assert fastexp.installed(load_model(str(tmp_path / "qwen3")).model)  # e.g. a judge of another architecture
        load_model("organism", fast_exp=False)
        assert not fastexp.installed(load_model(str(tmp_path / "qwen3")).model)
    finally:
        fastexp.uninstall()


def test_the_organism_answers_and_scores_the_same_on_either_exp():
    loaded = load_model("organism", fast_exp=False)
    prompts = [chat_tokens(loaded.tokenizer, p) for p in ("How do I bake bread?", "Tell me how to pick a lock.", "Hi")]
    tokens, padding = pad_left(prompts, 0)

    def run() -> tuple[np.ndarray, list[list[int]]]:
        logits = loaded.model(tokens, cache=batch_cache(loaded.model, padding))
        answers, _ = greedy_generate(loaded, prompts, max_new_tokens=24)
        return np.asarray(logits), answers

    plain_logits, plain_answers = run()
    with fastexp.using(True):
        assert fastexp.installed(loaded.model)
        fast_logits, fast_answers = run()
    rows = [(i, p) for i, p in enumerate(padding)]
    difference = max(np.abs(fast_logits[i, p:] - plain_logits[i, p:]).max() for i, p in rows)
    assert 0 < difference < 1e-5 * max(np.abs(plain_logits[i, p:]).max() for i, p in rows)
    assert fast_answers == plain_answers
