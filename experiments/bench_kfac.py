"""forgetkit's EK-FAC beside kronfluence 1.0.1: same model, probes, modules and labels.

On toyworld (the embedded 1M-parameter Llama) and N toyworld probes, both compute the
Kronecker factors of every linear layer but the tied ``lm_head`` (28 layers) for the empirical
Fisher, so the labels are the data's in both:

* forgetkit: ``fisher.kfac(..., estimator="empirical", tokens="all")``: factors over every
  non-padding token, which is kronfluence's language-model setting;
* kronfluence: its ``Task`` (``compute_train_loss`` = summed token cross-entropy over the
  answer labels, ``get_influence_tracked_modules`` = the same 28 layers,
  ``get_attention_mask`` = the attention mask), ``FactorArguments(strategy="ekfac",
  use_empirical_fisher=True)``, ``Analyzer.fit_all_factors``; its default dtypes (float32
  factors, float64 eigendecomposition) and the same batches (length-sorted, right-padded by
  forgetkit's ``collate``).

Agreement: per layer the normwise relative difference ``||x_forgetkit - x_kronfluence|| /
||x_kronfluence||`` of A, G, their eigenvalues and the EK-FAC eigenvalues, the worst layer
printed (goal < 1e-4). kronfluence divides G by the number of tokens, forgetkit by the number
of examples (so that ``A ⊗ G`` approximates F on its own scale); its G is rescaled by
tokens / examples before the comparison. Time: one thread (``torch.set_num_threads(1)``), one
warm-up call of each on 4 probes, then one timed run of each (goal: forgetkit / kronfluence
<= 1). forgetkit's default (``tokens="answer"``) and its full default over every parameter
(embedding and norms on the diagonal fallback) are timed too, for information.

Which tokens: along the gradients of R kgfact training records (the direction SFT's first step
takes for each), EK-FAC's ``d' F d`` with ``tokens="answer"`` and ``tokens="all"`` against the
exact empirical ``(1/N) sum_i (g_i . d)^2`` from per-example gradients on the same probes and
layers, and against the exact layer blocks alone (the cross-layer terms dropped, as K-FAC's
block-diagonal structure does): ratios, median and range over the records (1 is exact).

kronfluence is needed only here: ``pip install torch==2.13.0 kronfluence==1.0.1`` (the torch pin
keeps the CPU build; kronfluence never imports the torchvision it lists, and an unmatched
torchvision breaks transformers' imports, so uninstall it if pip brought one).

Usage:
    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python experiments/bench_kfac.py --n 128
Results go to experiments/results/bench_kfac.json.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F

from forgetkit import fisher
from forgetkit.cli_config import command_line
from forgetkit.data.records import load_probes, load_records
from forgetkit.files import atomic_write_json
from forgetkit.fisher.pergrad import GradientStream, encode_data
from forgetkit.models import collate, encode, load_model

RESULTS = Path(__file__).parent / "results" / "bench_kfac.json"


def linear_layers(model) -> list[str]:
    """Every nn.Linear except the head, which is tied to the embedding."""
    return [name for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and name != "lm_head"]


def run_forgetkit(model, tokenizer, probes, layers, batch_size, tokens="all", params=None):
    params = [f"^{name}.weight$".replace(".", r"\.") for name in layers] if params is None \
        else params
    start = time.perf_counter()
    result = fisher.kfac(model, tokenizer, probes, estimator="empirical", params=params,
                         batch_size=batch_size, tokens=tokens)
    return time.perf_counter() - start, result


def run_kronfluence(model, encodings, layers, batch_size, pad_token_id, output_dir):
    """kronfluence as its documentation sets it up for a language model; returns
    ``(seconds of fit_all_factors, {module: factors})``."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments
    from kronfluence.task import Task
    from kronfluence.utils.constants import (
        ACTIVATION_COVARIANCE_MATRIX_NAME,
        ACTIVATION_EIGENVALUES_NAME,
        GRADIENT_COVARIANCE_MATRIX_NAME,
        GRADIENT_EIGENVALUES_NAME,
        LAMBDA_MATRIX_NAME,
        NUM_ACTIVATION_COVARIANCE_PROCESSED,
        NUM_GRADIENT_COVARIANCE_PROCESSED,
        NUM_LAMBDA_PROCESSED,
    )
    from kronfluence.utils.dataset import DataLoaderKwargs

    class AnswerLikelihoodTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           position_ids=batch["position_ids"], use_cache=False).logits
            logits = logits[:, :-1].flatten(0, 1)
            if sample:  # the true Fisher (not used here)
                with torch.no_grad():
                    labels = torch.multinomial(torch.softmax(logits, -1), 1).flatten()
                labels[batch["labels"][:, 1:].flatten() == -100] = -100
            else:
                labels = batch["labels"][:, 1:].flatten()
            return F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")

        def compute_measurement(self, batch, model):
            return self.compute_train_loss(batch, model)

        def get_influence_tracked_modules(self):
            return layers

        def get_attention_mask(self, batch):
            return batch["attention_mask"]

    task = AnswerLikelihoodTask()
    model = prepare_model(model, task)
    analyzer = Analyzer(analysis_name="bench_kfac", model=model, task=task, cpu=True,
                        disable_tqdm=True, output_dir=str(output_dir))
    analyzer.set_dataloader_kwargs(DataLoaderKwargs(
        collate_fn=lambda items: collate(items, pad_token_id)))
    factor_args = FactorArguments(strategy="ekfac", use_empirical_fisher=True)
    start = time.perf_counter()
    analyzer.fit_all_factors(factors_name="ekfac", dataset=encodings,
                             per_device_batch_size=batch_size, factor_args=factor_args,
                             overwrite_output_dir=True)
    seconds = time.perf_counter() - start
    covariance = analyzer.load_covariance_matrices("ekfac")
    eigen = analyzer.load_eigendecomposition("ekfac")
    lambdas = analyzer.load_lambda_matrices("ekfac")
    out = {}
    for name in layers:
        tokens = float(covariance[NUM_ACTIVATION_COVARIANCE_PROCESSED][name])
        assert float(covariance[NUM_GRADIENT_COVARIANCE_PROCESSED][name]) == tokens
        examples = float(lambdas[NUM_LAMBDA_PROCESSED][name])
        out[name] = {
            "A": covariance[ACTIVATION_COVARIANCE_MATRIX_NAME][name].double() / tokens,
            "G": covariance[GRADIENT_COVARIANCE_MATRIX_NAME][name].double() / examples,
            "activation_eigenvalues": eigen[ACTIVATION_EIGENVALUES_NAME][name].double(),
            "gradient_eigenvalues": eigen[GRADIENT_EIGENVALUES_NAME][name].double()
            * tokens / examples,
            "eigenvalues": lambdas[LAMBDA_MATRIX_NAME][name].double() / examples,
            "tokens": tokens}
    return seconds, out


def agreement(ours: fisher.KroneckerFisher, theirs: dict) -> dict:
    """Worst layer's normwise relative difference for each factor."""
    def relative(a, b):
        return float((a.double() - b).norm() / b.norm())

    rows = {}
    for name, factors in ours.layers.items():
        reference = theirs[name]
        assert factors.tokens == reference["tokens"], (factors.tokens, reference["tokens"])
        rows[name] = {
            "A": relative(factors.activation_covariance, reference["A"]),
            "G": relative(factors.gradient_covariance, reference["G"]),
            "activation_eigenvalues": relative(factors.activation_eigenvalues,
                                               reference["activation_eigenvalues"]),
            "gradient_eigenvalues": relative(factors.gradient_eigenvalues,
                                             reference["gradient_eigenvalues"]),
            "eigenvalues": relative(factors.eigenvalues, reference["eigenvalues"])}
    worst = {key: max(row[key] for row in rows.values()) for key in next(iter(rows.values()))}
    return {"worst": worst, "per_layer": rows}


def gradient_rows(model, tokenizer, items, params) -> torch.Tensor:
    """(N, P) per-example gradients of the empirical log-likelihood, parameters in order."""
    stream = GradientStream(model, encode_data(tokenizer, items), params, estimator="empirical",
                            mc_samples=1, batch_size=16, seed=0,
                            pad_token_id=tokenizer.pad_token_id, per_example="auto")
    rows = {}
    for block in stream:
        flat = torch.cat([block.grads[n].flatten(1) for n in params], 1)
        rows.update(zip(block.examples, flat, strict=True))
    return torch.stack([rows[i] for i in range(len(rows))])


def token_choice(model, tokenizer, probes, layers, records, batch_size) -> dict:
    """EK-FAC's d'Fd with each token choice over the exact empirical one, d = record gradients."""
    names = [f"{name}.weight" for name in layers]
    params = {n: p.detach() for n, p in model.named_parameters() if n in names}
    directions = gradient_rows(model, tokenizer, records, params)  # (R, P)
    probe_rows = gradient_rows(model, tokenizer, probes, params)  # (N, P)
    exact = (probe_rows.double() @ directions.double().T).square().mean(0)  # (R,)
    sizes = [p.numel() for p in params.values()]
    block_diagonal = sum(  # the exact layer blocks alone: what K-FAC's structure can reach
        (g.double() @ d.double().T).square().mean(0)
        for g, d in zip(probe_rows.split(sizes, 1), directions.split(sizes, 1), strict=True))
    out = {"exact_block_diagonal": summary(block_diagonal / exact)}
    for tokens in ("answer", "all"):
        _, result = run_forgetkit(model, tokenizer, probes, layers, batch_size, tokens=tokens)
        values = []
        for d in directions:
            pieces = dict(zip(params, d.split(sizes), strict=True))
            values.append(result.quad_form({n: pieces[n].view(p.shape)
                                            for n, p in params.items()}))
        values = torch.tensor(values, dtype=torch.float64)
        out[f"ekfac_{tokens}"] = summary(values / exact)
        out[f"ekfac_{tokens}_over_block_diagonal"] = summary(values / block_diagonal)
    return out


def summary(ratios: torch.Tensor) -> dict:
    return {"median": float(ratios.median()), "min": float(ratios.min()),
            "max": float(ratios.max())}


@command_line
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=128, help="toyworld probes")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--records", type=int, default=16,
                        help="kgfact records whose gradients are the test directions")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--debug", action="store_true", help=(
        "on an error, show the full traceback instead of one line"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    model, tokenizer = load_model("toyworld", device="cpu")
    probes = load_probes("toyworld")[: args.n]
    encodings = [encode(tokenizer, p.prompt, p.answer) for p in probes]
    encodings = sorted(encodings, key=lambda e: -len(e.input_ids))  # forgetkit's batches
    layers = linear_layers(model)
    pad = tokenizer.pad_token_id
    with tempfile.TemporaryDirectory() as tmp:
        run_forgetkit(model, tokenizer, probes[:4], layers, args.batch_size)  # warm-up
        run_kronfluence(copy.deepcopy(model), encodings[:4], layers, args.batch_size, pad,
                        Path(tmp) / "warmup")
        ours_s, ours = run_forgetkit(model, tokenizer, probes, layers, args.batch_size)
        theirs_s, theirs = run_kronfluence(copy.deepcopy(model), encodings, layers,
                                           args.batch_size, pad, Path(tmp) / "run")
    answer_s, _ = run_forgetkit(model, tokenizer, probes, layers, args.batch_size,
                                tokens="answer")
    everything_s, full = run_forgetkit(model, tokenizer, probes, layers, args.batch_size,
                                       tokens="answer", params=[".*"])
    compared = agreement(ours, theirs)
    choice = token_choice(model, tokenizer, probes, layers, load_records("kgfact")[: args.records],
                          args.batch_size)
    row = {"n": args.n, "batch_size": args.batch_size, "layers": len(layers),
           "threads": torch.get_num_threads(), "torch": torch.__version__,
           "machine": platform.processor() or platform.machine(),
           "forgetkit_s": ours_s, "kronfluence_s": theirs_s, "time_ratio": ours_s / theirs_s,
           "forgetkit_answer_tokens_s": answer_s,
           "forgetkit_all_parameters_s": everything_s,
           "fallback_parameters": sorted(full.fallback_reasons),
           "quad_form_over_exact": choice,
           "agreement_worst_layer": compared["worst"],
           "agreement_per_layer": compared["per_layer"]}
    print(f"[toyworld, {args.n} probes, {len(layers)} layers, 1 thread] forgetkit "
          f"{ours_s:.2f}s, kronfluence {theirs_s:.2f}s -> ratio {row['time_ratio']:.2f} "
          "(goal <= 1)")
    print("  worst layer's relative difference (goal < 1e-4): " + ", ".join(
        f"{key} {value:.1e}" for key, value in compared["worst"].items()))
    print(f"  forgetkit with answer tokens {answer_s:.2f}s; over every parameter (embedding "
          f"and norms on the diagonal) {everything_s:.2f}s")
    print(f"  d'Fd over the exact value along {args.records} record gradients (median, range):")
    for key, row_ in choice.items():
        print(f"    {key}: {row_['median']:.3f} ({row_['min']:.3f} to {row_['max']:.3f})")
    atomic_write_json(args.out, row)
    return row


if __name__ == "__main__":
    main()
