"""Projection of a fine-tuning update onto the Fisher-sensitive directions of the base model.

For an update ``d`` (:class:`~forgetkit.fisher.delta.ParamDelta`) and a Fisher ``F`` of the base
model on probe data:

- ``coefficients[j] = u_j . d`` on the Fisher's top directions (for the diagonal
  representation its eigenvectors are coordinate axes: the k largest entries);
- ``captured_energy[j-1] = sum_{i<=j} c_i^2 / ||d||^2``, the share of the update in the top-j
  directions, beside ``random_baseline[j-1] = j / P``, the expected share of a random direction;
- ``fisher_displacement = d' F d`` *of the representation*: for a low-rank Fisher the
  truncated ``sum_j lambda_j c_j^2``, a lower bound of the exact ``d' F d`` (exact when the
  directions are exact eigenvectors, as from ``low_rank(method="exact")``, and an estimate
  of that bound otherwise); for a diagonal Fisher the proxy ``sum_j F_jj d_j^2``, which drops
  every correlation between parameters and is neither a bound nor an estimate of ``d' F d``;
- ``predicted_kl`` = half of it. ``predicted_kl_valid`` is therefore always false here: the
  exact quadratic form and its predicted KL come from :func:`forgetkit.fisher.displacement`.

All norms are over the parameters the Fisher covers. Everything is also given per module.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from forgetkit.fisher.delta import LoraFactor, ParamDelta

__all__ = ["Projection", "project"]


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
    per_module: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _module(name: str) -> str:
    return name.rpartition(".")[0] or name


def _diagonal_terms(delta: ParamDelta, fisher, name: str) -> tuple[float, Tensor]:
    """``(sum_i F_ii d_i^2, d)`` for one parameter under a diagonal Fisher."""
    values = fisher.values[name].double()
    d = delta.dense(name).to(values.device, torch.float64) if name in delta.entries else \
        torch.zeros_like(values)
    return float((values * d.square()).sum()), d


Tensor = torch.Tensor


def _low_rank_coordinates(delta: ParamDelta, fisher) -> dict[str, Tensor]:
    """name -> (k,) contributions ``u_j[name] . d[name]`` (LoRA factors never expanded)."""
    out = {}
    for name, u in fisher.directions.items():
        if name not in delta.entries:
            out[name] = torch.zeros(u.shape[0], dtype=torch.float64)
            continue
        value = delta.entries[name]
        if isinstance(value, LoraFactor):
            value = LoraFactor(value.B.to(u.device, torch.float64),
                               value.A.to(u.device, torch.float64), value.scale)
            out[name] = value.dot(u.double()).cpu()
        else:
            out[name] = delta.dot(name, u.double().to(value.device)).double().cpu()
    return out


def _project_low_rank(delta: ParamDelta, fisher):
    per_param = _low_rank_coordinates(delta, fisher)
    coefficients = sum(per_param.values())
    eigenvalues = fisher.eigenvalues.double().cpu()
    modules: dict[str, dict[str, Any]] = {}
    for name, c in per_param.items():
        row = modules.setdefault(_module(name), {"module": _module(name), "coefficients": 0.0,
                                                 "delta_sq_norm": 0.0, "parameters": 0})
        row["coefficients"] = row["coefficients"] + c
        row["delta_sq_norm"] += delta.sq_norm([name]) if name in delta.entries else 0.0
        row["parameters"] += fisher.directions[name][0].numel()
    rows = []
    for row in modules.values():
        c = row.pop("coefficients")
        own = float((eigenvalues * c.square()).sum())
        sq = row["delta_sq_norm"]
        rows.append({**row, "fisher_displacement": own, "predicted_kl": own / 2,
                     "captured_energy": float(c.square().sum()) / sq if sq > 0 else 0.0})
    displacement = float((eigenvalues * coefficients.square()).sum())
    return coefficients, eigenvalues, displacement, rows


def _project_diagonal(delta: ParamDelta, fisher, rank: int):
    flat_f, flat_d, rows = [], [], []
    for name in fisher.values:
        own, d = _diagonal_terms(delta, fisher, name)
        flat_f.append(fisher.values[name].double().flatten().cpu())
        flat_d.append(d.flatten().cpu())
        rows.append({"module": _module(name), "parameters": d.numel(),
                     "delta_sq_norm": float(d.square().sum()), "fisher_displacement": own})
    f, d = torch.cat(flat_f), torch.cat(flat_d)
    top = torch.topk(f, min(rank, f.numel())).indices
    merged: dict[str, dict[str, Any]] = {}
    for row in rows:
        m = merged.setdefault(row["module"], {"module": row["module"], "parameters": 0,
                                              "delta_sq_norm": 0.0, "fisher_displacement": 0.0})
        for key in ("parameters", "delta_sq_norm", "fisher_displacement"):
            m[key] += row[key]
    for m in merged.values():
        m["predicted_kl"] = m["fisher_displacement"] / 2
    return d[top], f[top], float((f * d.square()).sum()), list(merged.values())


def project(delta: ParamDelta, fisher, rank: int | None = None) -> Projection:
    """Project ``delta`` onto ``fisher`` (a ``LowRankFisher`` or ``DiagonalFisher``).

    Args:
        delta: the update, from :func:`forgetkit.fisher.delta`.
        fisher: the base model's Fisher on probe data.
        rank: number of top directions for the energy curve of a diagonal Fisher (default 16);
            a low-rank Fisher uses all of its directions.

    Raises:
        ValueError: the update and the Fisher share no parameter.
    """
    covered = list(fisher.shapes)
    shared = [n for n in covered if n in delta.entries]
    if not shared:
        raise ValueError(
            "the update and the Fisher share no parameter: the Fisher covers e.g. "
            f"{covered[:2]}, the update e.g. {list(delta.entries)[:2]}")
    if fisher.kind == "low_rank":
        coefficients, eigenvalues, displacement, rows = _project_low_rank(delta, fisher)
    else:
        coefficients, eigenvalues, displacement, rows = _project_diagonal(delta, fisher,
                                                                          rank or 16)
    sq_norm = delta.sq_norm(shared)
    parameters = sum(fisher.shapes[n].numel() for n in covered)
    k = coefficients.numel()
    energy = (coefficients.square().cumsum(0) / sq_norm) if sq_norm > 0 else torch.zeros(k)
    estimator = fisher.provenance.estimator
    return Projection(
        kind=fisher.kind, estimator=estimator, rank=k, parameters=parameters,
        delta_sq_norm=sq_norm, coefficients=coefficients.tolist(),
        eigenvalues=eigenvalues.tolist(), captured_energy=energy.tolist(),
        random_baseline=[(j + 1) / parameters for j in range(k)],
        fisher_displacement=displacement, predicted_kl=displacement / 2,
        predicted_kl_valid=False, label=_LABELS[fisher.kind].format(k=k), per_module=rows)


_LABELS = {"low_rank": "top-{k} truncation: a lower bound of d'Fd",
           "diagonal": "diagonal proxy Σ F_jj d_j², not d'Fd"}
