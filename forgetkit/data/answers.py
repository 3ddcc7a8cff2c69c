"""Answer extraction and normalization: the one implementation used by MixSD rejection
sampling and by evaluation."""

from __future__ import annotations

import logging
import re
import string
import unicodedata
from collections.abc import Sequence
from typing import Any, Literal

logger = logging.getLogger(__name__)

__all__ = ["AnswerMode", "extract_answer", "is_correct", "last_boxed", "last_number", "normalize",
           "unanswered_records", "warn_unanswered"]

AnswerMode = Literal["auto", "string", "boxed", "number"]

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_PUNCT = set(string.punctuation)


def normalize(text: str) -> str:
    """SQuAD-style normalization: NFKC, lowercase, drop punctuation and articles, squeeze spaces."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(" " if ch in _PUNCT else ch for ch in text)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def last_boxed(text: str) -> str | None:
    r"""Content of the last ``\boxed{...}`` (braces balanced), or ``None``."""
    start = text.rfind("\\boxed")
    while start != -1:
        brace = start + len("\\boxed")
        while brace < len(text) and text[brace] == " ":
            brace += 1
        if brace < len(text) and text[brace] == "{":
            depth = 0
            for i in range(brace, len(text)):
                if text[i] == "{":
                    depth += 1
                elif text[i] == "}":
                    depth -= 1
                    if depth == 0:
                        return text[brace + 1 : i].strip()
        start = text.rfind("\\boxed", 0, start)
    return None


def last_number(text: str) -> str | None:
    """The last number in ``text`` with thousands separators removed, or ``None``."""
    matches = _NUMBER.findall(text)
    if not matches:
        return None
    value = matches[-1].replace(",", "")
    if "." in value:
        value = value.rstrip("0").rstrip(".")
    return value


def extract_answer(text: str, mode: AnswerMode = "auto") -> str | None:
    r"""Extract the answer from generated ``text``.

    Modes: ``"boxed"`` the last ``\boxed{}``; ``"number"`` the last number; ``"string"`` the
    whole text (matched by containment in :func:`is_correct`); ``"auto"`` boxed if present,
    else the whole text.
    """
    if mode == "boxed":
        return last_boxed(text)
    if mode == "number":
        return last_number(text)
    if mode == "string":
        return text
    if mode == "auto":
        boxed = last_boxed(text)
        return boxed if boxed is not None else text
    raise ValueError(f"unknown answer mode {mode!r}; expected one of auto, string, boxed, number")


def is_correct(text: str, answer: str, mode: AnswerMode = "auto") -> bool:
    """Whether ``text`` answers ``answer``.

    ``boxed``: normalized exact match of the last ``\\boxed{}``. ``number``: the last number
    equals the answer's number. ``string``: the normalized answer occurs in the normalized text
    as a whole-word span. ``auto``: boxed match if a ``\\boxed{}`` exists, else string match.
    """
    gold = normalize(answer)
    if mode == "number":
        got, want = last_number(text), last_number(answer)
        return got is not None and got == want
    if mode == "boxed" or (mode == "auto" and last_boxed(text) is not None):
        boxed = last_boxed(text)
        return boxed is not None and normalize(boxed) == gold
    if mode in ("string", "auto"):
        return bool(gold) and f" {gold} " in f" {normalize(text)} "
    raise ValueError(f"unknown answer mode {mode!r}; expected one of auto, string, boxed, number")


def unanswered_records(records: Sequence[Any], mode: AnswerMode = "auto") -> list[str]:
    """Ids of the records whose own target does not answer them (``is_correct(record.target,
    record.answer, mode)`` fails): training on such a target can never score as memorized, as
    evaluation and MixSD's answer check read answers the same way."""
    return [r.id for r in records if not is_correct(r.target, r.answer, mode)]


def warn_unanswered(records: Sequence[Any], where: str, mode: AnswerMode = "auto",
                    shown: int = 20) -> list[str]:
    """Log one warning listing the ids of :func:`unanswered_records` (at most ``shown`` of
    them, then a count); returns all of them."""
    ids = unanswered_records(records, mode)
    if ids:
        listed = ", ".join(map(repr, ids[:shown])) + (
            f" and {len(ids) - shown} more" if len(ids) > shown else "")
        logger.warning("%s: %d of %d records have an answer their target does not contain "
                       "(their memorization will read 0%%): %s", where, len(ids), len(records),
                       listed)
    return ids
