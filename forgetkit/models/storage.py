"""Where forgetkit keeps models, the error raised when a model cannot be found, and the
fingerprint of a model's weights."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from forgetkit.seeding import stable_hash

__all__ = ["ModelNotFoundError", "cache_dir", "model_hash", "weights_hash"]


class ModelNotFoundError(FileNotFoundError):
    """No model under the given name; the message says what was looked for and how to get it."""


def cache_dir() -> Path:
    """forgetkit's cache: ``$FORGETKIT_CACHE`` or ``~/.cache/forgetkit``."""
    return Path(os.environ.get("FORGETKIT_CACHE", Path.home() / ".cache" / "forgetkit"))


def weights_hash(model: torch.nn.Module) -> str:
    """A hex digest of every parameter's name, shape, dtype and bytes (not of where the model was
    loaded from): equal digests mean equal weights.

    A sharded parameter (a DTensor, e.g. under FSDP ``fully_shard``) is gathered whole first,
    so every rank must call this together, and the digest is the unsharded model's."""
    digest = hashlib.sha256()
    for name, p in model.named_parameters():
        whole = p.full_tensor() if hasattr(p, "full_tensor") else p
        digest.update(f"{name}|{tuple(whole.shape)}|{whole.dtype}".encode())
        digest.update(memoryview(whole.detach().cpu().reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()[:16]


def model_hash(model: torch.nn.Module) -> str:
    """A digest of what a model computes: its class, its config and :func:`weights_hash` (not
    where it was loaded from)."""
    config = getattr(model, "config", None)
    return stable_hash(type(model).__name__, None if config is None else config.to_dict(),
                       weights_hash(model))
