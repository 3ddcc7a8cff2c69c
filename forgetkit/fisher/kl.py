"""Measured damage: the KL between the base and fine-tuned next-token distributions on probes,
and along the straight path from the base to the fine-tune."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from forgetkit.diagnostics.loglik import forward_logits
from forgetkit.fisher.delta import ParamDelta
from forgetkit.models import collate, encode
from forgetkit.stats import Interval, mean_ci

__all__ = ["MeasuredKL", "kl_path", "measured_kl"]


@dataclass(frozen=True)
class MeasuredKL:
    """``KL(p_base || p_finetuned)`` at each completion position (teacher-forced on the data).

    Attributes:
        per_token: mean over all completion tokens.
        per_sequence: mean over examples of the sum over the example's completion tokens; this
            is the quantity that ``1/2 d' F d`` predicts for the sequence-level Fisher.
        n_examples: examples scored.
        n_tokens: completion tokens scored.
        per_example: each example's KL summed over its completion tokens (data order).
    """

    per_token: float
    per_sequence: float
    n_examples: int
    n_tokens: int
    per_example: tuple[float, ...] = field(default=(), repr=False)

    def interval(self, seed: int = 0) -> Interval:
        """``per_sequence`` with its 95% bootstrap interval over examples."""
        return mean_ci(self.per_example, seed=seed)

    def to_dict(self, seed: int = 0) -> dict[str, Any]:
        ci = self.interval(seed)
        return {"per_token": self.per_token, "per_sequence": self.per_sequence,
                "low": ci.low, "high": ci.high, "n_examples": self.n_examples,
                "n_tokens": self.n_tokens, "per_example": list(self.per_example)}


def _pair(item) -> tuple[str, str]:
    """A Record's (prompt, target), a Probe's (prompt, answer), or the pair itself."""
    if hasattr(item, "target"):
        return item.prompt, item.target
    return (item.prompt, item.answer) if hasattr(item, "answer") else tuple(item)


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
    pairs = [_pair(item) for item in data]
    if not pairs:
        raise ValueError("measured_kl: empty probe set")
    device = next(base.parameters()).device
    total, tokens, per_example = 0.0, 0, []
    for start in range(0, len(pairs), batch_size):
        encs = [encode(tokenizer, p, c) for p, c in pairs[start : start + batch_size]]
        batch = collate(encs, tokenizer.pad_token_id, device=device)
        logp = F.log_softmax(forward_logits(base, batch)[:, :-1].double(), -1)  # (B, T-1, V)
        logq = F.log_softmax(forward_logits(finetuned, batch)[:, :-1].double(), -1)
        kl = (logp.exp() * (logp - logq)).sum(-1)  # (B, T-1)
        mask = batch["labels"][:, 1:] != -100
        kl = kl.masked_fill(~mask, 0.0)
        per_example += kl.sum(-1).tolist()
        total += float(kl.sum())
        tokens += int(mask.sum())
    return MeasuredKL(total / tokens, sum(per_example) / len(per_example), len(pairs), tokens,
                      tuple(per_example))


def kl_path(base, delta: ParamDelta, tokenizer, data: Sequence,
            steps: Sequence[float] = (0.1, 0.25, 0.5, 0.75, 1.0), batch_size: int = 16
            ) -> list[tuple[float, MeasuredKL]]:
    """Measured ``KL(base || base + t * delta)`` for each ``t`` in ``steps``.

    Beside ``(1/2) t^2 d' F d`` it shows where the second-order picture stops holding. One copy
    of the base is made; LoRA entries are expanded one parameter at a time.

    Args:
        base: the base model.
        delta: the update (:func:`forgetkit.fisher.delta`), on the base's parameter names.
        tokenizer, data, batch_size: as :func:`measured_kl`.
        steps: the values of ``t``.

    Returns:
        ``[(t, MeasuredKL), ...]`` in the order of ``steps``.
    """
    stepped = copy.deepcopy(base)
    named = dict(stepped.named_parameters())
    missing = [n for n in delta.entries if n not in named]
    if missing:
        raise ValueError(f"the update holds parameter {missing[0]!r}, which the base lacks")
    origin = {n: named[n].detach().clone() for n in delta.entries}
    out = []
    for t in steps:
        with torch.no_grad():
            for name in delta.entries:
                step = delta.dense(name).to(named[name].device, named[name].dtype)
                named[name].copy_(origin[name] + t * step)
        out.append((float(t), measured_kl(base, stepped, tokenizer, data, batch_size)))
    return out
