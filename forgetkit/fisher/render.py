"""Write a Fisher report: ``report.json``, one PNG per figure and a self-contained
``report.html`` (figures embedded as base64 PNG, tables, a plain-language reading).

The report folder is built in a staging folder and swapped in whole at the end (the Fisher
files before the page that links to them), so a failed or killed run never leaves a partial
report that looks complete, nor a new page beside old files.
"""

from __future__ import annotations

import base64
import html
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jinja2
import pandas as pd
from markupsafe import Markup

from forgetkit.files import (
    OutputError,
    atomic_directory,
    atomic_write_json,
    check_writable,
    figure_png,
)
from forgetkit.fisher import plots

__all__ = ["FIGURES", "figure_frames", "reading", "write_report"]

_LAYER = re.compile(r"\.(?:layers|h|layer)\.(\d+)\.(.+)$")


def _module_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    layers, kinds = [], []
    for module in frame["module"]:
        match = _LAYER.search(module)
        layers.append(int(match.group(1)) if match else -1)
        kinds.append(match.group(2) if match else module.rsplit(".", 1)[-1])
    return frame.assign(layer=layers, kind=kinds)


def _ci(section: dict[str, Any] | None, value: str = "value") -> tuple[float, float, float]:
    if not section:
        return (float("nan"),) * 3
    return section[value], section["low"], section["high"]


def top_k_name(report: dict[str, Any], finetune: dict[str, Any]) -> str:
    """The name of the exact d'Fd of the update projected onto the report Fisher's top-k
    directions: "(lower bound)" only where it is one (exact low-rank eigenvectors)."""
    top, rank = finetune["low_rank_displacement"], finetune["projection_low_rank"]["rank"]
    kind = top.get("representation", report["fisher"]["representation"])
    if top["lower_bound"]:
        return f"top-{rank} Δθ'FΔθ (lower bound)"
    return f"Δθ'FΔθ of Δθ projected on top-{rank} {kind} directions"


def representation_name(report: dict[str, Any]) -> str:
    """The report Fisher's own quadratic form, named by its representation."""
    return {"low_rank": "low-rank", "kfac": "K-FAC", "diagonal": "diagonal"}.get(
        report["fisher"]["representation"], report["fisher"]["representation"])


def figure_frames(report: dict[str, Any]) -> dict[str, pd.DataFrame]:
    """The tidy tables behind each figure."""
    eig = report["fisher"]["eigenvalues"]
    energy, displacement, kl, path, points = [], [], [], [], []
    base_scores = report["base"]["scores"]
    points.append({"model": "base", "memorization": base_scores["memorization"] or 0.0,
                   "retention": 1.0})
    for name, ft in report["finetunes"].items():
        low = ft["projection_low_rank"]
        for j, (e, b) in enumerate(zip(low["captured_energy"], low["random_baseline"],
                                       strict=True), start=1):
            energy.append({"finetune": name, "j": j, "captured_energy": e, "random_baseline": b})
        measured = _ci(ft["measured_kl"], "per_sequence")
        estimates = {"exact": _ci(ft["displacement"], "mean"),
                     top_k_name(report, ft): _ci(ft["low_rank_displacement"]),
                     "diagonal proxy": _ci(ft["diagonal_proxy"])}
        for kind, (value, lo, hi) in estimates.items():
            displacement.append({"finetune": name, "representation": kind,
                                 "fisher_displacement": value, "low": lo, "high": hi})
            kl.append({"finetune": name, "representation": kind, "predicted_kl": value / 2,
                       "predicted_low": lo / 2, "predicted_high": hi / 2,
                       "measured_kl": measured[0], "measured_low": measured[1],
                       "measured_high": measured[2]})
        path += [{"finetune": name, **row} for row in ft["kl_path"]]
        mem, ret = _ci(ft["memorization_ci"]), _ci(ft["retention_ci"])
        points.append({"model": name, "memorization": ft["scores"]["memorization"] or 0.0,
                       "retention": ft["retention"]["overall"] or 0.0,
                       "memorization_low": mem[1], "memorization_high": mem[2],
                       "retention_low": ret[1], "retention_high": ret[2]})
    return {
        "fisher_spectrum": pd.DataFrame({"j": range(1, len(eig) + 1), "eigenvalue": eig}),
        "module_fisher_heatmap": _module_frame(report["fisher"]["module_summary"]),
        "captured_energy": pd.DataFrame(energy),
        "displacement_bars": pd.DataFrame(displacement),
        "predicted_vs_measured_kl": pd.DataFrame(kl),
        "kl_along_path": pd.DataFrame(path),
        "retention_vs_memorization": pd.DataFrame(points),
    }


FIGURES: dict[str, tuple[str, Callable]] = {
    "fisher_spectrum": ("Fisher spectrum of the probes", plots.fisher_spectrum),
    "module_fisher_heatmap": ("Share of the Fisher trace per module",
                              plots.module_fisher_heatmap),
    "captured_energy": ("Update energy in the top Fisher directions", plots.captured_energy),
    "displacement_bars": ("Fisher-weighted displacement d'Fd", plots.displacement_bars),
    "predicted_vs_measured_kl": ("Predicted vs measured KL", plots.predicted_vs_measured_kl),
    "kl_along_path": ("KL along the update path", plots.kl_along_path),
    "retention_vs_memorization": ("Retention vs memorization",
                                  plots.retention_vs_memorization),
}


def _png(draw: Callable, frame: pd.DataFrame, title: str) -> bytes:
    # a bare Figure (no pyplot): no global backend switch, nothing left open in notebooks
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), dpi=110)
    ax = fig.subplots()
    draw(frame, ax)
    ax.set_title(title)
    fig.tight_layout()
    return figure_png(fig)


def _fmt(x: Any) -> str:
    if x is None:
        return "n/a"
    return f"{x:.3g}" if isinstance(x, float) else str(x)


def _section_ci(section: dict[str, Any] | None, value: str = "value", scale: float = 1.0) -> str:
    """``value [low, high]`` of an interval section, scaled (3 significant digits)."""
    if not section:
        return "n/a"
    low, high = section["low"] * scale, section["high"] * scale
    return f"{section[value] * scale:.3g} [{low:.3g}, {high:.3g}]"


def summary_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per fine-tune: the numbers printed at the end and tabled in the HTML, each
    estimate with its 95% interval over probes (over records for memorization)."""
    rows = []
    for name, ft in report["finetunes"].items():
        low, exact = ft["projection_low_rank"], ft["displacement"]
        top = ft["low_rank_displacement"]
        own, kind = ft.get("representation_displacement", {}), representation_name(report)
        rows.append({
            "fine-tune": name, "‖Δθ‖": f"{ft['delta_norm']:.4g}",
            "Δθ'FΔθ (exact)": _section_ci(exact, "mean"),
            "predicted KL ½Δθ'FΔθ": _section_ci(exact, "mean", 0.5),
            "measured KL": _section_ci(ft["measured_kl"], "per_sequence"),
            "measured / predicted": _section_ci(ft["measured_over_predicted"]),
            top_k_name(report, ft): _section_ci(top),
            "top-k seed spread": "n/a (1 seed)" if top["seed_relative_spread"] is None else
                                 f"{100 * top['seed_relative_spread']:.1f}% "
                                 f"({len(top['seeds'])} seeds)",
            f"{kind} Δθ'FΔθ": _fmt(own.get("value")),
            f"{kind} / exact": _fmt(own.get("ratio")),
            f"energy in top-{low['rank']}": f"{low['captured_energy'][-1]:.2g}",
            "diagonal proxy ΣF_jj d_j²": _section_ci(ft["diagonal_proxy"]),
            "memorization": _section_ci(ft["memorization_ci"]),
            "retention": _section_ci(ft["retention_ci"]),
        })
    return rows


def _ratio_sentence(row: dict[str, Any], what: str) -> str:
    ratio = row[f"{what}_ratio"]
    a, b, value, lo, hi = row["a"], row["b"], ratio["value"], ratio["low"], ratio["high"]
    label = {"displacement": "exact Fisher displacement Δθ'FΔθ",
             "measured_kl": "measured KL on the probes"}[what]
    interval = f"ratio {value:.2f} [{lo:.2f}, {hi:.2f}], paired over {ratio['n']} probes"
    if not lo <= 1.0 <= hi:
        return f"{a} has {value:.2f} times the {label} of {b} ({interval})."
    return f"No clear difference in the {label} between {a} and {b} ({interval})."


def reading(report: dict[str, Any]) -> list[str]:
    """A short plain-language reading, generated from the exact numbers and their intervals."""
    finetunes = report["finetunes"]
    if not finetunes:
        return ["No fine-tune was given, so there is no update to project."]
    lines = []
    for row in report.get("comparisons", []):
        lines.append(_ratio_sentence(row, "displacement"))
        lines.append(_ratio_sentence(row, "measured_kl"))
        a, b = finetunes[row["a"]]["retention_ci"], finetunes[row["b"]]["retention_ci"]
        if a and b:
            if a["low"] <= b["high"] and b["low"] <= a["high"]:
                lines.append(f"No clear difference in retention between {row['a']} "
                             f"({_section_ci(a)}) and {row['b']} ({_section_ci(b)}).")
            else:
                more, less = (row["a"], row["b"]) if a["value"] > b["value"] else \
                    (row["b"], row["a"])
                lines.append(f"{more} kept more of the base model's probe accuracy than {less} "
                             f"({_section_ci(finetunes[more]['retention_ci'])} vs "
                             f"{_section_ci(finetunes[less]['retention_ci'])}).")
    for name, ft in finetunes.items():
        ratio = ft["measured_over_predicted"]
        holds = [r["t"] for r in ft["kl_path"]
                 if r["predicted_kl"] > 0 and 0.8 <= r["measured_kl"] / r["predicted_kl"] <= 1.25]
        path = (f"along the path base + tΔθ the measured KL stays within 25% of ½t²Δθ'FΔθ up "
                f"to t = {max(holds):g}" if holds else
                "along the path base + tΔθ the measured KL departs from ½t²Δθ'FΔθ by more than "
                "25% at every step measured")
        top, diag, exact = ft["low_rank_displacement"], ft["diagonal_proxy"], \
            ft["displacement"]["mean"]
        lines.append(
            f"{name}: memorized {_section_ci(ft['memorization_ci'])} of the injected facts and "
            f"kept {_section_ci(ft['retention_ci'])} of the base model's probe accuracy. Its "
            f"exact Δθ'FΔθ is {_section_ci(ft['displacement'], 'mean')}, predicting a KL of "
            f"{_section_ci(ft['displacement'], 'mean', 0.5)}; the measured KL is "
            f"{_section_ci(ft['measured_kl'], 'per_sequence')}, {ratio['value']:.2g} times the "
            f"prediction [{ratio['low']:.2g}, {ratio['high']:.2g}]; {path}. The top "
            f"{ft['projection_low_rank']['rank']} {representation_name(report)} Fisher "
            f"directions hold {100 * top['value'] / exact:.0f}% of Δθ'FΔθ "
            f"({'a lower bound' if top['lower_bound'] else 'not a bound'}); the "
            f"diagonal proxy ΣF_jj d_j² is {diag['value'] / exact:.2g} times the exact value."
            if exact else f"{name}: the update has zero Fisher displacement.")
    risk = report.get("risk") or []
    if risk:
        top = risk[0]
        lines.append(f"Before training, the record that pushes hardest on what the model knows "
                     f"is {top['record_id']} ({html.unescape(top['prompt'])!r}).")
    if report.get("warnings"):
        lines.append(f"{len(report['warnings'])} warning(s) were logged during the run; see "
                     "'warnings' in report.json.")
    return lines


def _table(rows: list[dict[str, Any]]) -> Markup | None:
    """``rows`` as an HTML table (cells escaped by ``DataFrame.to_html``); ``None`` if empty."""
    if not rows:
        return None
    frame = pd.DataFrame(rows)
    return Markup(frame.to_html(index=False, na_rep="n/a", border=0, escape=True,
                                float_format=lambda x: f"{x:.3g}"))


def render_html(report: dict[str, Any], images: dict[str, bytes]) -> str:
    """The self-contained page (figures embedded as base64 PNG) from
    ``templates/report.html.j2``, every value autoescaped."""
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("forgetkit.fisher", "templates"), autoescape=True,
        undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    figures = [{"title": title, "png_base64": base64.b64encode(images[key]).decode("ascii")}
               for key, (title, _) in FIGURES.items()]
    risk_rows = [{k: r[k] for k in ("rank", "record_id", "prompt", "energy_share",
                                    "fisher_rayleigh")} for r in report["risk"][:10]]
    return environment.get_template("report.html.j2").render(
        report=report, config=report["config"], reading=reading(report), figures=figures,
        summary_table=_table(summary_rows(report)), risk_table=_table(risk_rows))


def report_entries() -> set[str]:
    """The names a report folder holds (everything else in it is the user's)."""
    return {"report.json", "report.html", "finetunes",
            *(f"fisher_{kind}.{ext}" for kind in ("low_rank", "kfac", "diagonal")
              for ext in ("json", "safetensors")),
            *(f"{key}.png" for key in FIGURES)}


def check_report_folder(out: str | os.PathLike) -> None:
    """Before any work: ``out`` can be written, and holds nothing but an earlier report (the
    folder is replaced whole, so anything else in it would be lost).

    Raises:
        OutputError: naming the folder and a foreign entry.
    """
    out = check_writable(out, "--out")
    if out.is_dir():
        foreign = sorted(entry.name for entry in out.iterdir()
                         if not entry.name.startswith(".") and entry.name not in report_entries())
        if foreign:
            raise OutputError(f"--out {out} holds {foreign[0]!r} ({len(foreign)} entries that "
                              "are not part of a report): the report folder is replaced whole; "
                              "choose an empty or new folder")


def write_report(report: dict[str, Any], out: str | os.PathLike,
                 attachments: Mapping[str, Callable[[Path], Any]] | None = None
                 ) -> dict[str, Path]:
    """Write ``report.json``, the PNGs, the ``attachments`` and ``report.html`` as the folder
    ``out``, replaced whole (a reader sees the old report or the new one, never a mix; the
    cached default fine-tunes in ``out/finetunes`` are carried over); return their paths.

    Args:
        report: the report's numbers.
        out: the folder.
        attachments: name -> function writing that entry (e.g. a Fisher's ``save``, which
            writes ``name.json`` and ``name.safetensors``), called with its path in the staging
            folder before the page that links to it is written.
    """
    out = Path(out)
    frames = figure_frames(report)
    images = {key: _png(draw, frames[key], title) for key, (title, draw) in FIGURES.items()}
    with atomic_directory(out, keep=["finetunes"]) as staging:
        atomic_write_json(staging / "report.json", report)
        for key, data in images.items():
            (staging / f"{key}.png").write_bytes(data)
        for name, write in (attachments or {}).items():
            write(staging / name)
        (staging / "report.html").write_text(render_html(report, images), encoding="utf-8")
    return {entry.name: entry for entry in sorted(out.iterdir())
            if entry.name != "finetunes" and not entry.name.startswith(".")}
