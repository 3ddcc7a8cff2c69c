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
