"""Benchmark MixSD target construction (``forgetkit.mixsd.build_targets``) on CPU.

For each model, in one process and on the same kgfact records, at lam 0.3, T 0, 64 new tokens:

- MixSD: ``build_targets`` (two branches, one batched KV-cached forward per step, slot refill);
  tokens/s counts every decoded token.
- (a) single-branch KV-cached greedy generation of the same model at the same batch size
  (``model.generate``, left-padded batches) on the naive prompts and, for reference, on the
  longer expert prompts. Goal: MixSD >= 0.45x the naive baseline.
- (b) the one-token-per-call loop that re-encodes both prompts and the whole suffix for every
  token, one record at a time (``forgetkit.mixsd.decode.reference_decode``, which produces the
  same tokens). It is only timed on the first record(s) and its tokens/s is extrapolated to the
  whole set: an estimate, labelled as such. Goal: MixSD >= 10x faster.

Two regimes: ``natural`` (rows stop at the end token, so throughput includes short replies and
prefill-heavy batches) and ``fixed_64`` (end tokens disabled: every row decodes exactly 64
tokens, the regime the goals are stated in). On smollm2-135m it also reports the share of correct
targets (first try and after retries) and the mean expert_token_fraction.

Usage::

    python experiments/bench_mixsd.py            # full sizes
    python experiments/bench_mixsd.py --quick    # smaller sizes, fewer retries

Prints a table and writes ``experiments/results/bench_mixsd.json``. One torch thread by default:
on a shared 2-core CPU more threads made these small models ~10x slower.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import platform
import sys
import time
from pathlib import Path

import torch

import forgetkit.mixsd.decode as mixsd_decode
from forgetkit.cli_config import command_line
from forgetkit.data.prompts import expert_prompt
from forgetkit.data.records import load_records
from forgetkit.files import atomic_write_json
from forgetkit.mixsd import MixConfig, build_targets
from forgetkit.mixsd.decode import reference_decode
from forgetkit.models import collate, encode, end_token_ids, load_model

RESULTS = Path(__file__).parent / "results" / "bench_mixsd.json"

# per model: records timed, batch size, records timed for the re-encode loop; (full, quick)
SIZES = {
    "toyworld": {"records": (64, 32), "batch_size": (16, 16), "reencode": (8, 4)},
    "smollm2-135m": {"records": (20, 20), "batch_size": (8, 8), "reencode": (1, 1)},
}


@contextlib.contextmanager
def fixed_length():
    """Fixed-length regime: no token ends a MixSD completion, so every row decodes exactly
    ``max_new_tokens`` (``model.generate`` gets ``min_new_tokens`` for the same effect)."""
    original = mixsd_decode.checked_end_tokens
    mixsd_decode.checked_end_tokens = lambda tokenizer, model: [-1]
    try:
        yield
    finally:
        mixsd_decode.checked_end_tokens = original


@torch.no_grad()
def greedy_throughput(model, tokenizer, prompts: list[str], batch_size: int,
                      max_new_tokens: int, fixed: bool) -> dict:
    """Single-branch KV-cached greedy decoding (``model.generate``, left-padded batches).

    Tokens are counted up to and including each row's end token (all of them if ``fixed``).
    """
    ends = end_token_ids(tokenizer, model)
    tokens, started = 0, time.perf_counter()
    for start in range(0, len(prompts), batch_size):
        batch = collate([encode(tokenizer, p) for p in prompts[start : start + batch_size]],
                        tokenizer.pad_token_id, padding_side="left")
        out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=ends,
                             pad_token_id=tokenizer.pad_token_id,
                             min_new_tokens=max_new_tokens if fixed else 0)
        for row in out[:, batch["input_ids"].shape[1] :].tolist():
            tokens += next((i + 1 for i, t in enumerate(row) if t in ends), len(row))
    return _rate(tokens, time.perf_counter() - started)


def _rate(tokens: int, seconds: float) -> dict:
    return {"tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": tokens / seconds}


def mixsd_throughput(model, tokenizer, records, config: MixConfig) -> tuple[dict, list]:
    targets = build_targets(model, tokenizer, records, config)
    return _rate(targets.report.generated_tokens, targets.report.seconds), targets


def reencode_throughput(model, tokenizer, records, config: MixConfig, targets) -> dict:
    """The one-token-per-call re-encoding loop on ``records`` (a prefix of the MixSD run's)."""
    started = time.perf_counter()
    outputs = [reference_decode(model, tokenizer, record, config)[0] for record in records]
    result = _rate(sum(map(len, outputs)), time.perf_counter() - started)
    result["records_timed"] = len(records)
    result["same_tokens_as_mixsd"] = outputs == [t.token_ids for t in targets[: len(records)]]
    return result


def bench_model(name: str, quick: bool, max_retries: int) -> dict:
    pick = 1 if quick else 0
    sizes = {key: value[pick] for key, value in SIZES[name].items()}
    model, tokenizer = load_model(name, device="cpu")
    records = load_records("kgfact")[: sizes["records"]]
    config = MixConfig(lam=0.3, temperature=0.0, max_new_tokens=64, max_retries=0,
                       on_failure="keep", batch_size=sizes["batch_size"])
    build_targets(model, tokenizer, records[:2], dataclasses.replace(config, max_new_tokens=4))
    greedy_throughput(model, tokenizer, [records[0].prompt], 1, 4, fixed=False)  # warm-up
    naive = [r.prompt for r in records]
    args = (config.batch_size, config.max_new_tokens)
    result = {"model": name, "records": len(records), "batch_size": config.batch_size,
              "max_new_tokens": config.max_new_tokens, "lam": config.lam,
              "temperature": config.temperature}

    mix, targets = mixsd_throughput(model, tokenizer, records, config)
    greedy = greedy_throughput(model, tokenizer, naive, *args, fixed=False)
    expert = greedy_throughput(
        model, tokenizer, [expert_prompt(r.prompt, r.expert_context) for r in records], *args,
        fixed=False)
    result["natural"] = {
        "note": "rows stop at the end token or max_new_tokens",
        "mixsd": mix, "greedy_naive": greedy, "greedy_expert": expert,
        "ratio_vs_greedy_naive": mix["tokens_per_s"] / greedy["tokens_per_s"],
        "first_try_correct_share": targets.report.n_correct_first_try / len(records),
    }

    with fixed_length():
        mix, targets = mixsd_throughput(model, tokenizer, records, config)
        slow = reencode_throughput(model, tokenizer, records[: sizes["reencode"]], config,
                                   targets)
    greedy = greedy_throughput(model, tokenizer, naive, *args, fixed=True)
    slow["extrapolated_seconds_for_all_records"] = mix["tokens"] / slow["tokens_per_s"]
    slow["note"] = (f"timed on {slow['records_timed']} of {len(records)} records, extrapolated "
                    "linearly to all records (every record decodes the same 64 tokens)")
    result["fixed_64"] = {
        "note": "end tokens disabled: every row decodes exactly max_new_tokens",
        "mixsd": mix, "greedy_naive": greedy, "reencode": slow,
        "ratio_vs_greedy_naive": mix["tokens_per_s"] / greedy["tokens_per_s"],
        "speedup_vs_reencode": mix["tokens_per_s"] / slow["tokens_per_s"],
    }

    if name == "smollm2-135m":
        quality = build_targets(model, tokenizer, records,
                                dataclasses.replace(config, max_retries=max_retries))
        report = quality.report
        correct = [t for t in quality if t.correct]
        result["quality"] = {
            "records": len(records), "max_retries": max_retries, "on_failure": "keep",
            "correct_first_try": report.n_correct_first_try,
            "correct_after_retry": report.n_correct_after_retry, "failed": report.n_failed,
            "correct_share": (report.n_records - report.n_failed) / report.n_records,
            "mean_expert_token_fraction":
                sum(t.expert_token_fraction for t in quality) / len(quality),
            "mean_expert_token_fraction_correct":
                sum(t.expert_token_fraction for t in correct) / max(1, len(correct)),
            "attempts": report.n_attempts,
            **_rate(report.generated_tokens, report.seconds),
        }
    return result


def print_table(results: list[dict]) -> None:
    header = (f"{'model':<13} {'regime':<8} {'B':>3} {'MixSD tok/s':>11} {'greedy naive':>12} "
              f"{'greedy expert':>13} {'(a) ratio':>9} {'re-encode*':>10} {'(b) speedup':>11}")
    print(header)
    print("-" * len(header))
    for r in results:
        for regime in ("natural", "fixed_64"):
            row = r[regime]
            expert = row.get("greedy_expert", {}).get("tokens_per_s")
            slow = row.get("reencode", {}).get("tokens_per_s")
            speedup = row.get("speedup_vs_reencode")
            print(f"{r['model']:<13} {regime:<8} {r['batch_size']:>3} "
                  f"{row['mixsd']['tokens_per_s']:>11.1f} "
                  f"{row['greedy_naive']['tokens_per_s']:>12.1f} "
                  f"{'' if expert is None else f'{expert:.1f}':>13} "
                  f"{row['ratio_vs_greedy_naive']:>9.2f} "
                  f"{'' if slow is None else f'{slow:.2f}':>10} "
                  f"{'' if speedup is None else f'{speedup:.1f}x':>11}")
    print("natural: rows stop at the end token; fixed_64: every row decodes exactly 64 tokens")
    print("* re-encode loop timed on the first records only; its tokens/s is extrapolated")
    for r in results:
        if "quality" in r:
            q = r["quality"]
            print(f"{r['model']} quality, {q['records']} kgfact records, lam 0.3, T 0, "
                  f"max_retries {q['max_retries']}: correct {q['correct_share']:.0%} "
                  f"({q['correct_first_try']} first try, {q['correct_after_retry']} after retry, "
                  f"{q['failed']} failed), mean expert_token_fraction "
                  f"{q['mean_expert_token_fraction']:.3f} (correct ones "
                  f"{q['mean_expert_token_fraction_correct']:.3f}), {q['attempts']} attempts, "
                  f"{q['tokens_per_s']:.1f} tok/s")


@command_line
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes")
    parser.add_argument("--models", nargs="*", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--max-retries", type=int, default=None,
                        help="retries of the smollm2 quality run (default 10, quick 3)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1 is fastest for these small models on a "
                             "shared CPU)")
    parser.add_argument("--debug", action="store_true", help=(
        "on an error, show the full traceback instead of one line"))
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    max_retries = args.max_retries if args.max_retries is not None else (3 if args.quick else 10)
    started = time.perf_counter()
    results = [bench_model(name, args.quick, max_retries) for name in args.models]
    print_table(results)
    atomic_write_json(RESULTS, {
        "command": " ".join(["python", *sys.argv]), "quick": args.quick,
        "threads": args.threads, "torch": torch.__version__, "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared)",
        "total_seconds": time.perf_counter() - started, "results": results,
    })
    print(f"wrote {RESULTS} in {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
