"""The two-branch decoder: greedy at the extreme lambdas, equal to the slow specification,
independent of batch size and composition."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from forgetkit.data.prompts import expert_prompt
from forgetkit.mixsd import MixConfig, build_targets
from forgetkit.mixsd.decode import choose_tokens, reference_decode
from forgetkit.models import encode, end_token_ids, load_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=["toyworld", "llama", "gpt2"])
def model_f64(request, tiny_model):
    """(model, tokenizer) in float64, so padding cannot flip an argmax by rounding."""
    model, tokenizer = load_model("toyworld", dtype="float64", device="cpu")
    if request.param != "toyworld":
        model = tiny_model(request.param, tokenizer)
    return model, tokenizer


def _greedy(model, tokenizer, prompt: str, max_new_tokens: int) -> list[int]:
    """Reference: ``model.generate`` on one unpadded prompt, cut after the end token."""
    ids = torch.tensor([encode(tokenizer, prompt).input_ids])
    ends = end_token_ids(tokenizer, model)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=max_new_tokens, eos_token_id=ends,
                         pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
    cut = next((i + 1 for i, t in enumerate(out) if t in ends), len(out))
    return out[:cut]


@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_extreme_lambdas_are_greedy_decoding(model_f64, records, lam):
    model, tokenizer = model_f64
    chosen = records[:6]
    config = MixConfig(lam=lam, max_new_tokens=16, on_failure="keep", batch_size=4)
    targets = build_targets(model, tokenizer, chosen, config)
    assert [t.record_id for t in targets] == [r.id for r in chosen]
    for record, target in zip(chosen, targets, strict=True):
        prompt = record.prompt if lam == 1 else expert_prompt(record.prompt, record.target)
        assert target.token_ids == _greedy(model, tokenizer, prompt, 16)
        assert target.branch_mask == [lam == 0] * len(target.token_ids)
        assert target.expert_token_fraction == (1.0 if lam == 0 else 0.0)
        assert target.attempts == 1  # coins cannot change the output: no pointless retries
        assert target.text == tokenizer.decode(target.token_ids, skip_special_tokens=True)


def test_mixed_sampling_matches_reference_decoder(records, tiny_model):
    """The batched, cached, slot-refilled decoder equals the one-token-per-call re-encoding
    specification at lam=0.3 and T>0, retries included."""
    _, tokenizer = load_model("toyworld", device="cpu")
    model = tiny_model("llama", tokenizer)
    config = MixConfig(lam=0.3, temperature=0.9, top_k=8, max_new_tokens=10, max_retries=2,
                       on_failure="keep", batch_size=3)
    chosen = records[:5]
    targets = build_targets(model, tokenizer, chosen, config)
    for record, target in zip(chosen, targets, strict=True):
        assert target.attempts == 3  # a random model never answers: every retry is used
        tokens, mask = reference_decode(model, tokenizer, record, config, attempt=2)
        assert (target.token_ids, target.branch_mask) == (tokens, mask)
    assert 0 < sum(sum(t.branch_mask) for t in targets) < sum(len(t.branch_mask) for t in targets)


def test_choose_tokens_picks_from_the_chosen_branch_not_the_mixture():
    logits = torch.tensor([[[0.0, 5.0, 4.9], [0.0, 0.0, 6.0]]] * 2)  # (2 rows, 2 branches, V=3)
    uniforms = torch.tensor([[0.1, 0.5], [0.9, 0.5]])  # row 0 naive, row 1 expert at lam=0.5
    tokens, expert = choose_tokens(logits, uniforms, lam=0.5, temperature=0.0, top_k=3)
    assert tokens.tolist() == [1, 2] and expert.tolist() == [False, True]
    # sampling: the uniform indexes the CDF of the chosen branch's top-k softmax
    tokens, _ = choose_tokens(logits, torch.tensor([[0.1, 0.01], [0.1, 0.99]]), lam=0.5,
                              temperature=1.0, top_k=2)
    assert tokens.tolist() == [1, 2]  # top-2 of the naive branch are 1 (p~0.52) then 2


@pytest.mark.parametrize("lam,temperature", [(0.3, 0.0), (0.3, 0.8)])
def test_batch_size_invariance_and_seeds(toyworld, records, lam, temperature):
    model, tokenizer = toyworld
    base = dict(lam=lam, temperature=temperature, max_new_tokens=24, max_retries=2,
                on_failure="keep")
    runs = [build_targets(model, tokenizer, records, MixConfig(batch_size=b, **base))
            for b in (1, 4, 16)]
    assert runs[0] == runs[1] == runs[2]
    counts = [dataclasses.replace(r.report, seconds=0.0) for r in runs]
    assert counts[0] == counts[1] == counts[2]
    again = build_targets(model, tokenizer, records[:8], MixConfig(batch_size=3, **base))
    assert list(again) == runs[0][:8]  # another batch composition, same targets
    other = build_targets(model, tokenizer, records, MixConfig(batch_size=16, seed=1, **base))
    if temperature > 0:
        assert [t.token_ids for t in other] != [t.token_ids for t in runs[0]]
    assert [t.branch_mask for t in other] != [t.branch_mask for t in runs[0]]


def test_bf16_runs(records, tiny_model):
    _, tokenizer = load_model("toyworld", device="cpu")
    model = tiny_model("llama", tokenizer).to(torch.bfloat16)
    targets = build_targets(model, tokenizer, records[:3],
                            MixConfig(lam=0.3, temperature=0.5, max_new_tokens=6,
                                      max_retries=0, on_failure="keep"))
    assert [len(t.token_ids) for t in targets] == [6, 6, 6]


@pytest.mark.slow
def test_smollm2_extreme_lambdas_and_mixture(smollm2, records):
    model, tokenizer = smollm2
    chosen = records[:3]
    config = MixConfig(lam=0.0, max_new_tokens=12, on_failure="keep", batch_size=2)
    for record, target in zip(chosen, build_targets(model, tokenizer, chosen, config), strict=True):
        prompt = expert_prompt(record.prompt, record.target)
        assert target.token_ids == _greedy(model, tokenizer, prompt, 12)
    mixed = MixConfig(lam=0.5, temperature=0.7, max_new_tokens=8, max_retries=0,
                      on_failure="keep", batch_size=2)
    for record, target in zip(chosen, build_targets(model, tokenizer, chosen, mixed), strict=True):
        assert (target.token_ids, target.branch_mask) == reference_decode(
            model, tokenizer, record, mixed)
