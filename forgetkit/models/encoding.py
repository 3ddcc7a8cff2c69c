"""The one prompt/completion tokenizer (:func:`encode`) and batching (:func:`collate`).

Trainer, NLL, Fisher, MixSD and evaluation all tokenize through :func:`encode` and batch through
:func:`collate`, so "which tokens are the completion" is decided in exactly one place.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["IGNORE_INDEX", "MODEL_INPUTS", "Encoding", "check_context", "collate",
           "context_length", "encode", "end_token_ids", "model_inputs", "record_label"]

IGNORE_INDEX = -100
"""The label of a token that is not scored (prompt and padding)."""

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")
"""The entries of a :func:`collate` batch that a forward pass takes (labels stay out, so the
model computes no loss of its own)."""


@dataclass(frozen=True)
class Encoding:
    """One tokenized prompt/completion pair.

    Attributes:
        input_ids: prompt tokens then completion tokens (the completion ends with the end
            token when one was added).
        labels: ``-100`` on every prompt token, the token id on every completion token.
        prompt_length: number of prompt tokens.
    """

    input_ids: list[int]
    labels: list[int]
    prompt_length: int

    @classmethod
    def from_ids(cls, prompt_ids: Sequence[int], completion_ids: Sequence[int] = ()) -> Encoding:
        """The encoding of token ids already split into prompt and completion (labels on the
        completion only), e.g. a MixSD target's tokens after its naive prompt."""
        prompt_ids, completion_ids = list(prompt_ids), list(completion_ids)
        return cls(prompt_ids + completion_ids, [IGNORE_INDEX] * len(prompt_ids) + completion_ids,
                   len(prompt_ids))

    @property
    def completion_ids(self) -> list[int]:
        return self.input_ids[self.prompt_length :]


def _chat_end_token(tokenizer) -> int | None:
    for token in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id and token_id >= 0:
            return token_id
    return tokenizer.eos_token_id


def end_token_ids(tokenizer, model=None) -> list[int]:
    """Every token id that ends a reply: eos, the chat turn end, the generation config's eos."""
    ids = {tokenizer.eos_token_id}
    if tokenizer.chat_template:
        ids.add(_chat_end_token(tokenizer))
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update([eos] if isinstance(eos, int) else eos or ())
    return sorted(ids - {None})


def encode(tokenizer, prompt: str, completion: str | None = None, context: str | None = None,
           add_end_token: bool = True) -> Encoding:
    """Tokenize one prompt/completion pair; the ONE tokenization used across forgetkit.

    With a chat template, the prompt is a user turn rendered with the generation prompt and the
    completion is the assistant reply followed by the turn-end token (e.g. ``<|im_end|>``).
    Without one, the text is ``prompt + " " + completion`` (the space goes to the completion,
    lm-eval style) with the tokenizer's special tokens (bos) on the prompt and eos after the
    completion. The prompt is tokenized alone, so labels cover exactly the completion tokens.

    Args:
        tokenizer: a HF tokenizer.
        prompt: the user's question.
        completion: the reply; ``None`` encodes the prompt alone (for generation).
        context: text shown before the prompt in the same user turn (separated by a blank line).
        add_end_token: append the end token to the completion.

    Returns:
        An :class:`Encoding`; with ``completion=None`` every label is ``-100``.

    Raises:
        ValueError: empty completion, or a tokenizer that produces no tokens for it.
    """
    user = prompt if context is None else f"{context}\n\n{prompt}"
    if tokenizer.chat_template:
        prompt_ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], add_generation_prompt=True, tokenize=True,
            return_dict=False,
        )
        if isinstance(prompt_ids, dict) or hasattr(prompt_ids, "input_ids"):
            prompt_ids = prompt_ids["input_ids"]
        prompt_ids = list(prompt_ids)
        end = _chat_end_token(tokenizer)
        lead = ""
    else:
        prompt_ids = tokenizer(user, add_special_tokens=True)["input_ids"]
        end = tokenizer.eos_token_id
        lead = " "
    if completion is None:
        return Encoding.from_ids(prompt_ids)
    if not completion.strip():
        raise ValueError("empty completion: nothing to score or train on")
    if lead and completion[:1].isspace():
        lead = ""
    completion_ids = tokenizer(lead + completion, add_special_tokens=False)["input_ids"]
    if add_end_token and end is not None:
        completion_ids = [*completion_ids, end]
    return Encoding.from_ids(prompt_ids, completion_ids)


def collate(encodings: list[Encoding], pad_token_id: int, padding_side: str = "right",
            device: str | torch.device | None = None) -> dict[str, Tensor]:
    """Pad encodings into a batch.

    Returns:
        ``input_ids`` (B, T), ``attention_mask`` (B, T), ``labels`` (B, T) with -100 on prompt
        and padding, and ``position_ids`` (B, T) counting real tokens only (so left padding
        gives the same positions as no padding).
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if not encodings:
        raise ValueError("collate: empty batch")
    width = max(len(e.input_ids) for e in encodings)

    def padded(row: list[int], value: int) -> list[int]:
        padding = [value] * (width - len(row))
        return padding + row if padding_side == "left" else row + padding

    # one tensor per field from padded lists (one copy, not one per row)
    ids = torch.tensor([padded(e.input_ids, pad_token_id) for e in encodings], dtype=torch.long)
    labels = torch.tensor([padded(e.labels, IGNORE_INDEX) for e in encodings], dtype=torch.long)
    mask = torch.tensor([padded([1] * len(e.input_ids), 0) for e in encodings], dtype=torch.long)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels, "position_ids": positions}
    if device is not None:
        batch = {k: v.to(device) for k, v in batch.items()}
    return batch


def model_inputs(batch: Mapping[str, Tensor | None]) -> dict[str, Tensor | None]:
    """The forward arguments of a batch: its :data:`MODEL_INPUTS` entries, those it has.

    ``position_ids`` from :func:`collate` count real tokens only, so passing them makes left- and
    right-padded batches agree.
    """
    return {key: batch[key] for key in MODEL_INPUTS if key in batch}


_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
_NO_LIMIT = 10**9  # tokenizers without a known limit report ~1e30 as model_max_length


def context_length(model=None, tokenizer=None) -> int | None:
    """The most tokens the model takes in one sequence: its config's
    ``max_position_embeddings`` (or ``n_positions``, ...); without a model, the tokenizer's
    ``model_max_length`` when it states a real limit (:func:`~forgetkit.models.load_model`
    sets it to the model's). ``None``: no known limit."""
    config = getattr(model, "config", None)
    for key in _CONTEXT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and 0 < limit < _NO_LIMIT else None


def check_context(lengths: Iterable[tuple[str, int]], context: int | None,
                  what: str = "prompt + completion") -> None:
    """Refuse, before any work, a sequence longer than the model's context: nothing is ever
    truncated silently.

    Args:
        lengths: ``(where, number of tokens)`` per item; ``where`` names it in the error (e.g.
            ``"record 'r1' (facts.jsonl:3)"``).
        context: :func:`context_length`; ``None`` checks nothing.
        what: what the lengths count, for the message.

    Raises:
        ValueError: naming the first item too long, its length and the context.
    """
    if context is None:
        return
    for where, n_tokens in lengths:
        if n_tokens > context:
            raise ValueError(f"{where}: {what} is {n_tokens} tokens, longer than the model's "
                             f"context ({context} tokens); inputs are never truncated, "
                             "shorten this one")


def record_label(record) -> str:
    """``record 'id'`` plus the file and line it came from, when known (for error messages)."""
    source = getattr(record, "meta", {}).get("source")
    return f"record {record.id!r}" + (f" ({source})" if source else "")
