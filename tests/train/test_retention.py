"""The retention baselines (ewc, replay, fisher_orthogonal), the retention split and early
stopping at a memorization target, on the tiny random Llama (float64)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from forgetkit import fisher
from forgetkit.data.records import load_probe_sets, load_probes
from forgetkit.fisher import FisherError
from forgetkit.models import load_model
from forgetkit.train import TrainConfig, train
from forgetkit.train.loop import MixedOrder
from forgetkit.train.losses import ewc_penalty
from forgetkit.train.retention import replay_count, split_probes
from tests.train.test_run import config_for, losses, max_difference, weights

pytestmark = pytest.mark.usefixtures("one_thread")


# --- the retention split -----------------------------------------------------------------------

def test_retention_split_is_disjoint_deterministic_and_nested():
    probes = load_probe_sets(["toyworld", "kgfact"])
    retention, evaluation = split_probes(probes, 0.5)
    kept, scored = {p.id for p in retention}, {p.id for p in evaluation}
    assert not kept & scored
    assert kept | scored == {p.id for p in probes}
    assert 0.4 < len(kept) / len(probes) < 0.6
    shuffled = list(probes)
    random.Random(0).shuffle(shuffled)
    assert {p.id for p in split_probes(shuffled, 0.5)[0]} == kept  # by id, not by position
    assert {p.id for p in split_probes(probes, 0.25)[0]} < kept  # a smaller share is a subset
    assert split_probes(probes, 0.0) == ([], probes)
    with pytest.raises(ValueError, match="must be in"):
        split_probes(probes, 1.0)


def test_retention_methods_evaluate_only_probes_they_did_not_train_on(tiny, tiny_probes,
                                                                      tmp_path):
    result = train(config_for(tiny, tmp_path / "run", method="replay", max_steps=2,
                              probes=str(tiny_probes), do_eval=True, eval_max_new_tokens=4))
    out = Path(result.output_dir)
    replayed = {json.loads(line)["probe_id"]
                for line in (out / "replay_examples.jsonl").read_text().splitlines()}
    scored = {json.loads(line)["id"] for line in (out / "eval" / "2.jsonl").read_text()
              .splitlines()}
    probe_ids = {p.id for p in load_probes(str(tiny_probes))}
    assert replayed and not replayed & scored
    assert replayed | (scored & probe_ids) == probe_ids
    assert result.extra["replay_examples"] == result.extra["retention_probes"] == len(replayed)
    # the results carry 95% bootstrap intervals that cover their point estimates
    intervals = json.loads((out / "results.json").read_text())["intervals"]
    memorization = intervals["memorization"]
    assert memorization["value"] == result.scores.memorization and memorization["n"] == 8
    assert memorization["low"] <= memorization["value"] <= memorization["high"]
    # the random model answers no probe, so retention (a ratio to the base) is undefined
    assert result.retention.overall is None and intervals["retention"] is None


# --- EWC ---------------------------------------------------------------------------------------

def test_ewc_penalty_and_gradient_by_hand():
    """lambda = 2, F and theta - theta0 chosen so every term can be added up by hand."""
    theta = {"w": torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.5, -1.0]], dtype=torch.float64),
             "b": torch.tensor([1.0, -1.0], dtype=torch.float64)}
    anchor = {"w": torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.5, 0.0]], dtype=torch.float64),
              "b": torch.tensor([0.0, 1.0], dtype=torch.float64)}
    fisher_values = {"w": torch.tensor([[0.5, 1.0, 2.0], [3.0, 7.0, 1.0]], dtype=torch.float64),
                     "b": torch.tensor([0.25, 4.0], dtype=torch.float64)}
    penalty, gradients = ewc_penalty(theta, anchor, fisher_values, strength=2.0)
    # (2/2) * (0.5*1 + 1*4 + 1*1 + 0.25*1 + 4*4) = 21.75
    assert penalty == 21.75
    # 2 * F * (theta - theta0)
    assert torch.equal(gradients["w"], torch.tensor([[1.0, 4.0, 0.0], [0.0, 0.0, -2.0]],
                                                    dtype=torch.float64))
    assert torch.equal(gradients["b"], torch.tensor([0.5, -16.0], dtype=torch.float64))


def test_ewc_penalty_and_gradient_match_autograd_on_a_tiny_model(tiny):
    model, _ = load_model(tiny[0], dtype="float64", device="cpu")
    named = dict(model.named_parameters())
    generator = torch.Generator().manual_seed(0)
    anchor = {n: p.detach().clone() for n, p in named.items()}
    with torch.no_grad():
        for p in named.values():
            p.add_(0.01 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    fisher_values = {n: torch.rand(p.shape, generator=generator, dtype=p.dtype)
                     for n, p in named.items() if "layers.1" in n}  # some parameters only
    penalty, gradients = ewc_penalty(named, anchor, fisher_values, strength=3.0)
    reference = sum(1.5 * (fisher_values[n] * (named[n] - anchor[n]).square()).sum()
                    for n in fisher_values)
    reference.backward()
    assert penalty == pytest.approx(reference.item(), rel=1e-12)
    assert gradients.keys() == fisher_values.keys()
    for name, g in gradients.items():
        torch.testing.assert_close(g, named[name].grad, rtol=1e-12, atol=0)
    assert all(named[n].grad is None for n in named if n not in fisher_values)


def test_ewc_restrains_the_update_where_the_fisher_is_large(tiny, tiny_probes, tmp_path):
    base = weights(tiny[0])
    changes = {}
    for method, strength in (("sft", 0.0), ("ewc", 0.0), ("ewc", 1e4)):
        result = train(config_for(tiny, tmp_path / f"{method}-{strength}", method=method,
                                  ewc_strength=strength, probes=str(tiny_probes),
                                  retention_fraction=0.5, max_steps=10))
        changes[method, strength] = (result, weights(result.model_path))
    sft, free, strong = (changes[k] for k in (("sft", 0.0), ("ewc", 0.0), ("ewc", 1e4)))
    assert max_difference(sft[1], free[1]) == 0.0  # strength 0 is SFT
    saved = fisher.load(Path(strong[0].output_dir) / "fisher")

    def fisher_norm(trained):  # sum_j F_jj (theta_j - theta0_j)^2
        return saved.quad_form({n: trained[n].double() - base[n].double()
                                for n in saved.shapes})

    assert fisher_norm(strong[1]) < 0.2 * fisher_norm(sft[1])
    assert all(row["ewc_penalty"] >= 0 for row in strong[0].metrics if "loss" in row)
    assert losses(strong[0])[-1] < losses(strong[0])[0]  # it still learns


def test_ewc_refuses_a_fisher_of_another_model(tiny, tiny_probes, tmp_path):
    other, tokenizer = load_model(tiny[0], dtype="float64", device="cpu")
    with torch.no_grad():
        other.model.norm.weight.mul_(1.5)
    path = tmp_path / "other_fisher"
    fisher.diagonal(other, tokenizer, load_probes(str(tiny_probes))[:4]).save(path)
    out = tmp_path / "run"
    with pytest.raises(FisherError, match=r"fisher_path .*another model"):
        train(config_for(tiny, out, method="ewc", fisher_path=str(path),
                         probes=str(tiny_probes)))
    assert not (out / "metrics.jsonl").exists() and not list(out.glob("checkpoint-*"))
    # the command line names the problem instead of a traceback
    from forgetkit.train import main

    with pytest.raises(SystemExit, match="another model"):
        main([f"--model_name_or_path={tiny[0]}", f"--records={tiny[1]}", "--method=ewc",
              f"--fisher_path={path}", f"--probes={tiny_probes}", "--dtype=float64",
              f"--output_dir={tmp_path / 'cli'}", "--max_steps=2", "--device=cpu",
              "--do_eval=false", "--disable_tqdm"])


# --- Fisher-orthogonal SFT ---------------------------------------------------------------------

@pytest.mark.parametrize("representation", ["low_rank", "kfac"])
def test_fisher_orthogonal_update_has_no_component_along_the_removed_directions(
        tiny, tiny_probes, tmp_path, representation):
    base, _ = load_model(tiny[0], dtype="float64", device="cpu")
    runs = {}
    for method in ("sft", "fisher_orthogonal"):
        result = train(config_for(tiny, tmp_path / method, method=method, orthogonal_k=4,
                                  probes=str(tiny_probes), retention_fraction=0.5,
                                  orthogonal_fisher=representation))
        runs[method] = load_model(result.model_path, dtype="float64", device="cpu")[0]
    saved = fisher.load(tmp_path / "fisher_orthogonal" / "fisher")
    assert saved.kind == representation
    assert saved.rank == 4 if representation == "low_rank" else saved.rank > 4
    orthogonal = fisher.delta(base, runs["fisher_orthogonal"], dtype=torch.float64)
    plain = fisher.delta(base, runs["sft"], dtype=torch.float64)
    assert saved.coordinates(orthogonal, 4).abs().max() < 1e-10
    assert saved.coordinates(plain, 4).abs().max() > 1e-4  # SFT does move along them
    assert orthogonal.sq_norm() > 1e-4  # and the orthogonal update is not empty


def test_fisher_orthogonal_takes_its_directions_from_the_chosen_parameters(tiny, tiny_probes,
                                                                          tmp_path):
    """orthogonal_params: the Fisher, and so the removed directions, cover the chosen
    parameters only (the update has no component along them); the others train freely. Under
    a pattern that selects untrained parameters, or none, training does not start."""
    base, _ = load_model(tiny[0], dtype="float64", device="cpu")
    result = train(config_for(tiny, tmp_path / "mlp", method="fisher_orthogonal", orthogonal_k=4,
                              probes=str(tiny_probes), retention_fraction=0.5,
                              orthogonal_fisher="kfac", orthogonal_params=r"mlp\."))
    saved = fisher.load(tmp_path / "mlp" / "fisher")
    assert set(saved.shapes) == {n for n, _ in base.named_parameters() if "mlp." in n}
    tuned = load_model(result.model_path, dtype="float64", device="cpu")[0]
    chosen = fisher.delta(base, tuned, params=r"mlp\.", dtype=torch.float64)
    assert saved.coordinates(chosen, 4).abs().max() < 1e-10 and chosen.sq_norm() > 1e-4
    others = fisher.delta(base, tuned, params="self_attn", dtype=torch.float64)
    assert others.sq_norm() > 1e-4
    with pytest.raises(FisherError, match=r"orthogonal_params='self_attn' selects parameters "
                                          "that are not trained"):
        train(config_for(tiny, tmp_path / "lora", method="fisher_orthogonal", orthogonal_k=2,
                         probes=str(tiny_probes), orthogonal_params="self_attn",
                         use_peft=True, lora_r=2))
    with pytest.raises(FisherError, match="nothing_like_this"):
        train(config_for(tiny, tmp_path / "none", method="fisher_orthogonal", orthogonal_k=2,
                         probes=str(tiny_probes), orthogonal_params="nothing_like_this"))
    assert not (tmp_path / "none" / "metrics.jsonl").exists()


def test_fisher_orthogonal_k_larger_than_the_fisher_rank_is_an_error(tiny, tiny_probes,
                                                                     tmp_path):
    model, tokenizer = load_model(tiny[0], dtype="float64", device="cpu")
    path = tmp_path / "rank2"
    fisher.low_rank(model, tokenizer, load_probes(str(tiny_probes))[:4], rank=2).save(path)
    with pytest.raises(FisherError, match=r"orthogonal_k=3 is larger than the rank .*2"):
        train(config_for(tiny, tmp_path / "file", method="fisher_orthogonal", orthogonal_k=3,
                         fisher_path=str(path), probes=str(tiny_probes)))
    with pytest.raises(FisherError, match=r"orthogonal_k=14 .*13 retention probes"):
        train(config_for(tiny, tmp_path / "computed", method="fisher_orthogonal",
                         orthogonal_k=14, probes=str(tiny_probes)))
    assert not (tmp_path / "computed" / "metrics.jsonl").exists()


# --- replay ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("batch", "ratio", "replayed"), [
    (8, 0.25, 2), (8, 0.5, 4), (8, 0.0, 0), (8, 0.99, 7), (5, 0.5, 2), (1, 0.5, 0)])
def test_replay_batches_hold_the_configured_ratio(batch, ratio, replayed):
    assert replay_count(batch, ratio) == replayed
    order = MixedOrder(n_records=6, n_replay=10, ratio=ratio, seed=0)
    taken = [order.take(batch) for _ in range(12)]
    assert all(sum(i >= 6 for i in step) == replayed for step in taken)
    records = [i for step in taken for i in step if i < 6]
    assert sorted(records[:6]) == list(range(6))  # the records still come as reshuffles
    if replayed:
        replay = [i - 6 for step in taken for i in step if i >= 6]
        assert sorted(replay[:10]) == list(range(10))


def test_replay_trains_on_the_base_answers(tiny, tiny_probes, tmp_path):
    result = train(config_for(tiny, tmp_path / "run", method="replay", replay_ratio=0.5,
                              probes=str(tiny_probes), max_steps=16))
    rows = [json.loads(line) for line in
            (Path(result.output_dir) / "replay_examples.jsonl").read_text().splitlines()]
    assert len(rows) == 13 and all(row["token_ids"] for row in rows)
    curve = losses(result)
    assert curve[-1] < 0.8 * curve[0]
    # 2 of every 4 examples are records: 16 steps are 4 epochs of the 8 records
    assert [row["epoch"] for row in result.metrics][-1] == 4.0


# --- early stopping ----------------------------------------------------------------------------

def test_early_stopping_stops_at_the_first_evaluation_meeting_the_target(tiny, tiny_probes,
                                                                         tmp_path):
    common = dict(max_steps=24, eval_steps=4, do_eval=True, eval_max_new_tokens=12,
                  probes=str(tiny_probes), learning_rate=3e-2)
    whole = train(config_for(tiny, tmp_path / "whole", **common))
    trajectory = [(row["step"], row["eval"]["memorization"]) for row in whole.metrics
                  if "eval" in row]
    best = max(m for _, m in trajectory)
    assert best > 0, trajectory  # the target must be reachable for the test to mean anything
    target = min(m for _, m in trajectory if m > 0)
    first = next(step for step, m in trajectory if m >= target)
    stopped = train(config_for(tiny, tmp_path / "stopped", stop_at_memorization=target,
                               **common))
    assert stopped.global_step == first
    assert stopped.metrics[-1]["step"] == first
    assert stopped.metrics[-1]["stopped_at_memorization"] == target
    assert stopped.scores.memorization >= target
    saved = json.loads((tmp_path / "stopped" / "results.json").read_text())
    assert saved["stop_at_memorization"] == {"target": target, "reached": True, "step": first}
    assert max_difference(weights(stopped.model_path), weights(whole.model_path)) > 0
    never = train(config_for(tiny, tmp_path / "never", stop_at_memorization=1.0,
                             **{**common, "max_steps": 4}))
    assert never.global_step == 4 and never.extra["stop_at_memorization"]["reached"] is \
        (never.scores.memorization == 1.0)


# --- bad input -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("overrides", "message"), [
    ({"method": "replay", "replay_ratio": 1.0}, r"replay_ratio=1.0 must be in \[0, 1\)"),
    ({"method": "replay", "replay_ratio": -0.1}, r"replay_ratio=-0.1 must be in \[0, 1\)"),
    ({"stop_at_memorization": 0.0, "eval_steps": 5}, r"stop_at_memorization=0.0 must be in"),
    ({"stop_at_memorization": 1.5, "eval_steps": 5}, r"stop_at_memorization=1.5 must be in"),
    ({"stop_at_memorization": 0.9}, "stop_at_memorization needs eval_steps"),
    ({"method": "fisher_orthogonal", "orthogonal_k": 0}, "orthogonal_k=0 must be >= 1"),
    ({"method": "fisher_orthogonal", "orthogonal_fisher": "gram"},
     "orthogonal_fisher='gram' must be low_rank or kfac"),
    ({"method": "ewc", "ewc_strength": -1.0}, "ewc_strength=-1.0 must be >= 0"),
    ({"method": "sft", "fisher_path": "f"}, "fisher_path applies to ewc and fisher_orthogonal"),
    ({"method": "ewc", "retention_fraction": 0.0}, "leaves method ewc no retention data"),
    ({"retention_fraction": 1.0}, r"retention_fraction=1.0 must be in \[0, 1\)"),
])
def test_bad_method_settings_fail_in_the_config(overrides, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**overrides)


@pytest.mark.parametrize(("name", "values"), [("orthogonal_fisher", ("low_rank", "kfac")),
                                              ("orthogonal_params", (None, "mlp"))])
def test_a_field_of_one_method_does_not_tell_apart_runs_of_the_others(name, values):
    """orthogonal_fisher and orthogonal_params decide fisher_orthogonal's weights only: an SFT
    config's hashes do not see them, fisher_orthogonal's do."""
    for method, differs in (("sft", False), ("ewc", False), ("fisher_orthogonal", True)):
        first, second = (TrainConfig(method=method, **{name: value}) for value in values)
        assert (first.config_hash() != second.config_hash()) == differs, method
        assert (first.run_hash() != second.run_hash()) == differs, method
