"""Fisher study: does movement along the base model's Fisher-sensitive directions predict
forgetting?

For every fine-tune of one or more Pareto studies (``runs.json``: SFT, SFT@peak, MixSD at each
lambda, OPSD) this computes, against the Fisher of the *base* model on the retention probes:

- ``fisher_displacement`` ``d'Fd`` of the update ``d = theta_ft - theta_base``: exact
  (matrix-free, :func:`forgetkit.fisher.displacement`), with the diagonal Fisher and along the
  top ``rank`` directions of ``representation``, the low-rank Fisher or, where its N x P
  gradients do not fit (all of a real model's weights), the Kronecker-factored one (EK-FAC)
  (:func:`forgetkit.fisher.project`); the predicted KL is ``d'Fd / 2``;
- ``rayleigh_diag = d'F_diag d / ||d||^2`` and ``rayleigh_lowrank``: the displacement per unit
  of update, i.e. how Fisher-sensitive the update's *direction* is, whatever its size;
- ``energy_lowrank``: the share of ``||d||^2`` in the top-``rank`` Fisher eigendirections, and
  ``energy_diag``: its share in the ``rank`` coordinates of largest diagonal Fisher;
- ``measured_kl``: ``E_x sum_t KL(p_base || p_ft)`` on the same probes
  (:func:`forgetkit.fisher.kl.measured_kl`, per sequence, what ``d'Fd / 2`` predicts);
- ``delta_norm`` ``||d||``: the control every Fisher measure should beat.

Across all runs it reports the Spearman rank correlation (:func:`scipy.stats.spearmanr`) of
each diagnostic with the measured retention loss ``1 - retention`` (overall, over the
capabilities the base answers above chance where the Pareto study gives that retention, and
per capability), with its two-sided p-value, n and a 95% bootstrap interval over
fine-tunes. With the 7 fine-tunes of one Pareto study the p-values are coarse (read rho, not
significance stars); give several studies of the same base (``--pareto A,B,...``, e.g. other
learning rates or seeds) to correlate across more runs.

The probes are the Pareto study's probe file (or ``probes``) minus the capabilities that test
the injected facts (``two_hop``), spread evenly over capabilities (``n_samples``). Fisher matrices
are cached in ``cache`` and each fine-tune's numbers kept in ``out/runs/<study>/<run>.json``,
keyed by everything they depend on, so a rerun only computes what changed, and the numbers
outlast the fine-tunes' weights (``--available_only`` diagnoses the fine-tunes whose weights are
here, from the Pareto studies' run records, without writing a table).

Outputs in ``out`` (default ``experiments/results/fisher/<model>/``): ``fisher_study_config.yaml``,
``diagnostics.csv`` / ``.json`` (one row per fine-tune), ``correlations.csv`` (overall and per
capability), ``captured_energy.csv``, ``summary.json`` and the figures
``diagnostics_vs_retention_loss.png``, ``predicted_vs_measured_kl.png``,
``captured_energy.png``, ``displacement.png``.

    python experiments/fisher_study.py --config experiments/configs/fisher_toyworld.yaml
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from scipy import stats

from forgetkit import fisher
from forgetkit.cli_config import command_line, config_to_dict, markdown_table, parse_cli
from forgetkit.cli_config import help_metadata as _help
from forgetkit.data.records import load_probe_sets
from forgetkit.diagnostics.evaluation import INJECTED_CAPABILITIES
from forgetkit.files import atomic_write, atomic_write_json, json_rows, write_figure
from forgetkit.fisher import plots as fisher_plots
from forgetkit.fisher.delta import delta as param_delta
from forgetkit.fisher.kl import measured_kl
from forgetkit.fisher.project import project
from forgetkit.fisher.report import spread_sample
from forgetkit.models import load_model
from forgetkit.seeding import stable_hash

INTERVAL_COLUMNS = ("memorization_low", "memorization_high", "retention_low", "retention_high")
"""Interval bounds in a Pareto study's runs (experiments/pareto.py), not capabilities."""

logger = logging.getLogger("fisher_study")

DIAGNOSTICS = {
    "delta_norm": "||Δθ|| (control)",
    "displacement_exact": "Δθ'FΔθ, exact (matrix-free)",
    "displacement_diag": "diagonal proxy Σ F_jj Δθ_j²",
    "displacement_lowrank": "top-k Δθ'FΔθ (low-rank or EK-FAC)",
    "rayleigh_diag": "Δθ'FΔθ / ||Δθ||², diagonal F",
    "rayleigh_lowrank": "Δθ'FΔθ / ||Δθ||², top-k of low-rank or EK-FAC F",
    "energy_lowrank": "share of ||Δθ||² in top-k eigendirections",
    "energy_diag": "share of ||Δθ||² in top-k diagonal coordinates",
    "measured_kl": "measured KL(base || ft) per probe",
}
"""The diagnostics correlated with retention loss (column -> description)."""


@dataclass
class FisherStudyConfig:
    """``python experiments/fisher_study.py``: Fisher diagnostics of every Pareto fine-tune."""

    model: str = field(default="toyworld", metadata=_help(
        "base model of the Pareto study (name or path)"))
    pareto: list[str] = field(default_factory=lambda: ["experiments/results/pareto/{model}"],
                              metadata=_help(
        "the Pareto studies' results folders (--pareto DIR DIR; each runs.json lists "
        "fine-tunes; all must share the base model and the probes)"))
    probes: str | None = field(default=None, metadata=_help(
        "probes of the Fisher and the KL: comma-separated sets (names or files; a capability "
        "name taken by an earlier set becomes <set>:<capability>, as in training); none: the "
        "Pareto study's probe file"))
    n_samples: int = field(default=128, metadata=_help(
        "probes used, spread evenly over capabilities"))
    rank: int = field(default=16, metadata=_help("top Fisher directions (k)"))
    representation: str = field(default="low_rank", metadata=_help(
        "the Fisher whose top-k directions give the *_lowrank columns: low_rank (the N x P "
        "gradients) | kfac (Kronecker-factored, EK-FAC; for all of a real model's weights)"))
    estimator: str = field(default="true", metadata=_help("Fisher estimator: true | empirical"))
    mc_samples: int = field(default=1, metadata=_help("label draws per probe (true Fisher)"))
    params: str | None = field(default=None, metadata=_help(
        "regex on parameter names: only these enter the Fisher and the update; none: all"))
    batch_size: int = field(default=8, metadata=_help("examples per per-example-gradient call"))
    kl_batch_size: int = field(default=16, metadata=_help("examples per forward of the KL"))
    seed: int = field(default=0, metadata=_help("seed of the Fisher's label draws"))
    dtype: str | None = field(default=None, metadata=_help("model dtype; default float32"))
    device: str | None = field(default=None, metadata=_help("cpu, cuda, ...; default cuda if any"))
    out: str = field(default="experiments/results/fisher/{model}", metadata=_help(
        "results folder ({model}: the model's name)"))
    cache: str = field(default="experiments/results/fisher/cache/{model}", metadata=_help(
        "Fisher matrices (git-ignored); each fine-tune's numbers are kept in out/runs/"))
    available_only: bool = field(default=False, metadata=_help(
        "diagnose only the fine-tunes whose weights are here, found from each Pareto study's "
        "run records (<pareto>/runs/, written as each run finishes, before its runs.json), and "
        "keep their numbers in out/runs/ without writing a table: for a Pareto study trained "
        "over several machines, whose weights do not outlast the machine"))
    kept_only: bool = field(default=False, metadata=_help(
        "correlate only the fine-tunes whose numbers are kept in out/runs/, diagnosing none, "
        "and list the others in summary.json (missing): a partial study, while the fine-tunes "
        "of a Pareto study trained over several machines are still being diagnosed"))

    def __post_init__(self):
        problems = []
        if self.available_only and self.kept_only:
            problems.append("available_only and kept_only exclude each other")
        if self.estimator not in ("true", "empirical"):
            problems.append(f"estimator={self.estimator!r} must be true or empirical")
        if self.representation not in ("low_rank", "kfac"):
            problems.append(f"representation={self.representation!r} must be low_rank or kfac")
        for name in ("n_samples", "rank", "mc_samples", "batch_size", "kl_batch_size"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be >= 1")
        if problems:
            raise ValueError("FisherStudyConfig: " + "; ".join(problems))
        slug = Path(self.model.rstrip("/")).name or self.model
        for name in ("out", "cache"):
            setattr(self, name, getattr(self, name).replace("{model}", slug))
        self.pareto = [folder.replace("{model}", slug) for folder in self.pareto]
        if not self.pareto:
            raise ValueError("FisherStudyConfig: pareto needs at least one results folder")
        names = [Path(folder.rstrip("/")).name for folder in self.pareto]
        if len(set(names)) < len(names):
            raise ValueError(f"FisherStudyConfig: pareto folders need distinct names: {names}")


# --- inputs -------------------------------------------------------------------------------------

def read_runs(config: FisherStudyConfig) -> list[dict[str, Any]]:
    """Each Pareto study's ``runs.json``, with its folder name as ``study``; checks that all were
    made from ``config.model`` and scored on the same probes (one Fisher serves them all)."""
    studies = []
    for folder in config.pareto:
        path = Path(folder) / "runs.json"
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: run experiments/pareto.py for "
                                    f"{config.model} first")
        runs = json.loads(path.read_text(encoding="utf-8"))
        if runs["model"] != config.model:
            raise ValueError(f"{path} was made from {runs['model']!r}, not {config.model!r}")
        if studies and not _same_probes(runs["probes"], studies[0]["probes"]):
            raise ValueError(f"{path} was scored on probes {runs['probes']!r}, but "
                             f"{config.pareto[0]}/runs.json on {studies[0]['probes']!r}; "
                             "the studies' retention is not comparable")
        studies.append({**runs, "study": Path(folder.rstrip("/")).name})
    return studies


def _same_probes(first: str, second: str) -> bool:
    """Whether two Pareto studies' probe sources are the same: equal names, or two files
    (each study writes its own copy) with equal contents."""
    if first == second:
        return True
    paths = [Path(first), Path(second)]
    return all(p.is_file() for p in paths) and paths[0].read_bytes() == paths[1].read_bytes()


def probe_sample(config: FisherStudyConfig, pareto_probes: str) -> list:
    """Retention probes (injected-fact capabilities removed), spread over capabilities."""
    sources = [s.strip() for s in (config.probes or pareto_probes).split(",") if s.strip()]
    probes = [p for p in load_probe_sets(sources) if p.capability not in INJECTED_CAPABILITIES]
    if not probes:
        raise ValueError("no retention probe left after removing "
                         f"{', '.join(INJECTED_CAPABILITIES)}")
    return spread_sample(probes, config.n_samples)


def fisher_key(config: FisherStudyConfig, sample: list) -> str:
    """Everything the two Fisher matrices depend on."""
    # low_rank's keys stay those of the caches made before the representation was an option
    extra = () if config.representation == "low_rank" else (config.representation,)
    return stable_hash(config.model, [(p.prompt, p.answer) for p in sample], config.rank,
                       config.estimator, config.mc_samples, config.params, config.seed,
                       config.dtype, *extra)


def base_fishers(config: FisherStudyConfig, base, tokenizer, sample: list, key: str):
    """(top-k representation, diagonal) Fisher of the base on ``sample``; loaded from
    ``cache`` when there."""
    folder = Path(config.cache) / f"fisher-{key}"
    paths = {"low_rank": folder / "low_rank", "diagonal": folder / "diagonal"}
    if (folder / "done.json").exists():
        logger.info("reusing the base Fisher in %s", folder)
        return fisher.load(paths["low_rank"], base), fisher.load(paths["diagonal"], base)
    rank = min(config.rank, len(sample) * config.mc_samples)
    common = {"estimator": config.estimator, "mc_samples": config.mc_samples,
              "params": config.params, "batch_size": config.batch_size, "seed": config.seed}
    started = time.perf_counter()
    low = (fisher.kfac(base, tokenizer, sample, **common) if config.representation == "kfac"
           else fisher.low_rank(base, tokenizer, sample, rank=rank, **common))
    diag = fisher.diagonal(base, tokenizer, sample, **common)
    low.save(paths["low_rank"])
    diag.save(paths["diagonal"])
    atomic_write_json(folder / "done.json", {"seconds": time.perf_counter() - started})
    return low, diag


# --- per fine-tune ------------------------------------------------------------------------------

def kept_path(config: FisherStudyConfig, run: dict) -> Path:
    return Path(config.out) / "runs" / run["study"] / f"{run['run']}.json"


def _run_key(run: dict, key: str) -> str:
    """The key of one fine-tune's kept numbers: the base Fisher's key, the run, the
    diagnostics."""
    return stable_hash(key, run["config_hash"], run["model_path"], run["steps"], list(DIAGNOSTICS))


def _kept(config: FisherStudyConfig, run: dict, key: str) -> dict[str, Any] | None:
    """The diagnostics kept for ``run`` under the current base Fisher ``key``, if any."""
    path = kept_path(config, run)
    if not path.exists():
        return None
    saved = json.loads(path.read_text(encoding="utf-8"))
    return saved["diagnostics"] if saved.get("key") == _run_key(run, key) else None


def has_weights(model_path: str) -> bool:
    return (Path(model_path) / "config.json").is_file()


def _file_hash(path: Path) -> str | None:
    return stable_hash(path.read_bytes().hex()) if path.is_file() else None


def weights_of_record(run: dict) -> bool:
    """Whether the weights in ``run``'s model folder are those of its record as it was read:
    the run folder's results file (``results.json``, or ``peak.json`` for a peak) still equals
    the record's. A Pareto study training a run again replaces the weights before the
    record, so the old record can point at the new weights for a while."""
    return _file_hash(run["witness"]) == run["record_hash"]


def recorded_runs(config: FisherStudyConfig) -> list[dict[str, Any]]:
    """The fine-tunes of each Pareto study's run records (``<pareto>/runs/<run>/``: a finished
    run's config, results and peak), as ``runs.json`` would list them (run, config hash, model
    folder, steps, label, study), with the probes they were scored on; checks the base model."""
    from forgetkit.train.checkpoint import saved_config

    runs = []
    for folder in config.pareto:
        study = Path(folder.rstrip("/")).name
        for record in sorted(p for p in (Path(folder) / "runs").glob("*") if p.is_dir()):
            if not (record / "results.json").is_file():
                continue
            train_config = saved_config(record)
            if train_config.model_name_or_path != config.model:
                raise ValueError(f"{record} was trained from {train_config.model_name_or_path!r}, "
                                 f"not {config.model!r}")
            results = json.loads((record / "results.json").read_text(encoding="utf-8"))
            key = train_config.config_hash()
            common = {"study": study, "probes": train_config.probes, "label": record.name}
            runs.append({**common, "run": record.name, "config_hash": key,
                         "model_path": results["model_path"], "steps": results["global_step"],
                         "record_hash": _file_hash(record / "results.json"),
                         "witness": Path(results["output_dir"]) / "results.json"})
            if (record / "peak.json").is_file():
                peak = json.loads((record / "peak.json").read_text(encoding="utf-8"))
                runs.append({**common, "run": record.name + "-peak", "config_hash": key + "-peak",
                             "model_path": peak["model_path"], "steps": peak["step"],
                             "record_hash": _file_hash(record / "peak.json"),
                             "witness": Path(results["output_dir"]) / "peak.json"})
    return runs


def diagnose_available(config: FisherStudyConfig) -> list[dict[str, Any]]:
    """:func:`diagnose` every recorded fine-tune whose weights are here and whose numbers are
    not kept yet, and then those recorded meanwhile (a Pareto study running beside it), until
    no new record appears; returns one row per recorded fine-tune: study, run, and ``status``
    (``kept``, ``diagnosed``, ``no weights``, or ``weights of another run``: the run is being
    trained again, and its new record is diagnosed when it appears)."""
    runs = recorded_runs(config)
    if not runs:
        raise FileNotFoundError(f"no run records in {', '.join(config.pareto)} (<pareto>/runs/): "
                                "run experiments/pareto.py first")
    base = tokenizer = fishers = sample = key = None
    rows, seen = [], set()
    while runs:
        run = runs.pop(0)
        seen.add((run["study"], run["run"], run["record_hash"]))
        if base is None:
            base, tokenizer = load_model(config.model, dtype=config.dtype, device=config.device)
            sample = probe_sample(config, run["probes"])
            key = fisher_key(config, sample)
        if _kept(config, run, key) is not None:
            status = "kept"
        elif not has_weights(run["model_path"]):
            status = "no weights"
        elif not weights_of_record(run):
            status = "weights of another run"  # trained again: its new record comes later
        else:
            if fishers is None:
                fishers = base_fishers(config, base, tokenizer, sample, key)
            logger.info("diagnosing %s/%s (%s)", run["study"], run["run"], run["model_path"])
            diagnose(config, base, tokenizer, sample, fishers, run, key)
            status = "diagnosed"
        logger.info("%s/%s: %s", run["study"], run["run"], status)
        rows.append({"study": run["study"], "run": run["run"], "status": status})
        if not runs:
            runs = [r for r in recorded_runs(config)
                    if (r["study"], r["run"], r["record_hash"]) not in seen]
    return rows


def diagnose(config: FisherStudyConfig, base, tokenizer, sample: list, fishers, run: dict,
             key: str) -> dict[str, Any]:
    """The diagnostics of one fine-tune (kept in ``out/runs/<study>/<run>.json`` under a key of
    the base Fisher, the run and the diagnostics, so they outlast the fine-tune's weights)."""
    path = kept_path(config, run)
    if (kept := _kept(config, run, key)) is not None:
        return kept
    if not has_weights(run["model_path"]):
        raise FileNotFoundError(
            f"{run['study']}/{run['run']}: no diagnostics of this fine-tune are kept in {path} "
            f"and its weights are not in {run['model_path']}: train it again (experiments/"
            "pareto.py) and diagnose it with --available_only before its weights are gone")
    low, diag = fishers
    started = time.perf_counter()
    finetuned = load_model(run["model_path"], dtype=config.dtype, device=config.device)[0]
    update = param_delta(base, finetuned, params=config.params)
    top = min(config.rank, low.rank)
    lowrank = project(update, low, rank=top)
    diagonal = project(update, diag, rank=top)
    exact = fisher.displacement(base, tokenizer, sample, update, estimator=config.estimator,
                                batch_size=config.batch_size, seed=config.seed)
    kl = measured_kl(base, finetuned, tokenizer, sample, batch_size=config.kl_batch_size)
    kl_ci = kl.interval(config.seed)
    sq_norm = diagonal.delta_sq_norm
    result = {
        "delta_norm": sq_norm ** 0.5,
        "displacement_exact": exact.mean,
        "displacement_exact_low": exact.ci[0],
        "displacement_exact_high": exact.ci[1],
        "predicted_kl_exact": exact.predicted_kl,
        "displacement_diag": diagonal.fisher_displacement,
        "displacement_lowrank": lowrank.fisher_displacement,
        "rayleigh_diag": diagonal.fisher_displacement / sq_norm if sq_norm > 0 else 0.0,
        "rayleigh_lowrank": lowrank.fisher_displacement / sq_norm if sq_norm > 0 else 0.0,
        "energy_lowrank": lowrank.captured_energy[-1],
        "energy_diag": diagonal.captured_energy[-1],
        "random_baseline": lowrank.random_baseline[-1],
        "predicted_kl_diag": diagonal.predicted_kl,
        "predicted_kl_lowrank": lowrank.predicted_kl,
        "predicted_kl_valid": lowrank.predicted_kl_valid,
        "measured_kl": kl.per_sequence,
        "measured_kl_low": kl_ci.low,
        "measured_kl_high": kl_ci.high,
        "measured_kl_per_token": kl.per_token,
        "energy_curve_lowrank": lowrank.captured_energy,
        "energy_curve_diag": diagonal.captured_energy,
        "random_baseline_curve": lowrank.random_baseline,
        "seconds": time.perf_counter() - started,
    }
    atomic_write_json(path, {"key": _run_key(run, key), "run": run["run"], "diagnostics": result})
    del finetuned
    return result


# --- correlations -------------------------------------------------------------------------------

def _rho(x, y, axis=-1):
    """Spearman rho along ``axis``, one value per row of paired resamples."""
    rx = stats.rankdata(x, axis=axis)
    ry = stats.rankdata(y, axis=axis)
    rx = rx - rx.mean(axis=axis, keepdims=True)
    ry = ry - ry.mean(axis=axis, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (rx * ry).sum(axis) / np.sqrt((rx**2).sum(axis) * (ry**2).sum(axis))


def spearman_table(table: pd.DataFrame, targets: dict[str, str], seed: int = 0) -> pd.DataFrame:
    """Spearman rho (two-sided p, n, 95% bootstrap interval over fine-tunes) of every
    diagnostic with every target column.

    ``targets`` maps a target column (e.g. ``retention_loss``) to its display name. Rows with a
    missing value in either column are left out of that pair; a pair with fewer than 3 rows or
    a constant column gets NaN. The interval resamples fine-tunes with replacement (paired);
    resamples with a constant column are left out.
    """
    rows = []
    for target, target_name in targets.items():
        for diagnostic, description in DIAGNOSTICS.items():
            pair = table[[diagnostic, target]].dropna()
            n = len(pair)
            rho, p, low, high = (float("nan"),) * 4
            if n >= 3 and pair[diagnostic].nunique() > 1 and pair[target].nunique() > 1:
                result = stats.spearmanr(pair[diagnostic], pair[target])
                rho, p = float(result.statistic), float(result.pvalue)
                x, y = pair[diagnostic].to_numpy(), pair[target].to_numpy()
                index = np.random.default_rng(seed).integers(0, n, size=(2000, n))
                draws = _rho(x[index], y[index])
                draws = draws[np.isfinite(draws)]
                if draws.size:
                    low, high = (float(v) for v in np.quantile(draws, [0.025, 0.975]))
            rows.append({"target": target_name, "diagnostic": diagnostic,
                         "description": description, "rho": rho, "rho_low": low,
                         "rho_high": high, "p_value": p, "n": n})
    return pd.DataFrame(rows)


# --- figures ------------------------------------------------------------------------------------

def plot_diagnostic_vs_loss(points: pd.DataFrame, ax, diagnostic: str, rho: float, p: float):
    """One diagnostic (x, log scale when positive) against retention loss (y), one labelled
    point per fine-tune (columns ``label``, ``retention_loss`` and ``diagnostic``). With a
    ``study`` column of several values, each study gets its own marker and a legend entry, and
    the points are labelled without the study's name."""
    several = "study" in points and points["study"].nunique() > 1
    groups = points.groupby("study", sort=False) if several else [(None, points)]
    for marker, (study, group) in zip("osD^v<>p*", groups, strict=False):
        ax.scatter(group[diagnostic], group["retention_loss"], s=28 if several else 40,
                   marker=marker, label=study)
        for _, row in group.iterrows():
            text = row["label"].removesuffix(f" [{study}]") if several else row["label"]
            ax.annotate(text, (row[diagnostic], row["retention_loss"]),
                        fontsize=5 if several else 6, xytext=(3, 3), textcoords="offset points")
    if several:
        ax.legend(fontsize=6, loc="best")
    if (points[diagnostic] > 0).all():
        from matplotlib.ticker import NullFormatter

        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels overlap within a decade
    ax.set_xlabel(DIAGNOSTICS[diagnostic], fontsize=8)
    ax.set_ylabel("retention loss (1 - retention)", fontsize=8)
    ax.set_title(f"Spearman ρ = {rho:.2f} (p = {p:.2g}, n = {len(points)})", fontsize=9)
    return ax


def write_figures(out: Path, table: pd.DataFrame, correlations: pd.DataFrame,
                  energy: pd.DataFrame, representation: str = "low_rank") -> None:
    from matplotlib.figure import Figure

    overall = correlations[correlations["target"] == "overall"].set_index("diagnostic")
    fig = Figure(figsize=(13, 10), layout="constrained")
    axes = fig.subplots(3, 3).ravel()
    for ax, diagnostic in zip(axes, DIAGNOSTICS, strict=False):
        plot_diagnostic_vs_loss(table, ax, diagnostic, overall.loc[diagnostic, "rho"],
                                overall.loc[diagnostic, "p_value"])
    for ax in axes[len(DIAGNOSTICS):]:
        ax.set_visible(False)
    write_figure(out / "diagnostics_vs_retention_loss.png", fig, dpi=140)
    names = {"exact": "exact", "diag": "diagonal proxy",
             "lowrank": "top-k lower bound" if representation == "low_rank" else "top-k EK-FAC"}

    def bounds(name: str, scale: float) -> dict[str, Any]:
        """The exact form's 95% interval over probes; the proxies carry none (NaN)."""
        if name != "exact":
            return {"low": float("nan"), "high": float("nan")}
        return {"low": table["displacement_exact_low"] * scale,
                "high": table["displacement_exact_high"] * scale}

    kl = pd.concat([
        table.assign(representation=names[name], predicted_kl=table[f"predicted_kl_{name}"],
                     **{f"predicted_{k}": v for k, v in bounds(name, 0.5).items()},
                     measured_low=table["measured_kl_low"],
                     measured_high=table["measured_kl_high"])
        for name in names])[["label", "representation", "predicted_kl", "predicted_low",
                             "predicted_high", "measured_kl", "measured_low",
                             "measured_high"]].rename(columns={"label": "finetune"})
    figures = {
        "predicted_vs_measured_kl.png": (fisher_plots.predicted_vs_measured_kl, kl),
        "captured_energy.png": (fisher_plots.captured_energy, energy),
        "displacement.png": (fisher_plots.displacement_bars, pd.concat([
            table.assign(representation=names[name],
                         fisher_displacement=table[f"displacement_{name}"],
                         **bounds(name, 1.0))
            for name in names])[["label", "representation", "fisher_displacement", "low",
                                 "high"]].rename(columns={"label": "finetune"})),
    }
    wide = len(table) > 10  # room for the labels and legend entries of many fine-tunes
    for name, (plot, frame) in figures.items():
        fig = Figure(figsize=(12, 6) if wide else (7.5, 4.6), layout="constrained")
        ax = plot(frame, fig.subplots())
        if name == "displacement.png":  # long labels end under their bars, inside the figure
            for label in ax.get_xticklabels():
                label.set(rotation=30, ha="right", rotation_mode="anchor", fontsize=7)
        write_figure(out / name, fig, dpi=140)


# --- the study ----------------------------------------------------------------------------------

def run_study(config: FisherStudyConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Diagnose every fine-tune and correlate; returns (diagnostics table, correlations)."""
    started = time.perf_counter()
    studies = read_runs(config)
    several = len(studies) > 1
    base, tokenizer = load_model(config.model, dtype=config.dtype, device=config.device)
    sample = probe_sample(config, studies[0]["probes"])
    key = fisher_key(config, sample)
    runs = [dict(run, study=study["study"]) for study in studies for run in study["runs"]]
    kept = {id(run): _kept(config, run, key) for run in runs}
    left_out = [run for run in runs if kept[id(run)] is None
                and (config.kept_only or not has_weights(run["model_path"]))]
    missing = [f"{run['study']}/{run['run']}" for run in left_out]
    if missing and not config.kept_only:  # before the Fisher: an error, not hours later
        run = left_out[0]
        raise FileNotFoundError(
            f"{missing[0]}: no diagnostics of this fine-tune are kept in "
            f"{kept_path(config, run)} and its weights are not in {run['model_path']}: train "
            "it again (experiments/pareto.py) and diagnose it with --available_only before its "
            f"weights are gone ({len(missing)} such fine-tunes: {', '.join(missing)}; "
            "--kept_only correlates the others)")
    if missing:
        logger.warning("kept_only: %d of %d fine-tunes have no kept numbers and are left out: "
                       "%s", len(missing), len(runs), ", ".join(missing))
    fishers = None  # computed only when a fine-tune has no kept numbers
    rows, energy = [], []
    by_model: dict[str, dict[str, Any]] = {}  # SFT@peak is often the final SFT model itself
    for run in runs:
        label = f"{run['label']} [{run['study']}]" if several else run["label"]
        if any(run is other for other in left_out):
            continue
        if run["model_path"] not in by_model:
            if kept[id(run)] is None and fishers is None:
                fishers = base_fishers(config, base, tokenizer, sample, key)
            logger.info("%s %s (%s)", "diagnosing" if kept[id(run)] is None else
                        "the kept numbers of", label, run["model_path"])
            by_model[run["model_path"]] = diagnose(config, base, tokenizer, sample, fishers,
                                                   run, key)
        result = by_model[run["model_path"]]
        capabilities = {k: v for k, v in run.items()
                         if k.startswith("retention_") and k not in INTERVAL_COLUMNS}
        rows.append({"label": label, "study": run["study"], "run": run["run"],
                     "steps": run["steps"],
                     "memorization": run["memorization"], "retention": run["retention"],
                     "retention_loss": None if run["retention"] is None else 1 - run["retention"],
                     "above_chance_loss": None if run.get("above_chance_retention") is None
                     else 1 - run["above_chance_retention"],
                     **{f"loss_{k.removeprefix('retention_')}": None if v is None else 1 - v
                        for k, v in capabilities.items()},
                     **{k: v for k, v in result.items() if not k.endswith("curve")}})
        for j, (e, b) in enumerate(zip(result["energy_curve_lowrank"],
                                       result["random_baseline_curve"], strict=True), start=1):
            energy.append({"finetune": label, "j": j, "captured_energy": e,
                           "random_baseline": b})
    if not rows:
        raise FileNotFoundError(f"no fine-tune of {', '.join(config.pareto)} has kept numbers "
                                f"in {Path(config.out) / 'runs'}: diagnose them first "
                                "(--available_only)")
    table = pd.DataFrame(rows)
    table.attrs["missing"] = missing  # the fine-tunes left out (kept_only)
    targets = {"retention_loss": "overall"}
    if table["above_chance_loss"].notna().any():  # the capabilities the base can do
        targets["above_chance_loss"] = "above chance"
    targets.update({c: c.removeprefix("loss_") for c in table.columns if c.startswith("loss_")})
    correlations = spearman_table(table, targets)
    kl_check = {name: stats.spearmanr(table[f"predicted_kl_{name}"], table["measured_kl"])
                for name in ("exact", "diag", "lowrank")}
    write_outputs(config, table, correlations, pd.DataFrame(energy), {
        "n_finetunes": len(table), "n_probes": len(sample), "fisher_key": key,
        "rank": len(next(iter(by_model.values()))["energy_curve_lowrank"]),
        "representation": config.representation, "estimator": config.estimator,
        "parameters": sum(p.numel() for p in fisher.select_parameters(base, config.params)
                          .values()),
        "missing": missing,
        "predicted_vs_measured_kl_spearman": {
            name: {"rho": _finite(r.statistic), "p_value": _finite(r.pvalue), "n": len(table)}
            for name, r in kl_check.items()},
        "seconds": time.perf_counter() - started})
    return table, correlations


def _finite(value) -> float | None:
    """``value`` as a float, ``None`` when undefined (NaN: fewer than 3 fine-tunes, a constant
    column), so the summary stays valid JSON."""
    value = float(value)
    return value if np.isfinite(value) else None


def write_outputs(config: FisherStudyConfig, table: pd.DataFrame, correlations: pd.DataFrame,
                  energy: pd.DataFrame, summary: dict[str, Any]) -> None:
    out = Path(config.out)
    with atomic_write(out / "fisher_study_config.yaml") as handle:
        yaml.safe_dump(config_to_dict(config), handle, sort_keys=False)
    for name, frame in {"diagnostics.csv": table, "correlations.csv": correlations,
                        "captured_energy.csv": energy}.items():
        with atomic_write(out / name) as handle:
            frame.to_csv(handle, index=False)
    atomic_write_json(out / "diagnostics.json", json_rows(table))
    atomic_write_json(out / "summary.json", {
        **summary, "config": asdict(config),
        "correlations_overall": json_rows(correlations[correlations["target"] == "overall"]),
        "correlations_above_chance": json_rows(
            correlations[correlations["target"] == "above chance"])})
    write_figures(out, table, correlations, energy, config.representation)
    logger.info("wrote %s", out)


@command_line
def main(argv: Sequence[str] | None = None):
    [config] = parse_cli(FisherStudyConfig, argv, "experiments/fisher_study.py", doc=__doc__,
                         log_format="%(asctime)s %(name)s: %(message)s")
    if config.available_only:
        rows = diagnose_available(config)
        print(markdown_table(pd.DataFrame(rows)))
        return pd.DataFrame(rows), None
    table, correlations = run_study(config)  # no Pareto results, or another base: an error
    columns = ["label", "memorization", "retention", "delta_norm", "displacement_exact",
               "displacement_diag", "displacement_lowrank", "rayleigh_diag", "rayleigh_lowrank", "energy_lowrank",
               "energy_diag",
               "predicted_kl_exact", "predicted_kl_diag", "predicted_kl_lowrank", "measured_kl"]
    print(markdown_table(table[columns], style="g"))
    print()
    for target in ("overall", "above chance"):
        if (correlations["target"] == target).any():
            print(f"\nSpearman with the retention loss, {target}:")
            rows = correlations[correlations["target"] == target]
            print(markdown_table(rows[["diagnostic", "rho", "rho_low", "rho_high", "p_value", "n"]],
                                 style="g"))
    if missing := table.attrs.get("missing"):
        print(f"\npartial: {len(missing)} fine-tunes without kept numbers are left out: "
              f"{', '.join(missing)}")
    return table, correlations


if __name__ == "__main__":
    main()
