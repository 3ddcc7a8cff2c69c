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


@pytest.mark.slow
def test_smollm2_converted_model_saves_and_reloads(smollm2, tmp_path):
    from forgetkit.models import load_model

    model, tokenizer = smollm2
    assert "quantization_config" not in model.config.to_dict()
    model.save_pretrained(tmp_path)  # a full fine-tune must be able to export
    tokenizer.save_pretrained(tmp_path)
    again, _ = load_model(tmp_path, device="cpu")
    name, param = next(iter(model.named_parameters()))
    assert (dict(again.named_parameters())[name] == param).all()
