"""Write a Fisher report: ``report.json``, one PNG per figure and a self-contained
``report.html`` (figures embedded as base64 PNG, tables, a plain-language reading).

Files are written to a staging folder and moved into place at the end, ``report.html`` last, so
a failed run never leaves a partial report that looks complete.
"""

from __future__ import annotations

import base64
import html
import io
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from forgetkit.files import atomic_write_json
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


def figure_frames(report: dict[str, Any]) -> dict[str, pd.DataFrame]:
    """The tidy tables behind each figure."""
    eig = report["fisher"]["eigenvalues"]
    energy, displacement, kl, points = [], [], [], []
    base_scores = report["base"]["scores"]
    points.append({"model": "base", "memorization": base_scores["memorization"] or 0.0,
                   "retention": 1.0})
    for name, ft in report["finetunes"].items():
        low = ft["projection_low_rank"]
        for j, (e, b) in enumerate(zip(low["captured_energy"], low["random_baseline"],
                                       strict=True), start=1):
            energy.append({"finetune": name, "j": j, "captured_energy": e, "random_baseline": b})
        for representation in ("low_rank", "diagonal"):
            proj = ft[f"projection_{representation}"]
            displacement.append({"finetune": name, "representation": representation,
                                 "fisher_displacement": proj["fisher_displacement"]})
            kl.append({"finetune": name, "representation": representation,
                       "predicted_kl": proj["predicted_kl"],
                       "measured_kl": ft["measured_kl"]["per_sequence"]})
        points.append({"model": name, "memorization": ft["scores"]["memorization"] or 0.0,
                       "retention": ft["retention"]["overall"] or 0.0})
    return {
        "fisher_spectrum": pd.DataFrame({"j": range(1, len(eig) + 1), "eigenvalue": eig}),
        "module_fisher_heatmap": _module_frame(report["fisher"]["module_summary"]),
        "captured_energy": pd.DataFrame(energy),
        "displacement_bars": pd.DataFrame(displacement),
        "predicted_vs_measured_kl": pd.DataFrame(kl),
        "retention_vs_memorization": pd.DataFrame(points),
    }


FIGURES: dict[str, tuple[str, Callable]] = {
    "fisher_spectrum": ("Fisher spectrum of the probes", plots.fisher_spectrum),
    "module_fisher_heatmap": ("Share of the Fisher trace per module",
                              plots.module_fisher_heatmap),
    "captured_energy": ("Update energy in the top Fisher directions", plots.captured_energy),
    "displacement_bars": ("Fisher-weighted displacement", plots.displacement_bars),
    "predicted_vs_measured_kl": ("Predicted vs measured KL", plots.predicted_vs_measured_kl),
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
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _fmt(x: Any) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.3g}"
    return str(x)


def summary_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per fine-tune: the numbers printed at the end and tabled in the HTML."""
    rows = []
    for name, ft in report["finetunes"].items():
        low, diag = ft["projection_low_rank"], ft["projection_diagonal"]
        rows.append({
            "fine-tune": name, "||Δθ||": ft["delta_norm"],
            f"energy top-{low['rank']}": low["captured_energy"][-1],
            "Δθ'FΔθ (diag)": diag["fisher_displacement"],
            "Δθ'FΔθ (low-rank)": low["fisher_displacement"],
            "predicted KL (diag)": diag["predicted_kl"],
            "predicted KL (low-rank)": low["predicted_kl"],
            "measured KL": ft["measured_kl"]["per_sequence"],
            "memorization": ft["scores"]["memorization"],
            "retention": ft["retention"]["overall"],
        })
    return rows


def reading(report: dict[str, Any]) -> list[str]:
    """A short plain-language reading of the result."""
    rows = summary_rows(report)
    lines = []
    if not rows:
        return ["No fine-tune was given, so there is no update to project."]
    worst = max(rows, key=lambda r: r["Δθ'FΔθ (diag)"])
    best = min(rows, key=lambda r: r["Δθ'FΔθ (diag)"])
    if worst is not best and best["Δθ'FΔθ (diag)"] > 0:
        ratio = worst["Δθ'FΔθ (diag)"] / best["Δθ'FΔθ (diag)"]
        lines.append(f"{worst['fine-tune']} moved {ratio:.1f}x further than {best['fine-tune']} "
                     "along the directions the probes are sensitive to (Fisher-weighted "
                     "displacement).")
    for row in rows:
        measured = row["measured KL"]
        low, diag = row["predicted KL (low-rank)"], row["predicted KL (diag)"]
        lines.append(
            f"{row['fine-tune']}: memorized {_pct(row['memorization'])} of the injected facts and "
            f"kept {_pct(row['retention'])} of the base model's probe accuracy. The measured KL "
            f"on the probes is {_fmt(measured)}; the second-order prediction is {_fmt(low)} from "
            f"the top Fisher directions ({_ratio(low, measured)}) and {_fmt(diag)} from the "
            f"diagonal Fisher ({_ratio(diag, measured)}).")
    risk = report.get("risk") or []
    if risk:
        top = risk[0]
        lines.append(f"Before training, the record that pushes hardest on what the model knows "
                     f"is {top['record_id']} ({html.unescape(top['prompt'])!r}).")
    return lines


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def _ratio(predicted: float, measured: float) -> str:
    if not measured or not predicted:
        return "not comparable"
    ratio = predicted / measured
    if 0.8 <= ratio <= 1.25:
        return "close to the measurement"
    return f"{ratio:.2g}x the measurement"


def _table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "<p>none</p>"
    head = "".join(f"<th>{html.escape(str(k))}</th>" for k in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in r.values())
                   + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_html(report: dict[str, Any], images: dict[str, bytes]) -> str:
    """The self-contained page."""
    figures = "".join(
        f'<figure><img alt="{html.escape(title)}" src="data:image/png;base64,'
        f'{base64.b64encode(images[key]).decode()}"><figcaption>{html.escape(title)}'
        "</figcaption></figure>" for key, (title, _) in FIGURES.items())
    risk_rows = [{k: r[k] for k in ("rank", "record_id", "prompt", "energy_share",
                                    "fisher_rayleigh")} for r in report["risk"][:10]]
    config = report["config"]
    paragraphs = "".join(f"<p>{html.escape(line)}</p>" for line in reading(report))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>forgetkit report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; }}
th {{ background: #f0f0f0; }} td:first-child {{ text-align: left; }}
figure {{ display: inline-block; margin: 0.5em; }} img {{ width: 520px; }}
.reading {{ background: #f6f8fa; padding: 0.5em 1em; border-left: 4px solid #4a7; }}
</style></head><body>
<h1>What did the fine-tunes cost?</h1>
<p>Base model <b>{html.escape(str(config['base']))}</b>, records
<b>{html.escape(str(config['records']))}</b>, probes
<b>{html.escape(str(report['base']['probes']))}</b>; {html.escape(config['estimator'])} Fisher
on {report['base']['fisher_samples']} probes, top {report['fisher']['rank']} directions.</p>
<h2>Reading</h2><div class="reading">{paragraphs}</div>
<h2>Summary</h2>{_table(summary_rows(report))}
<h2>Figures</h2>{figures}
<h2>Forgetting risk of each record (top 10)</h2>{_table(risk_rows)}
<p>All numbers: <code>report.json</code>.</p>
</body></html>
"""


def write_report(report: dict[str, Any], out: str | os.PathLike) -> dict[str, Path]:
    """Write ``report.json``, the PNGs and ``report.html`` into ``out``; return their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    frames = figure_frames(report)
    images = {key: _png(draw, frames[key], title) for key, (title, draw) in FIGURES.items()}
    staging = Path(tempfile.mkdtemp(prefix=".report.", dir=out))
    try:
        atomic_write_json(staging / "report.json", report)
        for key, data in images.items():
            (staging / f"{key}.png").write_bytes(data)
        (staging / "report.html").write_text(render_html(report, images), encoding="utf-8")
        written = {}
        names = ["report.json", *[f"{k}.png" for k in images], "report.html"]
        for name in names:
            os.replace(staging / name, out / name)
            written[name] = out / name
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return written
