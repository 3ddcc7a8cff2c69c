"""Trainer internals: processes, data order and the step loop.

The public entry point is :func:`forgetkit.train.run.train`; this module holds the machinery
it drives. See :mod:`forgetkit.train.run` for the semantics of a step.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from forgetkit.data.records import BUILTIN_PROBES, Probe, Record, load_probe_sets, load_records
from forgetkit.diagnostics.evaluation import Prediction, Scores, evaluate
from forgetkit.files import (
    append_jsonl,
    atomic_write,
    atomic_write_json,
    atomic_write_jsonl,
    read_jsonl,
)
from forgetkit.mixsd import MixedTarget, build_target_file
from forgetkit.models import end_token_ids, load_model
from forgetkit.train.checkpoint import (
    CHECKPOINT_PREFIX,
    INPUTS_FILE,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    weight_hooks,
)
from forgetkit.train.config import FISHER_METHODS, RETENTION_METHODS, TrainConfig
from forgetkit.train.losses import ewc_penalty
from forgetkit.train.methods import (
    NLL,
    OPSD,
    frozen_teacher,
    mixsd_examples,
    opsd_examples,
    sft_examples,
)
from forgetkit.train.retention import (
    OrthogonalProjection,
    check_fisher_file,
    replay_count,
    replay_examples,
    split_probes,
)

__all__ = ["DataOrder", "MixedOrder", "Trainer", "make_accelerator", "release_accelerator"]

logger = logging.getLogger(__name__)


# --- processes ----------------------------------------------------------------------------------

def make_accelerator(config: TrainConfig):
    """The run's ``Accelerator``: one process, or DDP over those ``torchrun`` or ``accelerate
    launch`` started (gloo on CPU, nccl on CUDA unless ``ddp_backend``); the scheduler steps once
    per optimizer step whatever the number of processes."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import InitProcessGroupKwargs

    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    one_process = int(os.environ.get("WORLD_SIZE", "1")) == 1
    state = PartialState._shared_state
    if one_process and state and state.get("device", device).type != device.type:
        AcceleratorState._reset_state(reset_partial_state=True)  # an earlier in-process run
    if one_process and device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    handlers = [InitProcessGroupKwargs(backend=config.ddp_backend)] if config.ddp_backend else []
    return Accelerator(cpu=device.type == "cpu", step_scheduler_with_optimizer=False,
                       gradient_accumulation_steps=config.gradient_accumulation_steps,
                       kwargs_handlers=handlers)


def release_accelerator(accelerator) -> None:
    """End a multi-process run's process group, so a later run in this process starts afresh."""
    if accelerator.num_processes > 1:
        from accelerate.state import AcceleratorState

        accelerator.end_training()
        AcceleratorState._reset_state(reset_partial_state=True)


# --- data order ---------------------------------------------------------------------------------

class DataOrder:
    """An endless stream of reshuffles of ``range(n)``; batches may straddle epochs.

    State: ``generator`` (saved with the random states) and ``pending`` (indices drawn but not
    yet used, saved in the trainer state).
    """

    def __init__(self, n: int, seed: int):
        self.n = n
        self.generator = torch.Generator().manual_seed(seed)
        self.pending: list[int] = []

    def take(self, count: int) -> list[int]:
        while len(self.pending) < count:
            self.pending += torch.randperm(self.n, generator=self.generator).tolist()
        taken, self.pending = self.pending[:count], self.pending[count:]
        return taken


class MixedOrder:
    """Global batches of records and replay examples in a fixed proportion (``replay``).

    Each :meth:`take` of ``count`` returns ``count - replay_count(count, ratio)`` record indices
    (a :class:`DataOrder` over ``range(n_records)``) followed by the replay indices (another over
    ``range(n_replay)``, offset by ``n_records``). Both streams draw from one generator, so the
    saved state is one generator and :attr:`pending` (a pair of lists).
    """

    def __init__(self, n_records: int, n_replay: int, ratio: float, seed: int):
        self.n_records, self.ratio = n_records, ratio
        self.records = DataOrder(n_records, seed)
        self.replay = DataOrder(n_replay, seed)
        self.generator = self.replay.generator = self.records.generator

    @property
    def pending(self) -> list[list[int]]:
        return [self.records.pending, self.replay.pending]

    @pending.setter
    def pending(self, value: Sequence[Sequence[int]]) -> None:
        self.records.pending, self.replay.pending = list(value[0]), list(value[1])

    def take(self, count: int) -> list[int]:
        replayed = replay_count(count, self.ratio)
        return (self.records.take(count - replayed)
                + [self.n_records + i for i in self.replay.take(replayed)])


# --- the loop -----------------------------------------------------------------------------------

def _lr_lambda(config: TrainConfig, total_steps: int):
    warmup = config.warmup_steps

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if config.lr_scheduler_type == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _default_probes(config: TrainConfig) -> list[str]:
    name = config.model_name_or_path
    is_toyworld = name == "toyworld" or (Path(name) / "toyworld.json").is_file()
    sources = ["toyworld" if is_toyworld else "general"]
    if config.records in BUILTIN_PROBES:
        sources.append(config.records)
    return sources


class Trainer:
    """One run's state: model, optimizer, data order, method; :meth:`run` trains to the end."""

    def __init__(self, config: TrainConfig, accelerator, resume: Path | None, *,
                 model=None, tokenizer=None, records: Sequence[Record] | None = None,
                 probes: Sequence[Probe] | None = None, inputs: dict[str, str] | None = None):
        from accelerate.utils import broadcast

        self.config, self.accelerator = config, accelerator
        self.rank, self.world_size = accelerator.process_index, accelerator.num_processes
        self.device = accelerator.device
        # names checkpoint staging folders, so a later run can tell whether their writer is dead
        self.owner_pid = int(broadcast(torch.tensor([os.getpid()], device=self.device)).item())
        self.out = Path(config.output_dir)
        self.inputs = dict(inputs or {})
        self.records = load_records(config.records) if records is None else list(records)
        if not self.records:
            raise ValueError(f"records {config.records!r} is empty: nothing to train on")
        evaluates = config.do_eval or config.eval_steps
        if probes is not None:
            probes = list(probes)
        elif evaluates or config.method in RETENTION_METHODS:
            sources = (config.probes.split(",") if config.probes else _default_probes(config))
            probes = load_probe_sets([s.strip() for s in sources if s.strip()])
        # retention data (ewc, replay, fisher_orthogonal) and evaluation never share a probe
        self.retention_probes, probes = split_probes(probes or [], config.heldout_fraction)
        self.probes = probes if evaluates else []
        if config.method in RETENTION_METHODS and not self.retention_probes:
            raise ValueError(f"method {config.method} trains on retention probes, but "
                             f"retention_fraction={config.heldout_fraction} of the probes "
                             f"({config.probes or 'default'}) selects none")
        if model is None:
            self.base_name = config.model_name_or_path
            if Path(self.base_name).exists():
                self.base_name = str(Path(self.base_name).resolve())
            model, self.tokenizer = load_model(config.model_name_or_path, dtype=config.dtype,
                                               device=self.device)
        else:  # an adapter saved from it names the folder the model was loaded from
            self.base_name = (getattr(model.config, "_name_or_path", "")
                              or config.model_name_or_path)
            model, self.tokenizer = model.to(self.device), tokenizer
        self.extra: dict[str, Any] = {"retention_probes": len(self.retention_probes)} \
            if config.method in RETENTION_METHODS else {}
        self.examples = self._examples(model)
        self.n_records = len(self.examples)
        if config.method == "replay":
            self.examples += self._replay_examples(model)
        teacher = None
        if config.method == "opsd" and not config.use_peft:
            teacher = frozen_teacher(model, use_peft=False)  # copied before any update
        if config.use_peft:
            model = self._wrap_lora(model)
        self.unwrapped = model
        self.unwrapped.train()
        self.method = self._method(model, teacher)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.ewc_fisher: dict[str, torch.Tensor] = {}
        self.projection: OrthogonalProjection | None = None
        if config.method in FISHER_METHODS:
            self._setup_fisher(model)
        self.optimizer = torch.optim.AdamW(
            [{"params": [p for p in self.params if p.ndim >= 2],
              "weight_decay": config.weight_decay},
             {"params": [p for p in self.params if p.ndim < 2], "weight_decay": 0.0}],
            lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
            eps=config.adam_epsilon)
        self.global_batch = (config.per_device_train_batch_size
                             * config.gradient_accumulation_steps * self.world_size)
        self.records_per_step = self.global_batch
        if config.method == "replay":
            self.records_per_step -= replay_count(self.global_batch, config.replay_ratio)
        self.total_steps = (config.max_steps if config.max_steps > 0 else max(1, math.ceil(
            config.num_train_epochs * self.n_records / self.records_per_step)))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _lr_lambda(config, self.total_steps))
        self.order = (MixedOrder(self.n_records, len(self.examples) - self.n_records,
                                 config.replay_ratio, config.seed)
                      if config.method == "replay" else DataOrder(len(self.examples), config.seed))
        self.global_step = 0
        self.stopped_at: int | None = None
        self.window = [0.0, 0]  # loss sum and steps since the last metrics row
        # DDP when several processes; the weights go through save_pretrained in checkpoints
        self.model, self.optimizer, self.scheduler = accelerator.prepare(
            model, self.optimizer, self.scheduler)
        weight_hooks(accelerator, self.unwrapped)
        self.autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16)
                         if config.bf16 else nullcontext())
        if resume is not None:
            self._resume(resume)
        elif self.rank == 0:
            with atomic_write(self.out / "train_config.yaml") as handle:
                handle.write(config.to_yaml())
            if self.inputs:
                atomic_write_json(self.out / INPUTS_FILE, self.inputs)
            atomic_write_jsonl(self.out / "metrics.jsonl", [])
        accelerator.wait_for_everyone()

    # --- setup ----------------------------------------------------------------------------------

    def _examples(self, model):
        config = self.config
        if config.method == "sft" or config.method in RETENTION_METHODS:
            return sft_examples(self.tokenizer, self.records)
        if config.method == "opsd":
            return opsd_examples(self.tokenizer, self.records, config.mix.guidance)
        path = self.out / "targets.jsonl"
        if self.rank == 0:
            with torch.no_grad():
                report = build_target_file(model, self.tokenizer, self.records, config.mix, path)
            self.extra["mixsd_report"] = asdict(report)
        self.accelerator.wait_for_everyone()
        targets = [MixedTarget.from_json(row) for row in read_jsonl(path)]
        examples = mixsd_examples(self.tokenizer, self.records, targets)
        if not examples:
            raise ValueError(f"MixSD kept no targets ({path}); try mix.on_failure=keep or "
                             "canonical, or more mix.max_retries")
        return examples

    def _replay_examples(self, model):
        """The base model's greedy answers to the retention prompts (``replay_examples.jsonl``)."""
        config = self.config
        examples = replay_examples(
            model, self.tokenizer, self.retention_probes,
            max_new_tokens=config.replay_max_new_tokens,
            batch_size=config.per_device_eval_batch_size,
            end_ids=end_token_ids(self.tokenizer, model), first_index=self.n_records)
        if self.rank == 0:
            atomic_write_jsonl(self.out / "replay_examples.jsonl", [
                {"probe_id": e.record_id, "prompt": self.tokenizer.decode(
                    e.encoding.input_ids[: e.encoding.prompt_length]),
                 "answer": self.tokenizer.decode(e.encoding.completion_ids),
                 "token_ids": e.encoding.completion_ids} for e in examples])
        self.extra["replay_examples"] = len(examples)
        return examples

    def _setup_fisher(self, model) -> None:
        """The Fisher of the base on the trained parameters: read from ``fisher_path`` (checked
        against the model) or computed on the retention probes and saved as ``fisher``."""
        from forgetkit import fisher as fisher_lib

        config = self.config
        named = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if config.method == "fisher_orthogonal" and config.orthogonal_params is not None:
            chosen = fisher_lib.select_parameters(model, config.orthogonal_params)
            frozen = sorted(set(chosen) - set(named))[:3]
            if frozen:
                raise fisher_lib.FisherError(
                    f"orthogonal_params={config.orthogonal_params!r} selects parameters that "
                    f"are not trained: {frozen}")
            named = chosen
        if config.fisher_path is not None:
            fisher = fisher_lib.load(config.fisher_path, model)
            check_fisher_file(fisher, model, config.fisher_path)
        else:
            common = dict(estimator="true", seed=config.seed,
                          dtype=torch.float64 if self.params[0].dtype == torch.float64
                          else torch.float32)
            if config.method == "ewc":
                fisher = fisher_lib.diagonal(model, self.tokenizer, self.retention_probes,
                                             **common)
            elif config.orthogonal_fisher == "kfac":
                fisher = fisher_lib.kfac(model, self.tokenizer, self.retention_probes,
                                         params=config.orthogonal_params, **common)
            else:
                limit = len(self.retention_probes)
                if config.orthogonal_k > limit:
                    raise fisher_lib.FisherError(
                        f"orthogonal_k={config.orthogonal_k} is larger than the rank of a "
                        f"Fisher from the {limit} retention probes; use orthogonal_k <= {limit}"
                        " (or more probes, or a larger retention_fraction)")
                fisher = fisher_lib.low_rank(model, self.tokenizer, self.retention_probes,
                                             rank=config.orthogonal_k,
                                             params=config.orthogonal_params, **common)
            if self.rank == 0:
                fisher.save(self.out / "fisher")
        if config.method == "ewc":
            values = getattr(fisher, "values", None)
            if values is None:
                raise fisher_lib.FisherError(
                    f"fisher_path {config.fisher_path}: ewc needs a diagonal Fisher, this one "
                    f"is {fisher.kind}")
            unknown = sorted(set(values) - set(named))[:3]
            if unknown:
                raise fisher_lib.FisherError(f"fisher_path {config.fisher_path}: covers "
                                             f"parameters that are not trained: {unknown}")
            self.ewc_fisher = {n: v.to(named[n].device, named[n].dtype)
                               for n, v in values.items()}
            self.ewc_anchor = {n: named[n].detach().clone() for n in values}
            self.ewc_named = named
        else:
            self.projection = OrthogonalProjection(fisher, config.orthogonal_k, named)
        self.extra["fisher"] = {"kind": fisher.kind, "rank": fisher.rank,
                                "path": config.fisher_path or str(self.out / "fisher")}

    def _method(self, model, teacher) -> NLL | OPSD:
        config = self.config
        if config.method != "opsd":
            return NLL(self.tokenizer.pad_token_id, self.device)
        return OPSD(model, teacher or frozen_teacher(model, use_peft=True),
                    pad_token_id=self.tokenizer.pad_token_id,
                    end_ids=end_token_ids(self.tokenizer, model), device=self.device,
                    seed=config.seed, num_generations=config.opsd_num_generations,
                    temperature=config.opsd_temperature,
                    max_new_tokens=config.opsd_max_new_tokens, top_k=config.opsd_top_k,
                    direction=config.opsd_kl)

    def _wrap_lora(self, model):
        from peft import LoraConfig, get_peft_model

        config = self.config
        lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha,
                          lora_dropout=config.lora_dropout, task_type="CAUSAL_LM",
                          target_modules=config.lora_target_modules or "all-linear",
                          base_model_name_or_path=self.base_name)
        return get_peft_model(model, lora)

    def _trainer_state(self) -> dict[str, Any]:
        return {"global_step": self.global_step, "run_hash": self.config.run_hash(),
                "inputs": self.inputs, "world_size": self.world_size,
                "pending": self.order.pending, "window": self.window,
                "data_generator": self.order.generator.get_state().tolist(),
                "stopped_at": self.stopped_at, "config": self.config.to_dict()}

    def _resume(self, path: Path) -> None:
        state = load_checkpoint(self.accelerator, path)
        self.order.generator.set_state(torch.tensor(state["data_generator"], dtype=torch.uint8))
        self.global_step = state["global_step"]
        self.order.pending = list(state["pending"])
        self.window = list(state["window"])
        logger.info("resumed from %s at step %d", path, self.global_step)
        if self.rank == 0:
            metrics = self.out / "metrics.jsonl"
            rows = read_jsonl(metrics, tolerate_torn_tail=True) if metrics.exists() else []
            atomic_write_jsonl(metrics, [r for r in rows if r["step"] <= self.global_step])

    # --- steps ----------------------------------------------------------------------------------

    def _sum(self, value: float) -> float:
        """Sum of ``value`` over processes (float64)."""
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        return self.accelerator.reduce(tensor, reduction="sum").item()

    def _step(self) -> tuple[float, float]:
        """One optimizer step; returns (loss per completion token, gradient norm)."""
        config, accelerator = self.config, self.accelerator
        size = config.per_device_train_batch_size
        indices = self.order.take(self.global_batch)
        share = size * config.gradient_accumulation_steps
        mine = indices[self.rank * share : (self.rank + 1) * share]
        with torch.no_grad(), self.autocast:
            prepared = [self.method.prepare([self.examples[i] for i in mine[a : a + size]],
                                            self.global_step)
                        for a in range(0, share, size)]
        tokens = self._sum(float(sum(p.n_tokens for p in prepared)))
        if tokens == 0:
            raise RuntimeError(f"step {self.global_step + 1}: no completion tokens in the batch")
        local_loss = 0.0
        for batch in prepared:  # gradients are all-reduced (averaged) after the last one only
            with accelerator.accumulate(self.model):
                with self.autocast:
                    loss_sum = self.method.loss_sum(self.model, batch)
                # backward divides by gradient_accumulation_steps and DDP averages over
                # processes: the gradient is that of (sum of token losses) / tokens
                accelerator.backward(loss_sum * (self.world_size
                                                 * config.gradient_accumulation_steps / tokens))
            local_loss += loss_sum.item()
        self.penalty = None
        if self.ewc_fisher:  # same on every process, added after the gradients are averaged
            self.penalty, gradients = ewc_penalty(self.ewc_named, self.ewc_anchor,
                                                  self.ewc_fisher, config.ewc_strength)
            with torch.no_grad():
                for name, g in gradients.items():
                    param = self.ewc_named[name]
                    param.grad = g.clone() if param.grad is None else param.grad.add_(g)
        limit = config.max_grad_norm if config.max_grad_norm > 0 else math.inf
        grad_norm = accelerator.clip_grad_norm_(self.params, limit)
        loss = self._sum(local_loss) / tokens
        if not (math.isfinite(loss) and math.isfinite(float(grad_norm))):  # before any update
            raise ValueError(
                f"step {self.global_step + 1}: the loss is {loss} and the gradient norm "
                f"{float(grad_norm)}: training diverged (learning_rate={config.learning_rate}); "
                f"stopped before updating the weights, checkpoints already in {self.out} are "
                "kept; lower learning_rate or max_grad_norm")
        self.lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        if self.projection is not None:
            self.projection.apply()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        return loss, float(grad_norm)

    def _evaluate(self, step: int) -> Scores | None:
        """Rank 0 evaluates the model and writes ``eval/<step>.jsonl``; others wait."""
        scores = None
        if self.rank == 0:
            with torch.no_grad(), self.autocast:
                scores = evaluate(self.unwrapped, self.tokenizer, self.records, self.probes,
                                  batch_size=self.config.per_device_eval_batch_size,
                                  max_new_tokens=self.config.eval_max_new_tokens)
            atomic_write_jsonl(self.out / "eval" / f"{step}.jsonl",
                               [p.__dict__ for p in scores.predictions])
        self.accelerator.wait_for_everyone()
        return scores

    def saved_scores(self, step: int) -> Scores | None:
        """The evaluation of ``step`` read back from ``eval/<step>.jsonl`` (rank 0; else
        ``None``, as when there is none)."""
        path = self.out / "eval" / f"{step}.jsonl"
        if self.rank != 0 or not path.exists():
            return None
        return Scores.from_predictions([Prediction(**row) for row in read_jsonl(path)])

    def run(self) -> None:
        """Train from ``global_step`` to the last step; evaluate, log and checkpoint on the way."""
        from tqdm.auto import tqdm

        config = self.config
        if config.do_eval and self.global_step == 0:
            self._log_row({"step": 0}, self._evaluate(0), evaluated=True)
        bar = tqdm(total=self.total_steps, initial=self.global_step, desc=config.method,
                   disable=config.disable_tqdm or self.rank != 0, dynamic_ncols=True)
        while self.global_step < self.total_steps and self.stopped_at is None:
            started = time.perf_counter()
            loss, grad_norm = self._step()
            step_time = time.perf_counter() - started
            step = self.global_step
            self.window = [self.window[0] + loss, self.window[1] + 1]
            row: dict[str, Any] = {"step": step}
            if step % config.logging_steps == 0 or step == self.total_steps:
                row.update(loss=self.window[0] / self.window[1], step_loss=loss, lr=self.lr,
                           grad_norm=grad_norm, step_time=step_time,
                           epoch=step * self.records_per_step / self.n_records)
                if self.penalty is not None:
                    row["ewc_penalty"] = self.penalty
                self.window = [0.0, 0]
            evaluated = bool((config.do_eval and step == self.total_steps)
                             or (config.eval_steps and step % config.eval_steps == 0))
            self._log_row(row, self._evaluate(step) if evaluated else None, evaluated)
            if config.save_steps and step % config.save_steps == 0:
                self._checkpoint()
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            bar.update(1)
        bar.close()

    def _log_row(self, row: dict[str, Any], scores: Scores | None, evaluated: bool) -> None:
        """Append ``row`` (with the evaluation summary of ``scores``) to ``metrics.jsonl``; on an
        ``evaluated`` step (every process calls it then), stop the run when ``scores`` meet
        ``stop_at_memorization``."""
        if scores is not None:
            summary = scores.to_dict()
            row["eval"] = {"memorization": summary["memorization"],
                           "paraphrase": summary["paraphrase"], **summary["capabilities"]}
        step, target = row["step"], self.config.stop_at_memorization
        if target is not None and evaluated:  # decided on rank 0, which holds the scores
            met = scores is not None and (scores.memorization or 0.0) >= target
            if self._sum(float(met)) > 0:
                self.stopped_at = step
                row["stopped_at_memorization"] = target
                logger.info("memorization >= %.3f at step %d: stopping", target, step)
        if len(row) > 1 and self.rank == 0:
            append_jsonl(self.out / "metrics.jsonl", [row])

    def _checkpoint(self) -> None:
        dest = self.out / f"{CHECKPOINT_PREFIX}{self.global_step}"
        save_checkpoint(self.accelerator, dest, self._trainer_state(), self.owner_pid)
        if self.rank == 0:
            prune_checkpoints(self.out, self.config.save_total_limit)
