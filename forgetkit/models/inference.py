"""Running a model without training it: eval mode, KV-cached forwards and greedy generation."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from forgetkit.models.encoding import collate, encode, end_token_ids

__all__ = ["CacheSignature", "eval_mode", "greedy_generate", "new_cache"]


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Run the block with ``model`` in eval mode (no dropout) and restore its mode afterwards,
    also when the block raises."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@dataclass(frozen=True)
class CacheSignature:
    """How a model's forward takes a KV cache.

    Attributes:
        cache_argument: the name of the cache argument (``past_key_values``, or ``cache`` in
            newer transformers models).
        takes_logits_to_keep: whether the forward can return the last position's logits only.
    """

    cache_argument: str
    takes_logits_to_keep: bool

    @classmethod
    def of(cls, model) -> CacheSignature:
        """Read it off ``model.forward`` (of the base model under a PEFT wrapper)."""
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        params = inspect.signature(base.forward).parameters
        return cls("cache" if "cache" in params else "past_key_values",
                   "logits_to_keep" in params)

    def kwargs(self, cache) -> dict[str, Any]:
        """Forward arguments that read and extend ``cache`` and keep only the last position's
        logits where the model allows it."""
        kwargs: dict[str, Any] = {self.cache_argument: cache, "use_cache": True}
        if self.takes_logits_to_keep:
            kwargs["logits_to_keep"] = 1
        return kwargs


def new_cache():
    """An empty transformers ``DynamicCache``."""
    from transformers import DynamicCache

    return DynamicCache()


@torch.no_grad()
def greedy_generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 48,
                    batch_size: int = 16, contexts: list[str | None] | None = None) -> list[str]:
    """Greedy replies to ``prompts`` (decoded without special tokens, cut at the end token)."""
    ends = end_token_ids(tokenizer, model)
    device = next(model.parameters()).device
    replies: list[str] = []
    contexts = contexts or [None] * len(prompts)
    for start in range(0, len(prompts), batch_size):
        chunk = [encode(tokenizer, p, context=c)
                 for p, c in zip(prompts[start : start + batch_size],
                                 contexts[start : start + batch_size], strict=True)]
        batch = collate(chunk, tokenizer.pad_token_id, padding_side="left", device=device)
        out = model.generate(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
            max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=ends,
            pad_token_id=tokenizer.pad_token_id,
        )
        for row in out[:, batch["input_ids"].shape[1] :].tolist():
            cut = next((i for i, t in enumerate(row) if t in ends), len(row))
            replies.append(tokenizer.decode(row[:cut], skip_special_tokens=True).strip())
    return replies
