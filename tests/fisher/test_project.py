from __future__ import annotations

import pytest
import torch

from forgetkit.fisher.delta import ParamDelta, delta
from forgetkit.fisher.diagonal import DiagonalFisher
from forgetkit.fisher.io import Provenance
from forgetkit.fisher.low_rank import LowRankFisher
from forgetkit.fisher.project import project


def _provenance(estimator="true"):
    return Provenance(model="synthetic", weights_hash="0", data_hash="0", estimator=estimator,
                      n=1, mc_samples=1, seed=0, params=None, dtype="float64",
                      forgetkit_version="test")


def _synthetic(shapes, k, seed=0):
    """Orthonormal directions across two parameters and known eigenvalues."""
    gen = torch.Generator().manual_seed(seed)
    sizes = [torch.Size(s).numel() for s in shapes.values()]
    q, _ = torch.linalg.qr(torch.randn(sum(sizes), k, generator=gen, dtype=torch.float64))
    directions, start = {}, 0
    for (name, shape), size in zip(shapes.items(), sizes, strict=True):
        directions[name] = q[start : start + size].T.reshape(k, *shape).contiguous()
        start += size
    eigenvalues = torch.tensor([8.0, 4.0, 2.0, 1.0][:k], dtype=torch.float64)
    return LowRankFisher(eigenvalues=eigenvalues, directions=directions,
                         provenance=_provenance()), q


def test_project_recovers_known_energies():
    shapes = {"a.weight": (3, 4), "b.weight": (5,)}
    fisher, q = _synthetic(shapes, k=4)
    # d = 3 u_0 + 0 u_1 + 1 u_2 + 2 u_3 + a component orthogonal to all directions
    gen = torch.Generator().manual_seed(1)
    rest = torch.randn(q.shape[0], generator=gen, dtype=torch.float64)
    rest -= q @ (q.T @ rest)
    rest *= 1.0 / rest.norm()
    flat = q @ torch.tensor([3.0, 0.0, 1.0, 2.0], dtype=torch.float64) + rest
    d = ParamDelta({"a.weight": flat[:12].reshape(3, 4), "b.weight": flat[12:]})
    p = project(d, fisher)
    assert p.coefficients == pytest.approx([3.0, 0.0, 1.0, 2.0], abs=1e-12)
    assert p.delta_sq_norm == pytest.approx(15.0)
    assert p.captured_energy == pytest.approx([9 / 15, 9 / 15, 10 / 15, 14 / 15])
    assert p.random_baseline == pytest.approx([j / 17 for j in range(1, 5)])
    assert p.fisher_displacement == pytest.approx(8 * 9 + 2 * 1 + 1 * 4)
    assert p.predicted_kl == pytest.approx(p.fisher_displacement / 2)
    assert p.fisher_displacement == pytest.approx(fisher.quad_form(d.as_dense_dict()))
    assert {row["module"] for row in p.per_module} == {"a", "b"}
    for row in p.per_module:
        assert 0.0 <= row["captured_energy"] <= 1.0 + 1e-12


def test_project_diagonal_uses_top_coordinates():
    values = {"w.weight": torch.tensor([[1.0, 5.0], [3.0, 0.5]], dtype=torch.float64)}
    fisher = DiagonalFisher(values=values, stderr={"w.weight": torch.zeros(2, 2)},
                            provenance=_provenance("empirical"))
    d = ParamDelta({"w.weight": torch.tensor([[1.0, 2.0], [0.0, 4.0]], dtype=torch.float64)})
    p = project(d, fisher, rank=2)
    assert p.coefficients == pytest.approx([2.0, 0.0])  # entries with F = 5 and F = 3
    assert p.captured_energy == pytest.approx([4 / 21, 4 / 21])
    assert p.fisher_displacement == pytest.approx(1 + 20 + 0 + 8)
    assert not p.predicted_kl_valid


def test_project_searches_the_leading_entries_once_and_sees_in_place_changes(monkeypatch):
    import forgetkit.fisher.io as fisher_io

    calls = []
    real = fisher_io.top_entries
    monkeypatch.setattr(fisher_io, "top_entries", lambda v, k: calls.append(k) or real(v, k))
    gen = torch.Generator().manual_seed(0)
    values = {f"m{i}.weight": torch.rand(3, 4, generator=gen, dtype=torch.float64)
              for i in range(5)}
    fisher = DiagonalFisher(values=values, stderr={n: torch.zeros(3, 4) for n in values},
                            provenance=_provenance("empirical"))
    d = ParamDelta({n: torch.randn(3, 4, generator=gen, dtype=torch.float64) for n in values})
    p = project(d, fisher, rank=6)
    assert len(p.per_module) == 5 and calls == [6]  # one search serves all five modules
    # an in-place write to the Fisher is seen: the next search runs and moves the top entry
    values["m3.weight"][1, 2] = 10.0
    assert fisher.coordinates(d, 6)[0] == d.entries["m3.weight"][1, 2]
    assert calls == [6, 6]


def test_lora_projection_equals_merged_projection():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    def llama():
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(
            vocab_size=30, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=2)).double()

    def adapted():
        model = get_peft_model(llama(), LoraConfig(r=2, target_modules=["q_proj", "down_proj"]))
        torch.manual_seed(3)
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.data.normal_(0, 0.2)
        return model

    base = llama()
    shapes = {n: tuple(p.shape) for n, p in base.named_parameters() if "layers" in n}
    fisher, _ = _synthetic(shapes, k=4, seed=2)
    lora = project(delta(base, adapted(), dtype=torch.float64), fisher)
    merged = project(delta(base, adapted().merge_and_unload(), dtype=torch.float64), fisher)
    assert lora.coefficients == pytest.approx(merged.coefficients, rel=1e-9, abs=1e-12)
    assert lora.fisher_displacement == pytest.approx(merged.fisher_displacement, rel=1e-9)
    assert lora.delta_sq_norm == pytest.approx(merged.delta_sq_norm, rel=1e-9)


def test_project_rejects_disjoint_parameters():
    fisher, _ = _synthetic({"a.weight": (2, 2)}, k=2)
    with pytest.raises(ValueError, match="share no parameter"):
        project(ParamDelta({"z.weight": torch.ones(2, 2)}), fisher)


# ---- every representation through the interface, against its dense matrix (float64) --------

def _dense_reference(result):
    """(M, eigenvalues descending, eigenvectors as columns) of the P x P matrix ``result``
    stands for, built from its stored tensors (tests/fisher/test_io.py)."""
    from tests.fisher.test_io import dense_matrix

    matrix = dense_matrix(result)
    values, vectors = torch.linalg.eigh(matrix)
    return matrix, values.flip(0), vectors.flip(1)


def _update(shapes, seed, skip=()):
    """A ParamDelta over the covered parameters except ``skip`` (no update there), plus an
    entry the Fisher does not cover (ignored)."""
    generator = torch.Generator().manual_seed(seed)
    entries = {n: torch.randn(s, generator=generator, dtype=torch.float64)
               for n, s in shapes.items() if n not in skip}
    entries["not.covered.weight"] = torch.ones(3, dtype=torch.float64)
    return ParamDelta(entries)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("kind", ["diagonal", "low_rank", "kfac"])
def test_project_through_the_interface_equals_the_dense_reference(kind, arch):
    from tests.fisher.test_io import assert_relative, build, flat

    _, result = build(kind, arch)
    shapes = result.shapes
    matrix, values, vectors = _dense_reference(result)
    k = 4
    gaps = values[:k] / values[1 : k + 1]
    assert bool((gaps > 1.001).all()), gaps  # distinct leading eigenvalues: each u_j defined
    skipped = list(shapes)[len(shapes) // 2]  # a covered parameter with no update
    update = _update(shapes, seed=3, skip=[skipped])
    d = flat(update.entries, shapes)
    p = project(update, result, rank=k)
    assert p.kind == result.kind and p.rank == k and p.parameters == d.numel()
    assert_relative(torch.tensor(p.eigenvalues, dtype=torch.float64), values[:k], 1e-8)
    # coefficients u_j . d up to the sign of each eigenvector
    expected = vectors[:, :k].T @ d
    assert_relative(torch.tensor(p.coefficients, dtype=torch.float64).abs(), expected.abs(), 1e-8)
    energies = expected.square().cumsum(0) / d.square().sum()
    assert_relative(torch.tensor(p.captured_energy, dtype=torch.float64), energies, 1e-8)
    assert p.delta_sq_norm == pytest.approx(float(d.square().sum()), rel=1e-12)
    assert p.fisher_displacement == pytest.approx(float(d @ matrix @ d), rel=1e-10)
    assert p.predicted_kl == pytest.approx(p.fisher_displacement / 2)
    assert p.top_displacement == pytest.approx(float((values[:k] * expected.square()).sum()),
                                               rel=1e-8)
    assert p.label == result.quad_form_label and not p.predicted_kl_valid
    # per module: the update restricted to the module's parameters
    modules = {}
    for name in shapes:
        modules.setdefault(name.rpartition(".")[0], []).append(name)
    assert [row["module"] for row in p.per_module] == list(modules)
    projector = vectors[:, :k] @ vectors[:, :k].T
    for row in p.per_module:
        own = flat({n: update.entries[n] for n in modules[row["module"]]
                    if n in update.entries}, shapes)
        assert row["parameters"] == sum(shapes[n].numel() for n in modules[row["module"]])
        assert row["delta_sq_norm"] == pytest.approx(float(own.square().sum()), rel=1e-12)
        assert row["fisher_displacement"] == pytest.approx(float(own @ matrix @ own), rel=1e-8,
                                                           abs=1e-14)
        share = float(own @ projector @ own) / float(own.square().sum()) if own.any() else 0.0
        assert row["captured_energy"] == pytest.approx(share, rel=1e-7, abs=1e-12)
    assert sum(r["delta_sq_norm"] for r in p.per_module) == pytest.approx(p.delta_sq_norm)


@pytest.mark.parametrize("kind", ["diagonal", "low_rank", "kfac"])
def test_project_rank_is_checked_and_defaults_to_16_directions(kind):
    from tests.fisher.test_io import build

    _, result = build(kind, "llama")
    update = _update(result.shapes, seed=4)
    assert project(update, result).rank == min(16, result.rank)
    for rank in (0, result.rank + 1, 2.5, True):
        with pytest.raises(ValueError, match=rf"rank={rank!r} must be an integer between 1 and "
                                             rf"{result.rank}"):
            project(update, result, rank=rank)


def _records_model_tokenizer(arch):
    from forgetkit.data.records import Record
    from forgetkit.models.toyworld import build_tokenizer
    from tests.fisher.test_diagonal import tiny_model

    records = [Record(f"r{i}", f"Where does {name} live?", f"{name} lives in {city}.", city)
               for i, (name, city) in enumerate([("Ada", "Paris"), ("Bo", "Rome"),
                                                 ("Cy", "Oslo"), ("Di", "Lima")])]
    tokenizer = build_tokenizer([r.prompt + " " + r.target for r in records])
    return records, tiny_model(arch, seed=2, vocab=len(tokenizer)), tokenizer


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("kind", ["diagonal", "low_rank", "kfac"])
def test_forgetting_risk_through_the_interface_equals_the_dense_reference(kind, arch):
    from forgetkit import fisher
    from forgetkit.fisher.risk import forgetting_risk
    from forgetkit.models import encode
    from tests.fisher.test_diagonal import reference_gradients
    from tests.fisher.test_io import SUBSETS, flat

    records, model, tokenizer = _records_model_tokenizer(arch)
    common = {"estimator": "empirical", "params": SUBSETS[arch], "dtype": torch.float64}
    result = {"diagonal": lambda: fisher.diagonal(model, tokenizer, records, **common),
              "low_rank": lambda: fisher.low_rank(model, tokenizer, records, rank=3, **common),
              "kfac": lambda: fisher.kfac(model, tokenizer, records, **common)}[kind]()
    matrix, _, vectors = _dense_reference(result)
    k = 3
    rows = forgetting_risk(model, tokenizer, records, result, batch_size=3, rank=k)
    assert [r["rank"] for r in rows] == list(range(1, len(records) + 1))
    encodings = [encode(tokenizer, r.prompt, r.target) for r in records]
    grads = reference_gradients(model, encodings, list(result.shapes))
    by_id = {r["record_id"]: r for r in rows}
    for i, record in enumerate(records):
        g = flat({n: v[i] for n, v in grads.items()}, result.shapes)
        sq = float(g.square().sum())
        row = by_id[record.id]
        assert row["grad_norm"] == pytest.approx(sq**0.5, rel=1e-8)
        assert row["fisher_rayleigh"] == pytest.approx(float(g @ matrix @ g) / sq, rel=1e-8)
        assert row["predicted_kl_step"] == pytest.approx(float(g @ matrix @ g) / 2, rel=1e-8)
        share = float((vectors[:, :k].T @ g).square().sum()) / sq
        assert row["energy_share"] == pytest.approx(share, rel=1e-7)
    assert [r["fisher_rayleigh"] for r in rows] == sorted((r["fisher_rayleigh"] for r in rows),
                                                          reverse=True)


def test_project_risk_and_report_never_branch_on_the_fishers_type():
    """Callers use the FisherMatrix interface only: no type tests, no attributes of one
    representation."""
    import re
    from pathlib import Path

    import forgetkit.fisher as package

    root = Path(package.__file__).parent
    forbidden = [r"\bkind\s*[!=]=", r"isinstance\([^)]*(Fisher|FisherMatrix)\b",
                 r"getattr\(\s*\w*fisher\w*\s*,", r"hasattr\(\s*\w*fisher\w*\s*,",
                 r"\b\w*fisher\w*\.(directions|values|eigenvalues|layers|fallback|method|"
                 r"residuals)\b", r"\b(LowRankFisher|DiagonalFisher|KroneckerFisher)\b"]
    for module in ("project.py", "risk.py", "report.py"):
        text = (root / module).read_text()
        for pattern in forbidden:
            found = [m.group(0) for m in re.finditer(pattern, text)]
            assert not found, f"{module}: {found}"
