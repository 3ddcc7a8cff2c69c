"""Per-token and per-sequence log-likelihood of completion tokens: the one implementation
shared by target NLL, Fisher information and the trainer's loss.

Shift convention: logits at position ``t`` predict token ``t + 1``; a position counts iff its
label (from :func:`forgetkit.models.collate`) is not ``-100``, i.e. completion tokens only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from forgetkit.models.encoding import model_inputs

__all__ = ["completion_logprobs", "forward_logits", "model_logprobs", "sequence_loglik"]


def completion_logprobs(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Log-probability of each label under ``logits``, shifted by one.

    Args:
        logits: (B, T, V) model outputs.
        labels: (B, T) token ids, ``-100`` where not scored.

    Returns:
        ``(logp, mask)``, both (B, T-1): ``logp[b, t] = log p(labels[b, t+1] | prefix)``
        (0 where masked, computed in at least float32) and the boolean mask of scored positions.
    """
    shift_logits = logits[:, :-1, :]
    shift_labels = labels[:, 1:]
    mask = shift_labels != -100
    dtype = torch.promote_types(shift_logits.dtype, torch.float32)
    nll = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]).to(dtype),
        shift_labels.reshape(-1), ignore_index=-100, reduction="none",
    ).view(shift_labels.shape)
    return (-nll).masked_fill(~mask, 0.0), mask


def forward_logits(model, batch: dict[str, Tensor]) -> Tensor:
    """(B, T, V) logits of ``model`` on a collated batch (:func:`forgetkit.models.model_inputs`:
    its position ids included), without a KV cache."""
    return model(**model_inputs(batch), use_cache=False).logits


def model_logprobs(model, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Run ``model`` on a collated batch and return :func:`completion_logprobs` of its labels.

    ``position_ids`` from the batch are passed, so left- and right-padded batches agree.
    """
    return completion_logprobs(forward_logits(model, batch), batch["labels"])


def sequence_loglik(model, batch: dict[str, Tensor]) -> Tensor:
    """(B,) sum over completion tokens of ``log p(y_t | prompt, y_<t)``."""
    logp, _ = model_logprobs(model, batch)
    return logp.sum(-1)
