"""NLL of supervision targets under a model, and the comparison of target sets.

MixSD's claim 2: its targets have much lower per-token NLL under the base model than the
canonical SFT targets. :func:`target_nll` measures the NLL of any targets, :func:`compare_targets`
turns several target sets into one table with bootstrap CIs, and ``python -m forgetkit.nll``
does both for SFT and MixSD at several lambdas, writing the table and the figures.

Which tokens count: exactly the completion tokens of :func:`forgetkit.models.encode` (the reply,
ending with the end token), scored by :func:`forgetkit.diagnostics.loglik.model_logprobs`:
``nll[t] = -log p(y_t | prompt, y_<t)`` in nats, teacher-forced, computed in at least float32.

Example:
    >>> model, tokenizer = load_model("toyworld")  # doctest: +SKIP
    >>> sft = target_nll(model, tokenizer, load_records("kgfact"))  # doctest: +SKIP
    >>> sft.sequence_mean.mean()  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
import yaml

from forgetkit.cli_config import command_line, config_to_dict, parse_cli
from forgetkit.cli_config import help_metadata as _help
from forgetkit.data.records import Record, load_records
from forgetkit.diagnostics.loglik import model_logprobs
from forgetkit.files import atomic_write, atomic_write_json, check_writable, json_rows, write_figure
from forgetkit.mixsd import MixConfig, build_targets
from forgetkit.models import (
    Encoding,
    check_context,
    collate,
    context_length,
    encode,
    eval_mode,
    load_model,
    resolve_device,
    resolve_dtype,
)

__all__ = ["NLLConfig", "TargetNLL", "compare_targets", "main", "run", "sequence_frame",
           "target_nll", "token_frame"]

logger = logging.getLogger(__name__)

VOCAB_SLACK = 128  # embedding rows allowed beyond len(tokenizer) (or 1% of rows): HF pads them


@dataclass(frozen=True)
class TargetNLL:
    """Per-token NLL of a set of targets.

    Attributes:
        ids: one id per item (record id, or the item's index for (prompt, completion) pairs).
        per_token: one (L_i,) float64 array per item: NLL in nats of each completion token, in
            order, the end token included.
        tokens: one list of L_i token strings per item (each token decoded on its own).
        branch_mask: for MixSD targets, one (L_i,) bool array per item (True = the token came
            from the expert conditional), ``None`` for items without one; ``None`` when no item
            has one.
    """

    ids: list[str]
    per_token: list[np.ndarray]
    tokens: list[list[str]]
    branch_mask: list[np.ndarray | None] | None = None

    def __post_init__(self):
        masks = self.branch_mask or [None] * len(self.ids)
        ok = len(self.ids) == len(self.per_token) == len(self.tokens) == len(masks) and all(
            len(n) == len(t) and (m is None or len(m) == len(n))
            for n, t, m in zip(self.per_token, self.tokens, masks, strict=True))
        if not ok:
            raise ValueError("TargetNLL: ids, per_token, tokens and branch_mask differ in length")

    @property
    def lengths(self) -> np.ndarray:
        """(N,) number of scored tokens per item."""
        return np.array([len(nll) for nll in self.per_token], dtype=np.int64)

    @property
    def sequence_sum(self) -> np.ndarray:
        """(N,) sequence NLL: the sum of ``per_token`` per item (= -log p(completion | prompt))."""
        return np.array([nll.sum() for nll in self.per_token], dtype=np.float64)

    @property
    def sequence_mean(self) -> np.ndarray:
        """(N,) mean per-token NLL of each item."""
        return self.sequence_sum / self.lengths

    def to_frame(self) -> pd.DataFrame:
        """Tidy table, one row per scored token.

        Columns: ``item`` (id), ``position`` (0-based within the completion), ``token``, ``nll``,
        ``branch`` (``"expert"``/``"naive"`` for MixSD tokens, else missing).
        """
        masks = self.branch_mask or [None] * len(self.ids)
        rows = []
        for item, nll, toks, mask in zip(self.ids, self.per_token, self.tokens, masks, strict=True):
            branch = ([None] * len(nll) if mask is None
                      else np.where(mask, "expert", "naive").tolist())
            rows.append(pd.DataFrame({"item": item, "position": np.arange(len(nll)),
                                      "token": toks, "nll": nll, "branch": branch}))
        return pd.concat(rows, ignore_index=True)


def token_frame(results: Mapping[str, TargetNLL]) -> pd.DataFrame:
    """The :meth:`TargetNLL.to_frame` of each set, stacked, with a first column ``target_set``."""
    frames = [res.to_frame().assign(target_set=name) for name, res in results.items()]
    frame = pd.concat(frames, ignore_index=True)
    return frame[["target_set", *frame.columns.drop("target_set")]]


def sequence_frame(results: Mapping[str, TargetNLL]) -> pd.DataFrame:
    """Tidy table, one row per item of each set: ``target_set``, ``item``, ``length``,
    ``sequence_nll`` (sum over tokens), ``mean_token_nll``."""
    return pd.DataFrame([
        {"target_set": name, "item": item, "length": int(length), "sequence_nll": total,
         "mean_token_nll": mean}
        for name, res in results.items()
        for item, length, total, mean in zip(res.ids, res.lengths, res.sequence_sum,
                                             res.sequence_mean, strict=True)
    ])


# --- scoring --------------------------------------------------------------------------------


def _is_mixed_target(item: Any) -> bool:
    return hasattr(item, "token_ids") and hasattr(item, "record_id")


def _prepare(tokenizer, index: int, item: Any, records: Mapping[str, Record]):
    """``(id, Encoding, branch_mask | None)`` for one item; raises naming ``items[index]``."""
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], Record):
        record, mixed = item
        if not _is_mixed_target(mixed):
            raise TypeError(f"items[{index}]: a (Record, MixedTarget) pair needs a MixedTarget "
                            f"second, got {type(mixed).__name__}")
        if mixed.record_id != record.id:
            raise ValueError(f"items[{index}]: MixedTarget of record {mixed.record_id!r} paired "
                             f"with record {record.id!r}")
        return _prepare_mixed(tokenizer, index, record, mixed)
    if _is_mixed_target(item):
        if item.record_id not in records:
            raise ValueError(f"items[{index}]: MixedTarget of record {item.record_id!r} but no "
                             "such record in records=; pass records= or (Record, MixedTarget) pairs")
        return _prepare_mixed(tokenizer, index, records[item.record_id], item)
    if isinstance(item, Record):
        item_id, prompt, completion = item.id, item.prompt, item.target
    elif isinstance(item, tuple) and len(item) == 2 and all(isinstance(s, str) for s in item):
        item_id, (prompt, completion) = str(index), item
    else:
        raise TypeError(f"items[{index}]: expected a Record, a MixedTarget, a (Record, "
                        f"MixedTarget) pair or a (prompt, completion) pair of strings; got "
                        f"{type(item).__name__}")
    try:
        encoding = encode(tokenizer, prompt, completion)
    except ValueError as err:
        raise ValueError(f"items[{index}] ({item_id!r}): {err}") from err
    return item_id, encoding, None


def _prepare_mixed(tokenizer, index: int, record: Record, mixed: Any):
    token_ids = [int(t) for t in mixed.token_ids]
    if not token_ids:
        raise ValueError(f"items[{index}] ({mixed.record_id!r}): empty completion: the "
                         "MixedTarget has no token_ids")
    mask = getattr(mixed, "branch_mask", None)
    if mask is not None and len(mask) == 0:
        mask = None
    if mask is not None and len(mask) != len(token_ids):
        raise ValueError(f"items[{index}] ({mixed.record_id!r}): branch_mask has {len(mask)} "
                         f"entries for {len(token_ids)} token_ids")
    prompt_ids = encode(tokenizer, record.prompt).input_ids
    encoding = Encoding.from_ids(prompt_ids, token_ids)
    return record.id, encoding, None if mask is None else np.asarray(mask, dtype=bool)


def _check_inputs(model, tokenizer, ids: list[str], encodings: list[Encoding]) -> None:
    rows = model.get_input_embeddings().num_embeddings
    size = len(tokenizer)
    if size > rows or rows - size > max(VOCAB_SLACK, rows // 100):
        raise ValueError(f"tokenizer has {size} tokens but the model has {rows} embedding rows: "
                         "the tokenizer does not belong to this model")
    for index, (item_id, enc) in enumerate(zip(ids, encodings, strict=True)):
        where = f"items[{index}] ({item_id!r})"
        if enc.prompt_length < 1:
            raise ValueError(f"{where}: empty prompt: the first completion token has no context")
        bad = [t for t in enc.input_ids if not 0 <= t < rows]
        if bad:
            raise ValueError(f"{where}: token id {bad[0]} outside the model's vocabulary "
                             f"(0..{rows - 1}): mismatched tokenizer or token_ids")
    check_context(((f"items[{index}] ({item_id!r})", len(enc.input_ids))
                   for index, (item_id, enc) in enumerate(zip(ids, encodings, strict=True))),
                  context_length(model))


def target_nll(model, tokenizer, items: Sequence[Any], batch_size: int = 16,
               padding_side: Literal["left", "right"] = "right",
               records: Mapping[str, Record] | Sequence[Record] | None = None) -> TargetNLL:
    """Per-token NLL of each item's completion under ``model`` (teacher-forced, no grad).

    Items, one kind or mixed:
      - a :class:`~forgetkit.data.records.Record`: its canonical target given its prompt, encoded by
        :func:`~forgetkit.models.encode` (the end token is appended and scored);
      - a MixedTarget (anything with ``record_id``, ``token_ids`` and optionally
        ``branch_mask``), either paired as ``(record, mixed_target)`` or looked up by
        ``record_id`` in ``records=``: its exact ``token_ids`` (as generated; they end with the
        end token only when one was generated) after ``encode(tokenizer, record.prompt)``, the
        naive prompt MixSD trains on;
      - a ``(prompt, completion)`` pair of strings, encoded like a record; its id is its index.

    Items are sorted by length into batches of ``batch_size`` (memory is bounded by the longest
    batch) and returned in input order; positions come from :func:`~forgetkit.models.collate`,
    so the numbers do not depend on batch size or padding side (up to float rounding).

    Args:
        model: a causal LM (any device and dtype; log-probs are computed in >= float32).
        tokenizer: the model's tokenizer.
        items: the targets to score.
        batch_size: items per forward pass.
        padding_side: ``"left"`` or ``"right"``.
        records: records by id (a mapping, or a sequence indexed by ``id``), for bare MixedTargets.

    Returns:
        A :class:`TargetNLL` in item order.

    Raises:
        ValueError: no items, an empty completion, a completion longer than the model's context
            (never truncated), a token id outside the model's vocabulary, a tokenizer larger than
            the model's embedding, or smaller by more than ``max(VOCAB_SLACK, 1%)`` rows (the
            padding HF models add), a bad ``batch_size``; item errors name ``items[i]`` and its id.
        TypeError: an item of an unsupported kind.
    """
    if not items:
        raise ValueError("target_nll: items is empty")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if records is not None and not isinstance(records, Mapping):
        records = {record.id: record for record in records}
    prepared = [_prepare(tokenizer, i, item, records or {}) for i, item in enumerate(items)]
    ids, encodings, masks = (list(column) for column in zip(*prepared, strict=True))
    _check_inputs(model, tokenizer, ids, encodings)
    per_token = _score(model, encodings, tokenizer.pad_token_id or 0, batch_size, padding_side)
    tokens = [[tokenizer.decode([t]) for t in enc.completion_ids] for enc in encodings]
    has_mask = any(mask is not None for mask in masks)
    return TargetNLL(ids, per_token, tokens, masks if has_mask else None)


@torch.no_grad()
def _score(model, encodings: list[Encoding], pad_token_id: int, batch_size: int,
           padding_side: str) -> list[np.ndarray]:
    device = next(model.parameters()).device
    order = sorted(range(len(encodings)), key=lambda i: len(encodings[i].input_ids))
    per_token: list[np.ndarray] = [np.empty(0)] * len(encodings)
    with eval_mode(model):
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            batch = collate([encodings[i] for i in rows], pad_token_id, padding_side, device)
            logp, mask = model_logprobs(model, batch)  # (B, T-1) each
            for b, i in enumerate(rows):
                per_token[i] = (-logp[b][mask[b]]).double().cpu().numpy()  # (L_i,)
    return per_token


# --- comparison -----------------------------------------------------------------------------


def _delta_ci(res: TargetNLL, ref: TargetNLL, n_boot: int, seed: int,
              confidence: float) -> tuple[float, float, float, int]:
    """Mean per-item NLL of ``res`` minus that of ``ref``, percentile CI, and how many items
    were paired (0: unpaired)."""
    ref_ids = set(ref.ids)
    shared = [item for item in res.ids if item in ref_ids]
    unique = len(set(res.ids)) == len(res.ids) and len(ref_ids) == len(ref.ids)
    x, y = res.sequence_mean, ref.sequence_mean
    n_paired = len(shared) if unique and len(shared) >= 2 else 0
    if n_paired:  # the items both sets hold, in res's order
        mine = {item: k for k, item in enumerate(res.ids)}
        theirs = {item: k for k, item in enumerate(ref.ids)}
        x = x[[mine[item] for item in shared]]
        y = y[[theirs[item] for item in shared]]
    delta = float(x.mean() - y.mean())
    if min(len(x), len(y)) < 2:
        return delta, float("nan"), float("nan"), n_paired
    from scipy import stats  # imported here: scipy.stats alone takes a second to import

    boot = stats.bootstrap((x, y), lambda a, b, axis: a.mean(axis) - b.mean(axis),
                           n_resamples=n_boot, paired=bool(n_paired), vectorized=True,
                           confidence_level=confidence, method="percentile",
                           rng=np.random.default_rng(seed))
    low, high = boot.confidence_interval
    return delta, float(low), float(high), n_paired


def compare_targets(results: Mapping[str, TargetNLL], reference: str | None = None,
                    n_boot: int = 2000, seed: int = 0, confidence: float = 0.95) -> pd.DataFrame:
    """One row per target set: NLL summaries and the difference to a reference set.

    The difference compares the per-item mean per-token NLL (``TargetNLL.sequence_mean``).
    It is paired by item id over the items both sets hold (a bootstrap of the per-item
    differences), so a set whose failed targets were dropped is compared with the reference on
    the same records; when the sets share fewer than 2 (unique) ids it is unpaired (items
    resampled independently in each set). The CI is a percentile bootstrap
    (:func:`scipy.stats.bootstrap`) seeded with ``seed`` for every set; it is NaN for the
    reference row and for sets of fewer than 2 items.

    Args:
        results: target-set name -> :class:`TargetNLL`, in display order.
        reference: the set to compare against; default the first.
        n_boot: bootstrap resamples.
        seed: bootstrap seed.
        confidence: CI level.

    Returns:
        Columns ``target_set``, ``n_items``, ``n_tokens``, ``token_nll_mean`` and
        ``token_nll_median`` (over all tokens pooled), ``item_nll_mean`` (mean over items of the
        per-token mean), ``sequence_nll_mean`` (mean over items of the sum), ``length_mean``,
        ``reference``, ``delta_item_nll``, ``ci_low``, ``ci_high``, ``paired`` and
        ``n_paired`` (items in the paired difference; 0 when unpaired).

    Raises:
        ValueError: no results, an unknown ``reference``, a bad ``n_boot`` or ``confidence``.
    """
    if not results:
        raise ValueError("compare_targets: results is empty")
    reference = next(iter(results)) if reference is None else reference
    if reference not in results:
        raise ValueError(f"reference {reference!r} is not among the target sets {list(results)}")
    if n_boot < 1 or not 0 < confidence < 1:
        raise ValueError(f"need n_boot >= 1 and 0 < confidence < 1, got {n_boot}, {confidence}")
    ref = results[reference]
    rows = []
    for name, res in results.items():
        pooled = np.concatenate(res.per_token)
        if name == reference:
            delta, low, high, n_paired = 0.0, float("nan"), float("nan"), len(res.ids)
        else:
            delta, low, high, n_paired = _delta_ci(res, ref, n_boot, seed, confidence)
        rows.append({
            "target_set": name, "n_items": len(res.ids), "n_tokens": len(pooled),
            "token_nll_mean": pooled.mean(), "token_nll_median": float(np.median(pooled)),
            "item_nll_mean": res.sequence_mean.mean(), "sequence_nll_mean": res.sequence_sum.mean(),
            "length_mean": res.lengths.mean(), "reference": reference, "delta_item_nll": delta,
            "ci_low": low, "ci_high": high, "paired": n_paired > 0, "n_paired": n_paired,
        })
    return pd.DataFrame(rows)


# --- command line ---------------------------------------------------------------------------


@dataclass
class NLLConfig:
    """``python -m forgetkit.nll``: NLL of SFT and MixSD targets under a base model."""

    model: str = field(default="toyworld", metadata=_help(
        "base model: built-in name, local folder, .gguf file or adapter folder"))
    records: str = field(default="kgfact", metadata=_help("records: built-in name or JSONL path"))
    lam: list[float] = field(default_factory=lambda: [0.0, 0.3, 0.5], metadata=_help(
        "MixSD lambdas, one target set each (--lam 0 0.3 0.5)"))
    out: str = field(default="nll", metadata=_help("output folder"))
    limit: int | None = field(default=None, metadata=_help("use only the first N records"))
    batch_size: int = field(default=16, metadata=_help("items per scoring forward pass"))
    padding_side: Literal["left", "right"] = field(default="right", metadata=_help(
        "padding side of scoring batches"))
    device: str | None = field(default=None, metadata=_help("default: cuda if available"))
    dtype: str | None = field(default=None, metadata=_help("bf16, float32, ...; default float32"))
    n_boot: int = field(default=2000, metadata=_help("bootstrap resamples of the CIs"))
    boot_seed: int = field(default=0, metadata=_help("bootstrap seed"))
    example: str | None = field(default=None, metadata=_help(
        "record id drawn in the token heat strip; default the first record"))
    mix: MixConfig = field(default_factory=MixConfig, metadata=_help(
        "MixSD target settings (the MixConfig options; a mapping is read as one); its lam is "
        "set by each of lam"))

    def __post_init__(self):
        if isinstance(self.mix, Mapping):
            self.mix = MixConfig(**self.mix)
        self.lam = [float(lam) for lam in self.lam]
        checks = {"lam": all(0 <= lam <= 1 for lam in self.lam), "n_boot": self.n_boot >= 1,
                  "limit": self.limit is None or self.limit >= 1, "batch_size": self.batch_size >= 1,
                  "padding_side": self.padding_side in ("left", "right")}
        bad = [f"{name}={getattr(self, name)!r}" for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"NLLConfig: invalid {', '.join(bad)} (see --help)")
        resolve_dtype(self.dtype)
        resolve_device(self.device)


def run(config: NLLConfig, *, model=None, tokenizer=None,
        records: Sequence[Record] | None = None) -> pd.DataFrame:
    """Score SFT and MixSD targets (one set per lambda) and write everything under ``config.out``.

    Writes ``nll_config.yaml`` (reload with ``--config``), ``nll_table.csv``/``.json``
    (:func:`compare_targets`), ``tokens.csv`` (:func:`token_frame`), ``sequences.csv``
    (:func:`sequence_frame`), ``mixsd_reports.json`` and one PNG per figure of
    :mod:`forgetkit.plots`. Returns the table.

    Args:
        config: what to score and where to write.
        model, tokenizer: the base model (given together) instead of loading ``config.model``.
        records: the records instead of loading ``config.records`` (``config.limit`` applies
            to both).
    """
    if (model is None) != (tokenizer is None):
        raise ValueError("run: pass model and tokenizer together (or neither)")
    check_writable(config.out, "--out")
    records = (load_records(config.records) if records is None else list(records))[: config.limit]
    if model is None:  # after the cheap checks
        model, tokenizer = load_model(config.model, dtype=config.dtype, device=config.device)
    example = config.example or records[0].id
    if example not in {record.id for record in records}:
        raise ValueError(f"example={example!r} is not among the records used")
    score = {"batch_size": config.batch_size, "padding_side": config.padding_side}
    results = {"SFT": target_nll(model, tokenizer, records, **score)}
    reports = {}
    for lam in config.lam:
        name = f"MixSD lam={lam:g}"
        targets = build_targets(model, tokenizer, records, replace(config.mix, lam=lam))
        reports[name] = asdict(targets.report)
        results[name] = target_nll(model, tokenizer, targets, records=records, **score)
    table = compare_targets(results, reference="SFT", n_boot=config.n_boot, seed=config.boot_seed)
    _write_outputs(Path(config.out), config, results, table, reports, example)
    return table


def _write_outputs(out: Path, config: NLLConfig, results: dict[str, TargetNLL],
                   table: pd.DataFrame, reports: dict[str, Any], example: str) -> None:
    saved = config_to_dict(config)
    del saved["mix"]["lam"]  # each target set has its own, from config.lam
    with atomic_write(out / "nll_config.yaml") as handle:
        yaml.safe_dump(saved, handle, sort_keys=False)
    tokens, sequences = token_frame(results), sequence_frame(results)
    for name, frame in {"nll_table.csv": table, "tokens.csv": tokens,
                        "sequences.csv": sequences}.items():
        with atomic_write(out / name) as handle:
            frame.to_csv(handle, index=False)
    atomic_write_json(out / "nll_table.json", json_rows(table))
    atomic_write_json(out / "mixsd_reports.json", reports)

    write_figures(out, tokens, sequences, example)
    logger.info("wrote %s", out)


def write_figures(out: Path, tokens: pd.DataFrame, sequences: pd.DataFrame,
                  example: str) -> None:
    """Save the four NLL figures as PNGs in ``out`` (each written atomically).

    Args:
        out: the folder.
        tokens: :func:`token_frame` of the results.
        sequences: :func:`sequence_frame` of the results.
        example: item id shown in the token heat strip.
    """
    from matplotlib.figure import Figure

    from forgetkit import plots

    shown = tokens[tokens["item"] == example]
    rows = sum(-(-n // 16) + 1 for n in shown.groupby("target_set").size())
    figures = {
        "token_nll_ecdf.png": (plots.token_nll_ecdf, tokens, (6.4, 4.2)),
        "nll_by_position.png": (plots.nll_by_position, tokens, (6.4, 4.2)),
        "sequence_nll_vs_length.png": (plots.sequence_nll_vs_length, sequences, (6.4, 4.2)),
        "token_heat_strip.png": (plots.token_heat_strip, shown, (12.0, 1.2 + 0.45 * rows)),
    }
    for name, (plot, data, size) in figures.items():
        fig = Figure(figsize=size, layout="constrained")
        plot(data, fig.subplots())
        write_figure(out / name, fig, dpi=150)


@command_line
def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``python -m forgetkit.nll``: runs, then prints the table."""
    config, _ = parse_cli((NLLConfig, MixConfig), argv, "python -m forgetkit.nll",
                          doc=__doc__, omit={"mix.lam"})
    table = run(config)
    with pd.option_context("display.width", 250, "display.max_columns", None):
        print(table.to_string(index=False, float_format="{:.3f}".format))
