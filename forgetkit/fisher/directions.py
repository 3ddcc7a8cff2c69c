"""Eigendirections of a Fisher in the form each representation keeps them, and the global
top-k selection over several tensors of eigenvalues that the diagonal and Kronecker-factored
representations share.

A direction is a unit vector over the parameters a Fisher covers. Most touch only a few of them:
an eigenvector of a diagonal Fisher is one coordinate axis, one of a Kronecker-factored Fisher
lives on one layer and is stored as two vectors. :meth:`Direction.dense` expands a direction
into tensors of the parameters' shapes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["AxisDirection", "DenseDirection", "Direction", "Eigenpairs", "KroneckerDirection",
           "TopEntries", "top_entries"]


class Direction(ABC):
    """A unit vector over the parameters a Fisher covers (zero outside :attr:`parameters`)."""

    @property
    @abstractmethod
    def parameters(self) -> tuple[str, ...]:
        """Names of the parameters the direction touches."""

    @abstractmethod
    def dense(self) -> dict[str, Tensor]:
        """name -> float64 tensor of the parameter's shape, for each of :attr:`parameters`."""


@dataclass(frozen=True)
class AxisDirection(Direction):
    """The unit vector of one entry ``index`` of parameter ``name`` (of shape ``shape``)."""

    name: str
    index: tuple[int, ...]
    shape: torch.Size

    @classmethod
    def at(cls, name: str, flat_index: int, shape: torch.Size) -> AxisDirection:
        """The axis of entry ``flat_index`` (row-major) of a parameter of ``shape``."""
        index = torch.unravel_index(torch.tensor(flat_index), shape)
        return cls(name, tuple(int(i) for i in index), shape)

    @property
    def parameters(self) -> tuple[str, ...]:
        return (self.name,)

    def dense(self) -> dict[str, Tensor]:
        axis = torch.zeros(self.shape, dtype=torch.float64)
        axis[self.index] = 1.0
        return {self.name: axis}


@dataclass(frozen=True)
class DenseDirection(Direction):
    """A direction stored entry by entry: name -> tensor of the parameter's shape."""

    tensors: dict[str, Tensor]

    @property
    def parameters(self) -> tuple[str, ...]:
        return tuple(self.tensors)

    def dense(self) -> dict[str, Tensor]:
        return {name: t.double() for name, t in self.tensors.items()}


@dataclass(frozen=True)
class KroneckerDirection(Direction):
    """``output ⊗ input`` on one linear layer: the update ``output input'`` of its (out, in)
    weight matrix, with the bias as an extra last input column when the layer has one.

    Attributes:
        weight: name of the weight parameter.
        bias: name of the bias parameter, or ``None`` (then ``input`` has no extra entry).
        output: (out,) unit vector, an eigenvector of the output-gradient factor.
        input: (in,) or (in + 1,) unit vector, an eigenvector of the input factor.
        transposed: the weight is stored (in, out), as transformers' GPT-2 ``Conv1D`` does.
    """

    weight: str
    bias: str | None
    output: Tensor
    input: Tensor
    transposed: bool = False

    @property
    def parameters(self) -> tuple[str, ...]:
        return (self.weight,) if self.bias is None else (self.weight, self.bias)

    def dense(self) -> dict[str, Tensor]:
        matrix = torch.outer(self.output.double(), self.input.double())  # (out, in')
        inputs = matrix.shape[1] - (self.bias is not None)
        weight = matrix[:, :inputs]
        out = {self.weight: (weight.T if self.transposed else weight).contiguous()}
        if self.bias is not None:
            out[self.bias] = matrix[:, inputs].contiguous()
        return out


@dataclass(frozen=True)
class Eigenpairs:
    """The leading eigenpairs of a Fisher.

    Attributes:
        eigenvalues: (k,) float64, descending.
        directions: the k unit eigenvectors, orthonormal, in the same order.
    """

    eigenvalues: Tensor
    directions: tuple[Direction, ...]

    def __len__(self) -> int:
        return len(self.directions)


@dataclass(frozen=True)
class TopEntries:
    """The k largest entries over several tensors (see :func:`top_entries`).

    Attributes:
        values: (k,) float64, descending.
        keys: the keys of the tensors, in the order they were given.
        key: (k,) long, the position in ``keys`` of each entry's tensor.
        index: (k,) long, each entry's flat (row-major) index in its tensor.
    """

    values: Tensor
    keys: list
    key: Tensor
    index: Tensor

    def __iter__(self):
        """``(key, flat index)`` of each entry, in descending order."""
        return ((self.keys[int(c)], int(i)) for c, i in zip(self.key, self.index, strict=True))

    def select(self, key: object) -> tuple[Tensor, Tensor]:
        """``(positions among the k, flat indices)`` of the entries in the tensor of ``key``."""
        positions = (self.key == self.keys.index(key)).nonzero().squeeze(1)
        return positions, self.index[positions]


def top_entries(values: dict[object, Tensor], k: int) -> TopEntries:
    """The ``k`` largest entries over several tensors.

    Args:
        values: key -> tensor of any shape (a parameter's diagonal, a layer's eigenvalues).
        k: how many, at most the total number of entries.

    Returns:
        :class:`TopEntries`. Ties are broken by the order of ``values`` and then by
        ``torch.topk``'s order, so the same input always gives the same selection.
    """
    candidates, keys, indices = [], [], []
    for position, tensor in enumerate(values.values()):
        flat = tensor.detach().flatten()
        top = torch.topk(flat, min(k, flat.numel()))
        candidates.append(top.values.double().cpu())
        indices.append(top.indices.cpu())
        keys.append(torch.full((top.indices.numel(),), position, dtype=torch.long))
    pooled = torch.cat(candidates)
    order = torch.sort(pooled, descending=True, stable=True).indices[:k]
    return TopEntries(pooled[order], list(values), torch.cat(keys)[order],
                      torch.cat(indices)[order])
