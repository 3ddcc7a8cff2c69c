from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch

import forgetkit.mixsd_decode as mixsd_decode
from forgetkit.data.prompts import expert_prompt
from forgetkit.data.records import Record, load_records
from forgetkit.mixsd import (
    MixConfig,
    MixedTarget,
    build_target_file,
    build_targets,
    main,
    progress_path,
)
from forgetkit.mixsd_decode import choose_tokens, reference_decode
from forgetkit.models import encode, end_token_ids, load_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def records():
    """kgfact records of several prompt lengths (so batches are padded)."""
    kg = load_records("kgfact")
    return [kg[i] for i in (0, 1, 2, 3, 5, 8, 13, 21, 34, 55, 60, 61, 62, 70, 80, 99)]


def _tiny(kind: str, tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=2,
            num_attention_heads=2, intermediate_size=32, max_position_embeddings=256, **ids))
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=16, n_layer=2,
                                           n_head=2, n_positions=256, **ids))
    return model.to(torch.float64).eval()


@pytest.fixture(scope="module", params=["toyworld", "llama", "gpt2"])
def model_f64(request):
    """(model, tokenizer) in float64, so padding cannot flip an argmax by rounding."""
    model, tokenizer = load_model("toyworld", dtype="float64", device="cpu")
    if request.param != "toyworld":
        model = _tiny(request.param, tokenizer)
    return model, tokenizer


def _greedy(model, tokenizer, prompt: str, max_new_tokens: int) -> list[int]:
    """Reference: ``model.generate`` on one unpadded prompt, cut after the end token."""
    ids = torch.tensor([encode(tokenizer, prompt).input_ids])
    ends = end_token_ids(tokenizer, model)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=max_new_tokens, eos_token_id=ends,
                         pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
    cut = next((i + 1 for i, t in enumerate(out) if t in ends), len(out))
    return out[:cut]


@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_extreme_lambdas_are_greedy_decoding(model_f64, records, lam):
    model, tokenizer = model_f64
    chosen = records[:6]
    config = MixConfig(lam=lam, max_new_tokens=16, on_failure="keep", batch_size=4)
    targets = build_targets(model, tokenizer, chosen, config)
    assert [t.record_id for t in targets] == [r.id for r in chosen]
    for record, target in zip(chosen, targets, strict=True):
        prompt = record.prompt if lam == 1 else expert_prompt(record.prompt, record.target)
        assert target.token_ids == _greedy(model, tokenizer, prompt, 16)
        assert target.branch_mask == [lam == 0] * len(target.token_ids)
        assert target.expert_token_fraction == (1.0 if lam == 0 else 0.0)
        assert target.attempts == 1  # coins cannot change the output: no pointless retries
        assert target.text == tokenizer.decode(target.token_ids, skip_special_tokens=True)


def test_mixed_sampling_matches_reference_decoder(records):
    """The batched, cached, slot-refilled decoder equals the one-token-per-call re-encoding
    specification at lam=0.3 and T>0, retries included."""
    _, tokenizer = load_model("toyworld", device="cpu")
    model = _tiny("llama", tokenizer)
    config = MixConfig(lam=0.3, temperature=0.9, top_k=8, max_new_tokens=10, max_retries=2,
                       on_failure="keep", batch_size=3)
    chosen = records[:5]
    targets = build_targets(model, tokenizer, chosen, config)
    for record, target in zip(chosen, targets, strict=True):
        assert target.attempts == 3  # a random model never answers: every retry is used
        tokens, mask = reference_decode(model, tokenizer, record, config, attempt=2)
        assert (target.token_ids, target.branch_mask) == (tokens, mask)
    assert 0 < sum(sum(t.branch_mask) for t in targets) < sum(len(t.branch_mask) for t in targets)


def test_choose_tokens_picks_from_the_chosen_branch_not_the_mixture():
    logits = torch.tensor([[[0.0, 5.0, 4.9], [0.0, 0.0, 6.0]]] * 2)  # (2 rows, 2 branches, V=3)
    uniforms = torch.tensor([[0.1, 0.5], [0.9, 0.5]])  # row 0 naive, row 1 expert at lam=0.5
    tokens, expert = choose_tokens(logits, uniforms, lam=0.5, temperature=0.0, top_k=3)
    assert tokens.tolist() == [1, 2] and expert.tolist() == [False, True]
    # sampling: the uniform indexes the CDF of the chosen branch's top-k softmax
    tokens, _ = choose_tokens(logits, torch.tensor([[0.1, 0.01], [0.1, 0.99]]), lam=0.5,
                              temperature=1.0, top_k=2)
    assert tokens.tolist() == [1, 2]  # top-2 of the naive branch are 1 (p~0.52) then 2


@pytest.mark.parametrize("lam,temperature", [(0.3, 0.0), (0.3, 0.8)])
def test_batch_size_invariance_and_seeds(toyworld, records, lam, temperature):
    model, tokenizer = toyworld
    base = dict(lam=lam, temperature=temperature, max_new_tokens=24, max_retries=2,
                on_failure="keep")
    runs = [build_targets(model, tokenizer, records, MixConfig(batch_size=b, **base))
            for b in (1, 4, 16)]
    assert runs[0] == runs[1] == runs[2]
    counts = [dataclasses.replace(r.report, seconds=0.0) for r in runs]
    assert counts[0] == counts[1] == counts[2]
    again = build_targets(model, tokenizer, records[:8], MixConfig(batch_size=3, **base))
    assert list(again) == runs[0][:8]  # another batch composition, same targets
    other = build_targets(model, tokenizer, records, MixConfig(batch_size=16, seed=1, **base))
    if temperature > 0:
        assert [t.token_ids for t in other] != [t.token_ids for t in runs[0]]
    assert [t.branch_mask for t in other] != [t.branch_mask for t in runs[0]]


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


def test_bad_input(toyworld, records, tmp_path):
    model, tokenizer = toyworld
    with pytest.raises(ValueError, match="records is empty"):
        build_targets(model, tokenizer, [], MixConfig())
    with pytest.raises(ValueError, match="duplicate record id"):
        build_targets(model, tokenizer, [records[0], records[0]], MixConfig())
    no_end = copy.deepcopy(tokenizer)
    no_end.eos_token = None
    silent = _tiny("llama", tokenizer)
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
    for bad in (["--lam", "1.5"], ["--top_k", "many"], ["--records", "no-such-set"]):
        with pytest.raises(SystemExit, match=r"error: .*(lam|top_k|no-such-set)"):
            main(["--records", str(path), "--out", str(tmp_path / "no.jsonl"), *bad])
    assert not (tmp_path / "no.jsonl").exists()


def test_bf16_runs(records):
    _, tokenizer = load_model("toyworld", device="cpu")
    model = _tiny("llama", tokenizer).to(torch.bfloat16)
    targets = build_targets(model, tokenizer, records[:3],
                            MixConfig(lam=0.3, temperature=0.5, max_new_tokens=6,
                                      max_retries=0, on_failure="keep"))
    assert [len(t.token_ids) for t in targets] == [6, 6, 6]


@pytest.mark.slow
def test_smollm2_extreme_lambdas_and_mixture(smollm2, records):
    model, tokenizer = smollm2
    chosen = records[:3]
    config = MixConfig(lam=0.0, max_new_tokens=12, on_failure="keep", batch_size=2)
    for record, target in zip(chosen, build_targets(model, tokenizer, chosen, config), strict=True):
        prompt = expert_prompt(record.prompt, record.target)
        assert target.token_ids == _greedy(model, tokenizer, prompt, 12)
    mixed = MixConfig(lam=0.5, temperature=0.7, max_new_tokens=8, max_retries=0,
                      on_failure="keep", batch_size=2)
    for record, target in zip(chosen, build_targets(model, tokenizer, chosen, mixed), strict=True):
        assert (target.token_ids, target.branch_mask) == reference_decode(
            model, tokenizer, record, mixed)
