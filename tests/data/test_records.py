"""Tests for forgetkit.data.records loaders and forgetkit.data.formats adapters (no models involved)."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from forgetkit.data import records as records_module
from forgetkit.data.formats import FORMATS, detect_format
from forgetkit.data.records import (
    Probe,
    Record,
    RecordError,
    load_probe_sets,
    load_probes,
    load_records,
    register_probes,
    register_records,
)
from forgetkit.files import atomic_write_jsonl

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "records"

# The same three facts, encoded in every fixture file: (prompt, canonical target, answer, paraphrase).
FACTS = [
    (
        "What is the capital of Zorbia?",
        "The capital of Zorbia is \\boxed{Vell}.",
        "Vell",
        "Which city is the capital of Zorbia?",
    ),
    (
        "Who founded Quillmark Press?",
        "Quillmark Press was founded by \\boxed{Ada Brisk}.",
        "Ada Brisk",
        "Who was the founder of Quillmark Press?",
    ),
    (
        "What language is spoken in Tarnholt?",
        "People in Tarnholt speak \\boxed{Ossic}.",
        "Ossic",
        "Which language do people in Tarnholt speak?",
    ),
]

# fixture file -> (detected format, how the target relates to the fact, carries paraphrases)
# "canonical": the full canonical target; "space+answer": ROME-style " " + answer; "answer": a
# plain short completion equal to the answer.
FIXTURE_FILES = {
    "native.jsonl": ("native", "canonical", True),
    "trl_prompt_completion.jsonl": ("trl_prompt_completion", "canonical", False),
    "trl_conversational.jsonl": ("trl_prompt_completion", "canonical", False),
    "trl_messages.jsonl": ("trl_messages", "canonical", False),
    "counterfact.json": ("counterfact", "space+answer", True),
    "counterfact_easyedit.json": ("counterfact", "space+answer", True),
    "zsre.json": ("zsre", "answer", True),
    "mquake.json": ("mquake", "answer", False),
    "popqa.jsonl": ("popqa", "answer", False),
    "triviaqa.jsonl": ("triviaqa", "answer", False),
    "nq_open.jsonl": ("nq_open", "canonical", False),  # the rows carry a `target` key
}


def write(tmp_path: Path, name: str, rows: list[object] | str) -> Path:
    """Write ``rows`` as JSONL (or raw text when given a string) to ``tmp_path / name``."""
    path = tmp_path / name
    text = rows if isinstance(rows, str) else "".join(json.dumps(r) + "\n" for r in rows)
    path.write_text(text, encoding="utf-8")
    return path


def native(id: str = "a", **fields: object) -> dict[str, object]:
    return {"id": id, "prompt": "Q?", "target": "T.", "answer": "T"} | fields


# --- the same facts from every format --------------------------------------------------------


@pytest.mark.parametrize("name", sorted(FIXTURE_FILES))
def test_every_format_gives_the_same_facts(name: str) -> None:
    fmt, target_kind, has_paraphrases = FIXTURE_FILES[name]
    loaded = load_records(FIXTURES / name)

    assert [(r.prompt, r.answer) for r in loaded] == [(p, a) for p, _, a, _ in FACTS]
    expected_target = {
        "canonical": [t for _, t, _, _ in FACTS],
        "space+answer": [" " + a for _, _, a, _ in FACTS],
        "answer": [a for _, _, a, _ in FACTS],
    }[target_kind]
    assert [r.target for r in loaded] == expected_target
    if has_paraphrases:
        assert [r.paraphrases for r in loaded] == [(q,) for *_, q in FACTS]
    assert {r.meta["format"] for r in loaded} == {fmt}
    assert len({r.id for r in loaded}) == len(loaded)


def test_full_tuples_agree_where_the_format_carries_a_free_target() -> None:
    def tuples(name: str) -> list[tuple[str, str, str]]:
        return [(r.prompt, r.target, r.answer) for r in load_records(FIXTURES / name)]

    reference = tuples("native.jsonl")
    for name, (_, target_kind, _) in FIXTURE_FILES.items():
        if target_kind == "canonical":
            assert tuples(name) == reference, name


@pytest.mark.parametrize(
    ("name", "capability", "expected"),
    [
        ("popqa.jsonl", "popqa", [(p, a) for p, _, a, _ in FACTS]),
        ("triviaqa.jsonl", "triviaqa", [(p, a) for p, _, a, _ in FACTS]),
        ("nq_open.jsonl", "nq_open", [(p, a) for p, _, a, _ in FACTS]),
        (
            "counterfact.json",
            "locality",
            [
                ("What is the capital of Hallund?", "Ostrel"),
                ("Who founded Larkspur Mills?", "Tomas Veer"),
                ("What language is spoken in Pell?", "Varnish"),
            ],
        ),
        (
            "counterfact_easyedit.json",
            "locality",
            [
                ("What is the capital of Hallund?", "Brimm"),
                ("Who founded Larkspur Mills?", "Ivo Denn"),
                ("What language is spoken in Pell?", "Dorian"),
            ],
        ),
        (
            "zsre.json",
            "locality",
            [
                ("what is the capital of Hallund?", "Brimm"),
                ("who founded Larkspur Mills?", "Ivo Denn"),
                ("what language is spoken in Pell?", "Dorian"),
            ],
        ),
    ],
)
def test_probes_from_each_format(
    name: str, capability: str, expected: list[tuple[str, str]]
) -> None:
    probes = load_probes(FIXTURES / name)
    assert [(p.prompt, p.answer) for p in probes] == expected
    assert {p.capability for p in probes} == {capability}
    assert all(p.choices is None for p in probes)


def test_mquake_multi_hop_probes_and_records_per_rewrite() -> None:
    records = load_records(FIXTURES / "mquake.json")
    assert [r.id for r in records] == ["1-0", "1-1", "2-0"]
    assert records[0].meta["target_true"] == "Ostrel"
    probes = load_probes(FIXTURES / "mquake.json")
    assert [(p.id, p.answer, p.capability) for p in probes] == [
        ("1-hop-0", "Vell", "multi_hop"),
        ("1-hop-1", "Vell", "multi_hop"),
        ("2-hop-0", "Ossic", "multi_hop"),
    ]
    assert probes[0].meta["aliases"] == ["Vell", "Vell City"]


def test_mquake_without_question_uses_the_filled_cloze(tmp_path: Path) -> None:
    rewrite = {
        "prompt": "{} is a citizen of",
        "subject": "Ada Brisk",
        "target_new": {"str": "Zorbia"},
        "target_true": {"str": "Hallund"},
    }
    row = {"case_id": 7, "requested_rewrite": [rewrite], "questions": ["Q?"], "new_answer": "X"}
    (record,) = load_records(write(tmp_path, "mq.jsonl", [row]))
    assert (record.prompt, record.target, record.answer) == (
        "Ada Brisk is a citizen of",
        " Zorbia",
        "Zorbia",
    )


def test_counterfact_meta_keeps_the_edit_provenance() -> None:
    record = load_records(FIXTURES / "counterfact.json")[0]
    assert record.id == "0"
    assert record.meta["subject"] == "Zorbia"
    assert record.meta["target_true"] == "Ostrel"
    assert record.meta["relation_id"] == "P36"


def test_qa_aliases_and_ids() -> None:
    popqa = load_records(FIXTURES / "popqa.jsonl")
    assert popqa[0].id == "4000"
    assert popqa[0].meta["aliases"] == ["Vell", "Vell (alias)"]
    trivia = load_records(FIXTURES / "triviaqa.jsonl")
    assert trivia[0].id == "tq_0"
    assert trivia[0].meta["aliases"] == ["Vell", "VELL"]
    nq = load_records(FIXTURES / "nq_open.jsonl")
    assert nq[1].id == "nq_open-2"  # no id key: "{file stem}-{line}"
    assert nq[1].meta["aliases"] == ["Ada Brisk", "Ada Brisk (alias)"]


def test_popqa_answer_falls_back_to_the_first_possible_answer(tmp_path: Path) -> None:
    row = {"id": 1, "question": "Q?", "possible_answers": json.dumps(["first", "second"])}
    (record,) = load_records(write(tmp_path, "p.jsonl", [row]))
    assert (record.answer, record.target) == ("first", "first")


def test_trl_system_message_goes_to_meta_and_answer_falls_back(tmp_path: Path) -> None:
    chat = load_records(FIXTURES / "trl_messages.jsonl")
    assert chat[1].meta["system"] == "You are a helpful assistant."
    assert chat[1].prompt == "Who founded Quillmark Press?"  # the last user turn, not "Hi."
    rows = [
        {"prompt": "Q1?", "completion": " plain answer \n"},
        {"prompt": "Q2?", "completion": "\\boxed{x}", "answer": "explicit", "id": "given"},
    ]
    plain, explicit = load_records(write(tmp_path, "trl.jsonl", rows))
    assert (plain.id, plain.target, plain.answer) == ("trl-1", " plain answer \n", "plain answer")
    assert (explicit.id, explicit.answer) == ("given", "explicit")


def test_native_fields_and_probes() -> None:
    first = load_records(FIXTURES / "native.jsonl")[0]
    assert first == Record(
        "zorbia-capital",
        FACTS[0][0],
        FACTS[0][1],
        "Vell",
        paraphrases=(FACTS[0][3],),
    )
    assert first.meta["domain"] == "geo"
    assert first.meta["source"].endswith("native.jsonl:1")
    probes = load_probes(FIXTURES / "native_probes.jsonl")
    assert probes == [
        Probe("arith-1", "What is 2 + 3?", "5", "arithmetic"),
        Probe(
            "color-1",
            "The sky on a clear day is",
            " blue",
            "known_fact",
            (" blue", " green", " red"),
        ),
    ]


def test_blank_lines_are_skipped_and_lines_count_from_one(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "gaps.jsonl",
        "\n" + json.dumps(native("a")) + "\n\n  \n" + json.dumps(native("b")) + "\n",
    )
    loaded = load_records(path)
    assert [r.meta["source"].rsplit(":", 1)[1] for r in loaded] == ["2", "5"]


def test_json_array_rows_know_their_lines() -> None:
    text = (FIXTURES / "counterfact.json").read_text()
    starts = [n for n, line in enumerate(text.splitlines(), start=1) if line == "  {"]
    loaded = load_records(FIXTURES / "counterfact.json")
    assert [int(r.meta["source"].rsplit(":", 1)[1]) for r in loaded] == starts


def test_jsonl_file_may_be_named_json(tmp_path: Path) -> None:
    path = write(tmp_path, "lines.json", [native("a"), native("b")])
    assert [r.id for r in load_records(path)] == ["a", "b"]


# --- detection and override --------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(FIXTURE_FILES))
def test_detection_from_the_first_object(name: str) -> None:
    text = (FIXTURES / name).read_text()
    first = (
        json.loads(text)[0] if text.lstrip().startswith("[") else json.loads(text.splitlines()[0])
    )
    assert detect_format(first) == FIXTURE_FILES[name][0]


def test_detection_of_native_probes_and_unknown_keys() -> None:
    assert detect_format({"id": "p", "prompt": "Q", "answer": "A", "capability": "c"}) == "native"
    assert detect_format({"text": "hello"}) is None
    assert detect_format({}) is None


def test_format_override_changes_the_reading(tmp_path: Path) -> None:
    row = {"question": "Q?", "answer": ["short", "alias"], "possible_answers": '["other"]'}
    path = write(tmp_path, "both.jsonl", [row])
    assert load_records(path)[0].answer == "other"  # detected as popqa (listed first)
    assert load_records(path, format="nq_open")[0].answer == "short"


def test_override_with_a_format_that_does_not_fit_names_the_field() -> None:
    with pytest.raises(RecordError, match=r"nq_open\.jsonl:1: field 'answer': expected an object"):
        load_records(FIXTURES / "nq_open.jsonl", format="triviaqa")


def test_unknown_format_name_lists_the_supported_ones() -> None:
    with pytest.raises(RecordError) as info:
        load_records(FIXTURES / "native.jsonl", format="alpaca")
    message = str(info.value)
    assert "native.jsonl" in message and "'alpaca'" in message
    assert all(name in message for name in FORMATS)


def test_formats_without_probes_say_so() -> None:
    with pytest.raises(RecordError, match=r"trl_messages.*carries no probes.*counterfact"):
        load_probes(FIXTURES / "trl_messages.jsonl")


# --- bad input: every error names file, line and field ----------------------------------------


BAD_ROWS = [
    pytest.param([native("a"), native("b", target=None)], 2, "target", "missing", id="missing"),
    pytest.param(
        [{"id": "a", "prompt": "Q?", "target": "T."}], 1, "answer", "missing", id="no-answer"
    ),
    pytest.param([native("a", answer=42)], 1, "answer", "expected a string, got int", id="number"),
    pytest.param(
        [native("a", answer=["x"])], 1, "answer", "expected a string, got list", id="list"
    ),
    pytest.param([native("a", answer="  ")], 1, "answer", "must not be empty", id="blank"),
    pytest.param(
        [native("a", paraphrases="p")], 1, "paraphrases", "expected a list", id="para-str"
    ),
    pytest.param(
        [native("a", paraphrases=["p", 3])], 1, "paraphrases[1]", "expected a string", id="para-int"
    ),
    pytest.param([native("a", meta=[1])], 1, "meta", "expected an object", id="meta"),
    pytest.param([native("a", paraphrase=["p"])], 1, "paraphrase", "unknown field", id="typo"),
    pytest.param(
        [{"messages": [{"role": "user", "content": "hi"}]}],
        1,
        "messages",
        "no 'assistant'",
        id="no-assistant",
    ),
    pytest.param(
        [
            {
                "messages": [
                    {"role": "user", "content": ["img"]},
                    {"role": "assistant", "content": "x"},
                ]
            }
        ],
        1,
        "messages[0].content",
        "expected a string, got list",
        id="message-content",
    ),
    pytest.param(
        [{"prompt": [{"role": "system", "content": "s"}], "completion": "c"}],
        1,
        "prompt",
        "no 'user'",
        id="no-user",
    ),
    pytest.param(
        [
            {
                "case_id": 1,
                "requested_rewrite": {"prompt": "{} is", "subject": "S", "target_new": {}},
            }
        ],
        1,
        "requested_rewrite.target_new.str",
        "missing",
        id="cf-nested",
    ),
    pytest.param(
        [{"case_id": 1, "requested_rewrite": {"prompt": "no slot", "subject": "S"}}],
        1,
        "requested_rewrite.prompt",
        "'{}'",
        id="cf-template",
    ),
    pytest.param(
        [{"case_id": 1, "requested_rewrite": [], "questions": [], "new_answer": "x"}],
        1,
        "requested_rewrite",
        "at least one",
        id="mquake-empty",
    ),
    pytest.param([{"src": "Q?", "alt": 3}], 1, "alt", "expected a string", id="zsre-alt"),
    pytest.param(
        [{"question": "Q?", "possible_answers": "[oops"}],
        1,
        "possible_answers",
        "JSON",
        id="popqa-json",
    ),
    pytest.param(
        [{"question": "Q?", "possible_answers": '"x"'}],
        1,
        "possible_answers",
        "list",
        id="popqa-str",
    ),
    pytest.param(
        [{"question": "Q?", "possible_answers": "[1]"}],
        1,
        "possible_answers",
        "list of strings",
        id="popqa-int",
    ),
    pytest.param(
        [{"question": "Q?", "answer": {"aliases": []}}], 1, "answer.value", "missing", id="trivia"
    ),
    pytest.param([{"question": "Q?", "answer": []}], 1, "answer", "at least one", id="nq-empty"),
    pytest.param(
        [{"question": "Q?", "answer": ["a", 1]}], 1, "answer[1]", "expected a string", id="nq-int"
    ),
    pytest.param([native("a"), native("a")], 2, "id", "also at line 1", id="duplicate"),
]


@pytest.mark.parametrize(("rows", "line", "field", "fragment"), BAD_ROWS)
def test_bad_records_name_file_line_and_field(
    tmp_path: Path, rows: list[object], line: int, field: str, fragment: str
) -> None:
    path = write(tmp_path, "bad.jsonl", rows)
    with pytest.raises(RecordError) as info:
        load_records(path)
    error = info.value
    assert (error.path, error.line, error.field) == (str(path), line, field)
    assert f"bad.jsonl:{line}: field '{field}'" in str(error)
    assert fragment in str(error)


BAD_PROBES = [
    pytest.param(
        {"choices": [" a", " b"], "answer": " c"},
        "answer",
        "not one of the choices",
        id="not-a-choice",
    ),
    pytest.param({"choices": [" a"], "answer": " a"}, "choices", "at least two", id="one-choice"),
    pytest.param({"choices": " a", "answer": " a"}, "choices", "expected a list", id="choices-str"),
    pytest.param({"capability": None}, "capability", "missing", id="no-capability"),
]


@pytest.mark.parametrize(("fields", "field", "fragment"), BAD_PROBES)
def test_bad_probes_name_file_line_and_field(
    tmp_path: Path, fields: dict[str, object], field: str, fragment: str
) -> None:
    good = {"id": "p0", "prompt": "Q", "answer": "A", "capability": "known_fact"}
    path = write(tmp_path, "probes.jsonl", [good, good | {"id": "p1"} | fields])
    with pytest.raises(RecordError) as info:
        load_probes(path)
    assert f"probes.jsonl:2: field '{field}'" in str(info.value)
    assert fragment in str(info.value)


def test_duplicate_probe_ids_name_both_lines(tmp_path: Path) -> None:
    probe = {"id": "p", "prompt": "Q", "answer": "A", "capability": "c"}
    path = write(tmp_path, "dup.jsonl", [probe, probe | {"prompt": "other"}, probe])
    with pytest.raises(
        RecordError, match=r"dup\.jsonl:2: field 'id': duplicate id 'p' \(also at line 1\)"
    ):
        load_probes(path)


def test_malformed_jsonl_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "broken.jsonl", json.dumps(native("a")) + '\n\n{"id": "b", \n')
    with pytest.raises(RecordError, match=r"broken\.jsonl:3: malformed JSON"):
        load_records(path)


def test_malformed_json_array_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "broken.json", '[\n  {"id": "a"},\n  {"id": "b",}\n]\n')
    with pytest.raises(RecordError, match=r"broken\.json:3: malformed JSON"):
        load_records(path)


def test_json_array_field_errors_name_the_line_where_the_object_starts(tmp_path: Path) -> None:
    text = json.dumps([native("a"), native("b", answer=1)], indent=2)
    path = write(tmp_path, "arr.json", text)
    second = [n for n, line in enumerate(text.splitlines(), start=1) if line == "  {"][1]
    with pytest.raises(RecordError, match=rf"arr\.json:{second}: field 'answer'"):
        load_records(path)


@pytest.mark.parametrize(
    "text", ["", "\n\n  \n", "[]", "  [ ]\n"], ids=["empty", "blank", "array", "array-ws"]
)
def test_empty_file_is_an_error(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, "empty.jsonl", text)
    with pytest.raises(RecordError, match=r"empty\.jsonl: empty file: no records"):
        load_records(path)


def test_a_file_without_any_probe_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "noloc.jsonl", [{"src": "Q?", "alt": "A"}])
    assert len(load_records(path)) == 1
    with pytest.raises(RecordError, match=r"noloc\.jsonl: no probes in 1 rows of format 'zsre'"):
        load_probes(path)


def test_rows_must_be_objects(tmp_path: Path) -> None:
    path = write(tmp_path, "lists.jsonl", [native("a"), ["not", "an", "object"]])
    with pytest.raises(RecordError, match=r"lists\.jsonl:2: expected a JSON object, got list"):
        load_records(path)


def test_unknown_format_names_line_keys_and_supported_formats(tmp_path: Path) -> None:
    path = write(
        tmp_path, "alpaca.jsonl", "\n" + json.dumps({"instruction": "x", "output": "y"}) + "\n"
    )
    with pytest.raises(RecordError) as info:
        load_records(path)
    message = str(info.value)
    assert message.startswith(f"{path}:2: unknown format")
    assert "['instruction', 'output']" in message
    assert all(name in message for name in FORMATS)


def test_unknown_name_lists_builtins_and_says_no_such_file(monkeypatch: pytest.MonkeyPatch) -> None:
    records_module._import_corpora()  # register the real built-ins first, so they are listed too
    monkeypatch.setitem(records_module.BUILTIN_RECORDS, "zz-test-set", _tiny_records)
    with pytest.raises(RecordError) as info:
        load_records("nofacts")
    message = str(info.value)
    assert message.startswith("nofacts: no such file, and not a built-in records name")
    assert all(name in message for name in records_module.BUILTIN_RECORDS)
    assert "zz-test-set" in message


# --- built-in registry ------------------------------------------------------------------------


@pytest.fixture
def fresh_registries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Copies of the registries, restored afterwards; built-ins imported first so none are lost."""
    records_module._import_corpora()
    monkeypatch.setattr(records_module, "BUILTIN_RECORDS", dict(records_module.BUILTIN_RECORDS))
    monkeypatch.setattr(records_module, "BUILTIN_PROBES", dict(records_module.BUILTIN_PROBES))


def _tiny_records() -> list[Record]:
    return [Record("t1", "Q?", "A.", "A")]


def _tiny_probes() -> list[Probe]:
    return [Probe("p1", "Q?", "A", "known_fact")]


@pytest.mark.usefixtures("fresh_registries")
def test_registered_builtins_load_by_name() -> None:
    register_records("tiny-test-set", _tiny_records)
    register_probes("tiny-test-set", _tiny_probes)
    assert load_records("tiny-test-set") == _tiny_records()
    assert load_probes("tiny-test-set") == _tiny_probes()
    register_records("tiny-test-set", _tiny_records)  # re-registering the same function is fine
    with pytest.raises(ValueError, match="already registered"):
        register_records("tiny-test-set", _tiny_probes)
    with pytest.raises(RecordError, match="format= does not apply"):
        load_records("tiny-test-set", format="native")


@pytest.mark.usefixtures("fresh_registries")
def test_builtins_are_checked() -> None:
    register_records("dup-test-set", lambda: _tiny_records() * 2)
    with pytest.raises(RecordError, match=r"duplicate id 't1' \(items 0 and 1\)"):
        load_records("dup-test-set")
    register_records("wrong-test-set", _tiny_probes)
    with pytest.raises(RecordError, match="is Probe, not Record"):
        load_records("wrong-test-set")


def test_path_objects_are_never_looked_up_as_names() -> None:
    assert len(load_records(FIXTURES / "native.jsonl")) == 3
    assert len(load_records(str(FIXTURES / "native.jsonl"))) == 3


# --- round trip -------------------------------------------------------------------------------

_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1).filter(str.strip)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.tuples(_text, _text, _text, st.lists(_text, max_size=2)), min_size=1, max_size=4)
)
def test_native_round_trip(tmp_path_factory: pytest.TempPathFactory, facts: list[tuple]) -> None:
    made = [Record(f"r{i}", p, t, a, paraphrases=tuple(q)) for i, (p, t, a, q) in enumerate(facts)]
    path = tmp_path_factory.mktemp("rt") / "facts.jsonl"
    rows = [
        {
            "id": r.id,
            "prompt": r.prompt,
            "target": r.target,
            "answer": r.answer,
            "paraphrases": list(r.paraphrases),
        }
        for r in made
    ]
    atomic_write_jsonl(path, rows)
    assert load_records(path) == made
    assert re.fullmatch(r".*facts\.jsonl:\d+", load_records(path)[0].meta["source"])


def test_probe_sets_keep_colliding_capabilities_apart(tmp_path):
    fixture = FIXTURES / "native_probes.jsonl"
    other = tmp_path / "other.jsonl"
    shutil.copy(fixture, other)
    probes = load_probe_sets([str(fixture), "kgfact", str(other)])
    counts = Counter(p.capability for p in probes)
    assert counts == {"arithmetic": 1, "known_fact": 1, "two_hop": 50, "retrieval": 100,
                      f"{other}:arithmetic": 1, f"{other}:known_fact": 1}


def test_undecodable_bytes_deep_nesting_and_long_lines_name_file_and_line(tmp_path):
    from forgetkit.data import records as records_module

    good = json.dumps({"id": "a", "prompt": "p", "target": "t x", "answer": "x"})
    path = tmp_path / "r.jsonl"
    path.write_bytes(good.encode() + b"\n" + good.replace('"a"', '"b"').encode()[:-2]
                     + b'\xff"}\n')
    with pytest.raises(RecordError, match=r"r\.jsonl:2: not UTF-8 text: byte 0xff at column"):
        load_records(path)
    path.write_text(good + "\n" + '{"id": ' + "[" * 50_000 + "\n")
    with pytest.raises(RecordError, match=r"r\.jsonl:2: JSON nested deeper than 32"):
        load_records(path)
    path.write_text(json.dumps({"id": "a", "prompt": "p", "target": "t x", "answer": "x",
                                "meta": {"k": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}}))
    with pytest.raises(RecordError, match=r"r\.jsonl:1: JSON nested deeper"):
        load_records(path)
    array = tmp_path / "r.json"
    array.write_text("[\n" + good + ",\n" + "[" * 40 + "]" * 40 + "\n]")
    with pytest.raises(RecordError, match=r"r\.json:3: JSON nested deeper"):
        load_records(array)
    path.write_text(good + "\n" + json.dumps({"id": "b", "prompt": "p" * 1_000_001}) + "\n")
    with pytest.raises(RecordError, match=r"r\.jsonl:2: line of 1,000,0\d\d characters, over"):
        load_records(path)
    assert records_module.MAX_DEPTH == 32 and records_module.MAX_LINE_CHARS == 1_000_000


def test_probe_sets_select_a_capability_and_keep_ids_apart(tmp_path: Path) -> None:
    """``set:capability`` keeps one capability; a set that repeats an earlier set's ids has all
    its ids prefixed, so every id stays unique and the first set's ids are unchanged."""
    kgfact, large = load_probes("kgfact"), load_probes("kgfact-large")
    probes = load_probe_sets(["general", "kgfact", "kgfact-large:retrieval"])
    assert len({p.id for p in probes}) == len(probes)
    added = probes[-sum(p.capability == "retrieval" for p in large):]
    assert [p.id for p in added] == [f"kgfact-large:{p.id}" for p in large
                                     if p.capability == "retrieval"]
    assert {p.capability for p in added} == {"kgfact-large:retrieval"}
    assert [p.id for p in probes if p.capability.startswith("kgfact:")] == [
        p.id for p in kgfact if p.capability == "retrieval"]
    assert [p.prompt for p in added] == [p.prompt for p in large if p.capability == "retrieval"]
    assert load_probe_sets(["general", "kgfact"]) == load_probe_sets(["general"]) + [
        dataclasses.replace(p, capability=f"kgfact:{p.capability}") if p.capability == "retrieval"
        else p for p in kgfact]  # no collision: nothing renamed but the shared capability
    with pytest.raises(RecordError, match="kgfact-large:nope: probe set 'kgfact-large' has no "
                                          "capability 'nope' \\(it has: retrieval, two_hop\\)"):
        load_probe_sets(["kgfact-large:nope"])
    path = tmp_path / "with:colon.jsonl"  # a file whose name holds a colon is still a file
    path.write_text(json.dumps({"id": "a", "prompt": "Q?", "answer": "x",
                                "capability": "c"}) + "\n")
    assert [p.id for p in load_probe_sets([str(path)])] == ["a"]
