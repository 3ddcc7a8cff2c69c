"""Shared fixtures. Models load once per session; the hub is never contacted."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "agg")

import pytest


@pytest.fixture(scope="session")
def toyworld():
    """(model, tokenizer) of the embedded default, float32 on CPU."""
    from forgetkit.models import load_model

    return load_model("toyworld", device="cpu")


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of SmolLM2-135M-Instruct, float32 on CPU."""
    from forgetkit.models import load_model

    return load_model("smollm2-135m", device="cpu")


@pytest.fixture(scope="session")
def chat_tokenizer():
    """A real tokenizer with a chat template (SmolLM2's)."""
    from transformers import AutoTokenizer

    from forgetkit.models.smollm2 import ensure_smollm2

    return AutoTokenizer.from_pretrained(ensure_smollm2())


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny models: threads only add synchronization cost
    there, and on a shared CPU they lose a lot. Restored afterwards."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
