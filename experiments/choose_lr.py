"""Choose the learning rate of a matched-memorization study from a grid of Pareto runs.

Each folder is one ``experiments/pareto.py`` run (``results.json``) of the same methods at one
learning rate, trained until a memorization target (``stop_at_memorization``). The rule: the
learning rate whose slower method reaches the target in the fewest steps (the maximum over
methods of the steps to the target; a method that never reaches it counts as never); ties go
to the smaller learning rate. A grid where no learning rate brings every method to the target
is an error: raise the step cap or widen the grid.

    python experiments/choose_lr.py experiments/results/pareto/smollm2-135m-lr-grid/*
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from forgetkit.cli_config import markdown_table


def steps_to_target(folder: Path) -> tuple[float, dict[str, float]]:
    """(learning rate, method label -> steps to the target, ``inf`` where not reached)."""
    path = folder / "results.json"
    if not path.is_file():
        raise SystemExit(f"error: {path}: no results.json (run experiments/pareto.py first)")
    results = json.loads(path.read_text(encoding="utf-8"))
    steps = {}
    for row in results["rows"]:
        if row["label"].endswith("@peak"):
            continue
        if row.get("reached_target") is None:
            raise SystemExit(f"error: {path}: run {row['label']!r} has no reached_target "
                             "(trained without stop_at_memorization)")
        steps[row["label"]] = row["steps"] if row["reached_target"] else math.inf
    return float(results["budget"]["learning_rate"]), steps


def choose(grid: dict[float, dict[str, float]]) -> float:
    """The rule of the module docstring."""
    slowest = {lr: max(steps.values()) for lr, steps in grid.items()}
    best = min(slowest.values())
    if math.isinf(best):
        raise SystemExit("error: no learning rate of the grid brings every method to the "
                         "target: raise max_steps or widen the grid")
    return min(lr for lr, value in slowest.items() if value == best)


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path, help="pareto.py output folders")
    args = parser.parse_args(argv)
    grid = dict(steps_to_target(folder) for folder in args.folders)
    chosen = choose(grid)
    import pandas as pd

    table = pd.DataFrame([{"learning_rate": lr, **steps} for lr, steps in sorted(grid.items())])
    print(markdown_table(table, style="g"))
    print(f"\nchosen learning rate: {chosen:g}")
    return chosen


if __name__ == "__main__":
    main()
