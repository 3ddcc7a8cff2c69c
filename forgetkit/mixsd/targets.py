r"""MixSD target construction: mix a frozen model's naive and expert conditionals token by token.

For each record the same frozen model is run on two prompts, the naive prompt x
(``encode(tokenizer, record.prompt)``) and the expert prompt x+ (x, a guidance line, the record's
context and a transition; :func:`forgetkit.data.prompts.expert_prompt`). Both continue one shared
suffix; per token a seeded coin picks the naive branch with probability ``lam``, else the expert
branch, and the token comes from that branch alone (argmax at ``temperature=0``, else a sample of
its top-k softmax). The answer of each completion is checked with
:func:`forgetkit.data.answers.is_correct`; wrong ones are regenerated with fresh coins up to
``max_retries`` times, and records that never pass follow ``on_failure``.

Decoding is batched and KV-cached (:mod:`forgetkit.mixsd.decode`): one forward per step for the
2 branches of every live row, with finished rows replaced by waiting ones. A target depends only
on ``(model, record, config)``, never on the batch size or which records share a batch (up to
floating-point rounding in padded batches, which would have to flip an argmax or a sampling
boundary to show).

Example:
    >>> model, tokenizer = load_model("toyworld")  # doctest: +SKIP
    >>> targets = build_targets(model, tokenizer, load_records("kgfact"), MixConfig(lam=0.3))  # doctest: +SKIP
    >>> targets.report.n_failed  # doctest: +SKIP

Command line (resumable; an interrupted run continues where it stopped)::

    python -m forgetkit.mixsd --model toyworld --records kgfact --lam 0.3 --out targets.jsonl
    python -m forgetkit.mixsd --records kgfact --format trl --out trl.jsonl  # TRL's layout
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from forgetkit.cli_config import command_line, parse_cli
from forgetkit.data.answers import AnswerMode
from forgetkit.data.prompts import expert_prompt, get_guidance
from forgetkit.data.records import Record, load_records, records_hash
from forgetkit.files import (
    append_jsonl,
    atomic_write_json,
    atomic_write_jsonl,
    check_writable,
    read_jsonl,
)
from forgetkit.mixsd.decode import MixedDecoder, checked_end_tokens
from forgetkit.models import (
    check_context,
    context_length,
    encode,
    load_model,
    model_hash,
    record_label,
    resolve_device,
    resolve_dtype,
)
from forgetkit.seeding import stable_hash

__all__ = ["BuildConfig", "BuildReport", "MixConfig", "MixedTarget", "MixedTargets", "Outcome",
           "build_target_file", "build_targets", "main", "meta_path", "progress_path", "run"]

logger = logging.getLogger(__name__)

OnFailure = Literal["drop", "keep", "canonical"]
OutputFormat = Literal["forgetkit", "trl"]
_OUTPUT_FORMATS = typing.get_args(OutputFormat)
_ANSWER_MODES = typing.get_args(AnswerMode)
_ON_FAILURE = typing.get_args(OnFailure)


@dataclass
class MixConfig:
    """How MixSD targets are built."""

    lam: float = field(default=0.3, metadata={
        "help": "probability of taking a token from the naive conditional (0 = expert only)"})
    temperature: float = field(default=0.0, metadata={
        "help": "0: argmax of the chosen branch; > 0: sample its top-k softmax at this T"})
    top_k: int = field(default=64, metadata={"help": "logits kept before sampling (T > 0)"})
    max_new_tokens: int = field(default=64, metadata={"help": "length cap of a completion"})
    max_retries: int = field(default=10, metadata={
        "help": "regenerations of a record whose answer is wrong (0 = one attempt only; none at "
                "T=0 with lam 0 or 1, where the coins cannot change the output)"})
    on_failure: OnFailure = field(default="drop", metadata={
        "help": "records that never pass: drop them, keep the last attempt (correct=False), "
                "or fall back to the canonical target (correct=False, fallback=True)"})
    seed: int = field(default=0, metadata={"help": "seed of the coins and samples"})
    batch_size: int = field(default=16, metadata={
        "help": "records decoded at once (each takes two rows, naive and expert)"})
    guidance: str = field(default="fact", metadata={
        "help": "guidance preset of the expert prompt: fact or procedure"})
    answer_mode: AnswerMode = field(default="auto", metadata={
        "help": "answer check: auto, string, boxed or number (forgetkit.data.answers)"})

    def __post_init__(self):
        problems = []
        if not (isinstance(self.lam, int | float) and 0 <= self.lam <= 1):
            problems.append(f"lam={self.lam!r} must be in [0, 1]")
        if not (isinstance(self.temperature, int | float) and math.isfinite(self.temperature)
                and self.temperature >= 0):
            problems.append(f"temperature={self.temperature!r} must be a finite number >= 0")
        for name, low in (("top_k", 1), ("max_new_tokens", 1), ("max_retries", 0),
                          ("batch_size", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                problems.append(f"{name}={value!r} must be an integer >= {low}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            problems.append(f"seed={self.seed!r} must be an integer")
        if self.on_failure not in _ON_FAILURE:
            problems.append(f"on_failure={self.on_failure!r} must be one of {_ON_FAILURE}")
        if self.answer_mode not in _ANSWER_MODES:
            problems.append(f"answer_mode={self.answer_mode!r} must be one of {_ANSWER_MODES}")
        try:
            get_guidance(self.guidance)
        except (ValueError, TypeError) as err:
            problems.append(f"guidance: {err}")
        if problems:
            raise ValueError("MixConfig: " + "; ".join(problems))

    def output_key(self) -> dict[str, Any]:
        """The fields that decide the targets (all but ``batch_size``)."""
        return {k: v for k, v in asdict(self).items() if k != "batch_size"}


@dataclass(frozen=True)
class MixedTarget:
    """One MixSD completion of a record.

    Attributes:
        record_id: the record's id.
        text: the completion decoded without special tokens (exactly, not stripped).
        token_ids: the generated tokens; they end with the end token if one was produced.
        correct: whether the answer check passed.
        attempts: attempts made (1 = first try).
        expert_token_fraction: share of tokens chosen by the expert branch.
        branch_mask: one bool per token of ``token_ids``, True = expert branch.
        fallback: True when this is the record's canonical target (``on_failure="canonical"``),
            not a generated one; its branch mask is all True (all of it is the reference).
    """

    record_id: str
    text: str
    token_ids: list[int]
    correct: bool
    attempts: int
    expert_token_fraction: float
    branch_mask: list[bool]
    fallback: bool = False

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (the JSONL row of ``python -m forgetkit.mixsd``)."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> MixedTarget:
        """Inverse of :meth:`to_json`.

        Raises:
            ValueError: missing or unknown keys, or a branch mask of the wrong length.
        """
        names = {f.name for f in fields(cls)}
        required = names - {"fallback"}
        if not isinstance(data, dict) or not required <= set(data) or set(data) - names:
            got = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"MixedTarget JSON needs keys {sorted(required)}, got {got}")
        target = cls(**{**data, "token_ids": list(data["token_ids"]),
                        "branch_mask": list(data["branch_mask"])})
        if len(target.branch_mask) != len(target.token_ids):
            raise ValueError(f"MixedTarget {target.record_id!r}: {len(target.branch_mask)} branch "
                             f"mask entries for {len(target.token_ids)} token_ids")
        return target


@dataclass(frozen=True)
class Outcome:
    """What happened to one record: its final attempt's verdict and the target kept, if any."""

    index: int
    record_id: str
    passed: bool
    attempts: int
    target: MixedTarget | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)  # the target as MixedTarget.to_json writes it

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Outcome:
        target = data["target"]
        return cls(data["index"], data["record_id"], data["passed"], data["attempts"],
                   None if target is None else MixedTarget.from_json(target))


@dataclass(frozen=True)
class BuildReport:
    """Counts of a MixSD build.

    Attributes:
        n_records: records given.
        n_correct_first_try: passed on the first attempt.
        n_correct_after_retry: passed on a later attempt.
        n_failed: never passed (then ``on_failure`` applied).
        on_failure: the policy applied to the failures.
        n_targets: targets returned (``n_records`` minus dropped failures).
        n_attempts: attempts made in total.
        generated_tokens: tokens decoded in this call, over all attempts (0 for records
            resumed from a progress file).
        seconds: wall time of this call.
    """

    n_records: int
    n_correct_first_try: int
    n_correct_after_retry: int
    n_failed: int
    on_failure: str
    n_targets: int
    n_attempts: int
    generated_tokens: int = 0
    seconds: float = 0.0

    @classmethod
    def from_outcomes(cls, outcomes: Sequence[Outcome], on_failure: str,
                      generated_tokens: int = 0, seconds: float = 0.0) -> BuildReport:
        return cls(n_records=len(outcomes),
                   n_correct_first_try=sum(o.passed and o.attempts == 1 for o in outcomes),
                   n_correct_after_retry=sum(o.passed and o.attempts > 1 for o in outcomes),
                   n_failed=sum(not o.passed for o in outcomes), on_failure=on_failure,
                   n_targets=sum(o.target is not None for o in outcomes),
                   n_attempts=sum(o.attempts for o in outcomes),
                   generated_tokens=generated_tokens, seconds=seconds)


class MixedTargets(list):
    """``list[MixedTarget]`` in record order, with the build's :class:`BuildReport` as
    ``.report``."""

    report: BuildReport

    def __init__(self, targets: Sequence[MixedTarget], report: BuildReport):
        super().__init__(targets)
        self.report = report


def _check_records(records: Sequence[Record]) -> None:
    if not records:
        raise ValueError("build_targets: records is empty; nothing to build")
    seen: set[str] = set()
    for index, record in enumerate(records):
        if not isinstance(record, Record):
            raise ValueError(f"records[{index}] is {type(record).__name__}, not a Record")
        if record.id in seen:
            raise ValueError(f"records[{index}]: duplicate record id {record.id!r} (ids seed "
                             "the coins, so they must be unique)")
        seen.add(record.id)


def _check_lengths(model, tokenizer, records: Sequence[Record], config: MixConfig) -> None:
    """Refuse a record whose canonical prompt + target, or whose expert prompt, does not fit
    the model's context (before any decoding)."""
    context = context_length(model, tokenizer)
    if context is None:
        return
    check_context(((record_label(r), len(encode(tokenizer, r.prompt, r.target).input_ids))
                   for r in records), context)
    check_context(((record_label(r), len(encode(tokenizer, expert_prompt(
        r.prompt, r.expert_context, config.guidance)).input_ids)) for r in records), context,
        "the expert prompt")


def _apply_policy(tokenizer, record: Record, result, on_failure: str) -> MixedTarget | None:
    def target(token_ids, mask, text, fallback=False):
        fraction = sum(mask) / len(mask) if mask else 0.0
        return MixedTarget(record.id, text, list(token_ids), result.correct, result.attempts,
                           fraction, list(mask), fallback)

    if result.correct or on_failure == "keep":
        return target(result.token_ids, result.branch_mask, result.text)
    if on_failure == "canonical":
        ids = encode(tokenizer, record.prompt, record.target).completion_ids
        return target(ids, [True] * len(ids), record.target, fallback=True)
    return None


def build_targets(model, tokenizer, records: Sequence[Record], config: MixConfig | None = None,
                  *, on_finished: Callable[[list[Outcome]], None] | None = None) -> MixedTargets:
    """Build one MixSD target per record (see the module docstring for the method).

    Args:
        model: the frozen base model (its weights are not changed).
        tokenizer: its tokenizer; must define an end token.
        records: the records; ids must be unique.
        config: a :class:`MixConfig`; default ``MixConfig()``.
        on_finished: called with the :class:`Outcome` of records as they finish (in finishing
            order, not record order); used for resumable progress files.

    Returns:
        :class:`MixedTargets`: the targets in record order (records dropped by
        ``on_failure="drop"`` are omitted) and ``.report``, a :class:`BuildReport`.

    Raises:
        ValueError: empty records, duplicate ids, or a tokenizer without an end token.
    """
    config = config or MixConfig()
    _check_records(records)
    _check_lengths(model, tokenizer, records, config)
    started = time.perf_counter()
    decoder = MixedDecoder(model, tokenizer, config)
    outcomes: list[Outcome | None] = [None] * len(records)
    for results in decoder.run(records):
        done = []
        for result in results:
            record = records[result.index]
            target = _apply_policy(tokenizer, record, result, config.on_failure)
            outcome = Outcome(result.index, record.id, result.correct, result.attempts, target)
            outcomes[result.index] = outcome
            done.append(outcome)
        if on_finished is not None:
            on_finished(done)
    report = BuildReport.from_outcomes(outcomes, config.on_failure, decoder.generated_tokens,
                                       time.perf_counter() - started)
    _log_report(report)
    return MixedTargets([o.target for o in outcomes if o.target is not None], report)


def _log_report(report: BuildReport) -> None:
    logger.info("MixSD: %d records, %d correct first try, %d after retry, %d failed (%s); "
                "%d targets, %d tokens in %.1fs", report.n_records, report.n_correct_first_try,
                report.n_correct_after_retry, report.n_failed, report.on_failure,
                report.n_targets, report.generated_tokens, report.seconds)


# --- resumable output file ----------------------------------------------------------------------


def progress_path(out: str | os.PathLike) -> Path:
    """The progress log beside ``out`` (deleted once ``out`` is complete)."""
    out = Path(out)
    return out.with_name(out.name + ".progress.jsonl")


def meta_path(out: str | os.PathLike) -> Path:
    """The JSON beside ``out`` holding its key, config and report."""
    out = Path(out)
    return out.with_name(out.name + ".meta.json")


def build_target_file(model, tokenizer, records: Sequence[Record], config: MixConfig,
                      out: str | os.PathLike, *,
                      on_finished: Callable[[list[Outcome]], None] | None = None,
                      ) -> BuildReport:
    """Build targets into the JSONL file ``out`` (one :meth:`MixedTarget.to_json` per line, in
    record order), resumably.

    Finished records are appended to ``<out>.progress.jsonl`` as they finish; a rerun with the
    same model, records and config (``batch_size`` may differ) skips them, so an interrupted
    run neither repeats nor loses records. ``out`` is written atomically once every record is
    done, with ``<out>.meta.json`` (key, config, report); the progress log is then removed. If
    ``out`` already holds the result for the same key, nothing is recomputed.

    Returns:
        The :class:`BuildReport` over all records (tokens and seconds of this call only).

    Raises:
        ValueError: as :func:`build_targets`; or a progress log written for another model,
            records or config (delete it, or choose another ``out``).
    """
    _check_records(records)
    checked_end_tokens(tokenizer, model)
    out = Path(out)
    key = stable_hash(model_hash(model), records_hash(records), config.output_key())
    meta, progress = meta_path(out), progress_path(out)
    if out.exists() and meta.exists():
        with contextlib.suppress(ValueError):
            saved = json.loads(meta.read_text(encoding="utf-8"))
            if saved.get("key") == key:
                logger.info("%s is up to date (key %s); nothing to do", out, key)
                return BuildReport(**saved["report"])
    done: dict[int, Outcome] = {}
    if progress.exists():
        rows = read_jsonl(progress, tolerate_torn_tail=True)
        if not rows or rows[0].get("key") != key:
            raise ValueError(
                f"{progress} was written for another model, record set or config (key "
                f"{rows[0].get('key') if rows else None!r}, now {key!r}); delete it to start over")
        for row in rows[1:]:
            outcome = Outcome.from_json(row)
            if not (0 <= outcome.index < len(records)
                    and records[outcome.index].id == outcome.record_id):
                raise ValueError(f"{progress}: record {outcome.record_id!r} at index "
                                 f"{outcome.index} does not match the records given")
            done[outcome.index] = outcome
        atomic_write_jsonl(progress, [rows[0], *(o.to_json() for o in done.values())])
        logger.info("resuming %s: %d of %d records already done", out, len(done), len(records))
    else:
        atomic_write_jsonl(progress, [{"key": key}])

    todo = [i for i in range(len(records)) if i not in done]
    tokens, started = 0, time.perf_counter()
    if todo:
        subset = [records[i] for i in todo]

        def record_progress(outcomes: list[Outcome]) -> None:
            moved = [Outcome(todo[o.index], o.record_id, o.passed, o.attempts, o.target)
                     for o in outcomes]
            append_jsonl(progress, [o.to_json() for o in moved])
            done.update((o.index, o) for o in moved)
            if on_finished is not None:
                on_finished(moved)

        tokens = build_targets(model, tokenizer, subset, config,
                               on_finished=record_progress).report.generated_tokens
    outcomes = [done[i] for i in range(len(records))]
    report = BuildReport.from_outcomes(outcomes, config.on_failure, tokens,
                                       time.perf_counter() - started)
    atomic_write_jsonl(out, [o.target.to_json() for o in outcomes if o.target is not None])
    atomic_write_json(meta, {"key": key, "config": asdict(config), "report": asdict(report)},
                      indent=None)
    with contextlib.suppress(FileNotFoundError):
        progress.unlink()
    return report


# --- command line -------------------------------------------------------------------------------


@dataclass
class BuildConfig:
    """``python -m forgetkit.mixsd``: build MixSD targets into a resumable JSONL file."""

    records: str = field(default="kgfact", metadata={
        "help": "records: a built-in set name or a JSONL path"})
    out: str = field(default="targets.jsonl", metadata={
        "help": "output JSONL of MixedTarget rows (with <out>.meta.json beside it)"})
    format: OutputFormat = field(default="forgetkit", metadata={
        "help": "forgetkit: MixedTarget rows; trl: TRL prompt-completion rows that "
                "datasets.load_dataset('json', ...) and trl.SFTTrainer read as they are (the "
                "resumable MixedTarget file then goes to <out>.mixsd.jsonl)"})
    model: str = field(default="toyworld", metadata={
        "help": "base model: a built-in name, local folder, .gguf file or adapter folder"})
    dtype: str | None = field(default=None, metadata={"help": "bf16, float32, ...; default float32"})
    device: str | None = field(default=None, metadata={"help": "default: cuda if available"})
    mix: MixConfig = field(default_factory=MixConfig, metadata={
        "help": "MixSD settings (the MixConfig options: --lam 0.3 or --mix.lam 0.3; a mapping "
                "is read as one)"})

    def __post_init__(self):
        if isinstance(self.mix, Mapping):
            self.mix = MixConfig(**self.mix)
        resolve_dtype(self.dtype)
        resolve_device(self.device)
        if self.format not in _OUTPUT_FORMATS:
            raise ValueError(f"format={self.format!r} must be one of {_OUTPUT_FORMATS}")

    @property
    def targets_out(self) -> Path:
        """Where the resumable MixedTarget file goes: ``out`` itself, or beside a TRL file."""
        return Path(self.out if self.format == "forgetkit" else self.out + ".mixsd.jsonl")


def run(config: BuildConfig, *, model=None, tokenizer=None,
        records: Sequence[Record] | None = None) -> BuildReport:
    """Build the target file of ``config`` (:func:`build_target_file` into
    ``config.targets_out``; with ``format="trl"`` also the TRL rows of
    :func:`forgetkit.mixsd.trl_format.trl_rows` into ``config.out``).

    Args:
        config: what to build.
        model, tokenizer: the base model (given together) instead of loading ``config.model``.
        records: the records instead of loading ``config.records``.

    Raises:
        ValueError: a model without its tokenizer; as :func:`build_target_file`.
    """
    if (model is None) != (tokenizer is None):
        raise ValueError("run: pass model and tokenizer together (or neither)")
    for path in {config.out, config.targets_out, meta_path(config.targets_out)}:
        check_writable(path, "--out", folder=False)
    records = load_records(config.records) if records is None else list(records)
    if model is None:
        model, tokenizer = load_model(config.model, dtype=config.dtype, device=config.device)
    report = build_target_file(model, tokenizer, records, config.mix, config.targets_out)
    if config.format == "trl":
        from forgetkit.mixsd.trl_format import trl_rows, write_trl_jsonl

        targets = [MixedTarget.from_json(row) for row in read_jsonl(config.targets_out)]
        write_trl_jsonl(config.out, trl_rows(targets, records,
                                             conversational=bool(tokenizer.chat_template)))
    return report


@command_line
def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``python -m forgetkit.mixsd``: builds the file, prints the report."""
    config, _ = parse_cli((BuildConfig, MixConfig), argv, "python -m forgetkit.mixsd",
                          doc=BuildConfig.__doc__)
    report = run(config)
    print(f"wrote {config.out}: " + ", ".join(f"{k}={v}" for k, v in asdict(report).items()))
