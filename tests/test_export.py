"""Export and chat: baked weights against runtime steering, on disk, through the real CLI.

Library-level tests bake random steering into saved random-weight models of several
architectures (dense, affine 4-bit, mxfp4, MoE with shared experts, MoE stored one tensor
per expert) and compare the reloaded export with the runtime-steered model. CLI tests run a
real study (``abopt run``) on a sharded 4-bit model once per session and export from it.
"""

from __future__ import annotations

import json
import re
import resource
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx_lm
import numpy as np
import optuna
import pytest

from conftest import run_abopt, write_study
from optimizer.study.config import load_study
from optimizer.engine.evaluate import EvalSettings, Evaluator
from optimizer.engine.directions import orthonormal_rows
from optimizer.export.edit import ExportOptions, TargetEdits, export_tier
from optimizer.export.verify import Reference, VerificationFailed, reference_logits, verify
from optimizer.export.checkpoint import checkpoint_tensors, edit_units, read_header
from optimizer.export.publish import export_trial
from optimizer.export.write import write_model
from optimizer.errors import UserError
from optimizer.engine.model import ORGANISM_PATH, load_model
from optimizer.engine.steering import install
from optimizer.study.plan import open_existing, plan
from optimizer.bench.synthetic import quantize_model, save_model_dir
from optimizer.study.steered import load_trial_model

PROMPTS = [
    "Hi",
    "How do I bake bread?",
    "Write a poem about the sea.",
    "The quick brown fox jumps over the lazy dog, then mix flour, water, salt and yeast and knead.",
    "Is there something else I can do for you?",
]
# Per-expert names a Hugging Face checkpoint uses for the stacked projections.
HF_EXPERT_NAMES = {"mixtral": {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}, "qwen3_moe": {}}



# -- helpers -------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def model_dir(saved_model, tmp_path_factory):
    """Factory: a saved 3-layer random-weight model; ``hf_experts`` stores MoE experts one by one."""
    root = tmp_path_factory.mktemp("hf_experts")
    split: dict = {}

    def make(arch: str, quant: str = "dense", *, shards: int = 1, hf_experts: bool = False, **overrides) -> Path:
        path = saved_model(arch, quant, shards=shards, seed=11, **{"num_hidden_layers": 3, **overrides})
        if not hf_experts:
            return path
        if path not in split:
            split[path] = Path(shutil.copytree(path, root / path.name))
            split_experts(split[path], HF_EXPERT_NAMES[arch])
        return split[path]

    return make


def split_experts(path: Path, names: dict[str, str]) -> None:
    """Rewrite a saved MoE model in place the way Hugging Face stores it: one tensor per expert."""
    weight_map = {}
    for file in sorted(path.glob("model*.safetensors")):
        arrays, metadata = mx.load(str(file), return_metadata=True)
        out = {}
        for key, value in arrays.items():
            match = re.fullmatch(r"(.*)\.switch_mlp\.(\w+)\.(weight|scales|biases)", key)
            if match is None:
                out[key] = value
                continue
            prefix, projection, part = match.groups()
            for expert in range(value.shape[0]):
                out[f"{prefix}.experts.{expert}.{names.get(projection, projection)}.{part}"] = value[expert]
        mx.save_safetensors(str(file), out, metadata=metadata)
        weight_map.update(dict.fromkeys(out, file.name))
    index = json.loads((path / "model.safetensors.index.json").read_text())
    index["weight_map"] = dict(sorted(weight_map.items()))
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))


def unit_rows(n: int, d: int, seed: int = 0) -> np.ndarray:
    rows = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def profile(n_layers: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {c: rng.uniform(0.6, 1.4, n_layers) for c in ("attn", "mlp")}


@dataclass(frozen=True)
class Case:
    """A saved model, steering for it, and what export_trial would compare an export with."""

    path: Path
    weights: dict
    direction: np.ndarray
    options: ExportOptions
    units: tuple
    tier: str
    reference: Reference


def case(path: Path, weights, direction, options: ExportOptions = ExportOptions(), prompts=PROMPTS) -> Case:
    """Runtime-steered, untouched and (if the tier needs it) in-memory baked logits, as export_trial gets them."""
    loaded = load_model(str(path))
    tensors = checkpoint_tensors(path)
    units = edit_units(loaded.targets, tensors)
    tier = export_tier(units, weights, tensors, options, loaded.dtype)
    reference = reference_logits(loaded, install(loaded.targets), weights, direction, units, tensors, options, prompts)
    return Case(path, weights, direction, options, units, tier, reference)


def bake_to(c: Case, out: Path, direction=None):
    """Write the export of case ``c`` (optionally with another direction) into ``out``."""
    out.mkdir()
    return write_model(c.path, out, c.units, c.weights, c.direction if direction is None else direction, c.options)


def raw_bytes(directory: Path, key: str) -> bytes:
    """The stored bytes of one tensor, read straight from its safetensors file."""
    for file in sorted(directory.glob("model*.safetensors")):
        header = read_header(file)
        if key in header:
            start, end = header[key]["data_offsets"]
            with file.open("rb") as handle:
                length = int.from_bytes(handle.read(8), "little")
                handle.seek(8 + length + start)
                return handle.read(end - start)
    raise KeyError(key)


def steering_case(path: Path, scope: str = "per_layer", seed: int = 0):
    config = json.loads((path / "config.json").read_text())
    n_layers, hidden = config["num_hidden_layers"], config["hidden_size"]
    direction = unit_rows(n_layers, hidden, seed=seed)
    return profile(n_layers, seed=seed + 1), direction if scope == "per_layer" else direction[0]


# -- exactness: float exports ----------------------------------------------------------------

FLOAT_CASES = [
    ("llama", {}),
    ("llama", {"attention_bias": True, "mlp_bias": True}),  # biases are edited too
    ("qwen3_moe", {}),
    ("mixtral", {}),
    ("qwen2_moe", {}),  # shared experts
]


@pytest.mark.parametrize("scope", ["global", "per_layer"])
@pytest.mark.parametrize("arch, overrides", FLOAT_CASES, ids=lambda c: c if isinstance(c, str) else "-".join(c) or "plain")
def test_float_export_equals_runtime_steering(arch, overrides, scope, model_dir, tmp_path):
    path = model_dir(arch, shards=2, **overrides)
    c = case(path, *steering_case(path, scope))
    result = bake_to(c, tmp_path / "out")

    assert c.tier == "exact" and c.reference.baked is None
    agreement = verify(tmp_path / "out", c.reference, c.tier)
    assert agreement.passed and agreement.relative <= 1e-4, agreement
    assert agreement.effect_kl > 1e-4, "the steering must change the model for this test to mean anything"
    # Exactly the target tensors changed (weights and biases), nothing else.
    source, exported = checkpoint_tensors(path), checkpoint_tensors(tmp_path / "out")
    assert source.keys() == exported.keys()
    edited = {k for u in c.units for k in u.keys}
    assert set(result.edited) == edited and not result.dropped
    for key in source:
        same = raw_bytes(path, key) == raw_bytes(tmp_path / "out", key)
        assert same == (key not in edited), key
    if overrides:
        assert any(k.endswith(".bias") for k in edited)


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "qwen2_moe"])
def test_moe_export_edits_every_expert(arch, model_dir, tmp_path):
    path = model_dir(arch)
    c = case(path, *steering_case(path, "global", seed=4))
    bake_to(c, tmp_path / "out")
    before, after = mx.load(str(path / "model.safetensors")), mx.load(str(tmp_path / "out" / "model.safetensors"))
    r = mx.array(c.direction)
    stacks = [u for u in c.units if len(before[u.key("weight")].shape) == 3]
    assert len(stacks) == 3, "one expert stack per layer"
    for unit in stacks:
        w = float(c.weights[unit.component][unit.layer])
        old, new = before[unit.key("weight")], after[unit.key("weight")]
        for expert in range(old.shape[0]):
            # Every expert lost (w times) its component along r̂, and only that.
            assert mx.abs(new[expert] - old[expert]).max().item() > 1e-4
            assert mx.allclose(r @ new[expert], (1 - w) * (r @ old[expert]), atol=1e-5).item()
    if arch == "qwen2_moe":
        assert any("shared_expert.down_proj" in u.path for u in c.units)


@pytest.mark.parametrize("arch, quant", [("mixtral", "dense"), ("mixtral", "q4"), ("qwen3_moe", "dense")])
def test_export_of_a_checkpoint_with_one_tensor_per_expert(arch, quant, model_dir, tmp_path):
    path = model_dir(arch, quant, hf_experts=True)
    c = case(path, *steering_case(path, "per_layer", seed=2))
    bake_to(c, tmp_path / "out")
    experts = [u for u in c.units if u.expert is not None]
    assert len(experts) == 3 * 8 and all(".experts." in u.prefix for u in experts)
    # The export keeps the checkpoint's own layout: same keys, one tensor per expert.
    assert checkpoint_tensors(tmp_path / "out").keys() == checkpoint_tensors(path).keys()
    agreement = verify(tmp_path / "out", c.reference, c.tier)
    assert agreement.file_ok, agreement
    if quant == "dense":
        assert agreement.passed and agreement.relative <= 1e-4, agreement


@pytest.mark.parametrize(
    "arch, quant, hf_experts",
    [("llama", "dense", False), ("gemma3_text", "dense", False), ("qwen3_moe", "dense", True), ("qwen3_moe", "q4", False), ("gemma3_text", "q4", False)],
)
def test_every_edit_exports_what_it_steers(arch, quant, hf_experts, model_dir, tmp_path):
    """Three directions per layer, norm-preserving, through the post-norms: the written model
    is the runtime-steered one (dense, expert by expert, re-quantized)."""
    path = model_dir(arch, quant, hf_experts=hf_experts)
    loaded = load_model(str(path))
    weights, _ = steering_case(path, seed=8)
    rows = orthonormal_rows(np.random.default_rng(8).normal(size=(loaded.n_layers, 3, loaded.hidden_size)))
    edits = TargetEdits.of(loaded.targets, rows, norm_preserving=True, post_norm=True)
    assert bool(edits.bases) == (arch == "gemma3_text")
    c = case(path, weights, edits)
    bake_to(c, tmp_path / "out")
    agreement = verify(tmp_path / "out", c.reference, c.tier)
    assert agreement.passed, agreement
    assert agreement.effect_kl > 1e-4, "the steering must change the model for this test to mean anything"
    if c.tier == "exact":
        assert agreement.relative <= 1e-4, agreement
    else:
        assert agreement.bake_relative <= 1e-4, agreement


def test_a_study_searching_the_edits_shows_and_exports_them(model_dir, tmp_path):
    """A study on a 4-bit post-norm model whose space picks the new edits: each trial records
    its edit, `show` says it, and the export of a trial verifies."""
    from optimizer.study.config import BUNDLED_SEARCH_SPACES_DIR

    path = model_dir("gemma3_text", "q4")
    default = (BUNDLED_SEARCH_SPACES_DIR / "default.toml").read_text()
    edit_keys = ("direction_kind", "n_directions", "norm_preserving")
    kept = "\n".join(line for line in default.splitlines() if line.split("=")[0].strip() not in edit_keys)
    space = tmp_path / "space.toml"
    space.write_text('direction_kind = ["difference", "orthogonal"]\nn_directions = 2\nnorm_preserving = true\n' + kept)
    study_file = write_study(tmp_path, path, name="edits", n_trials=3, search_space=str(space), optimization={"n_startup_trials": 3})
    result = run_abopt("run", study_file, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    _, study = open_study(study_file)
    trial = best_trial(study)
    ablation = trial.user_attrs["ablation"]
    assert (ablation["n_directions"], ablation["norm_preserving"], ablation["post_norm"]) == (2, True, True)
    shown = run_abopt("show", study_file, trial.number, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert f"{ablation['direction_kind']} ×2, norm-preserving, post-norm" in shown.stdout
    exported = run_abopt("export", study_file, trial.number, tmp_path / "out", cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    assert "verified: requantized tier" in exported.stdout


# -- quantized exports ---------------------------------------------------------------------------


@pytest.mark.parametrize("arch, quant", [("llama", "q4"), ("qwen3_moe", "q4"), ("qwen2_moe", "q4"), ("qwen3_moe", "mxfp4")])
def test_requantized_export_keeps_packing_and_untouched_bytes(arch, quant, model_dir, tmp_path):
    path = model_dir(arch, quant, shards=3, hidden_size=128)
    c = case(path, *steering_case(path, "per_layer", seed=6))
    result = bake_to(c, tmp_path / "out")

    assert c.tier == "requantized"
    agreement = verify(tmp_path / "out", c.reference, c.tier)
    print(f"\n{arch} {quant}: {agreement.describe()}")
    assert agreement.file_ok and agreement.bake_relative <= 1e-4, agreement
    source, exported = checkpoint_tensors(path), checkpoint_tensors(tmp_path / "out")
    assert source.keys() == exported.keys()
    edited = {k for u in c.units for k in u.keys}
    for key, info in source.items():
        assert exported[key].dtype == info.dtype and exported[key].shape == info.shape, key
        if key not in edited:  # 4-bit (and every other) untouched tensor: byte-identical
            assert raw_bytes(path, key) == raw_bytes(tmp_path / "out", key), key
    assert any(source[k].dtype == "U32" for k in source if k not in edited)
    assert (tmp_path / "out" / "config.json").read_bytes() == (path / "config.json").read_bytes()
    # Shards are preserved; a shard without edits is copied byte for byte.
    assert result.files == tuple(sorted(p.name for p in path.glob("model*.safetensors")))
    for name in result.copied_files:
        assert (path / name).read_bytes() == (tmp_path / "out" / name).read_bytes()
    model, tokenizer = mlx_lm.load(str(tmp_path / "out"))
    assert isinstance(mlx_lm.generate(model, tokenizer, prompt="Hi", max_tokens=4), str)


def test_quantize_none_stores_edited_matrices_dense(model_dir, tmp_path):
    path = model_dir("llama", "q4", shards=2)
    c = case(path, *steering_case(path, "global", seed=8), ExportOptions(quantize="none"))
    bake_to(c, tmp_path / "out")
    exported = checkpoint_tensors(tmp_path / "out")
    for unit in c.units:
        assert exported[unit.key("weight")].dtype == "F32" and unit.key("scales") not in exported
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert index["weight_map"].keys() == exported.keys()
    # Dense float32 edits, compared in float32: the exact tier holds even for a 4-bit source.
    assert c.tier == "exact"
    agreement = verify(tmp_path / "out", c.reference, c.tier)
    assert agreement.passed, agreement
    loaded = load_model(str(tmp_path / "out"))
    assert all(type(t.module).__name__ == "Linear" for t in loaded.targets)
    assert type(loaded.model.model.layers[0].self_attn.q_proj).__name__ == "QuantizedLinear"


@pytest.mark.parametrize("quant", ["dense", "q4"])
def test_dtype_option_rounds_float_tensors(quant, model_dir, tmp_path):
    path = model_dir("llama", quant)
    c = case(path, *steering_case(path, "per_layer", seed=9), ExportOptions(dtype="bfloat16", quantize="none"))
    bake_to(c, tmp_path / "out")
    dtypes = {info.dtype for key, info in checkpoint_tensors(tmp_path / "out").items() if not key.endswith((".scales", ".biases"))}
    assert dtypes == ({"BF16"} if quant == "dense" else {"BF16", "U32"})
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert c.tier == "float"
    agreement = verify(tmp_path / "out", c.reference, c.tier)
    print(f"\nbfloat16 {quant}: {agreement.describe()}")
    assert agreement.passed and agreement.bake_relative <= 1e-4, agreement


# -- the check fails on wrong exports -----------------------------------------------------------


def _undo_one_edit(c: Case, out: Path) -> None:
    """Put layer 1's MLP down projection back as it was in the source (one corrupted tensor)."""
    for part in ("weight", "scales", "biases"):
        key = next(u.key(part) for u in c.units if u.layer == 1 and u.component == "mlp")
        if key not in checkpoint_tensors(c.path):
            continue
        file = out / checkpoint_tensors(out)[key].file
        arrays, metadata = mx.load(str(file), return_metadata=True)
        arrays[key] = mx.load(str(c.path / checkpoint_tensors(c.path)[key].file))[key]
        mx.save_safetensors(str(file), arrays, metadata=metadata)


@pytest.mark.parametrize("quant", ["dense", "q4"])
def test_verification_fails_on_a_corrupted_tensor(quant, model_dir, tmp_path):
    path = model_dir("llama", quant, shards=2, hidden_size=128)
    c = case(path, *steering_case(path, "per_layer", seed=3))
    bake_to(c, tmp_path / "out")
    assert verify(tmp_path / "out", c.reference, c.tier).file_ok
    _undo_one_edit(c, tmp_path / "out")
    agreement = verify(tmp_path / "out", c.reference, c.tier)
    print(f"\none matrix unedited ({quant}): {agreement.describe()}")
    assert not agreement.passed and not agreement.file_ok, agreement
    message = str(VerificationFailed(agreement))
    assert message.startswith("export verification failed") and "abopt bug" in message and "\n" not in message


@pytest.mark.parametrize("quant", ["dense", "q4"])
def test_verification_fails_on_a_wrong_direction(quant, model_dir, tmp_path):
    path = model_dir("llama", quant, hidden_size=128)
    weights, direction = steering_case(path, "per_layer", seed=5)
    c = case(path, weights, direction)
    # Another layer's direction for every layer: plausible, but not the trial's.
    bake_to(c, tmp_path / "out", direction=np.roll(direction, 1, axis=0))
    agreement = verify(tmp_path / "out", c.reference, c.tier)
    print(f"\nwrong direction ({quant}): {agreement.describe()}")
    assert not agreement.passed and not agreement.file_ok, agreement


# -- the memory an export needs ---------------------------------------------------------------


def test_writing_holds_about_one_shard_and_one_tensor(model_dir, tmp_path):
    path = model_dir("llama", "dense", shards=4, hidden_size=256, num_hidden_layers=4, vocab_size=2048)
    weights, direction = steering_case(path, "per_layer", seed=1)
    loaded = load_model(str(path))
    units = edit_units(loaded.targets, checkpoint_tensors(path))
    del loaded
    tensors = checkpoint_tensors(path)
    shard_sizes: dict[str, int] = {}
    for info in tensors.values():
        shard_sizes[info.file] = shard_sizes.get(info.file, 0) + info.nbytes
    largest_tensor = max(info.nbytes for info in tensors.values())
    (tmp_path / "out").mkdir()
    mx.clear_cache()
    mx.reset_peak_memory()
    start = mx.get_active_memory()
    write_model(path, tmp_path / "out", units, weights, direction)
    peak = mx.get_peak_memory() - start
    total = sum(shard_sizes.values())
    print(f"\nwrite peak {peak / 1e6:.1f} MB; largest shard {max(shard_sizes.values()) / 1e6:.1f} MB of {total / 1e6:.1f} MB")
    assert peak <= max(shard_sizes.values()) + 3 * largest_tensor
    assert peak < total


# -- the command line, on a real study --------------------------------------------------------


@pytest.fixture(scope="session")
def q4_study(tmp_path_factory, model_dir):
    """A 4-trial study on a 3-shard 4-bit llama, run with `abopt run`."""
    root = tmp_path_factory.mktemp("export_study")
    path = model_dir("llama", "q4", shards=3, num_hidden_layers=4, hidden_size=128, vocab_size=512)
    study_file = write_study(root, path, name="q4", n_trials=4, optimization={"n_startup_trials": 2})
    result = run_abopt("run", study_file, cwd=root)
    assert result.returncode == 0, result.stderr
    return study_file


def open_study(study_file: Path | tuple[Path, str]):
    """The plan and study of a study file, or of (study file, storage URL)."""
    study_file, storage = study_file if isinstance(study_file, tuple) else (study_file, None)
    config = load_study(study_file)
    study_plan = plan(config, storage or config.storage_url)
    return study_plan, open_existing(study_plan)


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial:
    return min(study.best_trials, key=lambda t: (t.values[1], t.values[0]))


@pytest.mark.slow
def test_cli_export_writes_a_verified_model_directory(q4_study, tmp_path):
    study_plan, study = open_study(q4_study)
    trial = best_trial(study)
    out = tmp_path / "exported"
    result = run_abopt("export", q4_study, trial.number, out, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"trial {trial.number} exported to {out}" in result.stdout
    assert "verified: requantized tier" in result.stdout
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "README.md", "model.safetensors.index.json"} <= names
    assert {p.name for p in study_plan.model_path.glob("model*.safetensors")} <= names
    assert "chat_template" in (out / "tokenizer_config.json").read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no staging directory left behind"
    # The model card records where it came from.
    card = (out / "README.md").read_text()
    for needed in (str(study_plan.model_path), "`q4`", f"| trial | {trial.number} |", "abopt ", "## Verification", "max_weight"):
        assert needed in card, needed
    # mlx-lm opens and runs it.
    model, tokenizer = mlx_lm.load(str(out))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert isinstance(mlx_lm.generate(model, tokenizer, prompt=prompt, max_tokens=8), str)
    # Its refusal rate on the eval prompts is the trial's, within one prompt.
    e = study_plan.config.evaluation
    exported = load_model(str(out))
    evaluator = Evaluator(
        exported,
        study_plan.prompts.harmful_eval,
        study_plan.prompts.harmless_eval,
        study_plan.markers,
        EvalSettings(e.max_new_tokens, e.kl_tokens, e.batch_size),
    )
    assert abs(evaluator.refusals().refused - trial.user_attrs["refused"]) <= 1


@pytest.mark.slow
def test_cli_export_float_of_a_quantized_study_is_exact(q4_study, tmp_path):
    _, study = open_study(q4_study)
    number = best_trial(study).number
    result = run_abopt("export", q4_study, number, tmp_path / "dense", "--quantize", "none", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "verified: exact tier" in result.stdout


@pytest.mark.slow
def test_cli_export_refuses_an_existing_out_dir(q4_study, tmp_path):
    _, study = open_study(q4_study)
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    before = sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir())
    result = run_abopt("export", q4_study, best_trial(study).number, out, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == f"abopt: error: OUT_DIR {out} already exists; choose another directory or pass --force to replace it"
    assert sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir()) == before
    assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.slow
def test_cli_export_force_replaces_an_existing_out_dir(q4_study, tmp_path):
    _, study = open_study(q4_study)
    out = tmp_path / "taken"
    out.mkdir()
    (out / "old.txt").write_text("old")
    result = run_abopt("export", q4_study, best_trial(study).number, out, "--force", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert not (out / "old.txt").exists() and (out / "README.md").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]


def _file_size_limit(limit: int):
    def limit_file_size() -> None:
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a too-large write then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return limit_file_size


@pytest.mark.slow
@pytest.mark.parametrize("where", ["first file", "second shard"])
def test_a_failed_write_leaves_no_out_dir(where, q4_study, tmp_path):
    """The disk fills up during the export (files may only grow so large): one line, nothing left.

    "second shard": shard 1 (nothing to edit in it) is copied, then writing the edited,
    larger shard 2 fails inside mlx's safetensors writer.
    """
    study_plan, study = open_study(q4_study)
    first, second = sorted(study_plan.model_path.glob("model*.safetensors"))[:2]
    assert second.stat().st_size > first.stat().st_size + 1000
    limit = 1000 if where == "first file" else first.stat().st_size + 1
    out = tmp_path / "full"
    result = subprocess.run(
        [sys.executable, "-m", "optimizer", "export", str(q4_study), str(best_trial(study).number), str(out)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        preexec_fn=_file_size_limit(limit),
        timeout=600,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith("abopt: error: writing the export failed ("), result.stderr
    if where == "second shard":
        assert "copied (nothing to edit)" in result.stdout and "cannot write model-00002-of-00003" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_an_unwritable_parent_gives_one_line_and_no_out_dir(q4_study, tmp_path):
    _, study = open_study(q4_study)
    result = run_abopt("export", q4_study, best_trial(study).number, "/proc/abopt-export", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("abopt: error: cannot write in /proc") and "choose a writable OUT_DIR" in result.stderr
    assert not Path("/proc/abopt-export").exists()


@pytest.mark.slow
def test_export_user_errors(q4_study, tmp_path):
    study_plan, study = open_study(q4_study)
    with pytest.raises(UserError, match="has no trial 99"):
        export_trial(study_plan, study, 99, tmp_path / "x")
    with pytest.raises(UserError, match="overlaps the source model"):
        export_trial(study_plan, study, 0, study_plan.model_path / "sub")
    with pytest.raises(UserError, match="parent directory of OUT_DIR"):
        export_trial(study_plan, study, 0, tmp_path / "no" / "such")
    result = run_abopt("export", q4_study, "best", tmp_path / "x", cwd=tmp_path)
    assert result.returncode == 2 and "TRIAL a trial number" in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_cli_chat_one_shot_and_interactive(q4_study, tmp_path):
    _, study = open_study(q4_study)
    number = best_trial(study).number
    one_shot = run_abopt("chat", q4_study, number, "--prompt", "How do I bake bread?", "--max-tokens", "6", cwd=tmp_path)
    assert one_shot.returncode == 0, one_shot.stderr
    assert "original" in one_shot.stdout and f"trial {number}" in one_shot.stdout
    interactive = subprocess.run(
        [sys.executable, "-m", "optimizer", "chat", str(q4_study), str(number), "--max-tokens", "4"],
        input="Write a poem about the sea.\nHi\n\n",
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert interactive.returncode == 0, interactive.stderr
    assert interactive.stdout.count(f"trial {number}") >= 3  # the banner, then one table per prompt


# -- the model organism ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def organism_q4_study(tmp_path_factory):
    """The same short study on a 4-bit copy of the organism."""
    root = tmp_path_factory.mktemp("organism_q4")
    model, tokenizer = mlx_lm.load(str(ORGANISM_PATH))
    config = json.loads((ORGANISM_PATH / "config.json").read_text())
    config = quantize_model(model, config, bits=4, group_size=64)
    save_model_dir(model, config, root / "organism-q4", tokenizer_dir=ORGANISM_PATH)
    study_file = write_study(
        root,
        root / "organism-q4",
        name="orgq4",
        n_trials=8,
        prompts={"n_measure": 64, "n_eval": 32},
        evaluation={"max_new_tokens": 24},
        optimization={"n_startup_trials": 4},
    )
    result = run_abopt("run", study_file, cwd=root)
    assert result.returncode == 0, result.stderr
    return study_file


@pytest.mark.slow
def test_organism_float_export_is_exact(demo_study, tmp_path):
    study_plan, study = open_study(demo_study)
    trial = best_trial(study)
    result = export_trial(study_plan, study, trial.number, tmp_path / "out", ExportOptions(dtype="float32"))
    print(f"\norganism trial {trial.number}: {result.agreement.describe()}")
    assert result.agreement.tier == "exact" and result.agreement.relative <= 1e-4, result.agreement
    assert result.agreement.effect_kl > 1e-3, "the trial must change the model for this test to mean anything"
    model, tokenizer = mlx_lm.load(str(tmp_path / "out"))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": study_plan.prompts.harmful_eval[0]}], add_generation_prompt=True)
    assert mlx_lm.generate(model, tokenizer, prompt=prompt, max_tokens=16)


@pytest.mark.slow
def test_organism_requantized_export_refuses_like_the_trial(organism_q4_study, tmp_path):
    study_plan, study = open_study(organism_q4_study)
    trial = best_trial(study)
    result = export_trial(study_plan, study, trial.number, tmp_path / "out")
    agreement = result.agreement
    assert agreement.tier == "requantized" and agreement.passed, agreement
    e = study_plan.config.evaluation
    exported = load_model(str(tmp_path / "out"))
    settings = EvalSettings(e.max_new_tokens, e.kl_tokens, e.batch_size)
    evaluator = Evaluator(exported, study_plan.prompts.harmful_eval, study_plan.prompts.harmless_eval, study_plan.markers, settings)
    refused = evaluator.refusals().refused
    original, steered = study.user_attrs["baseline"]["refused"], trial.user_attrs["refused"]
    print(
        f"\norganism 4-bit trial {trial.number}: original refused {original}, trial {steered}, "
        f"export {refused}; {agreement.describe()}"
    )
    # Re-quantizing the edited 4-bit matrices adds rounding the runtime steering never sees;
    # on a 128-wide model that is enough to flip greedy refusals of prompts a partial
    # ablation left near the decision. What must survive is the trial's effect: the export
    # keeps at least half of the refusals the trial removed and overshoots by no more.
    assert original - steered >= 4, "the trial must remove refusals for this test to mean anything"
    assert abs(refused - steered) <= (original - steered) / 2


@pytest.mark.slow
def test_organism_requantized_verification_fails_on_a_wrong_direction(organism_q4_study, tmp_path):
    from optimizer.export.verify import verification_prompts

    study_plan, study = open_study(organism_q4_study)
    trial_model = load_trial_model(study_plan, study, best_trial(study).number)
    c = case(study_plan.model_path, trial_model.weights, trial_model.direction, prompts=verification_prompts(study_plan))
    # The refusal directions of the layers in reverse order: plausible, but not the trial's.
    bake_to(c, tmp_path / "out", direction=trial_model.directions.vectors[::-1].copy())
    agreement = verify(tmp_path / "out", c.reference, c.tier)
    print(f"\norganism 4-bit, wrong direction: {agreement.describe()}")
    assert c.tier == "requantized" and not agreement.passed


@pytest.mark.slow
def test_chat_on_the_demo_study_answers_what_the_original_refuses(demo_study, tmp_path):
    from optimizer.browse.chat import side_by_side

    study_file, storage = demo_study
    study_plan, study = open_study(demo_study)
    trial = best_trial(study)
    assert trial.values[1] < study.user_attrs["baseline"]["refusal_rate"]
    # A harmful eval prompt the original refuses and the trial answers.
    trial_model = load_trial_model(study_plan, study, trial.number)
    exchanges = (side_by_side(trial_model, p, max_tokens=32) for p in study_plan.prompts.harmful_eval)
    prompt = next(x.prompt for x in exchanges if x.original_refuses and not x.steered_refuses)
    result = run_abopt(
        "chat", study_file, trial.number, "--prompt", prompt, "--max-tokens", "32", "--storage", storage, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    print("\n" + result.stdout)
    assert "original (refuses)" in result.stdout
    assert f"trial {trial.number} (refuses)" not in result.stdout and f"trial {trial.number}" in result.stdout
