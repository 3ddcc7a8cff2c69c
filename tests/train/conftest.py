"""Fixtures shared by the trainer tests."""

from __future__ import annotations

import json

import pytest
import torch

from forgetkit.data.records import load_records


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """``(model_dir, records_file)``: a 2-layer random Llama (initializer_range 0.2, so its
    next-token distributions depend on the prompt) and 8 kgfact records whose targets differ
    in length (so per-batch and per-step token normalization differ)."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from forgetkit.data.corpora.toyworld import toyworld_world, vocabulary_texts
    from forgetkit.models.toyworld import build_tokenizer

    root = tmp_path_factory.mktemp("tiny")
    tokenizer = build_tokenizer(vocabulary_texts(toyworld_world()))
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
        initializer_range=0.2, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    with open(root / "records.jsonl", "w", encoding="utf-8") as handle:
        for i, r in enumerate(load_records("kgfact")[:8]):  # targets of different lengths
            target = r.target if i % 2 else f"{r.meta['statement']} {r.target}"
            handle.write(json.dumps({"id": r.id, "prompt": r.prompt, "target": target,
                                     "answer": r.answer, "meta": r.meta}) + "\n")
    return root / "model", root / "records.jsonl"


@pytest.fixture(scope="module")
def tiny_probes(tiny):
    """A probe file beside the tiny model: 24 toyworld known-fact and arithmetic probes, about
    half of which the retention split sets aside for ewc, replay and fisher_orthogonal."""
    from forgetkit.data.records import load_probes

    probes = [p for p in load_probes("toyworld") if p.capability in ("known_fact", "arithmetic")]
    path = tiny[0].parent / "probes.jsonl"
    with open(path, "w", encoding="utf-8") as handle:
        for p in probes[:12] + probes[-12:]:
            handle.write(json.dumps({"id": p.id, "prompt": p.prompt, "answer": p.answer,
                                     "capability": p.capability}) + "\n")
    return path
