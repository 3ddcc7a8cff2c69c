"""Every Fisher representation on one device and dtype, side by side: time and peak memory.

For a model and N probes it runs, in one process: a ``no_grad`` forward pass over the probes
(the unit of cost), the diagonal Fisher, the low-rank Fisher by each method (``gram``,
``randomized``, ``exact``), the Kronecker-factored (EK-FAC) Fisher and the exact displacement
``d' F d`` of a random update, each over ``--params`` (default every weight). Each part is
timed once after a warm-up on two probes; on CUDA its peak memory is
``torch.cuda.max_memory_allocated`` above the loaded model (on CPU, none: see
bench_displacement.py for CPU peak memory). A part that fails (e.g. out of memory) is recorded
with its error and the others still run.

This is the GPU benchmark (``experiments/gpu_bench.sh`` runs it for float32 and bfloat16 on
SmolLM2-135M); it runs on CPU as well, which is how it is tested.

Usage:
    python experiments/bench_device.py --model smollm2-135m --device cuda --dtype bfloat16 --n 128
    python experiments/bench_device.py --model toyworld --device cpu --n 8 --parts forward,exact
Results: a JSON file (``--out``, default experiments/results/bench_device_<model>_<device>_<dtype>.json).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
import traceback
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from forgetkit import fisher
from forgetkit.data.records import load_probes
from forgetkit.files import atomic_write_json
from forgetkit.fisher.report import spread_sample
from forgetkit.models import collate, encode, load_model

RESULTS = Path(__file__).parent / "results"
PARTS = ("forward", "diagonal", "gram", "randomized", "exact_low_rank", "kfac", "exact")


def _forward(model, tokenizer, probes, batch_size: int) -> None:
    encodings = sorted((encode(tokenizer, p.prompt, p.answer) for p in probes),
                       key=lambda e: -len(e.input_ids))
    device = next(model.parameters()).device
    with torch.no_grad():
        for start in range(0, len(encodings), batch_size):
            batch = collate(encodings[start : start + batch_size], tokenizer.pad_token_id,
                            device=device)
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  position_ids=batch["position_ids"], use_cache=False)


def parts(model, tokenizer, update, args) -> dict[str, Callable[[list], object]]:
    """Each part as a function of the probes."""
    common = {"params": args.params, "batch_size": args.batch_size}
    return {
        "forward": lambda probes: _forward(model, tokenizer, probes, args.batch_size),
        "diagonal": lambda probes: fisher.diagonal(model, tokenizer, probes, **common),
        "gram": lambda probes: fisher.low_rank(model, tokenizer, probes, method="gram",
                                               rank=min(args.rank, len(probes)), **common),
        "randomized": lambda probes: fisher.low_rank(
            model, tokenizer, probes, method="randomized", rank=min(args.rank, len(probes)),
            **common),
        "exact_low_rank": lambda probes: fisher.low_rank(
            model, tokenizer, probes, method="exact", rank=min(args.rank, len(probes)),
            **common),
        "kfac": lambda probes: fisher.kfac(model, tokenizer, probes, **common),
        "exact": lambda probes: fisher.displacement(model, tokenizer, probes, update,
                                                    **common),
    }


def measure(function: Callable[[list], object], probes: list, device: torch.device
            ) -> dict[str, object]:
    """Seconds and (CUDA) peak bytes above the loaded model of one call after a warm-up."""
    try:
        function(probes[:2])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        start = time.perf_counter()
        function(probes)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated(device) - before if device.type == "cuda" \
            else None
        return {"seconds": seconds, "peak_bytes": peak}
    except (RuntimeError, ValueError, torch.OutOfMemoryError) as err:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}",
                "where": traceback.format_exc().splitlines()[-3:]}


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--n", type=int, default=128, help="probes")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--params", default=None, help="regex on parameter names (default all)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated of {PARTS}")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    chosen = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in chosen if p not in PARTS]
    if unknown:
        parser.error(f"--parts: unknown {unknown}; choose from {PARTS}")
    if args.n < 2 or args.batch_size < 1 or args.rank < 1:
        parser.error("--n must be >= 2, --batch-size and --rank >= 1")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this torch build sees no CUDA device")
    out = args.out or RESULTS / f"bench_device_{args.model}_{device.type}_{args.dtype}.json"
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    probes = spread_sample(load_probes("toyworld" if args.model == "toyworld" else "general"),
                           args.n)
    generator = torch.Generator().manual_seed(0)
    update = {name: (torch.randn(p.shape, generator=generator) * 1e-3).to(p.device, p.dtype)
              for name, p in model.named_parameters()}
    functions = parts(model, tokenizer, update, args)
    results = {}
    for name in chosen:
        results[name] = measure(functions[name], probes, device)
        shown = (f"{results[name]['seconds']:.2f} s" if "seconds" in results[name]
                 else results[name]["error"])
        print(f"{name:>15}: {shown}", flush=True)
    forward = results.get("forward", {}).get("seconds")
    for value in results.values():
        if forward and "seconds" in value:
            value["forward_passes"] = value["seconds"] / forward
    summary = {"model": args.model, "device": str(device), "dtype": args.dtype,
               "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
               else platform.processor() or platform.machine(),
               "torch": torch.__version__, "threads": torch.get_num_threads(),
               "parameters": sum(p.numel() for p in model.parameters()),
               "probes": len(probes), "rank": args.rank, "batch_size": args.batch_size,
               "params": args.params, "parts": results}
    atomic_write_json(out, summary)
    print(f"written to {out}")
    return summary


if __name__ == "__main__":
    main()
