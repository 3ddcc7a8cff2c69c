"""Per-example gradients from one batched backward pass: each layer's inputs and output gradients.

The rows of a batch do not interact (eval mode, right padding, causal attention), so one
backward pass of the batch's summed sequence log-likelihood gives, at every module output, the
gradient ``g_{r,t} = d loglik_r / d y_{r,t}`` of row ``r``'s own log-likelihood. Forward hooks
keep each module's input; a zero scalar added to each module's output (``y + 0``, exact) makes
autograd compute the ``g_{r,t}`` and no weight gradient. Each row's parameter gradient then
follows layer by layer, in closed form where the layer is a product:

* ``nn.Linear`` ``y_t = W a_t + b`` (and GPT-2's ``Conv1D``, weight stored (in, out)):
  ``G_r = sum_t g_{r,t} a_{r,t}'`` — one batched matrix product per layer — and
  ``b_r = sum_t g_{r,t}``;
* ``nn.Embedding`` (no ``max_norm``, no ``scale_grad_by_freq``): row ``v`` of ``G_r`` is the sum of
  ``g_{r,t}`` over the positions where row ``r`` looks up ``v`` (none at ``padding_idx``);
* ``nn.LayerNorm``: ``sum_t g_{r,t} * x̂_{r,t}`` (weight) and ``sum_t g_{r,t}`` (bias);
* any other module with parameters of its own (an RMSNorm) that takes one tensor: the gradient
  of the module alone at row ``r``'s input with cotangent ``g_r`` — one backward pass of the
  module with a copy of the parameter per row where it broadcasts (``weight * x_normalized``),
  else the module's ``vjp`` vectorized over rows (work of the size of the module, not the
  model).

A parameter used by several modules (an output layer tied to the input embedding) gets, per
row, the sum of every use's gradient, before anything is squared. Nothing here sees a use of
a parameter outside its module's forward (a weight read functionally by another module); that
is what :class:`~forgetkit.fisher.pergrad.GradientStream`'s check against the backward loop
is for. Products are formed one parameter at a time, when asked for, so memory beyond the kept
activations is one parameter's (R, *shape) rows at a time.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap

from forgetkit.diagnostics.loglik import completion_logprobs, forward_logits

__all__ = ["HookGradients", "UnsupportedModule", "hook_gradients", "linear_types"]


class UnsupportedModule(RuntimeError):
    """A module whose per-example gradient the hooks cannot take (the caller falls back)."""


@functools.cache
def linear_types() -> tuple[type, ...]:
    """``nn.Linear`` and, where transformers has it, GPT-2's ``Conv1D`` (weight (in, out))."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers without Conv1D: nn.Linear only
        return (nn.Linear,)
    return (nn.Linear, Conv1D)


@dataclass
class _Use:
    """One module holding chosen parameters, and what each of its forward calls saw."""

    module: nn.Module
    params: dict[str, str]  # attribute on the module -> full parameter name
    calls: list[list[Tensor | None]] = field(default_factory=list)  # [input, output gradient]


class HookGradients(Mapping[str, Tensor]):
    """name -> (R, *shape) per-row gradients, each formed when asked for (not kept).

    Built by :func:`hook_gradients`; :meth:`row` forms a single row's gradients.
    """

    def __init__(self, params: dict[str, Tensor], uses: list[_Use], rows: int):
        self._params, self._rows = params, rows
        # name -> its (use, attribute) holders, dense uses first, so a tied embedding's
        # lookups add into the output layer's product
        self._holders: dict[str, list[tuple[_Use, str]]] = {name: [] for name in params}
        for use in uses:
            for attribute, name in use.params.items():
                self._holders[name].append((use, attribute))
        for holders in self._holders.values():
            holders.sort(key=lambda pair: _plain_embedding(pair[0].module))

    def __getitem__(self, name: str) -> Tensor:
        return self._gradient(name, slice(None))

    def __iter__(self) -> Iterator[str]:
        return iter(self._params)

    def __len__(self) -> int:
        return len(self._params)

    def row(self, row: int) -> dict[str, Tensor]:
        """name -> (*shape): the gradients of row ``row`` alone."""
        return {name: self._gradient(name, slice(row, row + 1))[0] for name in self._params}

    def _gradient(self, name: str, rows: slice) -> Tensor:
        out = None
        for use, attribute in self._holders[name]:
            for inputs, grads in use.calls:
                if grads is not None:
                    out = _accumulate(out, use.module, attribute, inputs[rows], grads[rows])
        if out is None:  # no use of the parameter reached the log-likelihood
            p = self._params[name]
            out = torch.zeros((len(range(self._rows)[rows]), *p.shape), dtype=p.dtype,
                              device=p.device)
        return out


def _accumulate(out: Tensor | None, module: nn.Module, attribute: str, inputs: Tensor,
                grads: Tensor) -> Tensor:
    """``out`` (R, *shape) plus the per-row gradient of parameter ``attribute`` of ``module``
    from one call with input (R, ..., in) and output gradient (R, ..., out); a new tensor
    when ``out`` is ``None``."""
    rows = inputs.shape[0]
    if isinstance(module, linear_types()):
        g = grads.reshape(rows, -1, grads.shape[-1])  # (R, T, out)
        if attribute == "bias":
            return g.sum(1) if out is None else out.add_(g.sum(1))
        a = inputs.reshape(rows, -1, inputs.shape[-1]).to(g.dtype)  # (R, T, in)
        # nn.Linear: (R, out, in) = g' a; Conv1D stores (in, out): a' g
        left, right = (g.transpose(1, 2), a) if isinstance(module, nn.Linear) else (
            a.transpose(1, 2), g)
        return torch.bmm(left, right) if out is None else out.baddbmm_(left, right)
    if _plain_embedding(module):
        vocab, width = module.weight.shape
        ids = inputs.reshape(rows, -1)  # (R, T)
        g = grads.reshape(rows, -1, width)
        if out is None:
            out = torch.zeros(rows, vocab, width, dtype=g.dtype, device=g.device)
        flat = ids + vocab * torch.arange(rows, device=ids.device)[:, None]  # (R, T)
        if module.padding_idx is None:
            out.view(rows * vocab, width).index_add_(0, flat.flatten(), g.reshape(-1, width))
        else:  # autograd gives the padding row no gradient
            keep = ids != module.padding_idx
            out.view(rows * vocab, width).index_add_(0, flat[keep], g[keep])
        return out
    if isinstance(module, nn.LayerNorm):
        dims = tuple(range(1, grads.dim() - len(module.normalized_shape)))  # (R, T, *shape)
        if attribute == "weight":
            grads = grads * F.layer_norm(inputs.to(grads.dtype), module.normalized_shape,
                                         eps=module.eps)
        contribution = grads.sum(dims)
    else:
        contribution = _module_gradient(module, attribute, inputs, grads)
    return contribution if out is None else out.add_(contribution)


def _plain_embedding(module: nn.Module) -> bool:
    return (isinstance(module, nn.Embedding) and module.max_norm is None
            and not module.scale_grad_by_freq)


def _module_gradient(module: nn.Module, attribute: str, inputs: Tensor, grads: Tensor
                     ) -> Tensor:
    """Per-row gradient of one parameter of a module that maps one tensor to one tensor.

    First with one copy of the parameter per row, broadcast against the input (an RMSNorm's
    ``weight * x_normalized`` then gives every row its own gradient in one backward pass of
    the module); where the module does not accept such a copy, the module's ``vjp`` at each
    row, vectorized over rows.
    """
    own = {a: p.detach() for a, p in module.named_parameters(recurse=False)}
    rows, p = inputs.shape[0], own[attribute]
    lead = inputs.dim() - 1 - p.dim()
    if lead >= 0:
        copies = p.reshape(1, *(1,) * lead, *p.shape).repeat(rows, *(1,) * (lead + p.dim()))
        copies.requires_grad_(True)
        try:
            with torch.enable_grad():
                output = functional_call(module, {**own, attribute: copies}, (inputs,))
                if output.shape == grads.shape:
                    return torch.autograd.grad(output, copies, grads)[0].view(rows, *p.shape)
        except RuntimeError:  # the module needs the parameter's own shape
            pass

    def gradient(x: Tensor, g: Tensor) -> Tensor:
        def forward(q: dict[str, Tensor]) -> Tensor:
            return functional_call(module, q, (x[None],))

        _, pullback = vjp(forward, own)
        return pullback(g[None])[0][attribute]

    return vmap(gradient)(inputs, grads)


def hook_gradients(model: nn.Module, params: dict[str, Tensor], batch: Mapping[str, Tensor],
                   labels: Tensor) -> HookGradients:
    """Per-row gradients of the sequence log-likelihood from one forward and backward pass.

    Args:
        model: a causal LM (in eval mode) whose rows do not interact.
        params: name -> tensor, the parameters to differentiate (tied ones once, under the
            name :func:`~forgetkit.fisher.pergrad.select_parameters` gives them).
        batch: ``input_ids``, ``attention_mask``, ``position_ids`` (R, T), right padded.
        labels: (R, T) labels, ``-100`` on prompt and padding.

    Returns:
        A :class:`HookGradients`: name -> (R, *shape), as
        :func:`~forgetkit.fisher.pergrad.vmap_gradients` returns.

    Raises:
        UnsupportedModule: a module holding a chosen parameter that is neither linear nor an
            embedding and does not map one (R, ...) tensor to one tensor, or a call whose input
            does not have the batch's R rows.
    """
    uses = _uses(model, params)
    rows = labels.shape[0]
    zero = torch.zeros((), dtype=next(iter(params.values())).dtype, requires_grad=True,
                       device=labels.device)

    def hook(use: _Use):
        def capture(module: nn.Module, args: tuple, kwargs: dict, output: object) -> Tensor:
            simple = (len(args) == 1 and isinstance(args[0], Tensor)
                      and not any(isinstance(v, Tensor) for v in kwargs.values())
                      and isinstance(output, Tensor))
            if not simple or args[0].shape[0] != rows or output.shape[0] != rows:
                raise UnsupportedModule(
                    f"{type(module).__name__} does not map one ({rows}, ...) tensor to one "
                    "tensor, so its per-example gradient cannot be formed from its input")
            call: list[Tensor | None] = [args[0].detach(), None]
            use.calls.append(call)
            output = output + zero.to(output.dtype)
            output.register_hook(lambda g: call.__setitem__(1, g.detach()))
            return output
        return capture

    handles = [use.module.register_forward_hook(hook(use), with_kwargs=True) for use in uses]
    try:
        with torch.enable_grad():
            loglik = completion_logprobs(forward_logits(model, batch), labels)[0].sum()
            torch.autograd.grad(loglik, zero, allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    return HookGradients(params, uses, rows)


def _uses(model: nn.Module, params: dict[str, Tensor]) -> list[_Use]:
    """Every module that holds a chosen parameter directly, with the attribute -> name map
    (a tied parameter goes by its first name in ``model.named_parameters()``)."""
    canonical = {id(p): name for name, p in model.named_parameters()}
    uses = []
    for module in model.modules():
        own = {attribute: canonical[id(p)]
               for attribute, p in module.named_parameters(recurse=False)
               if canonical[id(p)] in params}
        if own:
            uses.append(_Use(module, own))
    return uses
