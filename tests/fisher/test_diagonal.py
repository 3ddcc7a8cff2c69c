"""Diagonal Fisher and per-example gradients, against dense references on tiny float64 models."""

from __future__ import annotations

import copy
import importlib
import itertools
import logging
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from forgetkit import fisher
from forgetkit.data.records import Probe, load_records
from forgetkit.diagnostics.loglik import sequence_loglik
from forgetkit.fisher import pergrad
from forgetkit.fisher.diagonal import RunningMoments
from forgetkit.fisher.hookgrad import hook_gradients
from forgetkit.fisher.pergrad import GradientStream, loop_gradients, vmap_gradients
from forgetkit.models import Encoding, collate

VOCAB = 30


def tiny_model(arch: str, seed: int = 0, vocab: int = VOCAB, std: float = 0.3):
    """A 2-layer float64 Llama or GPT-2 (hidden 8), weights ~ N(0, std^2) so every gradient
    is well away from zero."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if arch == "llama":
            model = LlamaForCausalLM(LlamaConfig(
                vocab_size=vocab, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32))
        else:
            model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=8, n_layer=2, n_head=2,
                                               n_positions=16, bos_token_id=0, eos_token_id=0))
        model = model.double().eval()
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * std)
    return model


def tiny_data(n: int, seed: int = 0, vocab: int = VOCAB) -> list[Encoding]:
    """``n`` encodings with prompts of 1-4 tokens and completions of 1-4 tokens."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        prompt, completion = (int(x) for x in torch.randint(1, 5, (2,), generator=generator))
        ids = torch.randint(1, vocab, (prompt + completion,), generator=generator).tolist()
        out.append(Encoding(ids, [-100] * prompt + ids[prompt:], prompt))
    return out


def reference_gradients(model, encodings, names) -> dict[str, torch.Tensor]:
    """name -> (N, *shape): one plain ``.backward()`` per unpadded example."""
    params = dict(model.named_parameters())
    rows = {name: [] for name in names}
    for enc in encodings:
        model.zero_grad()
        sequence_loglik(model, collate([enc], pad_token_id=0))[0].backward()
        for name in names:
            rows[name].append(params[name].grad.clone())
    model.zero_grad()
    return {name: torch.stack(r) for name, r in rows.items()}


def assert_close(actual, expected, rtol):
    scale = max(float(v.abs().max()) for v in expected.values())
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=rtol, atol=rtol * scale,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_empirical_diagonal_equals_per_example_backward_loop(arch):
    model, data = tiny_model(arch), tiny_data(7)
    names = [n for n, _ in model.named_parameters()]
    reference = {n: g.square().mean(0) for n, g in reference_gradients(model, data, names).items()}
    for per_example in ("auto", "hooks", "vmap", "loop"):
        result = fisher.diagonal(model, None, data, estimator="empirical", batch_size=3,
                                 dtype=torch.float64, per_example=per_example)
        assert list(result.values) == names
        assert_close(result.values, reference, rtol=1e-10)
    # never the square of a batch mean: that would be a different (much smaller) number
    batch_mean = {n: g.mean(0).square() for n, g in reference_gradients(model, data, names).items()}
    assert sum(float(v.sum()) for v in batch_mean.values()) < 0.9 * result.trace()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_vmap_rows_with_padding_equal_unpadded_backward(arch):
    model, data = tiny_model(arch, seed=1), tiny_data(5, seed=1)
    params = {n: p.detach() for n, p in model.named_parameters()}
    batch = collate(data, pad_token_id=0)
    got = vmap_gradients(model, params, batch["input_ids"], batch["labels"])
    assert_close(got, reference_gradients(model, data, list(params)), rtol=1e-10)


def exact_true_fisher(model, enc: Encoding) -> dict[str, torch.Tensor]:
    """E_{y ~ p}[g g] by enumerating every label sequence of the completion (teacher forced)."""
    batch = collate([enc], pad_token_id=0)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"]).logits[0]
    scored = [t for t, label in enumerate(enc.labels) if label != -100 and t > 0]
    probs = [torch.softmax(logits[t - 1], -1) for t in scored]
    params = dict(model.named_parameters())
    exact = {n: torch.zeros_like(p) for n, p in params.items()}
    for labels in itertools.product(range(logits.shape[-1]), repeat=len(scored)):
        weight = float(torch.prod(torch.stack([p[y] for p, y in zip(probs, labels, strict=True)])))
        batch["labels"][0, scored] = torch.tensor(labels)
        model.zero_grad()
        sequence_loglik(model, batch)[0].backward()
        for n, p in params.items():
            exact[n] += weight * p.grad.square()
    model.zero_grad()
    return exact


def test_true_fisher_converges_to_exact_expectation_within_its_stderr():
    vocab = 16
    model = tiny_model("llama", seed=2, vocab=vocab, std=0.2)
    enc = Encoding([1, 5, 7, 3], [-100, -100, 7, 3], 2)  # two scored completion tokens
    exact = exact_true_fisher(model, enc)
    flat_exact = torch.cat([v.flatten() for v in exact.values()])
    errors = {}
    for mc_samples in (1, 16):
        # identical copies: the spread between examples is pure label-draw noise, so the
        # reported stderr is exactly the Monte-Carlo error
        est = fisher.diagonal(model, None, [enc] * 40, estimator="true", mc_samples=mc_samples,
                              dtype=torch.float64, seed=3, batch_size=40)
        value = torch.cat([v.flatten() for v in est.values.values()])
        stderr = torch.cat([v.flatten() for v in est.stderr.values()])
        live = flat_exact > 1e-12 * flat_exact.max()
        z = (value - flat_exact)[live].abs() / stderr[live]
        # z ~ |N(0, 1)| entry by entry (entries share draws, so the fractions fluctuate
        # together); rare labels make the sample stderr of a few entries too small
        assert float((z < 4).double().mean()) > 0.95, f"mc_samples={mc_samples}"
        assert 0.25 < float(z.median()) < 2.0, f"stderr off scale: median z {z.median()}"
        errors[mc_samples] = float((value - flat_exact).norm() / flat_exact.norm())
    assert errors[16] < errors[1] / 2, errors  # ~1/sqrt(16) in expectation
    # the check has power: the empirical Fisher (data labels) is far outside those error bars
    empirical = fisher.diagonal(model, None, [enc] * 2, estimator="empirical",
                                dtype=torch.float64)
    flat_emp = torch.cat([v.flatten() for v in empirical.values.values()])
    assert float((flat_emp - flat_exact).norm() / flat_exact.norm()) > 5 * errors[16]


def test_true_fisher_draws_are_seeded_per_example_and_leave_global_rng_alone():
    model, data = tiny_model("gpt2", seed=4), tiny_data(6, seed=4)
    state = torch.get_rng_state()
    a = fisher.diagonal(model, None, data, mc_samples=2, batch_size=2, dtype=torch.float64)
    assert torch.equal(torch.get_rng_state(), state)
    b = fisher.diagonal(model, None, data, mc_samples=2, batch_size=5, dtype=torch.float64)
    c = fisher.diagonal(model, None, data, mc_samples=2, batch_size=5, dtype=torch.float64,
                        seed=1)
    assert_close(b.values, a.values, rtol=1e-12)  # batching does not change the draws
    assert not torch.allclose(c.values["transformer.wte.weight"],  # another seed, other draws
                              a.values["transformer.wte.weight"])


def test_parameter_subset_and_float32_accumulation():
    model, data = tiny_model("llama", seed=5), tiny_data(5, seed=5)
    full = fisher.diagonal(model, None, data, estimator="empirical", dtype=torch.float64)
    mlp = fisher.diagonal(model, None, data, estimator="empirical", params="mlp")
    assert sorted(mlp.values) == sorted(n for n in full.values if ".mlp." in n)
    for name, value in mlp.values.items():
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, full.values[name].float(), rtol=1e-5, atol=1e-7)
    glob = fisher.diagonal(model, None, data, estimator="empirical", params="*.up_proj.weight")
    assert sorted(glob.values) == [f"model.layers.{i}.mlp.up_proj.weight" for i in (0, 1)]


def test_bf16_model_accumulates_in_float32():
    model, data = tiny_model("llama", seed=6, std=0.2), tiny_data(4, seed=6)
    reference = fisher.diagonal(model.float(), None, data, estimator="empirical")
    result = fisher.diagonal(model.to(torch.bfloat16), None, data, estimator="empirical")
    for value in result.values.values():
        assert value.dtype == torch.float32 and bool(torch.isfinite(value).all())
    ratio = result.trace() / reference.trace()
    assert 0.9 < ratio < 1.1


@given(st.lists(st.integers(1, 6), min_size=1, max_size=6), st.integers(0, 10**6),
       st.booleans())
@settings(max_examples=30, deadline=None)
def test_running_moments_match_two_pass_mean_and_variance(sizes, seed, buffered):
    """Buffered (all tensors merged at once) or folded tensor by tensor: the same moments."""
    samples = torch.randn(sum(sizes), 3, generator=torch.Generator().manual_seed(seed),
                          dtype=torch.float64) * 5 + 2
    moments = RunningMoments({"a": torch.Size([3]), "b": torch.Size([2, 1])}, torch.float64,
                             torch.device("cpu"), buffered=buffered)
    for chunk in samples.split(sizes):
        moments.add("a", chunk.clone())  # add() overwrites its argument
        moments.add("b", -chunk[:, :2, None].clone())
        moments.merge()
    torch.testing.assert_close(moments.mean["a"], samples.mean(0))
    torch.testing.assert_close(moments.mean["b"], -samples[:, :2, None].mean(0))
    if len(samples) > 1:
        expected = samples.std(0) / len(samples) ** 0.5
        torch.testing.assert_close(moments.stderr()["a"], expected)
        torch.testing.assert_close(moments.stderr()["b"], expected[:2, None])
    else:
        assert all(torch.isinf(s).all() for s in moments.stderr().values())


@pytest.mark.parametrize("buffered", [True, False])
def test_running_moments_merge_needs_every_tensor(buffered):
    moments = RunningMoments({"a": torch.Size([3]), "b": torch.Size([2])}, torch.float64,
                             torch.device("cpu"), buffered=buffered)
    moments.add("a", torch.ones(4, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="missing"):
        moments.merge()


def test_running_moments_buffer_only_small_models(toyworld, monkeypatch):
    """No second copy of the moments for a model above the limit (SmolLM2's 134.5M entries
    would need 1 GiB more); the same numbers either way."""
    module = importlib.import_module("forgetkit.fisher.diagonal")  # not the function

    shapes = {"a": torch.Size([3])}
    assert RunningMoments(shapes, torch.float32, torch.device("cpu"))._block_mean is not None
    big = {"w": torch.Size([module.BUFFERED_MAX_ELEMENTS + 1])}
    assert RunningMoments(big, torch.float32, torch.device("meta"))._block_mean is None
    model, tokenizer = toyworld
    records = load_records("kgfact")[:6]
    both = []
    for limit in (10**9, 0):
        monkeypatch.setattr(module, "BUFFERED_MAX_ELEMENTS", limit)
        both.append(fisher.diagonal(model, tokenizer, records, batch_size=4))
    for name, value in both[0].values.items():
        torch.testing.assert_close(both[1].values[name], value, rtol=0, atol=0)


class _NoVmap(torch.nn.Module):
    """Calls ``.item()`` in forward, which vmap cannot trace; with ``own_parameter``, also
    scales the logits by a parameter of its own, used in a forward the layer hooks cannot
    take apart (it takes keyword tensors)."""

    def __init__(self, inner, own_parameter: bool = False):
        super().__init__()
        self.inner, self.config = inner, inner.config
        if own_parameter:
            self.scale = torch.nn.Parameter(torch.tensor([1.3], dtype=torch.float64))

    def forward(self, input_ids, **kwargs):
        assert input_ids.max().item() < self.config.vocab_size
        out = self.inner(input_ids=input_ids, **kwargs)
        if hasattr(self, "scale"):
            out.logits = out.logits * self.scale
        return out


class _SeesPadding(torch.nn.Module):
    """Logits scaled by the attention mask's length: right padding is no longer harmless."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config = inner, inner.config

    def forward(self, input_ids, attention_mask=None, **kwargs):
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        out = self.inner(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        out.logits = out.logits * (1 + 0.1 * mask.sum(-1, keepdim=True)[..., None])
        return out


class _MixesRows(_SeesPadding):
    """Also adds the batch mean of the logits to each row: rows of a batch interact."""

    def forward(self, input_ids, attention_mask=None, **kwargs):
        out = super().forward(input_ids, attention_mask=attention_mask, **kwargs)
        out.logits = out.logits + 0.1 * out.logits.mean(0, keepdim=True)
        return out


@pytest.mark.parametrize(("wrapper", "messages"), [
    (_NoVmap, []),  # the hooks take it: vmap is never tried
    (_SeesPadding, []),  # the hooks pass the real attention mask
    (lambda m: _NoVmap(m, own_parameter=True), ["layer hooks cannot handle _NoVmap",
                                                "vmap cannot trace", "loop"]),
    (_MixesRows, ["layer hooks and the backward loop disagree",
                  "vmap and the backward loop disagree", "loop"])])
def test_models_the_hooks_or_vmap_cannot_handle_fall_back(wrapper, messages, caplog):
    model, data = wrapper(tiny_model("llama", seed=7)), tiny_data(6, seed=7)
    names = [n for n, _ in model.named_parameters()]
    with caplog.at_level(logging.INFO, logger="forgetkit.fisher.pergrad"):
        result = fisher.diagonal(model, None, data, estimator="empirical", batch_size=6,
                                 dtype=torch.float64)
    for message in messages:
        assert message in caplog.text
    if not messages:
        assert "layer hooks (match the loop" in caplog.text
    reference = {n: g.square().mean(0) for n, g in reference_gradients(model, data, names).items()}
    assert_close(result.values, reference, rtol=1e-10)


def test_auto_check_runs_once_per_unchanged_model(caplog):
    """A passed check is remembered for the model; a weight written in place, another
    parameter selection or a swapped module brings it back, and the numbers never change.
    The model is wrapped, so it is not a verified architecture and the check runs."""
    model, data = _SeesPadding(tiny_model("llama", seed=5)), tiny_data(6, seed=5)

    def run(**kwargs) -> tuple[bool, fisher.DiagonalFisher]:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="forgetkit.fisher.pergrad"):
            result = fisher.diagonal(model, None, data, estimator="empirical", batch_size=4,
                                     dtype=torch.float64, **kwargs)
        return "layer hooks (match the loop" in caplog.text, result

    checked, first = run()
    assert checked
    checked, again = run()
    assert not checked
    assert_close(again.values, first.values, rtol=0)
    assert run(params="mlp")[0]  # another selection: checked, then remembered instead
    assert not run(params="mlp")[0]
    assert run()[0]
    with torch.no_grad():
        model.inner.model.layers[0].mlp.up_proj.weight.mul_(1.5)  # bumps the version counter
    checked, changed = run()
    assert checked
    reference = {n: g.square().mean(0) for n, g in reference_gradients(
        model, data, list(first.values)).items()}
    assert_close(changed.values, reference, rtol=1e-10)
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()})
    assert run()[0]
    model.inner.model.layers[1].mlp = copy.deepcopy(model.inner.model.layers[1].mlp)
    assert run()[0]
    assert not run(per_example="hooks")[0]  # an explicit method is never checked


def test_auto_check_is_not_remembered_for_another_model():
    model, data = _SeesPadding(tiny_model("gpt2", seed=6)), tiny_data(4, seed=6)
    params = dict(model.named_parameters())
    first = GradientStream(model, data, params, estimator="empirical", mc_samples=1,
                           batch_size=4, seed=0, pad_token_id=0, per_example="auto")
    list(first)
    assert first.mode == "hooks"
    again = GradientStream(model, data, params, estimator="empirical", mc_samples=1,
                           batch_size=4, seed=0, pad_token_id=0, per_example="auto")
    assert again.mode == "hooks"  # remembered before the first block
    other = _SeesPadding(tiny_model("gpt2", seed=6))
    fresh = GradientStream(other, data, dict(other.named_parameters()), estimator="empirical",
                           mc_samples=1, batch_size=4, seed=0, pad_token_id=0,
                           per_example="auto")
    assert fresh.mode is None  # checked on its first block


class _OwnLinear(torch.nn.Linear):
    """An nn.Linear subclass from outside torch and transformers (as an adapter would be)."""


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_verified_architecture_takes_the_hooks_unchecked(arch, monkeypatch, caplog):
    """A verified class runs no backward loop and still equals it; a module swapped in from
    elsewhere, or a wrapper, brings the check back."""
    model, data = tiny_model(arch, seed=8), tiny_data(6, seed=8)
    assert pergrad.verified_architecture(model)
    assert not pergrad.verified_architecture(_SeesPadding(model))
    names = [n for n, _ in model.named_parameters()]
    reference = {n: g.square().mean(0) for n, g in reference_gradients(model, data, names).items()}
    loops = []
    real_loop = pergrad.loop_gradients
    monkeypatch.setattr(pergrad, "loop_gradients",
                        lambda *args, **kwargs: loops.append(1) or real_loop(*args, **kwargs))
    with caplog.at_level(logging.INFO, logger="forgetkit.fisher.pergrad"):
        result = fisher.diagonal(model, None, data, estimator="empirical", batch_size=4,
                                 dtype=torch.float64)
    assert "layer hooks (verified architecture" in caplog.text and not loops
    assert_close(result.values, reference, rtol=1e-10)
    if arch == "llama":
        old = model.model.layers[0].mlp.up_proj
        swapped = _OwnLinear(old.in_features, old.out_features, bias=False, dtype=torch.float64)
        swapped.load_state_dict(old.state_dict())
        model.model.layers[0].mlp.up_proj = swapped
    else:
        old = model.transformer.ln_f
        own = type("OwnLayerNorm", (torch.nn.LayerNorm,), {"__module__": __name__})
        swapped = own(old.normalized_shape, dtype=torch.float64)
        swapped.load_state_dict(old.state_dict())
        model.transformer.ln_f = swapped
    assert not pergrad.verified_architecture(model)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="forgetkit.fisher.pergrad"):
        again = fisher.diagonal(model, None, data, estimator="empirical", batch_size=4,
                                dtype=torch.float64)
    assert "layer hooks (match the loop" in caplog.text and loops
    assert_close(again.values, reference, rtol=1e-10)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_hooks_equal_loop_for_true_fisher_draws(arch):
    """Repeated label draws per example: the hooks' rows (example-major) match the loop's."""
    model, data = tiny_model(arch, seed=12), tiny_data(5, seed=12)
    hooks, loop = (fisher.diagonal(model, None, data, mc_samples=3, batch_size=2, seed=4,
                                   dtype=torch.float64, per_example=mode)
                   for mode in ("hooks", "loop"))
    assert_close(hooks.values, loop.values, rtol=1e-10)
    assert_close(hooks.stderr, loop.stderr, rtol=1e-9)


def test_hooks_take_a_norm_that_needs_its_own_parameter_shape():
    """torch's nn.RMSNorm rejects a per-row copy of its weight: the module's vjp per row."""
    model, data = tiny_model("llama", seed=14), tiny_data(5, seed=14)
    norm = torch.nn.RMSNorm(8, eps=1e-6, dtype=torch.float64)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(8, generator=torch.Generator().manual_seed(0),
                                      dtype=torch.float64))
    model.model.norm = norm
    params = {n: p.detach() for n, p in model.named_parameters()}
    batch = collate(data, pad_token_id=0)
    got = hook_gradients(model, params, batch, batch["labels"])
    assert_close({n: got[n] for n in params}, reference_gradients(model, data, list(params)),
                 rtol=1e-10)


def test_hooks_skip_the_embedding_padding_index_as_autograd_does():
    model, data = tiny_model("llama", seed=13), tiny_data(6, seed=13)
    model.model.embed_tokens.padding_idx = data[0].input_ids[1]  # a real token of the data
    params = {n: p.detach() for n, p in model.named_parameters()}
    batch = collate(data, pad_token_id=0)
    got = hook_gradients(model, params, batch, batch["labels"])
    reference = reference_gradients(model, data, list(params))
    assert_close({n: got[n] for n in params}, reference, rtol=1e-10)
    assert not got["model.embed_tokens.weight"][:, model.model.embed_tokens.padding_idx].any()


def test_loop_gradients_respects_subsets_and_leaves_requires_grad():
    model, data = tiny_model("gpt2", seed=8), tiny_data(3, seed=8)
    for p in model.parameters():
        p.requires_grad_(False)
    params = {n: p.detach() for n, p in model.named_parameters() if ".mlp." in n}
    batch = collate(data, pad_token_id=0)
    got = loop_gradients(model, params, batch["input_ids"], batch["labels"],
                         batch["attention_mask"].sum(-1).tolist())
    assert not any(p.requires_grad for p in model.parameters())
    for p in model.parameters():
        p.requires_grad_(True)
    assert_close(got, reference_gradients(model, data, list(params)), rtol=1e-10)


def test_training_mode_is_restored():
    model = tiny_model("gpt2", seed=9).train()
    fisher.diagonal(model, None, tiny_data(3), estimator="empirical")
    assert model.training


def test_bad_input_raises_clear_errors():
    model, data = tiny_model("llama", seed=10), tiny_data(4, seed=10)
    with pytest.raises(fisher.FisherError, match="no data"):
        fisher.diagonal(model, None, [])
    masked = [*data[:2], Encoding([1, 2, 3], [-100, -100, -100], 3)]
    with pytest.raises(fisher.FisherError, match=r"data\[2\]: every token is masked"):
        fisher.diagonal(model, None, masked)
    with pytest.raises(fisher.FisherError, match="a tokenizer is needed"):
        fisher.diagonal(model, None, [Probe("p", "question", "answer", "known_fact")])
    with pytest.raises(fisher.FisherError, match="estimator"):
        fisher.diagonal(model, None, data, estimator="fisher")
    with pytest.raises(fisher.FisherError, match="mc_samples"):
        fisher.diagonal(model, None, data, estimator="empirical", mc_samples=2)
    with pytest.raises(fisher.FisherError, match="dtype"):
        fisher.diagonal(model, None, data, dtype=torch.float16)
    with pytest.raises(fisher.FisherError, match="matches no parameter"):
        fisher.diagonal(model, None, data, params="attention_is_all_you_need")


def test_non_finite_gradient_names_parameter_and_example():
    model = tiny_model("llama", seed=11)  # untied: row 9 reaches example 2 alone
    data = [Encoding([1, 2, 3, 4], [-100, -100, 3, 4], 2) for _ in range(4)]
    data[2] = Encoding([1, 9, 3, 4], [-100, -100, 3, 4], 2)  # token 9 only in example 2
    with torch.no_grad():
        model.model.embed_tokens.weight[9] = float("nan")
    with pytest.raises(fisher.FisherError, match=r"'model.embed_tokens.weight' for example 2"):
        fisher.diagonal(model, None, data, estimator="empirical", batch_size=4)


def test_finite_gradients_whose_squares_overflow_float32_name_the_parameter():
    """Gradients near 1e25 are finite in float32 but their squares are not: an error, not an
    infinite Fisher; float64 accumulation holds them."""
    model, data = tiny_model("llama", seed=12).float(), tiny_data(4, seed=12)
    with torch.no_grad():
        model.model.norm.weight.fill_(1e25)  # hidden states, so the head's gradients, ~1e25
    with pytest.raises(fisher.FisherError, match=r"the Fisher entry of lm_head.weight overflows "
                                                 r"float32: .* dtype=torch.float64"):
        fisher.diagonal(model, None, data, estimator="empirical", batch_size=4,
                        params="lm_head")
    wide = fisher.diagonal(model, None, data, estimator="empirical", batch_size=4,
                           params="lm_head", dtype=torch.float64)
    assert 1e40 < float(wide.values["lm_head.weight"].max()) < math.inf


def test_stream_shards_nothing_in_one_process():
    model, data = tiny_model("gpt2"), tiny_data(5)
    params = {n: p for n, p in model.named_parameters()}
    stream = GradientStream(model, data, params, estimator="empirical", mc_samples=1,
                            batch_size=2, seed=0, pad_token_id=0, per_example="vmap")
    assert sorted(i for block in stream for i in block.examples) == list(range(5))


@pytest.mark.parametrize(("arch", "per_example"), itertools.product(["llama", "gpt2"],
                                                                    ["auto", "vmap"]))
def test_vmap_traces_a_model_whose_config_sets_pad_token_id(arch, per_example, caplog):
    """pad = eos is common; transformers' padding check must not push the run onto the loop."""
    model, data = tiny_model(arch, seed=3), tiny_data(5, seed=3)
    model.config.pad_token_id = 0
    params = {n: p.detach() for n, p in model.named_parameters()}
    stream = GradientStream(model, data, params, estimator="empirical", mc_samples=1,
                            batch_size=4, seed=0, pad_token_id=0, per_example=per_example)
    with caplog.at_level(logging.WARNING, logger="forgetkit.fisher.pergrad"):
        blocks = [{n: b.grads[n] for n in params} for b in stream]
    assert stream.mode == {"auto": "hooks", "vmap": "vmap"}[per_example]
    assert not caplog.records
    grads = {n: torch.cat([b[n] for b in blocks]) for n in params}
    order = list(stream.indices)
    reference = reference_gradients(model, [data[i] for i in order], list(params))
    assert_close(grads, reference, rtol=1e-10)


def test_scalar_parameters_used_or_not():
    """A 0-dim parameter (a learned scale on the final norm's output) gets its Fisher entry like
    any other, and an unused one gets zero, whichever method forms the per-example gradients."""
    model, data = tiny_model("llama", seed=3), tiny_data(5, seed=3)
    model.scale = torch.nn.Parameter(torch.tensor(1.3, dtype=torch.float64))
    model.unused = torch.nn.Parameter(torch.tensor(0.5, dtype=torch.float64))
    model.model.norm.register_forward_hook(lambda module, args, out: out * model.scale)
    names = [n for n, _ in model.named_parameters()]
    reference = {n: g.square().mean(0) for n, g in reference_gradients(
        model, data, [n for n in names if n != "unused"]).items()}
    reference["unused"] = torch.zeros((), dtype=torch.float64)
    assert float(reference["scale"]) > 0
    for per_example in ("auto", "vmap", "loop"):
        result = fisher.diagonal(model, None, data, estimator="empirical", batch_size=3,
                                 dtype=torch.float64, per_example=per_example)
        assert_close(result.values, reference, rtol=1e-10)
    low = fisher.low_rank(model, None, data, estimator="empirical", rank=2, batch_size=3,
                          dtype=torch.float64)
    assert low.directions["scale"].shape == (2,)
