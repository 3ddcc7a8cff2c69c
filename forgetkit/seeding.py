"""Deterministic digests (for seeds and cache keys) and the one global seeding of entry points."""

from __future__ import annotations

import hashlib
import json
import random
from typing import Any

__all__ = ["seed_everything", "stable_hash"]


def stable_hash(*parts: Any, length: int = 16) -> str:
    """A hex digest of ``parts`` that does not depend on PYTHONHASHSEED."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(json.dumps(part, sort_keys=True, default=str).encode("utf-8"))
        digest.update(b"\x00")
    return digest.hexdigest()[:length]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA). For entry points only, never library code."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
