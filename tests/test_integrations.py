"""ForgettingCallback inside TRL's SFTTrainer on toyworld and MixSD targets: the logged metrics
move as they must, land in the trainer's log history and the JSONL, for a full fine-tune and
a LoRA adapter; bad probes and tokenizers are refused before training."""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import pytest
import torch

from forgetkit.data.records import Probe, load_probes, load_records
from forgetkit.mixsd import MixConfig, build_targets, to_trl_dataset

trl = pytest.importorskip("trl")
pytest.importorskip("datasets")

from forgetkit.integrations import ForgettingCallback  # noqa: E402

STEPS, EVERY = 24, 12


@pytest.fixture(scope="module")
def records():
    """Eight kgfact facts, without paraphrases (fewer generations per measurement)."""
    return [dataclasses.replace(r, paraphrases=()) for r in load_records("kgfact")[:8]]


@pytest.fixture(scope="module")
def probes():
    """Four toyworld probes per capability."""
    chosen, seen = [], {}
    for probe in load_probes("toyworld"):
        if seen.get(probe.capability, 0) < 4:
            chosen.append(probe)
            seen[probe.capability] = seen.get(probe.capability, 0) + 1
    return chosen


@pytest.fixture(scope="module")
def dataset(toyworld, records):
    model, tokenizer = toyworld
    return to_trl_dataset(build_targets(model, tokenizer, records, MixConfig(lam=0.3)), records)


def make_trainer(model, tokenizer, dataset, tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=STEPS,
                    per_device_train_batch_size=8, learning_rate=3e-3, lr_scheduler_type="constant",
                    logging_steps=EVERY, save_strategy="no", activation_checkpointing=False,
                    seed=0, dataloader_num_workers=0)
    settings.update(overrides)
    return trl.SFTTrainer(model=model, args=trl.SFTConfig(**settings), train_dataset=dataset,
                          processing_class=tokenizer)


def forgetting_logs(trainer):
    return [log for log in trainer.state.log_history if "forgetting/kl" in log]


def test_full_fine_tune_logs_rising_memorization_kl_and_displacement(
        toyworld, records, probes, dataset, tmp_path, one_thread):
    base, tokenizer = toyworld
    model = copy.deepcopy(base)
    trainer = make_trainer(model, tokenizer, dataset, tmp_path)
    callback = ForgettingCallback(probes, records=records, every=EVERY).attach(trainer)
    trainer.train()

    logs = forgetting_logs(trainer)
    assert [log["step"] for log in logs] == [0, EVERY, STEPS]
    first, last = logs[0], logs[-1]
    assert first["forgetting/kl"] == 0 and first["forgetting/displacement"] == 0
    assert last["forgetting/memorization"] > first["forgetting/memorization"] + 0.4
    for log in logs[1:]:
        for key in ("forgetting/kl", "forgetting/displacement", "forgetting/predicted_kl"):
            assert math.isfinite(log[key]) and log[key] > 0, (key, log)
        assert log["forgetting/kl_low"] <= log["forgetting/kl"] <= log["forgetting/kl_high"]
        assert 0 <= log["forgetting/memorization_low"] <= log["forgetting/memorization"] \
            <= log["forgetting/memorization_high"] <= 1
        assert "forgetting/retention" in log and "forgetting/accuracy/arithmetic" in log
    assert logs[-1]["forgetting/kl"] > logs[1]["forgetting/kl"]

    rows = [json.loads(line) for line in callback.path.read_text().splitlines()]
    assert [row["step"] for row in rows] == [0, EVERY, STEPS]
    assert rows[-1]["kl"] == pytest.approx(last["forgetting/kl"])
    assert rows[-1]["details"]["displacement"]["n_probes"] == len(probes)
    # the base copy is released and the model keeps its trained weights
    assert callback.base_kind == "trainable weights" and callback._base is None
    assert not torch.equal(model.lm_head.weight, base.lm_head.weight)


def test_lora_adapter_is_measured_against_the_disabled_adapter(
        toyworld, records, probes, dataset, tmp_path, one_thread):
    peft = pytest.importorskip("peft")
    base, tokenizer = toyworld
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
        lora_dropout=0.0))
    trainer = make_trainer(model, tokenizer, dataset, tmp_path, max_steps=EVERY,
                           learning_rate=1e-2)
    callback = ForgettingCallback(probes, records=records, every=EVERY).attach(trainer)
    trainer.train()

    logs = forgetting_logs(trainer)
    assert [log["step"] for log in logs] == [0, EVERY]
    assert logs[1]["forgetting/kl"] > 0 and logs[1]["forgetting/displacement"] > 0
    assert callback.base_kind == "disabled adapter"  # no second copy of the base
    # the base the callback used is the disabled adapter: its scores equal the base model's
    from forgetkit.diagnostics.evaluation import evaluate

    with model.disable_adapter():
        disabled = evaluate(model, tokenizer, records, probes)
    plain = evaluate(base, tokenizer, records, probes)
    assert disabled.to_dict() == plain.to_dict()
    assert logs[0]["forgetting/memorization"] == pytest.approx(plain.memorization)


def test_probes_out_of_the_model_vocabulary_are_refused_before_training(
        toyworld, records, dataset, tmp_path):
    base, tokenizer = toyworld
    other = copy.deepcopy(tokenizer)
    other.add_tokens(["Zorblaxian"])  # a token the model has no embedding for
    probe = Probe("alien-0", "Where does Zorblaxian live?", "Pithiram", "known_fact")
    trainer = make_trainer(copy.deepcopy(base), other, dataset, tmp_path)
    ForgettingCallback([probe], records=records, every=EVERY).attach(trainer)
    with pytest.raises(ValueError, match=r"probe 'alien-0' encodes to token id 1124 .*outside "
                                         r"the model's vocabulary of 1124"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_a_tokenizer_other_than_the_trainers_is_refused(toyworld, records, probes, dataset,
                                                        tmp_path):
    base, tokenizer = toyworld
    other = copy.deepcopy(tokenizer)
    other.add_tokens(["Zorblaxian"])
    trainer = make_trainer(copy.deepcopy(base), tokenizer, dataset, tmp_path)
    ForgettingCallback(probes, records=records, every=EVERY, tokenizer=other).attach(trainer)
    with pytest.raises(ValueError, match=r"different vocabularies .*'Zorblaxian'"):
        trainer.train()


def test_unattached_or_never_evaluating_callbacks_are_refused(toyworld, probes, dataset,
                                                              tmp_path):
    base, tokenizer = toyworld
    trainer = make_trainer(copy.deepcopy(base), tokenizer, dataset, tmp_path)
    trainer.add_callback(ForgettingCallback(probes, every=EVERY))
    with pytest.raises(ValueError, match=r"attach\(trainer\)"):
        trainer.train()
    trainer = make_trainer(copy.deepcopy(base), tokenizer, dataset, tmp_path)
    ForgettingCallback(probes).attach(trainer)
    with pytest.raises(ValueError, match="eval_strategy is 'no': pass every=N"):
        trainer.train()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"probes": []}, "non-empty sequence of Probes"),
    ({"probes": ["Where?"]}, r"probes\[0\] is a str, expected a Probe"),
    ({"every": 0}, "every=0 must be an integer >= 1"),
    ({"estimator": "exact"}, "estimator='exact' must be one of"),
    ({"filename": "../x.jsonl"}, "must be a bare file name"),
])
def test_bad_arguments_fail_at_construction(probes, kwargs, message):
    arguments = {"probes": probes[:2], **kwargs}
    with pytest.raises((ValueError, TypeError), match=message):
        ForgettingCallback(**arguments)
