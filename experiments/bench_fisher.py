"""Benchmark the Fisher estimators: throughput, agreement with other tools, memory.

Three parts, each printing ratios (this is a measurement script, not a timed test). Every
timing is one run after one untimed warm-up (``--repeats`` for a best of several), at one
torch thread unless ``--threads`` says otherwise.

1. toyworld, N records, batches of 32: ``fisher.diagonal`` (empirical, ``per_example="auto"``:
   layer hooks; toyworld and GPT-2 are verified architectures, which skip the first-batch check
   against the loop, and any other model pays it on its first call only, the pass being
   remembered for the unchanged model; the first call on a fresh copy of the model against
   ``"hooks"`` measures what is left of it)
   against the same quantity from a naive per-example ``.backward()`` loop, a plain
   ``torch.func`` ``vmap(grad)`` loop, and BackPACK configured to cover the model
   (:func:`backpack_ready`: per-example gradients with ``BatchGrad``, the untied copies of the
   tied embedding summed before squaring; RMSNorm weights are not covered). Each peer: its
   time, forgetkit's time over it, the covered fraction of parameters and the max relative
   difference on them.
2. a tiny GPT-2 (hidden 16, 2 layers, vocab 60), N single-token completions (so "per token"
   and "per sequence" gradients coincide and every tool computes the same quantity): the same
   peers (BackPACK with Conv1D as nn.Linear, explicit position ids, untied head; LayerNorm not
   covered), plus curvlinops (EFLinearOperator; it has no exact diagonal, so unit-vector
   products on a sample of coordinates, time extrapolated to all P) and nngeometry (FIM with
   PMatDiag), where they are installed and run; failures are recorded.
3. SmolLM2-135M, MLP weights only, N records: low-rank (rank 16, randomized, oversample 10)
   against the diagonal, each in a fresh subprocess for peak RSS (ru_maxrss) and time
   (goal: fits in 24 GB, within 3x of the diagonal). Per-example gradient cost is linear in
   N and the randomized method's memory does not depend on N, so a smaller N extrapolates.

Usage:
    python experiments/bench_fisher.py --smollm2-n 128      # all parts, N = 64 / 64 / 128
    python experiments/bench_fisher.py --parts toyworld,libraries   # the peers only
    python experiments/bench_fisher.py --parts smollm2 --smollm2-n 16   # a quicker run
Results go to experiments/results/bench_fisher.json; parts not run keep their last results.
BackPACK (``pip install backpack-for-pytorch``) is a peer for this script only, not a
forgetkit dependency.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch.func import functional_call, grad, vmap

from forgetkit import fisher
from forgetkit.cli_config import command_line
from forgetkit.data.records import load_records
from forgetkit.diagnostics.loglik import completion_logprobs, sequence_loglik
from forgetkit.files import atomic_write_json
from forgetkit.models import Encoding, collate, encode, load_model

RESULTS = Path(__file__).parent / "results" / "bench_fisher.json"


def best_time(fn, repeats: int):
    """(best wall time in seconds, last result) of ``repeats`` calls after one untimed warm-up
    call; the CPU time of the best call goes to ``CPU_SECONDS`` (the machine is shared, so wall
    time is noisy)."""
    best, result = float("inf"), fn()
    for _ in range(repeats):
        start, cpu = time.perf_counter(), time.process_time()
        result = fn()
        if time.perf_counter() - start < best:
            best, CPU_SECONDS[fn] = time.perf_counter() - start, time.process_time() - cpu
    return best, result


CPU_SECONDS: dict = {}


def naive_diagonal(model, encodings, pad_token_id, names=None):
    """The loop a user would write: one ``.backward()`` per example, square, average."""
    params = {n: p for n, p in model.named_parameters() if names is None or n in names}
    sums = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    for enc in encodings:
        model.zero_grad(set_to_none=True)
        sequence_loglik(model, collate([enc], pad_token_id))[0].backward()
        for n, p in params.items():
            sums[n] += p.grad.float().square()
    model.zero_grad(set_to_none=True)
    return {n: s / len(encodings) for n, s in sums.items()}


def vmap_grad_diagonal(model, encodings, pad_token_id, batch_size: int = 32):
    """The torch.func recipe a user would write: ``functional_call``, ``grad`` of one example's
    sequence log-likelihood, ``vmap`` over the right-padded rows of a batch, square, average.

    Same batches as forgetkit (length-sorted), eager attention (fused SDPA has no batching rule)
    and an all-ones attention mask (transformers' padding check cannot run under vmap; causal
    attention keeps scored positions away from the right padding).
    """
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loglik(p, ids, labels):
        ones = torch.ones((1, ids.shape[0]), dtype=torch.long)
        logits = functional_call(model, p, args=(), kwargs={
            "input_ids": ids[None], "attention_mask": ones, "use_cache": False}).logits
        return completion_logprobs(logits, labels[None])[0].sum()

    per_example = vmap(grad(loglik), in_dims=(None, 0, 0))
    ordered = sorted(encodings, key=lambda e: -len(e.input_ids))
    sums = {n: torch.zeros_like(p) for n, p in params.items()}
    attention = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        for start in range(0, len(ordered), batch_size):
            batch = collate(ordered[start : start + batch_size], pad_token_id)
            for n, g in per_example(params, batch["input_ids"], batch["labels"]).items():
                sums[n] += g.square().sum(0)
    finally:
        model.set_attn_implementation(attention)
    return {n: s / len(encodings) for n, s in sums.items()}


def backpack_ready(model):
    """A copy of an HF causal LM that BackPACK's first-order extensions cover: GPT-2's
    ``Conv1D`` as an equal ``nn.Linear`` (weight transposed), the output layer untied from
    the input embedding (an ``nn.Linear`` holding a copy), ``padding_idx=None`` on the
    embeddings. Returns ``(copy, names)``, names: parameter of ``model`` -> its parameter(s)
    in the copy (two for the tied embedding, whose per-example gradient sums both uses), with
    whether the copy stores it transposed."""
    import copy

    from transformers.pytorch_utils import Conv1D

    ready = copy.deepcopy(model)
    transposed = set()
    for name, module in list(ready.named_modules()):
        if isinstance(module, Conv1D):
            inputs, outputs = module.weight.shape
            linear = torch.nn.Linear(inputs, outputs, dtype=module.weight.dtype)
            with torch.no_grad():
                linear.weight.copy_(module.weight.T)
                linear.bias.copy_(module.bias)
            parent, _, child = name.rpartition(".")
            setattr(ready.get_submodule(parent), child, linear)
            transposed.add(f"{name}.weight")
        elif isinstance(module, torch.nn.Embedding):
            module.padding_idx = None
    embedding = ready.get_input_embeddings()
    head = ready.get_output_embeddings()
    names = {n: [n] for n, _ in model.named_parameters()}
    if head.weight is embedding.weight:
        untied = torch.nn.Linear(head.in_features, head.out_features, bias=False,
                                 dtype=head.weight.dtype)
        with torch.no_grad():
            untied.weight.copy_(head.weight)
        ready.config.tie_word_embeddings = False
        head_name = next(n for n, m in ready.named_modules() if m is head)
        ready.set_output_embeddings(untied)
        embedding_name = next(n for n, p in ready.named_parameters() if p is embedding.weight)
        names[embedding_name].append(f"{head_name}.weight")
    return ready, {n: [(c, c in transposed) for c in copies] for n, copies in names.items()}


def backpack_diagonal(ready, names, batches, loss_of):
    """Empirical diagonal from BackPACK's per-example gradients (``BatchGrad``) on
    :func:`backpack_ready`'s copy, the two uses of a tied embedding summed before squaring,
    over ``batches``; ``loss_of(model, batch)`` is the summed negative log-likelihood."""
    from backpack import backpack
    from backpack.extensions import BatchGrad

    params = dict(ready.named_parameters())
    sums, count = {}, 0
    for batch in batches:
        ready.zero_grad(set_to_none=True)
        with backpack(BatchGrad()):
            loss_of(ready, batch).backward()
        for name, copies in names.items():
            if all(hasattr(params[c], "grad_batch") for c, _ in copies):
                per_example = sum(params[c].grad_batch.transpose(-1, -2) if transposed
                                  else params[c].grad_batch for c, transposed in copies)
                sums[name] = sums.get(name, 0) + per_example.square().sum(0)
        count += len(batch["input_ids"])
    return {n: s / count for n, s in sums.items()}


def _extend_leaves(model):
    """BackPACK-extend the layers it has extensions for (Linear, Embedding)."""
    from backpack import extend

    for module in model.modules():
        if isinstance(module, torch.nn.Linear | torch.nn.Embedding):
            extend(module)
    return model


def max_relative_difference(ours: dict, theirs: dict, names=None) -> float:
    names = list(theirs) if names is None else names
    scale = max(float(ours[n].abs().max()) for n in names)
    return max(float((ours[n].float() - theirs[n].float()).abs().max()) for n in names) / scale


def first_call_time(model, run, repeats: int) -> tuple[float, float]:
    """Best (wall s, CPU s) of ``repeats`` calls ``run(copy)``, each on a fresh copy of
    ``model`` (made untimed): the first call on a model, which pays forgetkit's check of the
    per-example method."""
    import copy

    best = (float("inf"), float("inf"))
    for _ in range(repeats):
        fresh = copy.deepcopy(model)
        start, cpu = time.perf_counter(), time.process_time()
        run(fresh)
        seconds = (time.perf_counter() - start, time.process_time() - cpu)
        best = min(best, seconds)
    return best


def timed(fn, repeats: int) -> tuple[tuple[float, float], object]:
    """``((wall s, CPU s), result)`` of :func:`best_time`."""
    seconds, result = best_time(fn, repeats)
    return (seconds, CPU_SECONDS[fn]), result


def peer_row(ours, ours_s: tuple[float, float], theirs: dict, seconds: tuple[float, float],
             sizes: dict) -> dict:
    """A peer's wall and CPU time, forgetkit's over it, and how much of the model it covers
    and how closely (max relative difference over the covered parameters)."""
    covered = [n for n in sizes if n in theirs]
    return {"seconds": seconds[0], "cpu_seconds": seconds[1],
            "forgetkit_over_peer": ours_s[0] / seconds[0],
            "forgetkit_over_peer_cpu": ours_s[1] / seconds[1],
            "max_relative_difference": max_relative_difference(ours, theirs, covered),
            "covered_fraction": sum(sizes[n] for n in covered) / sum(sizes.values()),
            "not_covered": [n for n in sizes if n not in theirs]}


def sequence_nll(model, batch) -> torch.Tensor:
    """Summed negative sequence log-likelihood of a collated batch (padding masked, explicit
    position ids): the loss BackPACK differentiates."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"], use_cache=False).logits
    return -completion_logprobs(logits, batch["labels"])[0].sum()


def bench_toyworld(n: int, repeats: int, batch_size: int = 32) -> dict:
    model, tokenizer = load_model("toyworld", device="cpu")
    records = load_records("kgfact")[:n]
    encodings = [encode(tokenizer, r.prompt, r.target) for r in records]
    pad = tokenizer.pad_token_id
    sizes = {name: p.numel() for name, p in model.named_parameters()}

    def forgetkit(per_example="auto", estimator="empirical", on=model):
        return fisher.diagonal(on, None, encodings, estimator=estimator,
                               batch_size=batch_size, per_example=per_example)

    ours_s, ours = timed(forgetkit, repeats)
    unchecked_s, _ = timed(lambda: forgetkit("hooks"), repeats)
    first_s = first_call_time(model, lambda fresh: forgetkit(on=fresh), repeats)
    loop_s, _ = best_time(lambda: forgetkit("loop"), 1)
    true_s, _ = best_time(lambda: forgetkit(estimator="true"), 1)
    naive_s, reference = timed(lambda: naive_diagonal(model, encodings, pad), repeats)
    vmap_s, vmap_values = timed(lambda: vmap_grad_diagonal(model, encodings, pad, batch_size),
                                repeats)
    ordered = sorted(encodings, key=lambda e: -len(e.input_ids))
    batches = [collate(ordered[i : i + batch_size], pad) for i in range(0, n, batch_size)]
    row = {"n": n, "batch_size": batch_size, "parameters": sum(sizes.values()),
           "tokens_mean": sum(len(e.input_ids) for e in encodings) / n,
           "forgetkit_s": ours_s[0], "forgetkit_cpu_s": ours_s[1],
           "forgetkit_unchecked_s": unchecked_s[0], "forgetkit_unchecked_cpu_s": unchecked_s[1],
           "forgetkit_first_call_s": first_s[0], "forgetkit_first_call_cpu_s": first_s[1],
           "first_batch_check_fraction": first_s[0] / unchecked_s[0] - 1,
           "first_batch_check_fraction_cpu": first_s[1] / unchecked_s[1] - 1,
           "forgetkit_loop_s": loop_s, "forgetkit_true_fisher_s": true_s,
           "naive_loop": peer_row(ours.values, ours_s, reference, naive_s, sizes),
           "vmap_grad_loop": peer_row(ours.values, ours_s, vmap_values, vmap_s, sizes)}
    row["backpack"] = _backpack(ours.values, ours_s, model, batches, sequence_nll, sizes,
                                repeats)
    _print_peers(f"toyworld N={n}", ours_s, unchecked_s, first_s, row)
    return row


def _backpack(ours, ours_s, model, batches, loss_of, sizes, repeats) -> dict:
    """BackPACK configured to cover the model (:func:`backpack_ready`), per-example gradients."""
    try:
        ready, names = backpack_ready(model)
        _extend_leaves(ready)
        seconds, theirs = timed(lambda: backpack_diagonal(ready, names, batches, loss_of),
                                repeats)
    except Exception as err:  # record why BackPACK does not run on this model
        return {"runs": False, "error": f"{type(err).__name__}: {str(err).splitlines()[0]}"}
    return {"runs": True, "configuration": (
                "Conv1D as nn.Linear (weight transposed), output layer untied (an nn.Linear "
                "copy of the embedding, per-example gradients of both uses summed before "
                "squaring), explicit position ids of the batch shape, Embedding "
                "padding_idx=None; Linear and Embedding layers extended; BatchGrad "
                "(SumGradSquared squares the two uses of the tied embedding apart, and took "
                "63 s on toyworld)"),
            **peer_row(ours, ours_s, theirs, seconds, sizes)}


def _print_peers(title: str, ours_s: tuple[float, float], unchecked_s: tuple[float, float],
                 first_s: tuple[float, float], row: dict) -> None:
    print(f"[{title}] forgetkit {ours_s[0]:.3f}s wall, {ours_s[1]:.3f}s CPU; unchecked "
          f"{unchecked_s[0]:.3f}s wall, {unchecked_s[1]:.3f}s CPU; first call on a model "
          f"{first_s[0]:.3f}s wall, {first_s[1]:.3f}s CPU (check "
          f"{100 * (first_s[0] / unchecked_s[0] - 1):+.1f}% wall, "
          f"{100 * (first_s[1] / unchecked_s[1] - 1):+.1f}% CPU)")
    peers = {"naive loop": row.get("naive_loop"), "vmap(grad) loop": row.get("vmap_grad_loop"),
             "BackPACK": row["backpack"] if row.get("backpack", {}).get("runs") else None}
    for name, peer in peers.items():
        if peer:
            print(f"  {name}: {peer['seconds']:.3f}s wall, {peer['cpu_seconds']:.3f}s CPU; "
                  f"forgetkit/peer {peer['forgetkit_over_peer']:.2f} wall, "
                  f"{peer['forgetkit_over_peer_cpu']:.2f} CPU; max rel diff "
                  f"{peer['max_relative_difference']:.1e}, covers "
                  f"{100 * peer['covered_fraction']:.2f}%")
    if row.get("backpack", {}).get("runs") is False:
        print(f"  BackPACK: {row['backpack']['error']}")


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.random.fork_rng():
        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config(vocab_size=60, n_embd=16, n_layer=2, n_head=2,
                                          n_positions=16, bos_token_id=0,
                                          eos_token_id=0)).eval()


class LastLogits(torch.nn.Module):
    """(B, T) prompt ids -> (B, V) logits of the next token: the classifier view the other
    libraries expect."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(input_ids=x).logits[:, -1, :]


def bench_libraries(n: int, repeats: int) -> dict:
    model = tiny_gpt2()
    ids = torch.randint(1, 60, (n, 7), generator=torch.Generator().manual_seed(0))
    prompts, answers = ids[:, :6], ids[:, 6]
    encodings = [Encoding.from_ids(row[:6].tolist(), row[6:].tolist()) for row in ids]
    sizes = {name: p.numel() for name, p in model.named_parameters()}

    def forgetkit(per_example="auto", on=model):
        return fisher.diagonal(on, None, encodings, estimator="empirical", batch_size=n,
                               per_example=per_example)

    ours_s, ours = timed(forgetkit, repeats)
    unchecked_s, _ = timed(lambda: forgetkit("hooks"), repeats)
    first_s = first_call_time(model, lambda fresh: forgetkit(on=fresh), repeats)
    naive_s, reference = timed(lambda: naive_diagonal(model, encodings, 0), repeats)
    vmap_s, vmap_values = timed(lambda: vmap_grad_diagonal(model, encodings, 0, n), repeats)
    out = {"n": n, "parameters": sum(sizes.values()), "forgetkit_s": ours_s[0],
           "forgetkit_cpu_s": ours_s[1], "forgetkit_unchecked_s": unchecked_s[0],
           "forgetkit_unchecked_cpu_s": unchecked_s[1],
           "forgetkit_first_call_s": first_s[0], "forgetkit_first_call_cpu_s": first_s[1],
           "first_batch_check_fraction": first_s[0] / unchecked_s[0] - 1,
           "first_batch_check_fraction_cpu": first_s[1] / unchecked_s[1] - 1,
           "naive_loop": peer_row(ours.values, ours_s, reference, naive_s, sizes),
           "vmap_grad_loop": peer_row(ours.values, ours_s, vmap_values, vmap_s, sizes)}
    batch = {"input_ids": prompts, "position_ids": torch.arange(6).expand(n, 6),
             "labels": answers}
    out["backpack"] = _backpack(ours.values, ours_s, model, [batch], _last_token_nll, sizes,
                                repeats)
    _print_peers(f"tiny GPT-2 N={n}, P={out['parameters']}", ours_s, unchecked_s, first_s,
                 out)
    for name, bench in (("curvlinops", _curvlinops), ("nngeometry", _nngeometry)):
        try:
            row = bench(model, prompts, answers, ours.values, repeats)
        except Exception as err:  # record why a library does not run on this model
            row = {"runs": False, "error": f"{type(err).__name__}: {str(err).splitlines()[0]}"}
        if row.get("seconds"):
            row["forgetkit_over_peer"] = ours_s[0] / row["seconds"]
        out[name] = row
        print(f"  {name}: {json.dumps(row)}")
    return out


def _last_token_nll(model, batch) -> torch.Tensor:
    """Summed negative log-likelihood of the answers after the prompts (explicit positions)."""
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                   use_cache=False).logits[:, -1]
    return torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum")


def _curvlinops(model, prompts, answers, ours, repeats, columns: int = 64) -> dict:
    from curvlinops import EFLinearOperator

    try:
        EFLinearOperator(LastLogits(model), torch.nn.CrossEntropyLoss(reduction="sum"),
                         list(model.parameters()), [(prompts, answers)],
                         check_deterministic=False) @ torch.eye(sum(
                             p.numel() for p in model.parameters()))[:, :1]
        note = "ran with the model's SDPA attention"
    except NotImplementedError as err:  # forward-mode AD through SDPA on CPU
        note = f"SDPA failed ({str(err).splitlines()[0][:100]}); eager attention copy"
        model = tiny_gpt2()
        model.set_attn_implementation("eager")
    params = list(model.parameters())
    size = sum(p.numel() for p in params)
    operator = EFLinearOperator(LastLogits(model), torch.nn.CrossEntropyLoss(reduction="sum"),
                                params, [(prompts, answers)], check_deterministic=False)
    coordinates = torch.randperm(size, generator=torch.Generator().manual_seed(1))[:columns]
    unit = torch.zeros(size, columns)
    unit[coordinates, torch.arange(columns)] = 1.0
    seconds, product = best_time(lambda: operator @ unit, repeats)
    theirs = product[coordinates, torch.arange(columns)] / len(prompts)
    flat_ours = torch.cat([v.flatten() for v in ours.values()])[coordinates]
    difference = float((theirs - flat_ours).abs().max() / flat_ours.abs().max())
    return {"runs": True, "note": note, "columns": columns,
            "seconds_for_columns": seconds, "seconds": seconds * size / columns,
            "seconds_extrapolated_to_all_parameters": True,
            "max_relative_difference_on_sampled_entries": difference}


def _nngeometry(model, prompts, answers, ours, repeats) -> dict:
    from nngeometry.layercollection import LayerCollection
    from nngeometry.metrics import FIM
    from nngeometry.object import PMatDiag

    wrapped = LastLogits(model)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(prompts, answers), batch_size=len(prompts))
    errors = []
    for ignore in (False, True):
        try:
            layers = LayerCollection.from_model(wrapped, ignore_unsupported_layers=ignore)
            FIM(wrapped, loader, PMatDiag, variant="classif_logits",
                function=lambda x, y: wrapped(x), layer_collection=layers)
            return {"runs": True, "ignore_unsupported_layers": ignore}
        except Exception as err:
            errors.append(f"ignore_unsupported_layers={ignore}: {type(err).__name__}: "
                          f"{str(err).splitlines()[0][:160]}")
    return {"runs": False, "error": " | ".join(errors)}


def smollm2_worker(kind: str, n: int, rank: int, batch_size: int) -> dict:
    model, tokenizer = load_model("smollm2-135m", device="cpu")
    records = load_records("kgfact")[:n]
    start, cpu = time.perf_counter(), time.process_time()
    if kind == "diagonal":
        result = fisher.diagonal(model, tokenizer, records, estimator="empirical",
                                 params=r"mlp\.", batch_size=batch_size)
        extra = {}
    else:
        result = fisher.low_rank(model, tokenizer, records, rank=rank, estimator="empirical",
                                 params=r"mlp\.", batch_size=batch_size)
        extra = {"method": result.method, "sketch": result.sketch,
                 "top_eigenvalues": result.eigenvalues[:4].tolist()}
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    size = sum(s.numel() for s in result.shapes.values())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return {"kind": kind, "n": n, "parameters": size, "seconds": seconds,
            "cpu_seconds": cpu_seconds, "peak_rss_gib": peak / 2**30, **extra}


def bench_smollm2(n: int, rank: int, batch_size: int) -> dict:
    rows = {}
    for kind in ("diagonal", "low_rank"):
        run = subprocess.run(
            [sys.executable, __file__, "--worker", kind, "--smollm2-n", str(n), "--rank",
             str(rank), "--batch-size", str(batch_size), "--threads",
             str(torch.get_num_threads())], capture_output=True, text=True,
            check=False)
        if run.returncode != 0:
            raise RuntimeError(f"smollm2 {kind} worker failed:\n{run.stderr[-2000:]}")
        rows[kind] = json.loads(run.stdout.strip().splitlines()[-1])
    ratio = rows["low_rank"]["seconds"] / rows["diagonal"]["seconds"]
    per_example = {k: r["seconds"] / n for k, r in rows.items()}
    out = {"n": n, "rank": rank, "batch_size": batch_size, **rows,
           "low_rank_over_diagonal_time": ratio,
           "extrapolated_seconds_at_n128": {k: s * 128 for k, s in per_example.items()}}
    print(f"[smollm2 MLP N={n}] diagonal {rows['diagonal']['seconds']:.1f}s "
          f"(peak {rows['diagonal']['peak_rss_gib']:.1f} GiB), low-rank "
          f"{rows['low_rank']['seconds']:.1f}s (peak {rows['low_rank']['peak_rss_gib']:.1f} "
          f"GiB) -> {ratio:.2f}x the diagonal (goal <= 3x, <= 24 GB)")
    return out


@command_line
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--toyworld-n", type=int, default=64)
    parser.add_argument("--libraries-n", type=int, default=64)
    parser.add_argument("--smollm2-n", type=int, default=16)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4, help="SmolLM2 examples per call")
    parser.add_argument("--repeats", type=int, default=1,
                        help="best of this many timings, after one warm-up call")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; on a shared 2-core machine 2 threads ran 3x slower "
                             "than 1 (OpenMP workers spinning against other processes)")
    parser.add_argument("--parts", default="toyworld,libraries,smollm2")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--worker", choices=["diagonal", "low_rank"], help=argparse.SUPPRESS)
    parser.add_argument("--debug", action="store_true", help=(
        "on an error, show the full traceback instead of one line"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(smollm2_worker(args.worker, args.smollm2_n, args.rank,
                                        args.batch_size)))
        return
    results = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
               "torch": torch.__version__, "threads": torch.get_num_threads(),
               "cpus": os.cpu_count(), "machine": platform.platform()}
    parts = {"toyworld": lambda: bench_toyworld(args.toyworld_n, args.repeats),
             "libraries": lambda: bench_libraries(args.libraries_n, args.repeats),
             "smollm2": lambda: bench_smollm2(args.smollm2_n, args.rank, args.batch_size)}
    for part in args.parts.split(","):
        results[part] = parts[part]()
    if args.out.exists():  # parts not run this time keep their last results
        previous = json.loads(args.out.read_text())
        results.update({part: previous[part] for part in parts
                        if part not in results and part in previous})
    atomic_write_json(args.out, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
