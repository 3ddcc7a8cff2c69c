"""``python -m forgetkit.fisher``: project fine-tuning updates onto the base model's Fisher and
write ``report/`` (report.json, PNGs, report.html).

With no arguments: toyworld base, kgfact records, toyworld probes, quick SFT and MixSD
(lambda 0.3) fine-tunes trained first. ``--finetuned NAME=PATH ...`` takes one or more
fine-tunes (and may be repeated).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from forgetkit.cli_config import command_line, parse_cli
from forgetkit.fisher.render import summary_rows
from forgetkit.fisher.report import ReportConfig, run_report


@command_line
def main(argv: Sequence[str] | None = None) -> None:
    [config] = parse_cli(ReportConfig, argv, "python -m forgetkit.fisher", doc=__doc__)
    started = time.time()
    report = run_report(config)
    rows = summary_rows(report)
    import pandas as pd

    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(pd.DataFrame(rows).to_string(index=False, float_format=lambda x: f"{x:.4g}"))
    print(f"\nreport written to {config.out}/report.html ({time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
