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
from matplotlib.lines import Line2D

from forgetkit.plots import _require

__all__ = ["captured_energy", "displacement_bars", "fisher_spectrum", "kl_along_path",
           "module_fisher_heatmap", "predicted_vs_measured_kl", "retention_vs_memorization"]


def _errors(frame: pd.DataFrame, value: str, low: str, high: str) -> np.ndarray:
    """(2, n) distances from ``value`` to its interval bounds (0 where a bound is unknown)."""
    lower = (frame[value] - frame[low]).fillna(0.0).clip(lower=0.0)
    upper = (frame[high] - frame[value]).fillna(0.0).clip(lower=0.0)
    return np.vstack([lower.to_numpy(), upper.to_numpy()])


def _palette(names: pd.Series) -> dict:
    """One color per distinct name: the default palette up to its 10 colors, evenly spaced hues
    beyond."""
    names = list(dict.fromkeys(names))
    colors = sns.color_palette(n_colors=len(names)) if len(names) <= 10 \
        else sns.color_palette("husl", len(names))
    return dict(zip(names, colors, strict=True))


def _legend(ax: Axes, **kwargs) -> None:
    """The legend, beside the axes rather than over the data when it has more than 8 entries
    (a study diagnoses dozens of fine-tunes)."""
    handles = kwargs.get("handles") or ax.get_legend_handles_labels()[0]
    outside = {"loc": "upper left", "bbox_to_anchor": (1.01, 1.0)} if len(handles) > 8 else {}
    ax.legend(**kwargs, **outside)


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
    _legend(ax, fontsize="small")
    return ax


def displacement_bars(displacement: pd.DataFrame, ax: Axes) -> Axes:
    """``d'Fd`` per fine-tune and representation with 95% intervals (columns ``finetune``,
    ``representation``, ``fisher_displacement``, ``low``, ``high``), log scale."""
    _require(displacement, ["finetune", "representation", "fisher_displacement", "low", "high"],
             "displacement_bars")
    finetunes = list(dict.fromkeys(displacement["finetune"]))
    kinds = list(dict.fromkeys(displacement["representation"]))
    width = 0.8 / len(kinds)
    for k, kind in enumerate(kinds):
        rows = displacement[displacement["representation"] == kind].set_index("finetune")
        rows = rows.reindex(finetunes)
        x = np.arange(len(finetunes)) + (k - (len(kinds) - 1) / 2) * width
        ax.bar(x, rows["fisher_displacement"], width, label=kind,
               yerr=_errors(rows, "fisher_displacement", "low", "high"), capsize=3)
    ax.set_xticks(np.arange(len(finetunes)), finetunes)
    ax.set_yscale("log")
    ax.set_ylabel("Δθ' F Δθ (95% interval over probes)")
    ax.legend(fontsize="small")
    return ax


def predicted_vs_measured_kl(kl: pd.DataFrame, ax: Axes) -> Axes:
    """Predicted ``1/2 d'Fd`` against measured KL per fine-tune, with 95% intervals on both
    (columns ``finetune``, ``representation``, ``predicted_kl``, ``predicted_low``,
    ``predicted_high``, ``measured_kl``, ``measured_low``, ``measured_high``), log-log, y = x."""
    _require(kl, ["finetune", "representation", "predicted_kl", "predicted_low",
                  "predicted_high", "measured_kl", "measured_low", "measured_high"],
             "predicted_vs_measured_kl")
    markers = dict(zip(dict.fromkeys(kl["representation"]), "osD^v", strict=False))
    palette = _palette(kl["finetune"])
    for (name, kind), rows in kl.groupby(["finetune", "representation"], sort=False):
        ax.errorbar(rows["measured_kl"], rows["predicted_kl"],
                    xerr=_errors(rows, "measured_kl", "measured_low", "measured_high"),
                    yerr=_errors(rows, "predicted_kl", "predicted_low", "predicted_high"),
                    fmt=markers[kind], color=palette[name], capsize=3, label=f"{name}: {kind}")
    values = np.concatenate([kl["predicted_kl"].to_numpy(), kl["measured_kl"].to_numpy()])
    values = values[values > 0]
    # the legend names each fine-tune (color) and each representation (marker) once, not every
    # pair: a study of 18 fine-tunes and 3 representations would need 54 entries
    handles = [Line2D([], [], marker="o", linestyle="", color=color, label=name)
               for name, color in palette.items()]
    if len(markers) > 1:
        handles += [Line2D([], [], marker=marker, linestyle="", color="grey", label=kind)
                    for kind, marker in markers.items()]
    if values.size:
        low, high = values.min() / 2, values.max() * 2
        handles += ax.plot([low, high], [low, high], color="grey", linestyle="--", label="y = x")
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set_xlabel("measured KL(base ‖ fine-tune) per probe")
    ax.set_ylabel("predicted ½ Δθ' F Δθ")
    _legend(ax, handles=handles, fontsize="small")
    return ax


def kl_along_path(path: pd.DataFrame, ax: Axes) -> Axes:
    """Measured ``KL(base || base + t Δθ)`` against the second-order ``1/2 t^2 d'Fd`` per
    fine-tune, with 95% bands (columns ``finetune``, ``t``, ``measured_kl``, ``low``, ``high``,
    ``predicted_kl``, ``predicted_low``, ``predicted_high``), log-log."""
    _require(path, ["finetune", "t", "measured_kl", "low", "high", "predicted_kl",
                    "predicted_low", "predicted_high"], "kl_along_path")
    palette = _palette(path["finetune"])
    for name, rows in path.groupby("finetune", sort=False):
        color = palette[name]
        ax.plot(rows["t"], rows["measured_kl"], marker="o", color=color,
                label=f"{name}: measured")
        ax.fill_between(rows["t"], rows["low"], rows["high"], color=color, alpha=0.2)
        ax.plot(rows["t"], rows["predicted_kl"], linestyle="--", color=color,
                label=f"{name}: ½ t² d'Fd")
        ax.fill_between(rows["t"], rows["predicted_low"], rows["predicted_high"], color=color,
                        alpha=0.1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("step t along the update (base + t Δθ)")
    ax.set_ylabel("KL per probe")
    ax.legend(fontsize="small")
    return ax


def retention_vs_memorization(points: pd.DataFrame, ax: Axes) -> Axes:
    """Retention (y) against memorization (x), one point per model (columns ``model``,
    ``memorization``, ``retention``; with ``memorization_low``/``_high`` and
    ``retention_low``/``_high``, their 95% intervals as error bars)."""
    _require(points, ["model", "memorization", "retention"], "retention_vs_memorization")
    sns.scatterplot(data=points, x="memorization", y="retention", hue="model", s=90, ax=ax)
    if {"memorization_low", "memorization_high", "retention_low", "retention_high"} <= set(
            points.columns):
        ax.errorbar(points["memorization"], points["retention"],
                    xerr=_errors(points, "memorization", "memorization_low", "memorization_high"),
                    yerr=_errors(points, "retention", "retention_low", "retention_high"),
                    fmt="none", ecolor="grey", capsize=3)
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(0, max(1.05, float(points["retention"].max()) + 0.05))
    ax.axhline(1.0, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("memorization of the injected facts")
    ax.set_ylabel("retention of held-out capabilities")
    return ax
