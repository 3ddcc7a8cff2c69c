"""Running a model without training it: eval mode, KV-cached forwards."""

from __future__ import annotations

import pytest
import torch

from forgetkit.models import CacheSignature, collate, encode, eval_mode, new_cache


@pytest.mark.parametrize("training", [True, False])
def test_eval_mode_restores_the_mode_even_after_an_error(training):
    model = torch.nn.Sequential(torch.nn.Dropout(0.5))
    model.train(training)
    with eval_mode(model):
        assert not model.training
    assert model.training is training
    with pytest.raises(RuntimeError), eval_mode(model):
        raise RuntimeError("inside")
    assert model.training is training


def test_cached_forward_matches_a_full_forward(toyworld):
    model, tokenizer = toyworld
    signature = CacheSignature.of(model)
    assert signature.cache_argument in ("past_key_values", "cache")
    ids = collate([encode(tokenizer, "Where does Vabebrim live?")], tokenizer.pad_token_id)
    with torch.no_grad():
        cache = new_cache()
        first = model(input_ids=ids["input_ids"][:, :-1], **signature.kwargs(cache)).logits
        step = model(input_ids=ids["input_ids"][:, -1:], **signature.kwargs(cache)).logits
        full = model(input_ids=ids["input_ids"]).logits
    if signature.takes_logits_to_keep:
        assert first.shape[1] == 1  # only the last position's logits were computed
    torch.testing.assert_close(step[:, -1], full[:, -1], atol=1e-5, rtol=1e-5)
