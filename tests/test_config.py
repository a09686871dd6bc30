"""Study and search-space files: shipped files load, every mistake gives one clear line."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from optimizer.study.config import BUNDLED_SEARCH_SPACES_DIR, StudyConfig, bundled_search_spaces, load_search_space, load_study, storage_url_for
from optimizer.errors import UserError

REPO = Path(__file__).resolve().parent.parent
STUDIES = sorted((REPO / "studies").glob("*.toml"))

SPACE = """\
shape = "bell"
direction_scope = ["global", "per_layer"]
direction_index = ["40%", "90%"]

[attn]
max_weight = [0.8, 1.5]
max_weight_position = ["60%", "100%"]
min_weight_fraction = [0.0, 1.0]
min_weight_distance = [1, "60%"]

[mlp]
max_weight = [0.8, 1.5]
max_weight_position = ["60%", "100%"]
min_weight_fraction = [0.0, 1.0]
min_weight_distance = [1, "60%"]
"""

STUDY = """\
name = "t"
model = "organism"
search_space = "default"

[prompts]
n_eval = 8

[evaluation]
max_new_tokens = 16

[optimization]
n_trials = 10
n_startup_trials = 2
"""


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def one_line_error(call, *args, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message and message.strip() == message, message
    return message


# --- shipped files ---------------------------------------------------------------------------


def test_shipped_studies_exist():
    names = {p.stem for p in STUDIES}
    assert {"demo", "llama-3.2-3b-instruct", "qwen3-4b", "gemma-3-4b-it"} <= names


@pytest.mark.parametrize("path", STUDIES, ids=[p.name for p in STUDIES])
def test_every_shipped_study_loads(path):
    config = load_study(path)
    assert config.name == path.stem
    assert config.path == path.resolve()
    assert config.storage_url == f"sqlite:///{path.resolve().with_suffix('.db')}"
    assert config.optimization.n_startup_trials <= config.optimization.n_trials
    assert config.search_space.resolve(28)  # fits a typical model depth


def test_demo_study_uses_the_organism_and_wide_space():
    config = load_study(REPO / "studies" / "demo.toml")
    assert config.model == "organism"
    assert config.search_space == load_search_space("wide")
    assert (config.optimization.n_trials, config.optimization.n_startup_trials) == (60, 12)
    assert (config.prompts.n_measure, config.prompts.n_eval) == (128, 64)


@pytest.mark.parametrize("name", ["default", "narrow", "wide"])
def test_bundled_search_spaces_load(name):
    assert name in bundled_search_spaces()
    space = load_search_space(name)
    assert space.path == (BUNDLED_SEARCH_SPACES_DIR / f"{name}.toml").resolve()
    for n_layers in (2, 4, 16, 80):
        for low, high in space.resolve(n_layers).values():
            assert 0 <= low <= high


def test_default_space_matches_the_design():
    space = load_search_space("default")
    assert space.shape == "bell"
    assert space.direction_scopes == ("global", "per_layer")
    ranges = space.resolve(11)  # depth L - 1 = 10 layers
    assert ranges["direction_index"] == pytest.approx((4.0, 9.0))
    for component in ("attn", "mlp"):
        assert ranges[f"{component}.max_weight"] == (0.8, 1.5)
        assert ranges[f"{component}.max_weight_position"] == pytest.approx((6.0, 10.0))
        assert ranges[f"{component}.min_weight_fraction"] == (0.0, 1.0)
        assert ranges[f"{component}.min_weight_distance"] == pytest.approx((1.0, 6.0))


def test_repo_search_spaces_are_the_bundled_ones():
    # search_spaces/ in the repo and the package data must never drift apart.
    repo = {p.name: p.read_bytes() for p in (REPO / "search_spaces").glob("*.toml")}
    bundled = {p.name: p.read_bytes() for p in BUNDLED_SEARCH_SPACES_DIR.glob("*.toml")}
    assert repo == bundled


# --- search spaces ---------------------------------------------------------------------------


def test_percent_resolution_and_clamping(tmp_path):
    text = SPACE.replace('direction_index = ["40%", "90%"]', "direction_index = [2, 40]")
    space = load_search_space(str(write(tmp_path, "s.toml", text)))
    ranges = space.resolve(21)  # depth 20
    assert ranges["direction_index"] == (2.0, 20.0)  # absolute positions clamp to L - 1
    assert ranges["attn.max_weight_position"] == pytest.approx((12.0, 20.0))
    assert ranges["attn.min_weight_distance"] == pytest.approx((1.0, 12.0))
    assert space.direction_index.resolve(1) == (0.0, 0.0)
    assert space.attn.min_weight_distance.resolve(101) == pytest.approx((1.0, 60.0))


def test_single_values_are_fixed(tmp_path):
    text = SPACE.replace("max_weight = [0.8, 1.5]", "max_weight = 1").replace(
        'direction_scope = ["global", "per_layer"]', 'direction_scope = "global"')
    space = load_search_space("s.toml", base_dir=write(tmp_path, "s.toml", text).parent)
    assert space.attn.max_weight.is_fixed and space.attn.max_weight.resolve(8) == (1.0, 1.0)
    assert not space.attn.max_weight_position.is_fixed
    assert space.direction_scopes == ("global",)


def test_mixed_range_collapses_onto_the_absolute_bound_when_it_crosses():
    space = load_search_space("default")
    # [1, "60%"] on a 2-layer model: 60% of depth 1 is 0.6 < 1 layer.
    assert space.resolve(2)["attn.min_weight_distance"] == (1.0, 1.0)
    assert space.resolve(3)["attn.min_weight_distance"] == (1.0, 1.2)


def test_distance_resolving_to_zero_is_a_user_error(tmp_path):
    space = load_search_space(str(write(tmp_path, "s.toml", SPACE.replace('[1, "60%"]', '["10%", "60%"]'))))
    message = one_line_error(space.resolve, 1)
    assert message.startswith(f"{tmp_path.resolve() / 's.toml'}: attn.min_weight_distance: low 10% resolves to 0")


def test_disabled_component_is_left_out(tmp_path):
    text = SPACE.replace("[mlp]\n", "[mlp]\nenabled = false\n")
    text = text.replace('direction_scope = ["global", "per_layer"]', 'direction_scope = "per_layer"')
    space = load_search_space(str(write(tmp_path, "s.toml", text)))
    assert list(space.components()) == ["attn"]
    assert [r.name for r in space.ranges()] == [
        "attn.max_weight", "attn.max_weight_position", "attn.min_weight_fraction",
        "attn.min_weight_distance",
    ]


def test_fingerprint_ignores_formatting_but_not_ranges(tmp_path):
    base = load_search_space(str(write(tmp_path, "a.toml", SPACE))).fingerprint()
    reformatted = "# a comment\n" + SPACE.replace(" = ", "   =   ").replace(
        "[1, \"60%\"]", "[ 1.0 , \" 60.0 %\" ]  # trailing comment")
    # Table order and key order do not matter either.
    head, attn, mlp = reformatted.split("\n\n")
    reordered = head + "\n\n" + mlp + "\n\n" + attn
    assert load_search_space(str(write(tmp_path, "b.toml", reordered))).fingerprint() == base
    changed = SPACE.replace("max_weight = [0.8, 1.5]", "max_weight = [0.8, 1.6]", 1)
    assert load_search_space(str(write(tmp_path, "c.toml", changed))).fingerprint() != base
    disabled = SPACE.replace("[mlp]\n", "[mlp]\nenabled = false\n")
    assert load_search_space(str(write(tmp_path, "d.toml", disabled))).fingerprint() != base
    assert re.fullmatch(r"[0-9a-f]{64}", base)


def test_edit_choices_default_to_the_original_edit_and_keep_old_fingerprints(tmp_path):
    plain = load_search_space(str(write(tmp_path, "a.toml", SPACE)))
    assert (plain.direction_kinds, plain.n_directions, plain.norm_preserving) == (("difference",), (1,), (False,))
    # Written out at their defaults, the edit keys change nothing: studies made before them resume.
    explicit = 'direction_kind = "difference"\nn_directions = 1\nnorm_preserving = false\n' + SPACE
    assert load_search_space(str(write(tmp_path, "b.toml", explicit))).fingerprint() == plain.fingerprint()
    searched = 'direction_kind = ["difference", "orthogonal"]\nn_directions = [1, 2]\nnorm_preserving = [false, true]\n' + SPACE
    space = load_search_space(str(write(tmp_path, "c.toml", searched)))
    assert (space.direction_kinds, space.n_directions, space.norm_preserving) == (
        ("difference", "orthogonal"), (1, 2), (False, True))
    assert space.fingerprint() != plain.fingerprint()


@pytest.mark.parametrize(
    "old, new, expected",
    [
        ("max_weight = [0.8, 1.5]", "max_weight = [1.5, 0.8]", "attn.max_weight: low 1.5 > high 0.8"),
        ('direction_index = ["40%", "90%"]', 'direction_index = ["90%", "40%"]',
         "direction_index: low 90% > high 40%"),
        ("max_weight = [0.8, 1.5]", "max_weight = [0.8, 6]", "attn.max_weight: 6 is out of range"),
        ("max_weight = [0.8, 1.5]", 'max_weight = "50%"', "attn.max_weight: expected a number"),
        ("max_weight = [0.8, 1.5]", "max_weight = [0.8, 1.0, 1.5]", "attn.max_weight: expected [low, high]"),
        ("max_weight = [0.8, 1.5]", "max_weight = [0.8, true]", "attn.max_weight: expected a number"),
        ("min_weight_fraction = [0.0, 1.0]", "min_weight_fraction = [0.0, 1.2]",
         "attn.min_weight_fraction: 1.2 is out of range; it must be within [0, 1]"),
        ('max_weight_position = ["60%", "100%"]', 'max_weight_position = ["60%", "150%"]',
         "attn.max_weight_position: percentage 150% is out of range"),
        ('max_weight_position = ["60%", "100%"]', 'max_weight_position = ["60%", "abc%"]',
         'attn.max_weight_position: expected a number of layers or a percentage like "60%"'),
        ('min_weight_distance = [1, "60%"]', 'min_weight_distance = [0, "60%"]',
         "attn.min_weight_distance: 0 is out of range; it must be > 0"),
        ('min_weight_distance = [1, "60%"]', 'min_weight_distance = ["0%", "60%"]',
         "attn.min_weight_distance: percentage 0% is out of range"),
        ('shape = "bell"', 'shape = "cone"', 'shape: "cone" (a string) is not allowed'),
        ('shape = "bell"', 'shape = "bel"', 'did you mean "bell"?'),
        ('direction_scope = ["global", "per_layer"]', 'direction_scope = "both"', "direction_scope: expected"),
        ('direction_scope = ["global", "per_layer"]', 'direction_scope = ["global", "global"]',
         "direction_scope: expected"),
        ("[attn]\nmax_weight", "[attn]\nmax_wieght", "unknown key 'attn.max_wieght'; did you mean 'attn.max_weight'?"),
        ("[attn]\n", "[attn]\ncolour = 1\n", "unknown key 'attn.colour'; allowed keys here: enabled,"),
        ("[mlp]\n", "[mlp]\nshape = \"tent\"\n", "unknown key 'mlp.shape'; it belongs at the top of the file: move it above the first [table]"),
        ("[attn]\n", "[attn]\nenabled = 1\n", "attn.enabled: expected true or false, got 1"),
        ('shape = "bell"\n', "", "shape: missing; add it"),
        ("min_weight_fraction = [0.0, 1.0]\nmin_weight_distance = [1, \"60%\"]\n\n[mlp]",
         "min_weight_fraction = [0.0, 1.0]\n\n[mlp]", "attn.min_weight_distance: missing; add it under [attn]"),
        ("[attn]\n", "[attn]\nenabled = false\n", None),  # one disabled component is fine
        ('shape = "bell"', 'shape = "bell"\ndirection_kind = "orth"', 'direction_kind: expected "difference" | "orthogonal"'),
        ('shape = "bell"', 'shape = "bell"\nn_directions = 5', "n_directions: expected a whole number of directions within 1..4"),
        ('shape = "bell"', 'shape = "bell"\nn_directions = true', "n_directions: expected a whole number"),
        ('shape = "bell"', 'shape = "bell"\nn_directions = [1, 1]', "n_directions: expected a whole number"),
        ('shape = "bell"', 'shape = "bell"\nnorm_preserving = "yes"', "norm_preserving: expected true, false or [false, true]"),
        ('shape = "bell"', 'shape = "bell"\nnorm_preserving = []', "norm_preserving: expected true, false"),
        ("[attn]\n", "[attn]\nn_directions = 2\n", "unknown key 'attn.n_directions'; it belongs at the top of the file"),
    ],
)
def test_search_space_errors(tmp_path, old, new, expected):
    assert old in SPACE
    text = SPACE.replace(old, new)
    if expected is None:
        load_search_space(str(write(tmp_path, "s.toml", text)))
        return
    path = write(tmp_path, "s.toml", text)
    message = one_line_error(load_search_space, str(path))
    assert message.startswith(f"{path}: "), message
    assert expected in message, message


def test_component_must_be_a_table(tmp_path):
    head, attn, mlp = SPACE.split("\n\n")
    text = head + "\nattn = 3\n\n" + mlp
    message = one_line_error(load_search_space, str(write(tmp_path, "s.toml", text)))
    assert "attn: expected a table [attn], got 3" in message
    message = one_line_error(load_search_space, str(write(tmp_path, "s.toml", head + "\n\n" + mlp)))
    assert "attn: missing; add it" in message


def test_both_components_disabled(tmp_path):
    text = SPACE.replace("[attn]\n", "[attn]\nenabled = false\n").replace("[mlp]\n", "[mlp]\nenabled = false\n")
    message = one_line_error(load_search_space, str(write(tmp_path, "s.toml", text)))
    assert "attn.enabled, mlp.enabled: both components are disabled" in message


def test_search_space_spec_errors(tmp_path):
    message = one_line_error(load_search_space, "defualt")
    assert "unknown search space 'defualt'; did you mean 'default'?" in message
    assert "default, narrow, wide" in message
    message = one_line_error(load_search_space, "nope.toml", base_dir=tmp_path)
    assert f"{tmp_path / 'nope.toml'} not found" in message


# --- TOML-level errors -----------------------------------------------------------------------


def test_missing_file(tmp_path):
    path = tmp_path / "absent.toml"
    assert one_line_error(load_study, path) == f"{path}: file not found; check the path"
    assert f"search-space file {path} not found" in one_line_error(load_search_space, str(path))


def test_directory_instead_of_file(tmp_path):
    assert "is a directory" in one_line_error(load_study, tmp_path)


def test_toml_syntax_error_names_line_and_column(tmp_path):
    path = write(tmp_path, "s.toml", 'name = "t"\nmodel = "organism"\nn_trials = \n')
    message = one_line_error(load_study, path)
    assert message.startswith(f"{path}: line 3, column 12: invalid TOML: "), message
    path = write(tmp_path, "s.toml", 'name = "t"\nmodel = [1,\n')
    assert "invalid TOML" in one_line_error(load_study, path)


def test_not_utf8(tmp_path):
    path = tmp_path / "s.toml"
    path.write_bytes(b'name = "\xff"\n')
    assert "not UTF-8" in one_line_error(load_study, path)


# --- studies ---------------------------------------------------------------------------------


def test_minimal_study_gets_the_defaults(tmp_path):
    config = load_study(write(tmp_path, "mini.toml", 'model = "organism"\n'))
    assert config.name == "mini"
    assert config.search_space.fingerprint() == load_search_space("default").fingerprint()
    assert config.storage_url == f"sqlite:///{tmp_path.resolve() / 'mini.db'}"
    assert config.dtype == "auto" and config.trust_remote_code is False
    assert config.prompts.harmful_measure == "bundled:harmful:measure"
    assert config.evaluation.kl_tokens == 1
    assert config.optimization.n_trials == 60 and config.optimization.n_startup_trials == 12
    assert config.base_dir == tmp_path.resolve()


def test_default_startup_trials_follow_n_trials(tmp_path):
    config = load_study(write(tmp_path, "s.toml", 'model = "organism"\n[optimization]\nn_trials = 200\n'))
    assert config.optimization.n_startup_trials == 40


def test_relative_paths_resolve_against_the_study_file(tmp_path, monkeypatch):
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    write(tmp_path, "spaces/mine.toml", SPACE.replace("[0.8, 1.5]", "[1.0, 1.2]"))
    write(tmp_path, "s.toml", 'model = "models/tiny"\nsearch_space = "spaces/mine.toml"\n'
                              'storage = "sqlite:///dbs/s.db?timeout=60"\n')
    write(tmp_path, "dot.toml", 'model = "./models/tiny"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_study("../s.toml")
    assert config.model == str(tmp_path.resolve() / "models" / "tiny")
    assert config.search_space.attn.max_weight.resolve(4) == (1.0, 1.2)
    assert config.storage_url == f"sqlite:///{tmp_path.resolve()}/dbs/s.db?timeout=60"
    assert load_study("../dot.toml").model == config.model


def test_hugging_face_id_is_kept(tmp_path):
    config = load_study(write(tmp_path, "s.toml", 'model = "mlx-community/Qwen3-4B-4bit"\n'))
    assert config.model == "mlx-community/Qwen3-4B-4bit"


def test_prompt_sources_stay_strings(tmp_path):
    config = load_study(write(tmp_path, "s.toml", 'model = "organism"\n[prompts]\n'
                                                  'harmful_eval = "data/mine.jsonl"\n'))
    assert config.prompts.harmful_eval == "data/mine.jsonl"
    assert config.base_dir / config.prompts.harmful_eval == tmp_path.resolve() / "data" / "mine.jsonl"


@pytest.mark.parametrize(
    "old, new, expected",
    [
        ("max_new_tokens = 16", "max_new_token = 16",
         "unknown key 'evaluation.max_new_token'; did you mean 'evaluation.max_new_tokens'?"),
        ('name = "t"', 'nmae = "t"', "unknown key 'nmae'; did you mean 'name'?"),
        ('name = "t"', 'name = "t"\nn_trials = 3', "unknown key 'n_trials'; it belongs under [optimization]"),
        ("n_startup_trials = 2", "n_startup_trials = 2\nkl_tokens = 2",
         "unknown key 'optimization.kl_tokens'; it belongs under [evaluation]"),
        ("max_new_tokens = 16", 'max_new_tokens = "16"', 'evaluation.max_new_tokens: expected an integer, got "16" (a string)'),
        ("max_new_tokens = 16", "max_new_tokens = 16.0", "evaluation.max_new_tokens: expected an integer, got 16"),
        ("max_new_tokens = 16", "max_new_tokens = 0", "evaluation.max_new_tokens: 0 is out of range; it must be at least 1"),
        ("n_eval = 8", "n_eval = true", "prompts.n_eval: expected an integer, got true (a boolean)"),
        ("n_eval = 8", 'harmful_eval = ""', "prompts.harmful_eval: is empty"),
        ("n_eval = 8", "system_prompt = 1", "prompts.system_prompt: expected a string, got 1"),
        ("[prompts]\nn_eval = 8", "prompts = 3", "prompts: expected a table [prompts], got 3"),
        ("n_startup_trials = 2", "n_startup_trials = 11",
         "optimization.n_startup_trials: 11 is more than n_trials = 10"),
        ("n_trials = 10", "n_trials = 0", "optimization.n_trials: 0 is out of range"),
        ("n_startup_trials = 2", "n_startup_trials = 2\nkl_ceiling = -1",
         "optimization.kl_ceiling: -1 is out of range; it must be at least 0"),
        ("n_startup_trials = 2", "n_startup_trials = 2\nkl_ceiling = inf",
         "optimization.kl_ceiling: expected a finite number, got inf"),
        ("n_startup_trials = 2", "n_startup_trials = 2\nseed = -1", "optimization.seed: -1 is out of range"),
        ('name = "t"', 'name = "  "', "name: is empty"),
        ('name = "t"', 'name = "t"\ndtype = "fp16"',
         'dtype: "fp16" (a string) is not allowed; use "auto" | "float32" | "float16" | "bfloat16"'),
        ('name = "t"', 'name = "t"\ndtype = "bfloat61"', 'did you mean "bfloat16"?'),
        ('name = "t"', 'name = "t"\ntrust_remote_code = "yes"', "trust_remote_code: expected true or false"),
        ('model = "organism"', 'model = "./models/absent"', "model: model directory"),
        ('model = "organism"', 'model = "~/definitely/not/here/abopt"', "does not exist"),
        ('model = "organism"', 'model = "not a model id!"', 'model: "not a model id!" (a string) is neither'),
        ('model = "organism"\n', "", "model: missing; add it"),
        ('search_space = "default"', 'search_space = "defualt"',
         "search_space: unknown search space 'defualt'; did you mean 'default'?"),
        ('search_space = "default"', 'search_space = "spaces/absent.toml"', "search_space: search-space file"),
        ('name = "t"', 'name = "t"\nstorage = "mysql://u@h/db"',
         "storage: unsupported storage URL 'mysql://u@h/db'; use sqlite:///PATH.db or postgresql://"),
        ('name = "t"', 'name = "t"\nstorage = "demo.db"', "storage: unsupported storage URL"),
        ('name = "t"', 'name = "t"\nstorage = "sqlite://"', "storage: 'sqlite://' names no database file"),
        ('name = "t"', 'name = "t"\nstorage = ""', "storage: is empty"),
        ("[evaluation]\nmax_new_tokens = 16", "[evaluation]\nmax_new_tokens = 16\nname = \"x\"",
         "unknown key 'evaluation.name'; it belongs at the top of the file"),
    ],
)
def test_study_errors(tmp_path, old, new, expected):
    assert old in STUDY
    path = write(tmp_path, "study.toml", STUDY.replace(old, new))
    message = one_line_error(load_study, path)
    assert message.startswith(f"{path}: "), message
    assert expected in message, message


def test_errors_inside_the_referenced_search_space_name_that_file(tmp_path):
    space = write(tmp_path, "bad.toml", SPACE.replace("[0.8, 1.5]", "[1.5, 0.8]", 1))
    study = write(tmp_path, "s.toml", 'model = "organism"\nsearch_space = "bad.toml"\n')
    message = one_line_error(load_study, study)
    assert message.startswith(f"{space}: attn.max_weight: low 1.5 > high 0.8")


# --- storage URLs ----------------------------------------------------------------------------


def test_storage_urls(tmp_path, monkeypatch):
    config = load_study(write(tmp_path, "s.toml", STUDY.replace(
        'name = "t"', 'name = "t"\nstorage = "postgresql://u:p@db.local:5432/abopt"')))
    assert config.storage_url == "postgresql+psycopg://u:p@db.local:5432/abopt"
    assert storage_url_for(config, None) == config.storage_url
    assert storage_url_for(config, "postgresql+psycopg://h/x") == "postgresql+psycopg://h/x"
    assert storage_url_for(config, "postgres://h/x") == "postgresql+psycopg://h/x"
    assert storage_url_for(config, "sqlite:////abs/x.db") == "sqlite:////abs/x.db"
    monkeypatch.chdir(tmp_path)
    # An override comes from the command line: relative to the working directory.
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    assert storage_url_for(config, "sqlite:///x.db") == f"sqlite:///{tmp_path.resolve()}/sub/x.db"
    for bad, expected in [
        ("mysql://h/x", "--storage: unsupported storage URL 'mysql://h/x'"),
        ("mysql://me:secret@h/x", "unsupported storage URL 'mysql://me:***@h/x'"),
        ("postgresql+psycopg2://h/x", "unsupported storage URL"),
        ("sqlite:///:memory:", "names no database file"),
        ("postgresql://", "names no server"),
    ]:
        assert expected in one_line_error(storage_url_for, config, bad)


# --- dataclasses -----------------------------------------------------------------------------


def test_configs_are_frozen():
    config = load_study(REPO / "studies" / "demo.toml")
    assert isinstance(config, StudyConfig)
    for obj, attr in [
        (config, "name"), (config.prompts, "n_eval"), (config.evaluation, "max_new_tokens"),
        (config.optimization, "n_trials"), (config.search_space, "shape"),
        (config.search_space.attn, "enabled"), (config.search_space.attn.max_weight, "low"),
    ]:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, attr, None)
    assert isinstance(config.search_space.direction_scopes, tuple)
    hash(config.search_space.attn)  # hashable all the way down
