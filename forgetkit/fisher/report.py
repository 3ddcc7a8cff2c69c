"""The main job: how far did each fine-tune move along the base model's Fisher-sensitive
directions, what damage does that predict, and what damage was measured.

:func:`run_report` is what ``python -m forgetkit.fisher`` and the notebooks call. With no
fine-tunes given it trains quick SFT and MixSD fine-tunes of the base on the records first
(cached in ``out/finetunes/``, reused when their config is unchanged).
"""

from __future__ import annotations

import itertools
import logging
import math
import re
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from forgetkit.cli_config import help_metadata as _help
from forgetkit.data.answers import warn_unanswered
from forgetkit.data.records import load_probes, load_records
from forgetkit.fisher.delta import ParamDelta, module_groups
from forgetkit.fisher.delta import delta as param_delta
from forgetkit.fisher.diagonal import diagonal
from forgetkit.fisher.exact import displacement
from forgetkit.fisher.io import FisherMatrix
from forgetkit.fisher.kfac import kfac, linear_layers
from forgetkit.fisher.kl import kl_path, measured_kl
from forgetkit.fisher.low_rank import low_rank
from forgetkit.fisher.project import project
from forgetkit.fisher.risk import forgetting_risk
from forgetkit.models import resolve_device, resolve_dtype
from forgetkit.stats import mean_ci, ratio_ci

__all__ = ["REPORT_SECTIONS", "ReportConfig", "run_report", "spread_sample"]

logger = logging.getLogger(__name__)

REPRESENTATIONS = ("low_rank", "kfac", "diagonal", "auto")
REPORT_SECTIONS = ("config", "base", "fisher", "finetunes", "comparisons", "risk", "warnings",
                   "timing")


@dataclass
class ReportConfig:
    """Configuration of ``python -m forgetkit.fisher``."""

    base: str = field(default="toyworld", metadata=_help("base model (name or path)"))
    finetuned: list[str] = field(default_factory=list, metadata=_help(
        "fine-tunes as NAME=PATH ... (full checkpoints or PEFT adapters; repeatable); none: "
        "train quick SFT and MixSD fine-tunes of the base on --records"))
    records: str = field(default="kgfact", metadata=_help("injected records (name or file)"))
    probes: str | None = field(default=None, metadata=_help(
        "retention probes (name or file); default: 'toyworld' for toyworld, else 'general'"))
    representation: str = field(default="low_rank", metadata=_help(
        "the Fisher whose top-k directions, projections, captured energy and risk are reported: "
        "low_rank | kfac (Kronecker-factored EK-FAC per linear layer, diagonal elsewhere) | "
        "diagonal | auto (the most accurate of these whose predicted peak memory times 1.25 "
        "fits the device's free memory; see --plan)"))
    rank: int = field(default=16, metadata=_help("number of top Fisher directions"))
    low_rank_method: str = field(default="exact", metadata=_help(
        "top directions from: exact (Lanczos on exact Fisher-vector products, no label draws) | "
        "gram | randomized (per-example gradients at drawn labels)"))
    spread_seeds: int = field(default=4, metadata=_help(
        "seeds (seed, seed+1, ...) the report's Fisher (--representation) is computed with, to "
        "report the spread of the top-k displacement across them (1: no spread; each exact "
        "low-rank Fisher costs about 45 Fisher-vector products: lower it for large models)"))
    kl_path: list[float] = field(default_factory=lambda: [0.1, 0.25, 0.5, 0.75, 1.0],
                                 metadata=_help("steps t of the measured KL(base || base + t Δθ)"))
    estimator: str = field(default="true", metadata=_help("Fisher estimator: true | empirical"))
    mc_samples: int = field(default=1, metadata=_help("label draws per probe (true Fisher)"))
    params: str | None = field(default=None, metadata=_help(
        "regex on parameter names: only these enter the Fisher and the update (e.g. 'mlp')"))
    fisher_batch_size: int = field(default=8, metadata=_help(
        "examples per per-example-gradient batch (lower it for large models)"))
    exact_batch_size: int = field(default=32, metadata=_help(
        "probes per forward-mode product of the exact d'Fd and Fisher-vector products"))
    per_module: bool = field(default=False, metadata=_help(
        "also the exact d'Fd of the update restricted to each module (one product per module)"))
    n_samples: int = field(default=128, metadata=_help(
        "probes used for the Fisher and the measured KL (evenly spread over capabilities)"))
    out: str = field(default="report", metadata=_help("output folder"))
    lam: float = field(default=0.3, metadata=_help("MixSD lambda of the default fine-tune"))
    train_steps: int | None = field(default=None, metadata=_help(
        "steps of each default fine-tune (default: the trainer's epochs)"))
    learning_rate: float | None = field(default=None, metadata=_help(
        "peak learning rate of the default fine-tunes (default: the trainer's)"))
    seed: int = field(default=0, metadata=_help("seed of Fisher sampling and fine-tunes"))
    device: str | None = field(default=None, metadata=_help("cpu | cuda (default: cuda if any)"))
    dtype: str = field(default="float32", metadata=_help("model dtype: float32 | bfloat16"))
    plan: bool = field(default=False, metadata=_help(
        "print the predicted peak memory and passes over the probes of each representation for "
        "--base (its config only), --params, --n_samples, --rank and the batch sizes, then exit "
        "without loading weights"))
    plan_seq_len: int = field(default=64, metadata=_help(
        "typical probe length in tokens that --plan assumes"))

    def __post_init__(self):
        if self.representation not in REPRESENTATIONS:
            raise ValueError(f"--representation must be one of {', '.join(REPRESENTATIONS)}, "
                             f"got {self.representation!r}")
        for name in ("rank", "spread_seeds", "mc_samples", "plan_seq_len", "n_samples",
                     "fisher_batch_size", "exact_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.low_rank_method not in ("exact", "gram", "randomized", "auto"):
            raise ValueError(f"--low_rank_method must be exact, gram, randomized or auto, got "
                             f"{self.low_rank_method!r}")
        if not self.kl_path or any(not 0 < t <= 1 for t in self.kl_path):
            raise ValueError(f"--kl_path needs steps in (0, 1], got {self.kl_path}")
        if self.estimator not in ("true", "empirical"):
            raise ValueError(f"--estimator must be 'true' or 'empirical', got {self.estimator!r}")
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"--lam must be in [0, 1], got {self.lam}")
        for item in self.finetuned:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise ValueError(f"--finetuned expects NAME=PATH, got {item!r}")
        if self.train_steps is not None and self.train_steps < 1:
            raise ValueError(f"--train_steps must be >= 1 (or none for the trainer's default), "
                             f"got {self.train_steps}")
        if self.learning_rate is not None and not (math.isfinite(self.learning_rate)
                                                   and self.learning_rate > 0):
            raise ValueError(f"--learning_rate must be a number > 0, got {self.learning_rate}")
        if self.params is not None:
            try:
                re.compile(self.params)
            except re.error as err:
                raise ValueError(f"--params {self.params!r} is not a valid regular expression: "
                                 f"{err.msg} at position {err.pos}") from None
        try:
            resolve_dtype(self.dtype)
            resolve_device(self.device)
        except ValueError as err:
            raise ValueError(f"--dtype/--device: {err}") from None

    def finetune_paths(self) -> dict[str, str]:
        return dict(item.split("=", 1) for item in self.finetuned)

    def probe_source(self) -> str:
        return self.probes or ("toyworld" if self.base == "toyworld" else "general")


def spread_sample(probes: list, n: int) -> list:
    """Up to ``n`` probes, round-robin over capabilities in their given order (deterministic)."""
    groups: dict[str, list] = {}
    for probe in probes:
        groups.setdefault(probe.capability, []).append(probe)
    rounds = itertools.zip_longest(*groups.values())
    return [probe for row in rounds for probe in row if probe is not None][:n]


def _default_finetunes(config: ReportConfig, out: Path, progress: bool) -> dict[str, str]:
    """Train (or reuse) quick SFT and MixSD fine-tunes of the base; return name -> path."""
    from forgetkit.mixsd import MixConfig
    from forgetkit.train import TrainConfig, train
    from forgetkit.train.checkpoint import same_config
    from forgetkit.train.config import RUN_CONTROL_FIELDS

    runs = {}
    for name, method in (("SFT", "sft"), (f"MixSD lam={config.lam}", "mixsd")):
        run_dir = out / "finetunes" / method
        overrides = {"max_steps": config.train_steps, "learning_rate": config.learning_rate}
        train_config = TrainConfig(
            method=method, model_name_or_path=config.base, records=config.records,
            probes=config.probe_source(), output_dir=str(run_dir),
            **{k: v for k, v in overrides.items() if v is not None},
            seed=config.seed, do_eval=False, save_steps=0, disable_tqdm=not progress,
            device=config.device, dtype=config.dtype, mix=MixConfig(lam=config.lam,
                                                                    seed=config.seed))
        if ((run_dir / "results.json").exists()
                and same_config(run_dir, train_config, ignore=RUN_CONTROL_FIELDS)):  # same weights
            logger.info("reusing the %s fine-tune in %s", name, run_dir)
        else:
            train_config.overwrite_output_dir = True
            train(train_config)
        runs[name] = str(run_dir)
    return runs


def _load_finetunes(base, paths: dict[str, str], config: ReportConfig):
    """name -> fine-tuned model and name -> its update; raises on a mismatched architecture."""
    from forgetkit.models import load_model

    finetunes = {name: load_model(path, dtype=config.dtype, device=config.device)[0]
                 for name, path in paths.items()}
    deltas = {name: param_delta(base, model, params=config.params)
              for name, model in finetunes.items()}
    return finetunes, deltas


def _fisher(base, tokenizer, sample, config: ReportConfig, rank: int, seed: int,
            deltas: dict[str, ParamDelta]) -> FisherMatrix:
    """The report's Fisher (``config.representation``) of the base on ``sample``."""
    common = dict(estimator=config.estimator, params=config.params, seed=seed)
    sampled = dict(common, mc_samples=config.mc_samples, batch_size=config.fisher_batch_size)
    exact = config.low_rank_method == "exact"
    constructors = {
        "low_rank": lambda: low_rank(
            base, tokenizer, sample, rank=rank, mc_samples=config.mc_samples,
            batch_size=config.exact_batch_size if exact else config.fisher_batch_size,
            method=config.low_rank_method, **common),
        "kfac": lambda: kfac(base, tokenizer, sample, **sampled),
        "diagonal": lambda: diagonal(base, tokenizer, sample, updates=deltas, **sampled),
    }
    return constructors[config.representation]()


def check_representation(model: torch.nn.Module, config: ReportConfig) -> None:
    """Before any work: the chosen representation can be built on ``model``'s parameters.

    Raises:
        ValueError: ``--representation kfac`` with ``--params`` selecting no linear layer.
    """
    if config.representation == "kfac" and not linear_layers(model, config.params):
        raise ValueError(f"--representation kfac: --params {config.params!r} selects no linear "
                         "layer (nn.Linear or Conv1D weight that is not tied to another module); "
                         "choose --params matching one (e.g. 'mlp') or --representation "
                         "low_rank | diagonal")


def _projected(update: ParamDelta, fisher: FisherMatrix, k: int) -> ParamDelta:
    """The update's component in the Fisher's k leading directions, ``sum_j c_j u_j``."""
    return ParamDelta({n: t.float() for n, t in fisher.project(update, k).items()})


def _interval(values, seed: int) -> dict[str, float]:
    ci = mean_ci(values, seed=seed)
    return {"value": ci.value, "low": ci.low, "high": ci.high}


def _top_displacement(update_values: np.ndarray, fishers: list[FisherMatrix], rank: int,
                      spread: list[float], seed: int) -> dict[str, Any]:
    """The exact d'Fd of the update projected onto the Fisher's k leading directions, named
    for what it is: a lower bound of the exact d'Fd only when the directions are exact
    eigenvectors of the exact Fisher (the low-rank Fisher by Lanczos)."""
    fisher = fishers[0]
    bound = fisher.exact_eigendirections
    where = f"the top-{rank} {fisher.kind} directions"
    label = (f"exact d'Fd of the update projected onto {where} (exact eigenvectors): a lower "
             "bound of the exact d'Fd" if bound else
             f"exact d'Fd of the update projected onto {where}: not a bound of the exact d'Fd "
             "(the directions are not eigenvectors of the exact Fisher)")
    return {
        **_interval(update_values, seed), "lower_bound": bound, "label": label,
        "representation": fisher.kind,
        "seeds": [f.provenance.seed for f in fishers], "seed_values": spread,
        "seed_relative_spread": (max(spread) - min(spread)) / (sum(spread) / len(spread))
        if len(spread) > 1 and sum(spread) > 0 else None}


def _finetune_section(base, model, tokenizer, records, probes, sample, update: ParamDelta,
                      fishers: list[FisherMatrix], fisher_diag: FisherMatrix, rank: int,
                      base_scores, proxy, config: ReportConfig, path: str) -> dict[str, Any]:
    from forgetkit.diagnostics.evaluation import (
        accuracy_interval,
        evaluate,
        retention,
        retention_interval,
    )

    seed = config.seed
    exact = displacement(base, tokenizer, sample, update, estimator=config.estimator,
                         batch_size=config.exact_batch_size, params=config.params,
                         per_module=config.per_module, seed=seed)
    kl = measured_kl(base, model, tokenizer, sample)
    lower = displacement(base, tokenizer, sample, _projected(update, fishers[0], rank),
                         estimator=config.estimator, batch_size=config.exact_batch_size,
                         seed=seed)
    projections = [project(update, f, rank=rank) for f in fishers]
    spread = [p.top_displacement for p in projections]
    approximation = fishers[0].quad_form(update)
    path_rows = []
    for t, measured in kl_path(base, update, tokenizer, sample, config.kl_path):
        ci = measured.interval(seed)
        path_rows.append({"t": t, "measured_kl": measured.per_sequence, "low": ci.low,
                          "high": ci.high, "predicted_kl": t * t * exact.predicted_kl,
                          "predicted_low": t * t * exact.ci[0] / 2,
                          "predicted_high": t * t * exact.ci[1] / 2})
    scores = evaluate(model, tokenizer, records, probes)
    memorization = accuracy_interval(scores, "memorization", seed=seed)
    kept = retention_interval(base_scores, scores, seed=seed)
    return {
        "path": path,
        "delta_norm": update.sq_norm() ** 0.5,
        "displacement": exact.to_dict(),
        "measured_kl": kl.to_dict(seed),
        "measured_over_predicted": ratio_ci(kl.per_example, exact.per_probe / 2,
                                            seed=seed).to_dict(),
        "kl_path": path_rows,
        "projection_low_rank": projections[0].to_dict(),
        "low_rank_displacement": _top_displacement(lower.per_probe, fishers, rank, spread, seed),
        "representation_displacement": {
            "representation": fishers[0].kind, "label": fishers[0].quad_form_label,
            "value": approximation, "exact": exact.mean,
            "ratio": approximation / exact.mean if exact.mean > 0 else None},
        "projection_diagonal": project(update, fisher_diag, rank=rank).to_dict(),
        "diagonal_proxy": _interval(proxy, seed),
        "scores": scores.to_dict(),
        "memorization_ci": memorization.to_dict() if memorization else None,
        "retention": retention(base_scores, scores).to_dict(),
        "retention_ci": kept.to_dict() if kept else None,
        "_per_probe": (exact.per_probe, np.asarray(kl.per_example)),
    }


def _comparisons(per_finetune: dict[str, dict[str, Any]], seed: int) -> list[dict[str, Any]]:
    """Every pair of fine-tunes: ratios of exact d'Fd and of measured KL, paired over probes."""
    rows = []
    for a, b in itertools.combinations(per_finetune, 2):
        (da, ka), (db, kb) = per_finetune[a]["_per_probe"], per_finetune[b]["_per_probe"]
        rows.append({"a": a, "b": b, "displacement_ratio": ratio_ci(da, db, seed=seed).to_dict(),
                     "measured_kl_ratio": ratio_ci(ka, kb, seed=seed).to_dict()})
    return rows


class _Warnings(logging.Handler):
    """Collects the warnings forgetkit logs during a report (e.g. a per-example fallback)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(f"{record.name}: {record.getMessage()}")


def run_report(config: ReportConfig, *, base=None, finetunes=None, records=None, probes=None,
               progress: bool = True) -> dict[str, Any]:
    """Compute every number of the report and write ``report.json``, PNGs and ``report.html``.

    The headline is the exact ``d' F d`` of each update (:func:`forgetkit.fisher.displacement`)
    and the predicted KL, half of it, beside the measured KL, each with a 95% bootstrap
    interval over probes; the chosen representation's own ``quad_form`` (``--representation``:
    low-rank, a lower bound; Kronecker-factored, an approximation; diagonal, a proxy) and its
    ratio to the exact value, the exact d'Fd of the update projected onto its top-k directions
    (a lower bound only for the exact low-rank eigenvectors) and the diagonal proxy are
    reported beside them under those names. The sections ``projection_low_rank`` and
    ``low_rank_displacement`` keep their names whatever the representation; each says which
    one it holds.

    Args:
        config: the report's settings; its names label what is given as objects.
        base: ``(model, tokenizer)`` of the base model instead of loading ``config.base``.
        finetunes: name -> fine-tuned model or its path, instead of ``config.finetuned``.
        records: the injected records instead of loading ``config.records`` (then give
            ``finetunes`` too: the default fine-tunes train on ``config.records`` by name).
        probes: the retention probes instead of loading ``config.probes``.
        progress: show the default fine-tunes' progress bars.

    Returns:
        The report (what ``report.json`` holds).

    Raises:
        ValueError: an empty probe set, a fine-tune of another architecture or an adapter of
            another base, records without fine-tunes, before anything is written.
    """
    collector = _Warnings()
    logging.getLogger("forgetkit").addHandler(collector)
    try:
        report = _run_report(config, base, finetunes, records, probes, progress)
    finally:
        logging.getLogger("forgetkit").removeHandler(collector)
    report["warnings"] = collector.messages
    from forgetkit.fisher.render import write_report

    fishers = report.pop("_fishers")
    write_report(report, Path(config.out), {f"fisher_{f.kind}": f.save for f in fishers})
    return report


def resolve_representation(model: torch.nn.Module, tokenizer, sample: list,
                           config: ReportConfig, finetunes: int = 2
                           ) -> tuple[ReportConfig, dict[str, Any]]:
    """Before any Fisher work: the memory plan of ``config`` on ``model`` and ``sample`` (its
    longest probe) against the device's free memory, with ``finetunes`` fine-tuned models and
    their updates held beside it; ``--representation auto`` becomes the most accurate
    representation that fits, a named one is refused if it cannot fit.

    Returns:
        ``config`` with a concrete representation, and the record of the choice (report.json's
        ``fisher.memory``).

    Raises:
        FisherError: the representation (or, for auto, every one) does not fit.
    """
    from forgetkit.fisher.plan import (
        available_memory,
        choose_representation,
        memory_plan,
        probe_lengths,
    )
    from forgetkit.models import encode

    encodings = [encode(tokenizer, p.prompt, p.answer) for p in sample]
    weight = next(model.parameters())
    plan = memory_plan(model, params=config.params, n_samples=len(sample),
                       **probe_lengths(encodings), fisher_batch_size=config.fisher_batch_size,
                       exact_batch_size=config.exact_batch_size,
                       rank=min(config.rank, len(sample) * config.mc_samples),
                       dtype=weight.dtype, mc_samples=config.mc_samples)
    held = finetunes * (plan.weights_bytes + plan.selected * 4)  # each model and its update
    chosen, record = choose_representation(
        plan, available_memory(weight.device), config.representation, config.low_rank_method,
        kfac_possible=bool(linear_layers(model, config.params)), held=held)
    if config.representation == "auto":
        logger.info("--representation auto: %s (predicted peaks %s; %.2f GiB free)", chosen,
                    {r: f"{b / 2**30:.2f} GiB" for r, b in record["predicted_peak_bytes"].items()},
                    record["available_bytes"] / 2**30)
    return replace(config, representation=chosen), record


def _run_report(config: ReportConfig, base, finetunes, records, probes, progress: bool
                ) -> dict[str, Any]:
    from forgetkit.diagnostics.evaluation import evaluate
    from forgetkit.fisher.render import check_report_folder
    from forgetkit.models import load_model

    timing: dict[str, float] = {}
    started = time.time()
    out = Path(config.out)
    check_report_folder(out)
    if base is None:
        base = load_model(config.base, dtype=config.dtype, device=config.device)
    base, tokenizer = base
    check_representation(base, config)
    given = config.finetune_paths() if finetunes is None else dict(finetunes)
    if records is not None and not given:
        raise ValueError("run_report: records given as objects need finetunes= too (the default "
                         "fine-tunes train on config.records by name)")
    records = load_records(config.records) if records is None else list(records)
    warn_unanswered(records, "records")
    probes = load_probes(config.probe_source()) if probes is None else list(probes)
    if not probes:
        raise ValueError(f"probe set {config.probe_source()!r} is empty")
    sample = spread_sample(probes, config.n_samples)
    config, memory = resolve_representation(base, tokenizer, sample, config,
                                            finetunes=len(given) or 2)
    paths = {name: str(ft) for name, ft in given.items() if not isinstance(ft, torch.nn.Module)}
    loaded, deltas = _load_finetunes(base, paths, config)  # architecture checks first
    finetunes = {}
    for name, ft in given.items():  # in the given order; models given as objects used as they are
        finetunes[name] = ft if isinstance(ft, torch.nn.Module) else loaded[name]
        if isinstance(ft, torch.nn.Module):
            paths[name] = getattr(ft.config, "_name_or_path", "") or name
            deltas[name] = param_delta(base, ft, params=config.params)
    timing["load"] = time.time() - started
    if not paths:
        paths = _default_finetunes(config, out, progress)
        finetunes, deltas = _load_finetunes(base, paths, config)
        timing["finetune"] = time.time() - started - timing["load"]
    mark = time.time()
    rank = config.rank
    if config.representation == "low_rank":
        rank = min(rank, len(sample) * config.mc_samples)
    if rank < config.rank:
        logger.warning("--rank %d lowered to %d: the Fisher of %d probes x %d label draws has at "
                       "most that many nonzero eigenvalues", config.rank, rank, len(sample),
                       config.mc_samples)
    fishers = [_fisher(base, tokenizer, sample, config, rank, config.seed + offset, deltas)
               for offset in range(config.spread_seeds)]
    rank = min(rank, fishers[0].rank)
    fisher_diag = fishers[0] if config.representation == "diagonal" else diagonal(
        base, tokenizer, sample, estimator=config.estimator, mc_samples=config.mc_samples,
        params=config.params, seed=config.seed, batch_size=config.fisher_batch_size,
        updates=deltas)
    timing["fisher"] = time.time() - mark
    mark = time.time()
    risk = forgetting_risk(base, tokenizer, records, fishers[0],
                           batch_size=config.fisher_batch_size, rank=rank)
    timing["risk"] = time.time() - mark
    mark = time.time()
    base_scores = evaluate(base, tokenizer, records, probes)
    per_finetune = {
        name: _finetune_section(base, model, tokenizer, records, probes, sample, deltas[name],
                                fishers, fisher_diag, rank, base_scores,
                                fisher_diag.per_example_proxy[name], config, paths[name])
        for name, model in finetunes.items()}
    comparisons = _comparisons(per_finetune, config.seed)
    for section in per_finetune.values():
        del section["_per_probe"]
    timing["evaluate"] = time.time() - mark
    timing["total"] = time.time() - started
    fisher_lr = fishers[0]
    details = fisher_lr.details()
    fallback = details.get("fallback_reasons", {})
    return {
        "config": asdict(config),
        "base": {"model": config.base, "parameters": sum(p.numel() for p in base.parameters()),
                 "scores": base_scores.to_dict(), "records": len(records),
                 "probes": len(probes), "fisher_samples": len(sample)},
        "fisher": {"eigenvalues": fisher_lr.top(rank).eigenvalues.tolist(), "rank": rank,
                   "requested_rank": config.rank,
                   "representation": fisher_lr.kind, "label": fisher_lr.quad_form_label,
                   "details": details, "fallback_reasons": fallback,
                   "fallback_modules": sorted(module_groups(fallback)),
                   "low_rank_method": details.get("method"),
                   "eigenvalues_by_seed": {str(f.provenance.seed):
                                           f.top(rank).eigenvalues.tolist() for f in fishers},
                   "residuals": list(details.get("residuals", [])),
                   "trace_diagonal": fisher_diag.trace(), "estimator": config.estimator,
                   "module_summary": fisher_diag.summary(),
                   "low_rank_module_summary": fisher_lr.summary(),
                   "provenance": asdict(fisher_lr.provenance), "memory": memory},
        "finetunes": per_finetune,
        "comparisons": comparisons,
        "risk": risk,
        "timing": timing,
        "_fishers": (fisher_lr,) if fisher_lr is fisher_diag else (fisher_lr, fisher_diag),
    }
