"""Overhead of the forgetkit trainer over a minimal hand-written PyTorch loop (SFT).

Both loops train the same base model on the same batches (the trainer's data order, its
collated SFT encodings) with the same AdamW and schedule; the hand-written loop gets its
batches pre-collated and does only forward, cross-entropy, backward, clipping and the
optimizer step. The trainer's loop is timed as a whole (data order, collation, loss, metrics
rows, progress bar; no evaluation or checkpoints). Runs alternate between the two to share
the machine's noise; the per-step time is the median over repetitions of (loop time / steps),
and the ratio of the fastest repetitions is reported too (less sensitive to other load).
The losses must agree at every logged step (default logging_steps=10), which shows the batches
and the update are the same.

    OMP_NUM_THREADS=1 python experiments/bench_train.py            # toyworld, kgfact
    python experiments/bench_train.py --model smollm2-135m --steps 20 --reps 3

Writes experiments/results/bench_train.json and prints the ratio (goal: <= 1.10).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from forgetkit.cli_config import command_line
from forgetkit.files import atomic_write_json
from forgetkit.models import collate, load_model
from forgetkit.train.config import TrainConfig
from forgetkit.train.loop import DataOrder, Trainer, _lr_lambda, make_accelerator

RESULTS = Path(__file__).parent / "results" / "bench_train.json"


def trainer_run(config: TrainConfig) -> tuple[float, dict[int, float]]:
    """Seconds per step of ``Trainer.run`` and its losses at the logged steps."""
    with torch.random.fork_rng():
        torch.manual_seed(config.seed)
        trainer = Trainer(config, make_accelerator(config), resume=None)
        started = time.perf_counter()
        trainer.run()
        seconds = time.perf_counter() - started
    rows = [json.loads(line) for line in
            (Path(config.output_dir) / "metrics.jsonl").read_text().splitlines()]
    return seconds / config.max_steps, {r["step"]: r["step_loss"] for r in rows if "step_loss" in r}


def manual_run(config: TrainConfig, batches: list[dict[str, torch.Tensor]]
               ) -> tuple[float, list[float]]:
    """Seconds per step of a minimal loop on pre-collated ``batches`` and its losses."""
    model, _ = load_model(config.model_name_or_path, dtype=config.dtype, device=config.device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
         {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
        lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
        eps=config.adam_epsilon)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config, len(batches)))
    losses = []
    started = time.perf_counter()
    for batch in batches:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"], use_cache=False).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                               ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return (time.perf_counter() - started) / len(batches), losses


def the_same_batches(config: TrainConfig) -> list[dict[str, torch.Tensor]]:
    """The trainer's SFT batches, in its data order, collated."""
    from forgetkit.data.records import load_records
    from forgetkit.train.methods import sft_examples

    _, tokenizer = load_model(config.model_name_or_path, device="cpu")
    examples = sft_examples(tokenizer, load_records(config.records))
    order = DataOrder(len(examples), config.seed)
    size = config.per_device_train_batch_size
    return [collate([examples[i].encoding for i in order.take(size)], tokenizer.pad_token_id,
                    device=config.device) for _ in range(config.max_steps)]


@command_line
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="toyworld")
    parser.add_argument("--records", default="kgfact")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--debug", action="store_true", help=(
        "on an error, show the full traceback instead of one line"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config = TrainConfig(
            method="sft", model_name_or_path=args.model, records=args.records,
            output_dir=str(Path(tmp) / "run"), overwrite_output_dir=True, max_steps=args.steps,
            per_device_train_batch_size=args.batch_size, warmup_steps=5, save_steps=0,
            do_eval=False, disable_tqdm=False, device=args.device)
        batches = the_same_batches(config)
        trainer_times, manual_times = [], []
        for rep in range(args.reps):
            seconds, trainer_losses = trainer_run(config)
            trainer_times.append(seconds)
            seconds, manual_losses = manual_run(config, batches)
            manual_times.append(seconds)
            print(f"rep {rep}: trainer {1e3 * trainer_times[-1]:.2f} ms/step, "
                  f"manual {1e3 * manual_times[-1]:.2f} ms/step")
    difference = max(abs(loss - manual_losses[step - 1]) for step, loss in trainer_losses.items())
    trainer_ms = 1e3 * statistics.median(trainer_times)
    manual_ms = 1e3 * statistics.median(manual_times)
    result = {
        "model": args.model, "records": args.records, "batch_size": args.batch_size,
        "steps": args.steps, "reps": args.reps, "device": args.device,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "machine": platform.machine(), "trainer_ms_per_step": round(trainer_ms, 3),
        "manual_ms_per_step": round(manual_ms, 3), "ratio": round(trainer_ms / manual_ms, 4),
        "ratio_of_fastest_reps": round(min(trainer_times) / min(manual_times), 4),
        "trainer_ms_all_reps": [round(1e3 * t, 3) for t in trainer_times],
        "manual_ms_all_reps": [round(1e3 * t, 3) for t in manual_times],
        "max_loss_difference": difference,
    }
    atomic_write_json(args.out, result)
    print(f"trainer {trainer_ms:.2f} ms/step, manual loop {manual_ms:.2f} ms/step, "
          f"ratio {trainer_ms / manual_ms:.3f} (goal <= 1.10; fastest reps: "
          f"{min(trainer_times) / min(manual_times):.3f}); losses agree to "
          f"{difference:.1e}; wrote {args.out}")


if __name__ == "__main__":
    main()
