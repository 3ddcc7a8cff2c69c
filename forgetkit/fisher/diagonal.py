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
from typing import Any, ClassVar

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from forgetkit.data.records import Probe, Record
from forgetkit.fisher.delta import ParamDelta
from forgetkit.fisher.directions import AxisDirection, Eigenpairs, top_entries
from forgetkit.fisher.io import (
    Delta,
    FisherMatrix,
    Provenance,
    accumulation_dtype,
    prepare_inputs,
)
from forgetkit.fisher.pergrad import (
    Estimator,
    GradientStream,
    PerExample,
    all_reduce_sum,
    distributed_shard,
    evaluation_mode,
)
from forgetkit.models import Encoding

__all__ = ["DiagonalFisher", "RunningMoments", "accumulation_dtype", "diagonal"]

logger = logging.getLogger(__name__)


class RunningMoments:
    """Count, mean and sum of squared deviations of a stream of tensors (blocks and ranks
    merge with Chan et al.'s parallel form)."""

    def __init__(self, shape: torch.Size, dtype: torch.dtype, device: torch.device):
        self.count = 0
        self.mean = torch.zeros(shape, dtype=dtype, device=device)
        self.m2 = torch.zeros(shape, dtype=dtype, device=device)

    def add(self, batch: Tensor) -> None:
        """Add the samples ``batch`` (B, *shape); overwrites ``batch``.

        The block's own mean and squared deviations merge with the running ones (Chan et al.'s
        pairwise update), in place and without (B, *shape) temporaries: on large models this
        is memory-bound, and on small ones a per-sample update would be kernel-launch bound.
        """
        size = batch.shape[0]
        total = self.count + size
        block_mean = batch.mean(0)
        block_m2 = batch.sub_(block_mean).square_().sum(0)
        delta = block_mean.sub_(self.mean)  # mean_block - mean_old
        self.mean.add_(delta, alpha=size / total)
        # m2 += m2_block + delta^2 n_old n_block / n
        self.m2.add_(block_m2).addcmul_(delta, delta, value=self.count * size / total)
        self.count = total

    def all_reduce(self) -> None:
        """Merge the moments of every rank (no-op outside torch.distributed)."""
        if distributed_shard()[1] == 1:
            return
        count = torch.tensor([float(self.count)], dtype=self.mean.dtype, device=self.mean.device)
        dist.all_reduce(count)
        total = self.mean * self.count
        dist.all_reduce(total)
        mean = total / count.clamp(min=1)
        self.m2.add_((self.mean - mean).square_(), alpha=self.count)
        dist.all_reduce(self.m2)
        self.mean, self.count = mean, int(count.item())

    def stderr(self) -> Tensor:
        """``sqrt(sample variance / count)``; ``inf`` with fewer than two samples."""
        if self.count < 2:
            return torch.full_like(self.mean, math.inf)
        return (self.m2 / ((self.count - 1) * self.count)).sqrt()


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
    def rank(self) -> int:
        return self.size

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
        top = top_entries(self.values, self._rank_k(k))
        axes = tuple(AxisDirection.at(name, index, self.shapes[name])
                     for name, index in top)
        return Eigenpairs(top.values, axes)

    def coordinates(self, delta: Delta, k: int | None = None) -> Tensor:
        """(k,) float64: the entries of ``d`` at the k largest diagonal entries."""
        top = top_entries(self.values, self._rank_k(k))
        out = torch.zeros(top.values.shape, dtype=torch.float64)
        for name, v in self.values.items():
            positions, index = top.select(name)
            out[positions] = self._delta(delta, name, v.device).flatten()[index.to(v.device)].cpu()
        return out

    def project(self, delta: Delta, k: int | None = None) -> dict[str, Tensor]:
        """``d`` with every entry outside the k largest diagonal entries set to zero."""
        top = top_entries(self.values, self._rank_k(k))
        out = {}
        for name, v in self.values.items():
            keep = torch.zeros(v.numel(), dtype=torch.float64, device=v.device)
            keep[top.select(name)[1].to(v.device)] = 1.0
            out[name] = self._delta(delta, name, v.device) * keep.view(v.shape)
        return out

    def trace(self) -> float:
        return float(sum(v.double().sum() for v in self.values.values()))

    def _parameter_stats(self) -> dict[str, tuple[float, float]]:
        (top, _), = top_entries(self.values, 1)
        return {name: (float(v.double().sum()), float(name == top))
                for name, v in self.values.items()}

    def _tensors(self) -> dict[str, Tensor]:
        return {**{f"values/{n}": v for n, v in self.values.items()},
                **{f"stderr/{n}": v for n, v in self.stderr.items()}}

    def _extra(self) -> dict[str, Any]:
        return {}

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
            fit the model), ``"hooks"``, ``"vmap"`` or ``"loop"``.
        updates: name -> update; in the same pass, each example's diagonal proxy
            ``sum_j f_ij d_j^2`` of each update (``per_example_proxy``), so the proxy
            ``sum_j F_jj d_j^2`` gets an interval over examples.

    Returns:
        A :class:`DiagonalFisher` with ``values``, ``stderr`` and provenance.

    Raises:
        FisherError: empty data, an example without completion tokens, a bad argument, a
            non-finite gradient (naming the parameter and the example index), or an
            FSDP-sharded model.
    """
    inputs = prepare_inputs(model, tokenizer, data, params=params, device=device, dtype=dtype,
                            estimator=estimator, mc_samples=mc_samples, seed=seed)
    model, encodings, chosen = inputs.model, inputs.encodings, inputs.params
    device, dtype, provenance, pad = (inputs.device, inputs.dtype, inputs.provenance,
                                      inputs.pad_token_id)
    with evaluation_mode(model):
        stream = GradientStream(model, encodings, chosen, estimator=estimator,
                                mc_samples=mc_samples, batch_size=batch_size, seed=seed,
                                pad_token_id=pad, per_example=per_example)
        moments = {name: RunningMoments(p.shape, dtype, device) for name, p in chosen.items()}
        weights = {key: {n: update.dense(n).to(device, dtype).square() for n in chosen
                         if n in update.entries} for key, update in (updates or {}).items()}
        proxy = {key: torch.zeros(len(encodings), dtype=torch.float64, device=device)
                 for key in weights}
        for block in stream:
            examples, draws = len(block.examples), block.draws
            index = torch.tensor(block.examples, device=device)
            for name, g in block.grads.items():
                squared = g.to(device=device, dtype=dtype).square_()  # (E * M, *shape)
                if draws > 1:
                    squared = squared.view(examples, draws, *g.shape[1:]).mean(1)
                for key, w in weights.items():
                    if name in w:
                        proxy[key].index_add_(0, index, (squared * w[name]).flatten(1)
                                              .sum(1, dtype=torch.float64))
                moments[name].add(squared)  # (E, *shape): f_i, one per example
    for m in moments.values():
        m.all_reduce()
    if len(encodings) < 2:
        logger.warning("diagonal Fisher from a single example: its standard error is infinite")
    logger.info("diagonal Fisher: %d examples x %d draws, %d parameters (%s)", len(encodings),
                stream.draws, sum(p.numel() for p in chosen.values()), estimator)
    return DiagonalFisher(values={n: m.mean for n, m in moments.items()},
                          stderr={n: m.stderr() for n, m in moments.items()},
                          provenance=provenance,
                          per_example_proxy={k: all_reduce_sum(v).cpu().numpy()
                                             for k, v in proxy.items()})
