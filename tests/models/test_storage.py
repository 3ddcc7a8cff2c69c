"""The cache folder and the fingerprint of a model's weights."""

from __future__ import annotations

import torch

from forgetkit.models import cache_dir, load_model, weights_hash


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FORGETKIT_CACHE", str(tmp_path / "cache"))
    assert cache_dir() == tmp_path / "cache"


def test_weights_hash_follows_the_weights_not_the_folder(toyworld, tmp_path):
    model, tokenizer = toyworld
    model.save_pretrained(tmp_path / "copy")
    tokenizer.save_pretrained(tmp_path / "copy")
    copy, _ = load_model(tmp_path / "copy", device="cpu")
    assert weights_hash(copy) == weights_hash(model)
    with torch.no_grad():
        next(copy.parameters())[0, 0] += 1e-3
    assert weights_hash(copy) != weights_hash(model)


def test_weights_hash_is_the_fisher_provenance_hash(toyworld):
    """Fisher files record this digest; it must not change when the Fisher code adopts it."""
    from forgetkit.fisher import io as fisher_io

    assert weights_hash(toyworld[0]) == fisher_io.weights_hash(toyworld[0])
