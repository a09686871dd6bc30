"""Random-weight instances of real mlx-lm architectures, built offline.

The models are mlx-lm's own classes (found the way ``mlx_lm.load`` finds them), filled with
seeded random weights of realistic scale. They serve the engine tests (steering, capture and
export must be exact on every supported architecture, dense and quantized) and the benchmark
(``--synthetic llama:100M``), whose CPU numbers must reflect real compute.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import re
import shutil
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.utils import _get_classes, save_config
from mlx_lm.utils import quantize_model as _mlx_lm_quantize_model

# Architectures the synthetic builder knows, mapped to their Hugging Face class names.
SYNTHETIC_ARCHS: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
}
MOE_ARCHS = frozenset({"qwen3_moe", "mixtral", "qwen2_moe"})

# Tokenizer files copied next to the weights; never config.json or weights of the source.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)

# (hidden, layers) points of real model families; depth is interpolated between them.
_DEPTH_BY_WIDTH = (
    (128, 2), (256, 4), (512, 8), (768, 12), (1024, 16), (2048, 24), (4096, 32), (8192, 80)
)

_SIZE_SUFFIXES = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9}

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def parse_size(text: str) -> int:
    """Parse a parameter count such as "100M", "1.5B", "135m" or "2000000"."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMbBgG]?)\s*", text)
    if match is None:
        raise ValueError(f"bad model size {text!r}; use a number with K, M or B, e.g. 100M")
    return int(round(float(match.group(1)) * _SIZE_SUFFIXES[match.group(2).upper()]))


def _round_to(value: float, multiple: int) -> int:
    return max(multiple, int(round(value / multiple)) * multiple)


def _default_heads(hidden_size: int) -> int:
    # head_dim 64 like most real models; at least 4 heads so GQA has something to group.
    return max(4, hidden_size // 64)


def _default_kv_heads(num_heads: int) -> int:
    # Grouped-query attention with a small group, as in Llama 3 / Qwen / Mistral.
    for ratio in (3, 2, 1):
        if num_heads % ratio == 0 and num_heads // ratio >= 1:
            return num_heads // ratio
    return num_heads


def synthetic_config(
    arch: str,
    *,
    hidden_size: int = 128,
    num_hidden_layers: int = 2,
    vocab_size: int = 512,
    intermediate_size: int | None = None,
    num_attention_heads: int | None = None,
    num_key_value_heads: int | None = None,
    **overrides: Any,
) -> dict:
    """HF-style config dict (with "model_type") for a synthetic model of `arch`."""
    if arch not in SYNTHETIC_ARCHS:
        known = ", ".join(SYNTHETIC_ARCHS)
        raise ValueError(f"unknown synthetic architecture {arch!r}; choose one of {known}")
    heads = num_attention_heads or _default_heads(hidden_size)
    kv_heads = num_key_value_heads or _default_kv_heads(heads)
    head_dim = hidden_size // heads
    intermediate = intermediate_size or _round_to(hidden_size * 8 / 3, 64)
    config: dict[str, Any] = {
        "model_type": arch,
        "architectures": [SYNTHETIC_ARCHS[arch]],
        "hidden_size": hidden_size,
        "num_hidden_layers": num_hidden_layers,
        "intermediate_size": intermediate,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": vocab_size,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }
    config.update(_ARCH_DEFAULTS[arch](hidden_size, heads, head_dim, intermediate))
    config.update(overrides)
    return config


def _llama(hidden: int, heads: int, head_dim: int, intermediate: int) -> dict:
    return {
        "tie_word_embeddings": True,
        "rope_theta": 500000.0,
        "attention_bias": False,
        "mlp_bias": False,
    }


def _mistral(hidden: int, heads: int, head_dim: int, intermediate: int) -> dict:
    # Mistral v0.3 style: explicit head_dim, no sliding window, untied head.
    return {"head_dim": head_dim, "rope_theta": 1000000.0, "sliding_window": None}


def _qwen2(hidden: int, heads: int, head_dim: int, intermediate: int) -> dict:
    # Qwen2 has q/k/v biases (always on in mlx-lm) and ties embeddings at small sizes.
    return {"tie_word_embeddings": True, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6}


def _qwen3_head_dim(hidden: int, heads: int) -> int:
    # Qwen3 keeps head_dim 128 even when heads·head_dim exceeds hidden (0.6B: 16·128 > 1024).
    return min(128, 2 * hidden // heads)


def _qwen3(hidden: int, heads: int, head_dim: int, intermediate: int) -> dict:
    return {
        "head_dim": _qwen3_head_dim(hidden, heads),
        "tie_word_embeddings": True,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
    }


def _qwen3_moe(hidden: int, heads: int, head_dim: int, intermediate: int) -> dict:
    return {
        "head_dim": _qwen3_head_dim(hidden, heads),
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": _round_to(hidden / 2, 64),
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "norm_topk_prob": True,
    }


def _mixtral(hidden: int, heads: int, head_dim: int, intermediate: int) -> dict:
    return {"rope_theta": 1000000.0, "num_local_experts": 8, "num_experts_per_tok": 2}


def _qwen2_moe(hidden: int, heads: int, head_dim: int, intermediate: int) -> dict:
    return {
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": _round_to(hidden / 2, 64),
        "shared_expert_intermediate_size": intermediate,
    }


def _gemma3_text(hidden: int, heads: int, head_dim: int, intermediate: int) -> dict:
    # Pattern 2 puts sliding (even) and full (odd) layers in any model of ≥ 2 layers; the
    # window of 8 tokens is shorter than the test prompts, so sliding masks really cut.
    return {
        "head_dim": head_dim,
        "query_pre_attn_scalar": head_dim,
        "tie_word_embeddings": True,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "rope_local_base_freq": 10000.0,
        "sliding_window": 8,
        "sliding_window_pattern": 2,
        "hidden_activation": "gelu_pytorch_tanh",
    }


def _phi3(hidden: int, heads: int, head_dim: int, intermediate: int) -> dict:
    return {
        "rope_theta": 10000.0,
        "partial_rotary_factor": 1.0,
        "original_max_position_embeddings": 4096,
    }


_ARCH_DEFAULTS = {
    "llama": _llama,
    "mistral": _mistral,
    "qwen2": _qwen2,
    "qwen3": _qwen3,
    "qwen3_moe": _qwen3_moe,
    "mixtral": _mixtral,
    "qwen2_moe": _qwen2_moe,
    "gemma3_text": _gemma3_text,
    "phi3": _phi3,
}


def _instantiate(config: dict) -> nn.Module:
    """mlx-lm's model for `config`, with lazy (unevaluated) default parameters."""
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    if config.get("tie_word_embeddings") and "lm_head" in model:
        # Models that tie only after loading (gemma3) drop their head in sanitize.
        weights = {k: v for k, v in tree_flatten(model.parameters()) if k != "lm_head.weight"}
        model.sanitize(weights)
    return model


def count_parameters(config: dict) -> int:
    """Number of parameters of the dense model for `config`, without allocating it."""
    # mlx arrays are lazy: the default parameters have shapes but no memory until evaluated.
    return sum(v.size for _, v in tree_flatten(_instantiate(config).parameters()))


def _depth_for_width(hidden_size: int) -> int:
    points = _DEPTH_BY_WIDTH
    if hidden_size <= points[0][0]:
        return points[0][1]
    for (w0, d0), (w1, d1) in zip(points, points[1:]):
        if hidden_size <= w1:
            return max(2, round(d0 + (d1 - d0) * (hidden_size - w0) / (w1 - w0)))
    return points[-1][1]


# Values the tiny test configs shrink (so that the code paths run) but real models keep.
_FULL_SIZE_DEFAULTS = {"gemma3_text": {"sliding_window": 512, "sliding_window_pattern": 6}}


def _candidate_widths() -> list[int]:
    # Multiples of 128 (even head counts, so GQA groups evenly), of 256 when large.
    return [*range(128, 2048, 128), *range(2048, 8192 + 1, 256)]


def config_for_size(
    arch: str, n_params: int, vocab_size: int = 32768, **overrides: Any
) -> dict:
    """Config of `arch` with about `n_params` parameters, in realistic width/depth ratios."""
    overrides = {**_FULL_SIZE_DEFAULTS.get(arch, {}), **overrides}
    best: tuple[int, int, dict] | None = None
    for hidden in _candidate_widths():
        base_depth = _depth_for_width(hidden)
        depths = range(max(2, round(base_depth * 0.75)), round(base_depth * 1.25) + 1)
        counts = []
        for depth in depths:
            config = synthetic_config(
                arch,
                hidden_size=hidden,
                num_hidden_layers=depth,
                vocab_size=vocab_size,
                **overrides,
            )
            counts.append(count_parameters(config))
            # Within one 3% band of the target, the family's own depth beats a closer count.
            error_band = round(abs(counts[-1] - n_params) / n_params / 0.03)
            key = (error_band, abs(depth - base_depth))
            if best is None or key < best[:2]:
                best = (*key, config)
        if counts[0] > 1.3 * n_params:
            break
    assert best is not None
    return best[2]


def config_for_spec(spec: str, vocab_size: int = 32768) -> dict:
    """Config for a benchmark spec "ARCH:SIZE", e.g. "llama:100M"."""
    arch, _, size = spec.partition(":")
    if arch not in SYNTHETIC_ARCHS or not size:
        known = ", ".join(SYNTHETIC_ARCHS)
        raise ValueError(f"bad synthetic model {spec!r}; use ARCH:SIZE with ARCH one of {known}")
    return config_for_size(arch, parse_size(size), vocab_size)


def _is_offset_norm(module: nn.Module) -> bool:
    """True for norms that scale by (1 + weight), like Gemma's, found by probing."""
    saved = module.weight
    module.weight = mx.zeros_like(saved)
    try:
        out = module(mx.ones((1, saved.shape[0]), dtype=mx.float32))
    finally:
        module.weight = saved
    return bool(mx.abs(out).max().item() > 0.5)


def _random_value(
    name: str, value: mx.array, module: nn.Module, key: mx.array, hidden_size: int
) -> mx.array:
    """A random value for one parameter, scaled by its role in the network."""
    leaf = name.rsplit(".", 1)[-1]
    shape = value.shape
    if "Norm" in type(module).__name__:
        if leaf == "weight":
            # Norm scales near their neutral point, with noise so that they are not identity.
            noise = 0.1 * mx.random.normal(shape, key=key)
            return noise if _is_offset_norm(module) else 1.0 + noise
        return 0.02 * mx.random.normal(shape, key=key)
    if isinstance(module, nn.Embedding):
        # Unit-ish rows scaled like real embeddings (Llama: ~1.3/sqrt(d)); keeps logits O(1).
        return mx.random.normal(shape, key=key) / math.sqrt(hidden_size)
    if leaf == "bias":
        return 0.05 * mx.random.normal(shape, key=key)
    if value.ndim >= 2:
        # Fan-in scaling keeps activations O(1) at any width (0.02 is this at d≈2500).
        return mx.random.normal(shape, key=key) / math.sqrt(shape[-1])
    return 0.02 * mx.random.normal(shape, key=key)


def build_model(config: dict, *, seed: int = 0, dtype: mx.Dtype = mx.float32) -> nn.Module:
    """mlx-lm's model for `config` with every parameter seeded random at a realistic scale."""
    model = _instantiate(config)
    modules = dict(model.named_modules())
    params = tree_flatten(model.parameters())
    keys = mx.random.split(mx.random.key(seed), len(params))
    weights = {}
    for i, (name, value) in enumerate(params):
        module = modules[name.rsplit(".", 1)[0]]
        random = _random_value(name, value, module, keys[i], config["hidden_size"])
        floating = mx.issubdtype(value.dtype, mx.floating)
        weights[name] = random.astype(dtype) if floating else value
    model.load_weights(list(weights.items()), strict=True)
    model.eval()
    mx.eval(model.parameters())
    return model


def quantize_model(
    model: nn.Module,
    config: dict,
    *,
    bits: int = 4,
    group_size: int = 64,
    mode: str = "affine",
) -> dict:
    """Quantize `model` in place as mlx_lm.convert does; return the config to save with it."""
    # mlx-lm's own routine, so per-model predicates (e.g. 8-bit MoE routers) apply as in real
    # checkpoints; it prints a bits-per-weight line we do not want in library output.
    with contextlib.redirect_stdout(io.StringIO()):
        _, quantized_config = _mlx_lm_quantize_model(
            model, config, group_size, bits, mode=mode
        )
    mx.eval(model.parameters())
    return quantized_config


def tokenizer_vocab_size(tokenizer_dir: Path) -> int:
    """Vocabulary size (with added tokens) of the tokenizer.json in `tokenizer_dir`."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
    return tokenizer.get_vocab_size(with_added_tokens=True)


def special_token_ids(tokenizer_dir: Path) -> dict[str, int | None]:
    """bos/eos/pad token ids named by tokenizer_config.json, as config.json keys."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
    config_path = Path(tokenizer_dir) / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text()) if config_path.exists() else {}
    ids: dict[str, int | None] = {}
    for role in ("bos", "eos", "pad"):
        token = tokenizer_config.get(f"{role}_token")
        if isinstance(token, dict):
            token = token.get("content")
        ids[f"{role}_token_id"] = tokenizer.token_to_id(token) if token else None
    return ids


def _split_shards(weights: dict[str, mx.array], shards: int) -> list[dict[str, mx.array]]:
    """Split `weights` in order into `shards` non-empty groups of similar byte size."""
    if not 1 <= shards <= len(weights):
        raise ValueError(f"shards must be between 1 and {len(weights)}, got {shards}")
    total = sum(v.nbytes for v in weights.values())
    groups: list[dict[str, mx.array]] = [{} for _ in range(shards)]
    done, index = 0, 0
    names = list(weights)
    for position, name in enumerate(names):
        # Move on when this shard has its share, keeping one tensor for each later shard.
        left_after = len(names) - position
        if groups[index] and index < shards - 1 and (
            done >= total * (index + 1) / shards or left_after <= shards - 1 - index
        ):
            index += 1
        groups[index][name] = weights[name]
        done += weights[name].nbytes
    return groups


def save_model_dir(
    model: nn.Module,
    config: dict,
    out_dir: Path | str,
    *,
    tokenizer_dir: Path | None = None,
    shards: int = 1,
) -> Path:
    """Write `model` as a directory that mlx_lm.load opens (config, weights, tokenizer)."""
    out = Path(out_dir)
    quantized = any(hasattr(m, "scales") for _, m in model.named_modules())
    if quantized and "quantization" not in config:
        raise ValueError(
            "model is quantized but config has no 'quantization'; "
            "pass the config that quantize_model returned"
        )
    config = copy.deepcopy(config)
    if tokenizer_dir is not None and (Path(tokenizer_dir) / "tokenizer.json").exists():
        n_tokens = tokenizer_vocab_size(Path(tokenizer_dir))
        if config["vocab_size"] < n_tokens:
            raise ValueError(
                f"vocab_size {config['vocab_size']} is smaller than the tokenizer's "
                f"{n_tokens} tokens; build the config with vocab_size >= {n_tokens}"
            )
        # Unset special ids would fall back to the architecture's defaults (phi3: 32000),
        # which point outside a small vocabulary; mlx-lm also takes EOS from the config.
        for key, value in special_token_ids(Path(tokenizer_dir)).items():
            config.setdefault(key, value)
    out.mkdir(parents=True, exist_ok=True)

    weights = dict(tree_flatten(model.parameters()))
    groups = _split_shards(weights, shards)
    pattern = "model-{:05d}-of-{:05d}.safetensors" if shards > 1 else "model.safetensors"
    weight_map = {}
    for i, group in enumerate(groups, start=1):
        file_name = pattern.format(i, shards)
        mx.save_safetensors(str(out / file_name), group, metadata={"format": "mlx"})
        weight_map.update(dict.fromkeys(group, file_name))
    index = {
        "metadata": {"total_size": sum(v.nbytes for v in weights.values())},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))
    save_config(config, out / "config.json")

    if tokenizer_dir is not None:
        for file_name in TOKENIZER_FILES:
            source = Path(tokenizer_dir) / file_name
            if source.is_file():
                shutil.copy(source, out / file_name)
    return out


def write_tiny_tokenizer(out_dir: Path | str, *, vocab_size: int = 384) -> Path:
    """Train a tiny byte-level BPE tokenizer with a ChatML chat template into `out_dir`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [
        "How do I bake bread? Mix flour, water, salt and yeast, then knead and bake.",
        "I can't help with that request. Is there something else I can do for you?",
        "The quick brown fox jumps over the lazy dog. Write a poem about the sea.",
        "user assistant system You are a helpful assistant.",
    ] * 4
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "model_max_length": 4096,
        "chat_template": CHATML_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    return out
