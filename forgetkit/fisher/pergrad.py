"""Per-example gradients of the sequence log-likelihood: the input of every Fisher estimator.

For example ``i`` with completion labels ``y`` (``-100`` on prompt and padding, see
:func:`forgetkit.models.encode`), the gradient is ``g_i = d/dθ sum_t log p(y_t | prompt, y_<t)``
(:func:`forgetkit.diagnostics.loglik.sequence_loglik`), taken w.r.t. a chosen subset of parameters.

* ``estimator="empirical"``: ``y`` are the data labels.
* ``estimator="true"``: one teacher-forced forward pass on the data gives the model's
  distribution at each completion position; ``mc_samples`` label sequences are drawn from it
  (each position independently, the prefix staying the data) and each draw gives one gradient.
  Draws for example ``i`` come from their own generator seeded by ``(seed, i)``, so they do not
  depend on batch size, shard or order, and the caller's RNG is untouched.

Three ways to the same gradients (``per_example``):

* ``"hooks"``: one ordinary forward and backward pass of the batch, each layer's per-row
  gradient formed from its inputs and output gradients (:mod:`forgetkit.fisher.hookgrad`: a
  batched matrix product per linear layer, an indexed sum per embedding, the module's own
  ``vjp`` for norms). The rows run right-padded with their attention mask and position ids.
* ``"vmap"``: ``vmap(grad(loglik))`` over the rows of a right-padded batch. Under right padding
  and causal attention no scored position attends to padding, so the vectorized forward takes
  ``input_ids`` and an all-ones mask (no padding mask or position ids, whose data-dependent
  checks vmap cannot trace).
* ``"loop"``: one backward pass per unpadded row, the reference.

``"auto"`` checks the first batch before trusting a method: hooks against the loop on the
batch's shortest row (the most padding), which costs one example's backward pass; if the hooks
cannot run on the model or disagree, vmap against the loop on the longest and shortest row; if
that fails too, the loop. A verified architecture skips the hooks' check, as Opacus trusts its
registered layers: a transformers class in :data:`VERIFIED_ARCHITECTURES`, whose forward reads
each parameter only through the module that owns it and never mixes the rows of a batch
(tests/fisher/test_diagonal.py compares its hooks with the loop in float64), when every module
that owns parameters is from ``torch.nn``, transformers' ``pytorch_utils`` or the class's own
modeling file (an adapter or a swapped-in module from elsewhere brings the check back). The choice is kept for the rest of the run and the reason logged,
and a passed check is remembered for the model (weakly, keyed on which parameters are chosen,
every parameter's identity, storage, shape, dtype, device and in-place version counter, the
module tree and the attention implementation): a later ``"auto"`` run on the same unchanged
model skips it, so only the first run on a model pays the check. Any change of those (an
optimizer step, a load_state_dict, a swapped module) brings the check back.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor
from torch.func import functional_call, grad, vmap

from forgetkit.data.records import Probe, Record
from forgetkit.diagnostics.loglik import forward_logits, sequence_loglik
from forgetkit.fisher.hookgrad import HookGradients, hook_gradients
from forgetkit.models import IGNORE_INDEX, Encoding, collate, encode, eval_mode
from forgetkit.seeding import stable_hash

__all__ = [
    "ESTIMATORS",
    "Estimator",
    "FisherError",
    "GradientBlock",
    "GradientStream",
    "PerExample",
    "all_reduce_sum",
    "check_sampling",
    "derived_seed",
    "distributed_shard",
    "encode_data",
    "evaluation_mode",
    "fsdp_sharded",
    "loop_gradients",
    "sample_labels",
    "select_parameters",
    "shard_indices",
    "true_fisher_generators",
    "unwrap_model",
    "verified_architecture",
    "vmap_gradients",
]

logger = logging.getLogger(__name__)

Estimator = Literal["empirical", "true"]
ESTIMATORS: tuple[str, ...] = ("empirical", "true")
PerExample = Literal["auto", "hooks", "vmap", "loop"]
PER_EXAMPLE: tuple[str, ...] = ("auto", "hooks", "vmap", "loop")
# normwise relative difference allowed between the vmap and loop gradients of one example
_CHECK_RTOL = {torch.float64: 1e-9, torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 5e-2}
# transformers causal LMs whose layer hooks equal the backward loop (tests/fisher/test_diagonal.py)
VERIFIED_ARCHITECTURES: frozenset[str] = frozenset({"LlamaForCausalLM", "GPT2LMHeadModel"})
# model -> (its state, per-example method) of the last "auto" check that passed on it
_CHECKED: weakref.WeakKeyDictionary[torch.nn.Module, tuple[tuple, str]] = (
    weakref.WeakKeyDictionary())


class FisherError(ValueError):
    """Bad input to a Fisher estimator, or a Fisher file that does not fit the model."""


def check_sampling(estimator: str, batch_size: int, mc_samples: int = 1) -> None:
    """Raise :class:`FisherError` for an unknown ``estimator``, ``mc_samples`` other than 1
    with the empirical Fisher, or ``mc_samples`` or ``batch_size`` below 1."""
    if estimator not in ESTIMATORS:
        raise FisherError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if estimator == "empirical" and mc_samples != 1:
        raise FisherError("mc_samples applies to estimator='true' only (the empirical Fisher "
                          f"uses the data labels once); got mc_samples={mc_samples}")
    for name, value in (("mc_samples", mc_samples), ("batch_size", batch_size)):
        if value < 1:
            raise FisherError(f"{name} must be >= 1, got {value}")


def derived_seed(seed: int, *keys: object) -> int:
    """A 63-bit seed for ``torch.Generator.manual_seed`` derived from ``seed`` and ``keys``."""
    return int(stable_hash(int(seed), *keys), 16) % (2**63)


def true_fisher_generators(seed: int, examples: Sequence[int], device: torch.device
                           ) -> list[torch.Generator]:
    """One generator per example for its true-Fisher label draws, seeded by ``(seed, index)``.

    Every estimator (diagonal, low-rank, Kronecker-factored) draws its labels with these and
    :func:`sample_labels`, so all of them see the same labels whatever their batching.
    """
    return [torch.Generator(device=device).manual_seed(derived_seed(seed, "true-fisher-labels", i))
            for i in examples]


def encode_data(tokenizer, data: Sequence[Record | Probe | Encoding]) -> list[Encoding]:
    """Tokenize Fisher data with :func:`forgetkit.models.encode`.

    Record -> ``prompt`` + ``target``; Probe -> ``prompt`` + ``answer``; an Encoding is kept.

    Raises:
        FisherError: empty data, an item of another type, or an item without any scored
            completion token; the message names the item's index.
    """
    if isinstance(data, str | bytes) or not isinstance(data, Sequence):
        raise FisherError(f"data must be a sequence of Records, Probes or Encodings, got "
                          f"{type(data).__name__}")
    if len(data) == 0:
        raise FisherError("no data: the Fisher is an average over at least one example")
    encodings = []
    for index, item in enumerate(data):
        if isinstance(item, Encoding):
            enc = item
        elif isinstance(item, Record | Probe):
            if tokenizer is None:
                raise FisherError(f"data[{index}] is a {type(item).__name__}: a tokenizer is "
                                  "needed to encode it")
            completion = item.target if isinstance(item, Record) else item.answer
            enc = encode(tokenizer, item.prompt, completion)
        else:
            raise FisherError(f"data[{index}] is a {type(item).__name__}; expected a Record, "
                              "a Probe or an Encoding")
        if len(enc.labels) != len(enc.input_ids):
            raise FisherError(f"data[{index}]: {len(enc.labels)} labels for "
                              f"{len(enc.input_ids)} input ids")
        if all(label == IGNORE_INDEX for label in enc.labels[1:]):
            raise FisherError(f"data[{index}]: every token is masked (-100), so no completion "
                              "token enters the log-likelihood")
        encodings.append(enc)
    return encodings


def select_parameters(model: torch.nn.Module, pattern: str | Sequence[str] | None = None
                      ) -> dict[str, Tensor]:
    """The parameters a Fisher covers, by name, in ``model.named_parameters()`` order.

    Args:
        model: the model (tied parameters appear once, under their first name).
        pattern: ``None`` for every parameter that requires grad; else a pattern or a list of
            patterns, each matched against the full parameter name as a glob
            (``"*.mlp.*.weight"``) or, failing that, searched as a regex (``"mlp"``,
            ``r"layers\\.[01]\\."``).

    Raises:
        FisherError: a pattern that selects nothing (lists a few parameter names).
    """
    named = dict(model.named_parameters())
    if pattern is None:
        chosen = {name: p for name, p in named.items() if p.requires_grad}
        if not chosen:
            raise FisherError("no parameter requires grad; pass params= to choose some")
        return chosen
    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    chosen = {}
    for pat in patterns:
        try:
            regex = re.compile(pat)
        except re.error:
            regex = None
        hits = [n for n in named if fnmatchcase(n, pat) or (regex and regex.search(n))]
        if not hits:
            examples = ", ".join(list(named)[:6])
            raise FisherError(f"params pattern {pat!r} matches no parameter (names look like "
                              f"{examples}, ...)")
        chosen.update((n, named[n]) for n in hits)
    return {n: named[n] for n in named if n in chosen}


def sample_labels(logits: Tensor, labels: Tensor, draws: int,
                  generators: Sequence[torch.Generator]) -> Tensor:
    """Labels drawn from the model at every scored position (teacher-forced true Fisher).

    Args:
        logits: (E, T, V) outputs of one forward pass on the data.
        labels: (E, T) data labels, ``-100`` where not scored.
        draws: label sequences per example (M).
        generators: one per example, on ``logits.device``.

    Returns:
        (E * M, T) labels, example-major (row ``e * M + k`` is draw ``k`` of example ``e``):
        ``-100`` where ``labels`` is, elsewhere ``y_t ~ softmax(logits[e, t - 1])``.
    """
    rows = labels.repeat_interleave(draws, dim=0)
    for e, generator in enumerate(generators):
        scored = (labels[e, 1:] != IGNORE_INDEX).nonzero().squeeze(-1)  # (n_e,)
        probs = torch.softmax(logits[e, scored].to(torch.promote_types(logits.dtype,
                                                                       torch.float32)), -1)
        drawn = torch.multinomial(probs, draws, replacement=True, generator=generator)  # (n_e, M)
        rows[e * draws : (e + 1) * draws, scored + 1] = drawn.T
    return rows


class _Functional:
    """``model(**kwargs)`` with ``params`` swapped in by :func:`torch.func.functional_call`.

    With ``input_ids_only`` (right-padded rows under vmap) the padding mask and position ids
    are dropped: causal attention keeps every scored position away from the padding after it.
    The attention mask passed instead is all ones and not batched (built from the row's
    shape), so no data-dependent check runs on a batched tensor: without any mask, transformers
    looks for padding in the input ids (``warn_if_padding_and_no_attention_mask``, on models
    whose config sets ``pad_token_id``), which vmap cannot trace.
    """

    def __init__(self, model: torch.nn.Module, params: dict[str, Tensor],
                 input_ids_only: bool = False):
        self.model, self.params, self.input_ids_only = model, params, input_ids_only

    def __call__(self, **kwargs) -> object:
        if self.input_ids_only:
            ids = kwargs["input_ids"]
            ones = torch.ones(ids.shape, dtype=torch.long, device=ids.device)
            kwargs = {"input_ids": ids, "attention_mask": ones, "use_cache": False}
        return functional_call(self.model, self.params, args=(), kwargs=kwargs)


def vmap_gradients(model: torch.nn.Module, params: dict[str, Tensor], input_ids: Tensor,
                   labels: Tensor) -> dict[str, Tensor]:
    """Per-row gradients of the sequence log-likelihood by ``vmap(grad(...))``.

    Args:
        model: a causal LM (in eval mode).
        params: name -> detached tensor, the parameters to differentiate.
        input_ids: (R, T) right-padded rows.
        labels: (R, T) labels, ``-100`` on prompt and padding.

    Returns:
        name -> (R, *shape) gradients.
    """
    def loglik(p: dict[str, Tensor], ids: Tensor, lab: Tensor) -> Tensor:
        batch = {"input_ids": ids[None], "attention_mask": None, "labels": lab[None]}
        return sequence_loglik(_Functional(model, p, input_ids_only=True), batch)[0]

    # grad() ignores the outer no_grad, under which the rest of the model records nothing
    with torch.no_grad(), _eager_attention(model):
        return vmap(grad(loglik), in_dims=(None, 0, 0))(params, input_ids, labels)


@contextlib.contextmanager
def _eager_attention(model: torch.nn.Module) -> Iterator[None]:
    """Switch an HF model to eager attention meanwhile: plain matmuls batch under vmap, while
    fused SDPA kernels have no batching rule and run one row at a time. Float64 models keep
    their attention: HF's eager attention takes the softmax in float32."""
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    float64 = next(model.parameters()).dtype == torch.float64  # eager's softmax is float32
    if current in (None, "eager") or float64 or not hasattr(model, "set_attn_implementation"):
        yield
        return
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(current)


def loop_gradients(model: torch.nn.Module, params: dict[str, Tensor], input_ids: Tensor,
                   labels: Tensor, lengths: Sequence[int]) -> dict[str, Tensor]:
    """Per-row gradients by one ordinary backward pass per row (the reference and fallback).

    Same arguments and result as :func:`vmap_gradients`, plus ``lengths`` (R,): the real length
    of each row; each row runs unpadded with its attention mask and position ids.
    """
    out = {name: torch.zeros((len(lengths), *p.shape), dtype=p.dtype, device=p.device)
           for name, p in params.items()}
    for row, length in enumerate(lengths):
        leaves = {name: p.detach().requires_grad_(True) for name, p in params.items()}
        batch = {"input_ids": input_ids[row : row + 1, :length],
                 "attention_mask": torch.ones_like(input_ids[row : row + 1, :length]),
                 "labels": labels[row : row + 1, :length]}
        with torch.enable_grad():
            loglik = sequence_loglik(_Functional(model, leaves), batch)[0]
            grads = torch.autograd.grad(loglik, list(leaves.values()), allow_unused=True)
        for name, g in zip(leaves, grads, strict=True):
            if g is not None:
                out[name][row] = g
    return out


@dataclass
class GradientBlock:
    """Per-example gradients of a few whole examples.

    Attributes:
        grads: name -> (E * M, *shape), example-major (row ``e * M + k``: draw ``k`` of
            example ``e``), in the model's dtype; under layer hooks each tensor is formed
            when looked up, so look each name up once.
        examples: the E indices of the examples in the full data.
        draws: M, gradient rows per example (1 for the empirical Fisher).
    """

    grads: Mapping[str, Tensor]
    examples: list[int]
    draws: int


@contextlib.contextmanager
def evaluation_mode(model: torch.nn.Module) -> Iterator[None]:
    """Run the block with ``model`` in eval mode (no dropout), restoring its mode afterwards."""
    if not any(module.training for module in model.modules()):  # already: nothing to switch
        yield
        return
    if model.training:
        logger.info("Fisher: model is in training mode; using eval mode (no dropout) meanwhile")
    with eval_mode(model):
        yield


def distributed_shard() -> tuple[int, int]:
    """``(rank, world_size)`` under an initialized torch.distributed, else ``(0, 1)``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard_indices(encodings: Sequence[Encoding]) -> list[int]:
    """This process's examples (indices into ``encodings``): the data sorted by length, longest
    first, then every ``world_size``-th from this rank on; all of them outside
    torch.distributed. Every estimator shards this way, so each example is seen by one rank."""
    rank, world = distributed_shard()
    by_length = sorted(range(len(encodings)), key=lambda i: -len(encodings[i].input_ids))
    return by_length[rank::world]


def all_reduce_sum(x: Tensor) -> Tensor:
    """``x`` summed in place over the ranks (unchanged outside torch.distributed); returns it."""
    if distributed_shard()[1] > 1:
        dist.all_reduce(x)
    return x


def fsdp_sharded(model: torch.nn.Module) -> bool:
    """Whether ``model`` is sharded by FSDP2 (``fully_shard``) over a 1-D mesh: every DTensor
    parameter split along its first dimension (``Shard(0)``). Each rank then runs whole layers
    on its own inputs (FSDP gathers the weights for each forward and backward), so a layer's
    inputs and output gradients are full, as in a plain model."""
    if not (dist.is_available() and dist.is_initialized()):
        return False
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor, Shard

    if not any(isinstance(m, FSDPModule) for m in model.modules()):
        return False
    return all(p.device_mesh.ndim == 1 and tuple(p.placements) == (Shard(0),)
               for p in model.parameters() if isinstance(p, DTensor))


def unwrap_model(model: torch.nn.Module, allow_fsdp: bool = False) -> torch.nn.Module:
    """The model inside ``DistributedDataParallel`` / ``DataParallel`` wrappers (whose
    parameter names carry a ``module.`` prefix); every rank holds all of its weights.

    Args:
        model: the model, plain or wrapped.
        allow_fsdp: accept a model sharded by FSDP2 over a 1-D mesh (:func:`fsdp_sharded`):
            the Kronecker-factored Fisher needs only its layers' inputs and output gradients.

    Raises:
        FisherError: a model sharded by FSDP (``FullyShardedDataParallel`` or ``fully_shard``;
            with ``allow_fsdp``, any sharding other than :func:`fsdp_sharded`), or with DTensor
            parameters: the other estimators need every weight on every rank.
    """
    while isinstance(model, torch.nn.parallel.DistributedDataParallel | torch.nn.DataParallel):
        model = model.module
    if not (dist.is_available() and dist.is_initialized()):  # no sharded model without a group
        return model
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    from torch.distributed.tensor import DTensor

    sharded = (any(isinstance(m, FSDPModule | FullyShardedDataParallel) for m in model.modules())
               or any(isinstance(p, DTensor) for p in model.parameters()))
    if not sharded or (allow_fsdp and fsdp_sharded(model)):
        return model
    raise FisherError(
        f"{type(model).__name__} is sharded (FSDP or DTensor parameters); the Fisher "
        "estimators need the whole model on every rank (fisher.kfac accepts FSDP2 fully_shard "
        "over a 1-D mesh for its linear layers). Load an unsharded copy in each "
        "process (from_pretrained, or the full state dict from torch.distributed."
        "checkpoint.state_dict.get_model_state_dict(model, options=StateDictOptions("
        "full_state_dict=True))) and pass that, plain or wrapped in "
        "DistributedDataParallel: the examples are still split over the ranks")


class GradientStream:
    """Streams :class:`GradientBlock` s over this process's shard of the data.

    Each pass (each iteration) recomputes the gradients; the hooks/vmap/loop choice is made on
    the first block of the first pass and kept (or taken from an earlier run's check on the
    same unchanged model, see the module docstring). Under torch.distributed each rank takes
    its :func:`shard_indices`. With ``check_finite`` (the default) every gradient tensor is
    checked for non-finite rows when formed, and a :class:`FisherError` names the parameter
    and the example; a caller that detects non-finite results itself may turn it off.
    """

    def __init__(self, model: torch.nn.Module, encodings: list[Encoding],
                 params: dict[str, Tensor], *, estimator: Estimator, mc_samples: int,
                 batch_size: int, seed: int, pad_token_id: int, per_example: PerExample,
                 check_finite: bool = True):
        check_sampling(estimator, batch_size, mc_samples)
        if per_example not in PER_EXAMPLE:
            raise FisherError(f"per_example must be one of {PER_EXAMPLE}, got {per_example!r}")
        self.model, self.encodings, self.estimator = model, encodings, estimator
        self.params = {name: p.detach() for name, p in params.items()}
        self.draws = mc_samples if estimator == "true" else 1
        self.batch_size, self.seed, self.pad_token_id = batch_size, seed, pad_token_id
        self.mode = None if per_example == "auto" else per_example
        self.check_finite = check_finite
        self.indices = shard_indices(encodings)
        first = next(iter(self.params.values()))
        self.device, self.tolerance = first.device, _CHECK_RTOL.get(first.dtype, 1e-3)
        self.verified = self.mode is None and verified_architecture(model)
        if self.mode is None:
            self._state = _model_state(model, self.params)
            state, mode = _CHECKED.get(model, (None, None))
            if state == self._state:
                logger.debug("per-example gradients: %s (checked on an earlier run on this "
                             "model)", mode)
                self.mode = mode

    def __iter__(self) -> Iterator[GradientBlock]:
        for start in range(0, len(self.indices), self.batch_size):
            examples = self.indices[start : start + self.batch_size]
            batch = collate([self.encodings[i] for i in examples], self.pad_token_id,
                            device=self.device)
            labels = self._labels(batch, examples)
            rows = {key: batch[key].repeat_interleave(self.draws, dim=0)
                    for key in ("input_ids", "attention_mask", "position_ids")}
            grads = self._gradients(rows, labels)
            if self.check_finite and isinstance(grads, HookGradients):  # as each is formed
                grads = _FiniteChecked(grads, examples, self.draws)
            elif self.check_finite:
                _check_finite(grads, examples, self.draws)
            yield GradientBlock(grads, examples, self.draws)

    def _labels(self, batch: dict[str, Tensor], examples: list[int]) -> Tensor:
        if self.estimator == "empirical":
            return batch["labels"]
        generators = true_fisher_generators(self.seed, examples, self.device)
        with torch.no_grad():
            logits = forward_logits(self.model, batch)
        return sample_labels(logits, batch["labels"], self.draws, generators)

    def _gradients(self, rows: dict[str, Tensor], labels: Tensor) -> Mapping[str, Tensor]:
        input_ids = rows["input_ids"]
        lengths = rows["attention_mask"].sum(-1).tolist()
        if self.mode == "loop":
            return loop_gradients(self.model, self.params, input_ids, labels, lengths)
        if self.mode == "vmap":
            return vmap_gradients(self.model, self.params, input_ids, labels)
        if self.mode == "hooks":
            return hook_gradients(self.model, self.params, rows, labels)
        if self.mode is None:  # auto, first block: hooks if they match the loop
            grads = self._checked_hooks(rows, labels, lengths)
            if grads is not None:
                return grads
        return self._checked_vmap(input_ids, labels, lengths)

    def _checked_hooks(self, rows: dict[str, Tensor], labels: Tensor, lengths: list[int]
                       ) -> HookGradients | None:
        """Hook gradients of the first block, checked against the loop on its shortest row
        (the one with the most padding); ``None`` (and mode "auto-vmap") if they fail or
        disagree."""
        name = type(self.model).__name__
        row = min(range(len(lengths)), key=lengths.__getitem__)
        try:
            grads = hook_gradients(self.model, self.params, rows, labels)
            ours = None if self.verified else {n: g[None] for n, g in grads.row(row).items()}
        except Exception as err:  # an unsupported module or any other failure: use vmap
            logger.info("per-example gradients: layer hooks cannot handle %s (%s: %s); trying "
                        "vmap", name, type(err).__name__, str(err).splitlines()[0][:200])
            self.mode = "auto-vmap"
            return None
        self.mode = "hooks"
        if ours is None:
            logger.info("per-example gradients: layer hooks (verified architecture %s)", name)
            return grads
        reference = loop_gradients(self.model, self.params, rows["input_ids"][[row]],
                                   labels[[row]], [lengths[row]])
        error = _relative_difference(ours, reference)
        if not error <= self.tolerance and not math.isnan(error):
            logger.warning("per-example gradients: layer hooks and the backward loop disagree "
                           "on %s (relative difference %.3g > %.1g); trying vmap", name, error,
                           self.tolerance)
            self.mode = "auto-vmap"
            return None
        logger.info("per-example gradients: layer hooks (match the loop to %.2g)", error)
        if error <= self.tolerance:  # not NaN: a non-finite gradient is reported, not remembered
            _CHECKED[self.model] = (self._state, self.mode)
        return grads

    def _checked_vmap(self, input_ids: Tensor, labels: Tensor, lengths: list[int]
                      ) -> dict[str, Tensor]:
        name = type(self.model).__name__
        try:
            grads = vmap_gradients(self.model, self.params, input_ids, labels)
        except Exception as err:  # any tracing failure means: use the loop
            logger.warning("per-example gradients: vmap cannot trace %s (%s: %s); using the "
                           "per-example backward loop", name, type(err).__name__,
                           str(err).splitlines()[0][:200])
        else:
            rows = sorted({0, min(range(len(lengths)), key=lengths.__getitem__)})
            reference = loop_gradients(self.model, self.params, input_ids[rows], labels[rows],
                                       [lengths[r] for r in rows])
            error = _relative_difference({n: g[rows] for n, g in grads.items()}, reference)
            if math.isnan(error):  # non-finite gradients either way: _check_finite reports them
                return grads
            if error <= self.tolerance:
                logger.info("per-example gradients: vmap (matches the loop to %.2g)", error)
                self.mode = "vmap"
                _CHECKED[self.model] = (self._state, self.mode)
                return grads
            logger.warning("per-example gradients: vmap and the backward loop disagree on "
                           "%s (relative difference %.3g > %.1g); using the loop", name, error,
                           self.tolerance)
        self.mode = "loop"
        return loop_gradients(self.model, self.params, input_ids, labels, lengths)


def verified_architecture(model: torch.nn.Module) -> bool:
    """Whether ``"auto"`` may take ``model``'s layer hooks unchecked: a transformers class in
    :data:`VERIFIED_ARCHITECTURES` whose parameter-owning modules all come from ``torch.nn``,
    transformers' ``pytorch_utils`` or the class's own modeling file."""
    cls = type(model)
    if cls.__name__ not in VERIFIED_ARCHITECTURES or not cls.__module__.startswith(
            "transformers.models."):
        return False
    homes = (cls.__module__, "transformers.pytorch_utils")
    return all(type(m).__module__.startswith("torch.nn.") or type(m).__module__ in homes
               for m in model.modules() if next(m.parameters(recurse=False), None) is not None)


def _model_state(model: torch.nn.Module, params: Mapping[str, Tensor]) -> tuple:
    """What an ``"auto"`` check of the per-example method on ``model`` stands for: the chosen
    parameters, every parameter's identity, storage, shape, dtype, device and version counter
    (bumped by every in-place write through autograd's view of it, e.g. an optimizer step or
    ``load_state_dict``), the module tree and the attention implementation."""
    config = getattr(model, "config", None)
    return (tuple(params),
            tuple((name, id(p), p.data_ptr(), p._version, p.shape, p.dtype, p.device)
                  for name, p in model.named_parameters()),
            tuple(map(id, model.modules())),
            getattr(config, "_attn_implementation", None))


class _FiniteChecked(Mapping[str, Tensor]):
    """A :class:`HookGradients` whose tensors are checked for non-finite entries as formed."""

    def __init__(self, grads: HookGradients, examples: list[int], draws: int):
        self.grads, self.examples, self.draws = grads, examples, draws

    def __getitem__(self, name: str) -> Tensor:
        g = self.grads[name]
        _check_finite({name: g}, self.examples, self.draws)
        return g

    def __iter__(self) -> Iterator[str]:
        return iter(self.grads)

    def __len__(self) -> int:
        return len(self.grads)


def _relative_difference(a: Mapping[str, Tensor], b: dict[str, Tensor]) -> float:
    diff = sum(float((a[n].double() - b[n].double()).pow(2).sum()) for n in b)
    norm = sum(float(b[n].double().pow(2).sum()) for n in b)
    return (diff / max(norm, torch.finfo(torch.float64).tiny)) ** 0.5


def _check_finite(grads: dict[str, Tensor], examples: list[int], draws: int) -> None:
    for name, g in grads.items():
        finite = torch.isfinite(g.reshape(len(g), -1).sum(1, dtype=torch.float32))
        if not bool(finite.all()):
            row = int((~finite).nonzero()[0])
            draw = f" (label draw {row % draws})" if draws > 1 else ""
            raise FisherError(
                f"non-finite gradient of parameter {name!r} for example {examples[row // draws]}"
                f"{draw}: check the weights and the example's log-likelihood (a label with zero "
                "probability gives -inf)")
