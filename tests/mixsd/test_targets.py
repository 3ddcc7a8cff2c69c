"""MixSD target construction: retries, failure policies, the resumable target file, the CLI."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest

import forgetkit.mixsd.decode as mixsd_decode
from forgetkit.data.records import Record
from forgetkit.mixsd import (
    BuildConfig,
    MixConfig,
    MixedTarget,
    build_target_file,
    build_targets,
    main,
    progress_path,
    run,
)
from forgetkit.mixsd.decode import reference_decode
from forgetkit.models import encode, load_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _fail_until(monkeypatch, passes_on: int):
    """Make every record's answer check pass on its ``passes_on``-th attempt."""
    calls: dict[str, int] = {}

    def fake(text, answer, mode="auto"):
        calls[answer] = calls.get(answer, 0) + 1
        return calls[answer] == passes_on

    monkeypatch.setattr(mixsd_decode, "is_correct", fake)


def test_retries_and_report(toyworld, records, monkeypatch):
    model, tokenizer = toyworld
    config = MixConfig(lam=0.5, temperature=0.7, max_new_tokens=12, max_retries=4,
                       batch_size=2)
    assert len({r.answer for r in records[:3]}) == 3
    _fail_until(monkeypatch, passes_on=3)
    targets = build_targets(model, tokenizer, records[:3], config)
    assert [t.attempts for t in targets] == [3, 3, 3] and all(t.correct for t in targets)
    for record, target in zip(records, targets, strict=False):
        assert target.token_ids == reference_decode(model, tokenizer, record, config, 2)[0]
    report = targets.report
    assert (report.n_records, report.n_correct_first_try, report.n_correct_after_retry,
            report.n_failed, report.n_attempts) == (3, 0, 3, 0, 9)
    assert report.generated_tokens == sum(
        len(reference_decode(model, tokenizer, r, config, a)[0])
        for r in records[:3] for a in range(3))


@pytest.mark.parametrize("policy", ["drop", "keep", "canonical"])
def test_failure_policies(toyworld, records, policy):
    model, tokenizer = toyworld
    impossible = [Record(r.id, r.prompt, r.target, answer="no such answer") for r in records[:3]]
    config = MixConfig(lam=0.3, max_new_tokens=8, max_retries=2, on_failure=policy)
    targets = build_targets(model, tokenizer, impossible, config)
    report = targets.report
    assert (report.n_failed, report.n_attempts, report.on_failure) == (3, 9, policy)
    if policy == "drop":
        assert list(targets) == [] and report.n_targets == 0
        return
    assert report.n_targets == 3
    for record, target in zip(impossible, targets, strict=True):
        assert not target.correct and target.attempts == 3
        assert len(target.branch_mask) == len(target.token_ids)
        if policy == "canonical":
            assert target.fallback and target.text == record.target
            assert target.token_ids == encode(tokenizer, record.prompt, record.target).completion_ids
            assert all(target.branch_mask) and target.expert_token_fraction == 1.0
        else:
            assert not target.fallback
            assert target.token_ids == reference_decode(model, tokenizer, record, config, 2)[0]


def test_mixed_target_json_round_trip():
    target = MixedTarget("r1", " a b", [5, 6, 3], True, 2, 2 / 3, [True, False, True])
    assert MixedTarget.from_json(json.loads(json.dumps(target.to_json()))) == target
    with pytest.raises(ValueError, match="needs keys"):
        MixedTarget.from_json({"record_id": "r1"})
    with pytest.raises(ValueError, match="branch mask"):
        MixedTarget.from_json({**target.to_json(), "branch_mask": [True]})


@pytest.mark.parametrize("bad,match", [
    ({"lam": -0.1}, "lam"), ({"lam": 1.5}, "lam"), ({"temperature": -1.0}, "temperature"),
    ({"temperature": float("nan")}, "temperature"), ({"top_k": 0}, "top_k"),
    ({"max_new_tokens": 0}, "max_new_tokens"), ({"max_retries": -1}, "max_retries"),
    ({"batch_size": 0}, "batch_size"), ({"on_failure": "retry"}, "on_failure"),
    ({"guidance": "poem"}, "guidance"), ({"answer_mode": "exact"}, "answer_mode"),
])
def test_config_rejects_bad_values(bad, match):
    with pytest.raises(ValueError, match=match):
        MixConfig(**bad)


def test_bad_input(toyworld, records, tmp_path, tiny_model):
    model, tokenizer = toyworld
    with pytest.raises(ValueError, match="records is empty"):
        build_targets(model, tokenizer, [], MixConfig())
    with pytest.raises(ValueError, match="duplicate record id"):
        build_targets(model, tokenizer, [records[0], records[0]], MixConfig())
    no_end = copy.deepcopy(tokenizer)
    no_end.eos_token = None
    silent = tiny_model("llama", tokenizer)
    silent.generation_config.eos_token_id = None
    with pytest.raises(ValueError, match="no end token"):
        build_targets(silent, no_end, records[:1], MixConfig())
    with pytest.raises(ValueError, match="no end token"):
        build_target_file(silent, no_end, records[:1], MixConfig(), tmp_path / "t.jsonl")
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a progress log


class _Interrupt(Exception):
    pass


def test_resume_after_interruption_is_byte_identical(toyworld, records, tmp_path):
    model, tokenizer = toyworld
    config = MixConfig(lam=0.3, temperature=0.8, max_new_tokens=16, max_retries=1,
                       on_failure="drop", batch_size=4)
    full = tmp_path / "full.jsonl"
    report = build_target_file(model, tokenizer, records, config, full)
    assert not progress_path(full).exists()

    out = tmp_path / "resumed.jsonl"
    seen: list[int] = []

    def interrupt(outcomes):
        seen.extend(o.index for o in outcomes)
        raise _Interrupt

    with pytest.raises(_Interrupt):
        build_target_file(model, tokenizer, records, config, out, on_finished=interrupt)
    assert not out.exists() and progress_path(out).exists()
    with open(progress_path(out), "a") as handle:  # a crash mid-append leaves a torn line
        handle.write('{"index": 3, "record_id": "kgf')
    resumed: list[int] = []
    again = build_target_file(model, tokenizer, records,
                              dataclasses.replace(config, batch_size=16), out,
                              on_finished=lambda o: resumed.extend(x.index for x in o))
    assert sorted(seen + resumed) == list(range(len(records)))  # nothing lost or repeated
    assert out.read_bytes() == full.read_bytes()
    assert (again.n_failed, again.n_targets) == (report.n_failed, report.n_targets)
    assert not progress_path(out).exists()
    # the finished file is the cache: a third run computes nothing
    cached = build_target_file(model, tokenizer, records, config, out,
                               on_finished=lambda o: pytest.fail("recomputed"))
    assert cached.n_targets == report.n_targets
    # a stale progress log of another config is an error, not silently mixed in
    with pytest.raises(_Interrupt):
        build_target_file(model, tokenizer, records, config, tmp_path / "x.jsonl",
                          on_finished=interrupt)
    with pytest.raises(ValueError, match="another model, record set or config"):
        build_target_file(model, tokenizer, records, MixConfig(lam=0.5), tmp_path / "x.jsonl")


def test_cli(records, tmp_path, capsys):
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps({"id": r.id, "prompt": r.prompt, "target": r.target,
                                        "answer": r.answer}) + "\n" for r in records[:3]))
    out = tmp_path / "targets.jsonl"
    main(["--model", "toyworld", "--records", str(path), "--lam", "0", "--max-new-tokens", "8",
          "--mix.on_failure", "keep", "--out", str(out), "--device", "cpu"])
    rows = [MixedTarget.from_json(json.loads(line)) for line in out.read_text().splitlines()]
    assert [r.record_id for r in rows] == [r.id for r in records[:3]]
    assert "n_records=3" in capsys.readouterr().out
    model, tokenizer = load_model("toyworld", device="cpu")  # the CLI's objects, given directly
    given = tmp_path / "given.jsonl"
    run(BuildConfig(out=str(given), mix=MixConfig(lam=0.0, max_new_tokens=8, on_failure="keep")),
        model=model, tokenizer=tokenizer, records=records[:3])
    assert given.read_bytes() == out.read_bytes()
    for bad in (["--lam", "1.5"], ["--top_k", "many"], ["--records", "no-such-set"]):
        with pytest.raises(SystemExit, match=r"error: .*(lam|top_k|no-such-set)"):
            main(["--records", str(path), "--out", str(tmp_path / "no.jsonl"), *bad])
    assert not (tmp_path / "no.jsonl").exists()
