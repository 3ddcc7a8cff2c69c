"""Diagonal Fisher information: the mean over examples of squared per-example gradients.

``F_jj = (1/N) sum_i f_ij`` with ``f_ij = (1/M) sum_k g_ikj^2``, where ``g_ik`` is the gradient
of example ``i``'s sequence log-likelihood at its data labels (empirical, M = 1) or at label
draw ``k`` (true Fisher, M = ``mc_samples``); see :mod:`forgetkit.fisher.pergrad`. A batch-mean
gradient is never squared. The per-example ``f_i`` stream through a running mean and variance
(Chan et al.), so memory is O(P) beyond the model and the current block, and each entry has a
standard error ``sqrt(var_i(f_ij) / N)``: the error bar of a mean over examples, counting both
the choice of examples and the label draws. For fixed data it bounds the Monte-Carlo error of
the true Fisher from above (with equality when all examples are the same).

Example:
    >>> F = diagonal(model, tokenizer, probes, estimator="true", mc_samples=4)  # doctest: +SKIP
    >>> F.values["model.layers.0.mlp.up_proj.weight"].shape  # doctest: +SKIP
    torch.Size([384, 128])
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from forgetkit.data.records import Probe, Record
from forgetkit.fisher.delta import ParamDelta
from forgetkit.fisher.directions import AxisDirection, Eigenpairs
from forgetkit.fisher.io import (
    Delta,
    FisherMatrix,
    Provenance,
    accumulation_dtype,
    prepare_inputs,
)
from forgetkit.fisher.pergrad import (
    Estimator,
    FisherError,
    GradientStream,
    PerExample,
    all_reduce_sum,
    distributed_shard,
    evaluation_mode,
)
from forgetkit.models import Encoding

__all__ = ["DiagonalFisher", "RunningMoments", "accumulation_dtype", "diagonal"]

logger = logging.getLogger(__name__)

BUFFERED_MAX_ELEMENTS = 2**24
"""Up to this many Fisher entries (64 MiB of float32 per copy) :class:`RunningMoments` keeps a
block buffer to merge all tensors at once."""


class RunningMoments:
    """Count, mean and sum of squared deviations of a stream of blocks of samples of several
    named tensors (blocks and ranks merge with Chan et al.'s parallel form).

    Each block is added one tensor at a time (:meth:`add`, so only one tensor's samples need
    exist at once). With ``buffered`` (the default when the tensors hold at most
    :data:`BUFFERED_MAX_ELEMENTS` elements) the block's means and squared deviations are kept
    for every tensor and :meth:`merge` folds them in together, one ``torch._foreach`` call per
    step (per-call overhead matters on small models); otherwise each tensor's block is folded
    in as it is added, so no second copy of the moments is ever held (on a model of P
    parameters that copy would be 2·P more numbers). Both give the same numbers.

    Attributes:
        count: samples merged so far.
        mean: name -> running mean, of the tensor's shape.
        m2: name -> running sum of squared deviations from the mean.
    """

    def __init__(self, shapes: Mapping[str, torch.Size], dtype: torch.dtype,
                 device: torch.device, buffered: bool | None = None):
        self.count = 0
        self.mean = {n: torch.zeros(s, dtype=dtype, device=device) for n, s in shapes.items()}
        self.m2 = {n: torch.zeros(s, dtype=dtype, device=device) for n, s in shapes.items()}
        if buffered is None:
            buffered = sum(m.numel() for m in self.mean.values()) <= BUFFERED_MAX_ELEMENTS
        self._block_mean = ({n: torch.empty_like(m) for n, m in self.mean.items()}
                            if buffered else None)
        self._block_m2 = ({n: torch.empty_like(m) for n, m in self.mean.items()}
                          if buffered else None)
        self._added: dict[str, int] = {}  # name -> samples of the current block

    def add(self, name: str, batch: Tensor) -> None:
        """Add the block's samples ``batch`` (B, *shape) of tensor ``name``; overwrites ``batch``.

        The block's own mean and squared deviations are formed in place, without (B, *shape)
        temporaries (on large models this is memory-bound); :meth:`merge` folds them in.
        """
        if self._block_mean is None:
            block_mean = torch.mean(batch, 0)
            block_m2 = torch.sum(batch.sub_(block_mean).square_(), 0)
            self._fold([name], [block_mean], [block_m2], batch.shape[0])
        else:
            block_mean = torch.mean(batch, 0, out=self._block_mean[name])
            torch.sum(batch.sub_(block_mean).square_(), 0, out=self._block_m2[name])
        self._added[name] = batch.shape[0]

    def _fold(self, names: list[str], block_means: list[Tensor], block_m2s: list[Tensor],
              size: int) -> None:
        """Chan et al.'s merge of one block of ``size`` samples into ``names``' moments."""
        total = self.count + size
        means, m2s = [self.mean[n] for n in names], [self.m2[n] for n in names]
        torch._foreach_sub_(block_means, means)  # delta = mean_block - mean_old
        torch._foreach_add_(means, block_means, alpha=size / total)
        # m2 += m2_block + delta^2 n_old n_block / n
        torch._foreach_add_(m2s, block_m2s)
        torch._foreach_addcmul_(m2s, block_means, block_means, value=self.count * size / total)

    def merge(self) -> None:
        """Merge the block added for every tensor into the running moments.

        Raises:
            ValueError: a tensor without samples in the block, or blocks of different sizes.
        """
        sizes = set(self._added.values())
        if len(self._added) != len(self.mean) or len(sizes) != 1:
            missing = [n for n in self.mean if n not in self._added]
            raise ValueError(f"every tensor needs a block of the same size before merge(); "
                             f"sizes {sorted(sizes)}, missing {missing[:3]}")
        size = sizes.pop()
        if self._block_mean is not None:
            names = list(self.mean)
            self._fold(names, [self._block_mean[n] for n in names],
                       [self._block_m2[n] for n in names], size)
        self.count += size
        self._added.clear()

    def all_reduce(self) -> None:
        """Merge the moments of every rank (no-op outside torch.distributed)."""
        if distributed_shard()[1] == 1:
            return
        some = next(iter(self.mean.values()))
        count = torch.tensor([float(self.count)], dtype=some.dtype, device=some.device)
        dist.all_reduce(count)
        for name, mean in self.mean.items():
            total = mean * self.count
            dist.all_reduce(total)
            merged = total / count.clamp(min=1)
            self.m2[name].add_((mean - merged).square_(), alpha=self.count)
            dist.all_reduce(self.m2[name])
            self.mean[name] = merged
        self.count = int(count.item())

    def stderr(self) -> dict[str, Tensor]:
        """name -> ``sqrt(sample variance / count)``; ``inf`` with fewer than two samples."""
        if self.count < 2:
            return {n: torch.full_like(m, math.inf) for n, m in self.mean.items()}
        names = list(self.m2)
        out = torch._foreach_div([self.m2[n] for n in names], (self.count - 1) * self.count)
        torch._foreach_sqrt_(out)
        return dict(zip(names, out, strict=True))

    def within(self, bound: float) -> bool:
        """Whether every mean entry is finite and at most ``bound`` in magnitude (one check
        over all tensors)."""
        if not self.mean:
            return True
        largest = torch.stack(torch._foreach_norm(list(self.mean.values()), math.inf))
        return bool(largest.max() <= bound)  # NaN compares false


@dataclass
class DiagonalFisher(FisherMatrix):
    """The diagonal of the Fisher on a set of parameters.

    Attributes:
        values: name -> tensor of the parameter's shape, ``F_jj``.
        stderr: name -> tensor of the parameter's shape, standard error of each entry.
        provenance: model, data, estimator, N, ... (:class:`Provenance`).
        per_example_proxy: for each update passed to :func:`diagonal` as ``updates``, the (N,)
            float64 values ``sum_j f_ij d_j^2`` in data order, whose mean is
            :meth:`quad_form` of that update (not saved with the Fisher).
    """

    kind: ClassVar[str] = "diagonal"
    values: dict[str, Tensor]
    stderr: dict[str, Tensor]
    provenance: Provenance
    per_example_proxy: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def shapes(self) -> dict[str, torch.Size]:
        return {name: v.shape for name, v in self.values.items()}

    @property
    def quad_form_label(self) -> str:
        return "diagonal proxy Σ F_jj d_j², not d'Fd"

    def quad_form(self, delta: Delta) -> float:
        """``sum_j F_jj d_j^2`` over the covered parameters (float64)."""
        return float(sum((v.double() * self._delta(delta, name, v.device).square()).sum()
                         for name, v in self.values.items()
                         if self._entry(delta, name) is not None))

    def top(self, k: int) -> Eigenpairs:
        """The k largest diagonal entries; their eigenvectors are coordinate axes."""
        top = self._top_entries(self.values, self._rank_k(k))
        axes = tuple(AxisDirection.at(name, index, self.shapes[name])
                     for name, index in top)
        return Eigenpairs(top.values, axes)

    def coordinates(self, delta: Delta, k: int | None = None) -> Tensor:
        """(k,) float64: the entries of ``d`` at the k largest diagonal entries."""
        top = self._top_entries(self.values, self._rank_k(k))
        out = torch.zeros(top.values.shape, dtype=torch.float64)
        for name, v in self.values.items():
            positions, index = top.select(name)
            out[positions] = self._delta(delta, name, v.device).flatten()[index.to(v.device)].cpu()
        return out

    def project(self, delta: Delta, k: int | None = None) -> dict[str, Tensor]:
        """``d`` with every entry outside the k largest diagonal entries set to zero."""
        top = self._top_entries(self.values, self._rank_k(k))
        out = {}
        for name, v in self.values.items():
            keep = torch.zeros(v.numel(), dtype=torch.float64, device=v.device)
            keep[top.select(name)[1].to(v.device)] = 1.0
            out[name] = self._delta(delta, name, v.device) * keep.view(v.shape)
        return out

    def trace(self) -> float:
        return float(sum(v.double().sum() for v in self.values.values()))

    def _parameter_stats(self) -> dict[str, tuple[float, float]]:
        (top, _), = self._top_entries(self.values, 1)
        return {name: (float(v.double().sum()), float(name == top))
                for name, v in self.values.items()}

    def _tensors(self) -> dict[str, Tensor]:
        return {**{f"values/{n}": v for n, v in self.values.items()},
                **{f"stderr/{n}": v for n, v in self.stderr.items()}}

    @classmethod
    def _from_saved(cls, tensors, shapes, provenance, extra) -> DiagonalFisher:
        return cls(values={n: tensors[f"values/{n}"] for n in shapes},
                   stderr={n: tensors[f"stderr/{n}"] for n in shapes}, provenance=provenance)


def diagonal(model: torch.nn.Module, tokenizer, data: Sequence[Record | Probe | Encoding],
             estimator: Estimator = "true", mc_samples: int = 1,
             params: str | Sequence[str] | None = None, batch_size: int = 8, seed: int = 0,
             dtype: torch.dtype = torch.float32, device: str | torch.device | None = None,
             per_example: PerExample = "auto",
             updates: Mapping[str, ParamDelta] | None = None) -> DiagonalFisher:
    """Diagonal Fisher of a causal LM on ``data``.

    Args:
        model: a causal LM (any dtype/device; run in eval mode, its mode restored after),
            plain or wrapped in ``DistributedDataParallel`` (unwrapped: parameter names are the
            inner model's); not sharded by FSDP.
        tokenizer: encodes Records (prompt + target) and Probes (prompt + answer); may be
            ``None`` when ``data`` are :class:`~forgetkit.models.Encoding` s.
        data: the examples; only completion tokens enter the log-likelihood.
        estimator: ``"true"`` (labels drawn from the model, teacher-forced) or
            ``"empirical"`` (data labels).
        mc_samples: label draws per example for the true Fisher (must be 1 for empirical).
        params: parameter-name pattern(s) (glob or regex, see
            :func:`~forgetkit.fisher.pergrad.select_parameters`); ``None``: all trainable.
        batch_size: examples per vectorized gradient call; memory grows as
            ``batch_size * mc_samples * P`` gradient entries.
        seed: seeds the label draws (per example, so results do not depend on batching).
        dtype: accumulation precision, ``torch.float32`` or ``torch.float64``.
        device: where accumulators and results live (default: the model's device); gradients
            are computed where the model is.
        per_example: how per-example gradients are computed
            (:mod:`forgetkit.fisher.pergrad`): ``"auto"`` (layer hooks, checked against the
            backward loop on one example of the first batch; vmap or the loop if they do not
            fit the model), ``"hooks"``, ``"vmap"`` or ``"loop"``. The ``"auto"`` check is paid
            by the first call on a model and remembered while the model is unchanged (same
            parameters, module tree and version counters); a weight written in place, e.g. by
            an optimizer step, brings it back.
        updates: name -> update; in the same pass, each example's diagonal proxy
            ``sum_j f_ij d_j^2`` of each update (``per_example_proxy``), so the proxy
            ``sum_j F_jj d_j^2`` gets an interval over examples.

    Returns:
        A :class:`DiagonalFisher` with ``values``, ``stderr`` and provenance.

    Raises:
        FisherError: empty data, an example without completion tokens, a bad argument, an
            FSDP-sharded model, or a non-finite gradient (naming the parameter and the example
            index; the run tests its result once at the end, and only then recomputes the
            gradients with the per-example check that names them).
    """
    model, encodings, chosen, device, pad, dtype, provenance = prepare_inputs(
        model, tokenizer, data, params=params, device=device, dtype=dtype, estimator=estimator,
        mc_samples=mc_samples, seed=seed)
    with evaluation_mode(model):
        stream = GradientStream(model, encodings, chosen, estimator=estimator,
                                mc_samples=mc_samples, batch_size=batch_size, seed=seed,
                                pad_token_id=pad, per_example=per_example,
                                check_finite=False)  # once at the end instead
        moments = RunningMoments({name: p.shape for name, p in chosen.items()}, dtype, device)
        weights = {key: {n: update.dense(n).to(device, dtype).square() for n in chosen
                         if n in update.entries} for key, update in (updates or {}).items()}
        proxy = {key: torch.zeros(len(encodings), dtype=torch.float64, device=device)
                 for key in weights}
        for block in stream:
            examples, draws = len(block.examples), block.draws
            index = torch.tensor(block.examples, device=device)
            for name, g in block.grads.items():
                squared = g.to(device=device, dtype=dtype)
                # (E * M, *shape); squared in place unless it is a broadcast view (vmap's
                # gradient of a parameter the log-likelihood does not use)
                squared = squared.square_() if squared.is_contiguous() else squared.square()
                if draws > 1:
                    squared = squared.view(examples, draws, *g.shape[1:]).mean(1)
                for key, w in weights.items():
                    if name in w:
                        proxy[key].index_add_(0, index, (squared * w[name]).reshape(examples, -1)
                                              .sum(1, dtype=torch.float64))
                moments.add(name, squared)  # (E, *shape): f_i, one per example
            moments.merge()
        if not moments.within(torch.finfo(torch.float32).max):
            _raise_non_finite(stream)
            _raise_overflow(moments.mean, dtype)
    moments.all_reduce()
    if len(encodings) < 2:
        logger.warning("diagonal Fisher from a single example: its standard error is infinite")
    logger.info("diagonal Fisher: %d examples x %d draws, %d parameters (%s)", len(encodings),
                stream.draws, sum(p.numel() for p in chosen.values()), estimator)
    return DiagonalFisher(values=moments.mean, stderr=moments.stderr(),
                          provenance=provenance,
                          per_example_proxy={k: all_reduce_sum(v).cpu().numpy()
                                             for k, v in proxy.items()})


def _raise_overflow(values: dict[str, Tensor], dtype: torch.dtype) -> None:
    """Finite gradients whose squares overflow the accumulation dtype (a float32 gradient
    beyond about 1.8e19): a :class:`FisherError` naming the parameter, not an infinite entry."""
    for name, value in values.items():
        if not bool(torch.isfinite(value).all()):
            raise FisherError(
                f"the Fisher entry of {name} overflows {str(dtype).removeprefix('torch.')}: its "
                f"per-example gradients are finite but their squares are not (largest gradient "
                f"entries above {math.sqrt(torch.finfo(dtype).max):.2g}); accumulate in "
                "dtype=torch.float64, or check the weights")


def _raise_non_finite(stream: GradientStream) -> None:
    """Recompute the gradients with the stream's per-example finiteness check, which names the
    first non-finite gradient's parameter and example.

    The run itself skips that check (a pass over every gradient): a non-finite gradient, or
    one whose float32 sum over a parameter overflows (what the check rejects), leaves a Fisher
    entry that is non-finite or beyond float32's range, which :func:`diagonal` tests once at
    the end before coming here. If the check passes (entries that large from finite
    gradients), the result stands as computed.
    """
    stream.check_finite = True
    for block in stream:
        for _ in block.grads.values():  # each tensor is checked when formed
            pass
