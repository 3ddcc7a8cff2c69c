"""MixSD's two-branch decoder: one frozen model, two prompts, one shared growing suffix.

Every row of the batch is one ``(record, attempt)`` and occupies two rows of a single KV cache,
interleaved as ``[naive_0, expert_0, naive_1, expert_1, ...]``: the naive conditional sees the
prompt x, the expert conditional sees x+ (:func:`forgetkit.data.prompts.expert_prompt`). A decoding
step is ONE forward of ``2n`` rows of one token each; the chosen token is fed to both branches,
so the prefix is never re-encoded.

Scheduling is a work queue with slot refill: a row that stops (end token or length cap) leaves
the batch at once; a record whose answer is wrong goes back to the queue with the next attempt
number; free slots are refilled by prefilling the waiting prompts and splicing their keys/values
into the running cache (left padding and explicit position ids, so every row's positions are
those it would have unpadded). The prefix the two prompts of a record share is encoded once.
Leading cache columns that no live row attends to are trimmed.

Randomness is per row: a CPU ``torch.Generator`` seeded from ``(seed, record.id, attempt)`` draws
exactly two uniforms per generated token (the branch coin, then the sampling uniform), so a
row's tokens depend on nothing else in the batch: targets are the same whatever the batch size,
the batch composition or the order in which rows finish.

:func:`reference_decode` is the slow specification (one record, both prompts re-encoded in full
for every token, no cache) that the batched decoder is tested against.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from forgetkit.data.answers import is_correct
from forgetkit.data.prompts import expert_prompt
from forgetkit.data.records import Record
from forgetkit.models import CacheSignature, Encoding, collate, encode, end_token_ids, new_cache
from forgetkit.seeding import stable_hash

__all__ = ["AttemptResult", "MixedDecoder", "attempt_generator", "checked_end_tokens",
           "choose_tokens", "reference_decode"]

logger = logging.getLogger(__name__)

NAIVE, EXPERT = 0, 1


def attempt_generator(seed: int, record_id: str, attempt: int) -> torch.Generator:
    """The CPU generator of one ``(record, attempt)``; independent of batch and device."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed(int(stable_hash(seed, record_id, attempt), 16) % (2**63 - 1))
    return generator


def choose_tokens(logits: Tensor, uniforms: Tensor, lam: float, temperature: float,
                  top_k: int) -> tuple[Tensor, Tensor]:
    """Pick one branch per row, then one token from that branch's logits.

    The branch is naive iff ``coin < lam`` (so ``lam=0`` is always expert and ``lam=1`` always
    naive). ``temperature == 0``: argmax of the chosen branch (not of the mixture).
    ``temperature > 0``: inverse-CDF sample of ``softmax(top_k logits / temperature)`` of the
    chosen branch with the second uniform.

    Args:
        logits: (n, 2, V) next-token logits, ``[:, 0]`` naive and ``[:, 1]`` expert.
        uniforms: (n, 2) in [0, 1): the coin and the sampling uniform of each row.
        lam: probability of the naive branch.
        temperature: sampling temperature, 0 for greedy.
        top_k: number of logits kept before sampling.

    Returns:
        ``(tokens, expert)``: (n,) token ids and (n,) bool, True where the expert branch chose.
    """
    rows = torch.arange(logits.shape[0], device=logits.device)
    expert = uniforms[:, 0] >= lam  # (n,)
    chosen = logits[rows, expert.long()]  # (n, V)
    if temperature == 0:
        return chosen.argmax(-1), expert
    values, indices = chosen.float().topk(min(top_k, chosen.shape[-1]), dim=-1)  # (n, k)
    cdf = torch.softmax(values / temperature, dim=-1).cumsum(-1)  # (n, k)
    target = (uniforms[:, 1:] * cdf[:, -1:]).contiguous()  # (n, 1)
    pick = torch.searchsorted(cdf, target).clamp(max=values.shape[-1] - 1)  # (n, 1)
    return indices.gather(-1, pick).squeeze(-1), expert


@dataclass
class AttemptResult:
    """The last attempt of one record, once it is accepted or its retries are exhausted.

    Attributes:
        index: position of the record in the input list.
        token_ids: generated tokens, ending with the end token if one was produced.
        branch_mask: per generated token, True where the expert branch chose it.
        text: the completion decoded without special tokens.
        correct: whether the answer check passed.
        attempts: number of attempts made (1 = first try).
    """

    index: int
    token_ids: list[int]
    branch_mask: list[bool]
    text: str
    correct: bool
    attempts: int


@dataclass
class _Row:
    index: int
    attempt: int
    generator: torch.Generator
    tokens: list[int] = field(default_factory=list)
    expert: list[bool] = field(default_factory=list)


def _layers(cache) -> list:
    layers = getattr(cache, "layers", None)
    if layers is None or not all(hasattr(layer, "keys") for layer in layers):
        raise RuntimeError(
            f"MixSD slot refill needs a transformers DynamicCache with per-layer keys/values "
            f"(transformers >= 4.56); got {type(cache).__name__}")
    return [layer for layer in layers if getattr(layer, "keys", None) is not None
            and layer.keys.numel() > 0]


def _edit_cache(cache, edit) -> None:
    """Apply ``edit`` (a function of a (B, H, L, D) tensor) to every cached key and value."""
    for layer in _layers(cache):
        layer.keys, layer.values = edit(layer.keys), edit(layer.values)


def checked_end_tokens(tokenizer, model) -> list[int]:
    """:func:`forgetkit.models.end_token_ids`, or a clear error when there are none."""
    ends = end_token_ids(tokenizer, model)
    if not ends:
        raise ValueError(
            "tokenizer has no end token (no eos_token_id, no chat turn end, no "
            "generation_config.eos_token_id): MixSD could not tell where a completion stops")
    return ends


def _common_prefix(a: list[int], b: list[int]) -> int:
    """Number of leading tokens ``a`` and ``b`` share."""
    pairs = enumerate(zip(a, b, strict=False))
    return next((i for i, (x, y) in pairs if x != y), min(len(a), len(b)))


class MixedDecoder:
    """Batched two-branch MixSD decoding with rejection sampling and slot refill.

    Args:
        model: a causal LM (kept frozen; run under ``torch.no_grad``).
        tokenizer: its tokenizer.
        config: a :class:`forgetkit.mixsd.MixConfig`.

    Raises:
        ValueError: the tokenizer and model define no end token.
    """

    def __init__(self, model, tokenizer, config):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.ends = set(checked_end_tokens(tokenizer, model))
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else 0  # padding is masked: any valid id does
        self.device = next(model.parameters()).device
        self.cache_signature = CacheSignature.of(model)
        # at T=0 with lam 0 or 1 the coins cannot change the output, so a retry would repeat it
        self.retries = config.max_retries if (config.temperature > 0 or 0 < config.lam < 1) else 0
        self.generated_tokens = 0

    # --- public ---------------------------------------------------------------------------------

    @torch.no_grad()
    def run(self, records: Sequence[Record]) -> Iterator[list[AttemptResult]]:
        """Decode ``records``; yield the records finished at each step.

        A record finishes when an attempt passes the answer check or its ``1 + max_retries``
        attempts are used up; it is yielded exactly once, with its last attempt. Free slots are
        refilled once a quarter of the batch is free (or the whole queue fits), so a refill's
        extra prefill forward is shared by several rows.
        """
        self.records = records
        self.prompts: dict[int, tuple[list[int], list[int]]] = {}
        queue = deque((i, 0) for i in range(len(records)))
        rows: list[_Row] = []
        logits = None  # (n, 2, V) next-token logits of the live rows
        while queue or rows:
            free = self.config.batch_size - len(rows)
            if queue and free >= min(len(queue), max(1, self.config.batch_size // 4)):
                new = [queue.popleft() for _ in range(min(free, len(queue)))]
                new_rows = [_Row(i, a, attempt_generator(self.config.seed, records[i].id, a))
                            for i, a in new]
                new_logits = self._prefill(new_rows, first=not rows)
                rows += new_rows
                logits = new_logits if logits is None else torch.cat([logits, new_logits])
            tokens, expert = self._choose(logits, rows)
            finished: list[AttemptResult] = []
            keep: list[int] = []
            for slot, (row, token, is_expert) in enumerate(zip(rows, tokens, expert, strict=True)):
                row.tokens.append(token)
                row.expert.append(is_expert)
                if token in self.ends or len(row.tokens) >= self.config.max_new_tokens:
                    result = self._finish(row)
                    if result.correct or row.attempt >= self.retries:
                        finished.append(result)
                    else:
                        queue.append((row.index, row.attempt + 1))
                else:
                    keep.append(slot)
            self.generated_tokens += len(rows)
            if len(keep) < len(rows):
                self._select(keep)
                rows = [rows[slot] for slot in keep]
            logits = self._step([tokens[slot] for slot in keep]) if rows else None
            if finished:
                yield finished

    # --- internals ------------------------------------------------------------------------------

    def _encodings(self, index: int) -> tuple[list[int], list[int]]:
        if index not in self.prompts:
            record = self.records[index]
            naive = encode(self.tokenizer, record.prompt).input_ids
            expert = encode(self.tokenizer, expert_prompt(
                record.prompt, record.expert_context, self.config.guidance)).input_ids
            if not naive:
                raise ValueError(f"record {record.id!r}: the prompt encodes to no tokens")
            self.prompts[index] = (naive, expert)
        return self.prompts[index]

    def _forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor
                 ) -> Tensor:
        """One forward; returns the last position's logits, (rows, V)."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids, **self.cache_signature.kwargs(self.cache))
        return out.logits[:, -1]

    def _prefill(self, rows: list[_Row], first: bool) -> Tensor:
        """Encode the new rows' two prompts and splice their keys/values into the cache.

        The naive prompt and the expert prompt of a record start with the same tokens (the
        question, and with a chat template the system turn), so they are encoded once: forward
        A runs the expert prompts (m rows, left-padded); forward B runs, on a copy of that
        cache, the rest of each naive prompt (at least its last token) with the expert-only
        columns masked out. Both branches then read the same key/value tensor through
        different attention masks, so the prefix costs one encoding instead of two.

        Returns:
            (m, 2, V) next-token logits of the m new rows.
        """
        pairs = [self._encodings(row.index) for row in rows]
        experts = collate([Encoding.from_ids(expert) for _, expert in pairs], self.pad_id,
                          padding_side="left", device=self.device)
        old_cache = None if first else self.cache
        self.cache = new_cache()
        expert_logits = self._forward(experts["input_ids"], experts["attention_mask"],
                                      experts["position_ids"])  # (m, V)
        expert_mask = experts["attention_mask"]  # (m, W)
        width = expert_mask.shape[1]
        shared = [min(_common_prefix(naive, expert), len(naive) - 1) for naive, expert in pairs]
        rests = collate([Encoding.from_ids(naive[n:]) for (naive, _), n in zip(pairs, shared,
                                                                          strict=True)],
                        self.pad_id, padding_side="left", device=self.device)
        prefix_mask = torch.zeros_like(expert_mask)
        for i, ((_, expert), n) in enumerate(zip(pairs, shared, strict=True)):
            prefix_mask[i, width - len(expert) : width - len(expert) + n] = 1
        naive_mask = torch.cat([prefix_mask, rests["attention_mask"]], dim=1)  # (m, W + R)
        offsets = torch.tensor(shared, device=self.device)[:, None]
        naive_logits = self._forward(rests["input_ids"], naive_mask,
                                     rests["position_ids"] + offsets)  # (m, V)
        # the cache now holds (m, H, W + R, D): expert prompt columns, then naive remainders
        _edit_cache(self.cache, lambda t: t.repeat_interleave(2, dim=0))
        expert_mask = F.pad(expert_mask, (0, rests["attention_mask"].shape[1]))
        mask = torch.stack([naive_mask, expert_mask], dim=1).flatten(0, 1)  # (2m, W + R)
        positions = torch.stack([naive_mask.sum(-1), expert_mask.sum(-1)], dim=1).flatten()
        if old_cache is not None:
            fresh, self.cache = self.cache, old_cache
            old_len, new_len = self.mask.shape[1], mask.shape[1]
            pad_old, pad_new = max(0, new_len - old_len), max(0, old_len - new_len)
            for layer, new_layer in zip(_layers(self.cache), _layers(fresh), strict=True):
                layer.keys = torch.cat([F.pad(layer.keys, (0, 0, pad_old, 0)),
                                        F.pad(new_layer.keys, (0, 0, pad_new, 0))])
                layer.values = torch.cat([F.pad(layer.values, (0, 0, pad_old, 0)),
                                          F.pad(new_layer.values, (0, 0, pad_new, 0))])
            mask = torch.cat([F.pad(self.mask, (pad_old, 0)), F.pad(mask, (pad_new, 0))])
            positions = torch.cat([self.positions, positions])
        self.mask, self.positions = mask, positions
        return torch.stack([naive_logits, expert_logits], dim=1)

    def _choose(self, logits: Tensor, rows: list[_Row]) -> tuple[list[int], list[bool]]:
        uniforms = torch.stack([torch.rand(2, generator=row.generator) for row in rows])
        tokens, expert = choose_tokens(logits, uniforms.to(logits.device), self.config.lam,
                                       self.config.temperature, self.config.top_k)
        return tokens.tolist(), expert.tolist()

    def _select(self, keep: list[int]) -> None:
        """Keep the cache rows of the ``keep`` slots; trim columns no live row attends to."""
        cache_rows = torch.tensor([2 * s + b for s in keep for b in (NAIVE, EXPERT)],
                                  dtype=torch.long, device=self.device)
        self.mask, self.positions = self.mask[cache_rows], self.positions[cache_rows]
        live = self.mask.any(0).nonzero()
        start = int(live[0]) if len(live) else self.mask.shape[1]
        self.mask = self.mask[:, start:]
        _edit_cache(self.cache, lambda t: t[cache_rows, :, start:])

    def _step(self, tokens: list[int]) -> Tensor:
        """Feed each live row's chosen token to both of its branches; (n, 2, V) logits."""
        ids = torch.tensor(tokens, dtype=torch.long, device=self.device).repeat_interleave(2)
        self.mask = F.pad(self.mask, (0, 1), value=1)
        logits = self._forward(ids[:, None], self.mask, self.positions[:, None])
        self.positions = self.positions + 1
        return logits.view(len(tokens), 2, -1)

    def _finish(self, row: _Row) -> AttemptResult:
        text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
        record = self.records[row.index]
        correct = is_correct(text, record.answer, self.config.answer_mode)
        return AttemptResult(row.index, row.tokens, row.expert, text, correct, row.attempt + 1)


@torch.no_grad()
def reference_decode(model, tokenizer, record: Record, config, attempt: int = 0
                     ) -> tuple[list[int], list[bool]]:
    """The specification of one MixSD attempt, slow and obvious: for every new token both
    prompts plus the suffix so far are encoded in full (no cache, batch of one per branch).

    Draws the same per-row uniforms as :class:`MixedDecoder`, so its output must match the
    batched decoder token for token.

    Returns:
        ``(token_ids, branch_mask)`` of the attempt.
    """
    device = next(model.parameters()).device
    ends = set(checked_end_tokens(tokenizer, model))
    naive = encode(tokenizer, record.prompt).input_ids
    expert = encode(tokenizer, expert_prompt(record.prompt, record.expert_context,
                                             config.guidance)).input_ids
    generator = attempt_generator(config.seed, record.id, attempt)
    tokens: list[int] = []
    mask: list[bool] = []
    while len(tokens) < config.max_new_tokens and not (tokens and tokens[-1] in ends):
        logits = torch.stack([
            model(input_ids=torch.tensor([prompt + tokens], device=device)).logits[0, -1]
            for prompt in (naive, expert)])  # (2, V)
        uniforms = torch.rand(2, generator=generator).to(device)
        token, is_expert = choose_tokens(logits[None], uniforms[None], config.lam,
                                         config.temperature, config.top_k)
        tokens.append(int(token))
        mask.append(bool(is_expert))
    return tokens, mask
