"""The trainer's methods: what a training example is and what loss a micro-batch gets.

Every method works in two phases per optimizer step, so the trainer can normalize the loss by
the completion tokens of the whole step before any backward pass:

1. :meth:`prepare` (no grad): turn a micro-batch of :class:`Example` into tensors and count its
   completion tokens (OPSD samples its completions here);
2. :meth:`loss_sum` (with grad): the loss summed over those completion tokens.

- :class:`NLL` (``sft``, ``mixsd``): next-token NLL on the completion tokens of a fixed
  encoding, via :func:`forgetkit.train.losses.completion_nll`.
- :class:`OPSD`: the student samples completions of the naive prompt; the frozen teacher (the
  base model with the expert prompt) scores the same tokens; the loss is
  :func:`forgetkit.train.losses.topk_kl` per completion token.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from forgetkit.data.answers import warn_unanswered
from forgetkit.data.prompts import expert_prompt
from forgetkit.data.records import Record
from forgetkit.diagnostics.loglik import forward_logits
from forgetkit.mixsd import MixedTarget
from forgetkit.models import (
    IGNORE_INDEX,
    CacheSignature,
    Encoding,
    check_context,
    collate,
    context_length,
    encode,
    eval_mode,
    new_cache,
    record_label,
)
from forgetkit.seeding import stable_hash
from forgetkit.train.losses import completion_logits, completion_nll, topk_kl

__all__ = ["NLL", "OPSD", "Example", "Prepared", "frozen_teacher", "mixsd_examples",
           "opsd_examples", "sample_completions", "sft_examples"]


@dataclass(frozen=True)
class Example:
    """One training item.

    Attributes:
        index: position in the training set (seeds OPSD sampling, so samples do not depend on
            which process or micro-batch an example lands in).
        record_id: the record it comes from.
        encoding: ``sft``/``mixsd``: naive prompt + target (labels on the target);
            ``opsd``: the naive prompt alone.
        teacher_prompt_ids: ``opsd``: the expert prompt x+; else ``None``.
    """

    index: int
    record_id: str
    encoding: Encoding
    teacher_prompt_ids: tuple[int, ...] | None = None


def sft_examples(tokenizer, records: Sequence[Record]) -> list[Example]:
    """``encode(tokenizer, record.prompt, record.target)`` per record.

    Raises:
        ValueError: a record longer than the model's context (as the tokenizer of
            :func:`~forgetkit.models.load_model` states it), naming the record.
    """
    warn_unanswered(records, "train")
    examples = [Example(i, r.id, encode(tokenizer, r.prompt, r.target))
                for i, r in enumerate(records)]
    check_context(((record_label(r), len(e.encoding.input_ids))
                   for r, e in zip(records, examples, strict=True)), context_length(None, tokenizer))
    return examples


def mixsd_examples(tokenizer, records: Sequence[Record], targets: Sequence[MixedTarget]
                   ) -> list[Example]:
    """The naive prompt ``encode(tokenizer, record.prompt)`` followed by each target's
    ``token_ids`` (taken as they are: the end token only if the decoder produced one).

    Raises:
        ValueError: a target of an unknown record, or one without tokens.
    """
    by_id = {r.id: r for r in records}
    examples = []
    for target in targets:
        if target.record_id not in by_id:
            raise ValueError(f"MixSD target of unknown record {target.record_id!r}")
        if not target.token_ids:
            raise ValueError(f"MixSD target of record {target.record_id!r} has no tokens")
        prompt_ids = encode(tokenizer, by_id[target.record_id].prompt).input_ids
        examples.append(Example(len(examples), target.record_id,
                                Encoding.from_ids(prompt_ids, target.token_ids)))
    return examples


def opsd_examples(tokenizer, records: Sequence[Record], guidance: str = "fact") -> list[Example]:
    """The naive prompt and the expert prompt x+ (:func:`expert_prompt`) per record.

    Raises:
        ValueError: an expert prompt longer than the model's context, naming the record.
    """
    warn_unanswered(records, "train")
    examples = [Example(i, r.id, encode(tokenizer, r.prompt), tuple(encode(
        tokenizer, expert_prompt(r.prompt, r.expert_context, guidance)).input_ids))
        for i, r in enumerate(records)]
    check_context(((record_label(r), len(e.teacher_prompt_ids))
                   for r, e in zip(records, examples, strict=True)),
                  context_length(None, tokenizer), "the expert prompt")
    return examples


@dataclass
class Prepared:
    """A micro-batch ready for :meth:`loss_sum`: tensors and its completion-token count."""

    n_tokens: int
    student: dict[str, Tensor]
    teacher: dict[str, Tensor] | None = None


class NLL:
    """Completion-only next-token NLL on fixed encodings (``sft`` and ``mixsd``)."""

    def __init__(self, pad_token_id: int, device: torch.device):
        self.pad_token_id, self.device = pad_token_id, device

    def prepare(self, examples: Sequence[Example], step: int) -> Prepared:
        batch = collate([e.encoding for e in examples], self.pad_token_id, device=self.device)
        return Prepared(int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()), batch)

    def loss_sum(self, model, prepared: Prepared) -> Tensor:
        return completion_nll(model, prepared.student)[0]


def _sampling_seed(seed: int, step: int, index: int, generation: int) -> int:
    return int(stable_hash("opsd", seed, step, index, generation), 16) % (2**63)


@torch.no_grad()
def sample_completions(model, prompts: Sequence[Sequence[int]],
                       generators: Sequence[torch.Generator], temperature: float,
                       max_new_tokens: int, end_ids: Sequence[int], pad_token_id: int
                       ) -> list[list[int]]:
    """Sample one completion per prompt, row ``i`` drawing only from ``generators[i]``.

    Left-padded, KV-cached decoding in eval mode (the mode is restored). A row stops after its
    first end token (kept) or ``max_new_tokens`` tokens. ``temperature=0`` is greedy; else each
    token is drawn from ``softmax(logits / temperature)`` over the whole vocabulary.

    Returns:
        The completion token ids of each prompt (never empty).
    """
    device = next(model.parameters()).device
    batch = collate([Encoding.from_ids(p) for p in prompts], pad_token_id,
                    padding_side="left", device=device)
    cached = CacheSignature.of(model).kwargs(new_cache())
    ids, mask, positions = batch["input_ids"], batch["attention_mask"], batch["position_ids"]
    ends = set(end_ids)
    completions: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    with eval_mode(model):
        for _ in range(max_new_tokens):
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                           **cached).logits[:, -1].float()  # (n, V)
            if temperature == 0:
                tokens = logits.argmax(-1).tolist()
            else:
                probs = torch.softmax(logits / temperature, dim=-1)
                tokens = [int(torch.multinomial(probs[i], 1, generator=g))
                          for i, g in enumerate(generators)]
            for i, token in enumerate(tokens):
                if not done[i]:
                    completions[i].append(token)
                    done[i] = token in ends
            if all(done):
                break
            ids = torch.tensor(tokens, device=device)[:, None]
            mask = torch.cat([mask, mask.new_ones(len(prompts), 1)], dim=1)
            positions = positions[:, -1:] + 1
    return completions


class OPSD:
    """On-policy self-distillation: KL to the frozen expert-prompted teacher on student samples.

    Args:
        sampler: the student model to sample from (unwrapped from DDP).
        teacher: ``teacher(batch) -> (B, T, V) logits`` of the frozen base; called under
            ``torch.no_grad``.
        pad_token_id, end_ids, device: tokenizer and placement facts.
        seed, num_generations, temperature, max_new_tokens, top_k, direction: the
            ``opsd_*`` config fields.
    """

    def __init__(self, sampler, teacher: Callable[[dict[str, Tensor]], Tensor], *,
                 pad_token_id: int, end_ids: Sequence[int], device: torch.device, seed: int,
                 num_generations: int, temperature: float, max_new_tokens: int, top_k: int,
                 direction: str):
        self.sampler, self.teacher = sampler, teacher
        self.pad_token_id, self.end_ids, self.device = pad_token_id, list(end_ids), device
        self.seed, self.num_generations = seed, num_generations
        self.temperature, self.max_new_tokens = temperature, max_new_tokens
        self.top_k, self.direction = top_k, direction

    def prepare(self, examples: Sequence[Example], step: int) -> Prepared:
        rows = [(e, g) for e in examples for g in range(self.num_generations)]
        generators = [torch.Generator(self.device).manual_seed(
            _sampling_seed(self.seed, step, e.index, g)) for e, g in rows]
        completions = sample_completions(
            self.sampler, [e.encoding.input_ids for e, _ in rows], generators, self.temperature,
            self.max_new_tokens, self.end_ids, self.pad_token_id)
        return self.batches([e for e, _ in rows], completions)

    def batches(self, examples: Sequence[Example], completions: Sequence[Sequence[int]]
                ) -> Prepared:
        """Student (naive prompt) and teacher (expert prompt) batches of given completions."""
        student = [Encoding.from_ids(e.encoding.input_ids, c)
                   for e, c in zip(examples, completions, strict=True)]
        teacher = [Encoding.from_ids(e.teacher_prompt_ids, c)
                   for e, c in zip(examples, completions, strict=True)]
        return Prepared(sum(len(c) for c in completions),
                        collate(student, self.pad_token_id, device=self.device),
                        collate(teacher, self.pad_token_id, device=self.device))

    def loss_sum(self, model, prepared: Prepared) -> Tensor:
        with torch.no_grad():
            teacher = completion_logits(self.teacher(prepared.teacher),
                                        prepared.teacher["labels"])  # (N, V)
        student = completion_logits(forward_logits(model, prepared.student),
                                    prepared.student["labels"])  # (N, V)
        return topk_kl(student, teacher, self.top_k, self.direction).sum()


def frozen_teacher(model, use_peft: bool) -> Callable[[dict[str, Tensor]], Tensor]:
    """The OPSD teacher: the adapter-disabled model under LoRA, else a frozen deep copy."""
    if use_peft:
        def teacher(batch):
            with model.disable_adapter():
                return forward_logits(model, batch)
        return teacher
    import copy

    frozen = copy.deepcopy(model).eval()
    frozen.requires_grad_(False)
    return lambda batch: forward_logits(frozen, batch)

