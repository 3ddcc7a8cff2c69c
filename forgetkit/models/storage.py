"""Where forgetkit keeps models, and the error raised when a model cannot be found."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["ModelNotFoundError", "cache_dir"]


class ModelNotFoundError(FileNotFoundError):
    """No model under the given name; the message says what was looked for and how to get it."""


def cache_dir() -> Path:
    """forgetkit's cache: ``$FORGETKIT_CACHE`` or ``~/.cache/forgetkit``."""
    return Path(os.environ.get("FORGETKIT_CACHE", Path.home() / ".cache" / "forgetkit"))
