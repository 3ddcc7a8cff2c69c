from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pytest
import torch

from forgetkit.cli_config import parse_config
from forgetkit.data.records import Record, load_records
from forgetkit.diagnostics.nll import (
    NLLConfig,
    TargetNLL,
    compare_targets,
    main,
    sequence_frame,
    target_nll,
    token_frame,
)
from forgetkit.diagnostics.nll import (
    run as run_nll,
)
from forgetkit.mixsd import MixConfig
from forgetkit.models import encode, end_token_ids, load_model


@dataclass
class Mixed:
    """Duck-typed stand-in for forgetkit.mixsd.MixedTarget."""

    record_id: str
    token_ids: list[int]
    branch_mask: list[bool] = field(default_factory=list)
    text: str = ""


def brute_force(model, prompt_ids: list[int], completion_ids: list[int]) -> np.ndarray:
    """NLL of each completion token: one sequence, full forward, gather of log_softmax."""
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()  # (T, V)
    logp = torch.log_softmax(logits, dim=-1)[:-1].gather(-1, ids[0, 1:, None])[:, 0]  # (T-1,)
    return -logp[len(prompt_ids) - 1 :].numpy()


def tiny_model(kind: str, vocab_size: int, context: int = 256):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if kind == "llama":
        config = LlamaConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32,
                             num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                             max_position_embeddings=context)
        model = LlamaForCausalLM(config)
    else:
        config = GPT2Config(vocab_size=vocab_size, n_embd=16, n_layer=2, n_head=2,
                            n_positions=context)
        model = GPT2LMHeadModel(config)
    return model.to(torch.float64).eval()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def toy64():
    return load_model("toyworld", dtype="float64", device="cpu")


@pytest.fixture(scope="module")
def records():
    return load_records("kgfact")[:12]


def mixed_for(tokenizer, record: Record, completion: str, end: bool = True) -> Mixed:
    """A MixedTarget-like item whose token_ids are those of ``completion`` (+ end token)."""
    ids = encode(tokenizer, record.prompt, completion, add_end_token=end).completion_ids
    return Mixed(record.id, ids, [k % 3 != 0 for k in range(len(ids))], completion)


def items_for(tokenizer, records):
    """Records, (record, mixed) pairs, bare mixed targets and (prompt, completion) pairs."""
    statement = [r.meta.get("statement", r.answer) for r in records]
    return [
        *records[:6],
        *[(r, mixed_for(tokenizer, r, s)) for r, s in zip(records[6:9], statement[6:9], strict=True)],
        mixed_for(tokenizer, records[9], statement[9], end=False),
        ("What is two plus two?", "four"),
        ("Tell me a long story about a city.", " ".join(statement)),
    ]


def expected(model, tokenizer, item, records_by_id):
    if isinstance(item, Record):
        enc = encode(tokenizer, item.prompt, item.target)
        return brute_force(model, enc.input_ids[: enc.prompt_length], enc.completion_ids)
    if isinstance(item, tuple) and isinstance(item[0], str):
        enc = encode(tokenizer, *item)
        return brute_force(model, enc.input_ids[: enc.prompt_length], enc.completion_ids)
    mixed = item[1] if isinstance(item, tuple) else item
    prompt = encode(tokenizer, records_by_id[mixed.record_id].prompt).input_ids
    return brute_force(model, prompt, mixed.token_ids)


def check_golden(model, tokenizer, records, atol):
    items = items_for(tokenizer, records)
    result = target_nll(model, tokenizer, items, batch_size=4, records=records)
    by_id = {r.id: r for r in records}
    assert len(result.per_token) == len(items)
    for index, item in enumerate(items):
        np.testing.assert_allclose(result.per_token[index],
                                   expected(model, tokenizer, item, by_id), rtol=0, atol=atol)
    ends = {tokenizer.decode([t]) for t in end_token_ids(tokenizer)}
    assert result.tokens[0][-1] in ends  # canonical targets score their end token
    assert result.tokens[9][-1] not in ends  # mixed token_ids are scored exactly as given
    assert result.ids[:7] == [r.id for r in records[:7]] and result.ids[-1] == str(len(items) - 1)
    assert result.branch_mask[0] is None
    assert result.branch_mask[6].tolist() == items[6][1].branch_mask
    return result


def test_golden_toyworld(toy64, records):
    model, tokenizer = toy64
    result = check_golden(model, tokenizer, records, atol=1e-8)
    assert "".join(result.tokens[0]).startswith(" " + records[0].target[:10])
    np.testing.assert_allclose(result.sequence_sum, [p.sum() for p in result.per_token])
    np.testing.assert_allclose(result.sequence_mean, [p.mean() for p in result.per_token])


def test_golden_chat_template(chat_tokenizer, records):
    model = tiny_model("llama", len(chat_tokenizer))
    result = check_golden(model, chat_tokenizer, records, atol=1e-8)
    assert result.tokens[0][-1] == "<|im_end|>"
    assert "".join(result.tokens[0][:-1]) == records[0].target  # reply only, no template text


@pytest.mark.slow
def test_golden_smollm2(smollm2, records):
    model, tokenizer = smollm2
    check_golden(model, tokenizer, records[:10], atol=1e-4)  # float32, 30 layers


@pytest.mark.parametrize("kind", ["toyworld", "gpt2"])
def test_padding_and_batch_size_invariance(toy64, records, kind):
    """Left padding only agrees if positions skip the pads (gpt2: absolute positions)."""
    model, tokenizer = toy64
    if kind == "gpt2":
        model = tiny_model("gpt2", len(tokenizer))
    items = (items_for(tokenizer, records) * 3)[:32]
    runs = [target_nll(model, tokenizer, items, batch_size=b, padding_side=side, records=records)
            for b, side in [(1, "right"), (32, "right"), (32, "left"), (5, "left")]]
    lengths = {len(p) for p in runs[0].per_token}
    assert len(lengths) > 3  # batches really are padded
    for run in runs[1:]:
        assert run.ids == runs[0].ids and run.tokens == runs[0].tokens
        for a, b in zip(run.per_token, runs[0].per_token, strict=True):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-10)


def test_bf16_and_training_mode(records):
    model, tokenizer = load_model("toyworld", dtype="bf16", device="cpu")
    reference = load_model("toyworld", dtype="float32", device="cpu")[0]
    model.train()
    low = target_nll(model, tokenizer, records[:4])
    high = target_nll(reference, tokenizer, records[:4])
    assert model.training  # restored
    assert low.per_token[0].dtype == np.float64
    np.testing.assert_allclose(low.sequence_mean, high.sequence_mean, rtol=0.1, atol=0.1)


def test_to_frame_and_tidy_tables(toy64, records):
    model, tokenizer = toy64
    mixed = mixed_for(tokenizer, records[0], "Vabebrim lives in Pithiram .")
    sft = target_nll(model, tokenizer, records[:2])
    mix = target_nll(model, tokenizer, [(records[0], mixed)])
    frame = mix.to_frame()
    assert list(frame.columns) == ["item", "position", "token", "nll", "branch"]
    assert frame["position"].tolist() == list(range(len(mixed.token_ids)))
    assert frame["branch"].tolist() == ["expert" if b else "naive" for b in mixed.branch_mask]
    np.testing.assert_array_equal(frame["nll"], mix.per_token[0])
    assert sft.to_frame()["branch"].isna().all()
    tokens = token_frame({"SFT": sft, "MixSD": mix})
    assert tokens.columns[0] == "target_set" and len(tokens) == sum(sft.lengths) + mix.lengths[0]
    sequences = sequence_frame({"SFT": sft, "MixSD": mix})
    assert sequences["length"].tolist() == [*sft.lengths, *mix.lengths]
    np.testing.assert_allclose(sequences["sequence_nll"], [*sft.sequence_sum, *mix.sequence_sum])


# --- bad input ------------------------------------------------------------------------------


def test_bad_items(toy64, records):
    model, tokenizer = toy64
    good = mixed_for(tokenizer, records[1], "x")
    cases = [
        ([], ValueError, "items is empty"),
        ([("Question?", "ok"), ("Question?", "   ")], ValueError, r"items\[1\] \('1'\): empty"),
        ([(records[0], Mixed(records[0].id, []))], ValueError, r"kgfact-0000.*no token_ids"),
        ([good], ValueError, "records="),
        ([(records[0], good)], ValueError, r"items\[0\].*paired with record 'kgfact-0000'"),
        ([42], TypeError, r"items\[0\]: expected a Record"),
        ([(records[1], Mixed(records[1].id, [5, 6], [True]))], ValueError, "branch_mask"),
        ([(records[1], Mixed(records[1].id, [5, 10**6]))], ValueError, "token id 1000000"),
    ]
    for items, error, message in cases:
        with pytest.raises(error, match=message):
            target_nll(model, tokenizer, items)
    with pytest.raises(ValueError, match="batch_size"):
        target_nll(model, tokenizer, records[:1], batch_size=0)


def test_too_long_is_an_error_not_a_truncation(toy64, records):
    _, tokenizer = toy64
    model = tiny_model("gpt2", len(tokenizer), context=24)
    target_nll(model, tokenizer, [("Hi?", "Vabebrim lives in Pithiram .")])  # fits
    long = " ".join(["Vabebrim lives in Pithiram ."] * 5)
    with pytest.raises(ValueError, match=r"items\[1\].*context \(24 tokens\)"):
        target_nll(model, tokenizer, [("Hi?", "ok"), ("Hi?", long)])


def test_mismatched_tokenizer(toy64, chat_tokenizer, records):
    model, tokenizer = toy64
    rows = model.get_input_embeddings().weight.shape[0]
    with pytest.raises(ValueError, match=f"{len(chat_tokenizer)} tokens but the model has {rows}"):
        target_nll(model, chat_tokenizer, records[:1])
    big = tiny_model("llama", len(chat_tokenizer))
    with pytest.raises(ValueError, match="does not belong to this model"):
        target_nll(big, tokenizer, records[:1])
    padded = tiny_model("llama", len(tokenizer) + 64)  # embedding rows padded up: accepted
    assert len(target_nll(padded, tokenizer, records[:1]).ids) == 1


# --- comparison -----------------------------------------------------------------------------


def fake(ids, per_token) -> TargetNLL:
    return TargetNLL(list(ids), [np.asarray(p, float) for p in per_token],
                     [["t"] * len(p) for p in per_token])


def test_compare_paired_by_id_not_position():
    rng = np.random.default_rng(1)
    ids = [f"r{i}" for i in range(30)]
    ref = [rng.uniform(0, 10) + rng.normal(0, 0.1, size=rng.integers(2, 9)) for _ in ids]
    order = rng.permutation(30)
    shifted = fake([ids[i] for i in order], [ref[i] - 0.5 for i in order])
    table = compare_targets({"SFT": fake(ids, ref), "MixSD": shifted}, n_boot=500)
    sft, mix = table.iloc[0], table.iloc[1]
    assert np.isnan(sft.ci_low) and sft.delta_item_nll == 0 and sft.reference == "SFT"
    assert mix.paired and mix.delta_item_nll == pytest.approx(-0.5)
    assert mix.ci_low == pytest.approx(-0.5) and mix.ci_high == pytest.approx(-0.5)
    pooled = np.concatenate(ref)
    assert sft.token_nll_mean == pytest.approx(pooled.mean())
    assert sft.token_nll_median == pytest.approx(np.median(pooled))
    assert sft.n_tokens == len(pooled) and sft.n_items == 30
    assert sft.item_nll_mean == pytest.approx(np.mean([r.mean() for r in ref]))
    assert sft.sequence_nll_mean == pytest.approx(np.mean([r.sum() for r in ref]))
    assert sft.length_mean == pytest.approx(np.mean([len(r) for r in ref]))


def test_compare_pairs_a_set_with_dropped_items_on_the_items_it_kept():
    rng = np.random.default_rng(4)
    ids = [f"r{i}" for i in range(40)]
    ref = [rng.uniform(2, 8, size=1) for _ in ids]
    kept = [i for i in range(40) if i % 3]  # a third of the records failed and were dropped
    mix = fake([ids[i] for i in kept], [ref[i] - 1.0 for i in kept])
    row = compare_targets({"SFT": fake(ids, ref), "MixSD": mix}, n_boot=300).iloc[1]
    assert row.paired and row.n_paired == len(kept) == row.n_items
    assert row.delta_item_nll == pytest.approx(-1.0)  # not the difference of the two means
    assert row.ci_low == pytest.approx(-1.0) and row.ci_high == pytest.approx(-1.0)
    unpaired_delta = np.mean([ref[i][0] - 1.0 for i in kept]) - np.mean([r[0] for r in ref])
    assert abs(unpaired_delta + 1.0) > 1e-3  # the unpaired estimate would differ


def test_compare_unpaired_ci_matches_normal_theory():
    rng = np.random.default_rng(2)
    a = rng.normal(3.0, 1.0, size=400)
    b = rng.normal(2.0, 1.0, size=300)
    results = {"A": fake([f"a{i}" for i in range(400)], a[:, None]),
               "B": fake([f"b{i}" for i in range(300)], b[:, None])}
    row = compare_targets(results, reference="A", n_boot=4000, seed=3).iloc[1]
    assert not row.paired and row.n_paired == 0
    half = 1.96 * np.sqrt(a.var(ddof=1) / 400 + b.var(ddof=1) / 300)
    delta = b.mean() - a.mean()
    assert row.delta_item_nll == pytest.approx(delta)
    assert row.ci_low == pytest.approx(delta - half, abs=0.15 * half)
    assert row.ci_high == pytest.approx(delta + half, abs=0.15 * half)
    again = compare_targets(results, reference="A", n_boot=4000, seed=3).iloc[1]
    assert again.ci_low == row.ci_low  # seeded


def test_compare_bad_input():
    one = fake(["a"], [[1.0]])
    with pytest.raises(ValueError, match="'X' is not among"):
        compare_targets({"SFT": one}, reference="X")
    with pytest.raises(ValueError, match="empty"):
        compare_targets({})
    row = compare_targets({"SFT": one, "B": fake(["b"], [[2.0]])}).iloc[1]
    assert row.delta_item_nll == 1.0 and np.isnan(row.ci_low)  # one item: no CI


# --- command line ---------------------------------------------------------------------------


def nll_config(argv: list[str]) -> NLLConfig:
    """The config ``python -m forgetkit.nll`` builds from ``argv``."""
    return parse_config((NLLConfig, MixConfig), argv, omit={"mix.lam"})[0]


def test_config_from_yaml_and_flags(tmp_path):
    path = tmp_path / "nll.yaml"
    path.write_text("model: smollm2-135m\nlam: [0.7]\nlimit: 5\nmix: {temperature: 0.6}\n")
    config = nll_config(["--config", str(path), "--limit", "3", "--dtype", "bf16",
                         "--on_failure", "keep"])
    assert (config.model, config.lam, config.limit, config.dtype) == ("smollm2-135m", [0.7], 3,
                                                                      "bf16")
    assert (config.mix.temperature, config.mix.on_failure) == (0.6, "keep")
    config = nll_config(["--lam", "0", "0.5", "--batch-size", "4", "--mix.batch_size", "8"])
    assert (config.lam, config.batch_size, config.mix.batch_size) == ([0.0, 0.5], 4, 8)
    with pytest.raises(ValueError, match=r"lam=\[1.5\]"):
        NLLConfig(lam=[1.5])
    with pytest.raises(ValueError, match="unknown dtype"):
        NLLConfig(dtype="int3")
    path.write_text("lamda: 0.3\n")
    with pytest.raises(ValueError, match=r"unknown config key 'lamda'.*did you mean 'lam'"):
        nll_config(["--config", str(path)])
    with pytest.raises(ValueError, match=r"unknown option --mix\.lam"):  # set by --lam
        nll_config(["--mix.lam", "0.3"])


def test_cli_writes_table_config_and_figures(tmp_path, capsys):
    """End to end on toyworld with the real MixSD target builder."""
    out = tmp_path / "nll"
    main(["--records", "kgfact", "--limit", "4", "--lam", "0", "0.5", "--out", str(out),
          "--device", "cpu", "--n_boot", "200", "--max_new_tokens", "24", "--max_retries", "1"])
    printed = capsys.readouterr().out
    assert "MixSD lam=0.5" in printed and "delta_item_nll" in printed
    rows = json.loads((out / "nll_table.json").read_text())
    reports = json.loads((out / "mixsd_reports.json").read_text())
    assert [r["target_set"] for r in rows] == ["SFT", "MixSD lam=0", "MixSD lam=0.5"]
    assert rows[0]["n_items"] == 4 and rows[0]["ci_low"] is None
    for row in rows[1:]:
        assert row["n_items"] == reports[row["target_set"]]["n_targets"]
        assert row["paired"] == (row["n_items"] >= 2) and row["n_paired"] == (
            row["n_items"] if row["n_items"] >= 2 else 0)
    tokens = pd.read_csv(out / "tokens.csv")
    mixed = tokens[tokens.target_set == "MixSD lam=0"]
    assert set(mixed.branch.dropna()) <= {"expert"}  # lam 0: every token from the expert
    saved = nll_config(["--config", str(out / "nll_config.yaml")])
    assert (saved.lam, saved.limit, saved.mix.max_new_tokens) == ([0.0, 0.5], 4, 24)
    for name in ["nll_table.csv", "sequences.csv", "token_nll_ecdf.png", "nll_by_position.png",
                 "token_heat_strip.png", "sequence_nll_vs_length.png"]:
        assert (out / name).stat().st_size > 0, name
    assert not list(out.glob(".*.tmp"))


def test_run_takes_objects_as_well_as_names(toyworld, tmp_path):
    """``run`` with the model and records as objects gives the table ``run`` by names gives."""
    args = ["--records", "kgfact", "--limit", "3", "--lam", "0.3", "--device", "cpu",
            "--n_boot", "50", "--max_new_tokens", "16", "--max_retries", "0"]
    named = run_nll(nll_config([*args, "--out", str(tmp_path / "named")]))
    model, tokenizer = toyworld
    given = run_nll(nll_config([*args, "--out", str(tmp_path / "given")]), model=model,
                tokenizer=tokenizer, records=load_records("kgfact")[:5])  # limit still applies
    pd.testing.assert_frame_equal(named, given)
    assert (tmp_path / "named" / "tokens.csv").read_text() == \
        (tmp_path / "given" / "tokens.csv").read_text()
