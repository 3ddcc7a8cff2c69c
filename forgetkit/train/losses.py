"""Training losses as functions of (model, batch): completion NLL and top-k distillation KL;
and the EWC penalty, a function of (parameters, anchor, Fisher).

Both return a *sum over completion tokens* and the token count, so the trainer can divide by
the number of completion tokens of the whole optimizer step (all micro-batches, all
processes): the result is then the same whatever the micro-batch and process split.

Shift convention (as :mod:`forgetkit.diagnostics.loglik`): logits at position ``t`` predict token ``t + 1``;
a position is a completion position iff its label is not ``-100``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
from torch import Tensor

from forgetkit.diagnostics.loglik import model_logprobs

__all__ = ["completion_logits", "completion_nll", "ewc_penalty", "topk_kl"]


def completion_nll(model, batch: dict[str, Tensor]) -> tuple[Tensor, int]:
    """Summed NLL of the completion tokens, built on :func:`forgetkit.diagnostics.loglik.model_logprobs`.

    Args:
        model: a causal LM.
        batch: from :func:`forgetkit.models.collate` (labels -100 on prompt and padding).

    Returns:
        ``(nll_sum, n_tokens)``: ``-sum log p(y_t | prompt, y_<t)`` over completion tokens
        (a scalar with grad) and how many tokens it sums over.
    """
    logp, mask = model_logprobs(model, batch)  # (B, T-1) each
    return -logp.sum(), int(mask.sum())


def completion_logits(logits: Tensor, labels: Tensor) -> Tensor:
    """(N, V) logits that predict the N completion tokens, rows in batch-then-time order.

    Args:
        logits: (B, T, V).
        labels: (B, T), -100 where not a completion token.
    """
    mask = labels[:, 1:] != -100  # (B, T-1)
    return logits[:, :-1][mask]


def topk_kl(student_logits: Tensor, teacher_logits: Tensor, k: int,
            direction: Literal["forward", "reverse"] = "forward") -> Tensor:
    """Per-token KL between teacher and student on the teacher's top-k tokens.

    Both distributions are renormalized over the same set: the ``k`` tokens with the highest
    teacher logits at that position. Computed in at least float32, at temperature 1.

    Args:
        student_logits: (N, V), with grad.
        teacher_logits: (N, V), no grad needed.
        k: tokens kept (clipped to V).
        direction: ``"forward"`` = KL(teacher || student) = sum p_t (log p_t - log p_s);
            ``"reverse"`` = KL(student || teacher) = sum p_s (log p_s - log p_t).

    Returns:
        (N,) KL per token (>= 0).
    """
    if direction not in ("forward", "reverse"):
        raise ValueError(f"direction must be 'forward' or 'reverse', got {direction!r}")
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    k = min(k, teacher_logits.shape[-1])
    top = teacher_logits.topk(k, dim=-1).indices  # (N, k)
    log_t = teacher_logits.gather(-1, top).to(dtype).log_softmax(-1)  # (N, k)
    log_s = student_logits.gather(-1, top).to(dtype).log_softmax(-1)  # (N, k)
    if direction == "forward":
        return (log_t.exp() * (log_t - log_s)).sum(-1)
    return (log_s.exp() * (log_s - log_t)).sum(-1)


def ewc_penalty(params: Mapping[str, Tensor], anchor: Mapping[str, Tensor],
                fisher: Mapping[str, Tensor], strength: float
                ) -> tuple[float, dict[str, Tensor]]:
    """The EWC penalty ``(strength/2) sum_j F_jj (theta_j - theta0_j)^2`` and its gradient
    ``strength F_jj (theta_j - theta0_j)``, in closed form (no autograd).

    Args:
        params: name -> theta, the current parameters.
        anchor: name -> theta0, the same shapes (the base's values).
        fisher: name -> F_jj, the diagonal Fisher (same shapes); its keys are the penalized
            parameters, each of which ``params`` and ``anchor`` must hold.
        strength: lambda.

    Returns:
        ``(penalty, gradients)``: the penalty summed in float64, and name -> its gradient
        (the parameter's dtype and device).
    """
    penalty, gradients = 0.0, {}
    for name, f in fisher.items():
        theta = params[name].detach()
        change = theta - anchor[name].to(theta.device, theta.dtype)
        weighted = f.to(theta.device, theta.dtype) * change
        penalty += 0.5 * strength * float((weighted.double() * change.double()).sum())
        gradients[name] = strength * weighted
    return penalty, gradients
