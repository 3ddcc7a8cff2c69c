"""Kronecker-factored Fisher against plain loops and dense references on tiny float64 models;
the Fisher interface against the dense matrix of every representation."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from forgetkit import fisher
from forgetkit.diagnostics.loglik import completion_logprobs
from forgetkit.fisher.pergrad import GradientStream, sample_labels, true_fisher_generators
from forgetkit.models import Encoding, collate
from tests.fisher.test_diagonal import reference_gradients, tiny_data, tiny_model
from tests.fisher.test_io import assert_relative, build


def augment(rows: torch.Tensor, bias: bool) -> torch.Tensor:
    return torch.cat([rows, rows.new_ones((*rows.shape[:-1], 1))], -1) if bias else rows


def capture(modules, names):
    """Forward hooks recording each named module's input and output."""
    inputs, outputs = {}, {}

    def hook_for(name):
        def hook(module, args, output):
            inputs[name], outputs[name] = args[0], output
        return hook

    return inputs, outputs, [modules[n].register_forward_hook(hook_for(n)) for n in names]


def loop_factors(model, data, layers, tokens, draws=1, seed=0):
    """name -> (A, G) by a plain loop: one unpadded example at a time, one outer product per
    token; labels drawn per example as every estimator draws them (when ``draws`` > 1 or
    ``seed`` is given for the true Fisher)."""
    modules = dict(model.named_modules())
    sums_a = {n: 0.0 for n in layers}
    sums_g = {n: 0.0 for n in layers}
    count = 0
    for i, enc in enumerate(data):
        batch = collate([enc], pad_token_id=0)
        inputs, outputs, handles = capture(modules, layers)
        logits = model(input_ids=batch["input_ids"]).logits
        for handle in handles:
            handle.remove()
        if draws == 0:  # empirical
            label_rows = batch["labels"]
        else:
            label_rows = sample_labels(logits.detach(), batch["labels"], draws,
                                       true_fisher_generators(seed, [i], torch.device("cpu")))
        length = len(enc.input_ids)
        counted = [t for t in range(length)
                   if tokens == "all" or (t + 1 < length and enc.labels[t + 1] != -100)]
        count += len(counted)
        for n, layer in layers.items():
            for t in counted:
                a = augment(inputs[n][0, t].detach(), layer.bias is not None)
                sums_a[n] = sums_a[n] + torch.outer(a, a)
        for row in label_rows:
            loglik = completion_logprobs(logits, row[None])[0].sum()
            grads = torch.autograd.grad(loglik, [outputs[n] for n in layers], retain_graph=True)
            for n, g in zip(layers, grads, strict=True):
                for t in counted:
                    sums_g[n] = sums_g[n] + torch.outer(g[0, t], g[0, t])
    rows = len(data) * max(draws, 1)
    return {n: (sums_a[n] / count, sums_g[n] / rows) for n in layers}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("tokens", ["answer", "all"])
def test_factors_equal_a_plain_loop_over_examples_and_tokens(arch, tokens):
    model, data = tiny_model(arch, seed=1), tiny_data(7, seed=1)
    result = fisher.kfac(model, None, data, estimator="empirical", batch_size=3, tokens=tokens,
                         dtype=torch.float64)
    expected = {"llama": 15, "gpt2": 8}[arch]  # 7 per Llama layer + untied head; 4 per GPT-2
    assert len(result.layers) == expected and result.tokens == tokens
    reference = loop_factors(model, data, result.layers, tokens, draws=0)
    for name, layer in result.layers.items():
        activation, gradient = reference[name]
        assert_relative(layer.activation_covariance, activation, 1e-10)
        assert_relative(layer.gradient_covariance, gradient, 1e-10)
    if arch == "gpt2":  # Conv1D layers with their bias as the last input column
        assert all(f.transposed and f.bias is not None for f in result.layers.values())


def test_true_fisher_factors_use_the_per_example_label_draws():
    model, data = tiny_model("llama", seed=2), tiny_data(5, seed=2)
    result = fisher.kfac(model, None, data, mc_samples=3, seed=4, batch_size=2,
                         eigen_correction=False, dtype=torch.float64)
    reference = loop_factors(model, data, result.layers, "answer", draws=3, seed=4)
    for name, layer in result.layers.items():
        assert_relative(layer.gradient_covariance, reference[name][1], 1e-10)
    other_seed = fisher.kfac(model, None, data, mc_samples=3, seed=5, eigen_correction=False,
                             dtype=torch.float64)
    name = "model.layers.1.mlp.down_proj"
    assert not torch.allclose(other_seed.layers[name].gradient_covariance,
                              result.layers[name].gradient_covariance)


def layer_gradients(grads, layer) -> torch.Tensor:
    """(R, out * in') row-major vec of each row's (out, in') layer gradient ``[dW, db]``."""
    weight = grads[layer.weight]
    weight = weight.transpose(1, 2) if layer.transposed else weight
    if layer.bias is not None:
        weight = torch.cat([weight, grads[layer.bias][:, :, None]], 2)
    return weight.flatten(1)


def stream_gradients(model, data, names, **kwargs):
    """name -> (N * M, *shape): GradientStream's per-example gradients (its label draws)."""
    params = {n: p for n, p in model.named_parameters() if n in names}
    stream = GradientStream(model, data, params, batch_size=4, pad_token_id=0,
                            per_example="loop", **kwargs)
    blocks = list(stream)
    return {n: torch.cat([b.grads[n] for b in blocks]) for n in params}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("estimator", ["empirical", "true"])
def test_ekfac_eigenvalues_are_the_diagonal_of_the_dense_block_in_the_kronecker_basis(
        arch, estimator):
    model, data = tiny_model(arch, seed=3), tiny_data(6, seed=3)
    draws = 2 if estimator == "true" else 1
    result = fisher.kfac(model, None, data, estimator=estimator, mc_samples=draws, seed=7,
                         batch_size=4, dtype=torch.float64)
    names = [n for f in result.layers.values() for n in f.parameters]
    if estimator == "empirical":
        grads = reference_gradients(model, data, names)
    else:  # the labels every other estimator draws
        grads = stream_gradients(model, data, names, estimator="true", mc_samples=draws, seed=7)
    for layer in result.layers.values():
        rows = layer_gradients(grads, layer)
        block = rows.T @ rows / rows.shape[0]  # the dense Fisher block of the layer
        basis = torch.kron(layer.gradient_eigenvectors, layer.activation_eigenvectors)
        expected = torch.diagonal(basis.T @ block @ basis).reshape(layer.eigenvalues.shape)
        assert_relative(layer.eigenvalues, expected, 1e-8)
        assert_relative(basis.T @ basis, torch.eye(basis.shape[0], dtype=torch.float64), 1e-12)
        # the quadratic form of EK-FAC is exact for updates along its eigendirections
        direction = layer.direction(int(layer.eigenvalues.argmax()))
        flat = torch.outer(direction.output, direction.input).flatten()
        assert float(flat @ block @ flat) == pytest.approx(float(layer.eigenvalues.max()),
                                                           rel=1e-9)


class OneLayerLM(torch.nn.Module):
    """Logits = head(features[token]): one linear layer on one token per example."""

    def __init__(self, features: torch.Tensor, outputs: int, bias: bool):
        super().__init__()
        self.features = torch.nn.Embedding.from_pretrained(features)  # frozen
        self.head = torch.nn.Linear(features.shape[1], outputs, bias=bias, dtype=torch.float64)

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None):
        return SimpleNamespace(logits=self.head(self.features(input_ids)))


@pytest.mark.parametrize("bias", [False, True])
def test_kfac_equals_the_dense_block_when_inputs_and_gradients_are_independent(bias):
    """With zero weights every output gradient is ``e_y - 1/V`` whatever the input, and every
    (input, label) pair occurs once, so a and g are independent over the data and
    ``F = E[a a'] ⊗ E[g g']`` exactly."""
    inputs, outputs = 4, 5
    features = torch.randn(outputs + inputs, 3, generator=torch.Generator().manual_seed(0),
                           dtype=torch.float64)
    model = OneLayerLM(features, outputs, bias)
    torch.nn.init.zeros_(model.head.weight)
    data = [Encoding([x, y], [-100, y], 1) for x in range(outputs, outputs + inputs)
            for y in range(outputs)]
    names = ["head.weight", "head.bias"] if bias else ["head.weight"]
    grads = reference_gradients(model, data, names)
    layer_of = SimpleNamespace(weight="head.weight", bias="head.bias" if bias else None,
                               transposed=False)
    rows = layer_gradients(grads, layer_of)
    block = rows.T @ rows / len(data)
    for correction in (False, True):
        result = fisher.kfac(model, None, data, estimator="empirical", params="head",
                             eigen_correction=correction, dtype=torch.float64)
        assert result.fallback is None and list(result.layers) == ["head"]
        layer = result.layers["head"]
        assert layer.tokens == len(data)  # one counted token per example
        kronecker = torch.kron(layer.gradient_covariance, layer.activation_covariance)
        assert_relative(kronecker, block, 1e-10)
        basis = torch.kron(layer.gradient_eigenvectors, layer.activation_eigenvectors)
        rebuilt = basis @ torch.diag(layer.eigenvalues.flatten()) @ basis.T
        assert_relative(rebuilt, block, 1e-10)


def test_kfac_without_correction_is_the_kronecker_product():
    model, data = tiny_model("llama", seed=4), tiny_data(5, seed=4)
    result = fisher.kfac(model, None, data, estimator="empirical", eigen_correction=False,
                         params="mlp", dtype=torch.float64)
    assert not result.eigen_correction and result.fallback is None
    generator = torch.Generator().manual_seed(1)
    delta = {n: torch.randn(s, generator=generator, dtype=torch.float64)
             for n, s in result.shapes.items()}
    expected = 0.0
    for layer in result.layers.values():
        torch.testing.assert_close(layer.eigenvalues, torch.outer(
            layer.gradient_eigenvalues, layer.activation_eigenvalues).clamp(min=0))
        dw = delta[layer.weight]  # d'(G ⊗ A)d = tr(dW' G dW A)
        expected += float(torch.trace(dw.T @ layer.gradient_covariance @ dw
                                      @ layer.activation_covariance))
    assert result.quad_form(delta) == pytest.approx(expected, rel=1e-10)


def test_save_load_round_trip_and_a_file_of_another_model(tmp_path):
    model, result = build("kfac", "gpt2")
    result.save(tmp_path / "kfac")
    sidecar = json.loads((tmp_path / "kfac.json").read_text())
    assert sidecar["kind"] == "kfac" and sidecar["eigen_correction"] is True
    assert sidecar["fallback_reasons"]["transformer.wpe.weight"] == "Embedding is not a linear layer"
    loaded = fisher.load(tmp_path / "kfac", model)
    assert isinstance(loaded, fisher.KroneckerFisher) and loaded.provenance == result.provenance
    assert loaded.fallback_reasons == result.fallback_reasons
    assert loaded.summary() == result.summary()
    delta = {n: torch.ones(s, dtype=torch.float64) for n, s in result.shapes.items()}
    assert loaded.quad_form(delta) == pytest.approx(result.quad_form(delta), rel=1e-12)
    torch.testing.assert_close(loaded.top(3).eigenvalues, result.top(3).eigenvalues)
    with pytest.raises(fisher.FisherError, match="covers parameter 'transformer"):
        fisher.load(tmp_path / "kfac", tiny_model("llama"))
    with pytest.raises(fisher.FisherError, match=r"'transformer.wpe.weight' has shape"):
        fisher.load(tmp_path / "kfac", tiny_model_positions(20))
    with pytest.raises(fisher.FisherError, match="holds a kfac Fisher"):
        fisher.DiagonalFisher.load(tmp_path / "kfac", model)
    del sidecar["layers"]["transformer.h.0.mlp.c_fc"]
    (tmp_path / "kfac.json").write_text(json.dumps(sidecar))
    with pytest.raises(fisher.FisherError, match="do not match the parameters"):
        fisher.load(tmp_path / "kfac", model)
    del sidecar["layers"]
    (tmp_path / "kfac.json").write_text(json.dumps(sidecar))
    with pytest.raises(fisher.FisherError, match="not a complete Kronecker-factored Fisher"):
        fisher.load(tmp_path / "kfac", model)


def tiny_model_positions(n_positions):
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=30, n_embd=8, n_layer=2, n_head=2,
                                      n_positions=n_positions)).double()


def test_tied_heads_norms_and_wide_layers_fall_back_to_the_diagonal(toyworld, one_thread):
    model, tokenizer = toyworld
    probes = fisher_probes()
    result = fisher.kfac(model, tokenizer, probes, estimator="empirical", max_factor_dim=200)
    reasons = result.fallback_reasons
    assert "tied weights" in reasons["model.embed_tokens.weight"]  # the head is the embedding
    assert reasons["model.norm.weight"] == "LlamaRMSNorm is not a linear layer"
    assert "max_factor_dim=200" in reasons["model.layers.0.mlp.up_proj.weight"]  # 128 -> 384
    assert len(result.layers) == 4 * 4  # q, k, v, o of each layer
    forms = {row["module"]: row["form"] for row in result.summary()}
    assert forms["model.layers.3.self_attn.v_proj"] == "kfac"
    assert forms["model.layers.3.mlp.down_proj"] == forms["model.embed_tokens"] == "diagonal"
    diag = fisher.diagonal(model, tokenizer, probes, estimator="empirical",
                           params=list(map(_exact, reasons)))
    for name, values in diag.values.items():  # the fallback is forgetkit's diagonal
        torch.testing.assert_close(result.fallback.values[name], values)


def _exact(name: str) -> str:
    return "^" + name.replace(".", r"\.") + "$"


def fisher_probes():
    from forgetkit.data.records import load_probes

    return load_probes("toyworld")[:6]


def test_bad_input_raises_clear_errors():
    model, data = tiny_model("llama", seed=6), tiny_data(3, seed=6)
    with pytest.raises(fisher.FisherError, match=r"no linear layer .* params='embed_tokens'"):
        fisher.kfac(model, None, data, params="embed_tokens")
    with pytest.raises(fisher.FisherError, match="tokens must be one of"):
        fisher.kfac(model, None, data, tokens="prompt")
    with pytest.raises(fisher.FisherError, match="estimator"):
        fisher.kfac(model, None, data, estimator="fisher")
    with pytest.raises(fisher.FisherError, match="mc_samples"):
        fisher.kfac(model, None, data, estimator="empirical", mc_samples=2)
    with pytest.raises(fisher.FisherError, match="dtype"):
        fisher.kfac(model, None, data, dtype=torch.float16)
    with pytest.raises(fisher.FisherError, match="matches no parameter"):
        fisher.kfac(model, None, data, params="attention_is_all_you_need")
    with pytest.raises(fisher.FisherError, match="no data"):
        fisher.kfac(model, None, [])


def test_training_mode_is_restored_and_weights_get_no_gradient():
    model = tiny_model("gpt2", seed=7).train()
    fisher.kfac(model, None, tiny_data(3, seed=7), estimator="empirical")
    assert model.training
    assert all(p.grad is None for p in model.parameters())


def test_bf16_model_accumulates_in_float32():
    model, data = tiny_model("llama", seed=8, std=0.2), tiny_data(4, seed=8)
    reference = fisher.kfac(model.float(), None, data, estimator="empirical", params="layers")
    result = fisher.kfac(model.to(torch.bfloat16), None, data, estimator="empirical",
                         params="layers")
    for layer in result.layers.values():
        assert layer.eigenvalues.dtype == torch.float32
        assert bool(torch.isfinite(layer.eigenvalues).all())
    assert 0.9 < result.trace() / reference.trace() < 1.1
