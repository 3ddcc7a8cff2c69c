"""The memory model of ``--plan``: parameter counts from a meta-device model, scaling of the
predictions, and a CLI that prints without loading weights."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch

from forgetkit.fisher.pergrad import FisherError
from forgetkit.fisher.plan import (
    HEADROOM,
    PLAN_REPRESENTATIONS,
    choose_representation,
    memory_plan,
    meta_model,
    model_config,
)


def _tiny_gpt2():
    from transformers import GPT2Config

    return GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=97, n_positions=64)


def test_parameter_counts_equal_the_real_models(toyworld):
    from transformers import GPT2LMHeadModel

    model = toyworld[0]
    plan = memory_plan(model_config("toyworld"))
    assert plan.parameters == sum(p.numel() for p in model.parameters())
    mlp = memory_plan(model_config("toyworld"), params="mlp")
    assert mlp.selected == sum(p.numel() for n, p in model.named_parameters() if "mlp" in n)
    assert mlp.factored_layers == 3 * model.config.num_hidden_layers
    assert mlp.fallback_parameters == 0
    config = _tiny_gpt2()
    gpt2 = GPT2LMHeadModel(config)
    plan = memory_plan(config)
    assert plan.parameters == sum(p.numel() for p in gpt2.parameters())
    assert plan.selected == plan.parameters
    # Conv1D layers are factored; the tied head and embeddings, norms and biases of
    # nothing else go to the diagonal fallback
    assert plan.factored_layers == 4 * config.n_layer
    assert plan.fallback_parameters == sum(p.numel() for n, p in gpt2.named_parameters()
                                           if not n.endswith(("attn.weight", "proj.weight",
                                                              "fc.weight", "attn.bias",
                                                              "proj.bias", "fc.bias")))
    # a model given as an object plans the same as its config
    assert memory_plan(gpt2).rows == plan.rows


def test_predictions_scale_with_n_rank_and_dtype():
    config = model_config("toyworld")
    small, large = (memory_plan(config, n_samples=n) for n in (64, 256))
    assert [r.representation for r in small.rows] == list(PLAN_REPRESENTATIONS)
    grow = {r.representation: large.row(r.representation).peak_bytes - r.peak_bytes
            for r in small.rows}
    # the gram matrix grows linearly in N: 192 more rows of P float32 entries, held twice
    assert grow["gram"] == 2 * 192 * small.selected * 4
    # the streaming representations do not grow with N
    for kind in ("diagonal", "randomized", "exact", "kfac", "displacement"):
        assert grow[kind] == 0, kind
    assert large.row("gram").passes == 1 and large.row("randomized").passes == 4
    # the sketch grows with the rank, the per-example gradients with the batch
    k8, k32 = (memory_plan(config, rank=k).row("randomized").terms["sketch"] for k in (8, 32))
    assert k32 - k8 == 14 * small.selected * 24  # Ω (bfloat16), Y, Q and one product (float32)
    for term in ("one_parameter", "kept_inputs", "kept_output_gradients", "activations"):
        b4, b16 = (memory_plan(config, fisher_batch_size=b).row("diagonal").terms[term]
                   for b in (4, 16))
        if term == "one_parameter":  # 12 more rows of the largest parameter (float32)
            largest = max(p.numel() for p in meta_model(config).parameters())
            assert b16 - b4 == 12 * largest * 4
        else:
            assert b16 == 4 * b4, term
    half = memory_plan(config, dtype=torch.bfloat16)
    assert half.weights_bytes * 2 == small.weights_bytes
    assert half.row("displacement").peak_bytes < small.row("displacement").peak_bytes


def test_reference_configs_are_the_published_sizes():
    plans = {name: memory_plan(model_config(name), n_samples=128)
             for name in ("smollm2-135m", "llama-3.2-1b")}
    assert plans["smollm2-135m"].parameters == 134_515_008
    assert plans["llama-3.2-1b"].parameters == 1_235_814_400
    # the 49k-vocabulary tied embedding is on the diagonal fallback, not factored
    assert plans["smollm2-135m"].fallback_parameters >= 49152 * 576
    gram = plans["smollm2-135m"].row("gram").terms["gradient_matrix"]
    assert gram == 2 * 128 * 134_515_008 * 4


def test_bad_plan_input_is_named(tmp_path):
    config = model_config("toyworld")
    with pytest.raises(FisherError, match="n_samples must be >= 1"):
        memory_plan(config, n_samples=0)
    with pytest.raises(FisherError, match="matches no parameter"):
        memory_plan(config, params="no_such_layer")
    with pytest.raises(FisherError, match="no config for 'nowhere/none'"):
        model_config("nowhere/none")
    (tmp_path / "model.gguf").write_text("")
    with pytest.raises(FisherError, match=r"not a folder with config\.json"):
        model_config(tmp_path / "model.gguf")


def test_plan_cli_prints_and_exits_without_weights(tmp_path):
    """A folder holding only config.json: --plan reads it and exits before any weight (there
    are none to load) and before any report is written."""
    from transformers import LlamaConfig

    folder = tmp_path / "config-only"
    folder.mkdir()
    LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, vocab_size=300).save_pretrained(folder)
    assert [p.name for p in folder.iterdir()] == ["config.json"]
    out = tmp_path / "report"
    started = time.time()
    done = subprocess.run([sys.executable, "-m", "forgetkit.fisher", "--plan", "--base",
                           str(folder), "--params", "mlp", "--n_samples", "32", "--rank", "4",
                           "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert time.time() - started < 60
    lines = done.stdout.splitlines()
    assert "selected by --params 'mlp'" in lines[0] and "N=32 probes" in lines[1]
    rows = lines[4:4 + len(PLAN_REPRESENTATIONS)]
    assert {line.split()[0] for line in rows} == set(PLAN_REPRESENTATIONS)
    assert lines[-1].startswith("cpu has ") and "--representation low_rank: low_rank" in lines[-1]
    assert not out.exists()
    json.loads(json.dumps(memory_plan(model_config(folder)).to_dict()))  # JSON-ready
    bad = subprocess.run([sys.executable, "-m", "forgetkit.fisher", "--plan", "--base",
                          str(folder), "--params", "nothing_matches"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "error:" in bad.stderr and "nothing_matches" in bad.stderr


def test_auto_takes_the_most_accurate_representation_that_fits():
    """low_rank (exact) > kfac > diagonal by accuracy; each is taken when the report's
    predicted peak with it (the representation, then the diagonal and the displacement beside
    it, plus what the report holds) fits with headroom; a named one is refused only when that
    peak alone does not fit."""
    plan = memory_plan(model_config("toyworld"), n_samples=64, seq_len=50)
    peak = choose_representation(plan, 10**15, "auto", "exact")[1]["predicted_peak_bytes"]
    assert peak["low_rank"] > peak["kfac"] > peak["diagonal"]  # the order the test relies on
    assert peak["low_rank"] >= plan.row("exact").peak_bytes
    assert peak["kfac"] > plan.row("kfac").peak_bytes  # the diagonal runs beside its factors

    def auto(available, **kwargs):
        return choose_representation(plan, int(available), "auto", "exact", **kwargs)

    assert auto(peak["low_rank"] * HEADROOM)[0] == "low_rank"
    assert auto(peak["low_rank"] * HEADROOM - 1)[0] == "kfac"
    assert auto(peak["kfac"] * HEADROOM - 1)[0] == "diagonal"
    assert auto(peak["low_rank"] * HEADROOM - 1, kfac_possible=False)[0] == "diagonal"
    chosen, record = auto(peak["kfac"] * HEADROOM)
    assert record["chosen"] == chosen == "kfac" and record["requested"] == "auto"
    held = auto(10**15, held=10**9)[1]["predicted_peak_bytes"]
    assert all(held[r] == peak[r] + 10**9 for r in peak)
    gram = choose_representation(plan, 10**15, "auto", "gram")[1]
    assert gram["predicted_peak_bytes"]["low_rank"] >= plan.row("gram").peak_bytes
    with pytest.raises(FisherError, match="no Fisher representation fits"):
        auto(peak["diagonal"])  # fits, but not with headroom
    # named: kept while its peak fits (no headroom), refused with the way out named
    assert choose_representation(plan, peak["low_rank"], "low_rank", "exact")[0] == "low_rank"
    with pytest.raises(FisherError, match=r"--representation low_rank needs about .* use "
                                          r"--representation kfac or auto"):
        choose_representation(plan, peak["low_rank"] - 1, "low_rank", "exact")


def test_report_resolves_auto_before_any_fisher_work(toyworld, monkeypatch):
    from forgetkit.data.records import load_probes
    from forgetkit.fisher import plan as plan_module
    from forgetkit.fisher.report import ReportConfig, resolve_representation, spread_sample

    model, tokenizer = toyworld
    sample = spread_sample(load_probes("toyworld"), 32)
    config = ReportConfig(representation="auto", n_samples=32)
    monkeypatch.setattr(plan_module, "available_memory", lambda device: 10**12)
    resolved, record = resolve_representation(model, tokenizer, sample, config)
    assert resolved.representation == "low_rank" and record["requested"] == "auto"
    low_rank_peak = record["predicted_peak_bytes"]["low_rank"]
    monkeypatch.setattr(plan_module, "available_memory", lambda device: low_rank_peak)
    assert resolve_representation(model, tokenizer, sample, config)[0].representation == "kfac"
    monkeypatch.setattr(plan_module, "available_memory", lambda device: low_rank_peak - 1)
    with pytest.raises(FisherError, match="--representation low_rank needs about"):
        resolve_representation(model, tokenizer, sample,
                               ReportConfig(representation="low_rank", n_samples=32))


def test_hook_terms_equal_what_the_layer_hooks_keep(toyworld):
    """The plan's kept inputs and output gradients of the per-example hooks are the sizes of
    the tensors :func:`~forgetkit.fisher.hookgrad.hook_gradients` keeps for one batch (token
    ids counted as one entry each)."""
    from forgetkit.fisher.hookgrad import hook_gradients
    from forgetkit.fisher.pergrad import select_parameters
    from forgetkit.fisher.plan import _hook_gradient_bytes
    from forgetkit.models import Encoding, collate

    model, _ = toyworld
    rows, length = 3, 12
    encodings = [Encoding.from_ids(list(range(5 + r, 11 + r)), list(range(20, 26)))
                 for r in range(rows)]
    batch = collate(encodings, 0)
    assert batch["input_ids"].shape == (rows, length)
    chosen = select_parameters(model, None)
    grads = hook_gradients(model, chosen, batch, batch["labels"])
    kept = {"kept_inputs": 0, "kept_output_gradients": 0}
    seen_uses = {id(use): use for holders in grads._holders.values() for use, _ in holders}
    for use in seen_uses.values():
        for inputs, output_grad in use.calls:
            kept["kept_inputs"] += inputs.numel() * 4
            kept["kept_output_gradients"] += output_grad.numel() * 4
    terms = _hook_gradient_bytes(model, chosen, rows, length, 4, act=0)[1]
    assert terms["kept_inputs"] == kept["kept_inputs"]
    assert terms["kept_output_gradients"] == kept["kept_output_gradients"]
