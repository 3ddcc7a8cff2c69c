"""Exact matrix-free Fisher quadratic forms and products against the dense Fisher built by
enumerating every label at every answer position, on tiny float64 models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.func import functional_call, jacrev

from forgetkit import fisher
from forgetkit.fisher.delta import LoraFactor, ParamDelta
from forgetkit.fisher.exact import FisherOperator, displacement
from forgetkit.fisher.low_rank import exact_low_rank
from forgetkit.models import Encoding, collate
from tests.fisher.test_diagonal import reference_gradients, tiny_data, tiny_model


@pytest.fixture(autouse=True)
def float64_rms_norm(monkeypatch):
    """transformers' LlamaRMSNorm normalizes in float32 whatever the model's dtype, which caps
    float64 agreement between forward- and reverse-mode derivatives near 1e-8; the math under
    test is checked with the norm kept in the model's dtype."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    def forward(self, hidden_states):
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))

    monkeypatch.setattr(LlamaRMSNorm, "forward", forward)


SUBSETS = {"llama": ["layers.0.mlp", "embed_tokens"], "gpt2": [r"h\.0\.mlp\.", "*.ln_f.*"]}


def flat_params(model, names):
    named = dict(model.named_parameters())
    return torch.cat([named[n].detach().reshape(-1) for n in names])


def unflat(model, names, flat):
    named = dict(model.named_parameters())
    out, start = {}, 0
    for n in names:
        out[n] = flat[start : start + named[n].numel()].reshape(named[n].shape)
        start += named[n].numel()
    return out


def dense_fisher(model, data: list[Encoding], names, estimator: str) -> np.ndarray:
    """(P, P): the mean over examples of sum_t sum_y p_t(y) g_ty g_ty' (true: every label y
    enumerated at every answer position t, g_ty = grad log p_t(y)) or of g g' (empirical, g
    the gradient of the sequence log-likelihood at the data labels)."""
    theta = flat_params(model, names)
    total = np.zeros((theta.numel(), theta.numel()))
    for enc in data:
        batch = collate([enc], pad_token_id=0)
        scored = (batch["labels"][0, 1:] != -100).nonzero().squeeze(-1)

        def logp(flat, batch=batch, scored=scored):
            logits = functional_call(model, unflat(model, names, flat), args=(),
                                     kwargs={"input_ids": batch["input_ids"],
                                             "use_cache": False}).logits
            return torch.log_softmax(logits[0, scored], -1)  # (n, V)

        jac = jacrev(logp)(theta).detach().numpy()  # (n, V, P): every label's gradient
        probs = np.exp(logp(theta).detach().numpy())  # (n, V)
        if estimator == "true":
            total += np.einsum("ty,typ,tyq->pq", probs, jac, jac)
        else:
            labels = batch["labels"][0, 1:][scored].numpy()
            g = jac[np.arange(len(labels)), labels].sum(0)
            total += np.outer(g, g)
    return total / len(data)


def random_delta(model, names, seed, scale=0.1):
    generator = torch.Generator().manual_seed(seed)
    named = dict(model.named_parameters())
    return {n: torch.randn(named[n].shape, generator=generator, dtype=torch.float64) * scale
            for n in names}


def flat_of(vector, names):
    return torch.cat([vector[n].detach().reshape(-1) for n in names]).numpy()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("estimator", ["true", "empirical"])
def test_displacement_equals_dense_quadratic_form(arch, estimator):
    model, data = tiny_model(arch, seed=4), tiny_data(5, seed=4)
    names = [n for n, _ in model.named_parameters()]
    d = random_delta(model, names, seed=1)
    F = dense_fisher(model, data, names, estimator)
    expected = flat_of(d, names) @ F @ flat_of(d, names)
    result = displacement(model, None, data, d, estimator=estimator, batch_size=2)
    assert result.mean == pytest.approx(expected, rel=1e-8)
    assert result.per_probe.shape == (5,) and result.mode == "jvp"
    assert result.ci[0] <= result.mean <= result.ci[1]
    assert result.predicted_kl == pytest.approx(expected / 2, rel=1e-8)


def test_per_probe_and_double_backward_agree_with_the_dense_form():
    model, data = tiny_model("llama", seed=5), tiny_data(4, seed=5)
    names = [n for n, _ in model.named_parameters()]
    d = random_delta(model, names, seed=2)
    result = displacement(model, None, data, d)
    twin = displacement(model, None, data, d, mode="double_backward")
    assert twin.mode == "double_backward"
    np.testing.assert_allclose(twin.per_probe, result.per_probe, rtol=1e-10)
    for i, enc in enumerate(data):
        F_i = dense_fisher(model, [enc], names, "true")
        assert result.per_probe[i] == pytest.approx(flat_of(d, names) @ F_i @ flat_of(d, names),
                                                    rel=1e-8)


class _FullLogits(torch.nn.Module):
    """A causal LM whose forward has no ``logits_to_keep``: the output layer runs on every
    position and forgetkit selects the scored ones itself."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask,
                          position_ids=position_ids, use_cache=use_cache)


@pytest.mark.parametrize("estimator", ["true", "empirical"])
def test_models_without_logits_to_keep_give_the_same_forms(estimator):
    model, data = tiny_model("gpt2", seed=8), tiny_data(5, seed=8)
    wrapped = _FullLogits(model)
    d = random_delta(model, [n for n, _ in model.named_parameters()], seed=4)
    sliced = displacement(model, None, data, d, estimator=estimator, batch_size=3)
    full = displacement(wrapped, None, data, {f"inner.{n}": v for n, v in d.items()},
                        estimator=estimator, batch_size=3)
    np.testing.assert_allclose(full.per_probe, sliced.per_probe, rtol=1e-10)
    fv = FisherOperator(model, None, data, estimator=estimator, batch_size=3) @ d
    fv_full = FisherOperator(wrapped, None, data, estimator=estimator, batch_size=3) @ {
        f"inner.{n}": v for n, v in d.items()}
    for n, v in fv.items():
        torch.testing.assert_close(fv_full[f"inner.{n}"], v, rtol=1e-10, atol=1e-12)


def test_empirical_displacement_equals_per_example_backward_loop():
    model, data = tiny_model("gpt2", seed=6), tiny_data(6, seed=6)
    names = [n for n, _ in model.named_parameters()]
    d = random_delta(model, names, seed=3)
    grads = reference_gradients(model, data, names)  # name -> (N, *shape)
    dots = sum((grads[n] * d[n]).flatten(1).sum(1) for n in names)  # (N,)
    result = displacement(model, None, data, d, estimator="empirical", batch_size=4)
    np.testing.assert_allclose(result.per_probe, dots.square().numpy(), rtol=1e-8)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lora_update_given_as_factors(arch):
    model, data = tiny_model(arch, seed=7), tiny_data(4, seed=7)
    names = [n for n, _ in model.named_parameters()]
    generator = torch.Generator().manual_seed(0)
    named = dict(model.named_parameters())
    targets = [n for n in names if n.endswith("weight") and named[n].ndim == 2][:3]
    entries = {}
    for n in targets:
        out_dim, in_dim = named[n].shape
        entries[n] = LoraFactor(torch.randn(out_dim, 2, generator=generator, dtype=torch.float64),
                                torch.randn(2, in_dim, generator=generator, dtype=torch.float64),
                                0.5)
    lora = ParamDelta(entries)
    dense = {n: (lora.dense(n) if n in entries else torch.zeros_like(named[n])) for n in names}
    F = dense_fisher(model, data, names, "true")
    expected = flat_of(dense, names) @ F @ flat_of(dense, names)
    assert displacement(model, None, data, lora).mean == pytest.approx(expected, rel=1e-8)


@pytest.mark.parametrize("estimator", ["true", "empirical"])
def test_fisher_vector_product_equals_dense(estimator):
    model, data = tiny_model("llama", seed=8), tiny_data(4, seed=8)
    names = list(fisher.select_parameters(model, SUBSETS["llama"]))
    F = dense_fisher(model, data, names, estimator)
    v = random_delta(model, names, seed=4, scale=1.0)
    operator = FisherOperator(model, None, data, estimator=estimator, params=SUBSETS["llama"],
                              batch_size=3)
    got = flat_of(operator @ v, names)
    expected = F @ flat_of(v, names)
    assert np.linalg.norm(got - expected) <= 1e-10 * np.linalg.norm(expected)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_exact_low_rank_equals_dense_eigh(arch):
    model, data, rank = tiny_model(arch, seed=9), tiny_data(4, seed=9), 4
    names = list(fisher.select_parameters(model, SUBSETS[arch]))
    values, vectors = np.linalg.eigh(dense_fisher(model, data, names, "true"))
    values, vectors = values[::-1], vectors[:, ::-1]
    assert values[rank - 1] > 1.05 * values[rank]
    result = exact_low_rank(model, None, data, rank, params=SUBSETS[arch], tol=0)
    assert result.method == "exact" and result.provenance.mc_samples == 0
    np.testing.assert_allclose(result.eigenvalues.numpy(), values[:rank], rtol=1e-8)
    U = torch.cat([u.flatten(1) for u in result.directions.values()], 1).numpy()
    np.testing.assert_allclose(U @ U.T, np.eye(rank), atol=1e-10)
    cosines = np.linalg.svd(U @ vectors[:, :rank], compute_uv=False)
    assert cosines.min() > 1 - 1e-8
    # the start vector is the only use of the seed
    again = exact_low_rank(model, None, data, rank, params=SUBSETS[arch], seed=3, tol=0)
    np.testing.assert_allclose(again.eigenvalues.numpy(), values[:rank], rtol=1e-8)
    assert len(again.residuals) == rank and max(again.residuals) < 1e-8 * values[0]
    # through low_rank, at its default accuracy (tol 1e-3 on the eigenvalues)
    quick = fisher.low_rank(model, None, data, rank=rank, params=SUBSETS[arch], method="exact")
    np.testing.assert_allclose(quick.eigenvalues.numpy(), values[:rank], rtol=1e-3)


def test_per_module_and_per_capability():
    from forgetkit.data.records import Probe
    from forgetkit.models.toyworld import build_tokenizer

    tokenizer = build_tokenizer(["where does zo live ? zo lives in bram ."])
    model = tiny_model("llama", seed=10, vocab=len(tokenizer))
    probes = [Probe(id=f"p{i}", prompt="where does zo live ?",
                    answer="zo lives in bram ." if i % 2 else "bram .", capability=cap)
              for i, cap in enumerate(["x", "y", "x", "y", "x"])]
    names = [n for n, _ in model.named_parameters()]
    d = random_delta(model, [n for n in names if ".mlp." in n], seed=5)
    result = displacement(model, tokenizer, probes, d, per_module=True)
    assert set(result.per_capability) == {"x", "y"}
    assert result.per_capability["x"]["n"] == 3
    xs = [v for v, p in zip(result.per_probe, probes, strict=True) if p.capability == "x"]
    assert result.per_capability["x"]["mean"] == pytest.approx(np.mean(xs), rel=1e-12)
    assert set(result.per_module) == {"model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj",
                                      "model.layers.0.mlp.down_proj", "model.layers.1.mlp.gate_proj",
                                      "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"}
    only = {"model.layers.1.mlp.down_proj.weight": d["model.layers.1.mlp.down_proj.weight"]}
    alone = displacement(model, tokenizer, probes, only)
    assert result.per_module["model.layers.1.mlp.down_proj"]["mean"] == pytest.approx(
        alone.mean, rel=1e-12)
    assert result.to_dict()["per_probe"]["p0"] == pytest.approx(result.per_probe[0])


def test_bad_input_is_named():
    model, data = tiny_model("llama", seed=11), tiny_data(3, seed=11)
    with pytest.raises(fisher.FisherError, match=r"shares no parameter.*transformer\.h\.0"):
        displacement(model, None, data, {"transformer.h.0.attn.c_attn.weight": torch.zeros(2)})
    named = dict(model.named_parameters())
    with pytest.raises(fisher.FisherError, match=r"model\.norm\.weight.*shape"):
        displacement(model, None, data, {"model.norm.weight": torch.zeros(3)})
    good = {"model.norm.weight": torch.ones_like(named["model.norm.weight"])}
    silent = Encoding([1, 2, 3], [-100, -100, -100], 3)
    with pytest.raises(fisher.FisherError, match=r"data\[1\].*masked"):
        displacement(model, None, [data[0], silent], good)
    broken = tiny_model("llama", seed=11)
    with torch.no_grad():
        dict(broken.named_parameters())["model.norm.weight"][0] = float("nan")
    with pytest.raises(fisher.FisherError, match="non-finite logits on probe '0'"):
        displacement(broken, None, data, good)
