"""Savings that must not change results: layer replay, screening and the shared prefix.

Each saving is checked against the full evaluation it replaces, on the organism: the same
logits (within 1e-5), the same answers and verdicts, the same front.
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from conftest import run_abopt, write_study
from optimizer.engine.directions import measure
from optimizer.engine.evaluate import EvalSettings, Evaluator, replay_depth, replay_layer_bytes
from optimizer.engine.markers import load_markers
from optimizer.engine.model import load_model
from optimizer.engine.prompts import load_prompts
from optimizer.engine.replay import first_steered_layer
from optimizer.engine.steering import install
from optimizer.study.screen import Point, Screen

SYSTEM = "You are a helpful assistant."


@pytest.fixture(scope="module")
def organism():
    loaded = load_model("organism")
    steering = install(loaded.targets)
    directions = measure(
        loaded,
        load_prompts("bundled:harmful:measure", limit=32),
        load_prompts("bundled:harmless:measure", limit=32),
        system_prompt=SYSTEM,
    )
    yield loaded, steering, directions
    steering.remove()


def evaluator(loaded, replay_bytes: int = 0) -> Evaluator:
    # Batches of 8: several per prompt set, so records are matched batch by batch.
    settings = EvalSettings(32, 1, 8, SYSTEM, replay_bytes=replay_bytes)
    harmful, harmless = load_prompts("bundled:harmful:eval", limit=20), load_prompts("bundled:harmless:eval", limit=20)
    return Evaluator(loaded, harmful, harmless, load_markers(), settings)


def steer_from(steering, directions, start: int, n_layers: int) -> dict[str, np.ndarray]:
    weights = np.zeros(n_layers, dtype=np.float32)
    weights[start:] = np.linspace(1.3, 0.6, n_layers - start)
    profile = {"attn": weights, "mlp": weights[::-1].copy() * (np.arange(n_layers) >= start)}
    steering.set(profile, directions.vectors)
    return profile


def test_first_steered_layer_is_the_first_nonzero_weight_of_any_component():
    assert first_steered_layer({"attn": [0, 0, 0.5, 1], "mlp": [0, 0, 0, 1]}, 4) == 2
    assert first_steered_layer({"attn": np.zeros(4), "mlp": [0, 1e-6, 0, 0]}, 4) == 1
    assert first_steered_layer({"attn": np.zeros(4)}, 4) == 4


def test_replayed_layers_give_the_logits_and_answers_of_full_passes(organism):
    loaded, steering, directions = organism
    steering.clear()
    full, fast = evaluator(loaded), evaluator(loaded, replay_bytes=1 << 30)
    assert full.kl_replay.depth == 0 and fast.kl_replay.depth == fast.prefill_replay.depth == loaded.n_layers - 1
    assert len(fast.prefill_replay.records) == sum(map(len, fast.generation_batches())) > 1
    try:
        for start in (1, 4, loaded.n_layers - 1):
            profile = steer_from(steering, directions, start, loaded.n_layers)
            assert first_steered_layer(profile, loaded.n_layers) == start
            expected = list(full._kl_logits(full.kl_inputs))
            got = list(fast._kl_logits(fast.kl_inputs, start=start))
            assert [rows for rows, _ in got] == [rows for rows, _ in expected]
            for (_, a), (_, b) in zip(expected, got):
                assert mx.abs(a - b).max().item() <= 1e-5
            kl = full.kl_divergence()
            assert kl > 1e-4 and abs(fast.kl_divergence(start=start) - kl) <= 1e-6  # the steering changed things
            answers, replayed = full.refusals(), fast.refusals(start=start)
            assert replayed.answers == answers.answers and replayed.verdicts == answers.verdicts
            assert replayed.generated_tokens == answers.generated_tokens
    finally:
        steering.clear()


def test_replay_keeps_as_many_layers_as_its_budget_allows_and_stays_exact(organism):
    loaded, steering, directions = organism
    steering.clear()
    full = evaluator(loaded)
    settings = EvalSettings(32, 1, 8, SYSTEM, replay_bytes=1 << 30)
    per_layer = replay_layer_bytes(loaded, full.harmful_tokens, full.harmless_tokens, 1)
    assert replay_depth(loaded, full.harmful_tokens, full.harmless_tokens, settings) == loaded.n_layers - 1
    small = EvalSettings(32, 1, 8, SYSTEM, replay_bytes=1)
    assert replay_depth(loaded, full.harmful_tokens, full.harmless_tokens, small) == 0
    fast = evaluator(loaded, replay_bytes=2 * per_layer + per_layer // 2)
    assert 1 <= fast.kl_replay.depth < loaded.n_layers - 1
    memory = fast.kl_replay.nbytes + fast.prefill_replay.nbytes
    assert memory <= 2 * per_layer + per_layer // 2
    try:
        steer_from(steering, directions, 5, loaded.n_layers)
        # Asked to start deeper than it kept, it starts where it can.
        assert fast.kl_divergence(start=min(5, fast.kl_replay.depth)) == full.kl_divergence()
        assert fast.refusals(start=min(5, fast.kl_replay.depth)).answers == full.refusals().answers
    finally:
        steering.clear()


@pytest.mark.parametrize("kl_tokens", [1, 3])
def test_a_shared_prefix_gives_the_logits_and_answers_of_whole_prompts(organism, kl_tokens):
    loaded, steering, directions = organism
    steering.clear()
    harmful, harmless = load_prompts("bundled:harmful:eval", limit=20), load_prompts("bundled:harmless:eval", limit=20)
    whole, shared = (
        Evaluator(loaded, harmful, harmless, load_markers(), EvalSettings(32, kl_tokens, 8, SYSTEM, replay_bytes=1 << 30, share_prefix=on))
        for on in (False, True)
    )
    # The system prompt and the template's header: 14 of the organism's ~46 prompt tokens.
    assert shared.shared_prefix(shared.harmful_tokens) == 14 and shared.shared_prefix(shared.kl_inputs, kl_tokens) == 14
    assert whole.shared_prefix(whole.harmful_tokens) == 0
    assert shared.kl_replay.depth == whole.kl_replay.depth == loaded.n_layers - 1  # replay stays exact with it
    assert mx.abs(shared._reference - whole._reference).max().item() <= 1e-5
    try:
        for start in (0, 3):
            steer_from(steering, directions, start, loaded.n_layers)
            expected, got = list(whole._kl_logits(whole.kl_inputs, start=start)), list(shared._kl_logits(shared.kl_inputs, start=start))
            assert [rows for rows, _ in got] == [rows for rows, _ in expected]
            for (_, a), (_, b) in zip(expected, got):
                assert a.shape == b.shape and mx.abs(a - b).max().item() <= 1e-5
            kl = whole.kl_divergence(start=start)
            assert kl > 1e-4 and abs(shared.kl_divergence(start=start) - kl) <= 1e-6
            answers, continued = whole.refusals(start=start), shared.refusals(start=start)
            assert continued.answers == answers.answers and continued.verdicts == answers.verdicts
            assert continued.step_sizes == answers.step_sizes
    finally:
        steering.clear()


def test_a_shared_prefix_is_used_only_where_the_caches_are_plain_kv_caches(saved_model):
    loaded = load_model(str(saved_model("gemma3_text", num_hidden_layers=4)))  # sliding-window layers
    prompts = [f"Tell me about item {i} of the list, please." for i in range(6)]
    settings = EvalSettings(8, 1, 4, SYSTEM, share_prefix=True)
    evaluator = Evaluator(loaded, prompts, prompts[::-1], (), settings)
    assert not evaluator.joinable and evaluator.shared_prefix(evaluator.harmful_tokens) == 0


def test_compiled_steering_gives_the_logits_of_op_by_op_steering_and_a_new_trial_no_trace(organism):
    from optimizer.engine.steering import TRACES

    loaded, steering, directions = organism
    # Compiled by default on a GPU only: on a CPU it measured no faster.
    assert steering.compiled == (mx.default_device() == mx.gpu)
    default, scoring = steering.compiled, evaluator(loaded)
    try:
        for kind, basis in (("one direction", directions.vectors), ("a subspace", directions.basis("difference", 2))):
            for start in (0, 2):
                profile = steer_from(steering, directions, start, loaded.n_layers)
                steering.set(profile, basis)
                results = {}
                for on in (False, True):
                    steering.compile(on)
                    traces = TRACES["count"]
                    results[on] = list(scoring._kl_logits(scoring.kl_inputs)), scoring.refusals()
                    if on and start:  # a second trial, other weights: the same compiled ops
                        assert TRACES["count"] == traces, kind
                (full, answers), (compiled, same) = results[False], results[True]
                for (_, a), (_, b) in zip(full, compiled):
                    assert mx.abs(a - b).max().item() <= 1e-5, kind
                assert same.answers == answers.answers and same.verdicts == answers.verdicts, kind
    finally:
        steering.compile(default)
        steering.clear()


def test_a_screen_stops_only_what_a_complete_trial_dominates_whatever_comes_next():
    points = (Point(3, 0.10, 0.25), Point(7, 0.30, 0.0))
    # KL 0.5 is beaten by trial 7 (KL 0.3, no refusals) before any answer is known.
    screen = Screen(points, 0.5, 8)
    assert screen(0) and screen.by.number == 7
    # KL 0.2: only trial 3 has a lower KL; its 2/8 beat 3 known refusals, tie 2, not 1.
    screen = Screen(points, 0.2, 8)
    assert not screen(1) and screen(2) and screen(3) and screen.by.number == 3
    # The same KL as trial 3: 2/8 refusals would tie (both on the front), 3 would not.
    screen = Screen(points, 0.10, 8)
    assert not screen(2) and screen(3)
    assert "dominated by trial 3" in screen.reason(5) and "after 5 of 8 answers" in screen.reason(5)
    # Nothing to compare with: never stops.
    assert not Screen((), 0.5, 8)(8)


def test_screened_refusals_are_the_full_verdicts_so_far(organism):
    loaded, steering, directions = organism
    full = evaluator(loaded)
    try:
        steer_from(steering, directions, 3, loaded.n_layers)
        answers = full.refusals()
        assert answers.refused >= 4, "needs refusals to stop on"
        asked = []

        def give_up(not_complied: int) -> bool:
            asked.append(not_complied)
            return not_complied >= 4

        stopped = full.refusals(give_up=give_up)
    finally:
        steering.clear()
    assert stopped.screened and not answers.screened and asked[0] == 0
    # Answers finish a decode step at a time: it stops at the first step that reaches 4.
    known = stopped.refused + stopped.degenerate
    assert asked[-1] == known >= 4 > asked[-2] and known <= answers.refused + answers.degenerate
    assert known <= stopped.judged < stopped.total == answers.total
    assert stopped.rate == known / answers.total <= answers.rate
    for known, final, text, full_text in zip(stopped.verdicts, answers.verdicts, stopped.answers, answers.answers):
        assert known in ("", final) and (not known or text == full_text)


def _front(storage: str, name: str) -> list[tuple[str, float, float]]:
    study = optuna.load_study(study_name=name, storage=storage)
    return sorted((json.dumps(t.params, sort_keys=True), *t.values) for t in study.best_trials)


def test_screening_replay_and_a_shared_prefix_on_or_off_give_the_same_front_with_a_kl_ceiling(tmp_path):
    # Random sampling (every trial a start-up trial): both runs score the same parameters,
    # so the fronts must be identical; TPE would see screened trials' bounds and diverge.
    fronts, studies = {}, {}
    for on in (True, False):
        name = "on" if on else "off"
        study_file = write_study(
            tmp_path,
            "organism",
            name=name,
            n_trials=14,
            search_space="default",
            prompts={"n_measure": 32, "n_eval": 16, "system_prompt": SYSTEM},
            evaluation={"max_new_tokens": 32, "confirm_tokens": 0, "replay_layers": on, "share_prefix": on},
            optimization={"n_startup_trials": 14, "kl_ceiling": 0.02, "screening": on},
        )
        result = run_abopt("run", study_file, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert ("screening on" in result.stdout) == on and ("up to 7 of 8 leading layers" in result.stdout) == on
        assert ("shared prefix: 14 + 14 leading tokens" in result.stdout) == on
        storage = f"sqlite:///{tmp_path / (name + '.db')}"
        fronts[name], studies[name] = _front(storage, name), optuna.load_study(study_name=name, storage=storage)
    trials = {k: s.get_trials(states=(TrialState.COMPLETE,)) for k, s in studies.items()}
    screened = [t for t in trials["on"] if "screened" in t.user_attrs]
    infeasible = [t for t in trials["on"] if t.user_attrs.get("feasible") is False]
    assert screened and infeasible, "the run must screen some trials and break the ceiling with others"
    # The same trials and refusal rates; KL up to float rounding (a prefix's cache continued
    # sums attention in another order: logits within 1e-5, KL within 1e-6 absolute).
    assert [(p, rate) for p, _, rate in fronts["on"]] == [(p, rate) for p, _, rate in fronts["off"]] and fronts["on"]
    assert [kl for _, kl, _ in fronts["on"]] == pytest.approx([kl for _, kl, _ in fronts["off"]], rel=1e-4, abs=1e-6)
    assert not any("screened" in t.user_attrs for t in trials["off"])
    full = {t.number: t for t in trials["off"]}
    for trial in trials["on"]:
        same = full[trial.number]
        assert trial.params == same.params and trial.values[0] == pytest.approx(same.values[0], rel=1e-4, abs=1e-6)
        if "screened" in trial.user_attrs:
            # A bound it could not beat: below its full rate, and the counts so far add up to it.
            assert trial.values[1] <= same.values[1]
            attrs = trial.user_attrs
            assert trial.values[1] == (attrs["refused"] + attrs["degenerate"]) / attrs["total"]
            assert attrs["judged"] < attrs["total"]
        else:
            assert trial.values[1] == same.values[1]
    # A screened trial reads like any other.
    number = str(screened[0].number)
    shown = run_abopt("show", tmp_path / "on.toml", number, cwd=tmp_path)
    assert shown.returncode == 0 and "screened after" in shown.stdout, shown.stderr
    listed = json.loads(run_abopt("show", tmp_path / "on.toml", number, "--json", cwd=tmp_path).stdout)
    assert listed["screened"].startswith("screened after") and not listed["on_front"]
    report = run_abopt("report", tmp_path / "on.toml", "--html", tmp_path / "r.html", cwd=tmp_path)
    assert report.returncode == 0, report.stderr


@pytest.mark.slow
def test_two_screening_workers_find_the_front_one_full_worker_finds(tmp_path):
    # The same parameters in both studies (queued): whichever worker scores which, and
    # whatever the other worker completed meanwhile, the front must be that of full scoring.
    rng = np.random.default_rng(1)
    queued = [
        # Every searched parameter given, the edit's too: a parameter left out would be
        # sampled, differently by each worker.
        {"direction_scope": "per_layer", "direction_kind": str(rng.choice(["difference", "orthogonal"])),
         "n_directions": int(rng.integers(1, 3)), "norm_preserving": bool(rng.integers(0, 2))}
        | {f"{c}.{k}": float(rng.uniform(*r)) for c in ("attn", "mlp") for k, r in (
            ("max_weight", (0.8, 1.5)), ("max_weight_position", (4.2, 7.0)),
            ("min_weight_fraction", (0.0, 1.0)), ("min_weight_distance", (1.0, 4.2)))}
        for _ in range(16)
    ]
    from optimizer.study.storage import worker_records

    fronts = {}
    for name, on, workers in (("off", False, 1), ("on", True, 2)):
        study_file = write_study(
            tmp_path, "organism", name=name, n_trials=1, search_space="default",
            prompts={"n_measure": 32, "n_eval": 24, "system_prompt": SYSTEM},
            evaluation={"max_new_tokens": 32, "confirm_tokens": 0, "replay_layers": on},
            optimization={"n_startup_trials": 1, "screening": on},
        )
        assert run_abopt("run", study_file, cwd=tmp_path).returncode == 0
        storage = f"sqlite:///{tmp_path / (name + '.db')}"
        study = optuna.load_study(study_name=name, storage=storage)
        for params in queued:
            study.enqueue_trial(params)
        result = run_abopt("run", study_file, "--n-trials", str(1 + len(queued)), "--workers", str(workers), cwd=tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr
        complete = study.get_trials(states=(TrialState.COMPLETE,))
        assert len(complete) == 1 + len(queued)
        if on:
            assert len(worker_records(storage, name)) == 3  # the first run's worker, then two at once
            assert any("screened" in t.user_attrs for t in complete), "nothing screened: the test shows nothing"
        fronts[name] = _front(storage, name)
    # The same trials and refusal rates; KL up to float rounding (replay and the edits' batch
    # shapes reorder sums: ≤ 1e-5 relative, as the replay check at start allows).
    assert [(p, rate) for p, _, rate in fronts["on"]] == [(p, rate) for p, _, rate in fronts["off"]]
    assert [kl for _, kl, _ in fronts["on"]] == pytest.approx([kl for _, kl, _ in fronts["off"]], rel=1e-4)


@pytest.mark.parametrize("quant", ["q4", "mxfp4"])
def test_a_quantized_model_searched_on_a_cpu_computes_with_the_same_weight_values_unpacked(saved_model, quant):
    import mlx.nn as nn

    from optimizer.engine.model import compute_path, pad_left

    path = str(saved_model("llama", quant))
    packed, unpacked = load_model(path), load_model(path, unpack=True)
    assert not packed.unpacked and unpacked.unpacked
    assert "packed quantized weights" in compute_path(packed) and "dequantized float32" in compute_path(unpacked)
    for target, same in zip(packed.targets, unpacked.targets):
        assert isinstance(target.module, nn.QuantizedLinear) and type(same.module) is nn.Linear
        assert same.path == target.path
        m = target.module
        values = mx.dequantize(m.weight, m.scales, m.get("biases"), m.group_size, m.bits, mode=m.mode)
        assert mx.array_equal(same.module.weight, values)
    tokens, padding = pad_left([[5, 9, 11, 3], [7, 2]])
    logits = [loaded.model(tokens) for loaded in (packed, unpacked)]
    scale = mx.abs(logits[0]).max().item()
    assert mx.abs(logits[0] - logits[1]).max().item() <= 1e-4 * scale


def test_kl_batches_have_the_fewest_padded_positions_a_batch_limit_allows():
    from itertools import combinations

    from optimizer.engine.evaluate import least_padding

    lengths = sorted([31, 32, 32, 35, 36, 41, 44, 57, 58, 65, 70, 81])

    def cost(batches):
        return sum(len(b) * max(lengths[i] for i in b) + 10 for b in batches)

    batches = least_padding(lengths, 4, overhead=10)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths))) and max(map(len, batches)) <= 4
    # Every way to cut the sorted lengths into runs of at most 4 costs at least as much.
    cuts = [c for k in range(2, len(lengths)) for c in combinations(range(1, len(lengths)), k)]
    runs = ([list(range(a, b)) for a, b in zip((0, *c), (*c, len(lengths)))] for c in cuts)
    assert cost(batches) == min(cost(r) for r in runs if max(map(len, r)) <= 4)
    assert least_padding(lengths, 64, overhead=1e9) == [list(range(len(lengths)))]


def test_with_a_judge_only_degenerate_answers_count_before_the_judge_reads_them(organism):
    from optimizer.engine.judge import load_judge
    from optimizer.engine.model import ORGANISM_PATH

    loaded, steering, directions = organism
    judged = Evaluator(
        loaded,
        load_prompts("bundled:harmful:eval", limit=16),
        load_prompts("bundled:harmless:eval", limit=4),
        load_markers(),
        EvalSettings(32, 1, 16, SYSTEM),
        judge=load_judge(str(ORGANISM_PATH)),  # any chat model can judge; this one is at hand
    )
    try:
        # Weights this large make most answers loops: degenerate whoever judges.
        steering.set({"attn": np.full(8, 20.0), "mlp": np.full(8, 20.0)}, directions.vectors[directions.best_layer])
        full = judged.refusals()
        assert full.degenerate >= 4, "needs degenerate answers to stop on"
        stopped = judged.refusals(give_up=lambda n: n >= 4)
    finally:
        steering.clear()
    assert stopped.screened and stopped.scores is None and set(stopped.verdicts) <= {"", "degenerate"}
    assert stopped.degenerate >= 4 and stopped.refused == 0
    assert all(final == "degenerate" for known, final in zip(stopped.verdicts, full.verdicts) if known)
