"""Kronecker-factored Fisher per linear layer (K-FAC, and EK-FAC with the eigenvalue correction).

A linear layer ``y_t = W a_t (+ b)`` (``nn.Linear``, or transformers' GPT-2 ``Conv1D``, whose
weight is stored (in, out)) runs at every position ``t`` of an example. The gradient of the
example's sequence log-likelihood (:func:`forgetkit.diagnostics.loglik.sequence_loglik`) w.r.t. its (out, in)
matrix is ``G_i = sum_t g_t a_t'``, with ``g_t = d loglik / d y_t``, and the layer's block of the
Fisher is ``F = E_i[vec(G_i) vec(G_i)']`` (row-major vec of the (out, in) matrix; examples
``i`` counted with their label draws as in :mod:`forgetkit.fisher.pergrad`).

**K-FAC, "expand" variant** (Eschenhagen et al. 2023). The layer's weights are shared over the
positions of a sequence and the log-likelihood is a sum of per-token terms, each with its own
output, so each position is treated as an example of its own: with cross-position terms
dropped and activations independent of output gradients, ``F ≈ A ⊗ G`` (in the vec above:
``F[(o, j), (o', j')] ≈ G[o, o'] A[j, j']``) where

    A = (1/T) sum_{i, t} a_t a_t'     (in, in): input second moment per token, over T tokens
    G = (1/N) sum_{i, t} g_t g_t'     (out, out): per-example sum over tokens, mean over examples

"Reduce" would first sum ``a_t`` and ``g_t`` over positions, which is right when a sequence has
one output (a classifier on pooled tokens); an LM's per-token log-likelihood is the expand
setting, and expand is what kronfluence implements for language models. Tokens counted in
``A`` and ``G`` (``tokens``): ``"answer"`` (default): the positions whose logits are scored,
``t`` with ``labels[t + 1] != -100`` (the shift of :mod:`forgetkit.diagnostics.loglik`), never padding;
``"all"``: every non-padding position (kronfluence's language-model setting, whose
``get_attention_mask`` returns the attention mask). Below the last layer, prompt positions also
carry output gradient (attention moves it back to them); ``"answer"`` leaves them out of the
factors, ``"all"`` keeps them and also counts the final token, whose output no scored token
sees.

**Eigenbasis and EK-FAC.** ``A = Q_A diag(λ_A) Q_A'``, ``G = Q_G diag(λ_G) Q_G'``; the Kronecker
eigenbasis of the layer is ``Q_G ⊗ Q_A``. K-FAC's eigenvalues are ``λ_G[p] λ_A[q]``. The
eigenvalue correction (George et al. 2018) replaces them with the exact diagonal of the Fisher
in that basis, ``Λ[p, q] = E_i[(Q_G' G_i Q_A)[p, q]^2]``, from the exact per-example gradients
``G_i`` (summed over every position, prompt included): ``d' F d = sum Λ ∘ (Q_G' dW Q_A)^2``.

**Bias.** A selected bias joins its weight as an extra input column: ``a_t`` is augmented with a
1, so the layer's (out, in + 1) matrix ``[W, b]`` is factored jointly (as kronfluence does).

**Fallback.** A selected parameter that is not the weight (or bias) of a linear layer —
embeddings, norms, a weight tied to another module (GPT-2's and toyworld's ``lm_head``: its
gradient sums two uses), a layer wider than ``max_factor_dim`` (a 49k-vocabulary head) — is
covered by forgetkit's :func:`~forgetkit.fisher.diagonal` on the same data and labels;
:attr:`KroneckerFisher.fallback_reasons` records which parameters and why. Layers are
independent blocks: the Fisher between two layers, or between a layer and the diagonal part,
is taken as zero.

True-Fisher labels are drawn exactly as :class:`~forgetkit.fisher.pergrad.GradientStream` does
(one generator per example seeded by ``(seed, index)``, :func:`sample_labels`), so K-FAC, the
diagonal and the low-rank Fisher of one seed see the same labels.

**Several processes** (``torchrun``, ``accelerate launch``: torch.distributed initialized before
the call). Every rank passes the same data and holds the whole model (plain, or wrapped in
``DistributedDataParallel``, which is unwrapped) or its FSDP2 shard (below). Each rank runs
its shard of the examples (:func:`~forgetkit.fisher.pergrad.shard_indices`, as every
estimator does); the
sums ``sum a a'`` and ``sum g g'``, the token count and, in the second pass, the sums of
``(Q_G' G_i Q_A)^2`` are all-reduced before they are used, so every rank decomposes the same
matrices, holds the same result, and the result equals one process's (up to the order of
floating-point sums; labels are drawn per example, whatever the shard). The diagonal fallback
shards and all-reduces itself. Save from one rank.

**FSDP.** A model sharded by FSDP2 ``fully_shard`` over a 1-D mesh
(:func:`~forgetkit.fisher.pergrad.fsdp_sharded`) is factored as is: FSDP gathers each layer's
weights for its forward and backward, so the hooks see the full inputs and output gradients
of the rank's own examples, and the factors need only the layers' shapes (a DTensor's
``.shape`` is the full one). As FSDP's gathers are collective, a rank with a smaller shard runs
idle batches until every rank has run as many. The diagonal fallback needs whole parameters
and is refused: select linear layers only. The provenance's ``weights_hash`` gathers each
parameter, so it is the unsharded model's. FSDP1 (``FullyShardedDataParallel``), HSDP and
tensor parallelism are refused.

Example:
    >>> F = kfac(model, tokenizer, probes, estimator="empirical")  # doctest: +SKIP
    >>> F.quad_form(fisher.delta(base, finetuned)), F.top(16).eigenvalues  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from forgetkit.data.records import Probe, Record
from forgetkit.diagnostics.loglik import completion_logprobs, forward_logits
from forgetkit.fisher.diagonal import diagonal
from forgetkit.fisher.hookgrad import linear_types
from forgetkit.fisher.io import prepare_inputs
from forgetkit.fisher.kronecker import KroneckerFactors, KroneckerFisher
from forgetkit.fisher.pergrad import (
    Estimator,
    FisherError,
    all_reduce_sum,
    check_sampling,
    distributed_shard,
    evaluation_mode,
    fsdp_sharded,
    sample_labels,
    select_parameters,
    shard_indices,
    true_fisher_generators,
)
from forgetkit.models import IGNORE_INDEX, Encoding, collate

__all__ = ["kfac", "linear_layers"]

logger = logging.getLogger(__name__)
Tokens = Literal["answer", "all"]
TOKENS: tuple[str, ...] = ("answer", "all")


@dataclass(frozen=True)
class _Layer:
    """A linear layer to factor: its module and the names of its covered parameters."""

    module: nn.Module
    weight: str
    bias: str | None
    transposed: bool

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in'): the layer's matrix, in' = in + 1 with a covered bias."""
        weight = self.module.weight.shape
        out, inputs = weight[::-1] if self.transposed else weight
        return out, inputs + (self.bias is not None)


def _plan_layers(model: nn.Module, chosen: dict[str, Tensor], max_factor_dim: int
                 ) -> tuple[dict[str, _Layer], dict[str, str]]:
    """Split the chosen parameters into factored layers and the diagonal fallback (with the
    reason for each parameter there)."""
    canonical = {id(p): name for name, p in model.named_parameters()}
    users: dict[int, list[str]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for p in module.parameters(recurse=False):
            users.setdefault(id(p), []).append(module_name)
    layers: dict[str, _Layer] = {}
    reasons: dict[str, str] = {}
    for module_name, module in model.named_modules():
        if not isinstance(module, linear_types()):
            continue
        weight = canonical.get(id(module.weight))
        if weight not in chosen:
            continue
        bias = canonical.get(id(module.bias)) if module.bias is not None else None
        bias = bias if bias in chosen else None
        transposed = not isinstance(module, nn.Linear)
        out, inputs = module.weight.shape[::-1] if transposed else module.weight.shape
        if len(users[id(module.weight)]) > 1:
            why = (f"shared by {' and '.join(users[id(module.weight)])} (tied weights): its "
                   "gradient sums every use, which one Kronecker factor pair cannot represent")
        elif max(out, inputs + (bias is not None)) > max_factor_dim:
            why = (f"a {inputs} -> {out} layer: a factor would be wider than "
                   f"max_factor_dim={max_factor_dim}")
        else:
            layers[module_name] = _Layer(module, weight, bias, transposed)
            continue
        reasons.update({name: why for name in (weight, bias) if name is not None})
    covered = {name for layer in layers.values() for name in (layer.weight, layer.bias)}
    for name, p in chosen.items():
        if name in covered or name in reasons:
            continue
        owner = model.get_submodule(users[id(p)][0])
        if isinstance(owner, linear_types()):
            reasons[name] = "the bias of a linear layer whose weight is not selected"
        else:
            reasons[name] = f"{type(owner).__name__} is not a linear layer"
    return layers, reasons


def linear_layers(model: nn.Module, params: str | Sequence[str] | None = None,
                  max_factor_dim: int = 16384) -> list[str]:
    """The modules :func:`kfac` would factor for ``params`` (the rest go to the diagonal
    fallback); works on a model on the meta device.

    Raises:
        FisherError: a pattern that selects no parameter.
    """
    return list(_plan_layers(model, select_parameters(model, params), max_factor_dim)[0])


class _Passes:
    """Forward and backward passes over this rank's shard of the data with hooks on the
    factored layers.

    Each batch runs one forward pass with gradients recorded and one backward pass per label
    draw. The backward pass asks only for the gradient of a zero scalar added to every layer's
    output (``y + 0``, exact), so autograd computes the output gradients ``g_t`` and no weight
    gradient. ``on_input(name, a, counted)`` sees each layer's input (E, T, in) and
    ``on_gradient(name, g, counted)`` each output gradient (E, T, out), with ``counted`` (E, T)
    the tokens that enter the factors.

    With ``lockstep`` (a model sharded by FSDP, whose forward and backward passes gather
    weights from every rank) a rank with fewer batches than the largest shard runs idle
    batches (its first example again, seen by no callback) until every rank has run as many.
    """

    def __init__(self, model: nn.Module, encodings: list[Encoding], layers: dict[str, _Layer],
                 *, estimator: Estimator, draws: int, batch_size: int, seed: int,
                 pad_token_id: int, tokens: Tokens, lockstep: bool = False):
        self.model, self.encodings, self.layers = model, encodings, layers
        self.estimator, self.draws, self.batch_size, self.seed = estimator, draws, batch_size, seed
        self.pad_token_id, self.tokens, self.lockstep = pad_token_id, tokens, lockstep
        self.order = shard_indices(encodings)
        self.device = next(model.parameters()).device

    def run(self, on_input: Callable[[str, Tensor, Tensor], None],
            on_gradient: Callable[[str, Tensor, Tensor], None]) -> int:
        """One pass over this rank's examples; returns the number of counted tokens."""
        state: dict[str, Any] = {}
        count = 0

        def forward_hook(name: str):
            def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
                inputs, counted = args[0], state["counted"]
                if tuple(inputs.shape[:-1]) != tuple(counted.shape):
                    raise FisherError(f"layer {name!r} sees inputs of shape "
                                      f"{tuple(inputs.shape)}; K-FAC needs (batch, tokens, "
                                      "features) inputs (exclude it with params=)")
                if name in state["seen"]:
                    raise FisherError(f"layer {name!r} runs twice in one forward pass (shared "
                                      "weights); exclude it with params=")
                state["seen"].add(name)
                output = output + state["zero"]
                if not state["idle"]:
                    on_input(name, inputs.detach(), counted)
                    output.register_hook(lambda g: on_gradient(name, g.detach(), counted))
                return output
            return hook

        handles = [layer.module.register_forward_hook(forward_hook(name))
                   for name, layer in self.layers.items()]
        try:
            for examples, batch, idle in self._batches():
                counted = (batch["attention_mask"].bool() if self.tokens == "all" else
                           torch.nn.functional.pad(batch["labels"][:, 1:] != IGNORE_INDEX, (0, 1)))
                zero = torch.zeros((), device=self.device, requires_grad=True)
                state.update(counted=counted, seen=set(), zero=zero, idle=idle)
                count += 0 if idle else int(counted.sum())
                with torch.enable_grad():
                    logits = forward_logits(self.model, batch)
                    labels = self._labels(logits, batch, examples)  # (E, M, T)
                    for draw in range(self.draws):
                        loglik = completion_logprobs(logits, labels[:, draw])[0].sum()
                        torch.autograd.grad(loglik, zero, retain_graph=draw < self.draws - 1,
                                            allow_unused=True)
        finally:
            for handle in handles:
                handle.remove()
        return count

    def _batches(self) -> Iterator[tuple[list[int], dict[str, Tensor], bool]]:
        """``(examples, batch, idle)`` over this rank's shard, then the idle batches."""
        starts = range(0, len(self.order), self.batch_size)
        for start in starts:
            examples = self.order[start : start + self.batch_size]
            yield examples, collate([self.encodings[i] for i in examples], self.pad_token_id,
                                    device=self.device), False
        if self.lockstep:
            largest = -(-len(self.encodings) // distributed_shard()[1])  # rank 0's shard
            for _ in range(len(starts), -(-largest // self.batch_size)):
                yield [0], collate(self.encodings[:1], self.pad_token_id, device=self.device), True

    def _labels(self, logits: Tensor, batch: dict[str, Tensor], examples: list[int]) -> Tensor:
        """(E, M, T): the data labels, or M draws per example as GradientStream draws them."""
        if self.estimator == "empirical":
            return batch["labels"][:, None]
        generators = true_fisher_generators(self.seed, examples, self.device)
        drawn = sample_labels(logits.detach(), batch["labels"], self.draws, generators)
        return drawn.view(len(examples), self.draws, -1)


def _augmented(inputs: Tensor, bias: bool) -> Tensor:
    """``inputs`` (..., in) with a column of ones appended when the layer has a bias."""
    if not bias:
        return inputs
    return torch.cat([inputs, inputs.new_ones((*inputs.shape[:-1], 1))], -1)


def _eigh(matrix: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Eigenvalues (ascending) and eigenvectors (columns, each signed so that its
    largest-magnitude entry is positive) of a symmetric matrix, computed in float64."""
    matrix = matrix.double()
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    peak = vectors.gather(0, vectors.abs().argmax(0, keepdim=True))
    vectors = vectors * torch.where(peak < 0, -1.0, 1.0)
    return values.to(dtype), vectors.to(dtype)


def _covariances(passes: _Passes, layers: dict[str, _Layer], dtype: torch.dtype,
                 device: torch.device) -> tuple[dict[str, Tensor], dict[str, Tensor], int]:
    """``(sum_t a a', sum_t g g', T)`` per layer over one pass (sums, not yet normalized),
    summed over the ranks. A layer whose output does not reach the log-likelihood keeps
    ``sum g g' = 0``."""
    activation = {name: torch.zeros(layer.shape[1], layer.shape[1], dtype=dtype, device=device)
                  for name, layer in layers.items()}
    gradient = {name: torch.zeros(layer.shape[0], layer.shape[0], dtype=dtype, device=device)
                for name, layer in layers.items()}
    calls = dict.fromkeys(layers, 0)

    def on_input(name: str, inputs: Tensor, counted: Tensor) -> None:
        rows = _augmented(inputs[counted].to(device, dtype), layers[name].bias is not None)
        activation[name].addmm_(rows.T, rows)
        calls[name] += 1

    def on_gradient(name: str, grads: Tensor, counted: Tensor) -> None:
        rows = grads[counted].to(device, dtype)
        gradient[name].addmm_(rows.T, rows)

    count = passes.run(on_input, on_gradient)
    # (1 + L,): the tokens, then the forward calls of each layer, over every rank
    totals = all_reduce_sum(torch.tensor([count, *calls.values()], device=device)).tolist()
    for name, layer_calls in zip(layers, totals[1:], strict=True):
        if layer_calls == 0:
            raise FisherError(f"layer {name!r} never ran in the forward pass; exclude it with "
                              "params=")
    for total in (*activation.values(), *gradient.values()):
        all_reduce_sum(total)
    return activation, gradient, totals[0]


def _corrected_eigenvalues(passes: _Passes, layers: dict[str, _Layer],
                           bases: dict[str, tuple[Tensor, Tensor]], dtype: torch.dtype,
                           device: torch.device) -> dict[str, Tensor]:
    """``sum_i (Q_G' G_i Q_A)^2`` per layer over one pass, summed over the ranks, with
    ``G_i = sum_t g_t a_t'`` over every position: tokens are rotated first (``â = Q_A' a_t``,
    ``ĝ = Q_G' g_t``), then ``Q_G' G_i Q_A = sum_t ĝ_t â_t'`` is one batched product."""
    rotated: dict[str, Tensor] = {}
    sums = {name: torch.zeros(q_g.shape[0], q_a.shape[0], dtype=dtype, device=device)
            for name, (q_a, q_g) in bases.items()}

    def on_input(name: str, inputs: Tensor, counted: Tensor) -> None:
        augmented = _augmented(inputs.to(device, dtype), layers[name].bias is not None)
        rotated[name] = augmented @ bases[name][0]  # (E, T, in')

    def on_gradient(name: str, grads: Tensor, counted: Tensor) -> None:
        grads = grads.to(device, dtype) @ bases[name][1]  # (E, T, out)
        per_example = torch.bmm(grads.transpose(1, 2), rotated[name])  # (E, out, in')
        sums[name] += per_example.square_().sum(0)

    passes.run(on_input, on_gradient)
    return {name: all_reduce_sum(total) for name, total in sums.items()}


def kfac(model: nn.Module, tokenizer, data: Sequence[Record | Probe | Encoding], *,
         estimator: Estimator = "true", eigen_correction: bool = True,
         params: str | Sequence[str] | None = None, mc_samples: int = 1, batch_size: int = 8,
         seed: int = 0, dtype: torch.dtype = torch.float32,
         device: str | torch.device | None = None, tokens: Tokens = "answer",
         max_factor_dim: int = 16384) -> KroneckerFisher:
    """Kronecker-factored (EK-FAC) Fisher of a causal LM on ``data``.

    Under torch.distributed (``torchrun``, ``accelerate launch``) call it on every rank with
    the same data: each rank runs its shard of the examples, the sums are all-reduced, and
    every rank returns the same Fisher, equal to one process's (module docstring).

    Args:
        model: a causal LM, plain, wrapped in ``DistributedDataParallel`` (unwrapped: hooks
            and parameter names are the inner model's) or sharded by FSDP2 ``fully_shard``
            over a 1-D mesh (every parameter selected must then be a factored layer's; see the
            module docstring).
        tokenizer, data, estimator, mc_samples, params, batch_size, seed, dtype,
            device: as for :func:`forgetkit.fisher.diagonal` (``batch_size`` examples per
            forward pass; memory grows with it as a forward pass does).
        eigen_correction: replace K-FAC's eigenvalues with the exact diagonal of the Fisher in
            the Kronecker eigenbasis (a second pass over the data).
        tokens: tokens counted in the factors: ``"answer"`` (scored positions) or ``"all"``
            (every non-padding position); see the module docstring.
        max_factor_dim: a layer with more outputs or inputs goes to the diagonal fallback.

    Returns:
        A :class:`KroneckerFisher`.

    Raises:
        FisherError: as :func:`~forgetkit.fisher.diagonal`; also no linear layer among the
            selected parameters, an unknown ``tokens``, a layer that runs twice per forward
            pass or sees inputs other than (batch, tokens, features), an FSDP2-sharded model
            with parameters for the diagonal fallback, or a model sharded otherwise (the
            message says how to pass an unsharded copy).
    """
    check_sampling(estimator, batch_size, mc_samples)
    if tokens not in TOKENS:
        raise FisherError(f"tokens must be one of {TOKENS}, got {tokens!r}")
    model, encodings, chosen, device, pad, dtype, provenance = prepare_inputs(
        model, tokenizer, data, params=params, device=device, dtype=dtype, estimator=estimator,
        mc_samples=mc_samples, seed=seed, allow_fsdp=True)
    layers, reasons = _plan_layers(model, chosen, max_factor_dim)
    why = "; ".join(f"{n}: {r}" for n, r in list(reasons.items())[:3])
    if not layers:
        raise FisherError(f"no linear layer (nn.Linear or Conv1D weight) among the parameters "
                          f"selected by params={params!r} ({why}, ...); use fisher.diagonal "
                          "or fisher.low_rank for them")
    sharded = fsdp_sharded(model)
    if sharded and reasons:
        raise FisherError(f"the model is sharded by FSDP: kfac factors its linear layers, but "
                          f"the diagonal fallback needs whole parameters, and params={params!r} "
                          f"selects {len(reasons)} that are not factored ({why}, ...). Select "
                          "linear layers only (e.g. params=r'layers\\..*\\.(self_attn|mlp)\\.'), "
                          "or pass an unsharded copy of the model")
    draws = mc_samples if estimator == "true" else 1
    with evaluation_mode(model):
        passes = _Passes(model, encodings, layers, estimator=estimator, draws=draws,
                         batch_size=batch_size, seed=seed, pad_token_id=pad, tokens=tokens,
                         lockstep=sharded)
        activation, gradient, count = _covariances(passes, layers, dtype, device)
        samples = len(encodings) * draws
        bases, spectra = {}, {}
        for name in layers:
            (lam_a, q_a), (lam_g, q_g) = (_eigh(activation[name] / count, dtype),
                                          _eigh(gradient[name] / samples, dtype))
            bases[name], spectra[name] = (q_a, q_g), (lam_a, lam_g)
        if eigen_correction:
            corrected = _corrected_eigenvalues(passes, layers, bases, dtype, device)
            eigenvalues = {name: s / samples for name, s in corrected.items()}
        else:
            eigenvalues = {name: torch.outer(lam_g, lam_a).clamp_(min=0)
                           for name, (lam_a, lam_g) in spectra.items()}
    factors = {name: KroneckerFactors(
        weight=layer.weight, bias=layer.bias, transposed=layer.transposed, tokens=count,
        activation_eigenvalues=spectra[name][0], activation_eigenvectors=bases[name][0],
        gradient_eigenvalues=spectra[name][1], gradient_eigenvectors=bases[name][1],
        eigenvalues=eigenvalues[name]) for name, layer in layers.items()}
    fallback = None
    if reasons:  # all the data: diagonal() takes this rank's shard itself
        fallback = diagonal(model, tokenizer, encodings, estimator=estimator,
                            mc_samples=mc_samples, batch_size=batch_size, seed=seed, dtype=dtype,
                            device=device, params=[f"^{re.escape(n)}$" for n in reasons])
        logger.info("kfac: %d parameters on the diagonal fallback: %s", len(reasons),
                    ", ".join(sorted(reasons)[:6]))
    logger.info("kfac (%s, %s tokens): %d layers, %d tokens of %d examples x %d draws",
                "EK-FAC" if eigen_correction else "K-FAC", tokens, len(layers), count,
                len(encodings), draws)
    return KroneckerFisher(layers=factors, fallback=fallback, fallback_reasons=reasons,
                           provenance=provenance,
                           parameter_shapes={n: p.shape for n, p in chosen.items()},
                           eigen_correction=eigen_correction, tokens=tokens)
