from __future__ import annotations

import json

import pytest
import torch

from forgetkit.models import ModelNotFoundError, load_model, resolve_dtype


def test_load_model_unknown_name_is_clear(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not a built-in name"):
        load_model("no-such-org/no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="neither a model folder"):
        load_model(tmp_path / "empty")


def test_load_model_local_folder_and_dtype(toyworld, tmp_path):
    model, tokenizer = toyworld
    model.save_pretrained(tmp_path / "copy")
    tokenizer.save_pretrained(tmp_path / "copy")
    again, _ = load_model(tmp_path / "copy", dtype="float64", device="cpu")
    assert next(again.parameters()).dtype == torch.float64
    assert not again.training
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("float8")


def test_load_peft_adapter_resolves_base(toyworld, tmp_path):
    from peft import LoraConfig, get_peft_model

    model, tokenizer = toyworld
    base_dir = tmp_path / "base"
    model.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    base, _ = load_model(base_dir, device="cpu")
    peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"]))
    peft_model.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base_dir)
    loaded, tok = load_model(tmp_path / "adapter", device="cpu")
    assert type(loaded).__name__ == "PeftModel"
    assert len(tok) == len(tokenizer)
    config["base_model_name_or_path"] = ""
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelNotFoundError, match="base_model_name_or_path"):
        load_model(tmp_path / "adapter")
