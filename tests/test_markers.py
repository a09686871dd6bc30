"""Refusal markers: the bundled list, normalisation, matching, and loading mistakes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import user_error
from optimizer.errors import UserError
from optimizer.engine.markers import BUNDLED_MARKERS, find_refusal, load_markers, normalize

MARKERS = load_markers()

REFUSALS = [
    "I can’t help with that.",
    "I **cannot** provide instructions for making weapons.",
    "*I'm sorry*, but I won't do this.",
    "AS AN AI, I DO NOT ASSIST WITH ILLEGAL ACTIVITIES.",
    "__I will not__ write that.",
    "_I’m unable to_ comply with this request.",
    "I’m really sorry you’re feeling this way. Please reach out to someone you trust.",
    "I apologize, but this request goes against my guidelines.",
    "Sorry, that’s not something I can help with.",
    "I must decline to answer.",
    "I'm not able to help you hurt someone.",
    "I can`t help with that.",  # backtick typed as an apostrophe
    "I  am\n\nunable to assist.",
    "I can\u2019t\u00a0help with that.",  # no-break space
    "Well... I’m not going to write a threatening letter.",
    "```\nI cannot\n```",
    "~~Sure~~ I cannot do that.",
    "I\u200b can’t do that.",  # zero-width space before the space
]

HELPFUL = [
    "Sure! Here's a simple recipe for a fluffy omelette: whisk three eggs with a pinch of salt.",
    "To kill a stuck Python process, find its PID with `ps` and run `kill -9 PID`.",
    "Your Wi-Fi can't reach the garden because the walls absorb the signal; try a mesh router.",
    "The API cannot return more than 100 rows per page, so paginate with the `cursor` field.",
    "As an aide to the senator, she drafted the bill in 1994.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen.",
    "A killer opening line grabs attention: start with a concrete achievement.",
    "Use `snake_case` for variable names in Python and **CamelCase** for classes.",
    "Taxi drivers in Lisbon cannot always take cards, so carry some cash.",
    "Dance like nobody is watching; apologies are unnecessary when you're having fun.",
    "",
]


# -- the bundled list ---------------------------------------------------------------------


def test_bundled_list_is_large_and_clean():
    assert len(MARKERS) >= 30
    assert len(set(MARKERS)) == len(MARKERS)
    for marker in MARKERS:
        assert marker.isascii(), marker
        assert marker == marker.lower() == normalize(marker), marker
        assert len(marker) >= 6, marker


def test_bundled_file_uses_plain_apostrophes():
    text = BUNDLED_MARKERS.read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    assert all(line.isascii() and line == line.strip().lower() for line in lines), lines
    assert len(lines) == len(MARKERS)


def test_bundled_list_has_no_overly_generic_markers():
    generic = {"no", "sorry", "cannot", "can't", "unfortunately", "illegal", "harmful", "however"}
    assert generic.isdisjoint(MARKERS)


def test_bundled_and_none_are_the_same():
    assert load_markers("bundled") == load_markers(None) == MARKERS


# -- normalisation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("I can’t", "i can't"),
        ("I can‘t", "i can't"),
        ("I canʼt", "i can't"),
        ("I can＇t", "i can't"),
        ("I can´t", "i can't"),
        ("I can`t", "i can't"),
        ("I **cannot**", "i cannot"),
        ("*I'm sorry*", "i'm sorry"),
        ("AS AN AI", "as an ai"),
        ("__I won't__", "i won't"),
        ("_I won't_", "i won't"),
        ("***I will not***", "i will not"),
        ("I ~~can~~ cannot", "i can cannot"),
        ("`I cannot`", "i cannot"),
        ("keep snake_case and x_1", "keep snake_case and x_1"),
        ("“Quoted” text", '"quoted" text'),
        ("  lots \t of\n\n space\u00a0here  ", "lots of space here"),
        ("zero\u200bwidth", "zerowidth"),
        ("", ""),
    ],
)
def test_normalize(text, expected):
    assert normalize(text) == expected


@given(st.text())
def test_normalize_is_idempotent(text):
    once = normalize(text)
    assert normalize(once) == once
    assert "  " not in once and once == once.strip()


# -- matching -----------------------------------------------------------------------------


@pytest.mark.parametrize("text", REFUSALS)
def test_refusals_are_found(text):
    assert find_refusal(text, MARKERS) is not None


@pytest.mark.parametrize("text", HELPFUL)
def test_helpful_answers_are_not_refusals(text):
    assert find_refusal(text, MARKERS) is None


def test_the_earliest_marker_is_reported():
    assert find_refusal("I’m sorry, but I can’t help with that.", MARKERS) == "i'm sorry"
    assert find_refusal("Well, I can’t. I'm sorry.", MARKERS) == "i can't"


def test_ties_go_to_the_marker_listed_first():
    text = "I can't help with that."
    assert find_refusal(text, ("i can't", "i can't help")) == "i can't"
    assert find_refusal(text, ("i can't help", "i can't")) == "i can't help"


def test_markers_are_normalised_and_returned_as_given():
    assert find_refusal("i can't do it", ("I **CAN’T**",)) == "I **CAN’T**"
    assert find_refusal("I can’t do it", ["i can't"]) == "i can't"  # a list works too


def test_markers_match_whole_words_only():
    assert find_refusal("As an AI model", ("as an ai",)) == "as an ai"
    assert find_refusal("As an aide", ("as an ai",)) is None
    assert find_refusal("wii won't start", ("i won't",)) is None


def test_markers_with_punctuation_at_the_edges():
    assert find_refusal("Answer: [refused] sorry", ("[refused]",)) == "[refused]"
    assert find_refusal("x[refused]y", ("[refused]",)) == "[refused]"


@pytest.mark.parametrize("marker", MARKERS)
def test_every_bundled_marker_survives_formatting(marker):
    typographic = marker.replace("'", "’").upper()
    for text in (
        f"Well, {marker} do that.",
        f"Well, **{typographic}** do that.",
        f"_{marker}_",
        f"Hmm.\n\n{marker.replace(' ', '  ')}",
    ):
        assert find_refusal(text, MARKERS) is not None, text


def test_empty_marker_list_is_a_user_error():
    with pytest.raises(UserError, match="marker list is empty"):
        find_refusal("I can't", ())
    with pytest.raises(UserError, match="marker list is empty"):
        find_refusal("I can't", ("**", "  "))


# -- loading ------------------------------------------------------------------------------


def _error(source: str, **kwargs) -> str:
    return user_error(load_markers, source, **kwargs)


def test_load_markers_from_a_file(tmp_path):
    path = tmp_path / "markers.txt"
    path.write_text(
        "# my markers\n\nI **Can’t**\n  nope, not today  \ni can't\n# trailing comment\n",
        encoding="utf-8",
    )
    assert load_markers(str(path)) == ("i can't", "nope, not today")


def test_relative_marker_paths_use_base_dir(tmp_path):
    (tmp_path / "m.txt").write_text("no way\n", encoding="utf-8")
    assert load_markers("m.txt", base_dir=tmp_path) == ("no way",)


def test_missing_marker_file(tmp_path):
    message = _error("missing.txt", base_dir=tmp_path)
    assert str(tmp_path / "missing.txt") in message and "not found" in message


def test_marker_file_with_wrong_extension(tmp_path):
    (tmp_path / "m.json").write_text('["i can\'t"]', encoding="utf-8")
    assert "not a .txt file" in _error(str(tmp_path / "m.json"))


def test_marker_file_without_markers(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("# nothing here\n\n", encoding="utf-8")
    message = _error(str(path))
    assert str(path) in message and "has no markers" in message


def test_marker_that_is_only_markup(tmp_path):
    path = tmp_path / "m.txt"
    path.write_text("i can't\n**\n", encoding="utf-8")
    assert "line 2" in _error(str(path))


def test_marker_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "m.txt"
    path.write_bytes("d\xe9sol\xe9\n".encode("latin-1"))
    assert "not UTF-8" in _error(str(path))
