"""Low-rank Fisher information: the top-k eigenpairs of ``F = (1/N) G G'``.

``G`` is the P x (N·M) matrix whose columns are the per-example gradients
``g_ik / sqrt(M)`` (:mod:`forgetkit.fisher.pergrad`; M = ``mc_samples`` label draws for the
true Fisher, 1 for the empirical one), so ``F = (1/N) sum_i (1/M) sum_k g_ik g_ik'``. No P x P
matrix is ever formed:

* ``"gram"``: keep G, eigendecompose the (N·M) x (N·M) Gram matrix ``(1/N) G'G = V Λ V'``; the
  directions are ``G V Λ^(-1/2) / sqrt(N)``. Memory O(N·M·P); exact up to rounding.
* ``"randomized"``: two streaming passes over the data (Halko, Martinsson & Tropp 2011,
  Alg. 4.1 + 5.3): ``Y = F Ω`` for a Gaussian P x l sketch Ω (l = k + ``oversample``), an
  orthonormal basis ``Q`` of Y, then the l x l matrix ``Q' F Q = W Λ W'``; the directions are
  ``Q W``. Each of ``power_iterations`` adds a pass (``Y <- F Q``) that sharpens a slowly
  decaying spectrum. Memory O(l·P): 6·P·l bytes at the peak in float32 (Ω is kept in
  bfloat16: its entries only need to be random). Exact (up to rounding) when l >= N·M, since Y
  then spans the whole range of F; otherwise the accuracy depends on how fast the spectrum
  decays past k (Halko et al., Thm. 10.6).

Directions are orthonormal across all covered parameters jointly, each signed so that its
largest-magnitude entry is positive.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from forgetkit.data.records import Probe, Record
from forgetkit.fisher.delta import LoraFactor
from forgetkit.fisher.directions import DenseDirection, Eigenpairs
from forgetkit.fisher.exact import FisherOperator
from forgetkit.fisher.io import Delta, FisherMatrix, Provenance, make_provenance, prepare_inputs
from forgetkit.fisher.pergrad import (
    Estimator,
    FisherError,
    GradientStream,
    PerExample,
    all_reduce_sum,
    derived_seed,
    distributed_shard,
    evaluation_mode,
)
from forgetkit.models import Encoding

__all__ = ["LowRankFisher", "exact_low_rank", "gram_eigenpairs", "low_rank",
           "randomized_eigenpairs"]

logger = logging.getLogger(__name__)
Method = Literal["auto", "gram", "randomized", "exact"]


def _complete(directions: Tensor, count: int, generator: torch.Generator) -> Tensor:
    """``count`` unit vectors orthogonal to the rows of ``directions`` (r, P) and each other."""
    extra = torch.randn(count, directions.shape[1], generator=generator,
                        dtype=directions.dtype, device=directions.device)
    for _ in range(2):  # twice is enough for orthogonality to working precision
        extra -= (extra @ directions.T) @ directions
    return torch.linalg.qr(extra.T).Q.T


def gram_eigenpairs(rows: Tensor, n: int, rank: int, generator: torch.Generator
                    ) -> tuple[Tensor, Tensor]:
    """Top eigenpairs of ``(1/n) G G'`` through the Gram matrix of its columns.

    Args:
        rows: (R, P) the columns of G as rows (R >= rank).
        n: the normalizer N.
        rank: k.
        generator: completes the basis when fewer than k eigenvalues are nonzero (any unit
            vector orthogonal to the range of G is an eigenvector of eigenvalue 0).

    Returns:
        ``(eigenvalues (k,) descending, float64; directions (k, P) orthonormal, rows' dtype)``.
    """
    gram = (rows @ rows.T).double() / n  # (R, R)
    values, vectors = torch.linalg.eigh(gram)
    values, vectors = values.flip(0)[:rank], vectors.flip(1)[:, :rank]
    floor = float(values[0].clamp(min=0)) * rows.shape[0] * torch.finfo(rows.dtype).eps
    kept = int((values > floor).sum())
    values[kept:] = 0.0
    directions = (vectors[:, :kept].T.to(rows.dtype) @ rows)  # (kept, P)
    directions /= (n * values[:kept]).sqrt().to(rows.dtype)[:, None]
    if kept < rank:
        logger.warning("low-rank Fisher: only %d of %d eigenvalues are nonzero; the other "
                       "directions are an arbitrary orthonormal completion", kept, rank)
        directions = torch.cat([directions, _complete(directions, rank - kept, generator)])
    return values, directions


Blocks = Callable[[], Iterator[tuple[list[Tensor], int]]]


def randomized_eigenpairs(blocks: Blocks, n: int, rank: int, sketch: int,
                          power_iterations: int, size: int, generator: torch.Generator,
                          dtype: torch.dtype, device: torch.device
                          ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Top eigenpairs of ``F = (1/n) G G'`` from streaming passes over the gradients.

    Args:
        blocks: each call starts a pass over this process's shard and yields
            ``(pieces, draws)``: the gradient rows of a few examples split by parameter,
            ``pieces[p]`` (R_b, P_p) in the parameters' order, and M; the columns of G are the
            rows divided by sqrt(M). Under torch.distributed the sums run over all ranks.
        n: the normalizer N.
        rank: k.
        sketch: l >= k, columns of the random test matrix.
        power_iterations: extra passes ``Y <- F Q``.
        size: P.
        generator: draws the test matrix (the same on every rank).
        dtype, device: of the sketch and basis.

    Returns:
        ``(eigenvalues (k,) descending float64, basis Q (P, l) orthonormal, W (l, k),
        residuals (k,))``; the directions are the columns of ``Q W`` and
        ``residuals[j] = ||F u_j - lambda_j u_j||`` (one more pass) bounds the error of
        eigenvalue j (a posterior accuracy estimate). Peak memory: the test matrix (bfloat16, its
        entries only need to be random) plus Y, 6·P·l bytes in float32; each power iteration
        needs 2·P·l·itemsize.
    """
    def times_fisher(x: Tensor) -> Tensor:  # (P, l) -> F x, one pass
        out = torch.zeros(size, x.shape[1], dtype=dtype, device=device)
        for pieces, draws in blocks():
            bounds = _bounds(pieces)
            if x.dtype == torch.bfloat16:  # the test matrix: see _sketch_coefficients
                z = _sketch_coefficients(pieces, bounds, x).to(dtype)
            else:
                z = sum(g @ x[a:b] for g, (a, b) in zip(pieces, bounds, strict=True))
            for g, (a, b) in zip(pieces, bounds, strict=True):
                out[a:b].addmm_(g.T, z, alpha=1.0 / (n * draws))
        return all_reduce_sum(out)

    omega = torch.empty(size, sketch, dtype=torch.bfloat16, device=device)
    for a in range(0, size, _CHUNK):  # in slices: no float32 P x l temporary
        omega[a : a + _CHUNK] = torch.randn(min(_CHUNK, size - a), sketch, generator=generator,
                                            dtype=dtype, device=device)
    basis = _orthonormalize_(times_fisher(omega))
    del omega
    for _ in range(power_iterations):
        basis = _orthonormalize_(times_fisher(basis))
    small = torch.zeros(sketch, sketch, dtype=torch.float64, device=device)
    for pieces, draws in blocks():
        projected = sum(g @ basis[a:b] for g, (a, b) in zip(pieces, _bounds(pieces), strict=True))
        small += projected.double().T @ projected.double() / (n * draws)  # (l, l)
    values, vectors = torch.linalg.eigh(all_reduce_sum(small))
    values, vectors = values.flip(0)[:rank].clamp(min=0), vectors.flip(1)[:, :rank]
    mixing = vectors.to(dtype)
    directions = basis @ mixing  # (P, k)
    residual = times_fisher(directions) - directions * values.to(dtype)[None]
    return values, basis, mixing, residual.double().norm(dim=0)


_CHUNK = 1 << 20  # rows of a P x l matrix handled at a time


def _sketch_coefficients(pieces: list[Tensor], bounds: list[tuple[int, int]], omega: Tensor
                         ) -> Tensor:
    """(R_b, l) ``G_b' Ω`` in bfloat16 products with float32 sums.

    Only the first pass multiplies by Ω, and there precision does not matter: whatever the
    rounding, ``Y = G (G'Ω + E)`` lies in the range of G and mixes its columns with random
    weights, which is all the range finder needs (and exactly what makes it exact when
    l >= N·M). Reading Ω (P x l) once per block in bfloat16 costs half of float32, and a cast
    of Ω per block would cost several times the product.
    """
    out = torch.zeros(pieces[0].shape[0], omega.shape[1], dtype=torch.float32,
                      device=omega.device)
    for g, (a, b) in zip(pieces, bounds, strict=True):
        out += (g.to(torch.bfloat16) @ omega[a:b]).float()
    return out


def _bounds(pieces: list[Tensor]) -> list[tuple[int, int]]:
    """Row ranges of each piece's parameters in the flat P axis."""
    ends = list(accumulate(g.shape[1] for g in pieces))
    return list(zip([0, *ends[:-1]], ends, strict=True))


def _orthonormalize_(y: Tensor) -> Tensor:
    """Overwrite ``y`` (P, l) with an orthonormal basis of its columns (one-level TSQR:
    Householder QR of row slices, then of their stacked R factors), in O(l^2) extra memory
    per slice."""
    rows, width = y.shape
    step = max(_CHUNK, width)
    starts = list(range(0, rows, step))
    if len(starts) > 1 and rows - starts[-1] < width:  # every slice needs >= l rows
        starts.pop()
    slices = list(zip(starts, [*starts[1:], rows], strict=True))
    factors = []
    for a, b in slices:
        q, r = torch.linalg.qr(y[a:b])
        y[a:b] = q
        factors.append(r)
    outer = torch.linalg.qr(torch.cat(factors)).Q  # (sum of R rows, l)
    for (a, b), block in zip(slices, outer.split([r.shape[0] for r in factors]), strict=True):
        y[a:b] = y[a:b] @ block
    return y


def _to_parameters(directions_of: Callable[[int, int], Tensor], chosen: dict[str, Tensor],
                   rank: int) -> dict[str, Tensor]:
    """name -> (k, *shape) from ``directions_of(a, b)`` (k, b - a), the flat directions'
    columns ``a:b``; each direction is signed so that its largest-magnitude entry is positive."""
    out, start = {}, 0
    for name, p in chosen.items():
        out[name] = directions_of(start, start + p.numel()).reshape(rank, *p.shape).contiguous()
        start += p.numel()
    flat = [u.view(rank, -1) for u in out.values()]
    # (params, k): each direction's largest-magnitude entry in each parameter
    peaks = torch.stack([u.gather(1, u.abs().argmax(1, keepdim=True))[:, 0] for u in flat])
    sign = torch.where(peaks.gather(0, peaks.abs().argmax(0, keepdim=True))[0] < 0, -1.0, 1.0)
    for u in flat:
        u.mul_(sign[:, None])
    return out


def _all_gather_rows(rows: Tensor) -> Tensor:
    """(R_local, P) on every rank -> (R_total, P), rank-major (identity in one process)."""
    world = distributed_shard()[1]
    if world == 1:
        return rows
    count = torch.tensor([rows.shape[0]], device=rows.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    width = int(max(c.item() for c in counts))
    padded = torch.zeros(width, rows.shape[1], dtype=rows.dtype, device=rows.device)
    padded[: rows.shape[0]] = rows
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return torch.cat([g[: int(c.item())] for g, c in zip(gathered, counts, strict=True)])


@dataclass
class LowRankFisher(FisherMatrix):
    """The rank-k approximation ``sum_j λ_j u_j u_j'`` of the Fisher on a set of parameters.

    Attributes:
        eigenvalues: (k,) descending, float64.
        directions: name -> (k, *shape); the k directions are orthonormal across all covered
            parameters jointly.
        provenance: model, data, estimator, N, ... (:class:`Provenance`).
        method: ``"gram"``, ``"randomized"`` or ``"exact"`` (Lanczos on exact Fisher-vector
            products, :func:`forgetkit.fisher.exact.exact_low_rank`).
        sketch: columns of the randomized sketch (0 otherwise).
        power_iterations: of the randomized method.
        residuals: ``||F u_j - lambda_j u_j||`` for each direction (empty for gram, which is
            exact for its gradients): a posterior bound on each eigenvalue's error.
    """

    kind: ClassVar[str] = "low_rank"
    eigenvalues: Tensor
    directions: dict[str, Tensor]
    provenance: Provenance
    method: str = "gram"
    sketch: int = 0
    power_iterations: int = 0
    residuals: list[float] = field(default_factory=list)

    @property
    def shapes(self) -> dict[str, torch.Size]:
        return {name: u.shape[1:] for name, u in self.directions.items()}

    @property
    def rank(self) -> int:
        return int(self.eigenvalues.shape[0])

    def coordinates(self, delta: Delta, k: int | None = None) -> Tensor:
        """(k,) float64: ``u_j . d`` for the first k directions (a LoRA update is never merged:
        ``u . (s B A) = s tr(B' u A')``)."""
        k = self._rank_k(k)
        total = torch.zeros(k, dtype=torch.float64)
        for name, u in self.directions.items():
            value = self._entry(delta, name)
            if value is None:
                continue
            u = u[:k].double()
            if isinstance(value, LoraFactor):
                factor = LoraFactor(value.B.to(u.device, torch.float64),
                                    value.A.to(u.device, torch.float64), value.scale)
                oriented = u if factor.shape == u.shape[1:] else u.transpose(-2, -1)
                total += factor.dot(oriented).cpu()
            else:
                total += (u.reshape(len(u), -1) @ self._delta(delta, name, u.device).flatten()).cpu()
        return total

    def quad_form(self, delta: Delta) -> float:
        """``sum_j λ_j (u_j . d)^2`` (float64)."""
        coordinates = self.coordinates(delta)
        return float((self.eigenvalues.cpu() * coordinates.square()).sum())

    def top(self, k: int) -> Eigenpairs:
        """The first k eigenpairs (views of :attr:`directions`)."""
        k = self._rank_k(k)
        return Eigenpairs(self.eigenvalues[:k].double().cpu(), tuple(
            DenseDirection({name: u[j] for name, u in self.directions.items()})
            for j in range(k)))

    def project(self, delta: Delta, k: int | None = None) -> dict[str, Tensor]:
        """``sum_j (u_j . d) u_j`` over the first k directions."""
        coordinates = self.coordinates(delta, k)
        return {name: torch.tensordot(coordinates.to(u.device), u[: coordinates.numel()].double(),
                                      dims=1)
                for name, u in self.directions.items()}

    def trace(self) -> float:
        return float(self.eigenvalues.sum())

    @property
    def quad_form_label(self) -> str:
        return f"top-{self.rank} truncation: a lower bound of d'Fd"

    @property
    def exact_eigendirections(self) -> bool:
        return self.method == "exact"  # Lanczos on exact products; the others: of an estimate

    def details(self) -> dict[str, Any]:
        return self._extra()

    def _parameter_stats(self) -> dict[str, tuple[float, float]]:
        stats = {}
        for name, u in self.directions.items():
            energy = u.reshape(len(u), -1).double().square().sum(1).cpu()  # (k,)
            stats[name] = (float(energy @ self.eigenvalues.cpu()), float(energy[0]))
        return stats

    def _tensors(self) -> dict[str, Tensor]:
        return {"eigenvalues": self.eigenvalues,
                **{f"directions/{n}": u for n, u in self.directions.items()}}

    def _extra(self) -> dict[str, Any]:
        return {"method": self.method, "sketch": self.sketch,
                "power_iterations": self.power_iterations, "residuals": list(self.residuals)}

    @classmethod
    def _from_saved(cls, tensors, shapes, provenance, extra) -> LowRankFisher:
        return cls(eigenvalues=tensors["eigenvalues"],
                   directions={n: tensors[f"directions/{n}"] for n in shapes},
                   provenance=provenance, **extra)


def low_rank(model: torch.nn.Module, tokenizer, data: Sequence[Record | Probe | Encoding],
             rank: int, estimator: Estimator = "true", mc_samples: int = 1,
             params: str | Sequence[str] | None = None, method: Method = "auto",
             oversample: int = 10, power_iterations: int = 2, batch_size: int = 8,
             seed: int = 0, dtype: torch.dtype = torch.float32,
             device: str | torch.device | None = None, per_example: PerExample = "auto",
             gram_max_bytes: int = 2**30) -> LowRankFisher:
    """Top-``rank`` eigenpairs of the Fisher of a causal LM on ``data``.

    Args:
        model, tokenizer, data, estimator, mc_samples, params, batch_size, seed, dtype,
            device, per_example: as for :func:`forgetkit.fisher.diagonal`.
        rank: k, at most N·M (the rank of F can be no larger).
        method: ``"gram"``, ``"randomized"``, ``"exact"`` or ``"auto"`` (gram when G
            (N·M x P in ``dtype``) fits in ``gram_max_bytes``, else randomized). ``"exact"``
            draws no labels: Lanczos on exact Fisher-vector products
            (:func:`forgetkit.fisher.exact.exact_low_rank`; ``mc_samples``, ``dtype``,
            ``per_example`` and ``device`` do not apply, ``seed`` only picks the start vector).
        oversample: extra sketch columns of the randomized method (l = k + oversample).
        power_iterations: extra passes of the randomized method.
        gram_max_bytes: memory allowed for G under ``method="auto"``.

    Returns:
        A :class:`LowRankFisher`.

    Raises:
        FisherError: as :func:`~forgetkit.fisher.diagonal`; also rank < 1, rank > N·M or
            rank > P, an unknown method, negative oversample or power_iterations.
    """
    if method == "exact":
        return exact_low_rank(model, tokenizer, data, rank, estimator=estimator, params=params,
                              batch_size=batch_size, seed=seed, residuals=False)
    model, encodings, chosen, device, pad, dtype, provenance = prepare_inputs(
        model, tokenizer, data, params=params, device=device, dtype=dtype, estimator=estimator,
        mc_samples=mc_samples, seed=seed)
    size = sum(p.numel() for p in chosen.values())
    draws = mc_samples if estimator == "true" else 1
    columns = len(encodings) * draws
    if not 1 <= rank <= min(columns, size):
        raise FisherError(f"rank={rank} must be between 1 and min(N*mc_samples, P) = "
                          f"min({columns}, {size}): a Fisher from {columns} gradients has at "
                          "most that rank")
    if oversample < 0 or power_iterations < 0:
        raise FisherError("oversample and power_iterations must be >= 0")
    if method == "auto":
        method = "gram" if columns * size * dtype.itemsize <= gram_max_bytes else "randomized"
    if method not in ("gram", "randomized"):
        raise FisherError(f"method must be 'auto', 'gram', 'randomized' or 'exact', got "
                          f"{method!r}")
    generator = torch.Generator(device=device).manual_seed(derived_seed(seed, "low-rank"))
    sketch = min(rank + oversample, size) if method == "randomized" else 0
    with evaluation_mode(model):
        stream = GradientStream(model, encodings, chosen, estimator=estimator,
                                mc_samples=mc_samples, batch_size=batch_size, seed=seed,
                                pad_token_id=pad, per_example=per_example)

        def blocks() -> Iterator[tuple[list[Tensor], int]]:  # one pass over the shard
            for block in stream:
                pieces = [g.reshape(len(g), -1).to(device=device, dtype=dtype)
                          for g in map(block.grads.__getitem__, chosen)]
                yield pieces, block.draws

        if method == "gram":
            local = [torch.cat(pieces, 1).mul_(draws**-0.5) for pieces, draws in blocks()]
            stacked = torch.cat(local) if local else torch.zeros(0, size, dtype=dtype,
                                                                   device=device)
            del local
            residuals = torch.zeros(0)
            values, flat = gram_eigenpairs(_all_gather_rows(stacked), len(encodings), rank,
                                           generator)
            directions = _to_parameters(lambda a, b: flat[:, a:b], chosen, rank)
        else:
            values, basis, mixing, residuals = randomized_eigenpairs(
                blocks, len(encodings), rank, sketch, power_iterations, size, generator, dtype,
                device)
            directions = _to_parameters(lambda a, b: (basis[a:b] @ mixing).T, chosen, rank)
    logger.info("low-rank Fisher (%s): rank %d of %d gradients, %d parameters, top eigenvalue "
                "%.4g", method, rank, columns, size, float(values[0]))
    return LowRankFisher(eigenvalues=values, directions=directions, provenance=provenance,
                         method=method, sketch=sketch, power_iterations=power_iterations,
                         residuals=residuals.tolist())


def exact_low_rank(model: torch.nn.Module, tokenizer, data: Sequence, rank: int, *,
                   estimator: Estimator = "true", params: str | Sequence[str] | None = None,
                   batch_size: int = 16, seed: int = 0, tol: float = 1e-3,
                   mode: str = "auto", residuals: bool = True):
    """Top-``rank`` eigenpairs of the exact Fisher by Lanczos on :class:`FisherOperator`.

    No label is drawn, so the result depends on ``seed`` only through Lanczos' start vector,
    i.e. up to ``tol``.

    Args:
        model, tokenizer, data, estimator, params, batch_size, mode: as
            :class:`~forgetkit.fisher.exact.FisherOperator`.
        rank: k, at most P - 1.
        seed: of the start vector.
        tol: relative accuracy of the eigenvalues (:func:`scipy.sparse.linalg.eigsh`; 0 is
            machine precision).
        residuals: also compute ``||F u_j - lambda_j u_j||`` (k more products).

    Returns:
        A :class:`LowRankFisher` with ``method="exact"`` and
        provenance ``mc_samples=0`` (no label draws); ``residuals`` holds
        ``||F u_j - lambda_j u_j||``, a bound on each eigenvalue's error (empty unless asked).

    Raises:
        FisherError: rank outside [1, P - 1], or as :class:`FisherOperator`.
    """
    from scipy.sparse.linalg import eigsh

    operator = FisherOperator(model, tokenizer, data, estimator=estimator,
                              batch_size=batch_size, params=params, mode=mode)
    size = operator.size
    if not 1 <= rank < size:
        raise FisherError(f"rank={rank} must be between 1 and P - 1 = {size - 1}")
    start = np.random.default_rng(seed).standard_normal(size)
    linear = operator.as_linear_operator()
    values, vectors = eigsh(linear, k=rank, which="LA", v0=start, tol=tol)
    order = np.argsort(values)[::-1]
    values, vectors = values[order].clip(min=0.0), vectors[:, order]
    errors = [float(np.linalg.norm(linear.matvec(vectors[:, j]) - values[j] * vectors[:, j]))
              for j in range(rank)] if residuals else []
    dtype = next(iter(operator.params.values())).dtype
    flat = torch.from_numpy(vectors.T.copy()).to(torch.float64)  # (k, P)
    directions = _to_parameters(lambda a, b: flat[:, a:b], dict(operator.params), rank)
    directions = {n: u.to(dtype=torch.promote_types(dtype, torch.float32)) for n, u in
                  directions.items()}
    provenance = make_provenance(operator.model, operator.encodings, estimator=estimator,
                                 mc_samples=0, seed=seed, params=params, dtype=torch.float64)
    logger.info("exact low-rank Fisher: rank %d, %d parameters, %d Fisher-vector products, "
                "top eigenvalue %.4g", rank, size, operator.products_done, float(values[0]))
    return LowRankFisher(eigenvalues=torch.from_numpy(values.copy()), directions=directions,
                         provenance=provenance, method="exact", residuals=errors)
