"""The trainer: SFT, MixSD and OPSD in one compact loop (``python -m forgetkit.train``).

One optimizer step consumes a *global batch* of ``per_device_train_batch_size x
gradient_accumulation_steps x processes`` examples, taken in order from an endless stream of
seeded reshuffles of the training set. Process ``r`` takes its contiguous share and splits it
into micro-batches. The loss of the step is the sum over every completion token of the global
batch divided by their number (counted before any backward pass), so 1 process x batch 4 and
2 processes x batch 2 compute the same gradient. Then: global-norm clipping, AdamW (decay on
>= 2-D weights only), and linear warmup followed by a constant or cosine learning rate.

Methods (:mod:`forgetkit.train.methods`): ``sft`` trains on ``record.prompt`` + ``record.target``;
``mixsd`` builds MixSD targets once from the frozen base (cached in ``output_dir/targets.jsonl``,
reused on resume) and trains on naive prompt + target tokens; ``opsd`` distills the
expert-prompted frozen base into the student on the student's own samples. ``ewc``, ``replay``
and ``fisher_orthogonal`` are SFT plus a way of keeping the base's behaviour on retention data,
a split of the probes disjoint from the probes evaluated (:mod:`forgetkit.train.retention`).

With ``stop_at_memorization`` the run stops at the first evaluation whose memorization reaches
it; the step is in ``results.json`` (``stop_at_memorization``), in that step's
``metrics.jsonl`` row and in the trainer state of later checkpoints.

Outputs in ``output_dir``: ``train_config.yaml``, ``metrics.jsonl`` (a row per logging step:
step, loss, lr, grad_norm, step_time; evaluation summaries on evaluation steps),
``eval/<step>.jsonl`` (per-item predictions; step 0 is the base model), ``checkpoint-<step>/``
(:mod:`forgetkit.train.checkpoint`), ``results.json`` and the final model (:func:`save_final_model`).

Processes, gradient accumulation and checkpoints go through ``accelerate`` (an ``Accelerator``:
DDP under ``torchrun`` or ``accelerate launch``, gloo on CPU, nccl on CUDA); each process runs
:func:`train`.

Example::

    python -m forgetkit.train --method mixsd --lam 0.3 --output_dir runs/mixsd
    torchrun --nproc_per_node 2 -m forgetkit.train --config cfg.yaml --learning_rate 1e-4
    accelerate launch --multi_gpu --num_processes 2 -m forgetkit.train --config cfg.yaml
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from forgetkit.cli_config import command_line, parse_cli
from forgetkit.data.records import Probe, Record
from forgetkit.diagnostics.evaluation import (
    Retention,
    Scores,
    retention,
    score_intervals,
)
from forgetkit.files import atomic_write_json, check_writable, read_jsonl
from forgetkit.mixsd import MixConfig
from forgetkit.seeding import seed_everything
from forgetkit.train.checkpoint import (
    check_output_dir,
    input_fingerprints,
    save_final_model,
)
from forgetkit.train.config import TrainConfig
from forgetkit.train.loop import Trainer, make_accelerator, release_accelerator

__all__ = ["TrainResult", "main", "summary", "train"]

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a run produced.

    Attributes:
        output_dir: the run folder.
        model_path: the final model (loads with ``load_model`` and ``AutoModelForCausalLM``).
        adapter_path: the LoRA adapter folder (``use_peft`` only).
        global_step: optimizer steps done.
        metrics: the rows of ``metrics.jsonl``.
        base_scores: evaluation of the base model (``do_eval``).
        scores: evaluation of the final model (``do_eval``).
        retention: ``retention(base_scores, scores)`` (``do_eval``).
        extra: method facts, e.g. the MixSD build report.

    Under ``torchrun`` every process returns one; the scores (and ``results.json``) come from
    rank 0, the others get ``None`` there.
    """

    output_dir: str
    model_path: str
    adapter_path: str | None
    global_step: int
    metrics: list[dict[str, Any]]
    base_scores: Scores | None = None
    scores: Scores | None = None
    retention: Retention | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (what ``results.json`` holds; metrics and predictions left out)."""
        return {
            "output_dir": self.output_dir, "model_path": self.model_path,
            "adapter_path": self.adapter_path, "global_step": self.global_step,
            "final_loss": next((m["loss"] for m in reversed(self.metrics) if "loss" in m), None),
            "base_scores": self.base_scores.to_dict() if self.base_scores else None,
            "scores": self.scores.to_dict() if self.scores else None,
            "retention": self.retention.to_dict() if self.retention else None,
            **self.extra,
        }


def train(config: TrainConfig, *, model=None, tokenizer=None,
          records: Sequence[Record] | None = None,
          probes: Sequence[Probe] | None = None) -> TrainResult:
    """Train ``config.model_name_or_path`` on ``config.records`` with ``config.method``.

    Randomness is explicit: training runs inside ``torch.random.fork_rng`` seeded with
    ``config.seed`` (the caller's torch RNG is untouched); data order and OPSD samples use
    their own seeded generators.

    Args:
        config: the run.
        model, tokenizer: the base model to train (given together) instead of loading
            ``config.model_name_or_path``; it is trained in place (under ``use_peft`` the LoRA
            layers are added to it), so pass a copy to keep the original, and
            ``config.dtype`` does not apply to it.
        records: the records to inject instead of loading ``config.records``.
        probes: the evaluation probes instead of loading ``config.probes``.

    Inputs named by a path count by their content, and with objects in place of names the
    config's names only label the run: the fingerprints of both
    (:func:`~forgetkit.train.checkpoint.input_fingerprints`) are saved in
    ``output_dir/inputs.json`` and in each checkpoint, so a resume or a reuse on other inputs
    (a records file edited in between, say) is refused, naming the input. Probes are fingerprinted only for the methods that train on their retention split
    (ewc, replay, fisher_orthogonal); for the others they change evaluations, never the weights.

    Example:
        >>> result = train(TrainConfig(method="sft", output_dir="runs/sft"),  # doctest: +SKIP
        ...                records=load_records("kgfact")[:24])

    Raises:
        ValueError: bad records, an output_dir holding another run, a checkpoint of another
            run, a model without its tokenizer; all before any training step.
        FileNotFoundError: a checkpoint to resume that does not exist.
    """
    if (model is None) != (tokenizer is None):
        raise ValueError("train: pass model and tokenizer together (or neither)")
    check_writable(config.output_dir, "output_dir")
    records = None if records is None else list(records)
    probes = None if probes is None else list(probes)
    inputs = input_fingerprints(config, model=model, records=records, probes=probes)
    accelerator = make_accelerator(config)
    resume = check_output_dir(config, accelerator.process_index, accelerator.num_processes,
                              accelerator.wait_for_everyone, inputs=inputs)
    device = accelerator.device
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(config.seed)
        trainer = Trainer(config, accelerator, resume, model=model, tokenizer=tokenizer,
                          records=records, probes=probes, inputs=inputs)
        trainer.run()
    if config.stop_at_memorization is not None:
        trainer.extra["stop_at_memorization"] = {
            "target": config.stop_at_memorization, "reached": trainer.stopped_at is not None,
            "step": trainer.stopped_at}
    output_dir = Path(config.output_dir)
    if accelerator.is_main_process:
        save_final_model(trainer.unwrapped, trainer.tokenizer, output_dir, trainer.base_name)
    accelerator.wait_for_everyone()
    result = TrainResult(str(output_dir), str(output_dir),
                         str(output_dir / "adapter") if config.use_peft else None,
                         trainer.global_step, read_jsonl(output_dir / "metrics.jsonl"),
                         extra=trainer.extra)
    if config.do_eval:
        result.base_scores = trainer.saved_scores(0)
        result.scores = trainer.saved_scores(trainer.global_step)
        if result.base_scores is not None and result.scores is not None:
            result.retention = retention(result.base_scores, result.scores)
            result.extra["intervals"] = score_intervals(result.base_scores, result.scores,
                                                   config.seed)
    if accelerator.is_main_process:
        atomic_write_json(output_dir / "results.json", result.to_dict())
    release_accelerator(accelerator)
    return result


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def summary(result: TrainResult, method: str, seconds: float) -> str:
    """A few human-readable lines about ``result``."""
    final = result.to_dict()["final_loss"]
    lines = [f"{method}: {result.global_step} steps in {seconds:.0f} s, final loss "
             f"{final if final is None else f'{final:.4f}'} -> {result.model_path}"]
    if result.scores is not None:
        base, ft = result.base_scores, result.scores
        parts = [f"memorization {_percent(ft.memorization)} (base {_percent(base.memorization)})",
                 f"paraphrase {_percent(ft.paraphrase)} (base {_percent(base.paraphrase)})"]
        parts += [f"{k} {_percent(v)} (base {_percent(base.capabilities.get(k))})"
                  for k, v in ft.capabilities.items()]
        lines.append("scores: " + ", ".join(parts))
    if result.retention is not None:
        ratios = ", ".join(f"{k} {'n/a' if v is None else f'{v:.2f}'}"
                           for k, v in result.retention.per_capability.items())
        overall = result.retention.overall
        lines.append(f"retention: {ratios}; overall {'n/a' if overall is None else f'{overall:.2f}'}")
    return "\n".join(lines)


@command_line
def main(argv: Sequence[str] | None = None) -> None:
    """``python -m forgetkit.train [--config FILE.yaml] [--KEY VALUE ...]``: the
    :class:`TrainConfig` and :class:`~forgetkit.mixsd.MixConfig` options side by side."""
    config, _ = parse_cli((TrainConfig, MixConfig), argv, "python -m forgetkit.train",
                          doc=__doc__, log_format="%(asctime)s %(name)s: %(message)s")
    seed_everything(config.seed)
    started = time.perf_counter()
    result = train(config)
    if _is_main_process():
        print(summary(result, config.method, time.perf_counter() - started))


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0
