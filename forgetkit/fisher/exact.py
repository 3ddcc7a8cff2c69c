"""Exact, matrix-free Fisher quadratic forms and Fisher-vector products.

For probe ``x`` with scored (answer) positions ``t`` (logits at ``t - 1`` predict token ``t``;
a position counts iff its label is not ``-100``), ``J_t = d logits_t / d theta`` and
``p_t = softmax(logits_t)`` of the model:

- true Fisher (labels drawn from the model at every answer position, the definition every
  forgetkit Fisher uses): ``d' F_x d = sum_t [ sum_y p_t(y) u_t(y)^2 - (sum_y p_t(y) u_t(y))^2 ]``
  with ``u_t = J_t d``; the cross-position terms vanish in expectation, so this is the
  expectation over *all* label draws, with no sampling;
- empirical Fisher: ``d' F_x d = (g_x . d)^2`` with
  ``g_x . d = sum_t [ u_t(y_t) - sum_y p_t(y) u_t(y) ]`` at the data labels ``y_t``.

``d' F d`` is the mean of ``d' F_x d`` over probes, the same normalization as
:func:`forgetkit.fisher.diagonal` and :func:`forgetkit.fisher.low_rank`, so
``1/2 d' F d`` is the second-order prediction of the KL summed over answer tokens and averaged
over probes (:func:`forgetkit.fisher.measured_kl`, ``per_sequence``).

``u = J d`` for every position of a batch costs one forward-mode product
(:func:`torch.func.jvp`): no gradient is stored, no label is drawn, memory is about two forward
passes. Forward-mode AD has no rule for fused SDPA kernels, so the product runs under the
math SDPA kernel; a model whose attention still has no forward-mode rule falls back (with a
warning) to the double-backward form ``J d = d/dv [(J' v) . d]``. The Fisher-vector product
``F v = mean_x sum_t J_t' H_t J_t v`` (``H_t = diag(p_t) - p_t p_t'``, the GGN form) adds one
backward pass to the same product, and :func:`forgetkit.fisher.low_rank.exact_low_rank` takes top eigenpairs from it by
Lanczos (:func:`scipy.sparse.linalg.eigsh`), so its directions carry no label noise.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.func import functional_call, jvp, vjp
from torch.nn.attention import SDPBackend, sdpa_kernel

from forgetkit.data.records import Probe, Record
from forgetkit.fisher.delta import ParamDelta, module_groups
from forgetkit.fisher.pergrad import (
    Estimator,
    FisherError,
    all_reduce_sum,
    check_sampling,
    encode_data,
    evaluation_mode,
    select_parameters,
    shard_indices,
    unwrap_model,
)
from forgetkit.models import IGNORE_INDEX, Encoding, collate
from forgetkit.stats import Interval, mean_ci

__all__ = [
    "Displacement",
    "FisherOperator",
    "ProductMode",
    "displacement",
    "logit_products",
    "scored_positions",
]

logger = logging.getLogger(__name__)

ProductMode = Literal["auto", "jvp", "double_backward"]
_MODES = ("auto", "jvp", "double_backward")


def _differentiable_attention() -> contextlib.AbstractContextManager[None]:
    """The math SDPA kernel meanwhile: fused kernels have neither a forward-mode AD rule nor a
    double backward."""
    return sdpa_kernel([SDPBackend.MATH])


def scored_positions(labels: Tensor) -> Tensor:
    """(B, T) bool: the positions whose logits predict a scored token (label at ``t + 1`` not
    ``-100``)."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return keep


def _keeps_logits(model: torch.nn.Module) -> bool:
    """Whether the model's forward takes transformers' ``logits_to_keep`` (then the output
    layer runs on the kept positions only)."""
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


class _Logits:
    """``params -> logits`` (n, V) of ``model`` at the ``keep`` positions of one collated batch,
    row-major (batch row, then position). With ``logits_to_keep`` the output layer (for a 49k
    vocabulary the largest activation) runs on those positions only."""

    def __init__(self, model: torch.nn.Module, batch: dict[str, Tensor], keep: Tensor):
        self.model, self.keep = model, keep
        self.kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                       "position_ids": batch["position_ids"], "use_cache": False}
        self.sliced = _keeps_logits(model)
        if self.sliced:
            self.kwargs["logits_to_keep"] = keep

    def __call__(self, params: dict[str, Tensor]) -> Tensor:
        logits = functional_call(self.model, params, args=(), kwargs=self.kwargs).logits
        return logits if self.sliced else logits[self.keep]


def _jvp_double_backward(function: _Logits, params: dict[str, Tensor],
                         tangents: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """``(f(params), J tangents)`` from two reverse-mode passes: ``J t = d/dv [(J' v) . t]``."""
    leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
    with torch.enable_grad():
        logits = function(leaves)
        probe = torch.zeros_like(logits, requires_grad=True)
        pulled = torch.autograd.grad(logits, list(leaves.values()), probe, create_graph=True,
                                     allow_unused=True)
        inner = sum((g * tangents[n]).sum() for n, g in zip(leaves, pulled, strict=True)
                    if g is not None)
        (product,) = torch.autograd.grad(inner, probe)
    return logits.detach(), product.detach()


class _Products:
    """``J t`` for one model, choosing forward mode or the double-backward form once."""

    def __init__(self, model: torch.nn.Module, mode: ProductMode):
        if mode not in _MODES:
            raise FisherError(f"mode must be one of {_MODES}, got {mode!r}")
        self.model, self.mode = model, None if mode == "auto" else mode

    def __call__(self, batch: dict[str, Tensor], params: dict[str, Tensor],
                 tangents: dict[str, Tensor], keep: Tensor | None = None
                 ) -> tuple[Tensor, Tensor]:
        keep = scored_positions(batch["labels"]) if keep is None else keep
        function = _Logits(self.model, batch, keep)
        if self.mode != "double_backward":
            try:
                with torch.no_grad(), _differentiable_attention():
                    out = jvp(function, (params,), (tangents,))
                self.mode = "jvp"
                return out
            except (NotImplementedError, RuntimeError) as err:
                if self.mode == "jvp":
                    raise
                logger.warning("exact Fisher: forward-mode AD fails on %s (%s: %s); using the "
                               "double-backward form (about twice the time and memory)",
                               type(self.model).__name__, type(err).__name__,
                               str(err).splitlines()[0][:160])
                self.mode = "double_backward"
        with _differentiable_attention():
            return _jvp_double_backward(function, params, tangents)


def logit_products(model: torch.nn.Module, batch: dict[str, Tensor],
                   tangents: Mapping[str, Tensor], mode: ProductMode = "auto",
                   keep: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(logits, J t)``, both (n, V): the model's logits at the ``keep`` positions of ``batch``
    ((B, T) bool, row-major; default the scored positions, :func:`scored_positions`) and their
    directional derivative along ``tangents`` (name -> tensor of the parameter's shape; the
    other parameters are held fixed)."""
    named = dict(model.named_parameters())
    params = {n: named[n].detach() for n in tangents}
    return _Products(model, mode)(batch, params, dict(tangents), keep)


def _scored(logits: Tensor, tangent: Tensor, labels: Tensor
            ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The scored positions' ``(z, u, rows, y)`` in float64: logits and ``u = J d`` (n, V) as
    :func:`logit_products` gives them, the batch row of each position (n,) and its label
    (n,)."""
    keep = scored_positions(labels)
    rows = keep.nonzero()[:, 0]
    return logits.double(), tangent.double(), rows, labels[:, 1:][keep[:, :-1]]


def _per_example_form(logits: Tensor, tangent: Tensor, labels: Tensor, estimator: Estimator
                      ) -> Tensor:
    """(B,) float64 ``d' F_x d`` of each row from the scored positions' logits and
    ``u = J d`` (n, V)."""
    z, u, rows, y = _scored(logits, tangent, labels)
    p = torch.softmax(z, -1)
    mean = (p * u).sum(-1)  # (n,)
    out = torch.zeros(labels.shape[0], dtype=torch.float64, device=z.device)
    if estimator == "true":
        return out.index_add_(0, rows, (p * u * u).sum(-1) - mean.square())
    score = u.gather(1, y[:, None]).squeeze(1) - mean  # (n,) d/dt log p(y_t)
    return out.index_add_(0, rows, score).square()


def _check_finite(logits: Tensor, tangent: Tensor, labels: Tensor, ids: Sequence[str]) -> None:
    rows = scored_positions(labels).nonzero()[:, 0]
    for what, x in (("logits", logits), ("the logits' derivative along the update", tangent)):
        bad = ~torch.isfinite(x).all(-1)  # (n,)
        if bool(bad.any()):
            row = int(rows[bad][0])
            raise FisherError(f"non-finite {what} on probe {ids[row]!r}: check the model's "
                              "weights and the update")


def _resolve_tangents(model: torch.nn.Module, delta: ParamDelta | Mapping[str, Tensor],
                      params: str | Sequence[str] | None) -> dict[str, Tensor]:
    """The update as dense tensors on the model's parameters (name -> tensor)."""
    entries = delta.entries if isinstance(delta, ParamDelta) else dict(delta)
    named = dict(model.named_parameters())
    unknown = [n for n in entries if n not in named]
    if len(unknown) == len(entries):
        raise FisherError(f"the update shares no parameter with the model: it holds e.g. "
                          f"{unknown[:2]}, the model e.g. {list(named)[:2]}")
    if unknown:
        raise FisherError(f"the update holds parameter {unknown[0]!r}, which the model does not "
                          f"have ({len(unknown)} such)")
    chosen = select_parameters(model, params) if params is not None else named
    tangents = {}
    for name, value in entries.items():
        if name not in chosen:
            continue
        dense = delta.dense(name) if isinstance(delta, ParamDelta) else value
        p = named[name]
        if tuple(dense.shape) != tuple(p.shape):
            raise FisherError(f"the update of {name!r} has shape {tuple(dense.shape)}, the "
                              f"parameter {tuple(p.shape)}")
        tangents[name] = dense.detach().to(device=p.device, dtype=p.dtype)
    if not tangents:
        raise FisherError(f"params={params!r} leaves no parameter of the update")
    return tangents


def _shard_batches(encodings: list[Encoding], batch_size: int) -> list[list[int]]:
    """This rank's examples in length-sorted batches (indices into ``encodings``)."""
    order = shard_indices(encodings)
    return [order[a : a + batch_size] for a in range(0, len(order), batch_size)]


@dataclass
class Displacement:
    """The exact Fisher quadratic form ``d' F d`` of an update on probes.

    Attributes:
        estimator: ``"true"`` or ``"empirical"``.
        per_probe: (N,) float64, ``d' F_x d`` of each probe, in the order given.
        mean: ``d' F d``, the mean of ``per_probe``.
        ci: 95% percentile bootstrap interval of the mean over probes.
        per_capability: capability -> ``{"n", "mean", "low", "high"}``.
        per_module: module -> ``{"parameters", "mean", "low", "high"}``: the update restricted
            to that module's parameters (empty unless asked for).
        probe_ids: the probes' ids, aligned with ``per_probe``.
        mode: how ``J d`` was computed (``"jvp"`` or ``"double_backward"``).
    """

    estimator: str
    per_probe: np.ndarray
    mean: float
    ci: tuple[float, float]
    per_capability: dict[str, dict[str, float]]
    per_module: dict[str, dict[str, float]] = field(default_factory=dict)
    probe_ids: list[str] = field(default_factory=list)
    mode: str = "jvp"

    @property
    def predicted_kl(self) -> float:
        """``1/2 d' F d``: the second-order prediction of the measured KL."""
        return self.mean / 2

    def interval(self) -> Interval:
        return Interval(self.mean, self.ci[0], self.ci[1], 0.95, int(self.per_probe.size))

    def to_dict(self, per_probe: bool = True) -> dict[str, Any]:
        out = {"estimator": self.estimator, "mean": self.mean, "low": self.ci[0],
               "high": self.ci[1], "predicted_kl": self.predicted_kl,
               "predicted_kl_low": self.ci[0] / 2, "predicted_kl_high": self.ci[1] / 2,
               "n_probes": int(self.per_probe.size), "mode": self.mode,
               "per_capability": self.per_capability, "per_module": self.per_module}
        if per_probe:
            out["per_probe"] = dict(zip(self.probe_ids, self.per_probe.tolist(), strict=True))
        return out


def _summaries(values: np.ndarray, groups: list[str], seed: int) -> dict[str, dict[str, float]]:
    out = {}
    for group in dict.fromkeys(groups):
        ci = mean_ci(values[[g == group for g in groups]], seed=seed)
        out[group] = {"n": ci.n, "mean": ci.value, "low": ci.low, "high": ci.high}
    return out


def _per_probe_forms(model: torch.nn.Module, encodings: list[Encoding], ids: list[str],
                     tangents: dict[str, Tensor], estimator: Estimator, batch_size: int,
                     pad_token_id: int, products: _Products) -> np.ndarray:
    named = dict(model.named_parameters())
    params = {n: named[n].detach() for n in tangents}
    device = next(iter(params.values())).device
    out = torch.zeros(len(encodings), dtype=torch.float64, device=device)
    for examples in _shard_batches(encodings, batch_size):
        batch = collate([encodings[i] for i in examples], pad_token_id, device=device)
        logits, tangent = products(batch, params, tangents)
        _check_finite(logits, tangent, batch["labels"], [ids[i] for i in examples])
        index = torch.tensor(examples, device=device)
        out.index_add_(0, index, _per_example_form(logits, tangent, batch["labels"], estimator))
    return all_reduce_sum(out).cpu().numpy()


def displacement(model: torch.nn.Module, tokenizer, probes: Sequence[Probe | Record | Encoding],
                 delta: ParamDelta | Mapping[str, Tensor], *, estimator: Estimator = "true",
                 batch_size: int = 16, params: str | Sequence[str] | None = None,
                 per_module: bool = False, mode: ProductMode = "auto", seed: int = 0
                 ) -> Displacement:
    """The exact Fisher quadratic form ``d' F d`` of ``delta`` on ``probes``, matrix-free.

    Args:
        model: the base model (any dtype; sums are taken in float64), plain or wrapped in
            ``DistributedDataParallel`` (unwrapped: ``delta`` names the inner model's
            parameters); not sharded by FSDP.
        tokenizer: its tokenizer (Probes score ``prompt`` + ``answer``, Records ``prompt`` +
            ``target``, both through :func:`forgetkit.models.encode`).
        probes: the data the Fisher is taken on.
        delta: the update, a :class:`~forgetkit.fisher.delta.ParamDelta` (full or LoRA
            factors) or name -> tensor; parameters outside it are held fixed.
        estimator: ``"true"`` (expectation over every label at every answer position) or
            ``"empirical"`` (the data labels).
        batch_size: probes per forward-mode product.
        params: only the update's entries on these parameters (as
            :func:`~forgetkit.fisher.select_parameters`).
        per_module: also the quadratic form of the update restricted to each module (one more
            product per module).
        mode: ``"jvp"`` (forward mode), ``"double_backward"`` or ``"auto"`` (forward mode, else
            the double-backward form with a warning).
        seed: of the bootstrap.

    Returns:
        A :class:`Displacement`.

    Raises:
        FisherError: an update that shares no parameter with the model (or holds one it lacks,
            or of another shape), a probe without answer tokens, non-finite logits (each named),
            an FSDP-sharded model.
    """
    model = unwrap_model(model)
    check_sampling(estimator, batch_size)
    tangents = _resolve_tangents(model, delta, params)
    encodings = encode_data(tokenizer, list(probes))
    ids = [str(getattr(probe, "id", index)) for index, probe in enumerate(probes)]
    capabilities = [getattr(probe, "capability", None) or "all" for probe in probes]
    pad = getattr(tokenizer, "pad_token_id", None) or 0
    products = _Products(model, mode)
    with evaluation_mode(model):
        values = _per_probe_forms(model, encodings, ids, tangents, estimator, batch_size, pad,
                                  products)
        modules: dict[str, dict[str, float]] = {}
        if per_module:
            for module, names in module_groups(tangents).items():
                own = _per_probe_forms(model, encodings, ids, {n: tangents[n] for n in names},
                                       estimator, batch_size, pad, products)
                ci = mean_ci(own, seed=seed)
                modules[module] = {"parameters": sum(tangents[n].numel() for n in names),
                                   "mean": ci.value, "low": ci.low, "high": ci.high}
    ci = mean_ci(values, seed=seed)
    return Displacement(estimator=estimator, per_probe=values, mean=ci.value,
                        ci=(ci.low, ci.high), per_capability=_summaries(values, capabilities, seed),
                        per_module=modules, probe_ids=ids, mode=products.mode or "jvp")


class FisherOperator:
    """The exact Fisher of ``model`` on ``data`` as a matrix-free operator.

    ``F @ v`` (``v``: name -> tensor of each covered parameter's shape) is
    ``mean_x sum_t J_t' H_t J_t v`` with ``H_t = diag(p_t) - p_t p_t'`` (true Fisher) or
    ``mean_x g_x (g_x . v)`` (empirical); each product costs one forward-mode product and one
    backward pass over the data. Results are float64.

    Args:
        model, tokenizer, data, estimator, batch_size, params, mode: as :func:`displacement`
            (``params`` chooses the parameters the operator acts on; default every parameter
            that requires grad; a DDP-wrapped model is unwrapped, so names are the inner
            model's).
    """

    def __init__(self, model: torch.nn.Module, tokenizer, data: Sequence, *,
                 estimator: Estimator = "true", batch_size: int = 16,
                 params: str | Sequence[str] | None = None, mode: ProductMode = "auto"):
        check_sampling(estimator, batch_size)
        model = unwrap_model(model)
        self.model, self.estimator, self.batch_size = model, estimator, batch_size
        self.encodings = encode_data(tokenizer, list(data))
        self.params = {n: p.detach() for n, p in select_parameters(model, params).items()}
        self.pad = getattr(tokenizer, "pad_token_id", None) or 0
        self.products = _Products(model, mode)
        self.products_done = 0

    @property
    def shapes(self) -> dict[str, torch.Size]:
        return {n: p.shape for n, p in self.params.items()}

    @property
    def size(self) -> int:
        return sum(p.numel() for p in self.params.values())

    def _cotangent(self, logits: Tensor, u: Tensor, labels: Tensor) -> Tensor:
        """(n, V) ``H u`` at the scored positions, in the logits' dtype."""
        z, u_s, rows, y = _scored(logits, u, labels)
        p = torch.softmax(z, -1)
        mean = (p * u_s).sum(-1, keepdim=True)
        if self.estimator == "true":
            w = p * (u_s - mean)
        else:
            score = (u_s.gather(1, y[:, None]) - mean).squeeze(1)  # (n,)
            per_row = torch.zeros(labels.shape[0], dtype=z.dtype, device=z.device)
            per_row.index_add_(0, rows, score)
            w = -per_row[rows, None] * p
            w.scatter_add_(1, y[:, None], per_row[rows, None])
        return w.to(logits.dtype)

    def matvec(self, vector: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``F v`` (name -> float64 tensor)."""
        missing = [n for n in self.params if n not in vector]
        if missing:
            raise FisherError(f"the vector has no entry for parameter {missing[0]!r}")
        tangents = {n: vector[n].detach().to(p.device, p.dtype) for n, p in self.params.items()}
        device = next(iter(self.params.values())).device
        out = {n: torch.zeros(p.shape, dtype=torch.float64, device=device)
               for n, p in self.params.items()}
        with evaluation_mode(self.model):
            for examples in _shard_batches(self.encodings, self.batch_size):
                batch = collate([self.encodings[i] for i in examples], self.pad, device=device)
                keep = scored_positions(batch["labels"])
                _, u = self.products(batch, self.params, tangents, keep)
                with torch.enable_grad():
                    logits, pull = vjp(_Logits(self.model, batch, keep), self.params)
                (grads,) = pull(self._cotangent(logits.detach(), u, batch["labels"]))
                for n, g in grads.items():
                    out[n] += g.detach().double()
        self.products_done += 1
        for value in out.values():
            all_reduce_sum(value).div_(len(self.encodings))
        return out

    __matmul__ = matvec

    def _flat(self, vector: Mapping[str, Tensor]) -> np.ndarray:
        return torch.cat([vector[n].reshape(-1).double().cpu() for n in self.params]).numpy()

    def _unflat(self, flat: np.ndarray) -> dict[str, Tensor]:
        pieces = torch.from_numpy(flat.copy()).split([p.numel() for p in self.params.values()])
        return {n: x.reshape(p.shape) for (n, p), x in zip(self.params.items(), pieces,
                                                           strict=True)}

    def as_linear_operator(self):
        """The operator on flat float64 vectors (:class:`scipy.sparse.linalg.LinearOperator`)."""
        from scipy.sparse.linalg import LinearOperator

        return LinearOperator((self.size, self.size), dtype=np.float64,
                              matvec=lambda x: self._flat(self.matvec(self._unflat(
                                  np.asarray(x).reshape(-1)))))
