"""Check the memory model of ``python -m forgetkit.fisher --plan`` against measured peaks.

For each representation (diagonal, gram, randomized, exact low-rank, kfac, the exact
displacement of one update) a fresh subprocess loads the model, runs the computation once on
two probes (imports, kernel caches), returns the memory it freed to the system (glibc
``malloc_trim``: freed tensors under the mmap threshold otherwise stay resident and would hide
the measured run's reuse of them), resets the peak RSS (``VmHWM``, ``clear_refs`` 5, as
bench_displacement.py does) and runs it on N probes; the peak above the loaded footprint is
compared with :func:`forgetkit.fisher.plan.memory_plan`'s prediction for the same settings
(``seq_len`` = the longest probe, whose batch sets the activations' peak).

Each worker also records the wall time of the measured run. Rows of representations not run
this time are kept from an earlier results file of the same model and settings.

Usage:
    python experiments/bench_plan.py --model toyworld --n 64
    python experiments/bench_plan.py --model smollm2-135m --n 128 --threads 2 \
        --representations kfac displacement diagonal
Results go to experiments/results/bench_plan_<model>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
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
from forgetkit.fisher.plan import PLAN_REPRESENTATIONS, memory_plan, probe_lengths
from forgetkit.fisher.report import spread_sample
from forgetkit.models import encode, load_model

RESULTS = Path(__file__).parent / "results"
RANK, FISHER_BATCH, EXACT_BATCH = 16, 8, 32


def _setup(model_name: str, n: int):
    model, tokenizer = load_model(model_name, device="cpu")
    probes = spread_sample(load_probes("toyworld" if model_name == "toyworld" else "general"), n)
    generator = torch.Generator().manual_seed(0)
    update = {name: torch.randn(p.shape, generator=generator) * 1e-3
              for name, p in model.named_parameters()}
    return model, tokenizer, probes, update


def _run(kind: str, model, tokenizer, probes, update) -> None:
    rank = min(RANK, len(probes) - 1)
    runs = {
        "diagonal": lambda: fisher.diagonal(model, tokenizer, probes, batch_size=FISHER_BATCH),
        "gram": lambda: fisher.low_rank(model, tokenizer, probes, rank=rank, method="gram",
                                        batch_size=FISHER_BATCH),
        "randomized": lambda: fisher.low_rank(model, tokenizer, probes, rank=rank,
                                              method="randomized", batch_size=FISHER_BATCH),
        "exact": lambda: fisher.low_rank(model, tokenizer, probes, rank=rank, method="exact",
                                         batch_size=EXACT_BATCH),
        "kfac": lambda: fisher.kfac(model, tokenizer, probes, batch_size=FISHER_BATCH),
        "displacement": lambda: fisher.displacement(model, tokenizer, probes, update,
                                                    batch_size=EXACT_BATCH),
    }
    runs[kind]()


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _release_freed_memory() -> None:
    """Return freed heap memory to the system (glibc ``malloc_trim``), so that the resident
    size counts live memory only: tensors under glibc's mmap threshold (up to 32 MiB, e.g. a
    Kronecker factor) stay in the heap when freed, and memory the warm-up run freed would
    otherwise be reused by the measured run without raising the peak."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to release
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def worker(kind: str, model_name: str, n: int) -> dict:
    model, tokenizer, probes, update = _setup(model_name, n)
    _run(kind, model, tokenizer, probes[:2], update)
    gc.collect()
    _release_freed_memory()
    Path("/proc/self/clear_refs").write_text("5")
    loaded = _status("VmRSS")
    start = time.perf_counter()
    _run(kind, model, tokenizer, probes, update)
    return {"kind": kind, "loaded_bytes": loaded, "extra_bytes": _status("VmHWM") - loaded,
            "seconds": time.perf_counter() - start}


@command_line
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toyworld")
    parser.add_argument("--n", type=int, default=64, help="probes")
    parser.add_argument("--representations", nargs="*", choices=PLAN_REPRESENTATIONS,
                        default=list(PLAN_REPRESENTATIONS),
                        help="the ones to measure (none: recompute the predictions of the rows "
                             "already measured, e.g. after a change to the memory model)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--worker", choices=PLAN_REPRESENTATIONS, help=argparse.SUPPRESS)
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(args.worker, args.model, args.n)))
        return
    model, tokenizer, probes, _ = _setup(args.model, args.n)
    lengths = probe_lengths([encode(tokenizer, p.prompt, p.answer) for p in probes])
    longest = lengths["seq_len"]
    plan = memory_plan(model, n_samples=len(probes), **lengths, fisher_batch_size=FISHER_BATCH, exact_batch_size=EXACT_BATCH,
                       rank=min(RANK, len(probes) - 1))
    path = RESULTS / f"bench_plan_{args.model}.json"
    settings = {"model": args.model, "parameters": plan.parameters, "probes": len(probes),
                "seq_len": longest, "rank": plan.settings["rank"],
                "fisher_batch_size": FISHER_BATCH, "exact_batch_size": EXACT_BATCH,
                "threads": args.threads}
    rows = {}
    if path.is_file():
        earlier = json.loads(path.read_text(encoding="utf-8"))
        if all(earlier.get(k) == v for k, v in settings.items()):
            rows = earlier["rows"]
    for kind, row in rows.items():  # the current model's predictions for earlier rows
        predicted = plan.row(kind).peak_bytes
        row.update(predicted_bytes=predicted, predicted_terms=plan.row(kind).terms,
                   measured_over_predicted=row["measured_bytes"] / predicted)
    for kind in args.representations:
        out = subprocess.run([sys.executable, __file__, "--worker", kind, "--model", args.model,
                              "--n", str(args.n), "--threads", str(args.threads)], check=True,
                             capture_output=True, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
        measured = json.loads(out.stdout.strip().splitlines()[-1])
        predicted = plan.row(kind).peak_bytes
        rows[kind] = {"measured_bytes": measured["extra_bytes"], "predicted_bytes": predicted,
                      "measured_over_predicted": measured["extra_bytes"] / predicted,
                      "loaded_bytes": measured["loaded_bytes"], "seconds": measured["seconds"],
                      "predicted_terms": plan.row(kind).terms}
        print(f"{kind:<13} measured {measured['extra_bytes'] / 2**20:8.1f} MiB, predicted "
              f"{predicted / 2**20:8.1f} MiB: ratio {rows[kind]['measured_over_predicted']:.2f}"
              f" ({measured['seconds']:.1f} s)", flush=True)
        atomic_write_json(path, {**settings, "machine": platform.processor() or
                                 platform.machine(), "rows": rows})
    if not args.representations:
        for kind, row in rows.items():
            print(f"{kind:<13} measured {row['measured_bytes'] / 2**20:8.1f} MiB, predicted "
                  f"{row['predicted_bytes'] / 2**20:8.1f} MiB: ratio "
                  f"{row['measured_over_predicted']:.2f}")
        atomic_write_json(path, {**settings, "machine": platform.processor() or
                                 platform.machine(), "rows": rows})


if __name__ == "__main__":
    main()
