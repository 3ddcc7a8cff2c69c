"""forgetkit's diagnostics inside a transformers ``Trainer`` or TRL trainer run.

:class:`ForgettingCallback` measures, while the trainer trains, what the update so far costs the
model against its base:

- ``memorization`` (and ``paraphrase``) of the injected records and the accuracy of every probe
  capability, each with its 95% bootstrap interval over items, and the ``retention`` of the
  probe capabilities against the base, with its paired interval over probes
  (:func:`forgetkit.diagnostics.evaluation.evaluate`, ``accuracy_interval``,
  ``retention_interval``);
- ``kl``: the measured ``KL(p_base || p_now)`` summed over each probe's answer tokens and
  averaged over probes, with its interval (:func:`forgetkit.fisher.measured_kl`,
  ``per_sequence``), and ``kl_per_token``;
- ``displacement``: the exact true-Fisher quadratic form ``d' F d`` of the update ``d`` (now
  minus base) at the base, on the probes, with its interval, and ``predicted_kl = d' F d / 2``
  (:func:`forgetkit.fisher.displacement`), unless ``displacement=False``.

Every value is logged under ``forgetting/<name>`` (intervals as ``<name>_low`` /
``<name>_high``) through ``transformers.Trainer.log``, so it lands in
``trainer.state.log_history`` and reaches every reporter the run enabled; the base class's
``log`` is called, not a subclass override, so TRL's running training averages are left to
its own log lines. One JSON row per measurement (the same values, plus the per-capability
details) is appended to ``<output_dir>/forgetting.jsonl``; the first row (step 0) is the base.

The base:

- full fine-tuning: a copy of the trainable parameters is taken at ``on_train_begin`` (only
  those; frozen ones are the base's already), on their device and in their dtype. The base
  is evaluated by swapping these tensors into the model and back (no copy of the model).
- PEFT (LoRA): the base is the model with its adapter disabled (``model.disable_adapter()``);
  nothing is copied, and the update is kept as LoRA factors.

Devices and processes: everything runs on the model's device, in the parameters' dtype (the
autocast wrapper of bf16/fp16 mixed-precision training is bypassed meanwhile). Under DDP every rank computes
(the Fisher displacement splits its probes over the ranks and all-reduces; evaluation and
the KL are repeated on each rank, on identical weights) and logs through ``Trainer.log`` as
the trainer does with its own metrics (reporters act on the main process only); the JSONL
is written by the main process only. FSDP and DeepSpeed (sharded parameters) are refused.

Example:
    >>> from forgetkit.integrations import ForgettingCallback
    >>> trainer = SFTTrainer(model=model, args=args, train_dataset=dataset,  # doctest: +SKIP
    ...                      processing_class=tokenizer)
    >>> ForgettingCallback(probes, records=records, every=20).attach(trainer)  # doctest: +SKIP
    >>> trainer.train()  # doctest: +SKIP
    >>> [log for log in trainer.state.log_history if "forgetting/kl" in log]  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import Trainer, TrainerCallback

from forgetkit.data.records import Probe, Record
from forgetkit.diagnostics.evaluation import (
    Scores,
    accuracy_interval,
    evaluate,
    retention,
    retention_interval,
)
from forgetkit.files import append_jsonl, atomic_write_jsonl
from forgetkit.fisher.delta import ParamDelta, lora_factors
from forgetkit.fisher.exact import displacement as exact_displacement
from forgetkit.fisher.kl import measured_kl
from forgetkit.fisher.pergrad import ESTIMATORS, unwrap_model
from forgetkit.models import encode, eval_mode

__all__ = ["ForgettingCallback"]

logger = logging.getLogger(__name__)

PREFIX = "forgetting/"


# --- the base: swapped-in weights (full fine-tuning) or the disabled adapter (PEFT) -------------

class _FullBase:
    """The base values of a full fine-tune's trainable parameters, swapped in on demand."""

    def __init__(self, model: torch.nn.Module, weights: Mapping[str, Tensor] | None = None):
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not trainable:
            raise ValueError("ForgettingCallback: the model has no trainable parameter, so "
                             "there is no update to measure")
        if weights is not None:
            missing = [n for n in trainable if n not in weights]
            if missing:
                raise ValueError(f"ForgettingCallback: base_weights lacks the trainable "
                                 f"parameter {missing[0]!r} ({len(missing)} missing)")
            for name, p in trainable.items():
                if tuple(weights[name].shape) != tuple(p.shape):
                    raise ValueError(f"ForgettingCallback: base_weights[{name!r}] has shape "
                                     f"{tuple(weights[name].shape)}, the model's "
                                     f"{tuple(p.shape)}")
        source = weights if weights is not None else {n: p.detach() for n, p in trainable.items()}
        self.saved = {n: source[n].detach().to(p.device, p.dtype, copy=True)
                      for n, p in trainable.items()}

    @contextlib.contextmanager
    def active(self, model: torch.nn.Module) -> Iterator[None]:
        named = dict(model.named_parameters())
        with torch.no_grad():
            for name, base in self.saved.items():
                named[name].data, self.saved[name] = base, named[name].data
            try:
                yield
            finally:
                for name, now in self.saved.items():
                    named[name].data, self.saved[name] = now, named[name].data

    def delta(self, model: torch.nn.Module) -> ParamDelta:
        named = dict(model.named_parameters())
        return ParamDelta({n: named[n].detach().float() - base.float()
                           for n, base in self.saved.items()})


class _AdapterBase:
    """The base of a PEFT LoRA model: the same model with the adapter disabled."""

    def __init__(self, model: torch.nn.Module):
        factors = lora_factors(model)
        if not factors:
            raise ValueError("ForgettingCallback: the PEFT model has no LoRA layer of its active "
                             f"adapter {model.active_adapter!r}")
        covered = {f"{m}.lora_{side}.{model.active_adapter}.weight"
                   for m in factors for side in "AB"}
        other = [n for n, p in model.named_parameters() if p.requires_grad and n not in covered]
        if other:
            raise ValueError(f"ForgettingCallback: the PEFT model trains {other[0]!r}, which is "
                             "not a LoRA factor of its active adapter (modules_to_save, DoRA or "
                             "embedding adapters are not supported): the update would be "
                             "measured incompletely")
        named = dict(model.named_parameters())
        missing = [m for m in factors if f"{m}.base_layer.weight" not in named]
        if missing:
            raise ValueError(f"ForgettingCallback: LoRA layer {missing[0]!r} has no "
                             "base_layer.weight")

    @staticmethod
    def active(model: torch.nn.Module):
        return model.disable_adapter()

    @staticmethod
    def delta(model: torch.nn.Module) -> ParamDelta:
        return ParamDelta({f"{m}.base_layer.weight": f
                           for m, f in lora_factors(model).items()})


class _BaseView:
    """``model`` answering as its base (for :func:`forgetkit.fisher.measured_kl`)."""

    def __init__(self, model: torch.nn.Module, base: _FullBase | _AdapterBase):
        self.model, self.base = model, base

    def parameters(self):
        return self.model.parameters()

    def __call__(self, **kwargs):
        with self.base.active(self.model):
            return self.model(**kwargs)


@contextlib.contextmanager
def _full_precision_forward(model: torch.nn.Module) -> Iterator[None]:
    """Meanwhile the model's own forward, not the mixed-precision (autocast) wrapper that
    accelerate installs as an instance attribute for bf16/fp16 training (it keeps the
    original as ``_original_forward``): the diagnostics run in the parameters' dtype."""
    wrapped = model.__dict__.get("forward")
    original = getattr(model, "_original_forward", None)
    if wrapped is None or original is None:
        yield
        return
    model.forward = original
    try:
        yield
    finally:
        model.forward = wrapped


# --- checks ---------------------------------------------------------------------------------------

def _text_tokenizer(processing_class):
    """The tokenizer inside a processor, or the tokenizer itself."""
    return getattr(processing_class, "tokenizer", processing_class)


def _check_same_vocabulary(mine, theirs) -> None:
    if mine is theirs or theirs is None:
        return
    a, b = mine.get_vocab(), theirs.get_vocab()
    if a != b:
        differing = sorted(set(a.items()) ^ set(b.items()), key=lambda kv: kv[1])
        token, index = differing[0] if differing else ("?", -1)
        raise ValueError(
            f"ForgettingCallback: its tokenizer ({len(a)} tokens) and the trainer's "
            f"processing_class ({len(b)} tokens) have different vocabularies (e.g. token "
            f"{token!r} -> id {index} in one of them): the probes would be scored in another "
            "tokenization than the model is trained in")


def _check_token_ids(model: torch.nn.Module, tokenizer, probes: Sequence[Probe],
                     records: Sequence[Record]) -> None:
    """Every token id the measurement feeds the model exists in its input embedding."""
    rows = model.get_input_embeddings().num_embeddings
    texts = [(f"probe {p.id!r}", p.prompt, c) for p in probes for c in (p.choices or [p.answer])]
    texts += [(f"record {r.id!r}", r.prompt, r.target) for r in records]
    texts += [(f"record {r.id!r} paraphrase {i}", text, r.target)
              for r in records for i, text in enumerate(r.paraphrases)]
    for what, prompt, completion in texts:
        try:
            ids = encode(tokenizer, prompt, completion).input_ids
        except ValueError as err:
            raise ValueError(f"ForgettingCallback: {what}: {err}") from None
        bad = [i for i in ids if not 0 <= i < rows]
        if bad:
            raise ValueError(
                f"ForgettingCallback: {what} encodes to token id {bad[0]} "
                f"({tokenizer.convert_ids_to_tokens(bad[0])!r}), outside the model's "
                f"vocabulary of {rows} embeddings: the probes were tokenized for another model "
                "(pass the tokenizer the model was trained with)")


# --- the callback ---------------------------------------------------------------------------------

class ForgettingCallback(TrainerCallback):
    """Memorization, retention, measured KL and exact Fisher displacement during training.

    Args:
        probes: retention probes (:func:`forgetkit.load_probes`); the KL and the displacement
            are taken on them too (prompt + answer).
        records: the injected records, for memorization (and paraphrase) accuracy; none, no
            memorization.
        every: measure every ``every`` optimizer steps (and at the last step); ``None``
            measures at each of the trainer's evaluations (``eval_strategy``).
        displacement: also the exact Fisher displacement (one forward-mode product per batch of
            probes).
        estimator: ``"true"`` or ``"empirical"`` Fisher for the displacement.
        tokenizer: the probes' tokenizer; default the trainer's ``processing_class``. Given
            both, their vocabularies must agree.
        base_weights: the base's values of the trainable parameters (name -> tensor), for a
            full fine-tune resumed from a checkpoint (the model no longer holds them then).
        batch_size: probes per forward pass and prompts per generation batch.
        max_new_tokens: generation cap of each reply.
        seed: of the bootstrap intervals.
        filename: the JSONL written in ``args.output_dir``.

    Raises:
        TypeError / ValueError: at construction, for arguments of the wrong type or value; at
            ``on_train_begin``, for a callback not attached, a probe whose tokens fall outside
            the model's vocabulary, a tokenizer other than the trainer's, ``every=None`` with
            no evaluations, sharded parameters, or a full fine-tune resumed without
            ``base_weights``.
    """

    def __init__(self, probes: Sequence[Probe], records: Sequence[Record] | None = None, *,
                 every: int | None = None, displacement: bool = True, estimator: str = "true",
                 tokenizer=None, base_weights: Mapping[str, Tensor] | None = None,
                 batch_size: int = 16, max_new_tokens: int = 32, seed: int = 0,
                 filename: str = "forgetting.jsonl"):
        probes = list(probes) if not isinstance(probes, str | bytes) else probes
        if not isinstance(probes, list) or not probes:
            raise ValueError("ForgettingCallback: probes must be a non-empty sequence of Probes")
        records = list(records or ())
        for what, items, kind in (("probes", probes, Probe), ("records", records, Record)):
            for index, item in enumerate(items):
                if not isinstance(item, kind):
                    raise TypeError(f"ForgettingCallback: {what}[{index}] is a "
                                    f"{type(item).__name__}, expected a {kind.__name__}")
        for name, value in (("every", every), ("batch_size", batch_size),
                            ("max_new_tokens", max_new_tokens)):
            if value is None and name == "every":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ForgettingCallback: {name}={value!r} must be an integer >= 1")
        if estimator not in ESTIMATORS:
            raise ValueError(f"ForgettingCallback: estimator={estimator!r} must be one of "
                             f"{ESTIMATORS}")
        if not filename or Path(filename).name != filename:
            raise ValueError(f"ForgettingCallback: filename={filename!r} must be a bare file name")
        self.probes, self.records = probes, records
        self.every, self.with_displacement, self.estimator = every, displacement, estimator
        self.tokenizer, self.base_weights = tokenizer, base_weights
        self.batch_size, self.max_new_tokens, self.seed = batch_size, max_new_tokens, seed
        self.filename = filename
        self.trainer: Trainer | None = None
        self._base: _FullBase | _AdapterBase | None = None
        self._base_scores: Scores | None = None
        self._model: torch.nn.Module | None = None
        self._last_step = -1
        self.base_kind: str | None = None
        """``"trainable weights"`` (a copy of them) or ``"disabled adapter"``, once begun."""

    def attach(self, trainer: Trainer) -> ForgettingCallback:
        """Log through ``trainer`` and add this callback to it (once); returns ``self``."""
        self.trainer = trainer
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        return self

    @property
    def path(self) -> Path | None:
        """The JSONL file, once training has begun."""
        return None if self.trainer is None else Path(self.trainer.args.output_dir) / self.filename

    # --- trainer events ---------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        if self.trainer is None:
            raise ValueError("ForgettingCallback logs through its trainer: add it with "
                             "ForgettingCallback(...).attach(trainer), not callbacks=[...] alone")
        if getattr(args, "fsdp", None) or getattr(args, "deepspeed", None):
            raise ValueError("ForgettingCallback: FSDP and DeepSpeed shard the parameters; the "
                             "base copy and the Fisher products need whole ones")
        if self.every is None and str(getattr(args.eval_strategy, "value", args.eval_strategy)
                                      ) == "no":
            raise ValueError("ForgettingCallback(every=None) measures at the trainer's "
                             "evaluations, but eval_strategy is 'no': pass every=N or set "
                             "eval_strategy='steps' and eval_steps")
        model = unwrap_model(model if model is not None else self.trainer.model)
        theirs = _text_tokenizer(processing_class)
        tokenizer = _text_tokenizer(self.tokenizer) if self.tokenizer is not None else theirs
        if tokenizer is None:
            raise ValueError("ForgettingCallback: no tokenizer: pass tokenizer=... or give the "
                             "trainer a processing_class")
        _check_same_vocabulary(tokenizer, theirs)
        _check_token_ids(model, tokenizer, self.probes, self.records)
        self._tokenizer, self._model = tokenizer, model
        if hasattr(model, "peft_config"):
            self._base, self.base_kind = _AdapterBase(model), "disabled adapter"
        else:
            if state.global_step > 0 and self.base_weights is None:
                raise ValueError("ForgettingCallback: a full fine-tune resumed at step "
                                 f"{state.global_step} no longer holds its base weights: pass "
                                 "base_weights= (the base model's state_dict)")
            self._base, self.base_kind = _FullBase(model, self.base_weights), "trainable weights"
        started = time.perf_counter()
        with eval_mode(model), _full_precision_forward(model), self._base.active(model):
            self._base_scores = self._evaluate(model)
        self._last_step = state.global_step
        if state.global_step == 0:
            values = self._accuracies(self._base_scores)
            values.update(_interval_values("retention", retention_interval(
                self._base_scores, self._base_scores, seed=self.seed)))
            values.update({"kl": 0.0, "kl_per_token": 0.0})
            if self.with_displacement:
                values.update({"displacement": 0.0, "predicted_kl": 0.0})
            values["seconds"] = time.perf_counter() - started
            self._publish(args, state, values, {"scores": self._base_scores.to_dict()},
                          fresh=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.every is not None and (state.global_step % self.every == 0
                                       or state.global_step == state.max_steps):
            self._measure_and_log(args, state)

    def on_evaluate(self, args, state, control, **kwargs):
        if self.every is None:
            self._measure_and_log(args, state)

    def on_train_end(self, args, state, control, **kwargs):
        self._base = None  # release the base copy

    # --- measuring --------------------------------------------------------------------------------

    def _evaluate(self, model) -> Scores:
        return evaluate(model, self._tokenizer, self.records, self.probes,
                        batch_size=self.batch_size, max_new_tokens=self.max_new_tokens)

    def _accuracies(self, scores: Scores) -> dict[str, float | None]:
        values: dict[str, float | None] = {}
        for capability in ("memorization", "paraphrase", *sorted(scores.capabilities)):
            interval = accuracy_interval(scores, capability, seed=self.seed)
            name = capability if capability in ("memorization", "paraphrase") \
                else f"accuracy/{capability}"
            values.update(_interval_values(name, interval))
        return values

    def measure(self) -> tuple[dict[str, float | None], dict[str, Any]]:
        """The metrics of the model now against its base: ``(values, details)``; ``values``
        are the logged scalars (without prefix), ``details`` the per-capability breakdowns."""
        if self._base is None or self._model is None or self._base_scores is None:
            raise RuntimeError("ForgettingCallback.measure: training has not begun")
        model, base = self._model, self._base
        started = time.perf_counter()
        with eval_mode(model), _full_precision_forward(model):
            scores = self._evaluate(model)
            kl = measured_kl(_BaseView(model, base), model, self._tokenizer, self.probes,
                             batch_size=self.batch_size)
            shift = None
            if self.with_displacement:
                delta = base.delta(model)
                with base.active(model):
                    shift = exact_displacement(model, self._tokenizer, self.probes, delta,
                                               estimator=self.estimator,
                                               batch_size=self.batch_size, seed=self.seed)
        values = self._accuracies(scores)
        values.update(_interval_values("retention", retention_interval(
            self._base_scores, scores, seed=self.seed)))
        values.update(_interval_values("kl", kl.interval(self.seed)))
        values["kl_per_token"] = kl.per_token
        details: dict[str, Any] = {
            "scores": scores.to_dict(),
            "retention": retention(self._base_scores, scores).to_dict(),
            "kl": {k: v for k, v in kl.to_dict(self.seed).items() if k != "per_example"}}
        if shift is not None:
            values.update(_interval_values("displacement", shift.interval()))
            values["predicted_kl"] = shift.predicted_kl
            details["displacement"] = shift.to_dict(per_probe=False)
        values["seconds"] = time.perf_counter() - started
        return values, details

    def _measure_and_log(self, args, state) -> None:
        if state.global_step == self._last_step or self._base is None:
            return
        self._last_step = state.global_step
        values, details = self.measure()
        self._publish(args, state, values, details)

    def _publish(self, args, state, values: dict[str, float | None], details: dict[str, Any],
                 fresh: bool = False) -> None:
        logs = {PREFIX + k: float(v) for k, v in values.items()
                if v is not None and math.isfinite(v)}
        Trainer.log(self.trainer, logs)
        if not state.is_world_process_zero:
            return
        row = {"step": state.global_step, "epoch": state.epoch,
               **{k: (v if v is None or math.isfinite(v) else None) for k, v in values.items()},
               "details": _finite(details)}
        path = Path(args.output_dir) / self.filename
        path.parent.mkdir(parents=True, exist_ok=True)
        (atomic_write_jsonl if fresh else append_jsonl)(path, [row])
        logger.info("forgetting at step %d: %s", state.global_step,
                    ", ".join(f"{k}={v:.4g}" for k, v in logs.items()))


def _interval_values(name: str, interval) -> dict[str, float | None]:
    if interval is None:
        return {}
    return {name: float(interval.value), f"{name}_low": float(interval.low),
            f"{name}_high": float(interval.high)}


def _finite(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by ``None`` (strict JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj
