"""``python -m forgetkit.toyworld``: train toyworld (once) and print its ability checks.

The model itself lives in :mod:`forgetkit.models.toyworld`; this is its command line.
``--retrain`` trains anew (deterministic, a few minutes on a 2-core CPU) into
``$FORGETKIT_CACHE``.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from forgetkit.cli_config import command_line, parse_cli
from forgetkit.cli_config import help_metadata as _help
from forgetkit.models import cache_dir, load_model
from forgetkit.models.toyworld import (
    VERSION,
    ToyConfig,
    ability_checks,
    ensure_toyworld,
    train_toyworld,
)


@dataclass
class ToyworldArgs:
    """Train (once) and check the toyworld model."""

    retrain: bool = field(default=False, metadata=_help("train again even if cached"))
    seed: int = field(default=0, metadata=_help(
        "seed of toyworld's pretraining and of the ability checks"))
    steps: int = field(default=ToyConfig.steps, metadata=_help("pretraining steps"))

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {self.steps}")


@command_line
def main(argv: Sequence[str] | None = None) -> None:
    [args] = parse_cli(ToyworldArgs, argv, "python -m forgetkit.toyworld", doc=__doc__)
    config = ToyConfig(seed=args.seed, steps=args.steps)
    started = time.time()
    if args.retrain or config != ToyConfig(seed=args.seed):
        out = cache_dir() / f"toyworld-v{VERSION}-seed{config.seed}-steps{config.steps}"
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(out)
        train_toyworld(config, out)
        model, tokenizer = load_model(out, device="cpu")
    else:
        model, tokenizer = load_model(ensure_toyworld(config), device="cpu")
    trained = time.time() - started
    n_params = sum(p.numel() for p in model.parameters())
    print(f"toyworld: {n_params / 1e6:.2f}M parameters, vocabulary {len(tokenizer)}, "
          f"ready in {trained:.0f} s")
    for name, value in ability_checks(model, tokenizer, seed=args.seed).items():
        print(f"  {name:<14} {100 * value:5.1f}%")


if __name__ == "__main__":
    main()
