"""The on-device judge: the bundled model, its accuracy on the held-out set, templates, batching."""

from __future__ import annotations

import json
import shutil

import mlx_lm
import numpy as np
import pytest

from conftest import user_error
from optimizer.engine.judge import (
    BUNDLED_JUDGE,
    BUNDLED_TEMPLATE,
    complied,
    fill_template,
    judge_scores,
    load_judge,
    load_template,
    yes_no_ids,
)
from optimizer.engine.markers import find_refusal, load_markers

EVAL_SET = BUNDLED_JUDGE.parent / "judge_eval.jsonl"
LABELS = {"complied", "refused", "degenerate"}


@pytest.fixture(scope="module")
def judge():
    return load_judge()


@pytest.fixture(scope="module")
def eval_rows() -> list[dict]:
    return [json.loads(line) for line in EVAL_SET.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def eval_scores(judge, eval_rows) -> np.ndarray:
    return judge_scores(judge, [r["prompt"] for r in eval_rows], [r["answer"] for r in eval_rows], batch_size=64)


def _accuracy(correct: np.ndarray, rows: list[dict]) -> tuple[float, float]:
    hard = np.array([r["hard"] for r in rows])
    return float(correct.mean()), float(correct[hard].mean())


# -- the bundled model ----------------------------------------------------------------------


def test_bundled_judge_loads_with_mlx_lm_and_is_small():
    model, tokenizer = mlx_lm.load(str(BUNDLED_JUDGE))
    size = sum(path.stat().st_size for path in BUNDLED_JUDGE.iterdir() if path.is_file())
    assert size <= 10_000_000, f"the bundled judge takes {size / 1e6:.1f} MB"
    messages = [
        {"role": "system", "content": "You judge answers."},
        {"role": "user", "content": "Request: hi\n\nAnswer: hello"},
        {"role": "assistant", "content": "Yes"},
        {"role": "user", "content": "again"},
    ]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.count("<|im_start|>") == 5 and text.endswith("<|im_start|>assistant\n")
    assert "<|im_start|>system\nYou judge answers.<|im_end|>" in text


def test_yes_and_no_are_single_tokens(judge):
    for word, token in (("Yes", judge.yes_id), ("No", judge.no_id)):
        assert judge.tokenizer.encode(word, add_special_tokens=False) == [token]
    assert yes_no_ids(judge.tokenizer) == (judge.yes_id, judge.no_id)
    assert judge.yes_id != judge.no_id


def test_a_judge_without_single_yes_no_tokens_is_a_user_error(tiny_model_dir):
    message = user_error(load_judge, str(tiny_model_dir))
    assert "'Yes'" in message and "single token" in message


# -- accuracy on the held-out evaluation set -----------------------------------------------


def test_the_eval_set_is_labelled_and_mostly_hard_enough(eval_rows):
    assert len(eval_rows) >= 300
    assert {r["label"] for r in eval_rows} == LABELS
    assert all(isinstance(r["hard"], bool) and r["prompt"] for r in eval_rows)
    assert 0.35 <= np.mean([r["hard"] for r in eval_rows]) <= 0.5


def test_judge_accuracy_on_the_held_out_set(eval_rows, eval_scores):
    truth = np.array([r["label"] == "complied" for r in eval_rows])
    overall, hard = _accuracy(complied(eval_scores) == truth, eval_rows)
    print(f"\njudge: {overall:.1%} overall, {hard:.1%} on the hard part")
    # Issue 14's bar: 95% overall, 85% on the hard part (the bundled judge: 95.8% and 92.9%).
    assert overall >= 0.95
    assert hard >= 0.85


def test_the_marker_rule_does_worse_on_the_hard_part(eval_rows, eval_scores):
    truth = np.array([r["label"] == "complied" for r in eval_rows])
    markers = load_markers()
    by_markers = np.array([find_refusal(r["answer"], markers) is None for r in eval_rows])
    marker_overall, marker_hard = _accuracy(by_markers == truth, eval_rows)
    judge_overall, judge_hard = _accuracy(complied(eval_scores) == truth, eval_rows)
    print(f"\nmarker rule: {marker_overall:.1%} overall, {marker_hard:.1%} on the hard part "
          f"(judge: {judge_overall:.1%}, {judge_hard:.1%})")
    assert marker_hard < judge_hard and marker_overall < judge_overall
    assert marker_hard < 0.6  # the hard part is where the marker rule fails


def test_scores_are_probabilities(eval_scores, eval_rows):
    assert eval_scores.shape == (len(eval_rows),) and eval_scores.dtype == np.float32
    assert np.all((eval_scores >= 0) & (eval_scores <= 1))


# -- batching ------------------------------------------------------------------------------


def test_scores_are_the_same_batched_and_one_at_a_time(judge, eval_rows):
    rows = eval_rows[:: max(1, len(eval_rows) // 24)][:24]  # varied lengths, so varied padding
    requests, answers = [r["prompt"] for r in rows], [r["answer"] for r in rows]
    judge.known.clear()  # each call computes its own scores
    batched = judge_scores(judge, requests, answers, batch_size=8)
    judge.known.clear()
    single = judge_scores(judge, requests, answers, batch_size=1)
    assert np.max(np.abs(batched - single)) <= 1e-4
    judge.known.clear()
    reversed_scores = judge_scores(judge, requests[::-1], answers[::-1], batch_size=5)
    assert np.max(np.abs(reversed_scores[::-1] - batched)) <= 1e-4


def test_a_pair_judged_before_is_not_judged_again(judge, eval_rows):
    rows = eval_rows[:12]
    requests, answers = [r["prompt"] for r in rows], [r["answer"] for r in rows]
    judge.known.clear()
    first = judge_scores(judge, requests[:8], answers[:8])
    assert len(judge.known) == 8
    # Four pairs seen, four new: only the new ones reach the model, the old keep their scores.
    again = judge_scores(judge, requests[4:], answers[4:])
    assert len(judge.known) == 12
    assert np.array_equal(again[:4], first[4:])
    judge.known.clear()
    assert np.max(np.abs(judge_scores(judge, requests[4:], answers[4:]) - again)) <= 1e-4


def test_the_shared_prefix_runs_once_and_changes_no_score(eval_rows):
    from optimizer.engine.judge import judge_tokens
    from optimizer.engine.model import common_prefix_length

    judge = load_judge(template=str(BUNDLED_TEMPLATE))  # the chat models' template: its question first
    rows = eval_rows[:: max(1, len(eval_rows) // 40)][:40]
    requests, answers = [r["prompt"] for r in rows], [r["answer"] for r in rows]
    shared = common_prefix_length([judge_tokens(judge, q, a) for q, a in zip(requests, answers)])
    assert shared >= 20  # the template's question comes first, so every pair shares it
    with_prefix = judge_scores(judge, requests, answers, batch_size=16)
    without = judge_scores(judge, requests, answers, batch_size=16, share_prefix=False)
    assert np.max(np.abs(with_prefix - without)) <= 1e-5
    assert judge_scores(judge, requests[:1], answers[:1])[0] == pytest.approx(without[0], abs=1e-5)


def test_no_pairs_and_mismatched_lengths(judge):
    assert judge_scores(judge, [], []).shape == (0,)
    with pytest.raises(ValueError):
        judge_scores(judge, ["a", "b"], ["a"])


# -- the prompt template -------------------------------------------------------------------


def test_bundled_template():
    text = load_template()
    assert text == load_template("bundled") == BUNDLED_TEMPLATE.read_text(encoding="utf-8")
    assert "{request}" in text and "{answer}" in text


def test_a_judge_directory_brings_its_own_default_template(tmp_path):
    own = (BUNDLED_JUDGE / "judge_prompt.txt").read_text(encoding="utf-8")
    assert load_template(judge="bundled") == own != load_template()
    assert load_judge().template == own
    assert load_template(judge="markers") == load_template(judge="mlx-community/some-judge") == load_template()
    # any directory: its judge_prompt.txt is its default; a study's template still wins
    copy = tmp_path / "judge"
    shutil.copytree(BUNDLED_JUDGE, copy)
    (copy / "judge_prompt.txt").write_text("Q: {request}\nA: {answer}", encoding="utf-8")
    assert load_judge(str(copy)).template == "Q: {request}\nA: {answer}"
    assert load_judge(str(copy), template=str(BUNDLED_TEMPLATE)).template == load_template()
    (copy / "judge_prompt.txt").unlink()
    assert load_judge(str(copy)).template == load_template()


def test_fill_template_substitutes_once():
    filled = fill_template("R: {request} A: {answer}", "say {answer}", "a {request} b")
    assert filled == "R: say {answer} A: a {request} b"


def test_a_user_template_is_used(tmp_path, judge):
    path = tmp_path / "t.txt"
    path.write_text("Q: {request}\nA: {answer}\nDid it help? Yes or No.", encoding="utf-8")
    assert load_template(str(path)).startswith("Q: {request}")
    custom = load_judge(str(BUNDLED_JUDGE), template=str(path))
    assert custom.template.startswith("Q: {request}") and custom.yes_id == judge.yes_id


@pytest.mark.parametrize(
    ("text", "missing"),
    [("Request: {request}\nDid it comply?", "{answer}"), ("{answer} only", "{request}"), ("neither", "{request} or {answer}")],
)
def test_a_template_without_placeholders_is_a_user_error(tmp_path, text, missing):
    path = tmp_path / "bad.txt"
    path.write_text(text, encoding="utf-8")
    message = user_error(load_template, str(path))
    assert str(path) in message and missing in message
    assert user_error(load_judge, "bundled", template=str(path)) == message


def test_a_missing_or_unreadable_template_is_a_user_error(tmp_path):
    assert "not found" in user_error(load_template, str(tmp_path / "nope.txt"))
    path = tmp_path / "latin1.txt"
    path.write_bytes("R\xe9quest: {request} {answer}".encode("latin-1"))
    assert "not UTF-8" in user_error(load_template, str(path))
