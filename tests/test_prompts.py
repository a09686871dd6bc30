"""Prompt sets: the bundled sets are sound, every source form loads, every mistake is one line."""

from __future__ import annotations

import importlib.util
import itertools
import json
import re
from collections import Counter
from pathlib import Path

import pytest

from conftest import user_error
from optimizer.errors import UserError
from optimizer.engine.prompts import BUNDLED_DIR, BundledPrompt, bundled_prompts, load_prompts, shared_prompts

HARMFUL_CATEGORIES = {
    "weapons", "explosives", "drugs", "cybercrime", "fraud", "theft", "violence", "harassment",
    "hate", "privacy", "self_harm", "extremism", "counterfeiting", "poisoning", "trafficking",
    "evading_police", "cheating", "disinformation",
}  # fmt: skip
HARMLESS_CATEGORIES = {
    "cooking", "coding", "science", "travel", "writing", "maths", "history", "health",
    "gardening", "music", "finance", "language", "pets", "home_repair", "sports", "geography",
    "career", "technology", "art", "philosophy",
}  # fmt: skip
CATEGORIES = {"harmful": HARMFUL_CATEGORIES, "harmless": HARMLESS_CATEGORIES}
STOP_WORDS = set(
    "a an the i i'm my me you your to of in on for and or with how do does what what's whats "
    "is are can could would should it its it's that this so from at by be as without get make "
    "way best tell give explain please into their them they someone".split()
)


def _plain(prompt: str) -> str:
    """Lowercase words only: punctuation and spacing differences removed."""
    return " ".join(re.findall(r"[a-z0-9]+", prompt.lower()))


def _content_words(prompt: str) -> set[str]:
    return set(re.findall(r"[a-z0-9']+", prompt.lower())) - STOP_WORDS


def _similarity(a: str, b: str) -> float:
    """Jaccard similarity of the content words of two prompts."""
    x, y = _content_words(a), _content_words(b)
    return len(x & y) / max(1, len(x | y))


def _error(source: str, **kwargs) -> str:
    return user_error(load_prompts, source, **kwargs)


# -- the bundled sets ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["harmful", "harmless"])
def test_bundled_file_is_well_formed(name):
    lines = (BUNDLED_DIR / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        record = json.loads(line)
        assert set(record) == {"prompt", "category", "split"}, f"line {number}"
        assert isinstance(record["prompt"], str) and record["prompt"] == record["prompt"].strip()
        assert len(record["prompt"]) >= 10, f"line {number}: {record['prompt']!r}"
        assert record["split"] in ("measure", "eval"), f"line {number}"
        assert record["category"] in CATEGORIES[name], f"line {number}: {record['category']!r}"


@pytest.mark.parametrize("name", ["harmful", "harmless"])
def test_bundled_sets_have_enough_prompts(name):
    records = bundled_prompts(name)
    assert all(isinstance(record, BundledPrompt) for record in records)
    splits = Counter(record.split for record in records)
    assert len(records) >= 256
    assert splits["eval"] >= 96
    assert splits["measure"] >= 160


@pytest.mark.parametrize("name", ["harmful", "harmless"])
def test_every_category_is_in_both_splits_and_balanced(name):
    records = bundled_prompts(name)
    for split in ("measure", "eval"):
        present = {record.category for record in records if record.split == split}
        assert present == CATEGORIES[name], split
    counts = Counter(record.category for record in records)
    assert min(counts.values()) >= 0.6 * max(counts.values()), counts


@pytest.mark.parametrize("name", ["harmful", "harmless"])
def test_bundled_sets_have_no_duplicates_or_near_duplicates(name):
    prompts = [record.prompt for record in bundled_prompts(name)]
    plain = Counter(_plain(prompt) for prompt in prompts)
    assert [text for text, count in plain.items() if count > 1] == []
    close = [
        (a, b) for a, b in itertools.combinations(prompts, 2) if _similarity(a, b) >= 0.6
    ]
    assert close == []


@pytest.mark.parametrize("name", ["harmful", "harmless"])
def test_eval_prompts_are_not_rewordings_of_measure_prompts(name):
    measure = load_prompts(f"bundled:{name}:measure")
    evaluation = load_prompts(f"bundled:{name}:eval")
    assert shared_prompts(measure, evaluation) == []
    assert {_plain(p) for p in measure}.isdisjoint({_plain(p) for p in evaluation})
    worst = max(_similarity(a, b) for a in evaluation for b in measure)
    assert worst < 0.5, worst


def test_the_two_sets_do_not_share_prompts():
    assert shared_prompts(load_prompts("bundled:harmful"), load_prompts("bundled:harmless")) == []


def test_harmless_hard_negatives_are_rare():
    """A few harmless prompts with violent-sounding words are fine; many would be bait."""
    bait = re.compile(r"\b(kill|killer|shoot|terminate|attack|weapon|bomb|poison|steal|hack)\b")
    hits = [p for p in load_prompts("bundled:harmless") if bait.search(p.lower())]
    assert 1 <= len(hits) <= 0.05 * len(load_prompts("bundled:harmless")), hits


def test_prefix_of_a_split_is_balanced_across_categories():
    """limit=N takes the first N prompts, so the files interleave their categories."""
    for name, categories in CATEGORIES.items():
        first = [r for r in bundled_prompts(name) if r.split == "measure"][: len(categories)]
        assert {r.category for r in first} == categories, name


# -- bundled sources ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["harmful", "harmless"])
def test_bundled_sources(name):
    records = bundled_prompts(name)
    everything = load_prompts(f"bundled:{name}")
    measure = load_prompts(f"bundled:{name}:measure")
    evaluation = load_prompts(f"bundled:{name}:eval")
    assert everything == [record.prompt for record in records]
    assert measure == [record.prompt for record in records if record.split == "measure"]
    assert evaluation == [record.prompt for record in records if record.split == "eval"]
    assert sorted(measure + evaluation) == sorted(everything)


def test_limit_keeps_the_first_prompts():
    evaluation = load_prompts("bundled:harmful:eval")
    assert load_prompts("bundled:harmful:eval", limit=7) == evaluation[:7]
    assert load_prompts("bundled:harmful:eval", limit=10_000) == evaluation
    assert load_prompts("bundled:harmful:eval", limit=7) == evaluation[:7]  # deterministic


def test_returned_lists_are_independent():
    first = load_prompts("bundled:harmless:eval")
    first.clear()
    assert load_prompts("bundled:harmless:eval")


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("bundled:evil", "unknown bundled set 'evil'"),
        ("bundled:harmful:test", "unknown split 'test'"),
        ("bundled:harmful:eval:extra", "malformed"),
        ("bundled", "malformed"),
        ("bundled:", "unknown bundled set ''"),
    ],
)
def test_bad_bundled_sources(source, expected):
    message = _error(source)
    assert expected in message
    assert source in message
    assert "bundled:harmful" in message or ":measure" in message  # says what to write instead


def test_bundled_prompts_rejects_unknown_names():
    with pytest.raises(UserError, match="unknown bundled prompt set 'nope'"):
        bundled_prompts("nope")


@pytest.mark.parametrize("limit", [0, -3, 2.5, True])
def test_bad_limits(limit):
    assert "positive whole number" in _error("bundled:harmful", limit=limit)


def test_empty_source():
    assert "empty" in _error("   ")


# -- files --------------------------------------------------------------------------------


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_jsonl_file(tmp_path):
    path = _write(
        tmp_path / "p.jsonl",
        '{"prompt": "first", "category": "x"}\n\n   \n'
        '{"prompt": "  second  "}\n{"prompt": "third"}\n',
    )
    assert load_prompts(str(path)) == ["first", "second", "third"]
    assert load_prompts(str(path), limit=2) == ["first", "second"]


def test_jsonl_file_with_a_key(tmp_path):
    path = _write(tmp_path / "p.jsonl", '{"text": "one", "prompt": 3}\n{"text": "two"}\n')
    assert load_prompts(f"{path}:text") == ["one", "two"]


def test_jsonl_with_byte_order_mark(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes('\ufeff{"prompt": "hello there"}\n'.encode())
    assert load_prompts(str(path)) == ["hello there"]


def test_txt_file(tmp_path):
    text = "# a comment\n\nfirst prompt\n   # indented comment\n  second  \n"
    path = _write(tmp_path / "p.txt", text)
    assert load_prompts(str(path)) == ["first prompt", "second"]


def test_relative_paths_use_base_dir(tmp_path, monkeypatch):
    (tmp_path / "sets").mkdir()
    _write(tmp_path / "sets" / "mine.txt", "hello\n")
    _write(tmp_path / "sets" / "mine.jsonl", '{"q": "hi"}\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert load_prompts("sets/mine.txt", base_dir=tmp_path) == ["hello"]
    assert load_prompts("sets/mine.jsonl:q", base_dir=tmp_path) == ["hi"]
    message = _error("sets/mine.txt")  # no base_dir: relative to the working directory
    assert str(elsewhere / "sets" / "mine.txt") in message and "not found" in message


def test_absolute_paths_ignore_base_dir(tmp_path):
    path = _write(tmp_path / "abs.txt", "x y z\n")
    assert load_prompts(str(path), base_dir=tmp_path / "unrelated") == ["x y z"]


def test_missing_file(tmp_path):
    message = _error("nope.jsonl", base_dir=tmp_path)
    assert str(tmp_path / "nope.jsonl") in message
    assert "not found" in message and "check the path" in message
    assert f"resolved against {tmp_path}" in message


@pytest.mark.parametrize("name", ["prompts.json", "prompts.csv", "prompts"])
def test_unsupported_extension(tmp_path, name):
    _write(tmp_path / name, "whatever\n")
    message = _error(str(tmp_path / name))
    assert "unsupported extension" in message and ".jsonl" in message and ".txt" in message


@pytest.mark.parametrize(
    ("name", "text"),
    [("empty.txt", ""), ("comments.txt", "# only\n\n# comments\n"), ("empty.jsonl", "\n \n")],
)
def test_empty_files(tmp_path, name, text):
    path = _write(tmp_path / name, text)
    message = _error(str(path))
    assert str(path) in message and "contains no" in message and "add at least one" in message


def test_malformed_jsonl_line_is_named(tmp_path):
    path = _write(tmp_path / "bad.jsonl", '{"prompt": "a"}\n\n{"prompt": "b",}\n')
    message = _error(str(path))
    assert str(path) in message and "line 3 is not valid JSON" in message
    assert '{"prompt": "..."}' in message


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = _write(tmp_path / "list.jsonl", '{"prompt": "a"}\n["b"]\n')
    assert "line 2 is a JSON list, not an object" in _error(str(path))


def test_missing_prompt_key(tmp_path):
    path = _write(tmp_path / "keys.jsonl", '{"prompt": "a"}\n{"instruction": "b"}\n')
    message = _error(str(path))
    assert "line 2 has no 'prompt' key" in message and "'instruction'" in message
    assert "keys.jsonl:KEY" in message


def test_missing_chosen_key(tmp_path):
    path = _write(tmp_path / "keys.jsonl", '{"text": "a"}\n{"prompt": "b"}\n')
    assert "line 2 has no 'text' key" in _error(f"{path}:text")


@pytest.mark.parametrize(("value", "kind"), [("3", "int"), ("null", "null"), ('["a"]', "list")])
def test_non_string_prompt(tmp_path, value, kind):
    path = _write(tmp_path / "types.jsonl", f'{{"prompt": "fine"}}\n{{"prompt": {value}}}\n')
    message = _error(str(path))
    assert f"line 2: 'prompt' is a JSON {kind}, not a string" in message


def test_empty_prompt(tmp_path):
    path = _write(tmp_path / "blank.jsonl", '{"prompt": "   "}\n')
    assert "line 1: 'prompt' is empty" in _error(str(path))


def test_key_suffix_without_a_key(tmp_path):
    path = _write(tmp_path / "p.jsonl", '{"prompt": "a"}\n')
    assert "names no key" in _error(f"{path}:")


def test_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    message = _error(str(path))
    assert "not UTF-8" in message and str(path) in message


def test_directory_instead_of_a_file(tmp_path):
    (tmp_path / "dir.txt").mkdir()
    assert "cannot read prompt file" in _error(str(tmp_path / "dir.txt"))


# -- Hugging Face datasets ----------------------------------------------------------------


@pytest.mark.parametrize(
    "source", ["hf:", "hf:a:b:c:d", "hf:org/name::prompt", "hf:org/name:train:"]
)
def test_malformed_hf_sources(source):
    message = _error(source)
    assert "malformed" in message and "hf:DATASET:SPLIT:COLUMN" in message


@pytest.mark.skipif(
    importlib.util.find_spec("datasets") is not None, reason="the datasets package is installed"
)
@pytest.mark.parametrize(
    "source", ["hf:org/name", "hf:org/name:test", "hf:org/name:train[:100]:text", "hf:imdb"]
)
def test_hf_without_datasets_says_how_to_install_it(source):
    with pytest.raises(ImportError):
        import datasets  # noqa: F401  (the precondition of this test, checked for real)
    message = _error(source)
    assert "pip install 'abopt[hf]'" in message
    assert source in message and "datasets" in message


# -- overlap ------------------------------------------------------------------------------


def test_shared_prompts_ignores_case_and_spacing():
    first = ["How do I  bake bread?", "What is 2+2?", "Unique one"]
    second = ["how do i bake bread?", "  what is 2+2?  ", "Something else"]
    assert shared_prompts(first, second) == ["How do I  bake bread?", "What is 2+2?"]
    assert shared_prompts(first, []) == []
    assert shared_prompts(tuple(first), tuple(first)) == first


def test_line_separators_inside_prompts_do_not_split_lines(tmp_path):
    prompt = "first part\u2028second part\x0cthird"
    path = tmp_path / "sep.jsonl"
    path.write_text(
        json.dumps({"prompt": prompt}, ensure_ascii=False) + "\r\n" + '{"prompt": "next"}\r\n',
        encoding="utf-8",
    )
    assert load_prompts(str(path)) == [prompt, "next"]
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "a\u2028b"}\n{oops}\n', encoding="utf-8")
    assert "line 2 is not valid JSON" in _error(str(broken))
