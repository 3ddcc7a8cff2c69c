"""Figures, one function per figure.

Every function takes tidy data (a pandas DataFrame, one row per observation) and a matplotlib
``ax``, draws on it and returns it. None computes results or saves: the caller builds the data
(e.g. :func:`forgetkit.diagnostics.nll.token_frame`), themes the figure and saves it.

Target NLL figures (data from :mod:`forgetkit.diagnostics.nll`):
  - :func:`token_nll_ecdf`: distribution of per-token NLL per target set;
  - :func:`nll_by_position`: per-token NLL against position in the completion;
  - :func:`token_heat_strip`: the tokens of one example colored by NLL, MixSD branches marked;
  - :func:`sequence_nll_vs_length`: sequence NLL against target length.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle

__all__ = ["nll_by_position", "sequence_nll_vs_length", "token_heat_strip", "token_nll_ecdf"]

NLL_LABEL = "NLL (nats)"
BRANCH_STYLE = {"expert": {"edgecolor": "tab:cyan", "linestyle": "-"},
                "naive": {"edgecolor": "tab:olive", "linestyle": "--"}}
"""Cell outline of MixSD tokens in :func:`token_heat_strip`, by branch."""


def _require(data: pd.DataFrame, columns: list[str], figure: str) -> None:
    missing = [c for c in columns if c not in data.columns]
    if missing:
        raise ValueError(f"{figure}: data lacks columns {missing} (has {list(data.columns)})")
    if data.empty:
        raise ValueError(f"{figure}: data is empty")


def _hue(data: pd.DataFrame, hue: str | None) -> dict:
    """seaborn hue arguments, keeping the order in which the groups first appear."""
    if hue is None or hue not in data.columns:
        return {}
    return {"hue": hue, "hue_order": list(pd.unique(data[hue]))}


def token_nll_ecdf(tokens: pd.DataFrame, ax: Axes, hue: str | None = "target_set") -> Axes:
    """Empirical CDF of per-token NLL, one curve per ``hue`` group.

    Args:
        tokens: one row per token with column ``nll`` (and ``hue``), e.g.
            :func:`forgetkit.diagnostics.nll.token_frame`.
        ax: where to draw.
        hue: column naming the target set; ignored when absent.
    """
    _require(tokens, ["nll"], "token_nll_ecdf")
    sns.ecdfplot(data=tokens, x="nll", ax=ax, **_hue(tokens, hue))
    ax.set_xlabel(f"per-token {NLL_LABEL}")
    ax.set_ylabel("fraction of tokens")
    return ax


def nll_by_position(tokens: pd.DataFrame, ax: Axes, hue: str | None = "target_set") -> Axes:
    """Mean per-token NLL at each completion position, with a ±2 standard-error band.

    Args:
        tokens: one row per token with columns ``position`` and ``nll`` (and ``hue``).
        ax: where to draw.
        hue: column naming the target set; ignored when absent.
    """
    _require(tokens, ["position", "nll"], "nll_by_position")
    sns.lineplot(data=tokens, x="position", y="nll", errorbar=("se", 2), ax=ax,
                 **_hue(tokens, hue))
    ax.set_xlabel("position in the completion (tokens)")
    ax.set_ylabel(f"mean {NLL_LABEL} ± 2 SE")
    return ax


def sequence_nll_vs_length(sequences: pd.DataFrame, ax: Axes,
                           hue: str | None = "target_set") -> Axes:
    """Sequence NLL (sum over the completion) against completion length, one point per item.

    Args:
        sequences: one row per item with columns ``length`` and ``sequence_nll`` (and ``hue``),
            e.g. :func:`forgetkit.diagnostics.nll.sequence_frame`.
        ax: where to draw.
        hue: column naming the target set; ignored when absent.
    """
    _require(sequences, ["length", "sequence_nll"], "sequence_nll_vs_length")
    sns.scatterplot(data=sequences, x="length", y="sequence_nll", alpha=0.7, ax=ax,
                    **_hue(sequences, hue))
    ax.set_xlabel("target length (tokens)")
    ax.set_ylabel(f"sequence {NLL_LABEL}")
    return ax


def _shown(token: str) -> str:
    return token.replace("\n", "\\n").replace("\t", "\\t")


def token_heat_strip(tokens: pd.DataFrame, ax: Axes, width: int = 16,
                     group: str = "target_set", cmap: str = "magma_r",
                     vmax: float | None = None) -> Axes:
    """The tokens of one example as cells colored by NLL, wrapped ``width`` cells to a row.

    When ``group`` is a column (several target sets of the same item), each group gets its own
    block of rows, labelled on the y axis. Tokens with a ``branch`` get an outline: solid for
    MixSD's expert conditional, dashed for the naive one (:data:`BRANCH_STYLE`).

    Args:
        tokens: rows of ONE item: columns ``position``, ``token``, ``nll``, optionally
            ``branch`` (``"expert"``/``"naive"``/missing) and ``group``.
        ax: where to draw; a colorbar is added beside it.
        width: cells per row.
        group: column separating target sets; ignored when absent.
        cmap: colormap of the NLL (missing cells are white).
        vmax: NLL at the top of the color scale; default the largest shown.

    Raises:
        ValueError: missing columns, no rows, rows of more than one item, ``width < 1``.
    """
    _require(tokens, ["position", "token", "nll"], "token_heat_strip")
    if "item" in tokens.columns and tokens["item"].nunique() > 1:
        raise ValueError(f"token_heat_strip: rows of {tokens['item'].nunique()} items; "
                         "select one item first")
    if width < 1:
        raise ValueError(f"token_heat_strip: width must be >= 1, got {width}")
    blocks = (list(tokens.groupby(group, sort=False)) if group in tokens.columns
              else [(None, tokens)])
    grid_rows, labels, cells = [], [], []  # cells: (row, col, token, branch)
    for name, block in blocks:
        block = block.sort_values("position")
        first = len(grid_rows)
        n_rows = -(-len(block) // width)
        values = np.full((n_rows, width), np.nan)
        values.flat[: len(block)] = block["nll"].to_numpy(dtype=float)
        grid_rows.extend(values)
        branches = block["branch"] if "branch" in block.columns else [None] * len(block)
        for k, (token, branch) in enumerate(zip(block["token"], branches, strict=True)):
            cells.append((first + k // width, k % width, token, branch))
        labels.append((first + (n_rows - 1) / 2, "" if name is None else str(name)))
        grid_rows.append(np.full(width, np.nan))  # blank separator row
    grid = np.array(grid_rows[:-1])
    top = float(np.nanmax(grid)) if vmax is None else vmax
    colormap = sns.color_palette(cmap, as_cmap=True).with_extremes(bad="white")
    image = ax.imshow(grid, cmap=colormap, vmin=0.0, vmax=max(top, 1e-9), aspect="auto",
                      interpolation="nearest")
    for row, col, token, branch in cells:
        dark = grid[row, col] > 0.6 * top
        ax.text(col, row, _shown(token), ha="center", va="center", fontsize=7,
                color="white" if dark else "black")
        if isinstance(branch, str) and branch in BRANCH_STYLE:
            ax.add_patch(Rectangle((col - 0.45, row - 0.45), 0.9, 0.9, fill=False, linewidth=1.4,
                                   label=f"_{branch}", **BRANCH_STYLE[branch]))
    ax.set_xticks([])
    ax.set_yticks([y for y, _ in labels], [label for _, label in labels])
    ax.figure.colorbar(image, ax=ax, label=NLL_LABEL)
    present = {c[3] for c in cells if isinstance(c[3], str)}
    handles = [Line2D([], [], color=style["edgecolor"], linestyle=style["linestyle"],
                      label=f"{branch} token") for branch, style in BRANCH_STYLE.items()
               if branch in present]
    if handles:
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(0, -0.02), ncols=2,
                  fontsize=7, frameon=False)
    return ax
