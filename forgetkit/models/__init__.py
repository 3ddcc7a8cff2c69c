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
    collate,
    encode,
    end_token_ids,
    model_inputs,
)
from forgetkit.models.inference import CacheSignature, eval_mode, greedy_generate, new_cache
from forgetkit.models.loading import BUILTIN_MODELS, load_model, resolve_dtype
from forgetkit.models.storage import ModelNotFoundError, cache_dir, model_hash, weights_hash

__all__ = [
    "BUILTIN_MODELS",
    "IGNORE_INDEX",
    "MODEL_INPUTS",
    "CacheSignature",
    "Encoding",
    "ModelNotFoundError",
    "cache_dir",
    "collate",
    "encode",
    "end_token_ids",
    "eval_mode",
    "greedy_generate",
    "load_model",
    "model_hash",
    "model_inputs",
    "new_cache",
    "resolve_dtype",
    "weights_hash",
]
