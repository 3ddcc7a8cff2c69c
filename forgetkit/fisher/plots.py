"""Figures of the Fisher report, one function per figure.

Like :mod:`forgetkit.plots`, each takes tidy data (a DataFrame, one row per observation) and an
``ax``, draws and returns the ax; none computes or saves. :mod:`forgetkit.fisher.render` builds
the frames from ``report.json``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes

from forgetkit.plots import _require

__all__ = ["captured_energy", "displacement_bars", "fisher_spectrum", "module_fisher_heatmap",
           "predicted_vs_measured_kl", "retention_vs_memorization"]


def fisher_spectrum(spectrum: pd.DataFrame, ax: Axes) -> Axes:
    """Top eigenvalues of the probe Fisher (columns ``j``, ``eigenvalue``), log scale."""
    _require(spectrum, ["j", "eigenvalue"], "fisher_spectrum")
    ax.plot(spectrum["j"], spectrum["eigenvalue"], marker="o")
    ax.set_yscale("log")
    ax.set_xlabel("eigen-direction j")
    ax.set_ylabel("eigenvalue λ_j")
    return ax


def module_fisher_heatmap(modules: pd.DataFrame, ax: Axes, value: str = "trace_share") -> Axes:
    """Share of the Fisher trace per module: rows ``layer`` (an int; -1 for modules outside the
    layer stack, shown as "other"), columns ``kind`` (e.g. ``self_attn.q_proj``)."""
    _require(modules, ["layer", "kind", value], "module_fisher_heatmap")
    table = modules.pivot_table(index="layer", columns="kind", values=value, aggfunc="sum")
    table.index = ["other" if layer < 0 else str(layer) for layer in table.index]
    sns.heatmap(table, ax=ax, cmap="viridis", annot=table.shape[0] * table.shape[1] <= 60,
                fmt=".2f", cbar_kws={"label": value.replace("_", " ")})
    ax.set_xlabel("module")
    ax.set_ylabel("layer")
    return ax


def captured_energy(energy: pd.DataFrame, ax: Axes) -> Axes:
    """Share of ``||delta||^2`` in the top-j directions per fine-tune (columns ``finetune``,
    ``j``, ``captured_energy``, ``random_baseline``), beside the random-direction baseline."""
    _require(energy, ["finetune", "j", "captured_energy", "random_baseline"], "captured_energy")
    sns.lineplot(data=energy, x="j", y="captured_energy", hue="finetune", marker="o", ax=ax)
    baseline = energy.drop_duplicates("j").sort_values("j")
    ax.plot(baseline["j"], baseline["random_baseline"], color="grey", linestyle="--",
            label="random direction (j/P)")
    ax.set_yscale("log")
    ax.set_xlabel("top-j Fisher directions")
    ax.set_ylabel("share of ||Δθ||² captured")
    ax.legend()
    return ax


def displacement_bars(displacement: pd.DataFrame, ax: Axes) -> Axes:
    """Fisher-weighted displacement ``d'Fd`` per fine-tune (columns ``finetune``,
    ``representation``, ``fisher_displacement``), log scale."""
    _require(displacement, ["finetune", "representation", "fisher_displacement"],
             "displacement_bars")
    sns.barplot(data=displacement, x="finetune", y="fisher_displacement",
                hue="representation", ax=ax)
    ax.set_yscale("log")
    ax.set_xlabel("")
    ax.set_ylabel("Δθ' F Δθ")
    return ax


def predicted_vs_measured_kl(kl: pd.DataFrame, ax: Axes) -> Axes:
    """Predicted ``1/2 d'Fd`` against measured KL per fine-tune (columns ``finetune``,
    ``representation``, ``predicted_kl``, ``measured_kl``), log-log, with the line y = x."""
    _require(kl, ["finetune", "representation", "predicted_kl", "measured_kl"],
             "predicted_vs_measured_kl")
    sns.scatterplot(data=kl, x="measured_kl", y="predicted_kl", hue="finetune",
                    style="representation", s=80, ax=ax)
    values = np.concatenate([kl["predicted_kl"].to_numpy(), kl["measured_kl"].to_numpy()])
    values = values[values > 0]
    if values.size:
        low, high = values.min() / 2, values.max() * 2
        ax.plot([low, high], [low, high], color="grey", linestyle="--", label="y = x")
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set_xlabel("measured KL(base ‖ fine-tune) per probe")
    ax.set_ylabel("predicted ½ Δθ' F Δθ")
    ax.legend()
    return ax


def retention_vs_memorization(points: pd.DataFrame, ax: Axes) -> Axes:
    """Retention (y) against memorization (x), one point per model (columns ``model``,
    ``memorization``, ``retention``)."""
    _require(points, ["model", "memorization", "retention"], "retention_vs_memorization")
    sns.scatterplot(data=points, x="memorization", y="retention", hue="model", s=90, ax=ax)
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(0, max(1.05, float(points["retention"].max()) + 0.05))
    ax.axhline(1.0, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("memorization of the injected facts")
    ax.set_ylabel("retention of held-out capabilities")
    return ax
