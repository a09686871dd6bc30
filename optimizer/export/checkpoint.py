"""A checkpoint as abopt reads it: its safetensors files, their tensors, and which of them
each steered projection is (per expert when a checkpoint stores experts separately)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from optimizer.engine.bake import QUANTIZED_TYPES
from optimizer.engine.model import Target
from optimizer.errors import UserError

QUANT_PARTS = ("scales", "biases", "global_scale")
SAFETENSORS_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx", ".npz", ".pkl")
# Names a checkpoint may give one expert's down projection when it stores experts separately.
_EXPERT_ALIASES = {"down_proj": ("down_proj", "w2"), "w2": ("w2", "down_proj")}
_EXCLUDED_TOWERS = ("vision", "visual", "audio")


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
        if info.dtype in SAFETENSORS_DTYPES and not is_quant_part(key, tensors):
            counts[info.dtype] = counts.get(info.dtype, 0) + info.nbytes
    return SAFETENSORS_DTYPES[max(counts, key=counts.get)] if counts else "float32"


def is_quant_part(key: str, tensors: Mapping[str, TensorInfo]) -> bool:
    base, _, part = key.rpartition(".")
    packed = tensors.get(f"{base}.weight")
    return part in QUANT_PARTS and packed is not None and packed.dtype not in SAFETENSORS_DTYPES



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
    parts = ("weight",) + tuple(p for p in (*QUANT_PARTS, "bias") if f"{prefix}.{p}" in tensors)
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


