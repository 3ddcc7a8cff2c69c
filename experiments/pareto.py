"""Pareto study: what does each knowledge-injection method cost at matched training budgets?

SFT, MixSD at several lambdas and OPSD are trained from the same base on the same records with
the same budget: optimizer steps, examples (prompts) per step, learning rate, schedule and seed
are shared; only the method (and MixSD's lambda) differs. OPSD samples
``opsd_num_generations`` completions per prompt, so it sees that many more completions per step.
Each fine-tune is scored on memorization (greedy recall of the injected facts), paraphrase
accuracy and the retention of every held-out capability (fine-tuned / base accuracy,
:func:`forgetkit.diagnostics.evaluation.retention`).

SFT is also evaluated every ``peak_eval_steps`` steps; its *first-peak* checkpoint is the first
evaluated step whose memorization equals the run's maximum (within ``peak_tolerance``), and it
enters the table as ``SFT@peak`` with the retention measured at that step. Its weights are
exported for the Fisher study.

Outputs in ``out`` (default ``experiments/results/pareto/<model>/``): ``pareto_config.yaml``,
``results.csv`` / ``results.json`` (one row per fine-tune), ``runs.json`` (what the Fisher study
reads), ``pareto.png`` (retention against memorization with the Pareto frontier),
``retention_by_capability.png`` and ``sft_trajectory.png``. Fine-tunes live in ``cache``
(git-ignored); a run whose ``results.json`` exists with the same config is skipped, an
interrupted one resumes from its latest checkpoint. Each finished run also keeps a record in
``out/runs/<run>/`` (config, results, evaluations; no weights) and its rescoring predictions in
``out/rescore/``, so a study outlasts its cache: a rerun without the cache restores the
recorded runs and trains the others.

The Pareto frontier (maximize memorization and retention) is computed here
(:func:`pareto_frontier`); forgetkit has no such function.

    python experiments/pareto.py --config experiments/configs/pareto_toyworld.yaml
    python experiments/pareto.py --config experiments/configs/pareto_smollm2.yaml --max_steps 2
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from forgetkit.cli_config import command_line, config_to_dict, markdown_table, parse_cli
from forgetkit.cli_config import help_metadata as _help
from forgetkit.data.records import load_probe_sets, load_probes, load_records
from forgetkit.diagnostics.evaluation import (
    INJECTED_CAPABILITIES,
    Prediction,
    Scores,
    above_chance,
    chance_levels,
    evaluate,
    retention,
    retention_difference_interval,
    retention_interval,
    score_intervals,
)
from forgetkit.files import (
    atomic_directory,
    atomic_write,
    atomic_write_json,
    atomic_write_jsonl,
    json_rows,
    read_jsonl,
    write_figure,
)
from forgetkit.mixsd import MixConfig
from forgetkit.models import load_model
from forgetkit.seeding import seed_everything, stable_hash
from forgetkit.train import TrainConfig, train
from forgetkit.train.checkpoint import (
    INPUTS_FILE,
    checkpoint_dirs,
    latest_checkpoint,
    same_config,
)
from forgetkit.train.config import RETENTION_METHODS
from forgetkit.train.retention import split_probes

logger = logging.getLogger("pareto")

METHOD_LABELS = {"sft": "SFT", "mixsd": "MixSD", "opsd": "OPSD", "ewc": "EWC", "replay": "Replay",
                 "fisher_orthogonal": "Fisher-orthogonal SFT"}
"""Display name of each trainer method; ``mixsd:<lam>`` entries add their lambda."""

PEAK_SUFFIX = "@peak"


@dataclass
class ParetoConfig:
    """``python experiments/pareto.py``: SFT vs MixSD(lambda) vs OPSD at matched budgets."""

    model: str = field(default="toyworld", metadata=_help(
        "base model: toyworld, smollm2-135m, a local folder or a cached hub id"))
    records: str = field(default="kgfact", metadata=_help("records to inject (name or file)"))
    offset: int = field(default=0, metadata=_help(
        "skip the first N records (e.g. held-out facts for choosing the learning rate)"))
    limit: int | None = field(default=None, metadata=_help(
        "inject only the first N records after the offset (none: all)"))
    paraphrases_per_record: int | None = field(default=None, metadata=_help(
        "score only the first N paraphrases of each record (none: all)"))
    probes: str | None = field(default=None, metadata=_help(
        "comma-separated probe sets; none: 'toyworld,kgfact' for toyworld, else 'general,kgfact'"))
    probes_per_capability: int | None = field(default=None, metadata=_help(
        "keep only the first N probes of each capability (none: all)"))
    methods: list[str] = field(default_factory=lambda: [
        "sft", "mixsd:0", "mixsd:0.3", "mixsd:0.5", "mixsd:0.7", "opsd"], metadata=_help(
        "methods to train: sft, opsd, ewc, replay, fisher_orthogonal, mixsd:<lambda> "
        "(--methods sft mixsd:0.3 opsd)"))
    retention_fraction: float | None = field(default=None, metadata=_help(
        "share of probe ids held out as the retention data of ewc, replay and "
        "fisher_orthogonal; every run and the rescoring then score only the other probes, so "
        "all methods are compared on the same items. none: 0.5 when one of those methods is "
        "in methods, else 0 (every probe scored)"))
    ewc_strength: float = field(default=TrainConfig.ewc_strength, metadata=_help(
        "ewc: the penalty's strength"))
    replay_ratio: float = field(default=TrainConfig.replay_ratio, metadata=_help(
        "replay: share of each batch taken from the base's answers to retention prompts"))
    orthogonal_k: int = field(default=TrainConfig.orthogonal_k, metadata=_help(
        "fisher_orthogonal: top Fisher directions the update is kept orthogonal to"))
    orthogonal_fisher: str = field(default=TrainConfig.orthogonal_fisher, metadata=_help(
        "fisher_orthogonal: low_rank or kfac (every weight of a real model)"))
    orthogonal_params: str | None = field(default=None, metadata=_help(
        "fisher_orthogonal: the parameters whose Fisher gives the removed directions (glob or "
        "regex on names); none: every trained parameter"))
    max_steps: int = field(default=300, metadata=_help(
        "optimizer steps of every method (the cap, with stop_at_memorization)"))
    stop_at_memorization: float | None = field(default=None, metadata=_help(
        "train every method until its memorization reaches this (evaluated every "
        "peak_eval_steps) or max_steps, so methods are compared where they learned the facts; "
        "none: the full budget"))
    per_device_train_batch_size: int = field(default=8, metadata=_help(
        "examples (prompts) per step, every method"))
    gradient_accumulation_steps: int = field(default=1, metadata=_help(
        "micro-batches per optimizer step"))
    learning_rate: float = field(default=1e-3, metadata=_help("peak learning rate, every method"))
    lr_scheduler_type: str = field(default="cosine", metadata=_help("constant or cosine"))
    warmup_steps: int = field(default=20, metadata=_help("linear warmup steps"))
    seed: int = field(default=0, metadata=_help("seed of data order, MixSD coins, OPSD samples"))
    peak_eval_steps: int = field(default=25, metadata=_help(
        "evaluate SFT every this many steps to find its first memorization peak (0: no search)"))
    peak_tolerance: float = field(default=0.0, metadata=_help(
        "the peak is the first step with memorization >= max - this"))
    eval_all_methods: bool = field(default=False, metadata=_help(
        "evaluate every method (not only SFT) every peak_eval_steps, for trajectories"))
    save_steps: int = field(default=100, metadata=_help(
        "checkpoint every N steps so an interrupted run resumes (0: none)"))
    rescore_probes_per_capability: int | None = field(default=None, metadata=_help(
        "after training, score the base and every final model again on the first N probes of "
        "each capability (more than probes_per_capability, for tighter retention estimates "
        "without retraining); the table then reports these scores. none: no rescoring"))
    rescore_probes: str | None = field(default=None, metadata=_help(
        "probe sets scored only in the rescoring, beside probes (comma-separated; set:capability "
        "keeps one capability, e.g. kgfact-large:retrieval); no run trains on them, so every one "
        "of their probes is scored"))
    per_device_eval_batch_size: int = field(default=64, metadata=_help(
        "prompts per generation batch in evaluation"))
    eval_max_new_tokens: int = field(default=32, metadata=_help("generation cap in evaluation"))
    opsd_num_generations: int = field(default=2, metadata=_help(
        "OPSD completions sampled per prompt and step"))
    opsd_max_new_tokens: int = field(default=32, metadata=_help("OPSD completion length cap"))
    mix: MixConfig = field(default_factory=MixConfig, metadata=_help(
        "MixSD target settings shared by every mixsd run (the MixConfig options; a mapping is "
        "read as one); mix.lam is set by each mixsd:<lambda> method"))
    dtype: str = field(default="float32", metadata=_help("model dtype"))
    device: str | None = field(default=None, metadata=_help("cpu, cuda, ...; default cuda if any"))
    out: str = field(default="experiments/results/pareto/{model}", metadata=_help(
        "results folder ({model}: the model's name)"))
    cache: str = field(default="experiments/results/pareto/cache/{model}", metadata=_help(
        "fine-tunes and derived inputs (git-ignored)"))

    def __post_init__(self):
        if isinstance(self.mix, dict):
            self.mix = MixConfig(**self.mix)
        self.methods = [m.strip() for m in self.methods if m.strip()]
        problems = [f"methods: {err}" for m in self.methods if (err := _method_error(m))]
        if not self.methods:
            problems.append("methods is empty")
        names = [run_name(m) for m in self.methods if not _method_error(m)]
        if len(set(names)) != len(names):
            problems.append(f"methods repeat a run: {self.methods}")
        for name in ("limit", "paraphrases_per_record", "probes_per_capability",
                     "rescore_probes_per_capability"):
            value = getattr(self, name)
            if value is not None and value < (1 if name != "paraphrases_per_record" else 0):
                problems.append(f"{name}={value} must be >= 1 or none")
        if self.rescore_probes and not self.rescore_probes_per_capability:
            problems.append("rescore_probes needs rescore_probes_per_capability (they are "
                            "scored only in the rescoring)")
        if self.max_steps < 1:
            problems.append(f"max_steps={self.max_steps} must be >= 1")
        if self.offset < 0:
            problems.append(f"offset={self.offset} must be >= 0")
        if self.stop_at_memorization is not None:
            if not 0 < self.stop_at_memorization <= 1:
                problems.append(f"stop_at_memorization={self.stop_at_memorization} must be in "
                                "(0, 1]")
            if self.peak_eval_steps < 1:
                problems.append("stop_at_memorization needs peak_eval_steps >= 1 (the "
                                "evaluation grid)")
        if self.retention_fraction is not None and not 0 <= self.retention_fraction < 1:
            problems.append(f"retention_fraction={self.retention_fraction} must be in [0, 1)")
        if self.peak_eval_steps < 0 or self.peak_tolerance < 0:
            problems.append("peak_eval_steps and peak_tolerance must be >= 0")
        if problems:
            raise ValueError("ParetoConfig: " + "; ".join(problems))
        slug = model_slug(self.model)
        self.out = self.out.replace("{model}", slug)
        self.cache = self.cache.replace("{model}", slug)


def model_slug(model: str) -> str:
    """Folder name for a model: the built-in name, or the last part of a path."""
    return Path(model.rstrip("/")).name or model


def _method_error(method: str) -> str | None:
    kind, _, lam = method.partition(":")
    if kind not in METHOD_LABELS:
        return (f"unknown method {method!r}; use sft, opsd, ewc, replay, fisher_orthogonal "
                "or mixsd:<lambda>")
    if (kind == "mixsd") != bool(lam):
        return f"{method!r}: mixsd needs a lambda (mixsd:0.3), other methods take none"
    if lam:
        try:
            if not 0 <= float(lam) <= 1:
                raise ValueError
        except ValueError:
            return f"{method!r}: lambda must be a number in [0, 1]"
    return None


def heldout_fraction(config: ParetoConfig) -> float:
    """The share of probe ids held out as retention data (see ``retention_fraction``)."""
    if config.retention_fraction is not None:
        return config.retention_fraction
    kinds = {m.partition(":")[0] for m in config.methods}
    return 0.5 if kinds & RETENTION_METHODS else 0.0


def run_name(method: str) -> str:
    """Folder name of a method's run: ``sft``, ``opsd``, ``mixsd-0.3``."""
    kind, _, lam = method.partition(":")
    return f"{kind}-{float(lam):g}" if lam else kind


def run_label(method: str) -> str:
    """Display name: ``SFT``, ``OPSD``, ``MixSD λ=0.3``."""
    kind, _, lam = method.partition(":")
    return f"{METHOD_LABELS[kind]} λ={float(lam):g}" if lam else METHOD_LABELS[kind]


# --- inputs -------------------------------------------------------------------------------------

def prepare_records(config: ParetoConfig, cache: Path) -> str:
    """The records source the trainer gets: the set itself, or a subset file named by its hash."""
    if config.offset == 0 and config.limit is None and config.paraphrases_per_record is None:
        return config.records
    end = None if config.limit is None else config.offset + config.limit
    records = load_records(config.records)[config.offset : end]
    if not records:
        raise ValueError(f"offset={config.offset}: {config.records!r} has no records there")
    if config.paraphrases_per_record is not None:
        records = [replace(r, paraphrases=r.paraphrases[: config.paraphrases_per_record])
                   for r in records]
    rows = [asdict(r) for r in records]
    path = cache / "inputs" / f"records-{stable_hash(rows)}.jsonl"
    if not path.exists():
        atomic_write_jsonl(path, rows)
    return str(path)


def default_probes(model: str) -> str:
    """The model's retention set plus kgfact's own probes (as the trainer would choose)."""
    is_toyworld = model == "toyworld" or (Path(model) / "toyworld.json").is_file()
    return ("toyworld" if is_toyworld else "general") + ",kgfact"


def probe_sources(config: ParetoConfig, rescoring: bool = False) -> list[str]:
    """The probe sets runs evaluate, and with ``rescoring`` the rescore-only sets after them."""
    text = config.probes or default_probes(config.model)
    if rescoring and config.rescore_probes:
        text += "," + config.rescore_probes
    return [s.strip() for s in text.split(",") if s.strip()]


def prepare_probes(config: ParetoConfig, cache: Path, per_capability: int | None = None,
                   rescoring: bool = False) -> str:
    """One probe file holding every probe set (capabilities renamed as the trainer does, e.g.
    ``kgfact:retrieval``; with ``rescoring``, the ``rescore_probes`` sets too), cut to
    ``per_capability`` (default ``probes_per_capability``) probes per capability; named by its
    content hash."""
    probes = load_probe_sets(probe_sources(config, rescoring))
    per_capability = per_capability or config.probes_per_capability
    if per_capability is not None:
        seen: dict[str, int] = {}
        kept = []
        for probe in probes:
            seen[probe.capability] = seen.get(probe.capability, 0) + 1
            if seen[probe.capability] <= per_capability:
                kept.append(probe)
        probes = kept
    rows = [asdict(p) for p in probes]
    path = cache / "inputs" / f"probes-{stable_hash(rows)}.jsonl"
    if not path.exists():
        atomic_write_jsonl(path, rows)
    return str(path)


# --- runs ---------------------------------------------------------------------------------------

@dataclass
class RunSpec:
    """One fine-tune of the study."""

    method: str
    name: str
    label: str
    train_config: TrainConfig
    find_peak: bool
    peak_tolerance: float = 0.0


def plan_runs(config: ParetoConfig, records: str, probes: str) -> list[RunSpec]:
    """The :class:`TrainConfig` of every method: identical budgets, method and lambda aside."""
    cache = Path(config.cache)
    specs = []
    for method in config.methods:
        kind, _, lam = method.partition(":")
        find_peak = kind == "sft" and config.peak_eval_steps > 0
        evaluated = find_peak or ((config.eval_all_methods or config.stop_at_memorization)
                                  and config.peak_eval_steps > 0)
        train_config = TrainConfig(
            method=kind, model_name_or_path=config.model, records=records, probes=probes,
            output_dir=str(cache / run_name(method)), learning_rate=config.learning_rate,
            max_steps=config.max_steps,
            per_device_train_batch_size=config.per_device_train_batch_size,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            lr_scheduler_type=config.lr_scheduler_type, warmup_steps=config.warmup_steps,
            seed=config.seed, eval_steps=config.peak_eval_steps if evaluated else 0,
            # the peak's weights are needed later: keep a checkpoint at every evaluated step
            save_steps=config.peak_eval_steps if find_peak else config.save_steps,
            save_total_limit=None if find_peak else 1, disable_tqdm=True,
            per_device_eval_batch_size=config.per_device_eval_batch_size,
            eval_max_new_tokens=config.eval_max_new_tokens,
            mix=replace(config.mix, lam=float(lam) if lam else config.mix.lam),
            opsd_num_generations=config.opsd_num_generations,
            opsd_max_new_tokens=config.opsd_max_new_tokens,
            retention_fraction=heldout_fraction(config) or None, ewc_strength=config.ewc_strength,
            replay_ratio=config.replay_ratio, orthogonal_k=config.orthogonal_k,
            orthogonal_fisher=config.orthogonal_fisher, orthogonal_params=config.orthogonal_params,
            stop_at_memorization=config.stop_at_memorization,
            dtype=config.dtype, device=config.device)
        specs.append(RunSpec(method, run_name(method), run_label(method), train_config,
                             find_peak, config.peak_tolerance))
    return specs


def is_finished(spec: RunSpec, folder: Path | None = None) -> bool:
    """``results.json`` exists with the same config (and, for SFT, the exported peak) in the
    run's folder (or ``folder``, e.g. its record)."""
    out = Path(spec.train_config.output_dir) if folder is None else Path(folder)
    if not (out / "results.json").exists():
        return False
    if not same_config(out, spec.train_config):
        return False
    if not spec.find_peak:
        return True
    peak = out / "peak.json"
    return peak.exists() and json.loads(peak.read_text())["tolerance"] == spec.peak_tolerance


RECORD_FILES = ("train_config.yaml", INPUTS_FILE, "results.json", "study_timing.json",
                "peak.json", "eval")
"""What a finished run keeps in ``out/runs/<run>/`` (everything but its weights)."""


def record_dir(config: ParetoConfig, spec: RunSpec) -> Path:
    return Path(config.out) / "runs" / spec.name


def save_record(config: ParetoConfig, spec: RunSpec) -> None:
    """Copy a finished run's :data:`RECORD_FILES` into its record ``out/runs/<run>/``, which is
    committed beside the tables (the folder is replaced whole)."""
    with atomic_directory(record_dir(config, spec)) as stage:
        _copy_record_files(Path(spec.train_config.output_dir), stage)


def _copy_record_files(source: Path, target: Path) -> None:
    for name in RECORD_FILES:
        if (source / name).is_dir():
            shutil.copytree(source / name, target / name)
        elif (source / name).exists():
            shutil.copy2(source / name, target / name)


def record_models(spec: RunSpec, folder: Path) -> list[dict[str, str]]:
    """The models a run's table rows point at (run, config hash, model folder), as
    :func:`study_rows` names them, read from a run folder or its record."""
    key = spec.train_config.config_hash()
    models = [{"run": spec.name, "config_hash": key,
               "model_path": json.loads((folder / "results.json").read_text())["model_path"]}]
    if spec.find_peak:
        peak = json.loads((folder / "peak.json").read_text())
        models.append({"run": spec.name + "-peak", "config_hash": key + "-peak",
                       "model_path": peak["model_path"]})
    return models


def restore_record(config: ParetoConfig, spec: RunSpec, inputs: Rescoring | None) -> bool:
    """Copy a run's record back into its cache folder (without weights) when the cache holds no
    finished run of the same config but the record does; returns whether it did. A run
    restored so is skipped, unless the study rescores and a model of the run has no kept
    predictions: scoring needs its weights, so the run (restored now or earlier) is cleared
    from the cache and trained again."""
    record, out = record_dir(config, spec), Path(spec.train_config.output_dir)
    in_cache = is_finished(spec)
    if not in_cache and not is_finished(spec, record):
        return False
    if inputs is not None:
        missing = [m["run"] for m in record_models(spec, out if in_cache else record)
                   if not inputs.path(m["run"], m["config_hash"], m["model_path"]).exists()
                   and not (Path(m["model_path"]) / "config.json").is_file()]
        if missing:
            logger.info("%s: no predictions of %s on the rescoring probes are kept and its "
                        "weights are gone: training it again", spec.label, ", ".join(missing))
            if in_cache:
                shutil.rmtree(out)
            return False
    if in_cache:
        return False
    with atomic_directory(out, merge=True) as stage:
        _copy_record_files(record, stage)
    logger.info("%s: restored the finished run from its record %s (no weights)", spec.label,
                record)
    return True


def run_or_skip(spec: RunSpec) -> tuple[dict[str, Any], float, bool]:
    """Train ``spec`` unless finished; returns (results.json, train seconds, skipped)."""
    config = spec.train_config
    out = Path(config.output_dir)
    timing_path = out / "study_timing.json"
    if is_finished(spec):
        logger.info("%s: finished run with the same config in %s; skipped", spec.label, out)
        seconds = json.loads(timing_path.read_text())["seconds"] if timing_path.exists() else None
        return json.loads((out / "results.json").read_text()), seconds, True
    same = same_config(out, config) and not (out / "results.json").exists()
    if same and latest_checkpoint(out) is not None:
        logger.info("%s: resuming from %s", spec.label, latest_checkpoint(out))
        config = replace(config, resume_from_checkpoint="latest")
    elif not same:  # (the same run stopped before its first checkpoint: the trainer starts
        # it over and keeps its MixSD targets)
        config = replace(config, overwrite_output_dir=True)
        (out / "peak.json").unlink(missing_ok=True)
        shutil.rmtree(out / "peak_model", ignore_errors=True)
    logger.info("%s: training %d steps -> %s", spec.label, config.max_steps, out)
    started = time.perf_counter()
    result = train(config)
    seconds = time.perf_counter() - started
    if spec.find_peak:  # the last step: the cap, or where the memorization target stopped it
        export_peak(out, result.global_step, spec.peak_tolerance)
    for checkpoint in checkpoint_dirs(out):  # the final model is saved beside them
        shutil.rmtree(checkpoint)
    atomic_write_json(timing_path, {"seconds": seconds})
    return result.to_dict(), seconds, False


# --- SFT's first memorization peak --------------------------------------------------------------

def eval_trajectory(output_dir: Path) -> pd.DataFrame:
    """One row per evaluated step of a run: step, memorization, paraphrase, retention overall
    and per capability (recomputed from ``eval/<step>.jsonl``)."""
    files = sorted((output_dir / "eval").glob("*.jsonl"), key=lambda p: int(p.stem))
    scores = {int(p.stem): Scores.from_predictions([Prediction(**row) for row in read_jsonl(p)])
              for p in files}
    base = scores[0]
    rows = []
    for step, score in scores.items():
        kept = retention(base, score)
        rows.append({"step": step, "memorization": score.memorization,
                     "paraphrase": score.paraphrase, "two_hop": score.two_hop,
                     "retention": kept.overall,
                     **{f"retention_{k}": v for k, v in kept.per_capability.items()}})
    return pd.DataFrame(rows)


def first_peak(trajectory: pd.DataFrame, tolerance: float = 0.0) -> int:
    """The first evaluated step (> 0) whose memorization is >= max - ``tolerance``."""
    trained = trajectory[trajectory["step"] > 0].sort_values("step")
    best = trained["memorization"].max()
    return int(trained.loc[trained["memorization"] >= best - tolerance, "step"].iloc[0])


def export_peak(output_dir: Path, final_step: int, tolerance: float = 0.0) -> dict[str, Any]:
    """Write ``peak.json`` and, unless the peak is the last step, ``peak_model/`` (the peak
    checkpoint's weights with the tokenizer, loadable by ``load_model``; built in a staging
    folder and swapped in whole, a killed earlier export's leftovers cleaned first)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    step = first_peak(eval_trajectory(output_dir), tolerance)
    model_path = output_dir
    if step != final_step:
        checkpoint = output_dir / f"checkpoint-{step}"
        model = AutoModelForCausalLM.from_pretrained(checkpoint)
        model_path = output_dir / "peak_model"
        with atomic_directory(model_path) as staging:  # swapped in whole once complete
            model.save_pretrained(staging, safe_serialization=True)
            AutoTokenizer.from_pretrained(output_dir).save_pretrained(staging)
    peak = {"step": step, "model_path": str(model_path), "tolerance": tolerance}
    atomic_write_json(output_dir / "peak.json", peak)
    return peak


# --- table and frontier -------------------------------------------------------------------------

def pareto_frontier(points: pd.DataFrame, x: str = "memorization", y: str = "retention"
                    ) -> pd.Series:
    """Whether each row is Pareto-optimal when maximizing ``x`` and ``y``: no other row is at
    least as good on both and strictly better on one. Rows with a missing value are not."""
    values = points[[x, y]].to_numpy(dtype=float)
    optimal = []
    for i, (xi, yi) in enumerate(values):
        if pd.isna(xi) or pd.isna(yi):
            optimal.append(False)
            continue
        dominated = any(xj >= xi and yj >= yi and (xj > xi or yj > yi)
                        for j, (xj, yj) in enumerate(values) if j != i and not pd.isna(xj + yj))
        optimal.append(not dominated)
    return pd.Series(optimal, index=points.index)


def study_rows(specs: list[RunSpec], results: dict[str, dict[str, Any]],
               seconds: dict[str, float | None]) -> list[dict[str, Any]]:
    """One table row per fine-tune, plus ``SFT@peak`` (scored at its peak step) after SFT."""
    rows = []
    for spec in specs:
        result, (kind, _, lam) = results[spec.name], spec.method.partition(":")
        key = spec.train_config.config_hash()  # changes whenever the fine-tune does
        scores, kept = result["scores"], result["retention"]
        report = result.get("mixsd_report") or {}
        stop = result.get("stop_at_memorization") or {}
        rows.append({
            "label": spec.label, "run": spec.name, "method": kind,
            "lam": float(lam) if lam else None, "steps": result["global_step"],
            "memorization": scores["memorization"], "paraphrase": scores["paraphrase"],
            "two_hop": scores["capabilities"].get("two_hop"), "retention": kept["overall"],
            **_bounds(result.get("intervals") or {}),
            **{f"retention_{k}": v for k, v in kept["per_capability"].items()},
            "reached_target": stop.get("reached"), "final_loss": result["final_loss"], "train_seconds": seconds[spec.name],
            "model_path": result["model_path"], "config_hash": key,
            "mixsd_targets": report.get("n_targets"), "mixsd_failed": report.get("n_failed")})
        if spec.find_peak:
            out = Path(spec.train_config.output_dir)
            peak = json.loads((out / "peak.json").read_text())
            trajectory = eval_trajectory(out).set_index("step")
            rows.append({"label": spec.label + PEAK_SUFFIX, "run": spec.name + "-peak",
                         "method": kind, "lam": None, "steps": peak["step"],
                         **trajectory.loc[peak["step"]].to_dict(),
                         "model_path": peak["model_path"], "config_hash": key + "-peak"})
    return rows


INTERVAL_COLUMNS = ("memorization_low", "memorization_high", "retention_low", "retention_high")


def capability_columns(table) -> list[str]:
    """The per-capability retention columns (``retention_<capability>``) of a table or row."""
    return [c for c in table if c.startswith("retention_") and c not in INTERVAL_COLUMNS]


def _bounds(intervals: dict[str, Any]) -> dict[str, float | None]:
    """``memorization_low``/``_high`` and ``retention_low``/``_high`` from the trainer's (or
    :func:`~forgetkit.diagnostics.evaluation.score_intervals`') 95% bootstrap intervals."""
    out = {}
    for name in ("memorization", "retention"):
        found = intervals.get(name) or {}
        out[f"{name}_low"], out[f"{name}_high"] = found.get("low"), found.get("high")
    return out


# --- rescoring on more probes ---------------------------------------------------------------------

def _scores(path: Path, load, records: list, probes: list, config: ParetoConfig) -> Scores:
    """Scores of the model ``load()`` returns, from ``path`` (predictions) when it exists."""
    if not path.exists():
        model, tokenizer = load()
        scores = evaluate(model, tokenizer, records, probes,
                          batch_size=config.per_device_eval_batch_size,
                          max_new_tokens=config.eval_max_new_tokens)
        atomic_write_jsonl(path, [asdict(p) for p in scores.predictions])
        del model
    return Scores.from_predictions([Prediction(**row) for row in read_jsonl(path)])


@dataclass
class Rescoring:
    """What every model of the study is scored on again: the injected records, the probes and
    the settings its predictions are keyed by."""

    injected: list
    probes: list
    settings: tuple
    folder: Path

    def path(self, run: str, config_hash: str, model_path: str) -> Path:
        """Where the predictions of one model are kept (the key changes with the model's run
        config, its folder, the probe file and the evaluation settings)."""
        return self.folder / run / f"{stable_hash(config_hash, model_path, *self.settings)}.jsonl"


def rescoring_inputs(config: ParetoConfig, records: str, cache: Path) -> Rescoring:
    """The rescoring probes (the runs' sets without their retention split, the rescore-only
    sets whole) and settings; predictions live in ``out/rescore/`` beside the tables, so they
    outlast the cache and its weights."""
    probe_file = prepare_probes(config, cache, config.rescore_probes_per_capability,
                                rescoring=True)
    trained = {p.capability for p in load_probe_sets(probe_sources(config))}
    stored = load_probes(probe_file)  # the runs' sets lose their retention split, not the others
    probes = (split_probes([p for p in stored if p.capability in trained],
                           heldout_fraction(config))[1]
              + [p for p in stored if p.capability not in trained])
    settings = (probe_file, config.per_device_eval_batch_size, config.eval_max_new_tokens,
                config.dtype)
    return Rescoring(load_records(records), probes, settings, Path(config.out) / "rescore")


def _loader(config: ParetoConfig, path: str):
    return lambda: load_model(path, dtype=config.dtype, device=config.device)


def score_rows(config: ParetoConfig, rows: list[dict[str, Any]], inputs: Rescoring,
               by_model: dict[str, Scores] | None = None) -> dict[str, Scores]:
    """The rescoring scores of every row's model (``model_path`` -> scores), each model scored
    once (SFT@peak is often the final SFT model itself) and its predictions kept."""
    by_model = {} if by_model is None else by_model
    for row in rows:
        if row["model_path"] not in by_model:
            path = inputs.path(row["run"], row["config_hash"], row["model_path"])
            by_model[row["model_path"]] = _scores(path, _loader(config, row["model_path"]),
                                                  inputs.injected, inputs.probes, config)
    return by_model


def rescore(config: ParetoConfig, table: pd.DataFrame, records: str, cache: Path
            ) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Score the base and every row's model on ``rescore_probes_per_capability`` probes per
    capability; returns the table with its scores and retention replaced, and the base scores.

    Each model is scored once; its predictions are kept in ``out/rescore/<run>/`` under a hash
    of its run config, its folder, the probes and the evaluation settings, so a rerun scores
    only new models.
    """
    inputs = rescoring_inputs(config, records, cache)
    probes = inputs.probes
    logger.info("rescoring the base and %d fine-tunes on %d probes", len(table), len(probes))
    base = _scores(inputs.folder / "base" / f"{stable_hash(config.model, *inputs.settings)}.jsonl",
                   _loader(config, config.model), inputs.injected, probes, config)
    by_model = score_rows(config, table.to_dict(orient="records"), inputs)
    clear = above_chance(base, chance_levels(probes), seed=config.seed)
    logger.info("capabilities the base answers above chance: %s", ", ".join(clear) or "none")
    sft = by_model.get(next((r["model_path"] for r in table.to_dict(orient="records")
                             if r["run"] == "sft"), None))
    rows = []
    for row in table.to_dict(orient="records"):
        scores = by_model[row["model_path"]]
        kept = retention(base, scores)
        row = {k: v for k, v in row.items() if not k.startswith("retention_")}
        rows.append({**row, "memorization": scores.memorization,
                     "paraphrase": scores.paraphrase, "two_hop": scores.two_hop,
                     "retention": kept.overall,
                     **_bounds(score_intervals(base, scores, config.seed)),
                     **{f"retention_{k}": v for k, v in kept.per_capability.items()},
                     **_above_chance_columns(base, scores, sft, clear, config.seed),
                     "probes_scored": len(probes)})
    base_dict = {**base.to_dict(), "capabilities_above_chance": clear}
    return pd.DataFrame(rows), base_dict


def _above_chance_columns(base: Scores, scores: Scores, sft: Scores | None, clear: list[str],
                          seed: int) -> dict[str, float | None]:
    """The paired difference of overall retention from SFT's (``vs_sft``), retention over the
    capabilities the base answers above chance (``above_chance_retention``) and its difference
    from SFT's (``above_chance_vs_sft``), each with its 95% interval, bootstrapped over the same
    probes for the base and both fine-tunes."""
    names = ("vs_sft", "above_chance_retention", "above_chance_vs_sft")
    found = [retention_difference_interval(base, scores, sft, seed=seed)
             if sft is not None else None,
             retention_interval(base, scores, seed=seed, capabilities=clear) if clear else None,
             retention_difference_interval(base, scores, sft, seed=seed, capabilities=clear)
             if clear and sft is not None else None]
    out: dict[str, float | None] = {}
    for name, interval in zip(names, found, strict=True):
        out.update({name: None, f"{name}_low": None, f"{name}_high": None} if interval is None
                   else {name: interval.value, f"{name}_low": interval.low,
                         f"{name}_high": interval.high})
    return out


# --- figures ------------------------------------------------------------------------------------

def plot_pareto(points: pd.DataFrame, ax, trajectories: pd.DataFrame | None = None):
    """Retention (y) against memorization (x), one marker per fine-tune (columns ``label``,
    ``memorization``, ``retention``, ``on_frontier``; with ``memorization_low``/``_high`` and
    ``retention_low``/``_high``, their 95% intervals as error bars), the frontier as a step
    line; optional
    ``trajectories`` (``label``, ``step``, ``memorization``, ``retention``) as faint paths in
    the color of their fine-tune."""
    import seaborn as sns

    labels = list(pd.unique(points["label"]))
    palette = dict(zip(labels, sns.color_palette(n_colors=len(labels)), strict=True))
    if trajectories is not None and not trajectories.empty:
        for label, path in trajectories.groupby("label", sort=False):
            path = path.sort_values("step")
            ax.plot(path["memorization"], path["retention"], color=palette.get(label, "grey"),
                    alpha=0.4, linewidth=1, marker=".", markersize=3)
    sns.scatterplot(data=points, x="memorization", y="retention", hue="label", style="label",
                    palette=palette, s=110, ax=ax, zorder=3)
    bounds = list(INTERVAL_COLUMNS)
    if set(bounds) <= set(points.columns):
        for _, row in points.iterrows():
            if any(pd.isna(row[b]) for b in bounds):
                continue
            ax.errorbar(row["memorization"], row["retention"],
                        xerr=[[row["memorization"] - row["memorization_low"]],
                              [row["memorization_high"] - row["memorization"]]],
                        yerr=[[row["retention"] - row["retention_low"]],
                              [row["retention_high"] - row["retention"]]],
                        fmt="none", ecolor=palette[row["label"]], alpha=0.6, capsize=2,
                        zorder=2)
    front = points[points["on_frontier"]].sort_values("memorization")
    if not front.empty:
        ax.step(front["memorization"], front["retention"], where="post", color="black",
                linestyle="--", linewidth=1.2, label="Pareto frontier", zorder=2)
    ax.axhline(1.0, color="grey", linestyle=":", linewidth=1)
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(0, max(1.05, float(points["retention"].max()) + 0.05))
    ax.set_xlabel("memorization of the injected facts")
    ax.set_ylabel("retention of held-out capabilities (mean ratio)")
    ax.legend(fontsize=8, loc="best")
    return ax


def plot_retention_by_capability(long: pd.DataFrame, ax):
    """Retention per capability (columns ``label``, ``capability``, ``retention``) as bars."""
    import seaborn as sns

    sns.barplot(data=long, x="capability", y="retention", hue="label", ax=ax)
    ax.axhline(1.0, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("")
    ax.set_ylabel("retention (fine-tuned / base)")
    ax.legend(fontsize=7, ncols=2)
    return ax


def plot_trajectory(trajectory: pd.DataFrame, ax, peak_step: int | None = None):
    """Memorization, paraphrase and retention against step (columns ``step`` and those)."""
    for column in ("memorization", "paraphrase", "retention"):
        ax.plot(trajectory["step"], trajectory[column], marker="o", label=column)
    if peak_step is not None:
        ax.axvline(peak_step, color="black", linestyle="--", linewidth=1,
                   label=f"first memorization peak (step {peak_step})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("accuracy / retention")
    ax.legend(fontsize=8)
    return ax


def write_figures(out: Path, table: pd.DataFrame, trajectories: pd.DataFrame,
                  peak_step: int | None, rescored: bool = False) -> None:
    """``pareto.png`` (with the trajectories unless the points were rescored on other probes,
    which would put two scales in one plot), ``retention_by_capability.png`` and
    ``sft_trajectory.png`` (training-time probes)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.2, 5.0), layout="constrained")
    ax = plot_pareto(table, fig.subplots(), None if rescored else trajectories)
    if rescored:
        ax.set_title(f"final models scored on {int(table['probes_scored'].iloc[0])} probes",
                     fontsize=9)
    write_figure(out / "pareto.png", fig, dpi=150)
    if table.get("above_chance_retention") is not None and \
            table["above_chance_retention"].notna().any():
        clear = table.assign(**{f"retention{s}": table[f"above_chance_retention{s}"]
                                for s in ("", "_low", "_high")})
        clear["on_frontier"] = pareto_frontier(clear)
        fig = Figure(figsize=(7.2, 5.0), layout="constrained")
        ax = plot_pareto(clear, fig.subplots())
        ax.set_ylabel("retention of the capabilities the base answers above chance")
        ax.set_title(f"final models scored on {int(table['probes_scored'].iloc[0])} probes",
                     fontsize=9)
        write_figure(out / "pareto_above_chance.png", fig, dpi=150)
    capabilities = capability_columns(table)
    long = table.melt(id_vars=["label"], value_vars=capabilities, var_name="capability",
                      value_name="ratio").dropna(subset=["ratio"]).rename(
                          columns={"ratio": "retention"})
    long["capability"] = long["capability"].str.removeprefix("retention_")
    if not long.empty:
        fig = Figure(figsize=(9.0, 4.2), layout="constrained")
        plot_retention_by_capability(long, fig.subplots())
        write_figure(out / "retention_by_capability.png", fig, dpi=150)
    sft = trajectories[trajectories["run"] == "sft"] if not trajectories.empty else trajectories
    if not sft.empty:
        fig = Figure(figsize=(6.4, 4.2), layout="constrained")
        ax = plot_trajectory(sft, fig.subplots(), peak_step)
        if rescored:
            ax.set_title("scored during training, on the training-time probes", fontsize=9)
        write_figure(out / "sft_trajectory.png", fig, dpi=150)


# --- the study ----------------------------------------------------------------------------------

def run_study(config: ParetoConfig) -> pd.DataFrame:
    """Train (or reuse) every fine-tune, then write the table, ``runs.json`` and the figures."""
    cache = Path(config.cache)
    cache.mkdir(parents=True, exist_ok=True)
    records, probes = prepare_records(config, cache), prepare_probes(config, cache)
    if config.rescore_probes_per_capability:  # a bad rescore set fails now, not after training
        prepare_probes(config, cache, config.rescore_probes_per_capability, rescoring=True)
    specs = plan_runs(config, records, probes)
    inputs = (rescoring_inputs(config, records, cache) if config.rescore_probes_per_capability
              else None)
    results, seconds, trajectories, trained = {}, {}, [], 0
    for spec in specs:
        restored = restore_record(config, spec, inputs)
        results[spec.name], seconds[spec.name], skipped = run_or_skip(spec)
        trained += not skipped
        if not restored:  # scored now, while its weights are here, and kept with its record
            if inputs is not None:
                score_rows(config, study_rows([spec], results, seconds), inputs)
            save_record(config, spec)
        if spec.train_config.eval_steps:
            path = eval_trajectory(Path(spec.train_config.output_dir))
            trajectories.append(path.assign(label=spec.label, run=spec.name))
    table = pd.DataFrame(study_rows(specs, results, seconds))
    base_scores = next(iter(results.values()))["base_scores"]
    if config.rescore_probes_per_capability:
        table, base_scores = rescore(config, table, records, cache)
    table["on_frontier"] = pareto_frontier(table)
    trajectories = pd.concat(trajectories, ignore_index=True) if trajectories else pd.DataFrame()
    write_outputs(config, table, trajectories, base_scores, records, probes)
    logger.info("wrote %s (%d runs trained, %d skipped)", config.out, trained,
                len(specs) - trained)
    return table


def write_outputs(config: ParetoConfig, table: pd.DataFrame, trajectories: pd.DataFrame,
                  base_scores: dict[str, Any], records: str, probes: str) -> None:
    out = Path(config.out)
    with atomic_write(out / "pareto_config.yaml") as handle:
        yaml.safe_dump(config_to_dict(config), handle, sort_keys=False)
    shown = table.drop(columns=["model_path", "config_hash"])
    with atomic_write(out / "results.csv") as handle:
        shown.to_csv(handle, index=False)
    if not trajectories.empty:
        with atomic_write(out / "trajectories.csv") as handle:
            trajectories.to_csv(handle, index=False)
    budget = {"max_steps": config.max_steps,
              "examples_per_step": config.per_device_train_batch_size
              * config.gradient_accumulation_steps,
              "learning_rate": config.learning_rate, "lr_scheduler_type": config.lr_scheduler_type,
              "warmup_steps": config.warmup_steps, "seed": config.seed,
              "opsd_completions_per_prompt": config.opsd_num_generations}
    peak = table.loc[table["label"].str.endswith(PEAK_SUFFIX), "steps"]
    peak_step = int(peak.iloc[0]) if len(peak) else None
    retained = sorted(c for c in base_scores["capabilities"] if c not in INJECTED_CAPABILITIES)
    atomic_write_json(out / "results.json", {
        "model": config.model, "records": records, "probes": probes, "budget": budget,
        "base_scores": base_scores, "retained_capabilities": retained,
        "sft_peak_step": peak_step, "rows": json_rows(shown)})
    atomic_write_json(out / "runs.json", {"model": config.model, "records": records,
                                          "probes": probes, "runs": json_rows(table)})
    write_figures(out, table, trajectories, peak_step,
                  rescored=bool(config.rescore_probes_per_capability))


def format_table(table: pd.DataFrame) -> str:
    """The table as Markdown (what experiments/README.md shows)."""
    capabilities = capability_columns(table)
    shown = table.copy()
    clear = [c for c in ("vs_sft", "above_chance_retention", "above_chance_vs_sft")
             if c in shown]
    for name in ("memorization", "retention", *clear):
        if f"{name}_low" in shown:
            shown[name] = [_with_interval(v, lo, hi) for v, lo, hi in
                           zip(shown[name], shown[f"{name}_low"], shown[f"{name}_high"],
                               strict=True)]
    columns = ["label", "steps", "memorization", "paraphrase", "retention", *clear,
               *capabilities, "on_frontier"]
    shown = shown[columns].rename(columns={c: c.removeprefix("retention_") for c in capabilities})
    return markdown_table(shown)


def _with_interval(value, low, high) -> Any:
    """``0.52 [0.47, 0.57]``, or the value alone without an interval."""
    if value is None or pd.isna(value) or low is None or pd.isna(low):
        return value
    return f"{value:.3f} [{low:.3f}, {high:.3f}]"


@command_line
def main(argv: Sequence[str] | None = None) -> pd.DataFrame | None:
    config, _ = parse_cli((ParetoConfig, MixConfig), argv, "experiments/pareto.py", doc=__doc__,
                          log_format="%(asctime)s %(name)s: %(message)s")
    seed_everything(config.seed)
    started = time.perf_counter()
    table = run_study(config)
    print(format_table(table))
    print(f"\n{config.out}: {time.perf_counter() - started:.0f} s")
    return table


if __name__ == "__main__":
    main()
