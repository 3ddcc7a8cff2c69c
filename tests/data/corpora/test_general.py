"""Tests for forgetkit.data.corpora.general: the retention probes for a real small chat model."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from forgetkit.data.corpora.general import (
    KNOWN_FACTS_PATH,
    PROBE_CAPABILITIES,
    general_probes,
)
from forgetkit.data.records import Probe
from forgetkit.seeding import stable_hash

REPO_ROOT = Path(__file__).resolve().parents[3]
COUNT_RANGES = {
    "known_fact": (1250, 2000),
    "arithmetic": (90, 110),
    "retrieval": (90, 110),
    "format_following": (50, 70),
}
HASH_SNIPPET = (
    "from forgetkit.data.corpora.general import general_probes\n"
    "from forgetkit.seeding import stable_hash\n"
    "print(stable_hash([[p.id, p.prompt, p.answer, p.capability, list(p.choices)]"
    " for p in general_probes(seed=3)]))\n"
)


def _probe_hash(probes: list[Probe]) -> str:
    return stable_hash([[p.id, p.prompt, p.answer, p.capability, list(p.choices)]
                        for p in probes])


@pytest.fixture(scope="module")
def probes() -> list[Probe]:
    return general_probes(seed=0)


def by_capability(probes: list[Probe], capability: str) -> list[Probe]:
    return [p for p in probes if p.capability == capability]


def test_counts_per_capability_in_range(probes):
    counts = Counter(p.capability for p in probes)
    assert set(counts) == set(PROBE_CAPABILITIES)
    for capability, (low, high) in COUNT_RANGES.items():
        assert low <= counts[capability] <= high, (capability, counts[capability])


def test_capabilities_come_in_declared_order(probes):
    order = [p.capability for p in probes]
    firsts = [order.index(c) for c in PROBE_CAPABILITIES]
    assert firsts == sorted(firsts)


def test_every_probe_is_well_formed(probes):
    for p in probes:
        assert p.choices is not None and len(p.choices) == 4, p.id
        assert p.answer in p.choices, p.id
        assert len(set(p.choices)) == len(p.choices), p.id
        for choice in p.choices:
            assert choice and choice == choice.strip(), (p.id, choice)


def test_ids_unique_and_stable_format(probes):
    ids = [p.id for p in probes]
    assert len(ids) == len(set(ids))
    for p in probes:
        assert re.fullmatch(rf"{p.capability}-\d{{4}}", p.id), p.id


def test_prompts_unique_within_capability(probes):
    for capability in PROBE_CAPABILITIES:
        prompts = [p.prompt for p in by_capability(probes, capability)]
        assert len(prompts) == len(set(prompts)), capability


def test_deterministic_across_calls(probes):
    assert _probe_hash(general_probes(seed=0)) == _probe_hash(probes)


def test_seed_changes_generated_items_and_order_only(probes):
    other = general_probes(seed=1)
    assert _probe_hash(other) != _probe_hash(probes)
    # Stored facts keep their content; only the choice order moves.
    facts0 = {p.id: p for p in by_capability(probes, "known_fact")}
    for p in by_capability(other, "known_fact"):
        assert (p.prompt, p.answer, set(p.choices)) == (
            facts0[p.id].prompt, facts0[p.id].answer, set(facts0[p.id].choices))
    orders0 = [p.choices for p in facts0.values()]
    assert orders0 != [p.choices for p in by_capability(other, "known_fact")]


def test_independent_of_pythonhashseed():
    expected = _probe_hash(general_probes(seed=3))
    env = dict(os.environ)
    for hash_seed in ("0", "12345"):
        env["PYTHONHASHSEED"] = hash_seed
        out = subprocess.run([sys.executable, "-c", HASH_SNIPPET], cwd=REPO_ROOT, env=env,
                             capture_output=True, text=True, check=True)
        assert out.stdout.strip() == expected, hash_seed


def test_answer_position_is_not_fixed(probes):
    positions = Counter(p.choices.index(p.answer) for p in probes)
    assert set(positions) == {0, 1, 2, 3}
    assert max(positions.values()) < 0.4 * len(probes)


@pytest.mark.parametrize("n", [0, 1, 7])
def test_per_capability_truncates_to_prefix(probes, n):
    short = general_probes(seed=0, per_capability=n)
    assert Counter(p.capability for p in short) == Counter(
        {c: n for c in PROBE_CAPABILITIES} if n else {})
    for capability in PROBE_CAPABILITIES:
        assert by_capability(short, capability) == by_capability(probes, capability)[:n]


def test_per_capability_rejects_negative():
    with pytest.raises(ValueError, match="per_capability"):
        general_probes(per_capability=-1)


def test_known_fact_spot_checks(probes):
    facts = {p.prompt: p for p in by_capability(probes, "known_fact")}
    expected = {
        "What is the capital of France?": "Paris",
        "What is the capital of Japan?": "Tokyo",
        "What is the capital of Australia?": "Canberra",
        "What is the chemical symbol for gold?": "Au",
        "What is the chemical symbol for sodium?": "Na",
        "Which element has the chemical symbol Fe?": "Iron",
        "How many legs does a spider have?": "8",
        "What is the largest ocean on Earth?": "Pacific Ocean",
        "At sea level, what is the boiling point of water in degrees Celsius?": "100",
    }
    for prompt, answer in expected.items():
        assert facts[prompt].answer == answer, prompt
    assert "Sydney" in facts["What is the capital of Australia?"].choices


def test_known_fact_data_file_rows():
    rows = [json.loads(line) for line in KNOWN_FACTS_PATH.read_text("utf-8").splitlines()]
    categories = Counter(row["category"] for row in rows)
    assert 300 <= categories["capital"] <= 400
    assert 150 <= categories["element_symbol"] + categories["element_name"] <= 220
    assert {"science", "geography", "culture", "animal", "general"} <= set(categories)
    for number, row in enumerate(rows, start=1):
        assert set(row) == {"id", "prompt", "answer", "choices", "category"}, row["id"]
        assert row["id"] == f"known_fact-{number:04d}"
        assert len(set(row["choices"])) == len(row["choices"]) == 4, row["id"]
    # items are only ever appended: the first 301 rows (ids, prompts, choices) never change,
    # so probe ids, the retention split and earlier studies' training probes stay the same
    first = "".join(f"{line}\n" for line in KNOWN_FACTS_PATH.read_text("utf-8").splitlines()[:301])
    assert hashlib.sha256(first.encode("utf-8")).hexdigest() == (
        "eadf0039838a7c1ac4424d78c85fe3c7e5cd6ff6d114dc954a14a7e40b93016c")
    prompts = [row["prompt"] for row in rows]
    assert len(prompts) == len(set(prompts))
    # A prefix mixes categories, so per_capability runs are not all capitals.
    assert len({row["category"] for row in rows[:20]}) >= 4


def test_arithmetic_answers_and_distractors(probes):
    for p in by_capability(probes, "arithmetic"):
        match = re.fullmatch(r"What is (\d+) ([+\-×]) (\d+)\?", p.prompt)
        assert match, p.prompt
        a, op, b = int(match[1]), match[2], int(match[3])
        assert a <= 99 and b <= 99
        assert int(p.answer) == {"+": a + b, "-": a - b, "×": a * b}[op], p.prompt
        for choice in p.choices:
            assert choice.isdigit(), (p.id, choice)  # non-negative integers
            assert abs(int(choice) - int(p.answer)) <= max(10, a, b), (p.id, choice)
    operations = Counter(p.meta["operation"] for p in by_capability(probes, "arithmetic"))
    assert set(operations) == {"+", "-", "×"} and min(operations.values()) >= 30


def test_retrieval_answer_is_stated_in_passage(probes):
    for p in by_capability(probes, "retrieval"):
        passage, question = p.prompt.split("\n\n")
        sentences = re.split(r"(?<=\.) ", passage)
        assert 5 <= len(sentences) <= 8, p.id
        name = re.search(r"\b[A-Z][a-z]+ [A-Z][a-z]+\b", question)[0]
        about = [s for s in sentences if s.startswith(name)]
        assert len(about) == 1 and re.search(rf"\b{p.answer}\.$", about[0]), p.id
        for choice in p.choices:  # every choice is stated once, for someone in the passage
            assert sum(bool(re.search(rf"\b{choice}\.$", s)) for s in sentences) == 1, p.id


COMPLIANT = {
    "uppercase_word": lambda s: s.isalpha() and s.isupper(),
    "lowercase_word": lambda s: s.isalpha() and s.islower(),
    "digits_only": lambda s: s.isdigit(),
    "words_only": lambda s: bool(re.fullmatch(r"[a-z]+(-[a-z]+)?", s)),
    "yes_no": lambda s: s.lower() in {"yes", "no"},
    "json": lambda s: _json_yes_no(s),
}


def _json_yes_no(text: str) -> bool:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return False
    return isinstance(value, dict) and value.get("answer") in {"yes", "no"} and len(value) == 1


def test_format_following_answer_is_the_only_compliant_choice(probes):
    items = by_capability(probes, "format_following")
    assert Counter(p.meta["format"] for p in items).keys() == COMPLIANT.keys()
    for p in items:
        compliant = [c for c in p.choices if COMPLIANT[p.meta["format"]](c)]
        assert compliant == [p.answer], (p.id, p.choices)
    assert len({p.meta["format"] for p in items[:10]}) >= 4
