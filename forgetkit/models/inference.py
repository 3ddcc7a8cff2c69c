"""Running a model without training it: greedy generation."""

from __future__ import annotations

import torch

from forgetkit.models.encoding import collate, encode, end_token_ids

__all__ = ["greedy_generate"]


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
