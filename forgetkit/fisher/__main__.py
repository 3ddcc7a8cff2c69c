"""``python -m forgetkit.fisher``: project fine-tuning updates onto the base model's Fisher and
write ``report/`` (report.json, PNGs, report.html).

With no arguments: toyworld base, kgfact records, toyworld probes, quick SFT and MixSD
(lambda 0.3) fine-tunes trained first. ``--finetuned NAME=PATH ...`` takes one or more
fine-tunes (and may be repeated). ``--plan`` prints the predicted memory of each Fisher
representation for ``--base`` and exits without loading weights.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from forgetkit.cli_config import command_line, parse_cli
from forgetkit.fisher.render import summary_rows
from forgetkit.fisher.report import ReportConfig, run_report


def plan_table(config: ReportConfig) -> str:
    """The memory plan of ``config``'s Fisher computations, from the base model's config."""
    from forgetkit.fisher.pergrad import FisherError
    from forgetkit.fisher.plan import (
        available_memory,
        choose_representation,
        memory_plan,
        model_config,
    )
    from forgetkit.models import resolve_device, resolve_dtype

    plan = memory_plan(model_config(config.base), params=config.params,
                       n_samples=config.n_samples, seq_len=config.plan_seq_len,
                       fisher_batch_size=config.fisher_batch_size,
                       exact_batch_size=config.exact_batch_size, rank=config.rank,
                       dtype=resolve_dtype(config.dtype), mc_samples=config.mc_samples)
    device = resolve_device(config.device)
    free = available_memory(device)
    try:
        held = (len(config.finetuned) or 2) * (plan.weights_bytes + plan.selected * 4)
        chosen = choose_representation(plan, free, config.representation,
                                       config.low_rank_method,
                                       kfac_possible=plan.factored_layers > 0, held=held)[0]
        verdict = f"--representation {config.representation}: {chosen}"
    except FisherError as err:
        verdict = f"--representation {config.representation}: does not fit ({err})"
    return (f"{plan.to_text()}\n\n{device} has {free / 2**30:.2f} GiB free (the model's "
            f"weights come on top of the peaks above); {verdict}")


@command_line
def main(argv: Sequence[str] | None = None) -> None:
    [config] = parse_cli(ReportConfig, argv, "python -m forgetkit.fisher", doc=__doc__)
    if config.plan:
        print(plan_table(config))
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
