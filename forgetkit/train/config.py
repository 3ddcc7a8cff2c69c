"""The trainer's config: :class:`TrainConfig` (field names follow HF ``TrainingArguments``/TRL).

Parsed side by side with :class:`~forgetkit.mixsd.MixConfig` from YAML and flags
(:func:`forgetkit.cli_config.parse_config`) and saved beside the results as ``output_dir/train_config.yaml``. :meth:`TrainConfig.run_hash` identifies
a run: it covers every field that changes the training trajectory and none of the fields that
only control logging, evaluation, checkpointing or where output goes.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from forgetkit.cli_config import config_to_dict
from forgetkit.cli_config import help_metadata as _help
from forgetkit.mixsd import MixConfig
from forgetkit.models import resolve_device, resolve_dtype
from forgetkit.seeding import stable_hash

__all__ = ["FISHER_METHODS", "METHODS", "METHOD_FIELDS", "OUTPUT_FIELDS", "RETENTION_METHODS",
           "RUN_CONTROL_FIELDS", "TrainConfig"]

Method = Literal["sft", "mixsd", "opsd", "ewc", "replay", "fisher_orthogonal"]
OrthogonalFisher = Literal["low_rank", "kfac"]
METHODS: tuple[str, ...] = typing.get_args(Method)
RETENTION_METHODS = frozenset({"ewc", "replay", "fisher_orthogonal"})
"""Methods that train on retention data: a split of the probes (:mod:`forgetkit.train.retention`)."""
FISHER_METHODS = frozenset({"ewc", "fisher_orthogonal"})
"""Methods that use a Fisher of the base model (computed, or read from ``fisher_path``)."""
Scheduler = Literal["constant", "cosine"]
KLDirection = Literal["forward", "reverse"]

RUN_CONTROL_FIELDS = frozenset({
    "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "logging_steps",
    "eval_steps", "save_steps", "save_total_limit", "disable_tqdm", "do_eval", "probes",
    "per_device_eval_batch_size", "eval_max_new_tokens", "device", "ddp_backend",
})
"""Fields left out of :meth:`TrainConfig.run_hash`: changing them does not change the weights."""

METHOD_FIELDS = {"orthogonal_fisher": "fisher_orthogonal", "orthogonal_params": "fisher_orthogonal"}
"""Fields that one method alone reads -> that method: left out of the other methods' hashes
(:meth:`TrainConfig.config_hash`, :meth:`TrainConfig.run_hash`), so neither their value nor
their arrival in a later version tells apart runs they do not affect."""

OUTPUT_FIELDS = frozenset({"output_dir", "overwrite_output_dir", "resume_from_checkpoint",
                           "disable_tqdm"})
"""Fields that only say where a run writes and whether it shows progress: changing them changes
no result (weights, metrics or evaluations); the default of :meth:`TrainConfig.config_hash`."""



@dataclass
class TrainConfig:
    """Everything one training run needs; see each field's help.

    Defaults are tuned for the embedded toyworld model on ``kgfact`` (SFT and MixSD reach
    >= 95% memorization in a few CPU minutes). ``python -m forgetkit.train --help`` lists them.
    """

    method: Method = field(default="sft", metadata=_help(
        "sft: NLL on record targets; mixsd: NLL on MixSD targets of the frozen base; "
        "opsd: on-policy self-distillation (KL to the expert-prompted frozen base); "
        "ewc: sft + (ewc_strength/2) sum_j F_jj (theta_j - theta0_j)^2 with the base's diagonal "
        "Fisher; replay: sft batches mixed with the base's greedy answers to retention prompts; "
        "fisher_orthogonal: sft whose parameter change is kept orthogonal to the base's top "
        "orthogonal_k Fisher directions"))
    model_name_or_path: str = field(default="toyworld", metadata=_help(
        "base model: toyworld, smollm2-135m, a local folder or a cached hub id"))
    records: str = field(default="kgfact", metadata=_help("records to inject (name or file)"))
    probes: str | None = field(default=None, metadata=_help(
        "comma-separated probe sets for evaluation; default: the retention set of the model "
        "(toyworld for toyworld or a folder holding toyworld.json, general otherwise) plus the records' own probes if the "
        "records are a built-in set that has some (kgfact: two_hop, retrieval); a capability "
        "name already used by an earlier set becomes <set>:<capability>; <set>:<capability> "
        "keeps one capability of a set (kgfact-large:retrieval)"))
    output_dir: str = field(default="runs/{method}", metadata=_help(
        "where checkpoints, metrics, evaluations and the final model go ({method} is filled)"))
    overwrite_output_dir: bool = field(default=False, metadata=_help(
        "delete a previous run's checkpoints, metrics and evaluations in output_dir first"))
    resume_from_checkpoint: str | None = field(default=None, metadata=_help(
        "a checkpoint folder, or 'latest' for the newest one in output_dir"))
    learning_rate: float = field(default=3e-4, metadata=_help("peak learning rate of AdamW"))
    num_train_epochs: float = field(default=60.0, metadata=_help(
        "passes over the data (used when max_steps <= 0)"))
    max_steps: int = field(default=-1, metadata=_help(
        "optimizer steps; > 0 overrides num_train_epochs"))
    per_device_train_batch_size: int = field(default=8, metadata=_help(
        "examples per process per micro-batch (opsd: prompts, each sampled "
        "opsd_num_generations times)"))
    gradient_accumulation_steps: int = field(default=1, metadata=_help(
        "micro-batches per optimizer step"))
    lr_scheduler_type: Scheduler = field(default="cosine", metadata=_help(
        "after linear warmup: constant, or cosine decay to 0 at the last step"))
    warmup_steps: int = field(default=20, metadata=_help("linear warmup steps"))
    weight_decay: float = field(default=0.01, metadata=_help(
        "AdamW decoupled weight decay, applied to >= 2-D weights only"))
    adam_beta1: float = field(default=0.9, metadata=_help("AdamW beta1"))
    adam_beta2: float = field(default=0.95, metadata=_help("AdamW beta2"))
    adam_epsilon: float = field(default=1e-8, metadata=_help("AdamW epsilon"))
    max_grad_norm: float = field(default=1.0, metadata=_help(
        "clip the global gradient norm to this (<= 0: no clipping)"))
    seed: int = field(default=0, metadata=_help(
        "seed of data order, OPSD sampling and dropout"))
    logging_steps: int = field(default=10, metadata=_help(
        "append a metrics.jsonl row every this many steps (loss averaged since the last row)"))
    eval_steps: int = field(default=0, metadata=_help(
        "evaluate every this many steps (0: only before training and at the end)"))
    do_eval: bool = field(default=True, metadata=_help(
        "evaluate the base model before training and the final model after it"))
    save_steps: int = field(default=100, metadata=_help(
        "save a checkpoint every this many steps (0: none)"))
    save_total_limit: int | None = field(default=2, metadata=_help(
        "keep only the newest this many checkpoints (none: keep all)"))
    use_peft: bool = field(default=False, metadata=_help("train a LoRA adapter instead of all weights"))
    lora_r: int = field(default=16, metadata=_help("LoRA rank"))
    lora_alpha: int = field(default=32, metadata=_help("LoRA alpha (scale alpha / r)"))
    lora_dropout: float = field(default=0.0, metadata=_help("dropout on the LoRA input"))
    lora_target_modules: list[str] | None = field(default=None, metadata=_help(
        "module names to adapt (--lora_target_modules q_proj v_proj); none: every linear layer "
        "but the output head"))
    bf16: bool = field(default=False, metadata=_help(
        "bfloat16 autocast for forward passes (weights and optimizer stay in dtype)"))
    dtype: str = field(default="float32", metadata=_help(
        "dtype the model is loaded in: float32, or float64 for exact comparisons"))
    device: str | None = field(default=None, metadata=_help(
        "cpu, cuda, cuda:1, ...; default cuda if available (under torchrun: cuda:<local rank>)"))
    ddp_backend: str | None = field(default=None, metadata=_help(
        "torch.distributed backend under torchrun; default nccl on CUDA, gloo on CPU"))
    disable_tqdm: bool = field(default=False, metadata=_help("no progress bar"))
    per_device_eval_batch_size: int = field(default=64, metadata=_help(
        "prompts per generation batch in evaluation"))
    eval_max_new_tokens: int = field(default=32, metadata=_help("generation cap in evaluation"))
    mix: MixConfig = field(default_factory=MixConfig, metadata=_help(
        "MixSD target construction (the MixConfig options; a mapping is read as one); "
        "mix.guidance also sets OPSD's expert prompt"))
    opsd_num_generations: int = field(default=2, metadata=_help(
        "OPSD: completions sampled per prompt and step"))
    opsd_temperature: float = field(default=1.0, metadata=_help(
        "OPSD: sampling temperature of the student (0: greedy)"))
    opsd_max_new_tokens: int = field(default=32, metadata=_help("OPSD: completion length cap"))
    opsd_top_k: int = field(default=64, metadata=_help(
        "OPSD: KL over the teacher's top-k tokens, both distributions renormalized on them"))
    opsd_kl: KLDirection = field(default="forward", metadata=_help(
        "OPSD: forward = KL(teacher || student), reverse = KL(student || teacher)"))
    retention_fraction: float | None = field(default=None, metadata=_help(
        "share of probe ids (by a stable hash of the id) set aside as the retention data of "
        "ewc, replay and fisher_orthogonal and left out of evaluation; none: 0.5 for those "
        "methods, 0 (evaluate every probe) for the others; give every method of a comparison "
        "the same value so all are scored on the same probes"))
    fisher_path: str | None = field(default=None, metadata=_help(
        "ewc, fisher_orthogonal: a saved Fisher (forgetkit.fisher save) of the model being "
        "trained, used instead of computing one on the retention probes; a Fisher of other "
        "weights is refused"))
    ewc_strength: float = field(default=100.0, metadata=_help(
        "ewc: the penalty's strength (lambda in lambda/2 sum_j F_jj (theta_j - theta0_j)^2, "
        "the loss being the mean NLL per completion token); on toyworld/kgfact after 60 "
        "default steps, 100 cuts the diagonal-Fisher displacement 6.6x below SFT's (0.0075 vs "
        "0.049) for a loss of 1.60 vs 1.49; 1000 cuts it 32x (loss 2.12)"))
    replay_ratio: float = field(default=0.5, metadata=_help(
        "replay: share of each global batch taken from the replayed base answers, in [0, 1) "
        "(rounded to whole examples, at least one record per step)"))
    replay_max_new_tokens: int = field(default=32, metadata=_help(
        "replay: length cap of the base model's greedy answers"))
    orthogonal_k: int = field(default=16, metadata=_help(
        "fisher_orthogonal: number of top Fisher directions the update is kept orthogonal to "
        "(at most the Fisher's rank)"))
    orthogonal_fisher: OrthogonalFisher = field(default="low_rank", metadata=_help(
        "fisher_orthogonal: the Fisher computed on the retention probes (without fisher_path): "
        "low_rank (its N x P gradient matrix must fit: a toy or a subset of weights) or kfac "
        "(Kronecker-factored, EK-FAC, with the diagonal for the embedding and norms: every "
        "weight of a real model)"))
    orthogonal_params: str | None = field(default=None, metadata=_help(
        "fisher_orthogonal: the trained parameters whose Fisher gives the removed directions "
        "(a glob or regex on their names, as forgetkit.fisher's params); the others train "
        "freely. On a real model the top directions of the whole EK-FAC are single norm or "
        "embedding weights (its diagonal fallback); _proj\\.weight$ takes them from the "
        "Kronecker-factored linear layers of a Llama model. none: every trained parameter"))
    stop_at_memorization: float | None = field(default=None, metadata=_help(
        "stop at the first evaluation (every eval_steps) whose memorization is >= this, in "
        "(0, 1]; the step is recorded in results.json and metrics.jsonl"))

    def __post_init__(self):
        if isinstance(self.mix, Mapping):
            self.mix = MixConfig(**self.mix)
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; valid methods: {', '.join(METHODS)}")
        self.output_dir = str(self.output_dir).replace("{method}", self.method)
        problems = []
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            problems.append(f"learning_rate={self.learning_rate} must be > 0")
        if self.max_steps <= 0 and not self.num_train_epochs > 0:
            problems.append("set max_steps > 0 or num_train_epochs > 0")
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps",
                     "per_device_eval_batch_size", "eval_max_new_tokens", "logging_steps",
                     "opsd_num_generations", "opsd_max_new_tokens", "opsd_top_k", "lora_r"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("warmup_steps", "eval_steps", "save_steps", "weight_decay",
                     "opsd_temperature", "lora_dropout"):
            if getattr(self, name) < 0:
                problems.append(f"{name}={getattr(self, name)} must be >= 0")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            problems.append(f"save_total_limit={self.save_total_limit} must be >= 1 or none")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be in [0, 1)")
        if self.lr_scheduler_type not in typing.get_args(Scheduler):
            problems.append(f"lr_scheduler_type={self.lr_scheduler_type!r} must be one of "
                            f"{typing.get_args(Scheduler)}")
        if self.opsd_kl not in typing.get_args(KLDirection):
            problems.append(f"opsd_kl={self.opsd_kl!r} must be one of {typing.get_args(KLDirection)}")
        problems += self._method_problems()
        for check, value in ((resolve_dtype, self.dtype), (resolve_device, self.device)):
            try:
                check(value)
            except ValueError as err:
                problems.append(str(err))
        if problems:
            raise ValueError("TrainConfig: " + "; ".join(problems))

    def _method_problems(self) -> list[str]:
        problems = []
        if self.retention_fraction is not None and not 0 <= self.retention_fraction < 1:
            problems.append(f"retention_fraction={self.retention_fraction} must be in [0, 1)")
        if self.method in RETENTION_METHODS and self.retention_fraction == 0:
            problems.append(f"retention_fraction=0 leaves method {self.method} no retention "
                            "data; use a value in (0, 1)")
        if not (math.isfinite(self.ewc_strength) and self.ewc_strength >= 0):
            problems.append(f"ewc_strength={self.ewc_strength} must be >= 0")
        if not 0 <= self.replay_ratio < 1:
            problems.append(f"replay_ratio={self.replay_ratio} must be in [0, 1)")
        if self.orthogonal_fisher not in typing.get_args(OrthogonalFisher):
            problems.append(f"orthogonal_fisher={self.orthogonal_fisher!r} must be low_rank or "
                            "kfac")
        for name in ("replay_max_new_tokens", "orthogonal_k"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be >= 1")
        if self.fisher_path is not None and self.method not in FISHER_METHODS:
            problems.append(f"fisher_path applies to {' and '.join(sorted(FISHER_METHODS))}, "
                            f"not to method {self.method}")
        target = self.stop_at_memorization
        if target is not None:
            if not 0 < target <= 1:
                problems.append(f"stop_at_memorization={target} must be in (0, 1]")
            elif self.eval_steps < 1:
                problems.append("stop_at_memorization needs eval_steps >= 1 (memorization is "
                                "checked at every evaluation)")
        return problems

    @property
    def heldout_fraction(self) -> float:
        """The share of probe ids set aside as retention data (see ``retention_fraction``)."""
        if self.retention_fraction is not None:
            return self.retention_fraction
        return 0.5 if self.method in RETENTION_METHODS else 0.0

    def to_dict(self) -> dict:
        """A plain nested dict (what ``train_config.yaml`` holds)."""
        return config_to_dict(self)

    def config_hash(self, ignore: Iterable[str] = OUTPUT_FIELDS) -> str:
        """Hash of every field but those in ``ignore`` (default :data:`OUTPUT_FIELDS`: equal
        hashes mean the same results)."""
        ignore = frozenset(ignore) | self._other_methods_fields()
        return stable_hash({k: v for k, v in self.to_dict().items() if k not in ignore})

    def _other_methods_fields(self) -> frozenset[str]:
        return frozenset(k for k, method in METHOD_FIELDS.items() if method != self.method)

    def _run_fields(self) -> dict:
        ignore = (RUN_CONTROL_FIELDS | self._other_methods_fields()) - (
            {"probes"} if self.method in RETENTION_METHODS else set())
        return {k: v for k, v in self.to_dict().items() if k not in ignore}

    def input_files(self) -> dict[str, list[str]]:
        """The inputs that decide the trajectory and are named by a path (a file or folder, not
        a built-in name): field -> the paths it names (``probes`` may name several)."""
        import importlib

        from forgetkit.data.records import BUILTIN_PROBES, BUILTIN_RECORDS
        from forgetkit.models import BUILTIN_MODELS

        importlib.import_module("forgetkit.data.corpora")  # registers the built-in sets
        builtin = {"model_name_or_path": BUILTIN_MODELS, "records": BUILTIN_RECORDS,
                   "probes": BUILTIN_PROBES, "fisher_path": {}}
        found = {}
        for name in builtin.keys() & self._run_fields().keys():
            paths = [entry for entry in _entries(getattr(self, name), split=name == "probes")
                     if entry not in builtin[name] and Path(entry).expanduser().exists()]
            if paths:
                found[name] = paths
        return found

    def run_hash(self) -> str:
        """Hash of the fields that decide the trajectory (all but :data:`RUN_CONTROL_FIELDS`;
        ``probes`` counts for the :data:`RETENTION_METHODS`, which train on a split of them).
        Inputs named by a path count by their content, not their spelling: the path is left out
        here and the file's hash is compared beside it
        (:func:`forgetkit.train.checkpoint.input_fingerprints`)."""
        values = self._run_fields()
        for name, paths in self.input_files().items():
            values[name] = [None if entry in paths else entry
                            for entry in _entries(getattr(self, name), split=name == "probes")]
        return stable_hash(values)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _entries(value: str | None, split: bool) -> list[str]:
    """The names in an input field (``split``: a comma-separated list, as ``probes``)."""
    entries = (value or "").split(",") if split else [value or ""]
    return [entry.strip() for entry in entries if entry.strip()]
