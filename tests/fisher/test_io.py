"""The shared Fisher interface: save/load, provenance, quad_form, summaries, data encoding."""

from __future__ import annotations

import json
import logging
import re

import pytest
import torch

import forgetkit
from forgetkit import fisher
from forgetkit.data.records import Probe, Record
from forgetkit.models import encode
from forgetkit.models.toyworld import build_tokenizer
from tests.fisher.test_diagonal import tiny_data, tiny_model


@pytest.fixture(scope="module")
def fishers():
    model, data = tiny_model("llama", seed=1), tiny_data(6, seed=1)
    diag = fisher.diagonal(model, None, data, mc_samples=2, dtype=torch.float64, seed=3)
    low = fisher.low_rank(model, None, data, rank=3, params=["mlp", "embed"], mc_samples=2,
                          dtype=torch.float64, seed=3)
    return model, data, diag, low


def test_both_representations_share_one_interface(fishers):
    _, _, diag, low = fishers
    for result in (diag, low):
        assert isinstance(result, fisher.FisherMatrix)
        assert result.n == 6 and result.provenance.mc_samples == 2
        rows = result.summary()
        assert sum(r["parameters"] for r in rows) == sum(s.numel() for s in result.shapes.values())
        assert sum(r["trace"] for r in rows) == pytest.approx(result.trace(), rel=1e-12)
        assert sum(r["trace_share"] for r in rows) == pytest.approx(1.0)
        assert sum(r["top_share"] for r in rows) == pytest.approx(1.0)
    assert low.trace() == pytest.approx(float(low.eigenvalues.sum()))
    modules = [r["module"] for r in low.summary()]
    assert "model.layers.0.mlp.up_proj" in modules and "model.embed_tokens" in modules


@pytest.mark.parametrize("kind", ["diag", "low"])
def test_save_load_round_trip(fishers, tmp_path, kind):
    model, _, diag, low = fishers
    result = diag if kind == "diag" else low
    written = result.save(tmp_path / "fisher")
    assert written == tmp_path / "fisher.safetensors"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fisher.json", "fisher.safetensors"]
    sidecar = json.loads((tmp_path / "fisher.json").read_text())
    assert sidecar["kind"] == result.kind
    assert sidecar["provenance"]["forgetkit_version"] == forgetkit.__version__
    assert {"model", "weights_hash", "data_hash", "estimator", "n", "mc_samples",
            "seed"} <= set(sidecar["provenance"])
    loaded = fisher.load(tmp_path / "fisher.json", model)
    assert type(loaded) is type(result) and loaded.provenance == result.provenance
    for key, tensor in result._tensors().items():
        assert torch.equal(loaded._tensors()[key], tensor.cpu())
    assert type(result).load(tmp_path / "fisher", model).provenance == result.provenance
    other = fisher.LowRankFisher if kind == "diag" else fisher.DiagonalFisher
    with pytest.raises(fisher.FisherError, match="holds a"):
        other.load(tmp_path / "fisher", model)


def test_load_checks_the_model(fishers, tmp_path, caplog):
    _, _, diag, _ = fishers
    diag.save(tmp_path / "diag")
    with pytest.raises(fisher.FisherError, match=r"'model.embed_tokens.weight' has shape "
                                                 r"\(30, 8\) in the Fisher but \(31, 8\)"):
        fisher.load(tmp_path / "diag", tiny_model("llama", seed=1, vocab=31))
    with pytest.raises(fisher.FisherError, match=r"covers parameter 'model\.embed_tokens\.weight'"):
        fisher.load(tmp_path / "diag", tiny_model("gpt2"))
    with caplog.at_level(logging.WARNING):
        fisher.load(tmp_path / "diag", tiny_model("llama", seed=2))
    assert "weights differ" in caplog.text
    with pytest.raises(fisher.FisherError, match="no such file"):
        fisher.load(tmp_path / "missing")


def test_quad_form(fishers):
    _, _, diag, low = fishers
    generator = torch.Generator().manual_seed(0)
    delta = {n: torch.randn(s, generator=generator, dtype=torch.float64)
             for n, s in diag.shapes.items()}
    expected = sum(float((diag.values[n] * d.square()).sum()) for n, d in delta.items())
    assert diag.quad_form(delta) == pytest.approx(expected, rel=1e-12)
    coordinates = sum(u.flatten(1) @ delta[n].flatten() for n, u in low.directions.items())
    expected = float((low.eigenvalues * coordinates.square()).sum())
    assert low.quad_form(delta) == pytest.approx(expected, rel=1e-12)  # extra entries ignored
    name = next(iter(low.directions))
    assert low.quad_form({**delta, name: 0 * delta[name]}) < low.quad_form(delta)
    with pytest.raises(fisher.FisherError, match=f"no entry for parameter '{re.escape(name)}'"):
        low.quad_form({n: d for n, d in delta.items() if n != name})
    with pytest.raises(fisher.FisherError, match="has shape"):
        diag.quad_form({**delta, name: delta[name].T})


def test_records_and_probes_are_encoded_with_their_completion(tmp_path):
    records = [Record("r1", "Where does Ada live?", "Ada lives in Paris.", "Paris"),
               Record("r2", "Where does Bo live?", "Bo lives in Rome.", "Rome")]
    probes = [Probe("p1", "Where does Ada live?", "Paris", "known_fact")]
    tokenizer = build_tokenizer([r.prompt + " " + r.target for r in records])
    model = tiny_model("gpt2", vocab=len(tokenizer))
    from_records = fisher.diagonal(model, tokenizer, records, estimator="empirical",
                                   dtype=torch.float64)
    encoded = [encode(tokenizer, r.prompt, r.target) for r in records]
    from_encodings = fisher.diagonal(model, tokenizer, encoded, estimator="empirical",
                                     dtype=torch.float64)
    assert from_records.provenance.data_hash == from_encodings.provenance.data_hash
    assert from_records.trace() == pytest.approx(from_encodings.trace(), rel=1e-12)
    from_probes = fisher.diagonal(model, tokenizer, probes, estimator="empirical")
    answer_only = fisher.diagonal(model, tokenizer, [encode(tokenizer, "Where does Ada live?",
                                                            "Paris")], estimator="empirical")
    assert from_probes.provenance.data_hash == answer_only.provenance.data_hash
    assert from_probes.provenance.data_hash != from_records.provenance.data_hash
