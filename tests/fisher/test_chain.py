"""The whole chain: Fisher estimate -> delta -> project -> predicted KL, against measured KL."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from forgetkit import fisher
from forgetkit.data.records import Probe, Record
from forgetkit.fisher.delta import delta
from forgetkit.fisher.kl import measured_kl
from forgetkit.fisher.project import project
from forgetkit.fisher.risk import forgetting_risk
from forgetkit.models.toyworld import build_tokenizer

PAIRS = [("Where does Zo live?", "Zo lives in Bram."), ("What is 3 plus 4?", "3 plus 4 is 7."),
         ("Who founded Kel?", "Kel was founded by Zo."), ("What is 2 plus 2?", "2 plus 2 is 4.")]


@pytest.fixture(scope="module")
def tiny():
    tokenizer = build_tokenizer([" ".join(p) for p in PAIRS])
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=8, intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id,
    )).double().eval()
    return model, tokenizer


def test_predicted_kl_matches_measured_kl_for_a_small_step(tiny):
    model, tokenizer = tiny
    probes = [Probe(id=str(i), prompt=p, answer=c, capability="x") for i, (p, c) in
              enumerate(PAIRS)]
    size = sum(p.numel() for p in model.parameters())
    F = fisher.low_rank(model, tokenizer, probes, rank=min(len(probes) * 512, size),
                        estimator="true", mc_samples=512, dtype=torch.float64, batch_size=4)
    stepped = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(7)
    direction = {n: torch.randn(p.shape, generator=gen, dtype=torch.float64)
                 for n, p in model.named_parameters()}
    norm = sum(float(v.square().sum()) for v in direction.values()) ** 0.5
    with torch.no_grad():
        for n, p in stepped.named_parameters():
            p.add_(direction[n] * (1e-3 / norm))
    d = delta(model, stepped, dtype=torch.float64)
    assert d.sq_norm() == pytest.approx(1e-6, rel=1e-6)
    projection = project(d, F)
    measured = measured_kl(model, stepped, tokenizer, probes)
    assert measured.per_sequence > 0
    error = abs(projection.predicted_kl - measured.per_sequence) / measured.per_sequence
    assert error < 0.10, (projection.predicted_kl, measured.per_sequence)  # 512 label draws
    exact = fisher.displacement(model, tokenizer, probes, d)  # no draws: the exact d'Fd
    assert measured.per_sequence / exact.predicted_kl == pytest.approx(1.0, abs=0.01)


def test_measured_kl_is_zero_for_the_same_model(tiny):
    model, tokenizer = tiny
    result = measured_kl(model, model, tokenizer, PAIRS)
    assert result.per_token == pytest.approx(0.0, abs=1e-12)
    assert result.n_examples == len(PAIRS)
    with pytest.raises(ValueError, match="empty probe set"):
        measured_kl(model, model, tokenizer, [])


def test_forgetting_risk_ranks_by_alignment(tiny):
    model, tokenizer = tiny
    probes = [Probe(id=str(i), prompt=p, answer=c, capability="x") for i, (p, c) in
              enumerate(PAIRS[:2])]
    F = fisher.low_rank(model, tokenizer, probes, rank=2, estimator="empirical",
                        dtype=torch.float64)
    records = [Record(id=f"r{i}", prompt=p, target=c, answer=c.split()[-1])
               for i, (p, c) in enumerate(PAIRS)]
    rows = forgetting_risk(model, tokenizer, records, F)
    assert [r["rank"] for r in rows] == [1, 2, 3, 4]
    scores = [r["fisher_rayleigh"] for r in rows]
    assert scores == sorted(scores, reverse=True)
    # a record that IS a probe has its gradient inside the span of the probe Fisher
    probe_rows = {r["record_id"]: r for r in rows}
    assert probe_rows["r0"]["energy_share"] == pytest.approx(1.0, abs=1e-8)
    for row in rows:
        assert 0.0 <= row["energy_share"] <= 1.0 + 1e-9
