"""ForgettingCallback inside TRL's SFTTrainer on toyworld and MixSD targets: the logged metrics
move as they must, land in the trainer's log history and the JSONL, for a full fine-tune and
a LoRA adapter; bad probes and tokenizers are refused before training."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import textwrap

import pytest
import torch

from forgetkit.data.records import Probe, load_probes, load_records
from forgetkit.mixsd import MixConfig, build_targets, to_trl_dataset

trl = pytest.importorskip("trl")
pytest.importorskip("datasets")

from forgetkit.integrations import ForgettingCallback  # noqa: E402
from tests.processes import torchrun  # noqa: E402

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
    # the logged displacement is the exact d'Fd of the update at the base, in full precision
    # (training ran under bf16 autocast, which the measurement bypasses)
    from forgetkit import fisher

    named = dict(base.named_parameters())
    update = fisher.ParamDelta({n: p.detach() - named[n].detach()
                                for n, p in model.named_parameters()})
    exact = fisher.displacement(base, tokenizer, probes, update)
    assert last["forgetting/displacement"] == pytest.approx(exact.mean, rel=1e-6)
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


DDP_WORKER = textwrap.dedent('''
    import dataclasses, json, sys
    import torch
    import trl
    from safetensors.torch import save_file
    from forgetkit.data.records import load_probes, load_records
    from forgetkit.integrations import ForgettingCallback
    from forgetkit.mixsd import MixConfig, build_targets, to_trl_dataset
    from forgetkit.models import load_model

    torch.set_num_threads(1)
    out = sys.argv[1]
    model, tokenizer = load_model("toyworld", device="cpu")
    records = [dataclasses.replace(r, paraphrases=()) for r in load_records("kgfact")[:8]]
    probes = load_probes("toyworld")[::60]
    dataset = to_trl_dataset(build_targets(model, tokenizer, records, MixConfig()), records)
    args = trl.SFTConfig(output_dir=out, report_to=[], use_cpu=True, max_steps=4,
                         per_device_train_batch_size=4, learning_rate=3e-3, save_strategy="no",
                         activation_checkpointing=False, seed=0, ddp_backend="gloo")
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=dataset,
                             processing_class=tokenizer)
    ForgettingCallback(probes, records=records, every=2).attach(trainer)
    trainer.train()
    rank = trainer.args.process_index
    logs = [log for log in trainer.state.log_history if "forgetting/kl" in log]
    with open(f"{out}/rank{rank}.json", "w") as handle:
        json.dump({"world": trainer.args.world_size, "logs": logs}, handle)
    if rank == 0:
        save_file({n: p.detach().contiguous() for n, p in model.named_parameters()},
                  f"{out}/final.safetensors")
''')


def test_ddp_ranks_agree_and_the_main_process_writes_the_jsonl(toyworld, tmp_path, one_thread):
    """Two gloo processes: every rank logs the same values, the JSONL has one row per
    measurement, and the displacement (probes split over the ranks) equals one process's."""
    from safetensors.torch import load_file

    from forgetkit import fisher

    worker = tmp_path / "worker.py"
    worker.write_text(DDP_WORKER)
    torchrun(str(worker), str(tmp_path))
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1)]
    timeless = [[{k: v for k, v in log.items() if k != "forgetting/seconds"}
                 for log in rank["logs"]] for rank in ranks]
    assert ranks[0]["world"] == 2 and timeless[0] == timeless[1]
    assert [log["step"] for log in ranks[0]["logs"]] == [0, 2, 4]
    rows = (tmp_path / "forgetting.jsonl").read_text().splitlines()
    assert [json.loads(row)["step"] for row in rows] == [0, 2, 4]

    base, tokenizer = toyworld
    final = load_file(str(tmp_path / "final.safetensors"))
    named = dict(base.named_parameters())
    delta = fisher.ParamDelta({n: final[n] - named[n].detach() for n in final})
    single = fisher.displacement(base, tokenizer, load_probes("toyworld")[::60], delta)
    assert ranks[0]["logs"][-1]["forgetting/displacement"] == pytest.approx(single.mean,
                                                                             rel=1e-5)
