from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from forgetkit.fisher.delta import LoraFactor, delta


def _llama(seed=0, hidden=16):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=40, hidden_size=hidden, intermediate_size=32,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2)
    return LlamaForCausalLM(config).double()


def _lora(base, seed=1):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(base, LoraConfig(r=3, lora_alpha=6, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data.normal_(0, 0.1)
    return model


def test_lora_factor_matches_dense():
    torch.manual_seed(0)
    factor = LoraFactor(torch.randn(7, 3, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64), 2.0)
    dense = factor.dense()
    other = torch.randn(4, 7, 5, dtype=torch.float64)
    torch.testing.assert_close(factor.dot(other), (other * dense).sum(dim=(-2, -1)))
    torch.testing.assert_close(factor.sq_norm(), dense.pow(2).sum())


def test_full_delta_is_difference():
    base, ft = _llama(0), _llama(1)
    d = delta(base, ft, dtype=torch.float64)
    for name, p in base.named_parameters():
        torch.testing.assert_close(d.dense(name), dict(ft.named_parameters())[name] - p)
    only_mlp = delta(base, ft, params=r"mlp", dtype=torch.float64)
    assert only_mlp.entries and all("mlp" in n for n in only_mlp)


def test_lora_delta_equals_merged_delta():
    base = _llama(0)
    reference = {n: p.detach().clone() for n, p in base.named_parameters()}
    lora = _lora(_llama(0))
    d_lora = delta(base, lora, dtype=torch.float64)
    assert d_lora.is_low_rank and len(d_lora) == 4  # q and v in 2 layers
    merged = _lora(_llama(0)).merge_and_unload()
    d_merged = delta(base, merged, dtype=torch.float64)
    for name in d_merged:
        expected = d_merged.dense(name)
        if name in d_lora.entries:
            torch.testing.assert_close(d_lora.dense(name), expected)
        else:
            assert expected.abs().max() == 0
        assert torch.equal(dict(base.named_parameters())[name], reference[name])
    assert d_lora.sq_norm() == pytest.approx(d_merged.sq_norm(), rel=1e-10)


def test_different_architectures_rejected():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=40))
    with pytest.raises(ValueError, match="different architectures"):
        delta(_llama(0), gpt2)
    with pytest.raises(ValueError, match="shape"):
        delta(_llama(0, hidden=16), _llama(0, hidden=8))


def test_adapter_on_other_base_rejected():
    lora = _lora(_llama(5))
    with pytest.raises(ValueError, match="different base"):
        delta(_llama(0), lora)
