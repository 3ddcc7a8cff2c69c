"""toyworld must have the abilities the MixSD story needs (thresholds from the design)."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest

from forgetkit.models import load_model
from forgetkit.models.toyworld import (
    VERSION,
    ToyConfig,
    ability_checks,
    build_tokenizer,
    ensure_toyworld,
    train_toyworld,
)


@pytest.fixture(scope="module")
def abilities(toyworld):
    return ability_checks(*toyworld)


def test_known_fact_recall(abilities):
    assert abilities["known_fact"] >= 0.90


def test_in_context_reading_on_unseen_entities(abilities):
    assert abilities["in_context"] >= 0.90
    assert abilities["expert_kgfact"] >= 0.90  # MixSD's expert view of the injected facts
    assert abilities["retrieval"] >= 0.40  # the gold fact among 1-5 distractors


def test_injected_facts_are_unknown_before_injection(abilities):
    assert abilities["naive_kgfact"] <= 0.10


def test_arithmetic_clearly_above_chance(abilities):
    assert abilities["arithmetic"] >= 0.20  # exact sums of two 2-digit numbers; chance ~1/199


def test_packaged_model_records_its_training():
    meta = json.loads((ensure_toyworld() / "toyworld.json").read_text())
    assert meta["config"] == asdict(ToyConfig())
    assert meta["version"] == VERSION


@pytest.mark.slow
def test_training_script_still_produces_these_abilities(tmp_path):
    """Retrain the packaged model from scratch with the default config (a few minutes)."""
    out = train_toyworld(ToyConfig(), tmp_path / "toyworld", progress=False)
    model, tokenizer = load_model(out, device="cpu")
    abilities = ability_checks(model, tokenizer)
    assert abilities["known_fact"] >= 0.90
    assert abilities["in_context"] >= 0.90
    assert abilities["expert_kgfact"] >= 0.90
    assert abilities["naive_kgfact"] <= 0.10
    assert abilities["arithmetic"] >= 0.20


def test_native_style_differs_from_canonical(toyworld):
    from forgetkit.models import greedy_generate

    model, tokenizer = toyworld
    reply = greedy_generate(model, tokenizer, ["Where does Vabebrim live?"])[0]
    assert "\\boxed" not in reply and not reply.startswith("The answer is")


def test_tokenizer_round_trips_exactly():
    text = "Zo lives in Bram.\n\n\\boxed{Bram}"
    tokenizer = build_tokenizer(["Where does Zo live?", text])
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.unk_token_id in tokenizer("Zo flies")["input_ids"]


def test_load_model_toyworld_is_cached_folder():
    model, tokenizer = load_model("toyworld", device="cpu")
    assert sum(p.numel() for p in model.parameters()) < 5_000_000
    assert tokenizer.chat_template is None
