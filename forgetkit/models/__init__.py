"""Models: loading (:func:`load_model`), the one prompt/completion tokenizer (:func:`encode`),
batching (:func:`collate`) and generation, plus the two built-in base models.

Modules, bottom up: :mod:`~forgetkit.models.storage` (the cache folder, the not-found error),
:mod:`~forgetkit.models.encoding` (:class:`Encoding`, :func:`encode`, :func:`collate`),
:mod:`~forgetkit.models.inference` (running a model without training it),
:mod:`~forgetkit.models.toyworld` and :mod:`~forgetkit.models.smollm2` (the built-in models,
which use only the modules above) and :mod:`~forgetkit.models.loading` (:func:`load_model`,
which knows the built-ins).
"""

from forgetkit.models.encoding import (
    IGNORE_INDEX,
    MODEL_INPUTS,
    Encoding,
    check_context,
    collate,
    context_length,
    encode,
    end_token_ids,
    model_inputs,
    record_label,
)
from forgetkit.models.inference import CacheSignature, eval_mode, greedy_generate, new_cache
from forgetkit.models.loading import (
    BUILTIN_MODELS,
    ModelLoadError,
    load_model,
    resolve_device,
    resolve_dtype,
)
from forgetkit.models.storage import ModelNotFoundError, cache_dir, model_hash, weights_hash

__all__ = [
    "BUILTIN_MODELS",
    "IGNORE_INDEX",
    "MODEL_INPUTS",
    "CacheSignature",
    "Encoding",
    "ModelLoadError",
    "ModelNotFoundError",
    "cache_dir",
    "check_context",
    "collate",
    "context_length",
    "encode",
    "end_token_ids",
    "eval_mode",
    "greedy_generate",
    "load_model",
    "model_hash",
    "model_inputs",
    "new_cache",
    "record_label",
    "resolve_device",
    "resolve_dtype",
    "weights_hash",
]
