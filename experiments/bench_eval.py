"""Benchmark multiple-choice probe scoring (``forgetkit.diagnostics.evaluation.choice_logliks``).

forgetkit runs each probe's prompt once and shares its KV cache among the choices, which then
run their own tokens only; probes go in order of length. The baseline, side by side in the same
process on the same probes: every choice encoded as prompt + choice and run whole (the
lm-eval-style loop forgetkit used before), ``batch_size`` sequences per forward pass, in probe
order. Both sum the choice tokens' log-probabilities; the script prints the time of each, the
ratio, the largest difference of a sum and how many predictions (argmax) differ.

Usage::

    python experiments/bench_eval.py                      # SmolLM2-135M, 200 general probes
    python experiments/bench_eval.py --n 600 --batch-size 32

One torch thread unless ``--threads`` says otherwise; best of ``--repeats`` after a warm-up.
Writes ``experiments/results/bench_eval.json``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from forgetkit.cli_config import command_line
from forgetkit.data.records import load_probe_sets
from forgetkit.diagnostics.evaluation import choice_logliks
from forgetkit.diagnostics.loglik import model_logprobs
from forgetkit.files import atomic_write_json
from forgetkit.models import collate, encode, load_model


@torch.no_grad()
def whole_sequences(model, tokenizer, probes, batch_size: int) -> list[list[float]]:
    """The baseline: every choice as one prompt + choice sequence, in probe order."""
    pairs = [(i, encode(tokenizer, p.prompt, c, add_end_token=False))
             for i, p in enumerate(probes) for c in p.choices]
    sums: list[list[float]] = [[] for _ in probes]
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        batch = collate([e for _, e in chunk], tokenizer.pad_token_id)
        logp, _ = model_logprobs(model, batch)
        for (i, _), value in zip(chunk, logp.sum(-1).tolist(), strict=True):
            sums[i].append(value)
    return sums


def best_of(fn, repeats: int) -> tuple[float, object]:
    fn()  # warm-up
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


@command_line
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="base model (name or path)")
    parser.add_argument("--probes", default="general",
                        help="probe sets (comma-separated names or files)")
    parser.add_argument("--n", type=int, default=200,
                        help="multiple-choice probes scored, spread over the capabilities")
    parser.add_argument("--batch-size", type=int, default=64, help="sequences per batch")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs (best is kept)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out", default="experiments/results/bench_eval.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, device="cpu")
    model.eval()
    choice = [p for p in load_probe_sets(args.probes.split(",")) if p.choices]
    if not choice:
        parser.error(f"--probes {args.probes}: no probe with choices")
    step = max(1, len(choice) // args.n)
    probes = choice[::step][: args.n]
    base_s, reference = best_of(lambda: whole_sequences(model, tokenizer, probes,
                                                        args.batch_size), args.repeats)
    ours_s, ours = best_of(lambda: choice_logliks(model, tokenizer, probes, args.batch_size),
                           args.repeats)
    diff = max(abs(a - b) for r, o in zip(reference, ours, strict=True)
               for a, b in zip(r, o, strict=True))
    picks = sum(max(range(len(r)), key=r.__getitem__) != max(range(len(o)), key=o.__getitem__)
                for r, o in zip(reference, ours, strict=True))
    result = {"command": " ".join(["python", *sys.argv]), "model": args.model, "probes": len(probes),
              "choices": sum(len(p.choices) for p in probes), "batch_size": args.batch_size,
              "threads": args.threads, "whole_sequences_s": base_s, "shared_prompt_s": ours_s,
              "speedup": base_s / ours_s, "max_abs_difference": diff,
              "predictions_differing": picks, "torch": torch.__version__,
              "machine": platform.machine()}
    print(f"{args.model}, {len(probes)} probes ({result['choices']} choices), batch "
          f"{args.batch_size}, {args.threads} thread(s): whole sequences {base_s:.2f} s, "
          f"shared prompt {ours_s:.2f} s, {base_s / ours_s:.2f}x; largest difference of a sum "
          f"{diff:.2e}, {picks} prediction(s) differ")
    atomic_write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
