"""Load a chat model through mlx-lm and find what abopt steers in it.

Works on any mlx-lm architecture whose decoder layers have an attention output projection
and an MLP (or mixture-of-experts) down projection writing into the residual stream:
dense ``Linear``, ``QuantizedLinear`` of any mode, and ``SwitchLinear`` expert stacks.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import numpy as np
from mlx_lm.models import cache as mlx_cache
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import MODEL_REMAPPING, dequantize_model

from optimizer import DATA
from optimizer.engine import fastexp
from optimizer.engine.fingerprint import model_identity
from optimizer.engine.patch import patch, set_private, unpatch
from optimizer.errors import UserError

ORGANISM = "organism"
ORGANISM_PATH = DATA / "organism"

COMPONENTS = ("attn", "mlp")
# Submodule names under which decoder layers keep attention and MLP / MoE blocks,
# and the names their residual-writing output projections go by across mlx-lm models.
_CONTAINERS = {
    "attn": ("self_attn", "attn", "attention", "self_attention"),
    "mlp": ("mlp", "block_sparse_moe", "feed_forward", "ffn", "moe"),
}
_OUTPUTS = {
    "attn": ("o_proj", "out_proj", "dense", "c_proj", "wo"),
    "mlp": ("down_proj", "w2", "fc2", "c_proj", "dense_4h_to_h"),
}
# Post-norm decoder layers (gemma2/3, olmo2) normalise each block's output before adding it to
# the residual, under these names. A pre-norm llama also has a post_attention_layernorm, but
# there it is the MLP's *input* norm: a layer counts as post-norm only with both.
_POST_NORMS = {"attn": "post_attention_layernorm", "mlp": "post_feedforward_layernorm"}
_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


@dataclass(frozen=True)
class Target:
    """One projection whose output is steered: ``component`` of decoder layer ``layer``."""

    layer: int
    component: str
    path: str
    module: nn.Module = field(compare=False, repr=False)
    # The norm the projection's output passes through before the residual add (post-norm
    # architectures); None when the output is added as it is.
    post_norm: nn.Module | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class LoadedModel:
    """A model, its tokenizer, and what abopt knows about its structure."""

    model: nn.Module = field(repr=False)
    tokenizer: TokenizerWrapper = field(repr=False)
    config: dict = field(repr=False)
    source: str
    path: Path
    model_type: str
    n_layers: int
    hidden_size: int
    targets: tuple[Target, ...] = field(repr=False)
    identity: str
    tokenizer_identity: str
    dtype: str
    unpacked: bool = False  # quantized weights dequantized to compute on a CPU (see load_model)

    @property
    def layers(self) -> list[nn.Module]:
        return decoder_layers(self.model)

    @property
    def post_norm(self) -> bool:
        """Whether some steered projection's output passes through a norm before the residual add."""
        return any(t.post_norm is not None for t in self.targets)


def resolve_model_path(source: str) -> Path:
    """Local directory for ``source``: "organism", a path, or a Hugging Face id."""
    if source == ORGANISM:
        if not (ORGANISM_PATH / "config.json").exists():
            raise UserError(
                f"the bundled model organism is missing from {ORGANISM_PATH}; "
                "reinstall abopt or run scripts/train_organism.py"
            )
        return ORGANISM_PATH
    path = Path(source).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise UserError(f"model directory {path} has no config.json; point at an mlx-lm model directory")
        return path.resolve()
    if source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise UserError(
            f"model {source!r} is neither an existing directory nor a Hugging Face id (org/name); "
            "check the path"
        )
    try:
        from mlx_lm.utils import _download

        return Path(_download(source))
    except Exception as error:  # huggingface_hub raises many types; all mean "not available"
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(
            f"model {source!r} is not a local directory and could not be fetched from Hugging Face "
            f"({reason}); check the id and the network, or download it while online first"
        ) from None


def read_config(path: Path) -> dict:
    """The model's config.json, checked for an architecture mlx-lm can build."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise UserError(f"cannot read {path / 'config.json'}: {error}") from None
    model_type = config.get("model_type")
    if not model_type:
        raise UserError(f"{path / 'config.json'} has no model_type; it is not an mlx-lm model")
    module_name = MODEL_REMAPPING.get(model_type, model_type)
    try:
        importlib.import_module(f"mlx_lm.models.{module_name}")
    except ImportError:
        raise UserError(
            f"unsupported architecture {model_type!r}: mlx-lm has no model class for it; "
            "use a model mlx-lm supports (see mlx_lm/models)"
        ) from None
    return config


def rope_overrides(config: dict) -> dict:
    """Config keys mlx-lm needs but a transformers-5 checkpoint only keeps in rope_parameters.

    mlx-lm 0.32 reads ``rope_theta`` at the top level and silently falls back to its default
    (10000) when it is absent, which makes e.g. SmolLM2 (100000) subtly wrong.
    """
    params = config.get("rope_parameters")
    if not isinstance(params, dict) or "rope_theta" in config:
        return {}
    if "rope_theta" in params:
        overrides: dict[str, Any] = {"rope_theta": params["rope_theta"]}
        if params.get("rope_type", "default") != "default" and "rope_scaling" not in config:
            overrides["rope_scaling"] = params
        return overrides
    # Per-layer-type parameters (e.g. gemma3: full and sliding attention bases).
    overrides = {}
    if isinstance(params.get("full_attention"), dict) and "rope_theta" in params["full_attention"]:
        overrides["rope_theta"] = params["full_attention"]["rope_theta"]
    sliding = params.get("sliding_attention")
    if isinstance(sliding, dict) and "rope_theta" in sliding and "rope_local_base_freq" not in config:
        overrides["rope_local_base_freq"] = sliding["rope_theta"]
    return overrides


def compute_dtype(requested: str) -> mx.Dtype | None:
    """The float dtype to run in; None keeps the checkpoint's own."""
    if requested == "auto":
        # bfloat16/float16 have no fast path on a CPU; float32 with OpenBLAS does.
        return mx.float32 if mx.default_device() == mx.cpu else None
    if requested not in _DTYPES:
        raise UserError(f"dtype {requested!r} is not one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[requested]


def load_model(
    source: str,
    *,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    lazy: bool = False,
    unpack: bool = False,
    fast_exp: bool | None = None,
) -> LoadedModel:
    """Load ``source`` with mlx-lm and locate its decoder layers and steering targets.

    ``lazy`` builds the model and checks every weight file and tensor without reading the
    weights: what ``abopt run`` does before it touches a study. ``unpack``: on a CPU,
    dequantize a quantized model's weights (to the compute dtype) when that fits in half
    the free memory: mlx's CPU backend has no fast quantized matmul, and dequantizing gives
    the very weight values the quantized kernels compute with. Export keeps them packed.
    ``fast_exp``: on a CPU, whether this process's models run SiLU and attention with
    :mod:`fastexp` (None: as the models loaded before; a GPU always keeps mlx-lm's own).
    """
    path = resolve_model_path(source)
    config = read_config(path)
    model, tokenizer = _mlx_load(path, config, trust_remote_code, lazy)
    target_dtype = compute_dtype(dtype)
    if target_dtype is not None:
        model.set_dtype(target_dtype)  # scales too, before dequantizing: the values the kernels use
    unpacked = unpack and not lazy and mx.default_device() == mx.cpu and 0 < unpacked_bytes(model) <= available_memory() // 2
    if unpacked:
        model = dequantize_model(model)
    if not lazy:
        mx.eval(model.parameters())
    if fast_exp is None:
        fast_exp = fastexp.is_installed()  # the process's choice, for an architecture imported just now
    fastexp.switch(fast_exp and mx.default_device() == mx.cpu)
    hidden_size = _hidden_size(model, config)
    targets = find_targets(model, hidden_size)
    if not targets:
        raise UserError(
            f"architecture {config['model_type']!r} is not supported: no attention-output or "
            "MLP-down projections found in its decoder layers"
        )
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        config=config,
        source=source,
        path=path,
        model_type=config["model_type"],
        n_layers=len(decoder_layers(model)),
        hidden_size=hidden_size,
        targets=targets,
        identity=model_identity(path),
        tokenizer_identity=tokenizer_identity(path, tokenizer),
        dtype=str(target_dtype or _first_float_dtype(model)).removeprefix("mlx.core."),
        unpacked=unpacked,
    )


def unpacked_bytes(model: nn.Module) -> int:
    """Bytes the quantized weights of ``model`` take dequantized; 0 when none is quantized."""
    total = 0
    for _, module in model.named_modules():
        if "scales" in module and isinstance(module.get("weight"), mx.array):
            total += module["weight"].size * (32 // module.bits) * 4  # at most float32
    return total


def available_memory() -> int:
    """Free physical memory in bytes (8 GiB when the system does not say)."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 8 << 30


def compute_path(loaded: LoadedModel) -> str:
    """One line: which weights the model computes with, and why."""
    if loaded.unpacked:
        return f"computing on the dequantized {loaded.dtype} weights (a CPU has no fast quantized matmul; export re-quantizes)"
    if any("scales" in module for _, module in loaded.model.named_modules()):
        where = "on the GPU" if mx.default_device() == mx.gpu else "(the dequantized model does not fit in half the free memory)"
        return f"computing on the packed quantized weights {where}"
    return f"computing on the {loaded.dtype} weights"


def _mlx_load(path: Path, config: dict, trust_remote_code: bool, lazy: bool) -> tuple[nn.Module, TokenizerWrapper]:
    """``mlx_lm.load``, with each way a model directory can be broken told in one line."""
    try:
        return mlx_lm.load(str(path), model_config=rope_overrides(config), trust_remote_code=trust_remote_code, lazy=lazy)
    except (ValueError, FileNotFoundError) as error:
        raise UserError(f"mlx-lm cannot load {path}: {_first_line(error)}; check that it holds the whole model (config.json, *.safetensors, tokenizer files)") from None
    except RuntimeError as error:
        if "safetensors" not in str(error):
            raise
        raise UserError(
            f"a weight file in {path} is incomplete or corrupt ({_first_line(error)}); "
            "download or copy the model again"
        ) from None
    except (TypeError, KeyError, AttributeError) as error:
        # mlx-lm builds the model's ModelArgs from config.json: a config written for another
        # architecture (or missing fields) fails here.
        raise UserError(
            f"{path / 'config.json'} does not fit model_type {config['model_type']!r} "
            f"({_first_line(error)}); fix config.json or point at the right model"
        ) from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers, in order, as the model's own forward pass runs them."""
    layers = getattr(model, "layers", None)
    if layers is None:
        inner = getattr(model, "model", None) or getattr(model, "language_model", None)
        layers = getattr(inner, "layers", None)
    if not isinstance(layers, list) or not layers:
        raise UserError(f"cannot find decoder layers in {type(model).__module__}; architecture not supported")
    return layers


def find_targets(model: nn.Module, hidden_size: int) -> tuple[Target, ...]:
    """Every projection that writes a decoder layer's attention or MLP output to the residual."""
    prefix = _layers_prefix(model)
    targets = []
    for index, layer in enumerate(decoder_layers(model)):
        for path, module in layer.named_modules():
            component = _classify(path, module, hidden_size)
            if component is not None:
                targets.append(Target(index, component, f"{prefix}.{index}.{path}", module, _post_norm(layer, component)))
    return tuple(sorted(targets, key=lambda t: (t.layer, COMPONENTS.index(t.component), t.path)))


def _classify(path: str, module: nn.Module, hidden_size: int) -> str | None:
    parts = path.split(".")
    if len(parts) < 2 or "weight" not in module:
        return None
    weight = module["weight"]
    if not isinstance(weight, mx.array) or weight.ndim not in (2, 3) or weight.shape[-2] != hidden_size:
        return None
    for component in COMPONENTS:
        if parts[0] in _CONTAINERS[component] and parts[-1] in _OUTPUTS[component]:
            return component
    return None


def _post_norm(layer: nn.Module, component: str) -> nn.Module | None:
    if not all(isinstance(getattr(layer, name, None), nn.Module) for name in _POST_NORMS.values()):
        return None
    return getattr(layer, _POST_NORMS[component])


def norm_scale(norm: nn.Module, size: int) -> np.ndarray:
    """The per-channel scale s of an RMS-type norm (output ∝ s ⊙ x), up to a positive factor.

    Read off the module's own output on a ones vector, so any parametrisation (s = w, or
    1 + w on Gemma) is covered; checked on a random vector, because a norm that is not a
    per-channel rescaling (a LayerNorm subtracts the mean) has no such s.
    """
    probe = mx.random.normal((2, size), key=mx.random.key(0)).astype(mx.float32)
    scale, out = norm(mx.ones((1, size), dtype=mx.float32)).astype(mx.float32), norm(probe).astype(mx.float32)
    mx.eval(scale, out)
    scale, out, probe = np.array(scale[0], dtype=np.float64), np.array(out, dtype=np.float64), np.array(probe, dtype=np.float64)
    expected = scale * probe
    ratio = np.sum(out * expected, axis=1, keepdims=True) / np.maximum(np.sum(expected * expected, axis=1, keepdims=True), 1e-30)
    if np.abs(out - ratio * expected).max() > 1e-3 * max(np.abs(out).max(), 1e-12):
        raise UserError(
            f"the post-norm {type(norm).__name__} is not a per-channel rescaling of its input (an RMSNorm); "
            "abopt cannot remove a direction through it"
        )
    return scale.astype(np.float32)


def _layers_prefix(model: nn.Module) -> str:
    layers = decoder_layers(model)
    for path, module in model.named_modules():
        if module is layers[0]:
            return path.rsplit(".", 1)[0]
    return "model.layers"


def _hidden_size(model: nn.Module, config: dict) -> int:
    args = getattr(model, "args", None)
    for source in (args.__dict__ if args is not None else {}, config, config.get("text_config", {})):
        size = source.get("hidden_size") or source.get("d_model") or source.get("n_embd")
        if size:
            return int(size)
    raise UserError(f"cannot tell the hidden size of model type {config.get('model_type')!r}")


def _first_float_dtype(model: nn.Module) -> mx.Dtype:
    from mlx.utils import tree_flatten

    for _, value in tree_flatten(model.parameters()):
        if mx.issubdtype(value.dtype, mx.floating):
            return value.dtype
    return mx.float32


def tokenizer_identity(path: Path, tokenizer: TokenizerWrapper) -> str:
    """A fingerprint of the tokenizer files and the chat template in use."""
    digest = hashlib.sha256()
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "chat_template.jinja"):
        if (path / name).exists():
            digest.update(name.encode() + (path / name).read_bytes())
    digest.update(str(getattr(tokenizer, "chat_template", "")).encode())
    return digest.hexdigest()[:16]


def chat_tokens(tokenizer: TokenizerWrapper, prompt: str, system_prompt: str = "", thinking: bool = False) -> list[int]:
    """Token ids of ``prompt`` as a user turn, chat-templated, ready for the assistant's reply.

    A template that takes ``enable_thinking`` (reasoning models) gets ``thinking``.
    """
    messages = [{"role": "user", "content": prompt}]
    if system_prompt:
        messages.insert(0, {"role": "system", "content": system_prompt})
    kwargs: dict[str, Any] = {}
    template = str(getattr(tokenizer, "chat_template", "") or "")
    if "enable_thinking" in template:
        # Off by default: a reasoning model would otherwise open every answer with a long
        # think block, which the token budget of a trial cannot afford.
        kwargs["enable_thinking"] = thinking
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kwargs)
    except Exception:
        if not system_prompt:
            raise
        # Some templates (e.g. gemma's older ones) reject the system role: fold it in.
        merged = [{"role": "user", "content": f"{system_prompt}\n\n{prompt}"}]
        text = tokenizer.apply_chat_template(merged, add_generation_prompt=True, tokenize=False, **kwargs)
    return tokenizer.encode(text, add_special_tokens=False)


def pad_left(sequences: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[mx.array, list[int]]:
    """Left-pad token sequences into one (B, T) array; returns it with each row's padding."""
    longest = max(len(s) for s in sequences)
    padding = [longest - len(s) for s in sequences]
    rows = [[pad_id] * p + list(s) for p, s in zip(padding, sequences)]
    return mx.array(rows, dtype=mx.int32), padding


def batch_cache(model: nn.Module, left_padding: list[int]) -> list[Any]:
    """A fresh per-layer batch KV cache whose masks hide each row's left padding.

    Built from the model's own cache layout (``make_cache``), so sliding-window layers
    get a rotating cache of their window, exactly as mlx-lm's batch generation does.
    """
    caches = []
    for single in mlx_cache.make_prompt_cache(model):
        if type(single) is mlx_cache.KVCache:
            caches.append(mlx_cache.BatchKVCache(left_padding))
        elif type(single) is mlx_cache.RotatingKVCache:
            caches.append(mlx_cache.BatchRotatingKVCache(single.max_size, left_padding))
        else:
            raise UserError(
                f"model uses a {type(single).__name__} cache, which abopt's batched evaluation "
                "does not support (only attention KV caches are)"
            )
    return caches


def forward(model: nn.Module, tokens: mx.array, left_padding: list[int], cache: list[Any] | None = None) -> mx.array:
    """Logits of a left-padded batch; pass ``cache`` to keep it for generation."""
    return model(tokens, cache=cache if cache is not None else batch_cache(model, left_padding))


def _capture_hook(layer: nn.Module, base_call: Any, *args: Any, **kwargs: Any) -> Any:
    out = base_call(layer, *args, **kwargs)
    hidden = out[0] if isinstance(out, tuple) else out
    layer._abopt_sink.append(hidden[:, -1, :].astype(mx.float32))
    return out


@contextmanager
def capture_last_token(model: nn.Module) -> Iterator[list[mx.array]]:
    """Within the block, each forward pass appends every decoder layer's output at the last
    position (float32, shape (B, D)) to the yielded list, in layer order."""
    sink: list[mx.array] = []
    layers = decoder_layers(model)
    for layer in layers:
        set_private(layer, _abopt_sink=sink)
        patch(layer, _capture_hook)
    try:
        yield sink
    finally:
        for layer in layers:
            unpatch(layer)
            set_private(layer, _abopt_sink=None)  # don't keep the last batch's residuals alive


def final_norm(model: nn.Module) -> tuple[nn.Module, str] | None:
    """The norm applied to the last decoder layer's output, with its attribute name."""
    for inner in (getattr(model, "model", None), getattr(getattr(model, "language_model", None), "model", None)):
        if inner is None:
            continue
        for name in ("norm", "final_layernorm", "ln_f", "norm_f"):
            module = getattr(inner, name, None)
            if isinstance(module, nn.Module):
                return module, name
    return None


def _slice_hook(norm: nn.Module, base_call: Any, x: mx.array, *args: Any, **kwargs: Any) -> mx.array:
    at = norm._abopt_keep
    if isinstance(at, int):
        return base_call(norm, x[:, -at:], *args, **kwargs)
    at = at[:, None, None] if at.ndim == 1 else at[:, :, None]  # one position per row, or k
    return base_call(norm, mx.take_along_axis(x, at, axis=1), *args, **kwargs)


@contextmanager
def last_positions_only(model: nn.Module, keep: int) -> Iterator[None]:
    """Within the block, the model returns logits for its last ``keep`` positions only.

    The LM head is the largest matmul of a forward pass over a long prompt when the
    vocabulary is large; abopt only ever reads the last positions' logits.
    """
    found = final_norm(model)
    if found is None:
        yield
        return
    norm, _ = found
    set_private(norm, _abopt_keep=keep)
    patch(norm, _slice_hook)
    try:
        yield
    finally:
        unpatch(norm)


def logits_at(model: nn.Module, tokens: mx.array, index: mx.array, cache: list[Any] | None = None) -> mx.array:
    """Logits (B, V) at one position per row (``index`` (B,)), e.g. the last real token of a
    right-padded batch, or (B, k, V) at k positions per row (``index`` (B, k)); the LM head
    only runs on those positions when the final norm is found."""
    found = final_norm(model)
    if found is None:
        logits = model(tokens, cache=cache)
        at = index[:, None, None] if index.ndim == 1 else index[:, :, None]
        logits = mx.take_along_axis(logits, at, axis=1)
    else:
        norm, _ = found
        set_private(norm, _abopt_keep=index)
        patch(norm, _slice_hook)
        try:
            logits = model(tokens, cache=cache)
        finally:
            unpatch(norm)
    return logits[:, 0] if index.ndim == 1 else logits


def common_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """How many leading tokens every sequence shares."""
    first, n = sequences[0], min(len(s) for s in sequences)
    for s in sequences[1:]:
        n = next((i for i in range(n) if s[i] != first[i]), n)
    return n


MIN_SHARED_PREFIX = 4  # shorter shared prefixes are not worth a cache of their own


def shared_prefix_length(sequences: Sequence[Sequence[int]], keep: int = 1) -> int:
    """The leading tokens worth computing once for all ``sequences``: those every sequence
    shares, leaving each at least ``keep`` of its own to compute; 0 when that is fewer than
    ``MIN_SHARED_PREFIX`` or there is only one sequence."""
    if len(sequences) < 2:
        return 0
    shared = min(common_prefix_length(sequences), min(len(s) for s in sequences) - keep)
    return shared if shared >= MIN_SHARED_PREFIX else 0


def prefix_cache(model: nn.Module, tokens: Sequence[int]) -> list[Any] | None:
    """The KV cache of one prompt prefix (batch 1), or None when there is no prefix or the
    model's cache layout cannot be shared that way (sliding windows, recurrent state)."""
    if not tokens:
        return None
    cache = mlx_cache.make_prompt_cache(model)
    if any(type(c) is not mlx_cache.KVCache for c in cache):
        return None
    model(mx.array([list(tokens)], dtype=mx.int32), cache=cache)
    mx.eval([c.keys_and_values() for c in cache])
    return cache


def repeat_cache(cache: list[Any], rows: int) -> list[Any]:
    """A fresh batch of ``rows`` caches, each starting from the same prefix."""
    copies = []
    for c in cache:
        keys, values = c.keys_and_values()
        copy = mlx_cache.KVCache()
        copy.state = (mx.repeat(keys, rows, axis=0), mx.repeat(values, rows, axis=0), c.offset)
        copies.append(copy)
    return copies


def after_prefix(prompts: Sequence[Sequence[int]], shared: list[Any], pad_id: int = 0) -> tuple[mx.array, mx.array, list[Any]]:
    """What continues a shared prefix's cache: the prompts' own tokens right-padded, each
    row's last index, and a copy of the prefix's cache for every row."""
    tokens, last = pad_right([p[shared[0].offset :] for p in prompts], pad_id)
    return tokens, last, repeat_cache(shared, len(prompts))


def left_aligned(cache: Sequence[Any], right_padding: Sequence[int]) -> list[Any]:
    """Batch KV caches for decoding on from plain caches filled by a right-padded pass
    (e.g. a shared prefix, then right-padded suffixes): each row's padding is rolled to its
    front and masked, as mlx-lm's own ``BatchKVCache.finalize`` does for right padding, so
    the next token of every row lands right after its last real one."""
    batch = []
    for c in cache:
        keys, values = c.keys_and_values()
        b = mlx_cache.BatchKVCache([0] * keys.shape[0])
        b.state = (keys, values, mx.full((keys.shape[0],), keys.shape[2], dtype=mx.int32), b.left_padding, keys.shape[2])
        b.prepare(right_padding=list(right_padding))
        b.finalize()
        batch.append(b)
    return batch


def pad_right(sequences: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[mx.array, mx.array]:
    """Right-pad token sequences into one (B, T) array; returns it with each row's last index.

    Under a causal mask the padding comes after every real token, so no row sees it.
    """
    longest = max(len(s) for s in sequences)
    rows = [list(s) + [pad_id] * (longest - len(s)) for s in sequences]
    return mx.array(rows, dtype=mx.int32), mx.array([len(s) - 1 for s in sequences], dtype=mx.int32)
