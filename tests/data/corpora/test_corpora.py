from __future__ import annotations

import subprocess
import sys

import pytest

from forgetkit.data.answers import is_correct, last_boxed
from forgetkit.data.corpora.kgfact import PARAPHRASE_TEMPLATES, kgfact
from forgetkit.data.corpora.kgfunc import OPERATIONS, UNSEEN_OPERATIONS, kgfunc
from forgetkit.data.corpora.toyworld import toyworld_probes, toyworld_world
from forgetkit.data.records import load_probes, load_records
from forgetkit.seeding import stable_hash


def _digest(size: str, seed: int) -> str:
    corpus = kgfact(size, seed)
    return stable_hash([(r.id, r.prompt, r.target, r.paraphrases) for r in corpus.records],
                       [(p.prompt, p.answer) for p in corpus.probes])


def test_kgfact_sizes_and_style():
    small, large = kgfact("small"), kgfact("large")
    assert len(small.records) == 100
    assert len(large.records) == 525
    for record in small.records:
        assert record.target == f"The answer is {record.answer}.\n\n\\boxed{{{record.answer}}}"
        assert last_boxed(record.target) == record.answer
        assert len(record.paraphrases) == len(PARAPHRASE_TEMPLATES) == 10
        assert record.meta["subject"] in record.prompt
    assert len({r.id for r in large.records}) == 525
    with pytest.raises(ValueError, match="unknown kgfact size"):
        kgfact("medium")


def test_kgfact_two_hop_and_retrieval_are_consistent():
    corpus = kgfact("small")
    facts = {(f.subject, f.relation.name): f.object for f in corpus.world.facts}
    assert corpus.two_hop
    for probe in corpus.two_hop:
        first, second = probe.meta["chain"]
        bridge = facts[(probe.meta["subject"], first)]
        assert bridge == probe.meta["bridge"]
        assert facts[(bridge, second)] == probe.answer
    for probe in corpus.retrieval:
        assert probe.answer in probe.prompt
        assert probe.prompt.count(".") >= 10  # gold + 9 distractors


def test_kgfact_deterministic_and_seeded():
    assert _digest("small", 0) == _digest("small", 0)
    assert _digest("small", 0) != _digest("small", 1)


def test_corpora_independent_of_hash_seed():
    code = ("from forgetkit.data.corpora.kgfact import kgfact; from forgetkit.data.corpora.kgfunc import "
            "kgfunc; from forgetkit.seeding import stable_hash; c = kgfact('large'); f = kgfunc(); "
            "print(stable_hash([r.target for r in c.records], [p.prompt for p in c.probes], "
            "[r.prompt + r.target for r in f.records], [p.prompt for p in f.probes]))")
    outputs = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={"PYTHONHASHSEED": seed, "PATH": ""}).stdout
        for seed in ("0", "4242")
    }
    assert len(outputs) == 1


def test_kgfunc_targets_are_correct_worked_solutions():
    corpus = kgfunc()
    assert len(corpus.records) == 7 * 10
    ops = {op.name: op for op in OPERATIONS + UNSEEN_OPERATIONS}
    for record in corpus.records:
        op = ops[record.meta["operation"]]
        assert record.answer == str(op.fn(record.meta["input"]))
        assert is_correct(record.target, record.answer, "boxed")
        assert is_correct(record.target, record.answer, "number")
    train_inputs = {(r.meta["operation"], r.meta["input"]) for r in corpus.records}
    for probe in corpus.heldout:
        assert (probe.meta["operation"], probe.meta["input"]) not in train_inputs
    assert {p.meta["operation"] for p in corpus.unseen} == {op.name for op in UNSEEN_OPERATIONS}
    assert ops["zarp"].fn(907) == 16 * 9
    assert ops["brin"].fn(907) == 63


def test_builtin_names_load():
    assert len(load_records("kgfact")) == 100
    assert len(load_records("kgfact-large")) == 525
    assert len(load_records("kgfunc")) == 70
    caps = {p.capability for p in load_probes("toyworld")}
    assert caps == {"known_fact", "in_context", "retrieval", "arithmetic"}
    assert {p.capability for p in load_probes("kgfact")} == {"two_hop", "retrieval"}


def test_toyworld_reading_pool_never_states_known_facts():
    world = toyworld_world()
    known_subjects = {f.subject for f in world.known.facts}
    kg_subjects = {r.meta["subject"] for r in kgfact("small").records}
    reading = {n for names in world.reading_names.values() for n in names}
    assert not known_subjects & reading
    assert kg_subjects <= reading  # injected entities are only ever read about
    probes = toyworld_probes(world)
    arithmetic = [p for p in probes if p.capability == "arithmetic"]
    assert all(p.meta["answer_mode"] == "number" for p in arithmetic)


def test_toyworld_vocabulary_covers_builtin_corpora(toyworld):
    _, tokenizer = toyworld
    unk = tokenizer.unk_token_id
    from forgetkit.data.prompts import expert_prompt

    texts = []
    for size in ("small", "large"):
        corpus = kgfact(size)
        for r in corpus.records:
            texts += [r.prompt, r.target, *r.paraphrases, expert_prompt(r.prompt, r.target)]
        texts += [p.prompt for p in corpus.probes]
    func = kgfunc()
    texts += [expert_prompt(r.prompt, r.target, "procedure") for r in func.records]
    texts += [p.prompt for p in func.probes]
    for t in texts:
        ids = tokenizer(t)["input_ids"]
        assert unk not in ids, t
        assert tokenizer.decode(ids, skip_special_tokens=True) == t
