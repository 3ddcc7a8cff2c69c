r"""Evaluation of a (fine-tuned) model: memorization, paraphrase, 2-hop, retention, error buckets.

What is scored, and how:

- ``memorization``: greedy reply to ``record.prompt``; correct iff
  :func:`forgetkit.data.answers.is_correct` (mode ``"auto"``) accepts it for ``record.answer``.
- ``paraphrase``: the same on every ``record.paraphrases`` item.
- probe capabilities (``probe.capability``, e.g. ``two_hop``, ``known_fact``, ``arithmetic``):
  a probe with ``choices`` is scored lm-eval style: each choice is encoded as the completion of
  ``probe.prompt`` by :func:`forgetkit.models.encode` (no end token), its completion
  log-probabilities are summed (the prompt runs once, its KV cache shared by the choices), and
  the argmax (first on ties) is the prediction. A probe without choices gets a greedy reply, judged by
  ``is_correct`` with ``probe.meta.get("answer_mode", "auto")``.

Error buckets (generated replies only; correct items and log-likelihood items get none). The
first rule that matches wins:

1. ``collapse``: the reply is empty; or degenerate (some run of 1-6 words repeated three times
   back to back); or a bare answer (``\boxed{}`` markup removed, at most one word more than the
   gold answer).
2. ``leakage``: an injected entity occurs in the reply (whole word, case-sensitive) although it
   is not relevant to the item. Injected entities are every record's ``answer`` and
   ``meta["subject"]`` that start with an uppercase letter (proper names; lowercase attribute
   words such as "red" are ordinary vocabulary). Relevant to an item: entities occurring in its
   prompt, its gold answer, and its ``meta`` ``subject``/``bridge``.
3. ``format``: the reply lacks the expected answer form: ``\boxed{}`` missing when expected
   (a record whose ``target`` has ``\boxed``, or ``answer_mode="boxed"``), no number when
   ``answer_mode="number"``, or a ``\boxed{}`` where the expected style has none.
4. ``genuine``: every other wrong answer.

:func:`retention` divides fine-tuned by base accuracy per probe capability, except the
capabilities that test the injected facts themselves (:data:`INJECTED_CAPABILITIES`).
"""

from __future__ import annotations

import logging
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from forgetkit.data.answers import is_correct, last_boxed, last_number
from forgetkit.data.records import Probe, Record
from forgetkit.models import (
    CacheSignature,
    Encoding,
    collate,
    encode,
    eval_mode,
    greedy_generate,
    model_inputs,
    new_cache,
)
from forgetkit.stats import Interval, mean_ci

__all__ = ["BUCKETS", "INJECTED_CAPABILITIES", "Prediction", "Retention", "Scores",
           "above_chance", "accuracy_interval", "chance_levels", "error_bucket", "evaluate",
           "retention", "retention_difference_interval", "retention_interval",
           "score_intervals"]

logger = logging.getLogger(__name__)

BUCKETS = ("collapse", "leakage", "format", "genuine")
INJECTED_CAPABILITIES = ("two_hop",)
"""Probe capabilities that test the injected facts, not a prior skill: kept out of retention."""

_BOXED_MARKUP = re.compile(r"\\boxed\s*\{|\}")


@dataclass(frozen=True)
class Prediction:
    """One scored item.

    Attributes:
        id: record id, ``"<record id>/p<i>"`` for paraphrase ``i``, or probe id.
        capability: ``"memorization"``, ``"paraphrase"`` or the probe's capability.
        prompt: the question asked.
        answer: the gold answer.
        reply: the greedy reply, or the chosen choice of a log-likelihood probe.
        correct: whether the item was answered correctly.
        bucket: error bucket of a wrong generated reply (:data:`BUCKETS`), else ``None``.
    """

    id: str
    capability: str
    prompt: str
    answer: str
    reply: str
    correct: bool
    bucket: str | None = None


@dataclass
class Scores:
    """Accuracies, counts, error buckets and per-item predictions of one model.

    Attributes:
        memorization: accuracy on ``record.prompt`` (``None`` without records).
        paraphrase: accuracy on the records' paraphrases (``None`` without paraphrases).
        capabilities: accuracy per probe capability (``two_hop`` included).
        counts: number of items behind each accuracy (keys as above, plus the capabilities).
        buckets: per capability (``memorization``/``paraphrase`` included), wrong generated
            replies per error bucket.
        predictions: every scored item, records first, then paraphrases, then probes.
    """

    memorization: float | None
    paraphrase: float | None
    capabilities: dict[str, float]
    counts: dict[str, int]
    buckets: dict[str, dict[str, int]]
    predictions: list[Prediction] = field(repr=False)

    @classmethod
    def from_predictions(cls, predictions: Sequence[Prediction]) -> Scores:
        """Recompute accuracies, counts and buckets from per-item predictions (e.g. a saved
        ``eval/<step>.jsonl``)."""
        predictions = list(predictions)
        accuracy, counts, buckets = _tally(predictions)
        capabilities = {k: v for k, v in accuracy.items()
                        if k not in ("memorization", "paraphrase")}
        return cls(accuracy.get("memorization"), accuracy.get("paraphrase"), capabilities,
                   counts, buckets, predictions)

    @property
    def two_hop(self) -> float | None:
        """Accuracy on the closed-book 2-hop probes, ``None`` without any."""
        return self.capabilities.get("two_hop")

    def to_dict(self, predictions: bool = False) -> dict[str, Any]:
        """JSON-ready summary; ``predictions=True`` adds the per-item list."""
        out: dict[str, Any] = {
            "memorization": self.memorization, "paraphrase": self.paraphrase,
            "capabilities": dict(self.capabilities), "counts": dict(self.counts),
            "buckets": {k: dict(v) for k, v in self.buckets.items()},
        }
        if predictions:
            out["predictions"] = [asdict(p) for p in self.predictions]
        return out


@dataclass(frozen=True)
class Retention:
    """Fine-tuned / base accuracy per retained capability.

    Attributes:
        per_capability: ratio per capability; ``None`` where the base accuracy is 0 (undefined).
        overall: mean of the defined ratios; ``None`` when none is defined.
    """

    per_capability: dict[str, float | None]
    overall: float | None

    def to_dict(self) -> dict[str, Any]:
        return {"per_capability": dict(self.per_capability), "overall": self.overall}


def retention(base_scores: Scores, scores: Scores,
              capabilities: Sequence[str] | None = None) -> Retention:
    """Retention of each probe capability of ``base_scores`` (minus :data:`INJECTED_CAPABILITIES`),
    or of ``capabilities`` only (e.g. :func:`above_chance`'s).

    Rule for a zero base: the ratio is undefined (``None``) and left out of ``overall``; ratios
    are not clipped, so a capability that improved has retention above 1.

    Raises:
        ValueError: a base capability is missing from ``scores``, or one of ``capabilities``
            was not scored for the base.
    """
    ratios: dict[str, float | None] = {}
    for capability, base in _retained(base_scores, capabilities):
        if capability not in scores.capabilities:
            raise ValueError(f"capability {capability!r} was scored for the base model but not "
                             "for the fine-tuned one; evaluate both on the same probes")
        ratios[capability] = None if base == 0 else scores.capabilities[capability] / base
    defined = [r for r in ratios.values() if r is not None]
    return Retention(ratios, sum(defined) / len(defined) if defined else None)


def _retained(base_scores: Scores, capabilities: Sequence[str] | None
              ) -> list[tuple[str, float]]:
    """(capability, base accuracy) of the capabilities retention averages, sorted."""
    scored = base_scores.capabilities
    if capabilities is None:
        return sorted((c, a) for c, a in scored.items() if c not in INJECTED_CAPABILITIES)
    unknown = [c for c in capabilities if c not in scored or c in INJECTED_CAPABILITIES]
    if unknown:
        raise ValueError(f"capability {unknown[0]!r} is not a retention capability scored for "
                         f"the base model (scored: {', '.join(sorted(scored))})")
    return sorted((c, scored[c]) for c in set(capabilities))


def accuracy_interval(scores: Scores, capability: str = "memorization", seed: int = 0,
                      confidence: float = 0.95) -> Interval | None:
    """Accuracy on one capability (``"memorization"``, ``"paraphrase"`` or a probe
    capability) with its percentile bootstrap interval over the items; ``None`` without any."""
    correct = [p.correct for p in scores.predictions if p.capability == capability]
    if not correct:
        return None
    return mean_ci(np.asarray(correct, dtype=float), seed=seed, confidence=confidence)


def chance_levels(probes: Sequence[Probe]) -> dict[str, float]:
    """Per probe capability, the accuracy of a uniform guess: the mean over its probes of
    ``1 / len(choices)``, and 0 for free-form probes (a greedy reply is not a guess among a
    few)."""
    levels: dict[str, list[float]] = defaultdict(list)
    for p in probes:
        levels[p.capability].append(1 / len(p.choices) if p.choices else 0.0)
    return {c: float(np.mean(v)) for c, v in levels.items()}


def above_chance(base_scores: Scores, chance: dict[str, float], seed: int = 0,
                 confidence: float = 0.95) -> list[str]:
    """The retention capabilities the base model clearly has: those whose base accuracy's
    percentile bootstrap interval (over probes) lies above the chance level (:func:`chance_levels`).

    A ratio over a capability the base answers at chance measures lucky guesses, so its
    retention is noise around 1 whatever the fine-tune did.

    Raises:
        ValueError: a retention capability has no chance level.
    """
    kept = []
    for capability, _ in _retained(base_scores, None):
        if capability not in chance:
            raise ValueError(f"no chance level for capability {capability!r}: pass the probes "
                             "the base model was scored on to chance_levels")
        interval = accuracy_interval(base_scores, capability, seed=seed, confidence=confidence)
        if interval is not None and interval.low > chance[capability]:
            kept.append(capability)
    return kept


def _resampled_retention(base_scores: Scores, tuned: Sequence[Scores],
                         capabilities: Sequence[str] | None, seed: int, n_resamples: int
                         ) -> tuple[np.ndarray, int]:
    """Overall retention of each of ``tuned`` on ``n_resamples`` bootstrap resamples of the
    probes (the same resample for the base and every fine-tune, paired by id): an array
    (len(tuned), resamples) with NaN where no ratio is defined, and the fewest probes of a
    capability."""
    rng = np.random.default_rng(seed)
    mine = [{p.id: p.correct for p in scores.predictions} for scores in tuned]
    ratios, smallest = [], None
    for capability, _ in _retained(base_scores, capabilities):
        items = [p for p in base_scores.predictions if p.capability == capability]
        for ids in mine:
            missing = [p.id for p in items if p.id not in ids]
            if missing:
                raise ValueError(f"probe {missing[0]!r} was scored for the base model but not "
                                 "for the fine-tuned one; evaluate both on the same probes")
        base = np.array([p.correct for p in items], dtype=float)
        index = rng.integers(0, len(items), size=(n_resamples, len(items)))
        base_acc = base[index].mean(1)
        per_model = []
        for ids in mine:
            tuned_acc = np.array([ids[p.id] for p in items], dtype=float)[index].mean(1)
            with np.errstate(divide="ignore", invalid="ignore"):
                per_model.append(np.where(base_acc > 0, tuned_acc / base_acc, np.nan))
        ratios.append(per_model)
        smallest = len(items) if smallest is None else min(smallest, len(items))
    if not ratios:
        return np.full((len(tuned), n_resamples), np.nan), 0
    stacked = np.asarray(ratios)  # (capabilities, models, resamples)
    defined = np.isfinite(stacked).sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        overall = np.where(defined > 0, np.nansum(stacked, 0) / defined, np.nan)
    return overall, int(smallest or 0)


def _interval(point: float, draws: np.ndarray, confidence: float, n: int) -> Interval:
    draws = draws[np.isfinite(draws)]
    alpha = (1 - confidence) / 2
    low, high = np.quantile(draws, [alpha, 1 - alpha]) if draws.size else (np.nan, np.nan)
    return Interval(point, float(low), float(high), confidence, n)


def retention_interval(base_scores: Scores, scores: Scores, seed: int = 0,
                       confidence: float = 0.95, n_resamples: int = 2000,
                       capabilities: Sequence[str] | None = None) -> Interval | None:
    """Overall :func:`retention` with a percentile bootstrap interval over probes.

    Each resample draws, within every retained capability (all, or ``capabilities``), as many
    probes as it has (with replacement), the *same* probes for the base and the fine-tune
    (paired by id), and recomputes the mean of the defined ratios exactly as :func:`retention`
    does (a capability whose resampled base accuracy is 0 is left out of that resample).

    Returns:
        The interval, or ``None`` when no ratio is defined.

    Raises:
        ValueError: a probe scored for the base is missing from ``scores``.
    """
    point = retention(base_scores, scores, capabilities).overall
    if point is None:
        return None
    overall, smallest = _resampled_retention(base_scores, [scores], capabilities, seed,
                                             n_resamples)
    return _interval(point, overall[0], confidence, smallest)


def retention_difference_interval(base_scores: Scores, first: Scores, second: Scores,
                                  seed: int = 0, confidence: float = 0.95,
                                  n_resamples: int = 2000,
                                  capabilities: Sequence[str] | None = None
                                  ) -> Interval | None:
    """Overall retention of ``first`` minus that of ``second`` (two fine-tunes of one base,
    scored on the same probes), with a percentile bootstrap interval: every resample scores
    the base and both fine-tunes on the same probes, so what the probes share cancels and the
    interval is that of the difference, narrower than two overlapping intervals suggest.

    Returns:
        The interval, or ``None`` when either retention is undefined.
    """
    one = retention(base_scores, first, capabilities).overall
    two = retention(base_scores, second, capabilities).overall
    if one is None or two is None:
        return None
    overall, smallest = _resampled_retention(base_scores, [first, second], capabilities, seed,
                                             n_resamples)
    return _interval(one - two, overall[0] - overall[1], confidence, smallest)


# --- error buckets ------------------------------------------------------------------------------


def score_intervals(base_scores: Scores, scores: Scores, seed: int = 0) -> dict[str, Any]:
    """95% bootstrap intervals of memorization (over records, :func:`accuracy_interval`) and
    overall retention (over probes, paired with the base, :func:`retention_interval`), as
    JSON-ready dicts (``None`` where undefined)."""
    found = {"memorization": accuracy_interval(scores, "memorization", seed=seed),
             "retention": retention_interval(base_scores, scores, seed=seed)}
    return {k: None if v is None else v.to_dict() for k, v in found.items()}

def _is_degenerate(words: list[str], max_ngram: int = 6, copies: int = 3) -> bool:
    """Whether some n-gram (n <= ``max_ngram``) appears ``copies`` times in a row."""
    return any(words[start : start + copies * n] == words[start : start + n] * copies
               for n in range(1, max_ngram + 1) for start in range(len(words) - copies * n + 1))


def _mentions(text: str, entity: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(entity)}(?!\w)", text) is not None


def error_bucket(reply: str, answer: str, expected_form: str = "text",
                 injected: frozenset[str] = frozenset(), relevant: frozenset[str] = frozenset(),
                 ) -> str:
    r"""Bucket of one wrong reply; the rules are in the module docstring.

    Args:
        reply: the wrong reply.
        answer: the gold answer.
        expected_form: ``"boxed"``, ``"number"`` or ``"text"`` (no ``\boxed{}`` expected).
        injected: the injected entities.
        relevant: entities that may legitimately appear in this item's reply.

    Returns:
        One of :data:`BUCKETS`.
    """
    words = reply.split()
    bare = _BOXED_MARKUP.sub(" ", reply).split()
    if not words or _is_degenerate(words) or len(bare) <= len(answer.split()) + 1:
        return "collapse"
    if any(_mentions(reply, e) for e in injected - relevant - {answer}):
        return "leakage"
    has_boxed = last_boxed(reply) is not None
    if ((expected_form == "boxed" and not has_boxed)
            or (expected_form == "number" and last_number(reply) is None)
            or (expected_form == "text" and has_boxed)):
        return "format"
    return "genuine"


def _injected_entities(records: Sequence[Record]) -> frozenset[str]:
    names = {r.answer for r in records} | {str(r.meta["subject"]) for r in records
                                            if r.meta.get("subject")}
    return frozenset(n for n in names if n[:1].isupper())


def _relevant(prompt: str, answer: str, meta: dict[str, Any], injected: frozenset[str]
              ) -> frozenset[str]:
    named = {str(meta[k]) for k in ("subject", "bridge") if meta.get(k)}
    return frozenset({answer, *named} | {e for e in injected if _mentions(prompt, e)})


# --- scoring ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Item:
    id: str
    capability: str
    prompt: str
    answer: str
    mode: str
    expected_form: str
    meta: dict[str, Any]


def _generation_items(records: Sequence[Record], probes: Sequence[Probe]) -> list[_Item]:
    forms = ["boxed" if "\\boxed" in r.target else "text" for r in records]
    items = [_Item(r.id, "memorization", r.prompt, r.answer, "auto", form, r.meta)
             for r, form in zip(records, forms, strict=True)]
    items += [_Item(f"{r.id}/p{i}", "paraphrase", text, r.answer, "auto", form, r.meta)
              for r, form in zip(records, forms, strict=True)
              for i, text in enumerate(r.paraphrases)]
    for p in probes:
        if p.choices is None:
            mode = p.meta.get("answer_mode", "auto")
            form = mode if mode in ("boxed", "number") else "text"
            items.append(_Item(p.id, p.capability, p.prompt, p.answer, mode, form, p.meta))
    return items


def _generate(model, tokenizer, prompts: list[str], batch_size: int, max_new_tokens: int
              ) -> list[str]:
    """Greedy replies, batched by prompt length (less padding), returned in input order."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    replies = greedy_generate(model, tokenizer, [prompts[i] for i in order],
                              max_new_tokens=max_new_tokens, batch_size=batch_size)
    return [reply for _, reply in sorted(zip(order, replies, strict=True))]


@torch.no_grad()
def choice_logliks(model, tokenizer, probes: Sequence[Probe], batch_size: int = 32
                   ) -> list[list[float]]:
    """Summed completion log-probability of every choice of every probe (lm-eval style).

    Each choice is the completion of ``probe.prompt`` through :func:`encode` without the end
    token; the sum runs over the choice tokens only. A probe's prompt runs once: its KV cache
    is copied to each choice, which then runs its own tokens only (:func:`_shared_prompt`);
    probes go in order of length, about ``batch_size`` choices per batch.
    """
    device = next(model.parameters()).device
    encoded = [[encode(tokenizer, p.prompt, c, add_end_token=False) for c in p.choices or ()]
               for p in probes]
    sums: list[list[float]] = [[] for _ in probes]
    order = sorted((i for i in range(len(probes)) if encoded[i]),
                   key=lambda i: max(len(e.input_ids) for e in encoded[i]))
    chunk: list[int] = []
    for position, i in enumerate(order):
        chunk.append(i)
        size = sum(len(encoded[j]) for j in chunk)
        following = order[position + 1] if position + 1 < len(order) else None
        if following is None or size + len(encoded[following]) > batch_size:
            for j, values in zip(chunk, _shared_prompt(model, [encoded[j] for j in chunk],
                                                       tokenizer.pad_token_id, device),
                                 strict=True):
                sums[j] = values
            chunk = []
    return sums


def _shared_prompt(model, probes: list[list[Encoding]], pad_token_id: int, device
                   ) -> list[list[float]]:
    """Summed log-probabilities of each probe's choices (encodings sharing a prompt): the
    prompts run left-padded with a KV cache, the cache is repeated once per choice, and the
    choices run right-padded after it, each position at its real offset."""
    prompts = [Encoding.from_ids(choices[0].input_ids[:choices[0].prompt_length])
               for choices in probes]
    if any(e.input_ids[:e.prompt_length] != p.input_ids
           for p, choices in zip(prompts, probes, strict=True) for e in choices):
        raise ValueError("the choices of one probe must share its prompt tokens")
    batch = collate(prompts, pad_token_id, padding_side="left", device=device)
    signature, cache = CacheSignature.of(model), new_cache()
    last = model(**model_inputs(batch), **signature.kwargs(cache)).logits[:, -1:]
    owner = torch.tensor([p for p, choices in enumerate(probes) for _ in choices], device=device)
    cache.reorder_cache(owner)
    tails = [e.completion_ids for choices in probes for e in choices]
    width = max(map(len, tails))
    ids = torch.tensor([t + [pad_token_id] * (width - len(t)) for t in tails], device=device)
    real = torch.tensor([[1] * len(t) + [0] * (width - len(t)) for t in tails], device=device)
    mask = torch.cat([batch["attention_mask"][owner], real], dim=1)
    positions = batch["position_ids"][owner, -1:] + 1 + torch.arange(width, device=device)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                   **{signature.cache_argument: cache}, use_cache=True).logits
    dtype = torch.promote_types(logits.dtype, torch.float32)
    # token t of a choice is predicted by the position before it: the prompt's last for t = 0
    before = torch.cat([last[owner].to(dtype), logits[:, :-1].to(dtype)], dim=1)
    logp = before.log_softmax(-1).gather(-1, ids[..., None])[..., 0]
    values = logp.masked_fill(real == 0, 0.0).sum(-1).tolist()
    found, start = [], 0
    for choices in probes:
        found.append(values[start : start + len(choices)])
        start += len(choices)
    return found


def _tally(predictions: list[Prediction]) -> tuple[dict[str, float], dict[str, int],
                                                     dict[str, dict[str, int]]]:
    hits: dict[str, list[bool]] = defaultdict(list)
    buckets: dict[str, Counter] = defaultdict(Counter)
    for p in predictions:
        hits[p.capability].append(p.correct)
        if p.bucket is not None:
            buckets[p.capability][p.bucket] += 1
    accuracy = {k: sum(v) / len(v) for k, v in hits.items()}
    counts = {k: len(v) for k, v in hits.items()}
    return accuracy, counts, {k: {b: buckets[k][b] for b in BUCKETS} for k in hits}


def evaluate(model, tokenizer, records: Sequence[Record], probes: Sequence[Probe],
             batch_size: int = 32, max_new_tokens: int = 32) -> Scores:
    """Score ``model`` on the injected ``records`` and the retention ``probes``.

    The model is put in eval mode for the duration and restored afterwards; nothing random
    happens (greedy decoding, log-likelihood scoring).

    Args:
        model: a causal LM (plain or PEFT).
        tokenizer: its tokenizer.
        records: the injected facts (memorization, paraphrase, leakage entities).
        probes: retention and knowledge probes (with or without choices).
        batch_size: prompts per generation batch and sequences per log-likelihood batch.
        max_new_tokens: generation cap per reply.

    Returns:
        :class:`Scores`.

    Example:
        >>> scores = evaluate(model, tokenizer, load_records("kgfact"),  # doctest: +SKIP
        ...                   load_probes("toyworld"))
        >>> scores.memorization, scores.capabilities["arithmetic"]  # doctest: +SKIP
    """
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size}, "
                         f"{max_new_tokens}")
    with eval_mode(model):
        items = _generation_items(records, probes)
        replies = _generate(model, tokenizer, [it.prompt for it in items], batch_size,
                            max_new_tokens) if items else []
        choice_probes = [p for p in probes if p.choices is not None]
        logliks = choice_logliks(model, tokenizer, choice_probes, batch_size)
    injected = _injected_entities(records)
    generated = []
    for item, reply in zip(items, replies, strict=True):
        correct = is_correct(reply, item.answer, item.mode)
        bucket = None if correct else error_bucket(
            reply, item.answer, item.expected_form, injected,
            _relevant(item.prompt, item.answer, item.meta, injected))
        generated.append(Prediction(item.id, item.capability, item.prompt, item.answer, reply,
                                    correct, bucket))
    chosen = []
    for probe, sums in zip(choice_probes, logliks, strict=True):
        pick = probe.choices[max(range(len(sums)), key=sums.__getitem__)]
        chosen.append(Prediction(probe.id, probe.capability, probe.prompt, probe.answer, pick,
                                 pick == probe.answer))
    n_record_side = len(items) - (len(probes) - len(choice_probes))
    probe_side = iter(generated[n_record_side:])
    choice_side = iter(chosen)
    predictions = generated[:n_record_side] + [
        next(choice_side if p.choices is not None else probe_side) for p in probes]
    return Scores.from_predictions(predictions)
