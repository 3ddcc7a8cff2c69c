"""Trainer tests on a tiny random Llama with the toyworld tokenizer (float64 where exactness
is checked)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from forgetkit.data.records import load_records
from forgetkit.models import encode, load_model
from forgetkit.train import OutputDirError, TrainConfig, train
from forgetkit.train.checkpoint import input_fingerprints, same_config, saved_inputs
from forgetkit.train.methods import OPSD, frozen_teacher, opsd_examples
from tests.processes import TORCHRUN

REPO = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("one_thread")


def config_for(tiny, out: Path, **overrides) -> TrainConfig:
    model_dir, records = tiny
    values = dict(model_name_or_path=str(model_dir), records=str(records), output_dir=str(out),
                  max_steps=6, per_device_train_batch_size=4, learning_rate=1e-2,
                  warmup_steps=1, logging_steps=1, save_steps=0, do_eval=False,
                  disable_tqdm=True, dtype="float64", device="cpu", opsd_max_new_tokens=6,
                  mix={"max_new_tokens": 8, "max_retries": 0, "on_failure": "keep"})
    values.update(overrides)
    return TrainConfig(**values)


def losses(result) -> list[float]:
    return [row["step_loss"] for row in result.metrics if "step_loss" in row]


def weights(path) -> dict[str, torch.Tensor]:
    return load_file(Path(path) / "model.safetensors")


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def test_output_dir_of_another_run_fails_before_training(tiny, tmp_path):
    out = tmp_path / "run"
    train(config_for(tiny, out, max_steps=3, save_steps=1, save_total_limit=2))
    assert [p.name for p in sorted(out.glob("checkpoint-*"))] == ["checkpoint-2", "checkpoint-3"]
    before = (out / "metrics.jsonl").read_text()
    with pytest.raises(OutputDirError, match=r"another run.*learning_rate: 0\.01 -> 0\.02"):
        train(config_for(tiny, out, max_steps=3, learning_rate=2e-2))
    with pytest.raises(OutputDirError, match="already holds this run"):
        train(config_for(tiny, out, max_steps=3))
    with pytest.raises(OutputDirError, match="belongs to another run"):
        train(config_for(tiny, out, max_steps=3, learning_rate=2e-2,
                         resume_from_checkpoint="latest"))
    assert (out / "metrics.jsonl").read_text() == before
    result = train(config_for(tiny, out, max_steps=2, learning_rate=2e-2,
                              overwrite_output_dir=True))
    assert list(out.glob("checkpoint-*")) == []  # the old run's checkpoints are gone
    assert len(losses(result)) == 2 and "learning_rate: 0.02" in (out / "train_config.yaml").read_text()


# --- training ----------------------------------------------------------------------------------

def opsd_loss_on_fixed_samples(model_dir, records_file, seed: int = 0) -> float:
    """OPSD loss of a model on completions sampled once from the base model."""
    base, tokenizer = load_model(model_dir, dtype="float64", device="cpu")
    examples = opsd_examples(tokenizer, load_records(records_file))

    def loss(model) -> float:
        method = OPSD(base, frozen_teacher(base, False), pad_token_id=tokenizer.pad_token_id,
                      end_ids=[tokenizer.eos_token_id], device=torch.device("cpu"), seed=seed,
                      num_generations=2, temperature=1.0, max_new_tokens=6, top_k=64,
                      direction="forward")
        prepared = method.prepare(examples, step=0)
        with torch.no_grad():
            return (method.loss_sum(model, prepared) / prepared.n_tokens).item()

    return loss


@pytest.mark.parametrize(("method", "use_peft"), [
    ("sft", False), ("sft", True), ("mixsd", False), ("opsd", False), ("opsd", True),
    ("ewc", True), ("replay", False), ("fisher_orthogonal", True)])
def test_every_method_changes_weights_and_lowers_its_loss(tiny, tiny_probes, tmp_path, method,
                                                          use_peft):
    result = train(config_for(tiny, tmp_path / "run", method=method, use_peft=use_peft,
                              max_steps=16, probes=str(tiny_probes), orthogonal_k=4,
                              ewc_strength=1.0))  # the penalty is tested in test_retention
    base, trained = weights(tiny[0]), weights(result.model_path)
    assert max_difference(base, trained) > 1e-3
    if method == "opsd":  # fresh samples every step: compare on one fixed set of samples
        loss = opsd_loss_on_fixed_samples(*tiny)
        final, _ = load_model(result.model_path, dtype="float64", device="cpu")
        initial, _ = load_model(tiny[0], dtype="float64", device="cpu")
        assert loss(final) < 0.8 * loss(initial)
    else:
        curve = losses(result)
        assert curve[-1] < 0.8 * curve[0]
    if use_peft:  # adapter and merged copy are the same model
        adapter, tokenizer = load_model(result.adapter_path, dtype="float64", device="cpu")
        from transformers import AutoModelForCausalLM

        merged = AutoModelForCausalLM.from_pretrained(result.model_path, dtype=torch.float64)
        ids = torch.tensor([encode(tokenizer, "Where does Vabebrim live?").input_ids])
        with torch.no_grad():
            assert torch.allclose(adapter(input_ids=ids).logits, merged(input_ids=ids).logits,
                                  atol=1e-9)
    if method == "mixsd":
        assert (Path(result.output_dir) / "targets.jsonl").exists()


@pytest.mark.parametrize("overrides", [
    {"method": "sft", "gradient_accumulation_steps": 2, "per_device_train_batch_size": 2},
    {"method": "opsd", "use_peft": True, "lora_dropout": 0.2},
    {"method": "ewc", "ewc_strength": 100.0, "retained": True},
    {"method": "replay", "replay_ratio": 0.5, "use_peft": True, "retained": True},
    {"method": "fisher_orthogonal", "orthogonal_k": 3, "retained": True},
], ids=["sft-accumulation", "opsd-lora-dropout", "ewc", "replay-lora", "fisher-orthogonal"])
def test_resume_reproduces_the_uninterrupted_run(tiny, tiny_probes, tmp_path, overrides):
    if overrides.get("retained"):  # methods that train on a split of the probes
        overrides = {**{k: v for k, v in overrides.items() if k != "retained"},
                     "probes": str(tiny_probes)}
    whole = train(config_for(tiny, tmp_path / "whole", save_steps=3, save_total_limit=None,
                             **overrides))
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(tmp_path / "whole" / "checkpoint-3", resumed_dir / "checkpoint-3")
    resumed = train(config_for(tiny, resumed_dir, save_steps=3, save_total_limit=None,
                               resume_from_checkpoint="latest", **overrides))
    assert losses(resumed) == losses(whole)[3:]
    assert max_difference(weights(whole.model_path), weights(resumed.model_path)) == 0.0


def test_evaluation_during_training_writes_predictions(tiny, tmp_path):
    probes = REPO / "tests" / "fixtures" / "records" / "native_probes.jsonl"
    result = train(config_for(tiny, tmp_path / "run", max_steps=4, eval_steps=2, do_eval=True,
                              probes=str(probes), eval_max_new_tokens=4))
    out = Path(result.output_dir)
    assert sorted(int(p.stem) for p in (out / "eval").glob("*.jsonl")) == [0, 2, 4]
    rows = [json.loads(line) for line in (out / "eval" / "4.jsonl").read_text().splitlines()]
    assert len(rows) == 8 + 2 and {"reply", "correct", "bucket"} <= rows[0].keys()
    evaluated = [row for row in result.metrics if "eval" in row]
    assert [row["step"] for row in evaluated] == [0, 2, 4]
    assert result.scores.counts["memorization"] == 8
    assert set(result.retention.per_capability) == {"arithmetic", "known_fact"}
    summary = json.loads((out / "results.json").read_text())
    assert summary["global_step"] == 4 and summary["scores"]["counts"]["arithmetic"] == 1


def test_objects_train_like_names_and_guard_their_run_folder(tiny, tmp_path):
    """A model, tokenizer and records given as objects train exactly as when named; their
    fingerprints keep another run's inputs from resuming or reusing the folder."""
    model_dir, records_file = tiny
    named = train(config_for(tiny, tmp_path / "named", method="mixsd"))
    model, tokenizer = load_model(model_dir, dtype="float64", device="cpu")
    records = load_records(records_file)
    config = config_for(tiny, tmp_path / "objects", method="mixsd", save_steps=3)
    given = train(config, model=model, tokenizer=tokenizer, records=records)
    assert max_difference(weights(named.model_path), weights(given.model_path)) == 0.0
    assert losses(named) == losses(given)
    saved = saved_inputs(tmp_path / "objects")
    assert saved == input_fingerprints(model=load_model(model_dir, dtype="float64",
                                                        device="cpu")[0], records=records)
    assert same_config(tmp_path / "objects", config, inputs=saved)
    assert not same_config(tmp_path / "objects", config)  # a run by names is another run
    fewer = records[:5]
    with pytest.raises(OutputDirError, match=r"other inputs.*records"):
        train(config, records=fewer)
    with pytest.raises(OutputDirError, match=r"trained on other inputs.*model"):
        train(dataclasses.replace(config, resume_from_checkpoint="latest"), records=records)
    with pytest.raises(ValueError, match="model and tokenizer together"):
        train(config, model=model)


LAUNCHERS = {
    "torchrun": TORCHRUN,
    "accelerate": ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", "0"],
}


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_two_processes_match_one_process(tiny, tmp_path, launcher):
    one = train(config_for(tiny, tmp_path / "one", per_device_train_batch_size=4))
    args = [f"--{k}={v}" for k, v in dict(
        model_name_or_path=tiny[0], records=tiny[1], output_dir=tmp_path / "two", max_steps=6,
        per_device_train_batch_size=2, learning_rate=1e-2, warmup_steps=1, logging_steps=1,
        save_steps=0, do_eval=False, disable_tqdm=True, dtype="float64", device="cpu").items()]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, *LAUNCHERS[launcher], "-m", "forgetkit.train", *args],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    two = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step_loss"] for r in two] == pytest.approx(losses(one), abs=1e-9)
    assert max_difference(weights(one.model_path), weights(tmp_path / "two")) < 1e-6
