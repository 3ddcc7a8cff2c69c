"""The Kronecker-factored Fisher as a representation: per linear layer the eigenbases of its
two factors and the eigenvalues in their Kronecker product, a diagonal for every other
parameter. :func:`forgetkit.fisher.kfac` computes it; its module docstring gives the math.

A layer's matrix is (out, in'), in' = in + 1 when its bias is covered (the last column); its
Fisher block is ``(Q_G ⊗ Q_A) diag(vec Λ) (Q_G ⊗ Q_A)'`` in the row-major vec of that matrix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from forgetkit.fisher.delta import LoraFactor
from forgetkit.fisher.diagonal import DiagonalFisher
from forgetkit.fisher.directions import AxisDirection, Eigenpairs, KroneckerDirection
from forgetkit.fisher.io import Delta, FisherMatrix, Provenance
from forgetkit.fisher.pergrad import FisherError

__all__ = ["KroneckerFactors", "KroneckerFisher"]

FACTOR_NAMES = ("activation_eigenvalues", "activation_eigenvectors", "gradient_eigenvalues",
                "gradient_eigenvectors", "eigenvalues")


@dataclass
class KroneckerFactors:
    """One layer's factors: ``F ≈ (Q_G ⊗ Q_A) diag(vec Λ) (Q_G ⊗ Q_A)'``.

    The layer's matrix is (out, in') with in' = in + 1 when its bias is covered (last column).

    Attributes:
        weight: name of the weight parameter.
        bias: name of the bias parameter, ``None`` when not covered.
        transposed: the weight is stored (in, out) (GPT-2 ``Conv1D``).
        tokens: number of tokens averaged in ``A``.
        activation_eigenvalues: (in',) ``λ_A``, ascending.
        activation_eigenvectors: (in', in') ``Q_A``, eigenvectors as columns.
        gradient_eigenvalues: (out,) ``λ_G``, ascending.
        gradient_eigenvectors: (out, out) ``Q_G``.
        eigenvalues: (out, in') ``Λ``: EK-FAC's corrected eigenvalues, or K-FAC's
            ``λ_G[p] λ_A[q]`` without the correction.
    """

    weight: str
    bias: str | None
    transposed: bool
    tokens: int
    activation_eigenvalues: Tensor
    activation_eigenvectors: Tensor
    gradient_eigenvalues: Tensor
    gradient_eigenvectors: Tensor
    eigenvalues: Tensor

    def __post_init__(self):
        # one memory layout (eigh returns column-major eigenvectors, a loaded file row-major),
        # so the products below round alike for computed and loaded factors
        for name in FACTOR_NAMES:
            setattr(self, name, getattr(self, name).contiguous())

    @property
    def activation_covariance(self) -> Tensor:
        """(in', in') ``A = (1/T) sum a_t a_t'``."""
        q = self.activation_eigenvectors.double()
        return (q * self.activation_eigenvalues.double()) @ q.T

    @property
    def gradient_covariance(self) -> Tensor:
        """(out, out) ``G = (1/N) sum_i sum_t g_t g_t'``."""
        q = self.gradient_eigenvectors.double()
        return (q * self.gradient_eigenvalues.double()) @ q.T

    @property
    def in_features(self) -> int:
        """in: the weight's input size (without the bias column)."""
        return self.activation_eigenvectors.shape[0] - (self.bias is not None)

    @property
    def parameters(self) -> tuple[str, ...]:
        return (self.weight,) if self.bias is None else (self.weight, self.bias)

    def shapes(self) -> dict[str, torch.Size]:
        out, inputs = self.gradient_eigenvectors.shape[0], self.in_features
        shapes = {self.weight: torch.Size((inputs, out) if self.transposed else (out, inputs))}
        if self.bias is not None:
            shapes[self.bias] = torch.Size((out,))
        return shapes

    def direction(self, index: int) -> KroneckerDirection:
        """The eigendirection of flat (row-major) index ``index`` of :attr:`eigenvalues`."""
        p, q = divmod(index, self.eigenvalues.shape[1])
        return KroneckerDirection(self.weight, self.bias, self.gradient_eigenvectors[:, p],
                                  self.activation_eigenvectors[:, q], self.transposed)

    def parameter_diagonal(self) -> Tensor:
        """(out, in') float64: the diagonal of this layer's F in the parameters' coordinates."""
        return (self.gradient_eigenvectors.double().square() @ self.eigenvalues.double()
                @ self.activation_eigenvectors.double().square().T)


@dataclass
class _Update:
    """A layer's update ``[dW, db]`` (out, in'): ``dense``, or ``left @ right'`` (a LoRA update
    and a bias kept as factors)."""

    dense: Tensor | None = None
    left: Tensor | None = None
    right: Tensor | None = None

    def rotated(self, layer: KroneckerFactors) -> Tensor:
        """(out, in') ``Q_G' [dW, db] Q_A``."""
        qg, qa = layer.gradient_eigenvectors.double(), layer.activation_eigenvectors.double()
        if self.dense is not None:
            return qg.T @ self.dense @ qa
        return (qg.T @ self.left) @ (qa.T @ self.right).T

    def at(self, left: Tensor, right: Tensor) -> Tensor:
        """(m,) ``left[:, j]' [dW, db] right[:, j]`` for the m columns of left (out, m) and
        right (in', m)."""
        if self.dense is not None:
            return ((left.T @ self.dense) * right.T).sum(1)
        return ((left.T @ self.left) * (right.T @ self.right)).sum(1)


@dataclass
class KroneckerFisher(FisherMatrix):
    """Block-diagonal Fisher: Kronecker-factored blocks per linear layer, a diagonal elsewhere.

    Its eigenvectors are ``u_G ⊗ u_A`` on one layer (a column of ``Q_G`` and one of ``Q_A``) with
    eigenvalue ``Λ[p, q]``, and the coordinate axes of the diagonal part.

    Attributes:
        layers: module name -> :class:`KroneckerFactors`.
        fallback: the diagonal Fisher of every other covered parameter, or ``None``.
        fallback_reasons: parameter name -> why it is on the diagonal.
        provenance: model, data, estimator, N, ... (:class:`Provenance`).
        parameter_shapes: name -> shape of every covered parameter, in the model's order.
        eigen_correction: EK-FAC eigenvalues (``True``) or K-FAC's products (``False``).
        tokens: the tokens counted in the factors, ``"answer"`` or ``"all"``.
    """

    kind: ClassVar[str] = "kfac"
    layers: dict[str, KroneckerFactors]
    fallback: DiagonalFisher | None
    fallback_reasons: dict[str, str]
    provenance: Provenance
    parameter_shapes: dict[str, torch.Size]
    eigen_correction: bool = True
    tokens: str = "answer"

    @property
    def shapes(self) -> dict[str, torch.Size]:
        return dict(self.parameter_shapes)

    def _eigenvalue_tensors(self) -> dict[tuple[str, str], Tensor]:
        """("layer", module) -> Λ and ("parameter", name) -> the diagonal, in that order."""
        out: dict[tuple[str, str], Tensor] = {("layer", m): f.eigenvalues
                                              for m, f in self.layers.items()}
        if self.fallback is not None:
            out.update((("parameter", n), v) for n, v in self.fallback.values.items())
        return out

    def _update(self, delta: Delta, layer: KroneckerFactors) -> _Update | None:
        """``delta``'s update of a layer as its (out, in') matrix, LoRA factors kept; ``None``
        when a :class:`~forgetkit.fisher.delta.ParamDelta` has no entry for the layer."""
        device = layer.eigenvalues.device
        weight = self._entry(delta, layer.weight)
        bias = self._entry(delta, layer.bias) if layer.bias is not None else None
        if weight is None and bias is None:
            return None
        out, inputs = layer.gradient_eigenvectors.shape[0], layer.in_features
        columns = inputs + (layer.bias is not None)
        if isinstance(weight, LoraFactor):
            if tuple(weight.shape) != (out, inputs):
                raise FisherError(f"delta[{layer.weight!r}] is a LoRA update of shape "
                                  f"{tuple(weight.shape)}; the layer maps {inputs} -> {out}")
            left = weight.B.to(device, torch.float64) * weight.scale  # (out, r)
            right = torch.zeros(columns, left.shape[1], dtype=torch.float64, device=device)
            right[:inputs] = weight.A.to(device, torch.float64).T  # (in', r)
            if bias is not None:  # [s B A, b] = [s B, b] [[A', 0], [0, 1]]'
                left = torch.cat([left, bias.to(device, torch.float64)[:, None]], 1)
                right = torch.cat([right, torch.zeros(columns, 1, dtype=torch.float64,
                                                      device=device)], 1)
                right[inputs, -1] = 1.0
            return _Update(left=left, right=right)
        dense = torch.zeros(out, columns, dtype=torch.float64, device=device)
        if weight is not None:
            weight = weight.detach().to(device, torch.float64)
            dense[:, :inputs] = weight.T if layer.transposed else weight
        if bias is not None:
            dense[:, inputs] = bias.detach().to(device, torch.float64)
        return _Update(dense=dense)

    def quad_form(self, delta: Delta) -> float:
        """``sum_layers sum Λ ∘ (Q_G' dW Q_A)^2`` plus the diagonal part (float64); a LoRA
        update ``s B A`` is rotated as ``s (Q_G' B)(A Q_A)``, never merged."""
        total = 0.0
        for layer in self.layers.values():
            update = self._update(delta, layer)
            if update is not None:
                total += float((layer.eigenvalues.double() * update.rotated(layer).square()).sum())
        if self.fallback is not None:
            total += self.fallback.quad_form(delta)
        return total

    def top(self, k: int) -> Eigenpairs:
        """The k largest eigenvalues over all layers and the diagonal part, with their
        directions (:class:`~forgetkit.fisher.directions.KroneckerDirection` on a layer,
        :class:`~forgetkit.fisher.directions.AxisDirection` on the diagonal part)."""
        top = self._top_entries(self._eigenvalue_tensors(), self._rank_k(k))
        return Eigenpairs(top.values, tuple(
            self.layers[name].direction(index) if form == "layer"
            else AxisDirection.at(name, index, self.parameter_shapes[name])
            for (form, name), index in top))

    def coordinates(self, delta: Delta, k: int | None = None) -> Tensor:
        """(k,) float64: ``(Q_G' dW Q_A)[p, q]`` at each of the k leading eigenvalues (only
        those entries are computed), or the entry of ``d`` on the diagonal part."""
        top = self._top_entries(self._eigenvalue_tensors(), self._rank_k(k))
        out = torch.zeros(top.values.shape, dtype=torch.float64)
        for key in top.keys:
            positions, index = top.select(key)
            if key[0] == "layer":
                layer = self.layers[key[1]]
                update = self._update(delta, layer)  # checks the entries even when unused
                if positions.numel() and update is not None:
                    left, right = self._columns(layer, index)
                    out[positions] = update.at(left, right).cpu()
            else:
                value = self._delta(delta, key[1], self.fallback.values[key[1]].device)
                out[positions] = value.flatten()[index.to(value.device)].cpu()
        return out

    def project(self, delta: Delta, k: int | None = None) -> dict[str, Tensor]:
        """``sum_j (u_j . d) u_j`` over the k leading directions: per layer
        ``Q_G[:, p] diag(c) Q_A[:, q]'`` for its selected pairs, the masked entries of ``d``
        on the diagonal part."""
        top = self._top_entries(self._eigenvalue_tensors(), self._rank_k(k))
        coordinates = self.coordinates(delta, k)
        out: dict[str, Tensor] = {}
        for key in top.keys:
            positions, index = top.select(key)
            if key[0] == "layer":
                layer = self.layers[key[1]]
                left, right = self._columns(layer, index)
                matrix = (left * coordinates[positions].to(left.device)) @ right.T  # (out, in')
                weight = matrix[:, : layer.in_features]
                out[layer.weight] = weight.T.contiguous() if layer.transposed else weight
                if layer.bias is not None:
                    out[layer.bias] = matrix[:, layer.in_features].contiguous()
            else:
                values = self.fallback.values[key[1]]
                projected = torch.zeros(values.numel(), dtype=torch.float64,
                                        device=values.device)
                projected[index.to(values.device)] = coordinates[positions].to(values.device)
                out[key[1]] = projected.view(values.shape)
        return {name: out[name] for name in self.parameter_shapes}

    @staticmethod
    def _columns(layer: KroneckerFactors, index: Tensor) -> tuple[Tensor, Tensor]:
        """``(Q_G[:, p], Q_A[:, q])`` (float64) for the flat indices ``index`` of Λ."""
        p, q = index // layer.eigenvalues.shape[1], index % layer.eigenvalues.shape[1]
        device = layer.eigenvalues.device
        return (layer.gradient_eigenvectors.double()[:, p.to(device)],
                layer.activation_eigenvectors.double()[:, q.to(device)])

    def trace(self) -> float:
        total = sum(float(f.eigenvalues.double().sum()) for f in self.layers.values())
        return total + (self.fallback.trace() if self.fallback is not None else 0.0)

    @property
    def quad_form_label(self) -> str:
        form = "EK-FAC" if self.eigen_correction else "K-FAC"
        rest = ", diagonal elsewhere" if self.fallback is not None else ""
        return f"{form} (Kronecker-factored per layer{rest}): an approximation of d'Fd"

    def details(self) -> dict[str, Any]:
        """``eigen_correction``, ``tokens``, ``layers`` (the factored modules) and
        ``fallback_reasons`` (parameter -> why it is on the diagonal)."""
        return {"eigen_correction": self.eigen_correction, "tokens": self.tokens,
                "layers": list(self.layers), "fallback_reasons": dict(self.fallback_reasons)}

    def _parameter_stats(self) -> dict[str, tuple[float, float]]:
        (form, top_name), top_index = next(iter(self._top_entries(self._eigenvalue_tensors(), 1)))
        stats = {}
        for module, layer in self.layers.items():
            diag = layer.parameter_diagonal()
            leading = (layer.direction(top_index).input.double().square().cpu()
                       if (form, top_name) == ("layer", module) else None)
            inputs = layer.in_features
            stats[layer.weight] = (float(diag[:, :inputs].sum()),
                                   float(leading[:inputs].sum()) if leading is not None else 0.0)
            if layer.bias is not None:
                stats[layer.bias] = (float(diag[:, inputs].sum()),
                                     float(leading[inputs]) if leading is not None else 0.0)
        if self.fallback is not None:
            for name, v in self.fallback.values.items():
                stats[name] = (float(v.double().sum()),
                               float((form, top_name) == ("parameter", name)))
        return {name: stats[name] for name in self.parameter_shapes}

    def summary(self) -> list[dict[str, Any]]:
        """:meth:`FisherMatrix.summary`, each row with ``form``: ``"kfac"`` for a factored
        layer, ``"diagonal"`` for a module on the diagonal fallback."""
        factored = set(self.layers)
        return [{**row, "form": "kfac" if row["module"] in factored else "diagonal"}
                for row in super().summary()]

    def _tensors(self) -> dict[str, Tensor]:
        out = {f"layers/{m}/{key}": getattr(f, key) for m, f in self.layers.items()
               for key in FACTOR_NAMES}
        if self.fallback is not None:
            out.update({f"fallback/{k}": v for k, v in self.fallback._tensors().items()})
        return out

    def _extra(self) -> dict[str, Any]:
        return {"layers": {m: {"weight": f.weight, "bias": f.bias, "transposed": f.transposed,
                               "tokens": f.tokens} for m, f in self.layers.items()},
                "fallback_reasons": dict(self.fallback_reasons),
                "eigen_correction": self.eigen_correction, "tokens": self.tokens}

    @classmethod
    def _from_saved(cls, tensors, shapes, provenance, extra) -> KroneckerFisher:
        try:
            layers = {m: KroneckerFactors(
                weight=meta["weight"], bias=meta["bias"], transposed=bool(meta["transposed"]),
                tokens=int(meta["tokens"]),
                **{key: tensors[f"layers/{m}/{key}"] for key in FACTOR_NAMES})
                for m, meta in extra["layers"].items()}
            reasons = dict(extra["fallback_reasons"])
            fallback = DiagonalFisher(
                values={n: tensors[f"fallback/values/{n}"] for n in reasons},
                stderr={n: tensors[f"fallback/stderr/{n}"] for n in reasons},
                provenance=provenance) if reasons else None
        except (KeyError, TypeError, ValueError) as err:
            raise FisherError(f"not a complete Kronecker-factored Fisher: missing or bad "
                              f"entry {err}") from None
        result = cls(layers=layers, fallback=fallback, fallback_reasons=reasons,
                     provenance=provenance, parameter_shapes=dict(shapes),
                     eigen_correction=bool(extra.get("eigen_correction", True)),
                     tokens=str(extra.get("tokens", "answer")))
        covered = {n: s for f in layers.values() for n, s in f.shapes().items()}
        covered.update((n, v.shape) for n, v in (fallback.values if fallback else {}).items())
        if covered != dict(shapes):
            raise FisherError("the factors do not match the parameters the file lists (a "
                              "corrupt or edited Kronecker-factored Fisher)")
        return result

