"""The shared Fisher interface: save/load, provenance, quad_form, summaries, data encoding; and
every representation's quad_form, top, coordinates and project against its dense matrix."""

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

# a layer and its neighbours (norms, an embedding) so that kfac has a diagonal part too; P near
# 900, where a dense P x P eigh takes a fraction of a second
SUBSETS = {"llama": ["layers.0.", "embed_tokens"], "gpt2": [r"h\.0\.", "wpe"]}


def assert_relative(actual, expected, tolerance):
    scale = float(expected.abs().max())
    assert scale > 0
    error = float((actual - expected).abs().max()) / scale
    assert error < tolerance, f"relative error {error:.2e} >= {tolerance:.0e}"


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


# ---- the interface, for every representation, against its dense matrix --------------------

def build(kind, arch, seed=5):
    model, data = tiny_model(arch, seed=seed), tiny_data(6, seed=seed)
    common = {"estimator": "empirical", "params": SUBSETS[arch], "dtype": torch.float64}
    if kind == "diagonal":
        return model, fisher.diagonal(model, None, data, **common)
    if kind == "low_rank":
        return model, fisher.low_rank(model, None, data, rank=5, **common)
    return model, fisher.kfac(model, None, data, **common)


def offsets(shapes):
    out, start = {}, 0
    for name, shape in shapes.items():
        out[name] = start
        start += shape.numel()
    return out, start


def dense_matrix(result) -> torch.Tensor:
    """The P x P matrix a representation stands for, built from its stored tensors."""
    where, size = offsets(result.shapes)
    if isinstance(result, fisher.DiagonalFisher):
        return torch.diag(torch.cat([v.flatten() for v in result.values.values()]))
    if isinstance(result, fisher.LowRankFisher):
        u = torch.cat([d.flatten(1) for d in result.directions.values()], 1)  # (k, P)
        return u.T @ torch.diag(result.eigenvalues) @ u
    matrix = torch.zeros(size, size, dtype=torch.float64)
    for layer in result.layers.values():
        out, columns = layer.eigenvalues.shape
        index = []  # flat parameter index of each entry (o, j) of the (out, in') matrix
        for o in range(out):
            for j in range(columns):
                if j == layer.in_features:
                    index.append(where[layer.bias] + o)
                elif layer.transposed:
                    index.append(where[layer.weight] + j * out + o)
                else:
                    index.append(where[layer.weight] + o * layer.in_features + j)
        basis = torch.kron(layer.gradient_eigenvectors, layer.activation_eigenvectors)
        block = basis @ torch.diag(layer.eigenvalues.flatten()) @ basis.T
        index = torch.tensor(index)
        matrix[index[:, None], index[None, :]] = block
    for name, values in (result.fallback.values if result.fallback else {}).items():
        span = torch.arange(where[name], where[name] + values.numel())
        matrix[span, span] = values.flatten()
    return matrix


def flat(tensors, shapes) -> torch.Tensor:
    return torch.cat([tensors[n].flatten() if n in tensors else torch.zeros(s.numel(),
                      dtype=torch.float64) for n, s in shapes.items()])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("kind", ["diagonal", "low_rank", "kfac"])
def test_interface_agrees_with_the_dense_matrix(kind, arch):
    _, result = build(kind, arch)
    shapes = result.shapes
    matrix = dense_matrix(result)
    values, vectors = torch.linalg.eigh(matrix)
    values, vectors = values.flip(0), vectors.flip(1)
    generator = torch.Generator().manual_seed(0)
    delta = {n: torch.randn(s, generator=generator, dtype=torch.float64)
             for n, s in shapes.items()}
    d = flat(delta, shapes)
    assert result.quad_form(delta) == pytest.approx(float(d @ matrix @ d), rel=1e-10)
    assert result.trace() == pytest.approx(float(matrix.trace()), rel=1e-10)
    assert result.rank == (5 if kind == "low_rank" else matrix.shape[0]) == result._rank_k(None)
    k = 4
    assert values[k - 1] > 1.01 * values[k]  # a gap: the top-k subspace is defined
    top = result.top(k)
    assert len(top) == k and bool((top.eigenvalues[:-1] >= top.eigenvalues[1:]).all())
    assert_relative(top.eigenvalues, values[:k], 1e-8)
    u = torch.stack([flat(direction.dense(), shapes) for direction in top.directions])  # (k, P)
    assert_relative(u @ u.T, torch.eye(k, dtype=torch.float64), 1e-10)
    assert_relative(matrix @ u.T, u.T * top.eigenvalues, 1e-8)  # eigenvectors
    coordinates = result.coordinates(delta, k)
    assert_relative(coordinates, u @ d, 1e-10)
    projector = vectors[:, :k] @ vectors[:, :k].T  # invariant to the choice of eigenvectors
    assert_relative(flat(result.project(delta, k), shapes), projector @ d, 1e-8)
    assert float(coordinates.square().sum()) == pytest.approx(float(d @ projector @ d), rel=1e-8)
    assert list(result.project(delta, k)) == list(shapes)
    if kind == "low_rank":  # k=None: every direction held
        assert_relative(result.coordinates(delta), u.new_tensor(
            [float(flat(dn.dense(), shapes) @ d) for dn in result.top(5).directions]), 1e-10)


LORA_LAYERS = {"llama": {"model.layers.0.mlp.up_proj.weight": False,
                         "model.layers.0.self_attn.q_proj.weight": False},
               # Conv1D weights are (in, out); PEFT's factors are (out, in)
               "gpt2": {"transformer.h.0.mlp.c_fc.weight": True,
                        "transformer.h.0.attn.c_attn.weight": True}}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("kind", ["diagonal", "low_rank", "kfac"])
def test_lora_update_through_its_factors_equals_the_merged_update(kind, arch):
    _, result = build(kind, arch)
    shapes = result.shapes
    generator = torch.Generator().manual_seed(2)
    entries, merged = {}, {n: torch.zeros(s, dtype=torch.float64) for n, s in shapes.items()}
    for name, transposed in LORA_LAYERS[arch].items():
        out, inputs = shapes[name][::-1] if transposed else shapes[name]
        factor = fisher.LoraFactor(torch.randn(out, 2, generator=generator, dtype=torch.float64),
                                   torch.randn(2, inputs, generator=generator,
                                               dtype=torch.float64), scale=0.5)
        entries[name] = factor
        merged[name] = factor.dense().T if transposed else factor.dense()
    bias = next(n for n in shapes if n.endswith("bias") or "norm" in n or "ln_" in n)
    entries[bias] = merged[bias] = torch.randn(shapes[bias], generator=generator,
                                               dtype=torch.float64)
    lora = fisher.ParamDelta(entries)  # entries it lacks are no update
    assert result.quad_form(lora) == pytest.approx(result.quad_form(merged), rel=1e-10)
    k = result.rank // 2 if kind != "low_rank" else 4  # half the coordinates of a full-rank one
    assert_relative(result.coordinates(lora), result.coordinates(merged), 1e-10)
    assert_relative(result.coordinates(lora, k), result.coordinates(merged, k), 1e-10)
    projected, expected = result.project(lora, k), result.project(merged, k)
    assert any(bool(projected[name].any()) for name in LORA_LAYERS[arch])
    for name in shapes:
        torch.testing.assert_close(projected[name], expected[name], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["diagonal", "low_rank", "kfac"])
def test_interface_rejects_bad_k_and_incomplete_updates(kind):
    _, result = build(kind, "llama")
    for k in (0, result.rank + 1, 2.0, True):
        with pytest.raises(fisher.FisherError, match="must be an integer between 1 and"):
            result.top(k)
    assert len(result.top(torch.tensor(2).numpy()[()])) == 2  # a numpy integer is an integer
    delta = {n: torch.zeros(s) for n, s in result.shapes.items()}
    name = "model.layers.0.mlp.up_proj.weight"
    with pytest.raises(fisher.FisherError, match=f"no entry for parameter '{name}'"):
        result.quad_form({n: v for n, v in delta.items() if n != name})
    with pytest.raises(fisher.FisherError, match="has shape"):
        result.coordinates({**delta, name: delta[name].T}, 3)
    with pytest.raises(fisher.FisherError, match="LoRA update of shape"):
        result.quad_form(fisher.ParamDelta({name: fisher.LoraFactor(
            torch.zeros(8, 1), torch.zeros(1, 8), 1.0)}))


def _broken_copy(tmp_path, result, edit_sidecar=None, tensor_bytes=None):
    result.save(tmp_path / "f")
    sidecar, tensors = tmp_path / "f.json", tmp_path / "f.safetensors"
    if edit_sidecar is not None:
        sidecar.write_text(edit_sidecar(sidecar.read_text()))
    if tensor_bytes is not None:
        tensors.write_bytes(tensor_bytes(tensors.read_bytes()))
    return tmp_path / "f"


def _without_provenance_field(text: str) -> str:
    meta = json.loads(text)
    del meta["provenance"]["data_hash"]
    return json.dumps(meta)


def _kind(kind: str):
    return lambda text: json.dumps({**json.loads(text), "kind": kind})


@pytest.mark.parametrize(("sidecar", "tensors", "message"), [
    (None, lambda b: b[: len(b) // 2], r"f\.safetensors: corrupt or truncated safetensors"),
    (None, lambda b: b"\x00" * 16, r"f\.safetensors: corrupt or truncated safetensors"),
    (lambda t: t[: len(t) // 2], None, r"f\.json: invalid JSON at line \d+, column \d+"),
    (lambda t: "[1]", None, r"f\.json: expected a JSON object, got list"),
    (_without_provenance_field, None, r"f\.json: field 'provenance\.data_hash' is missing"),
    (lambda t: json.dumps({**json.loads(t), "provenance": 3}), None,
     r"f\.json: field 'provenance' is missing or not an object"),
    (lambda t: json.dumps({**json.loads(t), "parameters": {"x": "big"}}), None,
     r"f\.json: field 'parameters' must map parameter names to shapes"),
    (_kind("low_rank"), None, r"f\.safetensors: holds a diagonal Fisher but its sidecar says "
                              r"low_rank"),
    (_kind("sparse"), None, r"f\.json: not a forgetkit Fisher .*kind='sparse'"),
])
def test_load_names_the_file_and_the_bad_field(fishers, tmp_path, sidecar, tensors, message):
    _, _, diag, _ = fishers
    with pytest.raises(fisher.FisherError, match=message):
        fisher.load(_broken_copy(tmp_path, diag, sidecar, tensors))
