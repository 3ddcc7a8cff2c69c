"""What every Fisher representation shares: the setup of an estimator (:func:`prepare_inputs`),
provenance, the common interface, and the on-disk format (safetensors for the tensors + a JSON sidecar for everything else).

A Fisher saved to ``out/fisher`` is two files: ``out/fisher.safetensors`` and
``out/fisher.json``. The sidecar records the representation (``kind``), the covered parameters
and their shapes, and :class:`Provenance`. :func:`load` reads any representation and checks
it against the model it will be used with; it reads tensors and JSON only, never code.

An update ``delta`` given to the interface is a :class:`~forgetkit.fisher.delta.ParamDelta`
(entries it lacks are no update) or a dict name -> tensor, which must hold every parameter the
Fisher covers (pass zeros to exclude one), so a misspelt name is an error rather than a zero.
Dense entries have the parameter's shape; a :class:`~forgetkit.fisher.delta.LoraFactor` is the
update ``scale * B @ A`` of the layer's (out, in) matrix, as PEFT defines it, so for a weight
stored (in, out) (GPT-2's ``Conv1D``) it is the transpose of the parameter's update.
"""

from __future__ import annotations

import json
import logging
import operator
import os
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import Tensor

import forgetkit
from forgetkit.files import atomic_write_bytes, atomic_write_json
from forgetkit.fisher.delta import LoraFactor, ParamDelta, module_groups
from forgetkit.fisher.directions import Eigenpairs, TopEntries, top_entries
from forgetkit.fisher.pergrad import (
    FisherError,
    distributed_shard,
    encode_data,
    select_parameters,
    unwrap_model,
)
from forgetkit.models import Encoding
from forgetkit.models.storage import weights_hash
from forgetkit.seeding import stable_hash

__all__ = ["Delta", "FisherInputs", "FisherMatrix", "Provenance", "accumulation_dtype",
           "fisher_paths", "load", "make_provenance", "prepare_inputs"]

logger = logging.getLogger(__name__)
FORMAT = "forgetkit.fisher"
FORMAT_VERSION = 1
Delta = Mapping[str, Tensor] | ParamDelta


@dataclass(frozen=True)
class Provenance:
    """Where a Fisher came from.

    Attributes:
        model: the model's ``config._name_or_path`` (or its class name).
        weights_hash: hash of every parameter's name, shape, dtype and bytes.
        data_hash: hash of the encoded examples (input ids and labels, in data order).
        estimator: ``"true"`` or ``"empirical"``.
        n: number of examples N.
        mc_samples: label draws per example (1 for the empirical Fisher).
        seed: seed of the label draws (and of the randomized sketch).
        params: the parameter pattern(s), ``None`` for all trainable parameters.
        dtype: accumulation dtype.
        forgetkit_version: version of the code that computed it.
        world_size: processes that shared the data.
    """

    model: str
    weights_hash: str
    data_hash: str
    estimator: str
    n: int
    mc_samples: int
    seed: int
    params: str | list[str] | None
    dtype: str
    forgetkit_version: str
    world_size: int = 1


def make_provenance(model: torch.nn.Module, encodings: Sequence[Encoding], *, estimator: str,
                    mc_samples: int, seed: int, params: str | Sequence[str] | None,
                    dtype: torch.dtype) -> Provenance:
    """The :class:`Provenance` of a Fisher about to be computed."""
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", "") or type(model).__name__
    return Provenance(
        model=str(name), weights_hash=weights_hash(model),
        data_hash=stable_hash([[e.input_ids, e.labels] for e in encodings]),
        estimator=estimator, n=len(encodings), mc_samples=mc_samples, seed=seed,
        params=params if params is None or isinstance(params, str) else list(params),
        dtype=str(dtype).removeprefix("torch."), forgetkit_version=forgetkit.__version__,
        world_size=distributed_shard()[1],
    )


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Check that ``dtype`` is float32 or float64."""
    if dtype not in (torch.float32, torch.float64):
        raise FisherError(f"dtype must be torch.float32 or torch.float64 (the accumulation "
                          f"precision), got {dtype}")
    return dtype


class FisherInputs(NamedTuple):
    """What every estimator starts from (:func:`prepare_inputs`), in the order it unpacks.

    Attributes:
        model: the model to run: the one passed, unwrapped from ``DistributedDataParallel`` /
            ``DataParallel`` (:func:`~forgetkit.fisher.pergrad.unwrap_model`), so parameter
            names, hooks and provenance are the plain model's.
        encodings: the examples, encoded (completion tokens labelled).
        params: name -> the selected parameters of the model, in the model's order.
        device: where accumulators and results live.
        pad_token_id: the tokenizer's padding id (0 without one).
        dtype: accumulation precision, float32 or float64.
        provenance: of the Fisher about to be computed.
    """

    model: torch.nn.Module
    encodings: list[Encoding]
    params: dict[str, Tensor]
    device: torch.device
    pad_token_id: int
    dtype: torch.dtype
    provenance: Provenance


def prepare_inputs(model: torch.nn.Module, tokenizer, data: Sequence, *,
                   params: str | Sequence[str] | None, device: str | torch.device | None,
                   dtype: torch.dtype, estimator: str, mc_samples: int, seed: int,
                   allow_fsdp: bool = False) -> FisherInputs:
    """The setup the diagonal, low-rank and Kronecker-factored estimators share: unwrap the
    model from DDP, check the accumulation ``dtype``, encode ``data``, select ``params``, pick
    the device (default: the first selected parameter's) and record the provenance.
    ``allow_fsdp`` accepts a model sharded by FSDP2 (see
    :func:`~forgetkit.fisher.pergrad.unwrap_model`).

    Raises:
        FisherError: a sharded model (unless allowed), a bad ``dtype``, empty data or an
            example without completion tokens, a pattern that selects no parameter.
    """
    model = unwrap_model(model, allow_fsdp=allow_fsdp)
    dtype = accumulation_dtype(dtype)
    encodings = encode_data(tokenizer, data)
    chosen = select_parameters(model, params)
    device = torch.device(device) if device is not None else next(iter(chosen.values())).device
    provenance = make_provenance(model, encodings, estimator=estimator, mc_samples=mc_samples,
                                 seed=seed, params=params, dtype=dtype)
    return FisherInputs(model=model, encodings=encodings, params=chosen, device=device,
                        pad_token_id=getattr(tokenizer, "pad_token_id", None) or 0, dtype=dtype,
                        provenance=provenance)


def fisher_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """``(tensors, sidecar)``: ``path`` with suffix ``.safetensors`` and ``.json``."""
    path = Path(path)
    if path.suffix in (".safetensors", ".json"):
        path = path.with_suffix("")
    return path.with_name(path.name + ".safetensors"), path.with_name(path.name + ".json")


class FisherMatrix(ABC):
    """The interface of every representation: callers never branch on the type.

    A Fisher covers the parameters in :attr:`shapes` and is zero outside them. Its eigenpairs are
    ordered by descending eigenvalue; ``top(k)``, ``coordinates(delta, k)`` and
    ``project(delta, k)`` all refer to the same k leading directions.
    """

    kind: ClassVar[str]
    _kinds: ClassVar[dict[str, type[FisherMatrix]]] = {}
    provenance: Provenance

    def __init_subclass__(cls, **kwargs: Any):
        super().__init_subclass__(**kwargs)
        FisherMatrix._kinds[cls.kind] = cls

    @property
    @abstractmethod
    def shapes(self) -> dict[str, torch.Size]:
        """Parameter name -> shape, for every parameter the Fisher covers."""

    @property
    def size(self) -> int:
        """P, the number of parameter entries covered."""
        return sum(shape.numel() for shape in self.shapes.values())

    @property
    def rank(self) -> int:
        """Eigendirections the representation holds: k for the low-rank Fisher, P for the
        diagonal and Kronecker-factored ones (some of whose eigenvalues may be zero)."""
        return self.size

    @property
    def n(self) -> int:
        """Number of examples averaged."""
        return self.provenance.n

    @abstractmethod
    def quad_form(self, delta: Delta) -> float:
        """``d' F d`` for an update ``d`` (see the module docstring), float64.

        Entries of ``delta`` for parameters outside the Fisher are ignored.
        """

    @abstractmethod
    def top(self, k: int) -> Eigenpairs:
        """The ``k`` largest eigenvalues and their unit eigenvectors (1 <= k <= :attr:`rank`)."""

    @abstractmethod
    def coordinates(self, delta: Delta, k: int | None = None) -> Tensor:
        """(k,) float64: ``u_j . d`` for the directions ``u_j`` of ``top(k)``, in their order.

        ``k=None``: every direction held (:attr:`rank`).
        """

    @abstractmethod
    def project(self, delta: Delta, k: int | None = None) -> dict[str, Tensor]:
        """The component of ``d`` in the span of the directions of ``top(k)``,
        ``sum_j (u_j . d) u_j``: name -> float64 tensor of the parameter's shape, for every
        covered parameter. ``k=None``: every direction held (:attr:`rank`)."""

    @abstractmethod
    def trace(self) -> float:
        """``tr F`` (for the low-rank representation: of the rank-k approximation)."""

    @property
    @abstractmethod
    def quad_form_label(self) -> str:
        """What :meth:`quad_form` is as an estimate of the exact ``d' F d``, for reports: a
        lower bound (low-rank truncation), an approximation (Kronecker-factored) or a proxy
        (diagonal)."""

    @property
    def exact_eigendirections(self) -> bool:
        """Whether :meth:`top` gives eigenvectors of the exact Fisher (not of an estimate or an
        approximation of it): only then is the quadratic form of an update projected onto them
        a lower bound of the update's own."""
        return False

    def details(self) -> dict[str, Any]:
        """The representation's own settings, JSON-ready (e.g. how the low-rank directions
        were found, which parameters a Kronecker-factored Fisher keeps on the diagonal).
        Reports show them; no caller needs them to compute."""
        return {}

    @abstractmethod
    def _parameter_stats(self) -> dict[str, tuple[float, float]]:
        """name -> (trace of F on the parameter, squared norm of the leading eigenvector there)."""

    @abstractmethod
    def _tensors(self) -> dict[str, Tensor]: ...

    def _extra(self) -> dict[str, Any]:
        return {}

    @classmethod
    @abstractmethod
    def _from_saved(cls, tensors: dict[str, Tensor], shapes: dict[str, torch.Size],
                    provenance: Provenance, extra: dict[str, Any]) -> FisherMatrix: ...

    def _rank_k(self, k: int | None, name: str = "k") -> int:
        """``k`` checked against :attr:`rank` (``None`` -> :attr:`rank`); an error names the
        argument as ``name``."""
        if k is None:
            return self.rank
        try:
            count = None if isinstance(k, bool) else operator.index(k)
        except TypeError:
            count = None
        if count is None or not 1 <= count <= self.rank:
            raise FisherError(f"{name}={k!r} must be an integer between 1 and {self.rank}, the "
                              f"number of eigendirections this {self.kind} Fisher holds")
        return count

    def _top_entries(self, values: dict[Any, Tensor], k: int) -> TopEntries:
        """:func:`~forgetkit.fisher.directions.top_entries` of ``values``, remembered while
        the tensors are the same and unchanged (same objects, same version counters):
        :func:`~forgetkit.fisher.project.project` asks for the same k leading entries once per
        module of the update, and on SmolLM2 each search runs over 134M entries."""
        key = (k, tuple((name, id(t), t._version) for name, t in values.items()))
        cache = self.__dict__.setdefault("_top_cache", {})
        if key not in cache:
            if len(cache) >= 4:  # a few recent searches (each k-sized)
                cache.pop(next(iter(cache)))
            # the entry holds the tensors, so no other tensor can take their ids meanwhile
            cache[key] = (tuple(values.values()), top_entries(values, k))
        return cache[key][1]

    def summary(self) -> list[dict[str, Any]]:
        """Per-module rows (tidy data), in parameter order.

        Each row: ``module`` (parameter name without its last part), ``parameters`` (count),
        ``trace`` (of F on the module's parameters), ``trace_share`` (of the total trace) and
        ``top_share`` (share of the leading eigenvector's squared norm in the module, i.e. of the
        top eigenvalue; for the diagonal representation the leading eigenvector is the largest
        entry's coordinate, so one module has 1 and the others 0).
        """
        stats = self._parameter_stats()
        rows = [{"module": module, "parameters": sum(self.shapes[n].numel() for n in names),
                 "trace": sum(stats[n][0] for n in names),
                 "top_share": sum(stats[n][1] for n in names)}
                for module, names in module_groups(stats).items()]
        total = sum(row["trace"] for row in rows)
        for row in rows:
            row["trace_share"] = row["trace"] / total if total > 0 else 0.0
        return rows

    def _entry(self, delta: Delta, name: str) -> Tensor | LoraFactor | None:
        """``delta``'s update of parameter ``name``, shape-checked; ``None`` when a ParamDelta
        has no entry for it (no update).

        Raises:
            FisherError: a dict without the parameter, or an entry of another shape.
        """
        expected = tuple(self.shapes[name])
        if isinstance(delta, ParamDelta):
            if name not in delta.entries:
                return None
            value = delta.entries[name]
        elif name in delta:
            value = delta[name]
        else:
            raise FisherError(f"delta has no entry for parameter {name!r}, which the Fisher "
                              "covers (pass zeros to exclude it)")
        if isinstance(value, LoraFactor):
            if tuple(value.shape) not in (expected, expected[::-1]):
                raise FisherError(f"delta[{name!r}] is a LoRA update of shape "
                                  f"{tuple(value.shape)}, the parameter has {expected}")
        elif tuple(value.shape) != expected:
            raise FisherError(f"delta[{name!r}] has shape {tuple(value.shape)}, the parameter "
                              f"has {expected}")
        return value

    def _delta(self, delta: Delta, name: str, device: torch.device) -> Tensor:
        """``delta[name]`` as a dense float64 tensor of the parameter's shape on ``device``
        (zeros for no update; a LoRA update merged, transposed for an (in, out) weight)."""
        value = self._entry(delta, name)
        if value is None:
            return torch.zeros(self.shapes[name], dtype=torch.float64, device=device)
        if isinstance(value, LoraFactor):
            merged = LoraFactor(value.B.to(device, torch.float64),
                                value.A.to(device, torch.float64), value.scale).dense()
            return merged if merged.shape == self.shapes[name] else merged.T
        return value.detach().to(device=device, dtype=torch.float64)

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``<path>.safetensors`` and the ``<path>.json`` sidecar atomically.

        Returns:
            The path of the ``.safetensors`` file.
        """
        tensor_path, sidecar_path = fisher_paths(path)
        tensors = {key: t.detach().contiguous().cpu() for key, t in self._tensors().items()}
        atomic_write_bytes(tensor_path, safetensors_save(tensors, {"format": FORMAT,
                                                                   "kind": self.kind}))
        atomic_write_json(sidecar_path, {
            "format": FORMAT, "format_version": FORMAT_VERSION, "kind": self.kind,
            "tensors": tensor_path.name,
            "parameters": {name: list(shape) for name, shape in self.shapes.items()},
            "provenance": asdict(self.provenance), **self._extra(),
        })
        return tensor_path

    @classmethod
    def load(cls, path: str | os.PathLike, model: torch.nn.Module | None = None
             ) -> FisherMatrix:
        """Read a saved Fisher (see :func:`load`); fails if it is not a ``cls``."""
        fisher = load(path, model)
        if not isinstance(fisher, cls):
            raise FisherError(f"{path}: holds a {fisher.kind} Fisher, not a {cls.kind} one")
        return fisher


def load(path: str | os.PathLike, model: torch.nn.Module | None = None) -> FisherMatrix:
    """Read a Fisher written by :meth:`FisherMatrix.save`, on the model's device.

    Args:
        path: the ``.safetensors`` file, its ``.json`` sidecar, or their common stem.
        model: checked against the saved parameter names and shapes; a different
            ``weights_hash`` (e.g. a fine-tuned model) only logs a warning.

    Raises:
        FisherError: missing file, not a forgetkit Fisher, or a parameter the model lacks or
            holds with another shape (named in the message).
    """
    tensor_path, sidecar_path = fisher_paths(path)
    for file in (sidecar_path, tensor_path):
        if not file.is_file():
            raise FisherError(f"{file}: no such file (a Fisher is a .safetensors file and its "
                              ".json sidecar)")
    meta, shapes, provenance = _read_sidecar(sidecar_path)
    device = torch.device("cpu")
    if model is not None:
        _check_model(model, shapes, provenance, sidecar_path)
        device = next(model.parameters()).device
    tensors = {k: v.to(device) for k, v in _read_tensors(tensor_path, meta["kind"]).items()}
    extra = {k: v for k, v in meta.items() if k not in
             ("format", "format_version", "kind", "tensors", "parameters", "provenance")}
    try:
        return FisherMatrix._kinds[meta["kind"]]._from_saved(tensors, shapes, provenance, extra)
    except KeyError as err:
        raise FisherError(f"{tensor_path}: tensor {err.args[0]!r} that a {meta['kind']} Fisher "
                          f"needs is missing (or field {err.args[0]!r} of {sidecar_path})"
                          ) from None
    except (TypeError, ValueError, RuntimeError) as err:
        raise FisherError(f"{tensor_path} / {sidecar_path}: the tensors do not fit the sidecar: "
                          f"{err}") from None


def _read_sidecar(path: Path) -> tuple[dict[str, Any], dict[str, torch.Size], Provenance]:
    """The sidecar's JSON, parameter shapes and provenance, each field checked and named."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise FisherError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise FisherError(f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: "
                          f"{err.msg} (a truncated or edited sidecar?)") from None
    if not isinstance(meta, dict):
        raise FisherError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    if meta.get("format") != FORMAT or meta.get("kind") not in FisherMatrix._kinds:
        raise FisherError(f"{path}: not a forgetkit Fisher (format={meta.get('format')!r},"
                          f" kind={meta.get('kind')!r}; kinds: {', '.join(FisherMatrix._kinds)})")
    parameters = meta.get("parameters")
    if not isinstance(parameters, dict) or not all(
            isinstance(s, list) and all(isinstance(d, int) and d >= 0 for d in s)
            for s in parameters.values()):
        raise FisherError(f"{path}: field 'parameters' must map parameter names to shapes "
                          "(lists of sizes)")
    shapes = {name: torch.Size(shape) for name, shape in parameters.items()}
    saved = meta.get("provenance")
    if not isinstance(saved, dict):
        raise FisherError(f"{path}: field 'provenance' is missing or not an object")
    known = {f.name: f for f in fields(Provenance)}
    missing = [name for name, f in known.items() if f.default is MISSING and name not in saved]
    if missing:
        raise FisherError(f"{path}: field 'provenance.{missing[0]}' is missing")
    unknown = sorted(set(saved) - set(known))
    if unknown:
        raise FisherError(f"{path}: unknown field 'provenance.{unknown[0]}'")
    return meta, shapes, Provenance(**saved)


def _read_tensors(path: Path, kind: str) -> dict[str, Tensor]:
    """The tensors of a Fisher's ``.safetensors`` file; a truncated or corrupt file, or one of
    another kind than its sidecar says, is named."""
    from safetensors import SafetensorError, safe_open

    data = path.read_bytes()
    try:
        tensors = safetensors_load(data)
        with safe_open(path, framework="pt") as handle:
            header = handle.metadata() or {}
    except SafetensorError as err:
        raise FisherError(f"{path}: corrupt or truncated safetensors file ({err})") from None
    if header.get("kind") not in (None, kind):
        raise FisherError(f"{path}: holds a {header['kind']} Fisher but its sidecar says {kind}")
    return tensors


def _check_model(model: torch.nn.Module, shapes: dict[str, torch.Size],
                 provenance: Provenance, where: Path) -> None:
    named = dict(model.named_parameters())
    for name, shape in shapes.items():
        if name not in named:
            raise FisherError(f"{where}: the Fisher covers parameter {name!r}, which the model "
                              f"({type(model).__name__}) does not have")
        if named[name].shape != shape:
            raise FisherError(f"{where}: parameter {name!r} has shape {tuple(shape)} in the "
                              f"Fisher but {tuple(named[name].shape)} in the model")
    if weights_hash(model) != provenance.weights_hash:
        logger.warning("%s: the model's weights differ from those the Fisher was computed on "
                       "(%s, weights %s)", where, provenance.model, provenance.weights_hash)
