"""NLL study: how probable is each method's supervision under the base model?

MixSD's claim 2 is that its targets have much lower per-token NLL under the base model than the
canonical SFT targets. This study scores, under the frozen base model, the SFT targets (each
record's canonical completion) and the MixSD targets at every lambda, with
:func:`forgetkit.diagnostics.nll.target_nll` (completion tokens only, end token included, teacher-forced),
and compares them with :func:`forgetkit.diagnostics.nll.compare_targets` (difference of the per-item mean
per-token NLL to SFT, percentile bootstrap CI, paired over the records both sets hold).

It differs from ``python -m forgetkit.nll`` in two ways: MixSD targets are built into resumable
files in ``cache`` (:func:`forgetkit.mixsd.build_target_file`; an interrupted build continues, a
finished one is reused), and MixSD tokens are also split by the branch that produced them
(expert or naive). With ``pareto_cache`` set, each target set is checked token for token against
the targets the Pareto study trained on (same model, records and mix settings must give the same
targets).

Outputs in ``out`` (default ``experiments/results/nll/<model>/``): ``nll_study_config.yaml``,
``nll_table.csv`` / ``.json``, ``branch_table.csv``, ``sequences.csv``, ``tokens.csv``,
``mixsd_reports.json``, ``summary.json`` and the figures of :mod:`forgetkit.plots`.

    python experiments/nll_study.py --config experiments/configs/nll_toyworld.yaml
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from forgetkit.cli_config import command_line, config_to_dict, markdown_table, parse_cli
from forgetkit.cli_config import help_metadata as _help
from forgetkit.data.records import load_records
from forgetkit.diagnostics.nll import (
    TargetNLL,
    compare_targets,
    sequence_frame,
    target_nll,
    token_frame,
    write_figures,
)
from forgetkit.files import atomic_write, atomic_write_json, json_rows, read_jsonl
from forgetkit.mixsd import MixConfig, MixedTarget, build_target_file
from forgetkit.models import load_model

logger = logging.getLogger("nll_study")



@dataclass
class NLLStudyConfig:
    """``python experiments/nll_study.py``: NLL of SFT and MixSD targets under the base model."""

    model: str = field(default="toyworld", metadata=_help("base model (name or path)"))
    records: str = field(default="kgfact", metadata=_help("records (name or file)"))
    limit: int | None = field(default=None, metadata=_help("use only the first N records"))
    lams: list[float] = field(default_factory=lambda: [0.0, 0.3, 0.5, 0.7], metadata=_help(
        "MixSD lambdas, one target set each (--lams 0 0.3 0.5)"))
    mix: MixConfig = field(default_factory=MixConfig, metadata=_help(
        "MixSD target settings (the MixConfig options; a mapping is read as one); mix.lam is "
        "set by each of lams"))
    batch_size: int = field(default=16, metadata=_help("items per scoring forward pass"))
    n_boot: int = field(default=2000, metadata=_help("bootstrap resamples of the CIs"))
    boot_seed: int = field(default=0, metadata=_help("bootstrap seed"))
    example: str | None = field(default=None, metadata=_help(
        "record id drawn in the token heat strip; default the first record"))
    pareto_cache: str | None = field(default=None, metadata=_help(
        "the Pareto study's cache folder ({model} filled): compare targets with the ones it "
        "trained on; none: no check"))
    dtype: str | None = field(default=None, metadata=_help("model dtype; default float32"))
    device: str | None = field(default=None, metadata=_help("cpu, cuda, ...; default cuda if any"))
    out: str = field(default="experiments/results/nll/{model}", metadata=_help(
        "results folder ({model}: the model's name)"))
    cache: str = field(default="experiments/results/nll/cache/{model}", metadata=_help(
        "MixSD target files (git-ignored)"))

    def __post_init__(self):
        if isinstance(self.mix, dict):
            self.mix = MixConfig(**self.mix)
        self.lams = [float(lam) for lam in self.lams]
        problems = []
        if not all(0 <= lam <= 1 for lam in self.lams):
            problems.append(f"lams={self.lams} must lie in [0, 1]")
        if len(set(self.lams)) != len(self.lams):
            problems.append(f"lams={self.lams} repeat a value")
        if self.limit is not None and self.limit < 1:
            problems.append(f"limit={self.limit} must be >= 1 or none")
        if self.batch_size < 1 or self.n_boot < 1:
            problems.append("batch_size and n_boot must be >= 1")
        if problems:
            raise ValueError("NLLStudyConfig: " + "; ".join(problems))
        slug = Path(self.model.rstrip("/")).name or self.model
        self.out = self.out.replace("{model}", slug)
        self.cache = self.cache.replace("{model}", slug)
        if self.pareto_cache:
            self.pareto_cache = self.pareto_cache.replace("{model}", slug)


def set_name(lam: float) -> str:
    """Display name of a MixSD target set."""
    return f"MixSD λ={lam:g}"


def branch_table(results: dict[str, TargetNLL]) -> pd.DataFrame:
    """Per MixSD target set: tokens and mean per-token NLL from each branch (expert, naive)."""
    rows = []
    for name, res in results.items():
        if res.branch_mask is None:
            continue
        nll = np.concatenate(res.per_token)
        mask = np.concatenate([m for m in res.branch_mask if m is not None]).astype(bool)
        rows.append({"target_set": name, "n_tokens": len(nll),
                     "expert_token_fraction": float(mask.mean()),
                     "expert_nll_mean": float(nll[mask].mean()) if mask.any() else None,
                     "naive_nll_mean": float(nll[~mask].mean()) if (~mask).any() else None})
    return pd.DataFrame(rows)


def compare_with_pareto(pareto_cache: Path, lam: float, targets: list[MixedTarget]
                        ) -> dict[str, Any] | None:
    """How many of ``targets`` equal (token for token) those the Pareto run at ``lam`` trained
    on; ``None`` when that run has no target file."""
    path = pareto_cache / f"mixsd-{lam:g}" / "targets.jsonl"
    if not path.exists():
        return None
    trained = {row["record_id"]: row["token_ids"] for row in read_jsonl(path)}
    same = sum(trained.get(t.record_id) == list(t.token_ids) for t in targets)
    return {"file": str(path), "n_here": len(targets), "n_pareto": len(trained),
            "n_identical": same}


def run_study(config: NLLStudyConfig) -> pd.DataFrame:
    """Build (or reuse) the MixSD targets, score every set, write the outputs; returns the table."""
    out, cache = Path(config.out), Path(config.cache)
    model, tokenizer = load_model(config.model, dtype=config.dtype, device=config.device)
    records = load_records(config.records)[: config.limit]
    example = config.example or records[0].id
    if example not in {r.id for r in records}:
        raise ValueError(f"example={example!r} is not among the records used")
    score = {"batch_size": config.batch_size}
    results = {"SFT": target_nll(model, tokenizer, records, **score)}
    reports, checks = {}, {}
    for lam in config.lams:
        name = set_name(lam)
        path = cache / f"targets-lam{lam:g}.jsonl"
        report = build_target_file(model, tokenizer, records, replace(config.mix, lam=lam), path)
        reports[name] = asdict(report)
        targets = [MixedTarget.from_json(row) for row in read_jsonl(path)]
        if config.pareto_cache:
            checks[name] = compare_with_pareto(Path(config.pareto_cache), lam, targets)
        if not targets:
            logger.warning("%s: every record failed its answer check; no targets to score", name)
            continue
        results[name] = target_nll(model, tokenizer, targets, records=records, **score)
    table = compare_targets(results, reference="SFT", n_boot=config.n_boot, seed=config.boot_seed)
    write_outputs(config, out, results, table, reports, checks, example)
    return table


def write_outputs(config: NLLStudyConfig, out: Path, results: dict[str, TargetNLL],
                  table: pd.DataFrame, reports: dict[str, Any], checks: dict[str, Any],
                  example: str) -> None:
    saved = config_to_dict(config)
    del saved["mix"]["lam"]  # each target set has its own, from config.lams
    with atomic_write(out / "nll_study_config.yaml") as handle:
        yaml.safe_dump(saved, handle, sort_keys=False)
    tokens, sequences, branches = token_frame(results), sequence_frame(results), \
        branch_table(results)
    frames = {"nll_table.csv": table, "tokens.csv": tokens, "sequences.csv": sequences,
              "branch_table.csv": branches}
    for name, frame in frames.items():
        with atomic_write(out / name) as handle:
            frame.to_csv(handle, index=False)
    atomic_write_json(out / "nll_table.json", json_rows(table))
    atomic_write_json(out / "mixsd_reports.json", reports)
    atomic_write_json(out / "summary.json", {
        "model": config.model, "records": config.records, "n_records": len(results["SFT"].ids),
        "table": json_rows(table), "branches": json_rows(branches),
        "mixsd_reports": reports, "pareto_target_check": checks})
    write_figures(out, tokens, sequences, example)
    logger.info("wrote %s", out)


@command_line
def main(argv: Sequence[str] | None = None) -> pd.DataFrame | None:
    config, _ = parse_cli((NLLStudyConfig, MixConfig), argv, "experiments/nll_study.py",
                          doc=__doc__, log_format="%(asctime)s %(name)s: %(message)s",
                          omit={"lam"})
    started = time.perf_counter()
    table = run_study(config)
    columns = ["target_set", "n_items", "n_tokens", "token_nll_mean", "token_nll_median",
               "item_nll_mean", "sequence_nll_mean", "length_mean", "delta_item_nll", "ci_low",
               "ci_high", "n_paired"]
    print(markdown_table(table[columns]))
    print(f"\n{config.out}: {time.perf_counter() - started:.0f} s")
    return table


if __name__ == "__main__":
    main()
