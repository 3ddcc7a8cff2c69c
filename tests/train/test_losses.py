"""The training losses: completion-only NLL and top-k distillation KL, against brute force."""

from __future__ import annotations

import pytest
import torch

from forgetkit.data.records import load_records
from forgetkit.models import collate, encode, load_model
from forgetkit.train.losses import completion_nll, topk_kl
from forgetkit.train.methods import sft_examples

pytestmark = pytest.mark.usefixtures("one_thread")


def test_completion_only_loss_and_gradient(tiny):
    model, tokenizer = load_model(tiny[0], dtype="float64", device="cpu")
    records = load_records(tiny[1])[:3]
    examples = sft_examples(tokenizer, records)
    for example, record in zip(examples, records, strict=True):
        prompt_length = len(encode(tokenizer, record.prompt).input_ids)
        assert example.encoding.labels[:prompt_length] == [-100] * prompt_length
        assert example.encoding.labels[prompt_length:] == example.encoding.input_ids[prompt_length:]
    batch = collate([e.encoding for e in examples], tokenizer.pad_token_id)
    captured = {}
    model.lm_head.register_forward_hook(lambda m, i, out: captured.update(logits=out) or
                                        out.retain_grad())
    nll, n_tokens = completion_nll(model, batch)
    nll.backward()
    logits, grad = captured["logits"], captured["logits"].grad  # (B, T, V)
    scored = batch["labels"][:, 1:] != -100  # position t predicts token t + 1
    logp = torch.log_softmax(logits[:, :-1].detach(), -1)
    brute = -logp.gather(-1, batch["input_ids"][:, 1:, None])[..., 0][scored].sum()
    assert n_tokens == int(scored.sum()) and torch.allclose(nll.detach(), brute)
    row_norm = grad[:, :-1].abs().sum(-1)  # (B, T-1)
    assert row_norm[~scored].max() == 0 and row_norm[scored].min() > 0
    assert grad[:, -1].abs().max() == 0


def test_topk_kl_matches_dense_reference():
    torch.manual_seed(1)
    student, teacher = torch.randn(5, 11, dtype=torch.float64), torch.randn(5, 11, dtype=torch.float64)
    top = teacher.topk(4, -1).indices
    p_t = torch.softmax(teacher.gather(-1, top), -1)
    p_s = torch.softmax(student.gather(-1, top), -1)
    forward = (p_t * (p_t / p_s).log()).sum(-1)
    reverse = (p_s * (p_s / p_t).log()).sum(-1)
    assert torch.allclose(topk_kl(student, teacher, 4, "forward"), forward)
    assert torch.allclose(topk_kl(student, teacher, 4, "reverse"), reverse)
    assert topk_kl(teacher, teacher, 4).abs().max() < 1e-12
    assert not torch.allclose(forward, reverse)
