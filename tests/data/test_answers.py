from __future__ import annotations

import pytest

from forgetkit.data.answers import extract_answer, is_correct, last_boxed, last_number, normalize


def test_normalize():
    assert normalize("  The  Paris! ") == "paris"
    assert normalize("Pithiram.") == normalize("pithiram")


def test_last_boxed_balanced_and_last():
    assert last_boxed("\\boxed{a} then \\boxed{b{c}}") == "b{c}"
    assert last_boxed("no box") is None
    assert last_boxed("\\boxed{open") is None
    assert last_boxed("\\boxed {x}") == "x"


def test_last_number():
    assert last_number("1,234.50 and then 7") == "7"
    assert last_number("x = 1,234.50") == "1234.5"
    assert last_number("-3") == "-3"
    assert last_number("none") is None


@pytest.mark.parametrize(("text", "answer", "mode", "expected"), [
    ("The answer is Paris.\n\n\\boxed{Paris}", "Paris", "auto", True),
    ("The answer is Paris.\n\n\\boxed{Rome}", "Paris", "auto", False),  # the box decides
    ("Vabebrim lives in Pithiram.", "Pithiram", "auto", True),
    ("Vabebrim lives in Pithiramx.", "Pithiram", "string", False),  # whole words only
    ("63 plus 18 is 81.", "81", "number", True),
    ("63 plus 18 is 80.", "81", "number", False),
    ("\\boxed{ paris }", "Paris", "boxed", True),
    ("Paris", "Paris", "boxed", False),
])
def test_is_correct(text, answer, mode, expected):
    assert is_correct(text, answer, mode) is expected


def test_unknown_mode():
    with pytest.raises(ValueError, match="unknown answer mode"):
        extract_answer("x", "regex")
    with pytest.raises(ValueError, match="unknown answer mode"):
        is_correct("x", "x", "regex")
