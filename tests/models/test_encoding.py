from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from forgetkit.models import (
    IGNORE_INDEX,
    Encoding,
    collate,
    encode,
    end_token_ids,
    model_inputs,
)

WORDS = ["Where", "does", "Vabebrim", "live", "?", "The", "answer", "is", "Paris", ".",
         "lives", "in", "plus", "3", "4", "\\boxed{", "}", "What", "capital"]
text = st.lists(st.sampled_from(WORDS), min_size=1, max_size=12).map(" ".join)
SETTINGS = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


def _check(enc, tokenizer, prompt, completion, chat):
    labelled = [i for i, label in enumerate(enc.labels) if label != IGNORE_INDEX]
    # labels cover exactly the completion tokens: a contiguous tail after the prompt
    assert labelled == list(range(enc.prompt_length, len(enc.input_ids)))
    assert [enc.input_ids[i] for i in labelled] == enc.labels[enc.prompt_length :]
    # the prompt part is exactly the prompt-only encoding (what generation sees)
    alone = encode(tokenizer, prompt)
    assert enc.input_ids[: enc.prompt_length] == alone.input_ids
    assert all(label == IGNORE_INDEX for label in alone.labels)
    # the completion decodes back to the completion text, and ends with the end token
    assert enc.input_ids[-1] in end_token_ids(tokenizer)
    if tokenizer.unk_token_id not in enc.completion_ids:  # word-level vocabularies may lack a word
        decoded = tokenizer.decode(enc.completion_ids[:-1], skip_special_tokens=True)
        assert decoded.strip() == completion.strip()
    if chat:
        assert "assistant" in tokenizer.decode(alone.input_ids[-4:])


@given(prompt=text, completion=text)
@SETTINGS
def test_encode_labels_cover_completion_plain(toyworld, prompt, completion):
    _, tokenizer = toyworld
    assert not tokenizer.chat_template
    _check(encode(tokenizer, prompt, completion), tokenizer, prompt, completion, chat=False)


@given(prompt=text, completion=text)
@SETTINGS
def test_encode_labels_cover_completion_chat(chat_tokenizer, prompt, completion):
    assert chat_tokenizer.chat_template
    _check(encode(chat_tokenizer, prompt, completion), chat_tokenizer, prompt, completion,
           chat=True)


def test_encode_plain_matches_whole_text(toyworld):
    _, tokenizer = toyworld
    enc = encode(tokenizer, "Where does Vabebrim live?", "Vabebrim lives in Pithiram.")
    whole = tokenizer("Where does Vabebrim live? Vabebrim lives in Pithiram.")["input_ids"]
    assert enc.input_ids == [*whole, tokenizer.eos_token_id]
    assert enc.input_ids[0] == tokenizer.bos_token_id


def test_encode_context_goes_before_prompt(chat_tokenizer):
    enc = encode(chat_tokenizer, "Who?", "Bo.", context="Bo lives here.")
    prompt_text = chat_tokenizer.decode(enc.input_ids[: enc.prompt_length])
    assert prompt_text.index("Bo lives here.") < prompt_text.index("Who?")


def test_encode_rejects_empty_completion(toyworld):
    with pytest.raises(ValueError, match="empty completion"):
        encode(toyworld[1], "Where does Vabebrim live?", "   ")


@pytest.mark.parametrize("side", ["left", "right"])
def test_collate_positions_ignore_padding(toyworld, side):
    _, tokenizer = toyworld
    encs = [encode(tokenizer, "Where does Vabebrim live?", "Vabebrim lives in Pithiram."),
            encode(tokenizer, "What is 3 plus 4?", "7.")]
    batch = collate(encs, tokenizer.pad_token_id, padding_side=side)
    for row, enc in enumerate(encs):
        real = batch["attention_mask"][row].bool()
        assert batch["input_ids"][row][real].tolist() == enc.input_ids
        assert batch["labels"][row][real].tolist() == enc.labels
        assert batch["position_ids"][row][real].tolist() == list(range(len(enc.input_ids)))
        assert (batch["labels"][row][~real] == IGNORE_INDEX).all()


def test_left_padding_gives_same_logits(toyworld):
    model, tokenizer = toyworld
    encs = [encode(tokenizer, "Where does Vabebrim live?", "Vabebrim lives in Pithiram."),
            encode(tokenizer, "What is 3 plus 4?", "7.")]
    with torch.no_grad():
        single = model(input_ids=torch.tensor([encs[1].input_ids])).logits[0]
        batch = collate(encs, tokenizer.pad_token_id, padding_side="left")
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    position_ids=batch["position_ids"]).logits[1]
    n = len(encs[1].input_ids)
    torch.testing.assert_close(out[-n:], single, atol=1e-4, rtol=1e-4)


def test_from_ids_is_how_encode_assembles_an_encoding(toyworld):
    _, tokenizer = toyworld
    enc = encode(tokenizer, "Where does Vabebrim live?", "Vabebrim lives in Pithiram.")
    again = Encoding.from_ids(enc.input_ids[: enc.prompt_length], enc.completion_ids)
    assert again == enc
    prompt_only = Encoding.from_ids(enc.input_ids[: enc.prompt_length])
    assert prompt_only == encode(tokenizer, "Where does Vabebrim live?")
    assert prompt_only.labels == [IGNORE_INDEX] * prompt_only.prompt_length


def test_model_inputs_are_the_forward_arguments_of_a_batch(toyworld):
    _, tokenizer = toyworld
    batch = collate([encode(tokenizer, "What is 3 plus 4?", "7.")], tokenizer.pad_token_id)
    assert list(model_inputs(batch)) == ["input_ids", "attention_mask", "position_ids"]
    assert model_inputs(batch)["position_ids"] is batch["position_ids"]
    no_positions = {k: v for k, v in batch.items() if k != "position_ids"}
    assert list(model_inputs(no_positions)) == ["input_ids", "attention_mask"]


def test_context_checks_and_devices_are_refused_with_a_clear_error():
    import torch

    from forgetkit.models import check_context, context_length, resolve_device

    class Config:
        max_position_embeddings = 8

    class Model:
        config = Config()

    class Tokenizer:
        model_max_length = int(1e30)

    assert context_length(Model()) == 8 and context_length(None, Tokenizer()) is None
    check_context([("record 'a'", 8)], 8)
    check_context([("record 'a'", 10**6)], None)
    with pytest.raises(ValueError, match=r"record 'b' \(f\.jsonl:2\): prompt \+ completion is 9 "
                                         r"tokens, longer than the model's context \(8 tokens\)"):
        check_context([("record 'a'", 3), ("record 'b' (f.jsonl:2)", 9)], 8)
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="is not a device torch knows"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"device 'cuda(:1)?': (this torch build has no "
                                             r"CUDA|no CUDA device)"):
            resolve_device("cuda:1")


def test_unanswered_records_are_listed_in_one_warning(caplog):
    import logging

    from forgetkit.data.answers import warn_unanswered
    from forgetkit.data.records import Record

    records = [Record("ok", "where ?", "in paris .", "paris"),
               Record("bad", "where ?", "in rome .", "paris")]
    with caplog.at_level(logging.WARNING):
        assert warn_unanswered(records, "train") == ["bad"]
    assert "train: 1 of 2 records have an answer their target does not contain" in caplog.text
    assert "'bad'" in caplog.text and "'ok'" not in caplog.text
