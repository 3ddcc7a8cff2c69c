"""Benchmark the exact Fisher displacement ``fisher.displacement`` against a forward pass.

For a model and N probes it times, in one process and side by side:

- ``forward``: a plain ``no_grad`` forward pass over the probes (same batches, the model's own
  attention kernel): the unit of cost;
- ``displacement``: the exact ``d' F d`` of a random update over every weight (one
  forward-mode product per batch);

and prints the ratio (goal: at most 4 forward passes). Peak memory is measured in a fresh
subprocess per part (peak RSS, ``VmHWM``, reset after loading and a two-probe warm-up), above the
process's footprint with the model loaded:
goal at most 2x that of the forward pass. Times are the best of ``--repeats`` runs.

Usage:
    python experiments/bench_displacement.py --model toyworld --n 128
    python experiments/bench_displacement.py --model smollm2-135m --n 128 --repeats 1
Results go to experiments/results/bench_displacement_<model>.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from forgetkit import fisher
from forgetkit.cli_config import command_line
from forgetkit.data.records import load_probes
from forgetkit.files import atomic_write_json
from forgetkit.fisher.report import spread_sample
from forgetkit.models import collate, encode, load_model

RESULTS = Path(__file__).parent / "results"


def _setup(model_name: str, n: int, dtype: str):
    model, tokenizer = load_model(model_name, dtype=dtype)
    model.eval()
    probes = spread_sample(load_probes("toyworld" if model_name == "toyworld" else "general"), n)
    generator = torch.Generator().manual_seed(0)
    update = {name: torch.randn(p.shape, generator=generator, dtype=p.dtype) * 1e-3
              for name, p in model.named_parameters()}
    return model, tokenizer, probes, update


def _forward(model, tokenizer, probes, batch_size: int) -> None:
    encodings = sorted((encode(tokenizer, p.prompt, p.answer) for p in probes),
                       key=lambda e: -len(e.input_ids))
    with torch.no_grad():
        for start in range(0, len(encodings), batch_size):
            batch = collate(encodings[start : start + batch_size], tokenizer.pad_token_id)
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  position_ids=batch["position_ids"], use_cache=False)


def _part(kind: str, model, tokenizer, probes, update, batch_size: int):
    if kind == "forward":
        return lambda: _forward(model, tokenizer, probes, batch_size)
    return lambda: fisher.displacement(model, tokenizer, probes, update, batch_size=batch_size)


def best_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _status(field: str) -> int:
    """A ``/proc/self/status`` memory field in bytes (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def worker(kind: str, model_name: str, n: int, batch_size: int, dtype: str) -> dict:
    """Peak RSS of one part in this fresh process, above the loaded model's footprint: the
    part runs once on two probes first (so one-time costs, the code that forward-mode AD
    imports and caches, are not counted), then the peak (VmHWM) is reset (``clear_refs`` 5),
    so loading's own peak is not counted either."""
    model, tokenizer, probes, update = _setup(model_name, n, dtype)
    _part(kind, model, tokenizer, probes[:2], update, batch_size)()  # imports, kernel caches
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    loaded = _status("VmRSS")
    _part(kind, model, tokenizer, probes, update, batch_size)()
    peak = _status("VmHWM")
    return {"kind": kind, "loaded_bytes": loaded, "peak_bytes": peak,
            "extra_bytes": peak - loaded}


@command_line
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toyworld")
    parser.add_argument("--n", type=int, default=128, help="probes")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--worker", choices=["forward", "displacement"], help=argparse.SUPPRESS)
    parser.add_argument("--debug", action="store_true", help=(
        "on an error, show the full traceback instead of one line"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(args.worker, args.model, args.n, args.batch_size, args.dtype)))
        return
    model, tokenizer, probes, update = _setup(args.model, args.n, args.dtype)
    times = {kind: best_time(_part(kind, model, tokenizer, probes, update, args.batch_size),
                             args.repeats) for kind in ("forward", "displacement")}
    memory = {}
    for kind in ("forward", "displacement"):
        out = subprocess.run([sys.executable, __file__, "--worker", kind, "--model", args.model,
                              "--n", str(args.n), "--batch-size", str(args.batch_size),
                              "--threads", str(args.threads), "--dtype", args.dtype],
                             check=True, capture_output=True, text=True)
        memory[kind] = json.loads(out.stdout.strip().splitlines()[-1])
    result = {
        "model": args.model, "parameters": sum(p.numel() for p in model.parameters()),
        "probes": len(probes), "batch_size": args.batch_size, "threads": args.threads,
        "dtype": args.dtype, "machine": platform.processor() or platform.machine(),
        "seconds": times, "time_ratio": times["displacement"] / times["forward"],
        "memory": memory,
        "memory_ratio": memory["displacement"]["extra_bytes"] / memory["forward"]["extra_bytes"],
    }
    print(f"{args.model}: {result['parameters']:,} parameters, {len(probes)} probes, "
          f"{args.threads} thread(s)")
    print(f"  forward {times['forward']:.2f} s, displacement {times['displacement']:.2f} s: "
          f"{result['time_ratio']:.2f} forward passes (goal <= 4)")
    print(f"  peak memory above the loaded model: forward "
          f"{memory['forward']['extra_bytes'] / 2**20:.0f} MiB, displacement "
          f"{memory['displacement']['extra_bytes'] / 2**20:.0f} MiB: "
          f"{result['memory_ratio']:.2f}x (goal <= 2)")
    atomic_write_json(RESULTS / f"bench_displacement_{args.model}.json", result)


if __name__ == "__main__":
    main()
