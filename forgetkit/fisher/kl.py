"""Measured damage: the KL between the base and fine-tuned next-token distributions on probes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from forgetkit.models import collate, encode

__all__ = ["MeasuredKL", "measured_kl"]


@dataclass(frozen=True)
class MeasuredKL:
    """``KL(p_base || p_finetuned)`` at each completion position (teacher-forced on the data).

    Attributes:
        per_token: mean over all completion tokens.
        per_sequence: mean over examples of the sum over the example's completion tokens; this
            is the quantity that ``1/2 d' F d`` predicts for the sequence-level Fisher.
        n_examples: examples scored.
        n_tokens: completion tokens scored.
    """

    per_token: float
    per_sequence: float
    n_examples: int
    n_tokens: int


def _pairs(data) -> list[tuple[str, str]]:
    pairs = []
    for item in data:
        if hasattr(item, "target"):
            pairs.append((item.prompt, item.target))
        elif hasattr(item, "answer"):
            pairs.append((item.prompt, item.answer))
        else:
            pairs.append(tuple(item))
    return pairs


@torch.no_grad()
def measured_kl(base, finetuned, tokenizer, data: Sequence, batch_size: int = 16) -> MeasuredKL:
    """Mean ``KL(p_base || p_ft)`` over the completion positions of ``data``.

    Args:
        base: the base model.
        finetuned: the fine-tuned model (same tokenizer and vocabulary).
        tokenizer: shared tokenizer.
        data: Records (prompt + target), Probes (prompt + answer) or (prompt, completion) pairs.
        batch_size: examples per forward.

    Raises:
        ValueError: empty data.
    """
    pairs = _pairs(data)
    if not pairs:
        raise ValueError("measured_kl: empty probe set")
    device = next(base.parameters()).device
    total, tokens, per_example = 0.0, 0, []
    for start in range(0, len(pairs), batch_size):
        encs = [encode(tokenizer, p, c) for p, c in pairs[start : start + batch_size]]
        batch = collate(encs, tokenizer.pad_token_id, device=device)
        kwargs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
        logp = F.log_softmax(base(**kwargs).logits[:, :-1].double(), -1)  # (B, T-1, V)
        logq = F.log_softmax(finetuned(**kwargs).logits[:, :-1].double(), -1)
        kl = (logp.exp() * (logp - logq)).sum(-1)  # (B, T-1)
        mask = batch["labels"][:, 1:] != -100
        kl = kl.masked_fill(~mask, 0.0)
        per_example += kl.sum(-1).tolist()
        total += float(kl.sum())
        tokens += int(mask.sum())
    return MeasuredKL(total / tokens, sum(per_example) / len(per_example), len(pairs), tokens)
