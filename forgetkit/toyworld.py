"""``python -m forgetkit.toyworld``: train toyworld (once) and print its ability checks.

The model itself lives in :mod:`forgetkit.models.toyworld`; this is its command line.
``--retrain`` trains anew (deterministic, a few minutes on a 2-core CPU) into
``$FORGETKIT_CACHE``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import shutil
import time

from forgetkit.models import cache_dir, load_model
from forgetkit.models.toyworld import (
    VERSION,
    ToyConfig,
    ability_checks,
    ensure_toyworld,
    train_toyworld,
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m forgetkit.toyworld",
                                     description="Train (once) and check the toyworld model.")
    parser.add_argument("--retrain", action="store_true", help="train again even if cached")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=ToyConfig.steps)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
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
