from __future__ import annotations

import pytest

from forgetkit.models import encode, end_token_ids, greedy_generate


@pytest.mark.slow
def test_smollm2_answers_paris(smollm2):
    model, tokenizer = smollm2
    reply = greedy_generate(model, tokenizer, ["What is the capital of France?"])[0]
    assert "Paris" in reply


@pytest.mark.slow
def test_smollm2_special_tokens_after_conversion(smollm2):
    model, tokenizer = smollm2
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in end_token_ids(tokenizer, model)
    assert tokenizer.pad_token_id is not None
    enc = encode(tokenizer, "Hi?", "Hello.")
    assert enc.input_ids[-1] == im_end
    assert tokenizer.decode(enc.input_ids[: enc.prompt_length]).endswith(
        "<|im_start|>assistant\n")
