"""``python -m forgetkit.fisher``: project fine-tuning updates onto the base model's Fisher and
write ``report/`` (report.json, PNGs, report.html).

With no arguments: toyworld base, kgfact records, toyworld probes, quick SFT and MixSD
(lambda 0.3) fine-tunes trained first. ``--finetuned NAME=PATH`` may be repeated.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from forgetkit.cli_config import load_config, parse_cli
from forgetkit.fisher.render import summary_rows
from forgetkit.fisher.report import ReportConfig, run_report


def _split_finetuned(argv: list[str]) -> tuple[list[str], list[str]]:
    """Pull every ``--finetuned NAME=PATH`` (repeatable) out of ``argv``."""
    rest, finetuned, i = [], [], 0
    while i < len(argv):
        token = argv[i]
        if token == "--finetuned" and i + 1 < len(argv):
            finetuned.append(argv[i + 1])
            i += 2
            continue
        if token.startswith("--finetuned="):
            finetuned.append(token.split("=", 1)[1])
        else:
            rest.append(token)
        i += 1
    return rest, finetuned


def _load(argv: list[str]) -> ReportConfig:
    rest, finetuned = _split_finetuned(argv)
    config = load_config(ReportConfig, rest)
    if finetuned:
        config.finetuned = finetuned
        config.__post_init__()
    return config


def main(argv: Sequence[str] | None = None) -> None:
    config = parse_cli(ReportConfig, argv, "python -m forgetkit.fisher", doc=__doc__,
                       loader=_load)
    if config is None:
        return
    started = time.time()
    report = run_report(config)
    rows = summary_rows(report)
    import pandas as pd

    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(pd.DataFrame(rows).to_string(index=False, float_format=lambda x: f"{x:.4g}"))
    print(f"\nreport written to {config.out}/report.html ({time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
