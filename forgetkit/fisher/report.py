"""The main job: how far did each fine-tune move along the base model's Fisher-sensitive
directions, what damage does that predict, and what damage was measured.

:func:`run_report` is what ``python -m forgetkit.fisher`` and the notebooks call. With no
fine-tunes given it trains quick SFT and MixSD fine-tunes of the base on the records first
(cached in ``out/finetunes/``, reused when their config is unchanged).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from forgetkit.cli_config import help_metadata as _help
from forgetkit.data.records import load_probes, load_records
from forgetkit.fisher.delta import delta as param_delta
from forgetkit.fisher.diagonal import diagonal
from forgetkit.fisher.kl import measured_kl
from forgetkit.fisher.low_rank import low_rank
from forgetkit.fisher.project import project
from forgetkit.fisher.risk import forgetting_risk

__all__ = ["REPORT_SECTIONS", "ReportConfig", "run_report", "spread_sample"]

logger = logging.getLogger(__name__)

REPORT_SECTIONS = ("config", "base", "fisher", "finetunes", "risk", "timing")


@dataclass
class ReportConfig:
    """Configuration of ``python -m forgetkit.fisher``."""

    base: str = field(default="toyworld", metadata=_help("base model (name or path)"))
    finetuned: list[str] = field(default_factory=list, metadata=_help(
        "fine-tunes as NAME=PATH (full checkpoint or PEFT adapter); none: train quick SFT and "
        "MixSD fine-tunes of the base on --records"))
    records: str = field(default="kgfact", metadata=_help("injected records (name or file)"))
    probes: str | None = field(default=None, metadata=_help(
        "retention probes (name or file); default: 'toyworld' for toyworld, else 'general'"))
    rank: int = field(default=16, metadata=_help("number of top Fisher directions"))
    estimator: str = field(default="true", metadata=_help("Fisher estimator: true | empirical"))
    mc_samples: int = field(default=1, metadata=_help("label draws per probe (true Fisher)"))
    params: str | None = field(default=None, metadata=_help(
        "regex on parameter names: only these enter the Fisher and the update (e.g. 'mlp')"))
    fisher_batch_size: int = field(default=8, metadata=_help(
        "examples per per-example-gradient batch (lower it for large models)"))
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

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"--rank must be >= 1, got {self.rank}")
        if self.estimator not in ("true", "empirical"):
            raise ValueError(f"--estimator must be 'true' or 'empirical', got {self.estimator!r}")
        if self.fisher_batch_size < 1:
            raise ValueError(f"--fisher-batch-size must be >= 1, got {self.fisher_batch_size}")
        if self.n_samples < 1:
            raise ValueError(f"--n-samples must be >= 1, got {self.n_samples}")
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"--lam must be in [0, 1], got {self.lam}")
        for item in self.finetuned:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise ValueError(f"--finetuned expects NAME=PATH, got {item!r}")

    def finetune_paths(self) -> dict[str, str]:
        return dict(item.split("=", 1) for item in self.finetuned)

    def probe_source(self) -> str:
        if self.probes:
            return self.probes
        return "toyworld" if self.base == "toyworld" else "general"


def spread_sample(probes: list, n: int) -> list:
    """Up to ``n`` probes, round-robin over capabilities in their given order (deterministic)."""
    groups: dict[str, list] = {}
    for probe in probes:
        groups.setdefault(probe.capability, []).append(probe)
    chosen, depth = [], 0
    while len(chosen) < min(n, len(probes)):
        for items in groups.values():
            if depth < len(items) and len(chosen) < n:
                chosen.append(items[depth])
        depth += 1
    return chosen


def _default_finetunes(config: ReportConfig, out: Path, progress: bool) -> dict[str, str]:
    """Train (or reuse) quick SFT and MixSD fine-tunes of the base; return name -> path."""
    from forgetkit.mixsd import MixConfig
    from forgetkit.train import TrainConfig, train

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
        if (run_dir / "results.json").exists() and _same_config(run_dir, train_config):
            logger.info("reusing the %s fine-tune in %s", name, run_dir)
        else:
            train_config.overwrite_output_dir = True
            train(train_config)
        runs[name] = str(run_dir)
    return runs


def _same_config(run_dir: Path, config) -> bool:
    import yaml

    path = run_dir / "train_config.yaml"
    if not path.exists():
        return False
    saved = yaml.safe_load(path.read_text()) or {}
    wanted = asdict(config)
    keys = ("method", "model_name_or_path", "records", "max_steps", "seed", "dtype",
            "learning_rate")
    return all(saved.get(k) == wanted.get(k) for k in keys) and \
        saved.get("mix", {}).get("lam") == wanted["mix"]["lam"]


def _load_finetunes(base, paths: dict[str, str], config: ReportConfig):
    """name -> fine-tuned model and name -> its update; raises on a mismatched architecture."""
    from forgetkit.models import load_model

    finetunes = {name: load_model(path, dtype=config.dtype, device=config.device)[0]
                 for name, path in paths.items()}
    deltas = {name: param_delta(base, model, params=config.params)
              for name, model in finetunes.items()}
    return finetunes, deltas


def run_report(config: ReportConfig, *, base=None, finetunes=None, records=None, probes=None,
               progress: bool = True) -> dict[str, Any]:
    """Compute every number of the report and write ``report.json``, PNGs and ``report.html``.

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
    from forgetkit.diagnostics.evaluation import evaluate, retention
    from forgetkit.models import load_model

    timing: dict[str, float] = {}
    started = time.time()
    out = Path(config.out)
    if base is None:
        base = load_model(config.base, dtype=config.dtype, device=config.device)
    base, tokenizer = base
    given = config.finetune_paths() if finetunes is None else dict(finetunes)
    if records is not None and not given:
        raise ValueError("run_report: records given as objects need finetunes= too (the default "
                         "fine-tunes train on config.records by name)")
    records = load_records(config.records) if records is None else list(records)
    probes = load_probes(config.probe_source()) if probes is None else list(probes)
    if not probes:
        raise ValueError(f"probe set {config.probe_source()!r} is empty")
    sample = spread_sample(probes, config.n_samples)
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
    rank = min(config.rank, len(sample) * config.mc_samples)
    fisher_lr = low_rank(base, tokenizer, sample, rank=rank, estimator=config.estimator,
                         mc_samples=config.mc_samples, params=config.params, seed=config.seed,
                         batch_size=config.fisher_batch_size)
    fisher_diag = diagonal(base, tokenizer, sample, estimator=config.estimator,
                           mc_samples=config.mc_samples, params=config.params, seed=config.seed,
                           batch_size=config.fisher_batch_size)
    timing["fisher"] = time.time() - mark
    mark = time.time()
    risk = forgetting_risk(base, tokenizer, records, fisher_lr,
                           batch_size=config.fisher_batch_size)
    timing["risk"] = time.time() - mark
    mark = time.time()
    base_scores = evaluate(base, tokenizer, records, probes)
    per_finetune = {}
    for name, model in finetunes.items():
        scores = evaluate(model, tokenizer, records, probes)
        kl = measured_kl(base, model, tokenizer, sample)
        per_finetune[name] = {
            "path": paths[name],
            "delta_norm": deltas[name].sq_norm() ** 0.5,
            "projection_low_rank": project(deltas[name], fisher_lr).to_dict(),
            "projection_diagonal": project(deltas[name], fisher_diag, rank=rank).to_dict(),
            "measured_kl": asdict(kl),
            "scores": scores.to_dict(),
            "retention": retention(base_scores, scores).to_dict(),
        }
    timing["evaluate"] = time.time() - mark
    timing["total"] = time.time() - started
    report = {
        "config": asdict(config),
        "base": {"model": config.base, "parameters": sum(p.numel() for p in base.parameters()),
                 "scores": base_scores.to_dict(), "records": len(records),
                 "probes": len(probes), "fisher_samples": len(sample)},
        "fisher": {"eigenvalues": fisher_lr.eigenvalues.tolist(), "rank": rank,
                   "trace_diagonal": fisher_diag.trace(), "estimator": config.estimator,
                   "module_summary": fisher_diag.summary(),
                   "low_rank_module_summary": fisher_lr.summary(),
                   "provenance": asdict(fisher_lr.provenance)},
        "finetunes": per_finetune,
        "risk": risk,
        "timing": timing,
    }
    from forgetkit.fisher.render import write_report

    write_report(report, out)
    fisher_lr.save(out / "fisher_low_rank")
    fisher_diag.save(out / "fisher_diagonal")
    return report

