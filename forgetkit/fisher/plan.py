"""How much memory each Fisher representation needs, predicted from a model's config alone.

:func:`memory_plan` builds the model on the meta device (no weights, no memory), selects the
parameters as the estimators do (:func:`~forgetkit.fisher.pergrad.select_parameters`, the
layers :func:`~forgetkit.fisher.kfac.kfac` would factor) and predicts, for each
representation, the peak bytes *above the loaded model* and the passes over the probes. The
terms follow what the implementations allocate (P = selected parameters, N = probes, B =
``fisher_batch_size``, E = ``exact_batch_size``, k = rank, l = k + oversample, s = bytes per
model entry, 4 = float32 accumulation):

- ``diagonal``: one batch of per-example gradients (B·P·s, squared in place; outside float32
  one parameter's float32 copy), the running mean and variance (2·P·4), activations of B
  examples;
- ``gram``: every per-example gradient, N·P·4, held twice while the blocks are concatenated,
  plus one batch of them, the k directions and activations of B examples;
- ``randomized``: the sketch, 14·P·l bytes (Ω in bfloat16, Y and Q in float32, one more P x l
  product; :mod:`forgetkit.fisher.low_rank`), plus one gradient batch, the k directions and
  activations;
- ``exact`` (Lanczos on exact Fisher-vector products): scipy's ``eigsh`` keeps
  ncv = max(2k + 1, 20) float64 Lanczos vectors (ncv·P·8), each product adds its float64
  result, input and flat copies (4·P·8) and the tangents (P·s); activations of E examples
  for the forward-mode product and the backward pass; the k directions at the end;
- ``kfac``: per factored layer the two covariances, their float64 eigendecompositions and the
  (out, in) eigenvalue matrices (2·out·in·4); during the correction pass the rotated inputs of
  every layer (B·T·in·4 each, held until the backward pass reaches the layer) and one layer's
  per-example (B, out, in) products; activations of B examples; the diagonal fallback's
  per-example gradients for the parameters it keeps;
- ``displacement`` (the exact d'Fd of one update): the forward-mode product over E examples
  (primal and tangent activations of one layer at a time: no graph is kept) and the logits of
  the scored positions only (E·A·V: their primal and tangent, float64 copies, the softmax and
  products; A = ``answer_len``). The update itself is the caller's (the tangents are it, not
  a copy, when it is in the model's dtype and device).

Activations of b examples of T tokens with a graph (per decoder layer and token: the two
norms' inputs, q, k, v, the attention output, the MLP's four intermediate vectors, one
attention row per head; the logits three times) are
``b·T·s·(L·(4·h + 2·kv + 4·i + heads·T) + 3·V)`` (on SmolLM2 at b = 8, T = 136 a forward pass
with a graph measured 1676 MiB against 1673 predicted, less one intermediate vector); without a graph one layer is
alive at a time, ``b·T·s·(4·h + 3·i + heads·T)`` at its peak. The model is a budget, not a
measurement: experiments/bench_plan.py compares it with the measured peak.

Example:
    >>> from transformers import LlamaConfig
    >>> plan = memory_plan(LlamaConfig(hidden_size=64, intermediate_size=128,
    ...                                num_hidden_layers=2, num_attention_heads=4,
    ...                                vocab_size=100), n_samples=64)
    >>> plan.row("gram").peak_bytes > plan.row("diagonal").peak_bytes
    True
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from forgetkit.fisher.pergrad import FisherError, select_parameters

__all__ = ["HEADROOM", "PLAN_REPRESENTATIONS", "MemoryPlan", "PlanRow", "available_memory",
           "choose_representation", "llama_config", "memory_plan", "model_config",
           "probe_lengths", "report_peak", "smollm2_config"]

PLAN_REPRESENTATIONS = ("diagonal", "gram", "randomized", "exact", "kfac", "displacement")
F32, F64 = 4, 8
HEADROOM = 1.25
"""``auto`` takes a representation only if its predicted peak times this fits: the model is a
budget, checked within 25% of measured peaks (experiments/bench_plan.py)."""
GRAM_MAX_BYTES = 2**30  # fisher.low_rank's default gram_max_bytes (method="auto")


def llama_config(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int,
                 vocab: int, tied: bool, name: str):
    """A :class:`transformers.LlamaConfig` of these sizes (no weights anywhere)."""
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, vocab_size=vocab,
                         tie_word_embeddings=tied)
    config._name_or_path = name
    return config


def smollm2_config():
    """SmolLM2-135M's sizes (hidden 576, intermediate 1536, 30 layers, 9 heads, 3 kv heads,
    vocabulary 49152, tied embeddings)."""
    return llama_config(576, 1536, 30, 9, 3, 49152, True, "smollm2-135m")


REFERENCE_CONFIGS = {
    "smollm2-135m": smollm2_config,
    "llama-3.2-1b": lambda: llama_config(2048, 8192, 16, 32, 8, 128256, True, "llama-3.2-1b"),
    "llama-3-8b": lambda: llama_config(4096, 14336, 32, 32, 8, 128256, False, "llama-3-8b"),
}
"""Configs (sizes only) of models the README's plan table covers."""


def model_config(name_or_path: str | os.PathLike):
    """The transformers config of a model name or folder, without reading any weights.

    ``"toyworld"``: the packaged config; ``"smollm2-135m"``, ``"llama-3.2-1b"``,
    ``"llama-3-8b"``: their sizes (:data:`REFERENCE_CONFIGS`); a folder with ``config.json``
    (weights need not be there); a hub id whose config is in the local cache.

    Raises:
        FisherError: nothing with a config under that name.
    """
    from transformers import AutoConfig

    name = str(name_or_path)
    if name == "toyworld":
        from forgetkit.models.toyworld import ensure_toyworld

        config = AutoConfig.from_pretrained(ensure_toyworld())
        config._name_or_path = "toyworld"
        return config
    if name in REFERENCE_CONFIGS:
        return REFERENCE_CONFIGS[name]()
    path = Path(name).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return AutoConfig.from_pretrained(path)
    if path.exists():
        raise FisherError(f"--plan needs a model config: {path} is not a folder with config.json "
                          "(a .gguf file or a PEFT adapter folder has none to read)")
    try:
        return AutoConfig.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError) as err:
        raise FisherError(f"--plan: no config for {name!r}: not a built-in name (toyworld, "
                          f"{', '.join(REFERENCE_CONFIGS)}), a folder with config.json, or a hub "
                          "id whose config is in the local cache") from err


def meta_model(config) -> nn.Module:
    """The causal LM of ``config`` on the meta device: shapes and modules, no memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


@dataclass(frozen=True)
class PlanRow:
    """One representation's predicted cost."""

    representation: str
    peak_bytes: int
    passes: int
    terms: dict[str, int] = field(default_factory=dict)
    note: str = ""


@dataclass
class MemoryPlan:
    """:func:`memory_plan`'s prediction, JSON-ready via :meth:`to_dict`."""

    model: str
    parameters: int
    selected: int
    weights_bytes: int
    factored_layers: int
    fallback_parameters: int
    settings: dict[str, Any]
    rows: list[PlanRow]

    def row(self, representation: str) -> PlanRow:
        for row in self.rows:
            if row.representation == representation:
                return row
        raise KeyError(representation)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_text(self) -> str:
        """The table ``python -m forgetkit.fisher --plan`` prints."""
        s = self.settings
        lines = [f"{self.model}: {self.parameters:,} parameters ({_gib(self.weights_bytes)} of "
                 f"weights in {s['dtype']}), {self.selected:,} selected by --params "
                 f"{s['params']!r}; {self.factored_layers} linear layers factored by kfac, "
                 f"{self.fallback_parameters:,} parameters on its diagonal fallback",
                 f"N={s['n_samples']} probes of ~{s['seq_len']} tokens, rank {s['rank']}, "
                 f"batches {s['fisher_batch_size']} (per-example gradients, kfac) and "
                 f"{s['exact_batch_size']} (exact products)",
                 "", f"{'representation':<14} {'peak above the model':>22} {'passes':>7}  note"]
        for row in self.rows:
            lines.append(f"{row.representation:<14} {_gib(row.peak_bytes):>22} "
                         f"{row.passes:>7}  {row.note}")
        return "\n".join(lines)


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def probe_lengths(encodings: Sequence) -> dict[str, int]:
    """``seq_len`` (the longest probe, whose batch sets the activations' peak) and
    ``answer_len`` (scored tokens per probe, on average, rounded up) of encoded probes, the
    lengths :func:`memory_plan` takes."""
    return {"seq_len": max(len(e.input_ids) for e in encodings),
            "answer_len": math.ceil(sum(len(e.completion_ids) for e in encodings)
                                    / len(encodings))}


def _activation_bytes(config, batch: int, seq_len: int, itemsize: int,
                      layers: int | None = None, logits: bool = True) -> int:
    """Activations kept for the backward pass of ``batch`` examples of ``seq_len`` tokens
    (``layers=1``: without a graph, only one layer's are alive at a time; ``logits=False``:
    without the output layer's)."""
    hidden = config.hidden_size
    heads = config.num_attention_heads
    kv = (getattr(config, "num_key_value_heads", None) or heads) * (hidden // heads)
    intermediate = getattr(config, "intermediate_size", None) or 4 * hidden
    if layers is None:  # every layer's activations kept for the backward pass
        per_token = config.num_hidden_layers * (4 * hidden + 2 * kv + 4 * intermediate
                                                + heads * seq_len)
    else:  # no graph: one layer at a time, whose peak is in the MLP (the residual stream, the
        # normed input, gate, up and their product) or the attention rows
        per_token = layers * (4 * hidden + 3 * intermediate + heads * seq_len)
    per_token += 3 * config.vocab_size * logits
    return batch * seq_len * itemsize * per_token


def _hooked_widths(model: nn.Module, chosen: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(sum of input widths, sum of output widths) per token of the modules that hold chosen
    parameters: what the layer hooks of the per-example gradients keep for one batch
    (:mod:`forgetkit.fisher.hookgrad`)."""
    ids = {id(p) for p in chosen.values()}
    inputs = outputs = 0
    for module in model.modules():
        if not any(id(p) in ids for p in module.parameters(recurse=False)):
            continue
        weight = getattr(module, "weight", None)
        if isinstance(module, nn.Embedding):
            inputs, outputs = inputs + 1, outputs + module.embedding_dim
        elif isinstance(module, nn.Linear):
            inputs, outputs = inputs + module.in_features, outputs + module.out_features
        elif weight is not None and weight.dim() == 2:  # GPT-2 Conv1D: weight (in, out)
            inputs, outputs = inputs + weight.shape[0], outputs + weight.shape[1]
        elif weight is not None:  # a norm: as wide as its weight
            inputs, outputs = inputs + weight.numel(), outputs + weight.numel()
    return inputs, outputs  # a tied output layer holds the weight too: counted as a Linear


def _moments_bytes(size: int) -> int:
    """The running mean and squared deviations of ``size`` entries (float32), with the block
    buffers :class:`~forgetkit.fisher.diagonal.RunningMoments` keeps for small models."""
    from forgetkit.fisher.diagonal import BUFFERED_MAX_ELEMENTS

    return (4 if size <= BUFFERED_MAX_ELEMENTS else 2) * size * F32


def _hook_gradient_bytes(model: nn.Module, chosen: dict[str, torch.Tensor], rows: int,
                         seq_len: int, s: int, act: int) -> tuple[int, dict[str, int]]:
    """Peak of per-example gradients from layer hooks for ``rows`` rows: the batch's graph,
    the kept inputs and output gradients, and one parameter's (rows, *shape) gradients
    (squared in place) with its block moments, counted together: the graph's many small
    tensors are freed into the allocator's heap, which stays resident (glibc does not return
    it to the system while larger blocks sit above it) when the per-example gradients are
    formed."""
    inputs, outputs = _hooked_widths(model, chosen)
    kept_inputs, kept_grads = rows * seq_len * inputs * s, rows * seq_len * outputs * s
    largest = max(p.numel() for p in chosen.values())
    # its (rows, *shape) gradients, squared in place, and the block's mean and deviations
    per_parameter = rows * largest * F32 + 2 * largest * F32
    peak = act + kept_inputs + kept_grads + per_parameter
    return peak, {"activations": act, "kept_inputs": kept_inputs,
                  "kept_output_gradients": kept_grads, "one_parameter": per_parameter}


def _layer_shapes(model: nn.Module, chosen: dict[str, torch.Tensor]
                  ) -> tuple[list[tuple[int, int]], list[str]]:
    """(out, in') of each layer kfac factors and the names of the fallback parameters."""
    from forgetkit.fisher.kfac import _plan_layers

    layers, reasons = _plan_layers(model, chosen, 16384)
    return [layer.shape for layer in layers.values()], list(reasons)


def memory_plan(config_or_model, *, params: str | Sequence[str] | None = None,
                n_samples: int = 128, seq_len: int = 64, fisher_batch_size: int = 8,
                exact_batch_size: int = 32, rank: int = 16, dtype: torch.dtype = torch.float32,
                mc_samples: int = 1, oversample: int = 10, power_iterations: int = 2,
                answer_len: int = 8) -> MemoryPlan:
    """Predict each representation's peak memory above the loaded model and its passes.

    Args:
        config_or_model: a transformers config (the model is built on the meta device) or a
            model (only its modules and parameter shapes are read).
        params: the parameter selection, as for :func:`forgetkit.fisher.diagonal`.
        n_samples: N probes.
        seq_len: the (padded) length of a probe batch in tokens; the peak comes from the
            batch of the longest probes, so their length predicts it best.
        fisher_batch_size: examples per per-example-gradient batch (and per kfac pass).
        exact_batch_size: probes per exact Fisher-vector product.
        rank: k top directions.
        dtype: the model's dtype (accumulation is float32).
        mc_samples, oversample, power_iterations: as for :func:`forgetkit.fisher.low_rank`.
        answer_len: scored (answer) tokens per probe, on average: the exact displacement runs
            the output layer on those positions only.

    Returns:
        A :class:`MemoryPlan`, rows in :data:`PLAN_REPRESENTATIONS` order.

    Raises:
        FisherError: a non-positive size, a pattern that selects nothing.
    """
    for name, value in (("n_samples", n_samples), ("seq_len", seq_len), ("rank", rank),
                        ("fisher_batch_size", fisher_batch_size),
                        ("exact_batch_size", exact_batch_size), ("mc_samples", mc_samples),
                        ("answer_len", answer_len)):
        if value < 1:
            raise FisherError(f"{name} must be >= 1, got {value}")
    if isinstance(config_or_model, nn.Module):
        model, config = config_or_model, config_or_model.config
    else:
        config, model = config_or_model, meta_model(config_or_model)
    chosen = select_parameters(model, params)
    size = sum(p.numel() for p in chosen.values())
    total = sum(p.numel() for p in model.parameters())
    s = torch.empty((), dtype=dtype, device="meta").element_size()
    n_rows = n_samples * mc_samples
    batch = min(fisher_batch_size, n_samples)
    grads = batch * mc_samples * size
    act = _activation_bytes(config, batch * mc_samples, seq_len, s)
    act_exact = _activation_bytes(config, min(exact_batch_size, n_samples), seq_len, s)
    exact_rows = min(exact_batch_size, n_samples)
    act_layer = _activation_bytes(config, exact_rows, seq_len, s, 1, logits=False)
    # scored positions' logits and tangents in the model's dtype, then float64 copies of
    # both, the softmax and two products of the same size
    scored_logits = exact_rows * answer_len * config.vocab_size * (2 * s + 5 * F64)
    sketch = min(rank + oversample, size)
    ncv = min(size, max(2 * rank + 1, 20))
    largest = max(p.numel() for p in chosen.values())
    cast = 0 if s == F32 else batch * mc_samples * largest * F32  # one tensor's float32 copy
    shapes, fallback_names = _layer_shapes(model, chosen)
    hooks, hook_terms = _hook_gradient_bytes(model, chosen, batch * mc_samples, seq_len, s, act)
    fallback_chosen = {n: chosen[n] for n in fallback_names}
    fallback_hooks = (_hook_gradient_bytes(model, fallback_chosen, batch * mc_samples, seq_len,
                                           s, act)[0] if fallback_chosen else 0)
    fallback_size = sum(p.numel() for p in fallback_chosen.values())
    rows = [
        PlanRow("diagonal", hooks + _moments_bytes(size) + cast, 1,
                {**hook_terms, "moments": _moments_bytes(size), "cast": cast},
                "per-example gradients of one batch from layer hooks"),
        PlanRow("gram", 2 * n_rows * size * F32 + grads * (s + F32) + rank * size * F32 + act,
                1, {"gradient_matrix": 2 * n_rows * size * F32, "gradients": grads * (s + F32),
                    "directions": rank * size * F32, "activations": act},
                f"the N x P gradient matrix ({_gib(n_rows * size * F32)})"),
        PlanRow("randomized", 14 * size * sketch + grads * (s + F32) + rank * size * F32 + act,
                2 + power_iterations,
                {"sketch": 14 * size * sketch, "gradients": grads * (s + F32),
                 "directions": rank * size * F32, "activations": act},
                f"the P x {sketch} sketch"),
        PlanRow("exact", (ncv + 4) * size * F64 + size * s + rank * size * F64 + 2 * act_exact,
                ncv + rank,
                {"lanczos_vectors": ncv * size * F64, "products": 4 * size * F64 + size * s,
                 "directions": rank * size * F64, "activations": 2 * act_exact},
                f"{ncv} Lanczos vectors; passes are Fisher-vector products (approximate)"),
        _kfac_row(shapes, fallback_size, fallback_hooks, batch * mc_samples, seq_len, act),
        PlanRow("displacement", 2 * act_layer + scored_logits, 1,
                {"activations": 2 * act_layer, "scored_logits": scored_logits},
                "exact d'Fd of one update (one pass per update)"),
    ]
    settings = {"params": params, "n_samples": n_samples, "seq_len": seq_len,
                "fisher_batch_size": fisher_batch_size, "exact_batch_size": exact_batch_size,
                "rank": rank, "dtype": str(dtype).removeprefix("torch."),
                "mc_samples": mc_samples, "oversample": oversample,
                "power_iterations": power_iterations, "answer_len": answer_len}
    return MemoryPlan(model=str(getattr(config, "_name_or_path", "") or config.model_type),
                      parameters=total, selected=size, weights_bytes=total * s,
                      factored_layers=len(shapes), fallback_parameters=fallback_size,
                      settings=settings, rows=rows)


def _kfac_row(shapes: list[tuple[int, int]], fallback: int, fallback_hooks: int, batch: int,
              seq_len: int, act: int) -> PlanRow:
    """kfac: factors and eigenbases (float32 kept, float64 during eigh), the eigenvalue
    matrices, the correction pass's rotated inputs and one layer's per-example products, and
    the diagonal fallback (per-example gradients from layer hooks, its moments)."""
    # covariances and eigenvectors kept for every layer; one layer's float64 eigh at a time
    factors = sum(2 * (o * o + i * i) * F32 for o, i in shapes) + \
        max((3 * max(o, i) ** 2 * F64 for o, i in shapes), default=0)
    eigenvalues = sum(2 * o * i * F32 for o, i in shapes)
    rotated = sum(batch * seq_len * i * F32 for _, i in shapes)
    per_example = max((2 * batch * o * i * F32 for o, i in shapes), default=0)
    fallback_bytes = fallback_hooks + _moments_bytes(fallback) if fallback else 0
    passes = 2 + (fallback > 0)
    terms = {"factors": factors, "eigenvalues": eigenvalues, "rotated_inputs": rotated,
             "per_example_products": per_example, "fallback": fallback_bytes,
             "activations": act}
    note = f"{len(shapes)} layers factored; {fallback:,} parameters on the diagonal fallback"
    peak = factors + eigenvalues + max(rotated + per_example + act, fallback_bytes)
    return PlanRow("kfac", int(peak), passes, terms, note)


def available_memory(device: str | torch.device) -> int:
    """Bytes free for new tensors on ``device``: CUDA's free memory, or the host's available
    memory (``psutil``) for the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    import psutil

    return int(psutil.virtual_memory().available)


def _row_of(plan: MemoryPlan, representation: str, low_rank_method: str) -> PlanRow:
    """The plan row a report representation (``low_rank`` with its method) costs."""
    if representation != "low_rank":
        return plan.row(representation)
    if low_rank_method == "auto":
        s = plan.settings
        gram = s["n_samples"] * s["mc_samples"] * plan.selected * (
            plan.weights_bytes // plan.parameters)  # G in the model's dtype
        low_rank_method = "gram" if gram <= GRAM_MAX_BYTES else "randomized"
    return plan.row(low_rank_method)


def _stored_bytes(plan: MemoryPlan, representation: str, low_rank_method: str) -> int:
    """What a finished representation keeps while the report computes the next one."""
    if representation == "diagonal":
        return 2 * plan.selected * F32  # values and their standard errors
    terms = _row_of(plan, representation, low_rank_method).terms
    if representation == "kfac":
        return terms["factors"] + terms["eigenvalues"] + 2 * plan.fallback_parameters * F32
    return terms["directions"]


def report_peak(plan: MemoryPlan, representation: str, low_rank_method: str = "exact",
                held: int = 0) -> int:
    """The report's peak above the base model with ``representation``: ``held`` (the
    fine-tunes and their updates), then the representation, then the diagonal next to it, then
    the exact displacement next to both."""
    peak = _row_of(plan, representation, low_rank_method).peak_bytes
    stored = _stored_bytes(plan, representation, low_rank_method)
    diagonal_peak = plan.row("diagonal").peak_bytes
    displacement = plan.row("displacement").peak_bytes
    if representation == "diagonal":
        return held + max(peak, stored + displacement)
    return held + max(peak, stored + diagonal_peak,
                      stored + _stored_bytes(plan, "diagonal", low_rank_method) + displacement)


def choose_representation(plan: MemoryPlan, available: int, requested: str,
                          low_rank_method: str = "exact", *, kfac_possible: bool = True,
                          held: int = 0) -> tuple[str, dict[str, Any]]:
    """The report's Fisher representation for ``available`` bytes, and why.

    Each candidate is costed as the whole report holds it (:func:`report_peak`: ``held``
    bytes of fine-tunes and updates, the representation, the diagonal and the exact
    displacement computed beside it). ``requested`` ``"auto"``: the most accurate of low_rank
    (its ``low_rank_method``), kfac, diagonal whose predicted peak times :data:`HEADROOM`
    fits. A named representation is kept unless its predicted peak alone exceeds
    ``available``.

    Returns:
        (representation, a JSON-ready record: available bytes, each candidate's predicted
        peak, the chosen one).

    Raises:
        FisherError: nothing fits, naming the predicted peaks and the memory available.
    """
    order = [r for r in ("low_rank", "kfac", "diagonal") if r != "kfac" or kfac_possible]
    peaks = {r: report_peak(plan, r, low_rank_method, held) for r in order}
    record = {"requested": requested, "available_bytes": available, "held_bytes": held,
              "predicted_peak_bytes": peaks, "headroom": HEADROOM}
    have = f"{_gib(available)} available"
    if requested == "auto":
        fitting = [r for r in order if peaks[r] * HEADROOM <= available]
        if not fitting:
            raise FisherError("no Fisher representation fits: predicted peaks "
                              + ", ".join(f"{r} {_gib(b)}" for r, b in peaks.items())
                              + f" (x{HEADROOM} headroom); the device has {have}")
        return fitting[0], {**record, "chosen": fitting[0]}
    if peaks.get(requested, 0) > available:
        cheaper = [r for r in order if peaks[r] * HEADROOM <= available]
        raise FisherError(f"--representation {requested} needs about {_gib(peaks[requested])} "
                          f"above the model with the report's fine-tunes and its other "
                          f"Fisher computations (memory plan, --plan); the device has {have}: "
                          + (f"use --representation {cheaper[0]} or auto" if cheaper else
                             "use --params, smaller batches or a larger device"))
    return requested, {**record, "chosen": requested}
