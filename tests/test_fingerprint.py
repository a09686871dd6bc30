"""Model fingerprints: one changed byte of a weight file means another model, and new directions."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import optuna
import pytest

from conftest import user_error, write_study
from optimizer.study.storage import OnceStore
from optimizer.study.config import load_study
from optimizer.engine.fingerprint import cache_dir, file_digest, legacy_model_identity, model_identity
from optimizer.engine.model import ORGANISM_PATH, load_model
from optimizer.engine.prompts import load_prompts
from optimizer.study.plan import SIGNATURE_ATTR, check_signature, plan
from optimizer.study.steered import cached_directions

HARMFUL = load_prompts("bundled:harmful:measure", limit=8)
HARMLESS = load_prompts("bundled:harmless:measure", limit=8)


@pytest.fixture
def model(tmp_path) -> Path:
    return Path(shutil.copytree(ORGANISM_PATH, tmp_path / "organism"))


def change_one_weight(model: Path) -> None:
    """Flip one byte of one float32 weight, in place, where the old sampled fingerprint never looked."""
    weights = model / "model.safetensors"
    size = weights.stat().st_size
    offset = size // 16 + (1 << 16) + 4096  # past the first sample after the header
    with weights.open("r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0x01]))


def test_one_changed_weight_changes_the_identity(model):
    assert (model / "model.safetensors").stat().st_size > 1 << 20
    before, legacy_before = model_identity(model), legacy_model_identity(model)
    change_one_weight(model)
    assert legacy_model_identity(model) == legacy_before  # what studies of abopt 0.1.0 missed
    assert model_identity(model) != before


def test_digests_are_remembered_per_path_size_and_time(model):
    weights = model / "model.safetensors"
    first = file_digest(weights)
    memo = json.loads((cache_dir() / "file-digests.json").read_text())
    assert [digest for key, digest in memo.items() if key.startswith(f"{weights.resolve()}|")] == [first]
    change_one_weight(model)  # same size, new modification time: hashed again
    assert file_digest(weights) != first


def measured(store: OnceStore, source: Path, *, dtype: str = "float32", system_prompt: str = "") -> bool:
    loaded = load_model(str(source), dtype=dtype)
    return cached_directions(store, loaded, HARMFUL, HARMLESS, system_prompt=system_prompt, batch_size=8)[1]


def test_each_change_of_model_tokenizer_template_prompt_or_dtype_measures_anew(model, tmp_path):
    store = OnceStore(f"sqlite:///{tmp_path / 'cache.db'}")
    assert measured(store, model)
    assert not measured(store, model)  # nothing changed: from the cache
    change_one_weight(model)
    assert measured(store, model)
    tokenizer = model / "tokenizer.json"
    tokenizer.write_text(json.dumps(json.loads(tokenizer.read_text()), indent=1))
    assert measured(store, model)
    config_file = model / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["chat_template"] = config["chat_template"].replace("<|im_start|>assistant", "<|im_start|>assistant ")
    config_file.write_text(json.dumps(config))
    assert measured(store, model)
    assert measured(store, model, system_prompt="You are a helpful assistant.")
    assert measured(store, model, dtype="float16")
    assert not measured(store, model, dtype="float16")
    store.close()


def test_a_study_signed_with_the_old_sampled_identity_still_resumes(model, tmp_path):
    study_plan = plan(load_study(write_study(tmp_path, model)), f"sqlite:///{tmp_path / 't.db'}")
    study = optuna.create_study(study_name="t", storage=study_plan.storage_url, directions=["minimize"] * 2)
    study.set_user_attr(SIGNATURE_ATTR, dict(study_plan.signature, model_identity=legacy_model_identity(model)))
    check_signature(study, study_plan)
    study.set_user_attr(SIGNATURE_ATTR, dict(study_plan.signature, model_identity="0123456789abcdef"))
    assert "different model weights" in user_error(check_signature, study, study_plan)
