from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from forgetkit import plots

SETS = ["SFT", "MixSD lam=0.3"]


@pytest.fixture(autouse=True)
def no_saving(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("plot functions must not save")

    monkeypatch.setattr(Figure, "savefig", refuse)


def new_ax():
    return Figure().subplots()


@pytest.fixture
def tokens() -> pd.DataFrame:
    """Tidy per-token NLL of two target sets over three items (token_frame layout)."""
    rng = np.random.default_rng(0)
    rows = []
    for shift, name in enumerate(SETS):
        for item, length in [("r0", 5), ("r1", 9), ("r2", 21)]:
            for position in range(length):
                branch = None if name == "SFT" else ("expert" if position % 3 else "naive")
                rows.append({"target_set": name, "item": item, "position": position,
                             "token": f"w{position}\n", "nll": rng.gamma(2.0) / (1 + shift),
                             "branch": branch})
    return pd.DataFrame(rows)


def test_token_nll_ecdf_one_curve_per_set(tokens):
    ax = new_ax()
    assert plots.token_nll_ecdf(tokens, ax) is ax
    assert [t.get_text() for t in ax.get_legend().get_texts()] == SETS
    curves = ax.get_lines()
    assert len(curves) == 2
    for curve in curves:
        assert curve.get_ydata()[-1] == pytest.approx(1.0)
    # seaborn draws hues in reverse; match each curve's largest x to its set's largest NLL
    largest = sorted(tokens.groupby("target_set")["nll"].max())
    assert sorted(c.get_xdata()[-1] for c in curves) == pytest.approx(largest)


def test_nll_by_position_plots_the_mean(tokens):
    ax = plots.nll_by_position(tokens, new_ax())
    means = tokens.groupby(["target_set", "position"], sort=False)["nll"].mean()
    lines = {tuple(np.round(line.get_ydata(), 12)) for line in ax.get_lines() if len(line.get_ydata())}
    for name in SETS:
        assert tuple(np.round(means[name].to_numpy(), 12)) in lines
    assert "2 SE" in ax.get_ylabel()


def test_sequence_nll_vs_length_one_point_per_item(tokens):
    sequences = (tokens.groupby(["target_set", "item"], sort=False)
                 .agg(length=("nll", "size"), sequence_nll=("nll", "sum")).reset_index())
    ax = plots.sequence_nll_vs_length(sequences, new_ax())
    points = np.concatenate([c.get_offsets() for c in ax.collections])
    expected = sequences[["length", "sequence_nll"]].to_numpy()
    np.testing.assert_allclose(np.array(sorted(map(tuple, points))),
                               np.array(sorted(map(tuple, expected))))


def test_token_heat_strip_cells_and_branch_marks(tokens):
    one = tokens[tokens["item"] == "r2"]  # 21 tokens per set, 8 per row -> 3 rows per set
    ax = plots.token_heat_strip(one, new_ax(), width=8)
    grid = ax.get_images()[0].get_array()
    assert grid.shape == (3 + 1 + 3, 8)  # two blocks and one blank separator row
    first = one[one.target_set == SETS[0]]["nll"].to_numpy()
    second = one[one.target_set == SETS[1]]["nll"].to_numpy()
    np.testing.assert_allclose(grid[:3].compressed(), first)
    np.testing.assert_allclose(grid[4:].compressed(), second)
    assert grid[3].mask.all() and grid[2].mask[5:].all()
    outlines = [p for p in ax.patches if isinstance(p, Rectangle)]
    styles = [p.get_linestyle() for p in outlines]
    mix = one[one.target_set == SETS[1]]
    assert styles.count("-") == (mix.branch == "expert").sum()
    assert styles.count("--") == (mix.branch == "naive").sum()
    assert len(ax.texts) == len(one) and ax.texts[0].get_text() == "w0\\n"
    assert [t.get_text() for t in ax.get_yticklabels()] == SETS
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["expert token", "naive token"]


def test_token_heat_strip_without_sets_or_branches(tokens):
    one = tokens[(tokens["item"] == "r0") & (tokens.target_set == "SFT")]
    ax = plots.token_heat_strip(one.drop(columns=["target_set", "branch"]), new_ax())
    assert ax.get_images()[0].get_array().shape == (1, 16)
    assert not ax.patches and ax.get_legend() is None


def test_bad_data(tokens):
    with pytest.raises(ValueError, match="select one item"):
        plots.token_heat_strip(tokens, new_ax())
    with pytest.raises(ValueError, match=r"lacks columns \['nll'\]"):
        plots.token_nll_ecdf(tokens.drop(columns=["nll"]), new_ax())
    with pytest.raises(ValueError, match="empty"):
        plots.nll_by_position(tokens.iloc[:0], new_ax())
    with pytest.raises(ValueError, match="width"):
        plots.token_heat_strip(tokens[tokens.item == "r0"], new_ax(), width=0)


def test_fisher_figures_take_more_fine_tunes_than_the_palette_has_colors():
    """One color per fine-tune however many there are (a study diagnoses dozens)."""
    import pandas as pd
    from matplotlib.figure import Figure

    from forgetkit.fisher import plots as fisher_plots

    names = [f"run {i}" for i in range(14)]
    kl = pd.DataFrame([{"finetune": n, "representation": "exact", "predicted_kl": 1.0 + i,
                        "predicted_low": 0.5 + i, "predicted_high": 1.5 + i,
                        "measured_kl": 2.0 + i, "measured_low": 1.0 + i,
                        "measured_high": 3.0 + i} for i, n in enumerate(names)])
    ax = fisher_plots.predicted_vs_measured_kl(kl, Figure().subplots())
    from matplotlib.colors import to_hex

    colors = {c.get_label(): to_hex(c.lines[0].get_color()) for c in ax.containers}
    assert set(colors) == {f"{n}: exact" for n in names}
    assert len(set(colors.values())) == len(names)
    # the legend names each fine-tune once and each representation once, not every pair
    both = pd.concat([kl, kl.assign(representation="diagonal proxy")])
    ax = fisher_plots.predicted_vs_measured_kl(both, Figure().subplots())
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        *names, "exact", "diagonal proxy", "y = x"]
    path = pd.DataFrame([{"finetune": n, "t": t, "measured_kl": t, "low": t / 2, "high": 2 * t,
                          "predicted_kl": t, "predicted_low": t / 2, "predicted_high": 2 * t}
                         for n in names for t in (0.5, 1.0)])
    fisher_plots.kl_along_path(path, Figure().subplots())
