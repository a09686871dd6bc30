"""Synthetic models: real mlx-lm architectures with random weights, dense and quantized."""

import json

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import pytest
from mlx.utils import tree_flatten

from optimizer.bench.synthetic import MOE_ARCHS, SYNTHETIC_ARCHS, build_model, config_for_size, config_for_spec, count_parameters, parse_size, quantize_model, save_model_dir, synthetic_config, write_tiny_tokenizer

ARCHS = sorted(SYNTHETIC_ARCHS)
# Two 24-token rows, longer than gemma3's 8-token sliding window.
TOKENS = mx.array([[(a + b * i) % 384 for i in range(24)] for a, b in ((7, 37), (11, 53))])


def tiny_config(arch: str, **overrides) -> dict:
    sizes = {"hidden_size": 128, "num_hidden_layers": 2, "vocab_size": 512, **overrides}
    return synthetic_config(arch, **sizes)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return write_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def correlation(a: mx.array, b: mx.array) -> float:
    a, b = a - a.mean(), b - b.mean()
    return (mx.mean(a * b) / (a.std() * b.std())).item()


def max_diff(a: mx.array, b: mx.array) -> float:
    return mx.abs(a - b).max().item()


def test_archs_cover_the_supported_families():
    families = ["llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral", "qwen2_moe"]
    assert {*families, "gemma3_text", "phi3"} <= set(SYNTHETIC_ARCHS)


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_is_finite_and_not_degenerate(arch):
    config = tiny_config(arch)
    model = build_model(config, seed=1)
    logits = model(TOKENS)
    assert logits.shape == (2, 24, 512)
    assert mx.isfinite(logits).all().item()
    assert logits.std().item() > 0.3
    assert len(set(mx.argmax(logits[0], axis=-1).tolist())) > 4
    assert model.model_type == arch
    # Same seed, same model; another seed, another model.
    assert max_diff(build_model(config, seed=1)(TOKENS), logits) == 0.0
    assert max_diff(build_model(config, seed=2)(TOKENS), logits) > 0.1


@pytest.mark.parametrize("arch", ARCHS)
def test_every_parameter_is_random(arch):
    model = build_model(tiny_config(arch))
    for name, value in tree_flatten(model.parameters()):
        assert value.dtype == mx.float32, name
        # No parameter is left at a constant default (zeros, ones or identity norms).
        assert value.size == 1 or value.std().item() > 1e-3, name


def test_mistral_uses_llama_code_and_phi3_fuses_projections():
    assert type(build_model(tiny_config("mistral"))).__module__ == "mlx_lm.models.llama"
    config = tiny_config("phi3")
    layer = build_model(config).layers[0]
    head_dim = 128 // config["num_attention_heads"]
    qkv = (config["num_attention_heads"] + 2 * config["num_key_value_heads"]) * head_dim
    assert layer.self_attn.qkv_proj.weight.shape == (qkv, 128)
    assert layer.mlp.gate_up_proj.weight.shape == (2 * config["intermediate_size"], 128)


def test_gemma3_has_sliding_and_full_layers_and_the_window_matters():
    config = tiny_config("gemma3_text", num_hidden_layers=4)
    model = build_model(config)
    assert [layer.self_attn.is_sliding for layer in model.layers] == [True, False, True, False]
    assert config["sliding_window"] < TOKENS.shape[1]
    wide = build_model(dict(config, sliding_window=4096))
    logits, wide_logits = model(TOKENS), wide(TOKENS)
    window = config["sliding_window"]
    # Same weights: equal while the window covers the whole prefix, different after.
    assert max_diff(logits[:, :window], wide_logits[:, :window]) < 1e-5
    assert max_diff(logits[:, window:], wide_logits[:, window:]) > 1e-2


def moe_block(layer: nn.Module) -> nn.Module:
    return getattr(layer, "block_sparse_moe", None) or layer.mlp


@pytest.mark.parametrize("arch", sorted(MOE_ARCHS))
def test_moe_routers_use_several_experts(arch):
    model = build_model(tiny_config(arch))
    layer = model.layers[0]
    block = moe_block(layer)
    assert block.switch_mlp.down_proj.weight.ndim == 3
    h = model.model.embed_tokens(TOKENS)
    h = h + layer.self_attn(layer.input_layernorm(h), "causal")
    gates = block.gate(layer.post_attention_layernorm(h))
    k = tiny_config(arch)["num_experts_per_tok"]
    chosen = mx.argpartition(-gates, kth=k - 1, axis=-1)[..., :k]
    assert len(set(chosen.reshape(-1).tolist())) >= gates.shape[-1] // 2


def test_qwen2_moe_has_gated_shared_expert():
    config = tiny_config("qwen2_moe")
    block = build_model(config).layers[0].mlp
    shared = config["shared_expert_intermediate_size"]
    assert block.shared_expert.down_proj.weight.shape == (128, shared)
    assert block.shared_expert_gate.weight.shape == (1, 128)


@pytest.mark.parametrize("arch", ARCHS)
def test_quantized_model_is_fully_quantized_and_close(arch):
    config = tiny_config(arch)
    model = build_model(config)
    dense = model(TOKENS)
    quantized_config = quantize_model(model, config, bits=4, group_size=64)
    assert quantized_config["quantization"]["bits"] == 4
    assert "quantization" not in config
    leftovers = [name for name, m in model.named_modules() if hasattr(m, "to_quantized")]
    assert leftovers == []
    logits = model(TOKENS)
    assert mx.isfinite(logits).all().item()
    assert correlation(logits, dense) > 0.7


@pytest.mark.parametrize(
    "bits, group_size, mode",
    [(8, 64, "affine"), (4, 32, "mxfp4"), (8, 32, "mxfp8"), (4, 16, "nvfp4")],
)
def test_other_quantization_modes(bits, group_size, mode, tmp_path):
    config = tiny_config("qwen3_moe")
    model = build_model(config)
    dense = model(TOKENS)
    quantized_config = quantize_model(
        model, config, bits=bits, group_size=group_size, mode=mode
    )
    assert quantized_config["quantization"]["mode"] == mode
    assert model.layers[0].mlp.switch_mlp.down_proj.mode == mode
    logits = model(TOKENS)
    assert correlation(logits, dense) > 0.7
    loaded, _ = mlx_lm.load(str(save_model_dir(model, quantized_config, tmp_path / "m")))
    assert max_diff(loaded(TOKENS), logits) <= 1e-5


@pytest.mark.parametrize("arch", ARCHS)
def test_saved_dir_loads_with_identical_logits(arch, tmp_path, tokenizer_dir):
    config = tiny_config(arch)
    model = build_model(config)
    out = save_model_dir(model, config, tmp_path / "dense", tokenizer_dir=tokenizer_dir)
    assert (out / "model.safetensors").exists()
    loaded, tokenizer = mlx_lm.load(str(out))
    assert max_diff(loaded(TOKENS), model(TOKENS)) <= 1e-5
    messages = [{"role": "user", "content": "Hi"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert len(prompt) > 3
    saved_config = json.loads((out / "config.json").read_text())
    assert saved_config["eos_token_id"] == tokenizer.eos_token_id

    quantized_config = quantize_model(model, config, bits=4, group_size=64)
    out = save_model_dir(
        model, quantized_config, tmp_path / "q4", tokenizer_dir=tokenizer_dir, shards=3
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert all((out / f).exists() for f in files)
    loaded, _ = mlx_lm.load(str(out))
    assert max_diff(loaded(TOKENS), model(TOKENS)) <= 1e-5


def test_save_refuses_inconsistent_inputs(tmp_path, tokenizer_dir):
    config = tiny_config("llama", vocab_size=128)
    with pytest.raises(ValueError, match="vocab_size"):
        save_model_dir(
            build_model(config), config, tmp_path / "a", tokenizer_dir=tokenizer_dir
        )
    config = tiny_config("llama")
    model = build_model(config)
    quantize_model(model, config)
    with pytest.raises(ValueError, match="quantization"):
        save_model_dir(model, config, tmp_path / "b")


def test_parse_size():
    assert parse_size("100M") == 100_000_000
    assert parse_size("1.5B") == 1_500_000_000
    assert parse_size("135m") == 135_000_000
    assert parse_size("2000") == 2000
    with pytest.raises(ValueError):
        parse_size("big")


def test_config_for_size_lands_near_the_target():
    config = config_for_size("llama", parse_size("100M"), vocab_size=32000)
    assert (config["hidden_size"], config["num_hidden_layers"]) == (768, 12)
    assert config["num_attention_heads"] == 12 and config["num_key_value_heads"] == 4
    assert abs(count_parameters(config) - 100_000_000) / 100_000_000 < 0.15
    for arch in ("qwen3_moe", "gemma3_text"):
        config = config_for_size(arch, parse_size("20M"))
        assert abs(count_parameters(config) - 20_000_000) / 20_000_000 < 0.15
        assert config["hidden_size"] % 64 == 0


def test_config_for_spec():
    config = config_for_spec("qwen3:30M", vocab_size=1000)
    assert config["model_type"] == "qwen3" and config["vocab_size"] == 1000
    for bad in ("llama", "gpt9:10M", "llama:lots"):
        with pytest.raises(ValueError):
            config_for_spec(bad)
