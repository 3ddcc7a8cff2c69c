"""The parameter update of a fine-tune: full weights or the low-rank factors of a LoRA adapter.

A :class:`ParamDelta` maps base-model parameter names to the update of that parameter. Dense
entries hold ``theta_ft - theta_base``; LoRA entries hold the factors ``(B, A, scale)`` with
``dW = scale * B @ A`` and are never expanded unless a caller asks for :meth:`ParamDelta.dense`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["LoraFactor", "ParamDelta", "delta", "lora_factors", "module_groups"]


@dataclass(frozen=True)
class LoraFactor:
    """``dW = scale * B @ A`` with ``B`` (out, r) and ``A`` (r, in)."""

    B: Tensor
    A: Tensor
    scale: float

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.B.shape[0], self.A.shape[1]))

    def dense(self) -> Tensor:
        return self.scale * (self.B @ self.A)

    def dot(self, other: Tensor) -> Tensor:
        """``<dW, other>`` for ``other`` (..., out, in) without forming ``dW``: (...,)."""
        # <s B A, U> = s * sum((U A^T) * B)
        return self.scale * ((other @ self.A.T) * self.B).sum(dim=(-2, -1))

    def sq_norm(self) -> Tensor:
        """``||dW||_F^2 = s^2 tr(A A^T B^T B)`` from the r x r Gram matrices."""
        return self.scale**2 * ((self.A @ self.A.T) * (self.B.T @ self.B)).sum()


@dataclass
class ParamDelta:
    """Parameter update, keyed by the base model's parameter names.

    Attributes:
        entries: name -> dense tensor (the parameter's shape) or :class:`LoraFactor`.
        base_name: where the base came from (for reports).
    """

    entries: dict[str, Tensor | LoraFactor]
    base_name: str = ""
    meta: dict = field(default_factory=dict)

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def is_low_rank(self) -> bool:
        return any(isinstance(v, LoraFactor) for v in self.entries.values())

    def dense(self, name: str) -> Tensor:
        value = self.entries[name]
        return value.dense() if isinstance(value, LoraFactor) else value

    def dot(self, name: str, other: Tensor) -> Tensor:
        """Inner product of this parameter's update with ``other`` (..., *shape) -> (...,)."""
        value = self.entries[name]
        if isinstance(value, LoraFactor):
            return value.dot(other.to(value.B.dtype))
        dims = tuple(range(other.ndim - value.ndim, other.ndim))
        return (other.to(value.dtype) * value).sum(dim=dims)

    def sq_norm(self, names: list[str] | None = None) -> float:
        """``||delta||^2`` over ``names`` (default all)."""
        values = [self.entries[name] for name in (self.entries if names is None else names)]
        return sum((float(v.sq_norm() if isinstance(v, LoraFactor) else v.pow(2).sum())
                    for v in values), 0.0)

    def as_dense_dict(self) -> dict[str, Tensor]:
        """Every entry expanded (for Fisher quadratic forms on the diagonal)."""
        return {name: self.dense(name) for name in self.entries}

    def select(self, names) -> ParamDelta:
        return ParamDelta({n: self.entries[n] for n in names if n in self.entries},
                          self.base_name, dict(self.meta))


def module_groups(names: Iterable[str]) -> dict[str, list[str]]:
    """Parameter names grouped by module (the name without its last part; a name without a dot
    is its own module), modules and names in first-seen order."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(name.rpartition(".")[0] or name, []).append(name)
    return groups


def _named(model) -> dict[str, Tensor]:
    return {n: p.detach() for n, p in model.named_parameters()}


def lora_factors(peft_model) -> dict[str, LoraFactor]:
    """The factors of the active LoRA adapter, keyed by the name of the LoRA layer in
    ``peft_model`` (e.g. ``base_model.model.model.layers.0.self_attn.q_proj``); detached, in the
    adapter's dtype and on its device."""
    adapter = peft_model.active_adapter
    factors: dict[str, LoraFactor] = {}
    for module_name, module in peft_model.named_modules():
        if not hasattr(module, "lora_A") or adapter not in getattr(module, "lora_A", {}):
            continue
        B = module.lora_B[adapter].weight.detach()
        A = module.lora_A[adapter].weight.detach()
        factors[module_name] = LoraFactor(B, A, float(module.scaling[adapter]))
    return factors


def _lora_factors(peft_model, base_params: dict[str, Tensor]) -> dict[str, LoraFactor]:
    """LoRA factors of the active adapter, keyed by the base parameter they update."""
    factors: dict[str, LoraFactor] = {}
    for module_name, factor in lora_factors(peft_model).items():
        name = module_name.removeprefix("base_model.model.") + ".weight"
        if name not in base_params:
            raise ValueError(f"adapter updates {name!r}, which the base model does not have")
        factors[name] = factor
    return factors


def _check_same_architecture(base: dict[str, Tensor], other: dict[str, Tensor], what: str):
    missing = sorted(set(base) - set(other))
    extra = sorted(set(other) - set(base))
    if missing or extra:
        raise ValueError(
            f"base and {what} have different architectures: "
            f"{len(missing)} parameters only in the base (e.g. {missing[:3]}), "
            f"{len(extra)} only in the {what} (e.g. {extra[:3]})")
    for name, value in base.items():
        if value.shape != other[name].shape:
            raise ValueError(f"base and {what} differ in the shape of {name!r}: "
                             f"{tuple(value.shape)} vs {tuple(other[name].shape)}")


def delta(base, finetuned, params: str | None = None, dtype: torch.dtype = torch.float32,
          atol: float = 0.0) -> ParamDelta:
    """The update ``finetuned - base``.

    Args:
        base: the base model (``nn.Module``) or anything :func:`forgetkit.models.load_model`
            accepts.
        finetuned: a full fine-tune (module or path) or a PEFT LoRA model/adapter folder; for an
            adapter the update is kept as factors ``(B, A, scale)``.
        params: regex on parameter names; only matching parameters are kept.
        dtype: dtype of dense entries.
        atol: for a LoRA adapter, the largest tolerated difference between its frozen base
            weights and ``base``.

    Raises:
        ValueError: different architectures (names or shapes), or an adapter trained on a
            different base.
    """
    from forgetkit.models import load_model

    if not isinstance(base, torch.nn.Module):
        base = load_model(base, device="cpu")[0]
    if not isinstance(finetuned, torch.nn.Module):
        finetuned = load_model(finetuned, device="cpu")[0]
    base_params = _named(base)
    pattern = re.compile(params) if params else None
    if hasattr(finetuned, "peft_config"):
        factors = _lora_factors(finetuned, base_params)
        frozen = {n.removeprefix("base_model.model.").replace(".base_layer", ""): p
                  for n, p in _named(finetuned).items() if "lora_" not in n}
        _check_same_architecture(base_params, frozen, "adapter's base")
        for name, value in base_params.items():
            other = frozen[name].to(value.device, value.dtype)
            if not torch.allclose(value, other, atol=atol, rtol=0):
                raise ValueError(
                    f"the adapter was trained on a different base: its frozen {name!r} differs "
                    f"from the given base by up to {float((value - other).abs().max()):.3g}")
        entries: dict[str, Tensor | LoraFactor] = {
            n: LoraFactor(f.B.to(dtype), f.A.to(dtype), f.scale) for n, f in factors.items()
            if pattern is None or pattern.search(n)}
    else:
        ft_params = _named(finetuned)
        _check_same_architecture(base_params, ft_params, "fine-tune")
        entries = {n: (ft_params[n].to(dtype).cpu() - v.to(dtype).cpu())
                   for n, v in base_params.items() if pattern is None or pattern.search(n)}
    if not entries:
        raise ValueError(f"no parameter matches params={params!r}")
    return ParamDelta(entries, base_name=getattr(base.config, "_name_or_path", ""))
