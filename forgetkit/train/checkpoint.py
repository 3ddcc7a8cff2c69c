"""Checkpoints, the output-folder guard and the final model export of the trainer.

A checkpoint ``output_dir/checkpoint-<step>/`` holds:

- the trained weights in safetensors: ``model.safetensors`` + ``config.json`` (full
  fine-tuning) or ``adapter_model.safetensors`` + ``adapter_config.json`` (LoRA), written by
  ``save_pretrained`` so the folder also loads with :func:`forgetkit.models.load_model`;
- ``optimizer.pt`` and ``scheduler.pt`` (state dicts);
- ``rng_state_<rank>.pt`` per process: Python, NumPy, torch CPU/CUDA and the data-order
  generator;
- ``trainer_state.json``: step, run hash, world size, the pending data order and the logging
  window.

It is written into a hidden staging folder and renamed into place once complete, so a crash
never leaves a half checkpoint under a valid name. Multi-process runs need one shared
filesystem (one node).

:func:`check_output_dir` runs before anything is loaded: it refuses an ``output_dir`` that holds
another run (or this run, unless resuming or overwriting) and a checkpoint of another run.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import pickle
import random
import re
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from forgetkit.data.records import Record, records_hash
from forgetkit.files import atomic_directory, atomic_write_json
from forgetkit.models import model_hash
from forgetkit.train.config import OUTPUT_FIELDS, RUN_CONTROL_FIELDS, TrainConfig

__all__ = ["CHECKPOINT_PREFIX", "OutputDirError", "check_output_dir", "checkpoint_dirs",
           "input_fingerprints", "latest_checkpoint", "load_checkpoint", "prune_checkpoints",
           "resolve_checkpoint", "same_config", "save_checkpoint", "save_final_model",
           "saved_config", "saved_inputs"]

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
INPUTS_FILE = "inputs.json"
"""Fingerprints of the inputs a run was given as objects rather than by the config's names."""
_STEP = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")


def checkpoint_dirs(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir()
             if p.is_dir() and (m := _STEP.match(p.name)) and (p / "trainer_state.json").exists()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint in ``output_dir``, or ``None``."""
    found = checkpoint_dirs(output_dir)
    return found[-1] if found else None


def resolve_checkpoint(spec: str, output_dir: str | os.PathLike) -> Path:
    """``"latest"`` or a folder -> a complete checkpoint folder.

    Raises:
        FileNotFoundError: no checkpoint there.
    """
    if spec == "latest":
        path = latest_checkpoint(output_dir)
        if path is None:
            raise FileNotFoundError(f"--resume_from_checkpoint latest: no {CHECKPOINT_PREFIX}* "
                                    f"folder with a trainer_state.json in {output_dir}")
        return path
    path = Path(spec)
    if not (path / "trainer_state.json").exists():
        raise FileNotFoundError(f"--resume_from_checkpoint {spec}: not a checkpoint folder "
                                "(no trainer_state.json)")
    return path


def read_trainer_state(path: str | os.PathLike) -> dict[str, Any]:
    return json.loads((Path(path) / "trainer_state.json").read_text(encoding="utf-8"))


# --- random states ------------------------------------------------------------------------------

def capture_rng(data_generator: torch.Generator) -> dict[str, Any]:
    """Every random state a training step can touch, in a ``weights_only``-loadable form."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (name, keys.tolist(), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "data": data_generator.get_state(),
    }


def restore_rng(state: dict[str, Any], data_generator: torch.Generator) -> None:
    """Inverse of :func:`capture_rng`."""
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    data_generator.set_state(state["data"])


# --- save / load --------------------------------------------------------------------------------

def _is_peft(model) -> bool:
    return hasattr(model, "peft_config")


def save_checkpoint(dest: Path, *, model, optimizer, scheduler, trainer_state: dict[str, Any],
                    data_generator: torch.Generator, rank: int = 0,
                    barrier: Callable[[], None] = lambda: None) -> None:
    """Write a checkpoint to ``dest`` (every process calls this; rank 0 writes the shared files).

    Args:
        dest: ``output_dir/checkpoint-<step>``.
        model: the unwrapped model (plain or PEFT).
        optimizer, scheduler: their state dicts are saved.
        trainer_state: JSON-ready trainer state.
        data_generator: the data-order generator.
        rank: this process's rank.
        barrier: synchronizes all processes (no-op for one process).
    """
    staging = dest.parent / f".{dest.name}.staging"  # one name, known to every process
    # rank 0 owns the staging folder: it creates it and renames it to dest once all have written
    owner = atomic_directory(dest, staging=staging) if rank == 0 else nullcontext(staging)
    with owner:
        if rank == 0:
            model.save_pretrained(staging, safe_serialization=True)
            torch.save(optimizer.state_dict(), staging / "optimizer.pt")
            torch.save(scheduler.state_dict(), staging / "scheduler.pt")
            atomic_write_json(staging / "trainer_state.json", trainer_state)
        barrier()
        torch.save(capture_rng(data_generator), staging / f"rng_state_{rank}.pt")
        barrier()
    barrier()


def load_weights(model, path: Path) -> None:
    """Load the checkpoint's weights into ``model`` in place (full or adapter).

    Raises:
        ValueError: the checkpoint does not cover every trainable parameter.
    """
    from safetensors.torch import load_file

    device = str(next(model.parameters()).device)
    if _is_peft(model):
        from peft import set_peft_model_state_dict

        state = load_file(path / "adapter_model.safetensors", device=device)
        result = set_peft_model_state_dict(model, state)
        missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
    else:
        state = load_file(path / "model.safetensors", device=device)
        model.load_state_dict(state, strict=False)
        missing = [n for n, _ in model.named_parameters() if n not in state]
    if missing:
        raise ValueError(f"{path}: checkpoint lacks weights {missing[:5]} "
                         "(saved from another model or method?)")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be loaded safely."""


def _load_state(file: Path, **kwargs) -> Any:
    """``torch.load(file, weights_only=True)``: tensors and plain data only, so a crafted file
    cannot run code; anything else is refused with the file named."""
    try:
        return torch.load(file, weights_only=True, **kwargs)
    except pickle.UnpicklingError as err:
        reason = str(err).strip().splitlines()[0][:200]
        raise CheckpointError(f"{file}: refused: it holds objects other than tensors and plain "
                              f"data, which could run code when loaded ({reason})") from None
    except (RuntimeError, EOFError) as err:
        raise CheckpointError(f"{file}: cannot be read (truncated or not a torch file: "
                              f"{str(err).strip().splitlines()[0][:200]})") from None


def load_checkpoint(path: Path, *, model, optimizer, scheduler, data_generator: torch.Generator,
                    rank: int = 0) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and random states; return the trainer state.

    Every ``.pt`` file is loaded with ``weights_only=True``: nothing in a checkpoint can run code.

    Raises:
        FileNotFoundError: no random state saved for this rank (different process count).
        CheckpointError: a state file holding anything but tensors and plain data, or unreadable.
    """
    rng_file = path / f"rng_state_{rank}.pt"
    if not rng_file.exists():
        raise FileNotFoundError(f"{rng_file} missing: the checkpoint was saved by fewer "
                                "processes than are resuming it")
    device = next(model.parameters()).device
    optimizer_state = _load_state(path / "optimizer.pt", map_location=device)
    scheduler_state = _load_state(path / "scheduler.pt")
    rng_state = _load_state(rng_file)
    load_weights(model, path)
    optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(scheduler_state)
    restore_rng(rng_state, data_generator)
    return read_trainer_state(path)


def prune_checkpoints(output_dir: Path, limit: int | None) -> None:
    """Delete all but the newest ``limit`` checkpoints (``None`` keeps all)."""
    if limit is None:
        return
    for old in checkpoint_dirs(output_dir)[:-limit]:
        shutil.rmtree(old)


def save_final_model(model, tokenizer, output_dir: Path, base_name: str) -> dict[str, str]:
    """Export the trained model so ``output_dir`` loads with ``load_model`` and
    ``AutoModelForCausalLM.from_pretrained``.

    Full fine-tuning: the model and tokenizer in ``output_dir``. LoRA: the adapter in
    ``output_dir/adapter`` (``base_model_name_or_path`` = ``base_name``, so
    ``load_model(output_dir / "adapter")`` rebuilds it on the base) and a merged full copy in
    ``output_dir``. Each file is renamed into place from a staging folder.

    Returns:
        ``{"model": ..., "adapter": ...}`` paths (``adapter`` only for LoRA).
    """
    paths = {"model": str(output_dir)}
    with atomic_directory(output_dir, merge=True) as staging:
        full = model
        if _is_peft(model):
            for peft_config in model.peft_config.values():
                peft_config.base_model_name_or_path = base_name
            model.save_pretrained(staging / "adapter", safe_serialization=True)
            tokenizer.save_pretrained(staging / "adapter")
            full = copy.deepcopy(model).merge_and_unload()
            paths["adapter"] = str(output_dir / "adapter")
        full.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
    return paths


# --- output folder guard ------------------------------------------------------------------------

_ARTIFACTS = ("metrics.jsonl", "eval", "targets.jsonl", "targets.jsonl.meta.json",
              "targets.jsonl.progress.jsonl", "train_config.yaml", INPUTS_FILE, "results.json")


class OutputDirError(ValueError):
    """output_dir or the checkpoint to resume does not fit this run; raised before training."""


def _differences(saved: dict[str, Any], config: TrainConfig) -> str:
    now = config.to_dict()
    diffs = [f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in now
             if k not in RUN_CONTROL_FIELDS and saved.get(k) != now[k]]
    return "; ".join(diffs) or "no field differs (saved by another forgetkit version?)"


def check_output_dir(config: TrainConfig, rank: int = 0, world_size: int = 1,
                     barrier: Callable[[], None] = lambda: None,
                     inputs: Mapping[str, str] | None = None) -> Path | None:
    """Decide between a fresh start and a resume, before anything is loaded.

    Args:
        config: the run's config.
        rank, world_size, barrier: this process's place in the run.
        inputs: :func:`input_fingerprints` of the inputs given as objects.

    Returns:
        The checkpoint to resume from, or ``None`` for a fresh start (after deleting a previous
        run's artifacts when ``overwrite_output_dir``).

    Raises:
        OutputDirError: the checkpoint or the folder belongs to another run (different
            :meth:`TrainConfig.run_hash` or inputs), or the folder already holds this run and
            neither resuming nor overwriting was asked for.
    """
    inputs = dict(inputs or {})
    out = Path(config.output_dir)
    if config.resume_from_checkpoint:
        path = resolve_checkpoint(config.resume_from_checkpoint, out)
        state = read_trainer_state(path)
        if state["run_hash"] != config.run_hash():
            raise OutputDirError(f"checkpoint {path} belongs to another run (run hash "
                                 f"{state['run_hash']} != {config.run_hash()}; "
                                 f"{_differences(state['config'], config)})")
        if state.get("inputs", {}) != inputs:
            raise OutputDirError(f"checkpoint {path} was trained on other inputs "
                                 f"({_input_differences(state.get('inputs', {}), inputs)})")
        if state["world_size"] != world_size:
            raise OutputDirError(f"checkpoint {path} was saved by {state['world_size']} "
                                 f"processes; resume it with the same number (now {world_size})")
        return path
    previous = checkpoint_dirs(out)
    saved_yaml = out / "train_config.yaml"
    if not previous and not saved_yaml.exists():
        return None
    if config.overwrite_output_dir:
        if rank == 0:
            logger.warning("overwrite_output_dir: deleting the previous run in %s", out)
            for old in previous:
                shutil.rmtree(old)
            for name in _ARTIFACTS:
                target = out / name
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
        barrier()
        return None
    saved = (_read_yaml(saved_yaml) if saved_yaml.exists()
             else read_trainer_state(previous[-1])["config"])
    previous_config = _config_or_none(saved)
    saved_hash = previous_config.run_hash() if previous_config is not None else None
    hint = ("pass --resume_from_checkpoint latest to continue it, --overwrite_output_dir to "
            "start over, or another --output_dir")
    if saved_hash != config.run_hash():
        raise OutputDirError(f"{out} holds another run's checkpoints/results (run hash "
                             f"{saved_hash} != {config.run_hash()}; "
                             f"{_differences(saved, config)}); {hint}")
    if saved_inputs(out) != inputs:
        raise OutputDirError(f"{out} holds a run of this config on other inputs "
                             f"({_input_differences(saved_inputs(out), inputs)}); {hint}")
    raise OutputDirError(f"{out} already holds this run; {hint}")


# --- the config a run folder holds --------------------------------------------------------------

def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}


def _config_or_none(saved: dict[str, Any]) -> TrainConfig | None:
    try:
        return TrainConfig(**saved)
    except (TypeError, ValueError):  # written by another forgetkit version, or not a config
        return None


def saved_config(output_dir: str | os.PathLike) -> TrainConfig | None:
    """The :class:`TrainConfig` saved in ``output_dir/train_config.yaml``; ``None`` when there is
    none or this forgetkit cannot read it."""
    path = Path(output_dir) / "train_config.yaml"
    return _config_or_none(_read_yaml(path)) if path.is_file() else None


def same_config(output_dir: str | os.PathLike, config: TrainConfig,
                ignore: Iterable[str] = OUTPUT_FIELDS,
                inputs: Mapping[str, str] | None = None) -> bool:
    """Whether ``output_dir`` holds a run of ``config``: its saved config has the same
    :meth:`TrainConfig.config_hash` with the ``ignore`` fields left out (default
    :data:`OUTPUT_FIELDS`: the same results; :data:`RUN_CONTROL_FIELDS`: the same weights), and
    it was given the same inputs as objects (:func:`input_fingerprints`; none by default)."""
    saved = saved_config(output_dir)
    return (saved is not None and saved.config_hash(ignore) == config.config_hash(ignore)
            and saved_inputs(output_dir) == dict(inputs or {}))


def input_fingerprints(*, model=None, records: Sequence[Record] | None = None
                       ) -> dict[str, str]:
    """Fingerprints of the inputs a run is given as objects instead of by the config's names:
    ``model`` (:func:`forgetkit.models.model_hash`) and ``records``
    (:func:`forgetkit.data.records_hash`); empty when everything is named."""
    found = {}
    if model is not None:
        found["model"] = model_hash(model)
    if records is not None:
        found["records"] = records_hash(records)
    return found


def saved_inputs(output_dir: str | os.PathLike) -> dict[str, str]:
    """The :func:`input_fingerprints` a run in ``output_dir`` was started with (empty: none)."""
    path = Path(output_dir) / INPUTS_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _input_differences(saved: Mapping[str, str], now: Mapping[str, str]) -> str:
    def shown(fingerprints, key):
        return fingerprints.get(key, "by name")

    keys = sorted(set(saved) | set(now))
    return "; ".join(f"{k}: {shown(saved, k)} -> {shown(now, k)}" for k in keys
                     if saved.get(k) != now.get(k))
