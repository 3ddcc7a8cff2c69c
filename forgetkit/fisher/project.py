"""Projection of a fine-tuning update onto the Fisher-sensitive directions of the base model.

For an update ``d`` (:class:`~forgetkit.fisher.delta.ParamDelta`) and a Fisher ``F`` of the base
model on probe data, any :class:`~forgetkit.fisher.io.FisherMatrix`, with ``u_j`` and ``λ_j``
its k leading eigenpairs (``F.top(k)``):

- ``coefficients[j] = u_j . d`` (``F.coordinates(d, k)``; for the diagonal representation the
  eigenvectors are coordinate axes, so these are the entries of ``d`` at the k largest
  ``F_jj``; for the Kronecker-factored one they are ``(Q_G' dW Q_A)[p, q]`` on one layer);
- ``captured_energy[j-1] = sum_{i<=j} c_i^2 / ||d||^2``, the share of the update in the top-j
  directions, beside ``random_baseline[j-1] = j / P``, the expected share of a random direction;
- ``fisher_displacement = d' F d`` *of the representation* (``F.quad_form(d)``), named by
  ``label`` (``F.quad_form_label``): for a low-rank Fisher the truncated
  ``sum_j λ_j c_j^2``, a lower bound of the exact ``d' F d`` (exact when the directions are
  exact eigenvectors, as from ``low_rank(method="exact")``, and an estimate of that bound
  otherwise); for a Kronecker-factored Fisher its block-diagonal, per-layer factored
  approximation; for a diagonal Fisher the proxy ``sum_j F_jj d_j^2``, which drops every
  correlation between parameters and is neither a bound nor an estimate of ``d' F d``;
- ``top_displacement = sum_{j<=k} λ_j c_j^2``, the part of it in the k leading directions
  (all of it for a low-rank Fisher projected on all its directions);
- ``predicted_kl`` = half of ``fisher_displacement``. ``predicted_kl_valid`` is therefore always
  false here: the exact quadratic form and its predicted KL come from
  :func:`forgetkit.fisher.displacement`.

All norms are over the parameters the Fisher covers. Everything is also given per module (the
update restricted to the module's parameters). Only the Fisher's interface is used, so every
representation gives the same fields.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from forgetkit.fisher.delta import ParamDelta, module_groups
from forgetkit.fisher.io import FisherMatrix

__all__ = ["DEFAULT_DIRECTIONS", "Projection", "leading_directions", "project"]

DEFAULT_DIRECTIONS = 16


@dataclass
class Projection:
    """What :func:`project` measures (all float64 numbers, JSON-ready via :meth:`to_dict`)."""

    kind: str
    estimator: str
    rank: int
    parameters: int
    delta_sq_norm: float
    coefficients: list[float]
    eigenvalues: list[float]
    captured_energy: list[float]
    random_baseline: list[float]
    fisher_displacement: float
    predicted_kl: float
    predicted_kl_valid: bool
    label: str = ""
    top_displacement: float = 0.0
    per_module: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def leading_directions(fisher: FisherMatrix, rank: int | None) -> int:
    """The number of leading directions to use: ``rank``, checked against ``fisher.rank``, or
    ``min(DEFAULT_DIRECTIONS, fisher.rank)`` for ``None``.

    Raises:
        ValueError: ``rank`` not an integer between 1 and ``fisher.rank``.
    """
    return min(DEFAULT_DIRECTIONS, fisher.rank) if rank is None else fisher._rank_k(rank, "rank")


def _module_rows(delta: ParamDelta, fisher: FisherMatrix, k: int) -> list[dict[str, Any]]:
    """One row per module of the covered parameters (in their order): the update restricted
    to the module, through the same interface calls as the whole update."""
    rows = []
    for module, names in module_groups(fisher.shapes).items():
        own = ParamDelta({n: delta.entries[n] for n in names if n in delta.entries})
        sq_norm = own.sq_norm()
        if own.entries:
            displacement = fisher.quad_form(own)
            coefficients = fisher.coordinates(own, k)
            energy = float(coefficients.square().sum()) / sq_norm if sq_norm > 0 else 0.0
        else:
            displacement = energy = 0.0
        rows.append({"module": module,
                     "parameters": sum(fisher.shapes[n].numel() for n in names),
                     "delta_sq_norm": sq_norm, "fisher_displacement": displacement,
                     "predicted_kl": displacement / 2, "captured_energy": energy})
    return rows


def project(delta: ParamDelta, fisher: FisherMatrix, rank: int | None = None) -> Projection:
    """Project ``delta`` onto the leading directions of ``fisher`` (any representation).

    Args:
        delta: the update, from :func:`forgetkit.fisher.delta` (entries for parameters the
            Fisher does not cover are ignored; covered parameters it lacks are no update).
        fisher: the base model's Fisher on probe data.
        rank: number of leading directions k of the energy curve and the coefficients
            (default ``min(16, fisher.rank)``: every direction of a low-rank Fisher of rank up
            to 16).

    Returns:
        A :class:`Projection`.

    Raises:
        ValueError: the update and the Fisher share no parameter, or ``rank`` is not between 1
            and ``fisher.rank``.
    """
    covered = list(fisher.shapes)
    shared = [n for n in covered if n in delta.entries]
    if not shared:
        raise ValueError(
            "the update and the Fisher share no parameter: the Fisher covers e.g. "
            f"{covered[:2]}, the update e.g. {list(delta.entries)[:2]}")
    k = leading_directions(fisher, rank)
    coefficients = fisher.coordinates(delta, k)  # (k,) float64
    eigenvalues = fisher.top(k).eigenvalues.double().cpu()  # (k,) descending
    displacement = fisher.quad_form(delta)
    sq_norm = delta.sq_norm(shared)
    parameters = fisher.size
    energy = (coefficients.square().cumsum(0) / sq_norm if sq_norm > 0 else
              torch.zeros(k, dtype=torch.float64))
    return Projection(
        kind=fisher.kind, estimator=fisher.provenance.estimator, rank=k, parameters=parameters,
        delta_sq_norm=sq_norm, coefficients=coefficients.tolist(),
        eigenvalues=eigenvalues.tolist(), captured_energy=energy.tolist(),
        random_baseline=[(j + 1) / parameters for j in range(k)],
        fisher_displacement=displacement, predicted_kl=displacement / 2,
        predicted_kl_valid=False, label=fisher.quad_form_label,
        top_displacement=float((eigenvalues * coefficients.square()).sum()),
        per_module=_module_rows(delta, fisher, k))
