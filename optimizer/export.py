"""Export: bake one trial's steering into a copy of the model's weights, verify it, publish it.

For every target matrix W the trial steers with weight w along r̂, the export writes
W' = W − w·r̂(r̂ᵀW) (per expert for expert stacks, and per expert tensor when a checkpoint
stores experts separately), and b' = b − w·r̂(r̂·b) for a projection's bias. Shard by shard:
a shard without edited tensors is copied byte for byte; in the others only the edited
tensors are new, the rest is written back unchanged. A quantized matrix is dequantized
with its own mode, group size and bits, edited in float32, then re-quantized the same way
(``keep``) or stored dense (``none``). Memory stays near one shard plus one tensor.

Everything is written to a hidden sibling of OUT_DIR, then checked (see :data:`TOLERANCES`):
the exported model is loaded back with mlx-lm and its next-token logits on a few harmful
and harmless eval prompts are compared (1) with the same trial baked into the loaded model
in memory, stored at the export's precision — the file must be exactly that — and (2) with
the runtime-steered model the trial was scored with. Only if both hold is the directory
renamed to OUT_DIR; any failure leaves no partial OUT_DIR behind.
"""

from __future__ import annotations

import datetime
import gc
import json
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import mlx.core as mx
import numpy as np
import optuna

from optimizer import __version__
from optimizer.bake import QUANTIZED_TYPES, ablate_bias, ablate_matrix, bake_into, dequantize_arrays, quantize_arrays
from optimizer.errors import UserError
from optimizer.files import current_umask
from optimizer.model import LoadedModel, Target, chat_tokens, forward, last_positions_only, load_model, pad_left
from optimizer.study import StudyPlan
from optimizer.steering import Steering
from optimizer.trial_model import load_trial_model
from optimizer.storage import redact

EXPORT_DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}
QUANTIZE_CHOICES = ("keep", "none")
VERIFY_PROMPTS = 4  # per kind: the first harmful and the first harmless eval prompts

# What the exported model's next-token logits must satisfy, by how its edited tensors are
# stored (measurements behind the numbers: README, "Verification, and its tolerances"). "relative" is
# max|Δlogit| / max|logit|; KL is KL(runtime-steered ‖ exported), mean over the prompts;
# "effect" is KL(runtime-steered ‖ original), how much the trial changes the model.
#   exact:       edited tensors stored dense in float32, compared in float32: the export
#                is the runtime-steered model up to float32 summation order.
#   float:       edited (or all) tensors rounded to float16/bfloat16, or compared in them.
#   requantized: edited tensors re-quantized to their original packing: one more rounding
#                to a 4/8-bit grid, as large as the model's own quantization error.
# In the float and requantized tiers the file must first equal the same trial baked into the
# loaded model in memory at the export's precision (relative ≤ BAKE_RELATIVE for the compute
# dtype: catches wrong tensors, directions, layers, experts, packing, corruption); then the
# rounding must not undo the trial: its KL to the runtime-steered model must stay below
# kl_floor or kl_of_effect × the trial's effect.
TOLERANCES = {
    "exact": {"relative": 1e-4},
    "float": {"kl_floor": 1e-3, "kl_of_effect": 0.1},
    "requantized": {"kl_floor": 1e-2, "kl_of_effect": 0.5},
}
# 16-bit logits carry ~1e-2 relative rounding of their own, whatever the weights.
BAKE_RELATIVE = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 2e-2}

_QUANT_PARTS = ("scales", "biases", "global_scale")
_SAFETENSORS_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx", ".npz", ".pkl")
# Names a checkpoint may give one expert's down projection when it stores experts separately.
_EXPERT_ALIASES = {"down_proj": ("down_proj", "w2"), "w2": ("w2", "down_proj")}
_EXCLUDED_TOWERS = ("vision", "visual", "audio")


@dataclass(frozen=True)
class ExportOptions:
    """Choices of ``abopt export``."""

    dtype: str | None = None  # float dtype of rewritten float tensors; None: the source's
    quantize: str = "keep"  # quantized matrices: re-quantize ("keep") or store dense ("none")
    force: bool = False  # replace an existing OUT_DIR


# -- the checkpoint ----------------------------------------------------------------------


@dataclass(frozen=True)
class TensorInfo:
    """Where a checkpoint tensor lives and what it is, from the safetensors header."""

    file: str
    dtype: str  # safetensors code: F32, BF16, U32...
    shape: tuple[int, ...]
    nbytes: int


def weight_files(path: Path) -> list[Path]:
    """The safetensors files mlx-lm loads from a model directory."""
    return sorted(path.glob("model*.safetensors"))


def read_header(file: Path) -> dict:
    """The JSON header of a safetensors file (names, dtypes, shapes, offsets; no data)."""
    with file.open("rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        return json.loads(handle.read(length))


def checkpoint_tensors(path: Path) -> dict[str, TensorInfo]:
    """Every tensor of the model directory's weight files, in file and offset order."""
    tensors: dict[str, TensorInfo] = {}
    for file in weight_files(path):
        header = read_header(file)
        header.pop("__metadata__", None)
        for key, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            start, end = entry["data_offsets"]
            tensors[key] = TensorInfo(file.name, entry["dtype"], tuple(entry["shape"]), end - start)
    return tensors


def source_float_dtype(tensors: Mapping[str, TensorInfo]) -> str:
    """The float dtype most of the checkpoint's unquantized tensors are stored in."""
    counts: dict[str, int] = {}
    for key, info in tensors.items():
        if info.dtype in _SAFETENSORS_DTYPES and not _is_quant_part(key, tensors):
            counts[info.dtype] = counts.get(info.dtype, 0) + info.nbytes
    return _SAFETENSORS_DTYPES[max(counts, key=counts.get)] if counts else "float32"


def _is_quant_part(key: str, tensors: Mapping[str, TensorInfo]) -> bool:
    base, _, part = key.rpartition(".")
    packed = tensors.get(f"{base}.weight")
    return part in _QUANT_PARTS and packed is not None and packed.dtype not in _SAFETENSORS_DTYPES


# -- which checkpoint tensors each target is -------------------------------------------------


@dataclass(frozen=True)
class Quantization:
    """How a quantized matrix is packed."""

    group_size: int
    bits: int
    mode: str


@dataclass(frozen=True)
class EditUnit:
    """One matrix the export edits: a target projection, or one expert of a target whose
    checkpoint stores experts as separate tensors. Keys are ``<prefix>.<part>``."""

    layer: int
    component: str
    path: str  # the target's module path in the model
    prefix: str  # its checkpoint key prefix
    parts: tuple[str, ...]  # of "weight", "scales", "biases", "global_scale", "bias"
    quantization: Quantization | None
    expert: int | None = None

    def key(self, part: str) -> str:
        return f"{self.prefix}.{part}"

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(self.key(part) for part in self.parts)


def edit_units(targets: Sequence[Target], tensors: Mapping[str, TensorInfo]) -> tuple[EditUnit, ...]:
    """The checkpoint matrices behind every target: stored under the module's own path, under
    another prefix (e.g. ``model.language_model.`` for ``language_model.model.``), or one
    tensor per expert (``…experts.<E>.down_proj.weight`` for ``…switch_mlp.down_proj``)."""
    units: list[EditUnit] = []
    for target in targets:
        module = target.module
        quantization = (
            Quantization(module.group_size, module.bits, module.mode) if isinstance(module, QUANTIZED_TYPES) else None
        )
        shape = tuple(module["weight"].shape)
        prefix = _matching_prefix(target.path, tensors)
        if prefix is not None:
            units.append(_unit(target, prefix, quantization, shape, tensors))
            continue
        experts = _expert_prefixes(target.path, shape, tensors)
        if experts is None:
            raise UserError(
                f"cannot find the checkpoint tensors of {target.path} (layer {target.layer} {target.component}); "
                "export supports checkpoints that store it as-is or with one tensor per expert — "
                "convert the model with mlx_lm.convert first"
            )
        units += [_unit(target, p, quantization, shape[1:], tensors, expert=e) for e, p in enumerate(experts)]
    return tuple(units)


def _unit(
    target: Target,
    prefix: str,
    quantization: Quantization | None,
    shape: tuple[int, ...],
    tensors: Mapping[str, TensorInfo],
    expert: int | None = None,
) -> EditUnit:
    parts = ("weight",) + tuple(p for p in (*_QUANT_PARTS, "bias") if f"{prefix}.{p}" in tensors)
    stored = tensors[f"{prefix}.weight"].shape
    if stored != shape:
        raise UserError(
            f"checkpoint tensor {prefix}.weight has shape {list(stored)} but the model uses {list(shape)}; "
            "export needs a checkpoint that mlx-lm loads without reshaping (convert it with mlx_lm.convert first)"
        )
    if (quantization is not None) != ("scales" in parts):
        raise UserError(
            f"{prefix}.weight is {'quantized' if quantization else 'dense'} in the model but not in the checkpoint; "
            "export needs the checkpoint in the form mlx-lm runs it (convert it with mlx_lm.convert first)"
        )
    return EditUnit(target.layer, target.component, target.path, prefix, parts, quantization, expert)


def _local(path: str) -> str:
    index = path.find("layers.")
    return path[index:] if index >= 0 else path


def _unique(candidates: list[str]) -> str | None:
    if len(candidates) > 1:
        candidates = [c for c in candidates if not any(t in c for t in _EXCLUDED_TOWERS)]
    return candidates[0] if len(candidates) == 1 else None


def _matching_prefix(path: str, tensors: Mapping[str, TensorInfo]) -> str | None:
    if f"{path}.weight" in tensors:
        return path
    local = _local(path)
    return _unique([k[: -len(".weight")] for k in tensors if k == f"{local}.weight" or k.endswith(f".{local}.weight")])


def _expert_prefixes(path: str, shape: tuple[int, ...], tensors: Mapping[str, TensorInfo]) -> list[str] | None:
    if len(shape) != 3 or ".switch_mlp." not in path:
        return None
    head, projection = _local(path).split(".switch_mlp.")
    for name in _EXPERT_ALIASES.get(projection, (projection,)):
        pattern = re.compile(rf"(?:(.*)\.)?{re.escape(head)}\.experts\.(\d+)\.{re.escape(name)}\.weight")
        found: dict[str, dict[int, str]] = {}
        for key in tensors:
            match = pattern.fullmatch(key)
            if match:
                found.setdefault(match.group(1) or "", {})[int(match.group(2))] = key[: -len(".weight")]
        outer = _unique(list(found))
        if outer is not None and sorted(found[outer]) == list(range(shape[0])):
            return [found[outer][e] for e in range(shape[0])]
    return None


# -- the edit ----------------------------------------------------------------------------------


def _scale(unit: EditUnit, layer_weights: Mapping[str, Sequence[float] | np.ndarray]) -> float:
    weights = layer_weights.get(unit.component)
    return 0.0 if weights is None else float(weights[unit.layer])


def _direction(direction: np.ndarray, layer: int) -> np.ndarray:
    return direction[layer] if direction.ndim == 2 else direction


def stored_dtype(unit: EditUnit, tensors: Mapping[str, TensorInfo], options: ExportOptions) -> str | None:
    """The float dtype an edited matrix is written in; None when it is re-quantized."""
    if unit.quantization is not None:
        return None if options.quantize == "keep" else options.dtype or source_float_dtype(tensors)
    return options.dtype or _SAFETENSORS_DTYPES.get(tensors[unit.key("weight")].dtype, "float32")


def export_tier(
    units: Sequence[EditUnit],
    layer_weights: Mapping[str, Sequence[float] | np.ndarray],
    tensors: Mapping[str, TensorInfo],
    options: ExportOptions,
    compute_dtype: str,
) -> str:
    """Which row of :data:`TOLERANCES` applies to this export, compared in ``compute_dtype``."""
    edited = [u for u in units if _scale(u, layer_weights) != 0.0]
    stored = {stored_dtype(u, tensors, options) for u in edited} | ({options.dtype} if options.dtype else set())
    if None in stored:
        return "requantized"
    return "exact" if compute_dtype == "float32" and stored <= {"float32"} else "float"


def edited_tensors(
    source: Mapping[str, mx.array],
    quantization: Quantization | None,
    scale: float,
    direction: np.ndarray | mx.array,
    *,
    weight_dtype: mx.Dtype | None,
    bias_dtype: mx.Dtype | None = None,
) -> dict[str, mx.array | None]:
    """New arrays for one matrix's parts (``source``: part → array as stored); None drops a part.

    The weight is stored dense in ``weight_dtype``, or, when that is None and the matrix is
    quantized, re-quantized to its own packing (from the scales' dtype, as mlx-lm quantizes).
    The bias, if any, gets the same edit and is stored in ``bias_dtype`` (default: its own).
    """
    out: dict[str, mx.array | None] = {}
    if quantization is None:
        edited = ablate_matrix(source["weight"].astype(mx.float32), direction, scale)
    else:
        q = quantization
        floats = {p: source[p].astype(mx.float32) for p in ("scales", "biases") if p in source and mx.issubdtype(source[p].dtype, mx.floating)}
        dense = dequantize_arrays(
            source["weight"],
            floats.get("scales", source["scales"]),
            floats.get("biases", source.get("biases")),
            group_size=q.group_size,
            bits=q.bits,
            mode=q.mode,
            global_scale=source.get("global_scale"),
        )
        edited = ablate_matrix(dense, direction, scale)
    if weight_dtype is not None:
        out["weight"] = edited.astype(weight_dtype)
        out.update({part: None for part in _QUANT_PARTS if part in source})
    elif quantization is None:
        raise ValueError("a dense matrix needs a weight_dtype")
    else:
        out.update(_requantized(edited, quantization, source["scales"].dtype, "global_scale" in source))
        if set(out) != set(source) - {"bias"}:
            raise RuntimeError(f"re-quantizing gave parts {sorted(out)}, the checkpoint has {sorted(source)}")
    if "bias" in source:
        bias = source["bias"]
        out["bias"] = ablate_bias(bias.astype(mx.float32), direction, scale).astype(bias_dtype or bias.dtype)
    return out


def _requantized(edited: mx.array, q: Quantization, scales_dtype: mx.Dtype, global_scale: bool) -> dict[str, mx.array]:
    # Affine scales take the input's dtype: quantize from the dtype the source's scales have.
    if mx.issubdtype(scales_dtype, mx.floating):
        edited = edited.astype(scales_dtype)
    return quantize_arrays(edited, group_size=q.group_size, bits=q.bits, mode=q.mode, global_scale=global_scale)


@dataclass(frozen=True)
class WriteResult:
    """What writing the weights did."""

    files: tuple[str, ...]  # weight files, in order
    copied_files: tuple[str, ...]  # of those, copied byte for byte (nothing edited in them)
    edited: tuple[str, ...]  # checkpoint keys rewritten with the edit
    dropped: tuple[str, ...]  # keys removed (scales/biases of matrices now stored dense)
    cast_to: str | None  # float dtype every other float tensor was cast to, if it changed
    total_size: int


def write_weights(
    source: Path,
    out: Path,
    units: Sequence[EditUnit],
    layer_weights: Mapping[str, Sequence[float] | np.ndarray],
    direction: np.ndarray,
    options: ExportOptions = ExportOptions(),
    *,
    log: Callable[[str], None] = lambda _: None,
) -> WriteResult:
    """Write the edited weight files of ``source`` into ``out``, shard by shard."""
    tensors = checkpoint_tensors(source)
    cast = EXPORT_DTYPES[options.dtype] if options.dtype and options.dtype != source_float_dtype(tensors) else None
    owner: dict[str, int] = {}  # key -> index of the edited unit it belongs to
    for index, unit in enumerate(units):
        if _scale(unit, layer_weights) != 0.0:
            owner.update(dict.fromkeys(unit.keys, index))
    lazy: dict[str, dict[str, mx.array]] = {}  # file -> its arrays, not read until evaluated

    def array(key: str) -> mx.array:
        file = tensors[key].file
        if file not in lazy:
            lazy[file] = mx.load(str(source / file))
        return lazy[file][key]

    def edit(unit: EditUnit) -> dict[str, mx.array | None]:
        weight_dtype = stored_dtype(unit, tensors, options)
        new = edited_tensors(
            {part: array(unit.key(part)) for part in unit.parts},
            unit.quantization,
            _scale(unit, layer_weights),
            _direction(direction, unit.layer),
            weight_dtype=EXPORT_DTYPES[weight_dtype] if weight_dtype else None,
            bias_dtype=EXPORT_DTYPES[options.dtype] if options.dtype else None,
        )
        mx.eval([a for a in new.values() if a is not None])
        return {unit.key(part): a for part, a in new.items()}

    pending: dict[int, dict[str, mx.array | None]] = {}  # edited parts not written yet
    edited, dropped, copied = [], [], []
    files = sorted({info.file for info in tensors.values()})
    for number, file in enumerate(files, start=1):
        keys = [k for k, info in tensors.items() if info.file == file]
        if cast is None and not any(k in owner for k in keys):
            shutil.copyfile(source / file, out / file)
            copied.append(file)
            log(f"weights {number}/{len(files)}: {file} copied (nothing to edit)")
            continue
        _, metadata = mx.load(str(source / file), return_metadata=True)
        written: dict[str, mx.array] = {}
        for key in keys:
            if key not in owner:
                value = array(key)
                if cast is not None and mx.issubdtype(value.dtype, mx.floating) and not _is_quant_part(key, tensors):
                    value = value.astype(cast)
                written[key] = value
                continue
            index = owner[key]
            if index not in pending:
                pending[index] = edit(units[index])
            value = pending[index].pop(key)
            if not pending[index]:
                del pending[index]
            if value is None:
                dropped.append(key)
            else:
                edited.append(key)
                written[key] = value
        _save(out / file, written, metadata)
        del written
        lazy.pop(file, None)  # drop the arrays the save just read
        log(f"weights {number}/{len(files)}: {file} written ({sum(k in owner for k in keys)} tensors edited)")
    _write_index(source, out, set(dropped))
    return WriteResult(
        files=tuple(files),
        copied_files=tuple(copied),
        edited=tuple(edited),
        dropped=tuple(dropped),
        cast_to=options.dtype if cast is not None else None,
        total_size=sum(info.nbytes for info in checkpoint_tensors(out).values()),
    )


def _save(path: Path, arrays: dict[str, mx.array], metadata: dict[str, str]) -> None:
    try:
        mx.save_safetensors(str(path), arrays, metadata=metadata)
    except RuntimeError as error:  # mlx reports a failed write (disk full...) this way
        raise OSError(f"cannot write {path.name}: {error}") from None


def write_model(
    source: Path,
    out: Path,
    units: Sequence[EditUnit],
    layer_weights: Mapping[str, Sequence[float] | np.ndarray],
    direction: np.ndarray,
    options: ExportOptions = ExportOptions(),
    *,
    log: Callable[[str], None] = lambda _: None,
) -> WriteResult:
    """Write the edited model directory (weights, config, tokenizer files; no README) into ``out``."""
    result = write_weights(source, out, units, layer_weights, direction, options, log=log)
    copy_side_files(source, out)
    config = exported_config(json.loads((source / "config.json").read_text()), units, result)
    if config is None:
        shutil.copyfile(source / "config.json", out / "config.json")
    else:
        (out / "config.json").write_text(json.dumps(config, indent=4) + "\n")
    return result


def _write_index(source: Path, out: Path, dropped: set[str]) -> None:
    index_file = source / "model.safetensors.index.json"
    if not index_file.exists():
        return
    index = json.loads(index_file.read_text())
    index["weight_map"] = {k: v for k, v in index.get("weight_map", {}).items() if k not in dropped}
    index.setdefault("metadata", {})["total_size"] = sum(info.nbytes for info in checkpoint_tensors(out).values())
    (out / index_file.name).write_text(json.dumps(index, indent=4))


def copy_side_files(source: Path, out: Path) -> list[str]:
    """Copy the tokenizer, chat template and other non-weight files; returns their names."""
    copied = []
    for item in sorted(source.iterdir()):
        name = item.name
        skip = (
            name.startswith(".")
            or not item.is_file()
            or name.endswith(_WEIGHT_SUFFIXES)
            or name.endswith(".index.json")
            or name in ("config.json", "README.md")
        )
        if not skip:
            shutil.copyfile(item, out / name)  # follows symlinks (Hugging Face cache blobs)
            copied.append(name)
    return copied


def exported_config(config: dict, units: Sequence[EditUnit], result: WriteResult) -> dict | None:
    """The config.json the export needs, or None when the source's is right as it is."""
    changed = json.loads(json.dumps(config))
    dense_paths = {u.path for u in units if u.quantization is not None and u.key("scales") in result.dropped}
    for section in ("quantization", "quantization_config"):
        entry = changed.get(section)
        if isinstance(entry, dict):
            for path in dense_paths:
                entry.pop(path, None)  # a per-layer setting would re-quantize the dense matrix
    if result.cast_to is not None:
        for key in ("torch_dtype", "dtype"):
            if key in changed:
                changed[key] = result.cast_to
    return changed if changed != config else None


# -- verification ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reference:
    """Next-token logits the export is checked against, on the verification prompts."""

    prompts: tuple[str, ...]
    system_prompt: str
    dtype: str  # the compute dtype, which the export is loaded in too
    steered: np.ndarray  # the runtime-steered model: what the trial measured
    original: np.ndarray  # the untouched model
    baked: np.ndarray | None = None  # the trial baked in memory at the export's precision


@dataclass(frozen=True)
class Agreement:
    """How the exported model's next-token distributions compare with the references."""

    tier: str  # key of TOLERANCES
    compute_dtype: str
    prompts: int
    relative: float  # max|Δlogit| / max|logit| against the runtime-steered model
    bake_relative: float | None  # the same against the in-memory bake (float/requantized tiers)
    mean_kl: float  # KL(runtime-steered ‖ exported), mean over the prompts
    max_kl: float
    top1_agree: int  # prompts whose most likely next token is the runtime-steered model's
    effect_kl: float  # KL(runtime-steered ‖ original), mean: what the trial changes

    @property
    def kl_limit(self) -> float:
        limits = TOLERANCES[self.tier]
        return max(limits["kl_floor"], limits["kl_of_effect"] * self.effect_kl) if self.tier != "exact" else 0.0

    @property
    def file_ok(self) -> bool:
        """The files hold exactly the edit abopt meant to write."""
        if self.tier == "exact":
            return self.relative <= TOLERANCES["exact"]["relative"]
        return self.bake_relative is not None and self.bake_relative <= self.bake_limit

    @property
    def bake_limit(self) -> float:
        return BAKE_RELATIVE.get(self.compute_dtype, BAKE_RELATIVE["bfloat16"])

    @property
    def passed(self) -> bool:
        return self.file_ok and (self.tier == "exact" or self.mean_kl <= self.kl_limit)

    def describe(self) -> str:
        limits = TOLERANCES[self.tier]
        if self.tier == "exact":
            parts = [f"max relative logit error {self.relative:.1e} (limit {limits['relative']:.0e})"]
        else:
            bake = "n/a" if self.bake_relative is None else f"{self.bake_relative:.1e}"
            parts = [
                f"equals the in-memory bake to {bake} (limit {self.bake_limit:.0e})",
                f"KL to the runtime-steered model {self.mean_kl:.1e} (limit {self.kl_limit:.1e})",
            ]
        parts.append(f"top-1 token agrees on {self.top1_agree}/{self.prompts}")
        return f"{self.tier} tier, {self.prompts} prompts: " + ", ".join(parts) + f"; the trial's own effect is KL {self.effect_kl:.3g}"


class VerificationFailed(UserError):
    """The exported model does not compute what the trial does."""

    def __init__(self, agreement: Agreement) -> None:
        self.agreement = agreement
        if agreement.file_ok:
            advice = "the edit itself is lost in the rounding; export with --quantize none (or --dtype float32)"
        else:
            advice = "please report this as an abopt bug"
        super().__init__(
            f"export verification failed: the exported model disagrees with the trial's runtime steering "
            f"({agreement.describe()}); nothing was written to OUT_DIR — {advice}"
        )


def verification_prompts(plan: StudyPlan) -> list[str]:
    """The first few harmful and harmless eval prompts."""
    return list(plan.prompts.harmful_eval[:VERIFY_PROMPTS]) + list(plan.prompts.harmless_eval[:VERIFY_PROMPTS])


def next_token_logits(loaded: LoadedModel, prompts: Sequence[str], system_prompt: str = "") -> np.ndarray:
    """Float32 logits of the first response token for each prompt: (N, vocab)."""
    encoded = [chat_tokens(loaded.tokenizer, p, system_prompt) for p in prompts]
    tokens, padding = pad_left(encoded, loaded.tokenizer.pad_token_id or 0)
    with last_positions_only(loaded.model, 1):
        logits = forward(loaded.model, tokens, padding)[:, -1, :].astype(mx.float32)
    mx.eval(logits)
    return np.array(logits)


def reference_logits(
    loaded: LoadedModel,
    steering: Steering,
    layer_weights: Mapping[str, Sequence[float] | np.ndarray],
    direction: np.ndarray,
    units: Sequence[EditUnit],
    tensors: Mapping[str, TensorInfo],
    options: ExportOptions,
    prompts: Sequence[str],
    system_prompt: str = "",
) -> Reference:
    """Untouched, runtime-steered and (unless the tier is exact) in-memory baked logits.

    ``steering`` is installed on ``loaded``. Baking removes it and changes the weights in
    place: use the model for nothing else afterwards.
    """
    steering.clear()
    original = next_token_logits(loaded, prompts, system_prompt)
    steering.set(layer_weights, direction)
    steered = next_token_logits(loaded, prompts, system_prompt)
    baked = None
    if export_tier(units, layer_weights, tensors, options, loaded.dtype) != "exact":
        steering.remove()
        bake_as_exported(loaded, units, layer_weights, direction, tensors, options)
        baked = next_token_logits(loaded, prompts, system_prompt)
    return Reference(tuple(prompts), system_prompt, loaded.dtype, steered, original, baked)


def bake_as_exported(
    loaded: LoadedModel,
    units: Sequence[EditUnit],
    layer_weights: Mapping[str, Sequence[float] | np.ndarray],
    direction: np.ndarray,
    tensors: Mapping[str, TensorInfo],
    options: ExportOptions,
) -> None:
    """Bake the edit into the loaded (unhooked) model in place, rounded as the export stores it.

    Works on the model's modules (expert stacks whole, whatever the checkpoint layout), so
    it shares only the arithmetic with :func:`write_weights`, not the key mapping or I/O.
    """
    compute = getattr(mx, loaded.dtype)
    first_unit = {}
    for unit in units:
        first_unit.setdefault(unit.path, unit)
    for target in loaded.targets:
        unit = first_unit[target.path]
        scale = _scale(unit, layer_weights)
        if scale == 0.0:
            continue
        module, r = target.module, _direction(direction, target.layer)
        storage = stored_dtype(unit, tensors, options)
        if storage is None:  # re-quantized in place
            scales = _SAFETENSORS_DTYPES.get(tensors[unit.key("scales")].dtype)
            q = unit.quantization
            global_scale = getattr(module, "global_scale", None)
            dense = dequantize_arrays(
                module["weight"],
                module["scales"].astype(mx.float32) if mx.issubdtype(module["scales"].dtype, mx.floating) else module["scales"],
                module["biases"].astype(mx.float32) if "biases" in module and module["biases"] is not None else None,
                group_size=q.group_size,
                bits=q.bits,
                mode=q.mode,
                global_scale=global_scale,
            )
            new = _requantized(ablate_matrix(dense, r, scale), q, EXPORT_DTYPES[scales] if scales else mx.uint8, global_scale is not None)
            for part, value in new.items():
                current = module[part] if part in module else getattr(module, part, None)
                floating = current is not None and mx.issubdtype(current.dtype, mx.floating)
                setattr(module, part, value.astype(current.dtype) if floating else value)
            if "bias" in module:
                stored = options.dtype or _SAFETENSORS_DTYPES[tensors[unit.key("bias")].dtype]
                module.bias = ablate_bias(module["bias"], r, scale).astype(EXPORT_DTYPES[stored]).astype(compute)
        else:
            if isinstance(module, QUANTIZED_TYPES):  # dequantize from float32 scales, as the export does
                for part in ("scales", "biases"):
                    if part in module and module[part] is not None and mx.issubdtype(module[part].dtype, mx.floating):
                        setattr(module, part, module[part].astype(mx.float32))
            (baked,) = bake_into(loaded.model, [target], layer_weights, direction, dtype=EXPORT_DTYPES[storage])
            module = baked.module
            module.weight = module.weight.astype(compute)  # as loading the export does
            if "bias" in module:
                module.bias = module.bias.astype(compute)
        mx.eval(module.parameters())
    if options.dtype and options.dtype != source_float_dtype(tensors):
        _round_floats(loaded.model, EXPORT_DTYPES[options.dtype], compute)


def _round_floats(model, storage: mx.Dtype, compute: mx.Dtype) -> None:
    """Round every float weight (not quantization scales) to ``storage``, as the export stores it."""
    for _, module in model.named_modules():
        quantized = "scales" in module  # QuantizedLinear, QuantizedEmbedding, expert stacks...
        for name, value in list(module.items()):
            if isinstance(value, mx.array) and mx.issubdtype(value.dtype, mx.floating) and not (quantized and name in _QUANT_PARTS):
                setattr(module, name, value.astype(storage).astype(compute))
                mx.eval(module[name])


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    top = logits.max(axis=-1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(axis=-1, keepdims=True))


def _kl(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    p, q = _log_softmax(p_logits), _log_softmax(q_logits)
    return np.maximum((np.exp(p) * (p - q)).sum(axis=-1), 0.0)


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def compare(reference: Reference, exported: np.ndarray, tier: str) -> Agreement:
    """Agreement of the exported model's logits (N, vocab) with ``reference`` at ``tier``."""
    kl = _kl(reference.steered, exported)
    return Agreement(
        tier=tier,
        compute_dtype=reference.dtype,
        prompts=len(exported),
        relative=_relative(exported, reference.steered),
        bake_relative=None if reference.baked is None else _relative(exported, reference.baked),
        mean_kl=float(kl.mean()),
        max_kl=float(kl.max()),
        top1_agree=int((reference.steered.argmax(axis=-1) == exported.argmax(axis=-1)).sum()),
        effect_kl=float(_kl(reference.steered, reference.original).mean()),
    )


def verify(directory: Path, reference: Reference, tier: str, dtype: str = "auto") -> Agreement:
    """Load the exported model from ``directory`` in ``dtype`` and compare it with ``reference``."""
    loaded = load_model(str(directory), dtype=dtype)
    exported = next_token_logits(loaded, reference.prompts, reference.system_prompt)
    del loaded
    gc.collect()
    mx.clear_cache()
    return compare(reference, exported, tier)


# -- the command -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote and how well it matched."""

    out_dir: Path
    trial: int
    source: Path
    write: WriteResult = field(repr=False)
    agreement: Agreement
    seconds: dict[str, float]  # per phase: reference, write, verify
    peak_memory: dict[str, int]  # MLX's peak allocation per phase, bytes


def check_options(options: ExportOptions) -> None:
    """Refuse option values the CLI would not pass."""
    if options.dtype is not None and options.dtype not in EXPORT_DTYPES:
        raise UserError(f"--dtype {options.dtype!r} is not one of {', '.join(EXPORT_DTYPES)}")
    if options.quantize not in QUANTIZE_CHOICES:
        raise UserError(f"--quantize {options.quantize!r} is not one of {', '.join(QUANTIZE_CHOICES)}")


def check_out_dir(out: Path, source: Path, force: bool) -> None:
    """Refuse an OUT_DIR that exists (without ``force``), is a file, or overlaps the source model."""
    real = out.resolve()
    if real == source or real in source.parents or source in real.parents:
        raise UserError(f"OUT_DIR {out} overlaps the source model directory {source}; choose a directory outside it")
    if out.exists() or out.is_symlink():
        if not out.is_dir() or out.is_symlink():
            raise UserError(f"OUT_DIR {out} exists and is not a directory; choose another path")
        if not force:
            raise UserError(f"OUT_DIR {out} already exists; choose another directory or pass --force to replace it")
    if not out.parent.is_dir():
        raise UserError(f"the parent directory of OUT_DIR, {out.parent}, does not exist; create it first")


def export_trial(
    plan: StudyPlan,
    study: optuna.Study,
    number: int,
    out_dir: str | Path,
    options: ExportOptions = ExportOptions(),
    *,
    log: Callable[[str], None] = lambda _: None,
) -> ExportResult:
    """Bake trial ``number``'s steering into a copy of the study's model at ``out_dir``, verified."""
    check_options(options)
    out = Path(out_dir).expanduser().absolute()
    source = plan.model_path.resolve()
    check_out_dir(out, source, options.force)
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.abopt-export-", dir=out.parent))
        staging.chmod(0o777 & ~current_umask())  # mkdtemp makes it private; OUT_DIR gets the usual mode
    except OSError as error:
        raise UserError(f"cannot write in {out.parent} ({error.strerror or error}); choose a writable OUT_DIR") from None
    try:
        result = _export_into(plan, study, number, staging, out, options, log)
        _publish(staging, out)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(error, OSError):
            raise UserError(
                f"writing the export failed ({error.strerror or error}); nothing was written to {out} — "
                "free some disk space or choose another OUT_DIR"
            ) from None
        raise
    log(f"exported to {out}")
    return ExportResult(out, number, source, *result)


def _export_into(
    plan: StudyPlan,
    study: optuna.Study,
    number: int,
    staging: Path,
    out: Path,
    options: ExportOptions,
    log: Callable[[str], None],
) -> tuple[WriteResult, Agreement, dict[str, float], dict[str, int]]:
    seconds: dict[str, float] = {}
    peaks: dict[str, int] = {}
    start = time.perf_counter()
    mx.reset_peak_memory()
    log(f"loading {plan.config.model} with trial {number}'s steering")
    trial_model = load_trial_model(plan, study, number)
    tensors = checkpoint_tensors(plan.model_path)
    units = edit_units(trial_model.loaded.targets, tensors)
    weights, direction, trial, params = trial_model.weights, trial_model.direction, trial_model.trial, trial_model.params
    tier = export_tier(units, weights, tensors, options, trial_model.loaded.dtype)
    reference = reference_logits(
        trial_model.loaded,
        trial_model.steering,
        weights,
        direction,
        units,
        tensors,
        options,
        verification_prompts(plan),
        plan.config.prompts.system_prompt,
    )
    del trial_model  # the weights are streamed from disk from here on
    gc.collect()
    mx.clear_cache()
    seconds["reference"], peaks["reference"] = time.perf_counter() - start, mx.get_peak_memory()

    start = time.perf_counter()
    mx.reset_peak_memory()
    result = write_model(plan.model_path, staging, units, weights, direction, options, log=log)
    seconds["write"], peaks["write"] = time.perf_counter() - start, mx.get_peak_memory()

    start = time.perf_counter()
    mx.reset_peak_memory()
    log(f"verifying: reloading the export and comparing next-token logits on {len(reference.prompts)} prompts")
    agreement = verify(staging, reference, tier, plan.config.dtype)
    seconds["verify"], peaks["verify"] = time.perf_counter() - start, mx.get_peak_memory()
    if not agreement.passed:
        raise VerificationFailed(agreement)
    log(f"verified: {agreement.describe()}")
    card = model_card(plan, study, trial, params, weights, out, options, units, result, agreement)
    (staging / "README.md").write_text(card)
    return result, agreement, seconds, peaks


def _publish(staging: Path, out: Path) -> None:
    """Move the finished export to ``out``, replacing an existing directory only at the end."""
    if not out.exists():
        staging.rename(out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.abopt-replaced-", dir=out.parent))
    old.rmdir()
    out.rename(old)
    try:
        staging.rename(out)
    except BaseException:
        old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)


# -- the model card ------------------------------------------------------------------------


def model_card(
    plan: StudyPlan,
    study: optuna.Study,
    trial: optuna.trial.FrozenTrial,
    params,
    weights: Mapping[str, np.ndarray],
    out: Path,
    options: ExportOptions,
    units: Sequence[EditUnit],
    result: WriteResult,
    agreement: Agreement,
) -> str:
    """README.md of an exported model: source, study, trial, parameters, scores, verification."""
    config = plan.config
    kl, rate = trial.values
    refused, total = trial.user_attrs.get("refused"), trial.user_attrs.get("total")
    counts = f" ({refused}/{total} eval prompts)" if refused is not None else ""
    baseline = study.user_attrs.get("baseline")
    hub_id = config.model if config.model.count("/") == 1 and not Path(config.model).exists() else None
    front_matter = ["---", "library_name: mlx", "pipeline_tag: text-generation", "tags:", "- mlx", "- abliterated", "- abopt"]
    front_matter += [f"base_model: {hub_id}"] if hub_id else []
    n_layers = len(next(iter(weights.values()))) if weights else 0
    rows = [f"| {l} | " + " | ".join(f"{float(weights[c][l]):.4f}" for c in weights) + " |" for l in range(n_layers)]
    stored = {
        "requantized": "re-quantized to their original bits, group size and mode",
        "exact": "stored in float32",
        "float": f"stored in {options.dtype or 'the source dtype'}",
    }[agreement.tier]
    if result.dropped:
        stored = f"dequantized and stored dense ({options.dtype or 'the source float dtype'})"
    untouched = "the other tensors are " + (f"cast to {result.cast_to}" if result.cast_to else "byte-identical to the source")
    lines = [
        *front_matter,
        "---",
        f"# {out.name}",
        "",
        f"`{config.model}` with its refusal behaviour ablated: trial {trial.number} of the abopt study "
        f"`{study.study_name}`, baked into the weights.",
        "",
        "| | |",
        "|---|---|",
        f"| source model | `{config.model}` |",
        f"| study | `{study.study_name}` ({config.path.name}, storage `{redact(plan.storage_url)}`) |",
        f"| trial | {trial.number} |",
        f"| KL divergence on harmless prompts | {kl:.4g} |",
        f"| refusal rate on harmful prompts | {100 * rate:.1f}%{counts} |",
        *(
            [f"| refusal rate of the source model | {100 * baseline['refusal_rate']:.1f}% ({baseline['refused']}/{baseline['total']}) |"]
            if baseline
            else []
        ),
        f"| exported | {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC by abopt {__version__} |",
        "",
        "## Use",
        "",
        "```python",
        "from mlx_lm import load, generate",
        "",
        f'model, tokenizer = load("{out.name}")',
        'messages = [{"role": "user", "content": "Hello!"}]',
        "prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)",
        "print(generate(model, tokenizer, prompt=prompt, max_tokens=128))",
        "```",
        "",
        "## What was changed",
        "",
        "Each steered projection (attention output `attn`, MLP down projection `mlp`, every expert of a "
        "mixture of experts) with weight w along the refusal direction r̂ became W' = W − w·r̂(r̂ᵀW), and its "
        f"bias b' = b − w·r̂(r̂·b). {len(result.edited)} tensors were edited and {stored}; {untouched}.",
        "",
        "### Parameters",
        "",
        "```json",
        json.dumps(params.to_dict(), indent=2),
        "```",
        "",
        "### Per-layer weights",
        "",
        "| layer | " + " | ".join(weights) + " |",
        "|---|" + "---|" * len(weights),
        *rows,
        "",
        "## Verification",
        "",
        f"The export was loaded back with mlx-lm and its next-token logits on {agreement.prompts} eval prompts "
        f"(harmful and harmless) compared with the runtime-steered model's ({agreement.compute_dtype}): "
        f"{agreement.describe()}.",
        "",
    ]
    return "\n".join(lines)
