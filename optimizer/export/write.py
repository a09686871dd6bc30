"""Writing an export: shard by shard, only edited tensors new, the rest copied as it was."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import mlx.core as mx
import numpy as np

from optimizer.export.checkpoint import (
    WEIGHT_SUFFIXES,
    EditUnit,
    checkpoint_tensors,
    is_quant_part,
    source_float_dtype,
)
from optimizer.export.edit import (
    EXPORT_DTYPES,
    ExportOptions,
    TargetEdits,
    as_edits,
    edited_tensors,
    stored_dtype,
    unit_scale,
)


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
    direction: np.ndarray | TargetEdits,
    options: ExportOptions = ExportOptions(),
    *,
    log: Callable[[str], None] = lambda _: None,
) -> WriteResult:
    """Write the edited weight files of ``source`` into ``out``, shard by shard.

    ``direction``: the trial's :class:`TargetEdits`, or a bare direction array (the original edit).
    """
    edits = as_edits(direction)
    tensors = checkpoint_tensors(source)
    cast = EXPORT_DTYPES[options.dtype] if options.dtype and options.dtype != source_float_dtype(tensors) else None
    owner: dict[str, int] = {}  # key -> index of the edited unit it belongs to
    for index, unit in enumerate(units):
        if unit_scale(unit, layer_weights) != 0.0:
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
            unit_scale(unit, layer_weights),
            edits.basis(unit.layer, unit.path),
            weight_dtype=EXPORT_DTYPES[weight_dtype] if weight_dtype else None,
            bias_dtype=EXPORT_DTYPES[options.dtype] if options.dtype else None,
            norm_preserving=edits.norm_preserving,
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
                if cast is not None and mx.issubdtype(value.dtype, mx.floating) and not is_quant_part(key, tensors):
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
    direction: np.ndarray | TargetEdits,
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
            or name.endswith(WEIGHT_SUFFIXES)
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


