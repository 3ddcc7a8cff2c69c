"""Checkpoints, the output-folder guard and the final model export of the trainer.

A checkpoint ``output_dir/checkpoint-<step>/`` is written by ``Accelerator.save_state``: the
weights by ``save_pretrained`` (full model, or the LoRA adapter; the folder loads with
:func:`forgetkit.models.load_model`), accelerate's ``optimizer.bin``, ``scheduler.bin`` and
``random_states_<rank>.pkl``, and ``trainer_state.json`` (step, run hash, input fingerprints,
world size, data order, logging window). Nothing in it can run code when loaded: every pickled
file is read with ``weights_only=True`` and refused by name if it holds anything but tensors and
plain data, before ``Accelerator.load_state`` touches the folder (:func:`verify_checkpoint`).
It is built in a staging folder ``.checkpoint-<step>.staging-<pid>-*`` and swapped in whole;
staging folders of dead runs are removed when a run starts (:func:`recover_checkpoints`).
Multi-process runs need one shared filesystem (one node).

:func:`check_output_dir` runs before anything is loaded: it refuses an ``output_dir`` that holds
another run (or this run, unless resuming or overwriting) and a checkpoint of another run; a run
killed before its first checkpoint starts over without flags.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import pickle
import re
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from forgetkit.data.records import Probe, Record, records_hash
from forgetkit.files import atomic_directory, atomic_write_json, content_hash, recover_directory
from forgetkit.models import model_hash
from forgetkit.seeding import stable_hash
from forgetkit.train.config import (
    OUTPUT_FIELDS,
    RETENTION_METHODS,
    RUN_CONTROL_FIELDS,
    TrainConfig,
)

__all__ = ["CHECKPOINT_PREFIX", "CheckpointError", "OutputDirError", "check_output_dir",
           "checkpoint_dirs", "input_fingerprints", "latest_checkpoint", "load_checkpoint",
           "prune_checkpoints", "recover_checkpoints", "resolve_checkpoint", "same_config",
           "save_checkpoint", "save_final_model", "saved_config", "saved_inputs", "weight_hooks"]

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
INPUTS_FILE = "inputs.json"
"""Fingerprints of a run's inputs: the content of the files it names, the objects it was given."""
_STEP = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")
_LEFTOVER = re.compile(rf"^\.({CHECKPOINT_PREFIX}\d+)\.(?:staging|old)-\d+-")


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


def recover_checkpoints(output_dir: str | os.PathLike) -> None:
    """Remove what killed runs left in ``output_dir``: the staging folders of checkpoints and of
    the final model, whose writing process is gone (:func:`forgetkit.files.recover_directory`)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return
    names = {m.group(1) for p in output_dir.iterdir() if (m := _LEFTOVER.match(p.name))}
    for name in sorted(names):
        recover_directory(output_dir / name)
    recover_directory(output_dir / output_dir.name)  # save_final_model stages inside output_dir


def read_trainer_state(path: str | os.PathLike) -> dict[str, Any]:
    return json.loads((Path(path) / "trainer_state.json").read_text(encoding="utf-8"))


# --- save / load --------------------------------------------------------------------------------

def save_checkpoint(accelerator, dest: Path, trainer_state: dict[str, Any],
                    owner_pid: int) -> None:
    """Write ``dest`` (``output_dir/checkpoint-<step>``) with ``accelerator.save_state`` and
    ``trainer_state`` (every process calls this; ``owner_pid``, the main process's pid, names the
    staging folder that the main process swaps in)."""
    staging = dest.parent / f".{dest.name}.staging-{owner_pid}-{accelerator.num_processes}"
    main = accelerator.is_main_process
    with atomic_directory(dest, staging=staging) if main else nullcontext(staging):
        accelerator.wait_for_everyone()  # the staging folder exists
        accelerator.save_state(staging, safe_serialization=True)
        if main:
            atomic_write_json(staging / "trainer_state.json", trainer_state)
        accelerator.wait_for_everyone()  # every file is written before the swap
    accelerator.wait_for_everyone()


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config")


def weight_hooks(accelerator, model) -> None:
    """Make ``accelerator.save_state``/``load_state`` write and read ``model``'s weights with
    ``save_pretrained`` and :func:`load_weights` (a folder ``load_model`` opens, adapters only for
    LoRA) instead of accelerate's own state-dict file."""
    def save(models, weights, output_dir):
        if accelerator.is_main_process:
            model.save_pretrained(output_dir, safe_serialization=True)
        weights.clear()

    def load(models, input_dir):
        load_weights(model, Path(input_dir))
        models.clear()

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)


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


_RNG_KEYS = {"random_state", "numpy_random_seed", "torch_manual_seed"}


def verify_checkpoint(path: Path, rank: int) -> None:
    """Check that every file ``Accelerator.load_state`` will unpickle from ``path`` for process
    ``rank`` holds only tensors, plain data and NumPy arrays (read by accelerate's ``load``:
    ``weights_only=True``), and that the random states are complete (accelerate would skip
    unreadable ones silently, and the resume would not be exact).

    Raises:
        FileNotFoundError: a state file is missing (no random state for this rank: the
            checkpoint was saved by fewer processes).
        CheckpointError: a file that holds anything else, or cannot be read.
    """
    from accelerate.utils import load

    rng_file = path / f"random_states_{rank}.pkl"
    for file in [*path.glob("custom_checkpoint_*.pkl"), path / "optimizer.bin",
                 path / "scheduler.bin", rng_file]:
        if file.name.startswith("custom_checkpoint_"):  # accelerate unpickles these unchecked
            raise CheckpointError(f"{file}: refused: forgetkit checkpoints hold no custom state")
        if not file.is_file():
            raise FileNotFoundError(f"{file} missing: not a complete checkpoint (of this many "
                                    "processes?)")
        try:
            state = load(file, map_location="cpu")
        except pickle.UnpicklingError as err:
            raise CheckpointError(f"{file}: refused: it holds objects other than tensors and "
                                  "plain data, which could run code when loaded "
                                  f"({str(err).strip().splitlines()[0][:200]})") from None
        except (RuntimeError, EOFError, OSError) as err:
            raise CheckpointError(f"{file}: cannot be read (truncated or not a torch file: "
                                  f"{str(err).strip().splitlines()[0][:200]})") from None
        if file == rng_file and not (isinstance(state, dict) and state.keys() >= _RNG_KEYS):
            raise CheckpointError(f"{file}: not a random-state file (needs "
                                  f"{', '.join(sorted(_RNG_KEYS))})")


def load_checkpoint(accelerator, path: Path) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and random states with ``accelerator.load_state``
    once :func:`verify_checkpoint` has passed; return the trainer state."""
    verify_checkpoint(path, accelerator.process_index)
    accelerator.load_state(str(path))
    return read_trainer_state(path)


def prune_checkpoints(output_dir: Path, limit: int | None) -> None:
    """Delete all but the newest ``limit`` checkpoints (``None`` keeps all)."""
    if limit is None:
        return
    for old in checkpoint_dirs(output_dir)[:-limit]:
        shutil.rmtree(old)


def save_final_model(model, tokenizer, output_dir: Path, base_name: str) -> None:
    """Export the trained model so ``output_dir`` loads with ``load_model`` and
    ``AutoModelForCausalLM.from_pretrained``.

    Full fine-tuning: the model and tokenizer in ``output_dir``. LoRA: the adapter in
    ``output_dir/adapter`` (``base_model_name_or_path`` = ``base_name``, so
    ``load_model(output_dir / "adapter")`` rebuilds it on the base) and a merged full copy in
    ``output_dir``. Each file is renamed into place from a staging folder.
    """
    with atomic_directory(output_dir, merge=True) as staging:
        full = model
        if _is_peft(model):
            for peft_config in model.peft_config.values():
                peft_config.base_model_name_or_path = base_name
            model.save_pretrained(staging / "adapter", safe_serialization=True)
            tokenizer.save_pretrained(staging / "adapter")
            full = copy.deepcopy(model).merge_and_unload()
        full.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)


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


def _clear_run(out: Path, keep: Sequence[str] = ()) -> None:
    """Delete a previous run's checkpoints and artifacts in ``out`` but those named in ``keep``."""
    for old in checkpoint_dirs(out):
        shutil.rmtree(old)
    for target in [out / name for name in _ARTIFACTS if name not in keep]:
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


def check_output_dir(config: TrainConfig, rank: int = 0, world_size: int = 1,
                     barrier: Callable[[], None] = lambda: None,
                     inputs: Mapping[str, str] | None = None) -> Path | None:
    """Decide between a fresh start and a resume, before anything is loaded.

    Staging folders of killed runs are removed first (:func:`recover_checkpoints`). A folder
    holding this very run (same run hash and inputs) that was killed before its first checkpoint
    is started over, its MixSD target cache kept; ``--resume_from_checkpoint latest`` with no
    checkpoint yet starts from the beginning.

    Args:
        config: the run's config.
        rank, world_size, barrier: this process's place in the run.
        inputs: :func:`input_fingerprints` of the run.

    Returns:
        The checkpoint to resume from, or ``None`` for a fresh start (after deleting a previous
        run's artifacts when ``overwrite_output_dir``).

    Raises:
        OutputDirError: the checkpoint or the folder belongs to another run (different
            :meth:`TrainConfig.run_hash` or inputs, e.g. a records file whose content changed),
            or the folder already holds this run and neither resuming nor overwriting was asked
            for.
    """
    inputs = dict(inputs or {})
    out = Path(config.output_dir)
    if rank == 0:
        recover_checkpoints(out)
    barrier()
    previous = checkpoint_dirs(out)
    files = config.input_files()
    if config.resume_from_checkpoint and (previous or config.resume_from_checkpoint != "latest"):
        path = resolve_checkpoint(config.resume_from_checkpoint, out)
        state = read_trainer_state(path)
        if state["run_hash"] != config.run_hash():
            raise OutputDirError(f"checkpoint {path} belongs to another run (run hash "
                                 f"{state['run_hash']} != {config.run_hash()}; "
                                 f"{_differences(state['config'], config)})")
        if state.get("inputs", {}) != inputs:
            raise OutputDirError(f"checkpoint {path} was trained on other inputs "
                                 f"({_input_differences(state.get('inputs', {}), inputs, files)})")
        if state["world_size"] != world_size:
            raise OutputDirError(f"checkpoint {path} was saved by {state['world_size']} "
                                 f"processes; resume it with the same number (now {world_size})")
        return path
    saved_yaml = out / "train_config.yaml"
    if not previous and not saved_yaml.exists():
        return None
    if config.overwrite_output_dir:
        if rank == 0:
            logger.warning("overwrite_output_dir: deleting the previous run in %s", out)
            _clear_run(out)
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
                             f"({_input_differences(saved_inputs(out), inputs, files)}); {hint}")
    if not previous and not (out / "results.json").exists():
        if rank == 0:
            logger.warning("%s holds this run, stopped before its first checkpoint: starting "
                           "it over", out)
            _clear_run(out, keep=[name for name in _ARTIFACTS if name.startswith("targets.")])
        barrier()
        return None
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
    it was given the same inputs (:func:`input_fingerprints`; by default those of ``config``'s
    named inputs, none given as objects)."""
    saved = saved_config(output_dir)
    inputs = input_fingerprints(config) if inputs is None else dict(inputs)
    return (saved is not None and saved.config_hash(ignore) == config.config_hash(ignore)
            and saved_inputs(output_dir) == inputs)


def input_fingerprints(config: TrainConfig | None = None, *, model=None,
                       records: Sequence[Record] | None = None,
                       probes: Sequence[Probe] | None = None) -> dict[str, str]:
    """Fingerprints of what a run trains from, beyond its config's values: the content of the
    inputs ``config`` names by a path (:meth:`TrainConfig.input_files`: ``"sha256:..."`` under the
    field's name, so the same file counts as the same input however its path is spelled) and
    the inputs given as objects instead: ``model`` (:func:`forgetkit.models.model_hash`),
    ``records`` (:func:`forgetkit.data.records_hash`) and, for the methods that train on their
    retention split, ``probes`` (``retention_probes``)."""
    found = {}
    if model is not None:
        found["model"] = model_hash(model)
    if records is not None:
        found["records"] = records_hash(records)
    if probes is not None and config is not None and config.method in RETENTION_METHODS:
        from forgetkit.train.retention import split_probes

        kept = split_probes(list(probes), config.heldout_fraction)[0]
        found["retention_probes"] = stable_hash([(p.id, p.prompt, p.answer) for p in kept])
    given = {"model_name_or_path": model, "records": records, "probes": probes}
    for name, paths in (config.input_files() if config is not None else {}).items():
        if given.get(name) is None:
            hashes = [content_hash(path) for path in paths]
            found[name] = "sha256:" + (hashes[0] if len(hashes) == 1 else stable_hash(hashes))
    return found


def saved_inputs(output_dir: str | os.PathLike) -> dict[str, str]:
    """The :func:`input_fingerprints` a run in ``output_dir`` was started with (empty: none)."""
    path = Path(output_dir) / INPUTS_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _input_differences(saved: Mapping[str, str], now: Mapping[str, str],
                       files: Mapping[str, Sequence[str]]) -> str:
    parts = []
    for key in sorted(set(saved) | set(now)):
        if saved.get(key) != now.get(key):
            change = f"{saved.get(key, 'by name')} -> {now.get(key, 'by name')}"
            parts.append(f"{key}: the content of {', '.join(files[key])} changed ({change})"
                         if key in files and key in saved else f"{key}: {change}")
    return "; ".join(parts)
