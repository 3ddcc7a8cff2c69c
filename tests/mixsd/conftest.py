"""Fixtures shared by the MixSD tests."""

from __future__ import annotations

import pytest
import torch

from forgetkit.data.records import load_records


@pytest.fixture(scope="module")
def records():
    """kgfact records of several prompt lengths (so batches are padded)."""
    kg = load_records("kgfact")
    return [kg[i] for i in (0, 1, 2, 3, 5, 8, 13, 21, 34, 55, 60, 61, 62, 70, 80, 99)]


@pytest.fixture(scope="session")
def tiny_model():
    """``tiny_model(kind, tokenizer)``: a random 2-layer Llama or GPT-2 over ``tokenizer``'s
    vocabulary, float64, in eval mode."""
    return _tiny


def _tiny(kind: str, tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=2,
            num_attention_heads=2, intermediate_size=32, max_position_embeddings=256, **ids))
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=16, n_layer=2,
                                           n_head=2, n_positions=256, **ids))
    return model.to(torch.float64).eval()
