"""The study scripts of experiments/: end to end on a tiny toyworld configuration, and resume."""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest
from scipy import stats

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


def _script(name: str):
    """Import experiments/<name>.py as a module (experiments/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"experiments_{name}", EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pareto():
    return _script("pareto")


def _tiny_argv(tmp: Path) -> list[str]:
    return ["--model", "toyworld", "--records", "kgfact", "--limit", "4",
            "--paraphrases_per_record", "1", "--probes_per_capability", "3",
            "--methods", "sft", "mixsd:0.3", "--max_steps", "6", "--warmup_steps", "1",
            "--peak_eval_steps", "3", "--device", "cpu",
            "--out", str(tmp / "out"), "--cache", str(tmp / "cache")]


@pytest.fixture(scope="module")
def tiny_study(pareto, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pareto")
    table = pareto.main(_tiny_argv(tmp))
    return tmp, table


def test_pareto_end_to_end_writes_table_runs_and_figures(tiny_study):
    tmp, table = tiny_study
    out = tmp / "out"
    for name in ("pareto_config.yaml", "results.csv", "results.json", "runs.json",
                 "pareto.png", "retention_by_capability.png", "sft_trajectory.png",
                 "trajectories.csv"):
        assert (out / name).is_file(), name
    assert list(table["label"]) == ["SFT", "SFT@peak", "MixSD λ=0.3"]
    csv = pd.read_csv(out / "results.csv")
    assert list(csv["label"]) == list(table["label"])
    assert {"memorization", "paraphrase", "retention", "on_frontier"} <= set(csv.columns)
    assert any(c.startswith("retention_") for c in csv.columns)
    results = json.loads((out / "results.json").read_text())
    assert results["budget"]["max_steps"] == 6 and results["budget"]["examples_per_step"] == 8
    assert results["sft_peak_step"] in (3, 6)
    assert csv.loc[csv["label"] == "SFT@peak", "steps"].item() == results["sft_peak_step"]
    assert "two_hop" not in results["retained_capabilities"]
    runs = json.loads((out / "runs.json").read_text())["runs"]
    for run in runs:  # every fine-tune the Fisher study will read loads as a model folder
        assert (Path(run["model_path"]) / "config.json").is_file(), run["label"]
    assert not list((tmp / "cache").glob("*/checkpoint-*")), "checkpoints are pruned"
    final = csv[csv["label"] != "SFT@peak"]  # 95% bootstrap intervals over items
    for name in ("memorization", "retention"):
        assert (final[f"{name}_low"] <= final[name] + 1e-12).all()
        assert (final[name] <= final[f"{name}_high"] + 1e-12).all()


def test_pareto_rerun_skips_finished_runs(pareto, tiny_study, caplog):
    tmp, _ = tiny_study
    stamps = {p: p.stat().st_mtime_ns for p in (tmp / "cache").glob("*/results.json")}
    assert len(stamps) == 2
    with caplog.at_level(logging.INFO, logger="pareto"):
        table = pareto.main(_tiny_argv(tmp))
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert caplog.text.count("finished run with the same config") == 2
    assert "training" not in caplog.text
    assert list(table["label"]) == ["SFT", "SFT@peak", "MixSD λ=0.3"]


def test_pareto_rerun_with_another_config_retrains(pareto, tiny_study, caplog):
    tmp, _ = tiny_study
    argv = _tiny_argv(tmp)
    shutil.copytree(tmp / "cache", tmp / "cache-retrained")  # the other tests keep theirs
    argv[argv.index("--out") + 1] = str(tmp / "out-retrained")
    argv[argv.index("--cache") + 1] = str(tmp / "cache-retrained")
    del argv[argv.index("--methods") + 1]  # mixsd:0.3 only
    argv[argv.index("--max_steps") + 1] = "4"
    with caplog.at_level(logging.INFO, logger="pareto"):
        table = pareto.main(argv)
    assert "MixSD λ=0.3: training 4 steps" in caplog.text
    assert table["steps"].tolist() == [4]


def test_pareto_run_stopped_before_its_first_checkpoint_keeps_its_mixsd_targets(
        pareto, tmp_path, caplog):
    argv = _tiny_argv(tmp_path)
    argv[argv.index("--methods") + 1:argv.index("--methods") + 3] = ["mixsd:0.3"]
    argv[argv.index("--max_steps") + 1] = "3"
    before = pareto.main(argv)
    run = tmp_path / "cache" / "mixsd-0.3"
    kept = {"train_config.yaml", "inputs.json", "targets.jsonl", "targets.jsonl.meta.json"}
    assert kept <= {p.name for p in run.iterdir()}
    for path in run.iterdir():  # what a run killed while training, before step 3, leaves
        if path.name not in kept:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    shutil.rmtree(tmp_path / "out" / "runs")  # nor had it a record
    targets = (run / "targets.jsonl").stat().st_mtime_ns
    caplog.clear()
    with caplog.at_level(logging.INFO):
        table = pareto.main(argv)
    assert "stopped before its first checkpoint: starting it over" in caplog.text
    assert "deleting the previous run" not in caplog.text and "MixSD: " not in caplog.text
    assert (run / "targets.jsonl").stat().st_mtime_ns == targets
    assert table["memorization"].tolist() == before["memorization"].tolist()


def test_pareto_rescore_on_more_probes_reuses_the_fine_tunes(pareto, tiny_study, caplog):
    tmp, before = tiny_study
    argv = _tiny_argv(tmp)
    argv[argv.index("--out") + 1] = str(tmp / "out-rescored")
    with caplog.at_level(logging.INFO, logger="pareto"):
        table = pareto.main([*argv, "--rescore_probes_per_capability", "6"])
    assert "training" not in caplog.text and "rescoring the base and 3 fine-tunes" in caplog.text
    assert list(table["label"]) == ["SFT", "SFT@peak", "MixSD λ=0.3"]
    probes = [json.loads(line) for line in next((tmp / "cache" / "inputs").glob("probes-*.jsonl"))
              .read_text().splitlines()]
    n_capabilities = len({p["capability"] for p in probes})
    assert (table["probes_scored"] > 3 * n_capabilities).all()
    # same models, same records, greedy decoding: memorization and the first 3 probes of each
    # capability are scored exactly as in training's final evaluation
    assert table["memorization"].tolist() == before["memorization"].tolist()
    final = {row["id"]: row["reply"] for row in map(json.loads, (
        tmp / "cache" / "sft" / "eval" / "6.jsonl").read_text().splitlines())}
    (rescored,) = (tmp / "out-rescored" / "rescore" / "sft").glob("*.jsonl")
    replies = {row["id"]: row["reply"] for row in map(json.loads,
                                                      rescored.read_text().splitlines())}
    assert all(replies[i] == reply for i, reply in final.items())
    assert len(replies) > len(final)
    runs = json.loads((tmp / "out-rescored" / "runs.json").read_text())["runs"]
    assert [r["retention"] for r in runs] == pytest.approx(table["retention"].tolist())
    stamps = {p: p.stat().st_mtime_ns
              for p in (tmp / "out-rescored" / "rescore").glob("*/*.jsonl")}
    assert len(stamps) == 1 + table["model_path"].nunique()  # the base, each model folder once
    again = pareto.main([*argv, "--rescore_probes_per_capability", "6"])
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert again["retention"].tolist() == pytest.approx(table["retention"].tolist())
    # retention over the capabilities the base answers above chance (toyworld's free-form
    # probes: chance 0), and its paired difference from SFT's: 0 for SFT itself
    clear = json.loads((tmp / "out-rescored" / "results.json").read_text())[
        "base_scores"]["capabilities_above_chance"]
    assert clear and "two_hop" not in clear
    sft = table[table["label"] == "SFT"].iloc[0]
    assert (sft["above_chance_vs_sft"], sft["above_chance_vs_sft_low"],
            sft["above_chance_vs_sft_high"]) == (0.0, 0.0, 0.0)
    assert (table["above_chance_retention_low"] <= table["above_chance_retention"] + 1e-12).all()
    assert (tmp / "out-rescored" / "pareto_above_chance.png").is_file()
    assert "above_chance_vs_sft" in pareto.format_table(table)


def test_pareto_rescore_only_probe_sets_are_scored_whole(pareto, tiny_study, caplog):
    """--rescore_probes adds sets no run trained on: scored in the rescoring only, every probe
    (up to the per-capability cut), ids kept apart from the runs' sets."""
    tmp, _ = tiny_study
    argv = _tiny_argv(tmp)
    argv[argv.index("--out") + 1] = str(tmp / "out-extra")
    with caplog.at_level(logging.INFO, logger="pareto"):
        table = pareto.main([*argv, "--rescore_probes_per_capability", "4",
                             "--rescore_probes", "kgfact-large:retrieval"])
    assert "training" not in caplog.text
    assert table["retention_kgfact-large:retrieval"].notna().all()
    base = [json.loads(line) for path in (tmp / "out-extra" / "rescore" / "base").glob("*.jsonl")
            for line in path.read_text().splitlines()]
    extra = [row["id"] for row in base if row["id"].startswith("kgfact-large:")]
    assert extra == [f"kgfact-large:kgfact-retrieval-{i:04d}" for i in range(4)]


def test_pareto_study_outlasts_its_cache_through_the_run_records(pareto, tiny_study, caplog):
    """Each finished run keeps a record (config, results, evaluations; no weights) and its
    rescoring predictions in ``out``: with the cache gone, a rerun restores the runs from their
    records and scores nothing; rescoring on other probes needs the weights, so it trains the
    runs again."""
    tmp, _ = tiny_study
    argv = _tiny_argv(tmp)
    shutil.copytree(tmp / "cache", tmp / "cache-lost")
    argv[argv.index("--out") + 1] = str(tmp / "out-records")
    argv[argv.index("--cache") + 1] = str(tmp / "cache-lost")
    table = pareto.main([*argv, "--rescore_probes_per_capability", "5"])
    out = tmp / "out-records"
    for run in ("sft", "mixsd-0.3"):
        assert {"train_config.yaml", "inputs.json", "results.json", "study_timing.json",
                "eval"} <= {p.name for p in (out / "runs" / run).iterdir()}
        assert not list((out / "runs" / run).glob("*.safetensors"))
    assert (out / "runs" / "sft" / "peak.json").is_file()
    predictions = sorted(p.relative_to(out) for p in (out / "rescore").glob("*/*.jsonl"))
    assert [p.parent.name for p in predictions] == ["base", "mixsd-0.3", "sft"] + (
        ["sft-peak"] if table["model_path"].nunique() == 3 else [])
    shutil.rmtree(tmp / "cache-lost")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pareto"):
        again = pareto.main([*argv, "--rescore_probes_per_capability", "5"])
    assert caplog.text.count("restored the finished run from its record") == 2
    assert "training" not in caplog.text
    assert not list((tmp / "cache-lost").glob("*/*.safetensors"))
    columns = ["label", "steps", "memorization", "retention", "retention_low", "retention_high"]
    pd.testing.assert_frame_equal(again[columns], table[columns])
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pareto"):
        more = pareto.main([*argv, "--rescore_probes_per_capability", "6"])
    assert caplog.text.count("its weights are gone: training it again") == 2
    assert "MixSD λ=0.3: training 6 steps" in caplog.text
    assert (more["probes_scored"] > table["probes_scored"]).all()
    assert more["memorization"].tolist() == table["memorization"].tolist()


def test_pareto_frontier_and_first_peak(pareto):
    points = pd.DataFrame({"memorization": [1.0, 0.9, 0.5, 1.0, None],
                           "retention": [0.1, 0.8, 0.8, 0.05, 1.0]})
    assert pareto.pareto_frontier(points).tolist() == [True, True, False, False, False]
    trajectory = pd.DataFrame({"step": [0, 10, 20, 30], "memorization": [0.0, 0.6, 0.98, 0.97]})
    assert pareto.first_peak(trajectory) == 20
    assert pareto.first_peak(trajectory, tolerance=0.5) == 10


def test_pareto_config_rejects_unknown_method(pareto):
    with pytest.raises(ValueError, match="unknown method"):
        pareto.ParetoConfig(methods=["sft", "dpo"])
    with pytest.raises(ValueError, match="needs a lambda"):
        pareto.ParetoConfig(methods=["mixsd"])


def test_fisher_study_keeps_each_fine_tunes_numbers_beyond_its_weights(pareto, tmp_path,
                                                                       monkeypatch):
    """--available_only diagnoses the recorded fine-tunes whose weights are here (before the
    Pareto study has a runs.json) and keeps their numbers in out/runs/; with the weights gone
    the full study is built from those numbers, and a fine-tune with neither is an error."""
    fisher_study = _script("fisher_study")
    argv = _tiny_argv(tmp_path)
    argv[argv.index("--methods") + 1:argv.index("--methods") + 3] = ["sft"]
    argv[argv.index("--max_steps") + 1] = "3"
    pareto.main(argv)
    (tmp_path / "out" / "runs.json").rename(tmp_path / "runs.json")  # as before the study ends
    study = ["--model", "toyworld", "--pareto", str(tmp_path / "out"), "--n_samples", "6",
             "--rank", "2", "--device", "cpu", "--out", str(tmp_path / "fisher"),
             "--cache", str(tmp_path / "fisher-cache")]
    recorded, calls = fisher_study.recorded_runs, []

    def appearing(config):  # SFT@peak's record appears while SFT is being diagnosed
        calls.append(config)
        return recorded(config)[:1] if len(calls) == 1 else recorded(config)

    monkeypatch.setattr(fisher_study, "recorded_runs", appearing)
    rows, _ = fisher_study.main([*study, "--available_only"])
    monkeypatch.undo()
    assert rows["run"].tolist() == ["sft", "sft-peak"] and len(calls) == 3
    assert rows["status"].tolist() == ["diagnosed", "diagnosed"]
    kept = {p.name for p in (tmp_path / "fisher" / "runs" / "out").iterdir()}
    assert kept == {"sft.json", "sft-peak.json"}
    # SFT trained again (its weights and results.json replaced, the record not yet): its old
    # record is not diagnosed from the new weights, SFT@peak's is
    witness = tmp_path / "cache" / "sft" / "results.json"
    original = witness.read_text()
    witness.write_text(original + " ")
    fresh = [*study[:study.index("--out") + 1], str(tmp_path / "fisher-fresh"),
             *study[study.index("--out") + 2:]]
    rows, _ = fisher_study.main([*fresh, "--available_only"])
    assert rows["status"].tolist() == ["weights of another run", "diagnosed"]
    witness.write_text(original)
    shutil.rmtree(tmp_path / "cache")  # the machine is gone, and the weights with it
    pareto.main(argv)  # the study restored from its records: its inputs and runs.json again
    assert (tmp_path / "out" / "runs.json").is_file()
    assert not list((tmp_path / "cache").glob("*/*.safetensors"))
    rows, _ = fisher_study.main([*study, "--available_only"])
    assert rows["status"].tolist() == ["kept", "kept"]
    table, _ = fisher_study.main(study)
    diagnostics = {json.loads((tmp_path / "fisher" / "runs" / "out" / f"{run}.json").read_text())[
        "diagnostics"]["displacement_exact"] for run in ("sft", "sft-peak")}
    assert set(table["displacement_exact"]) == diagnostics and len(table) == 2
    other = [*study[:study.index("--n_samples") + 1], "7", *study[study.index("--n_samples") + 2:]]
    rows, _ = fisher_study.main([*other, "--available_only"])
    assert rows["status"].tolist() == ["no weights", "no weights"]
    with pytest.raises(FileNotFoundError, match="no diagnostics of this fine-tune are kept"):
        fisher_study.run_study(fisher_study.FisherStudyConfig(
            model="toyworld", pareto=[str(tmp_path / "out")], n_samples=7, rank=2, device="cpu",
            out=str(tmp_path / "fisher"), cache=str(tmp_path / "fisher-cache")))
    # one fine-tune's numbers lost: an error naming it, or with --kept_only a partial study of
    # the other that names it and computes no Fisher
    (tmp_path / "fisher" / "runs" / "out" / "sft-peak.json").unlink()
    same = {"model": "toyworld", "pareto": [str(tmp_path / "out")], "n_samples": 6, "rank": 2,
            "device": "cpu", "out": str(tmp_path / "fisher"),
            "cache": str(tmp_path / "fisher-cache")}
    with pytest.raises(FileNotFoundError, match=r"out/sft-peak: .*1 such fine-tunes"):
        fisher_study.run_study(fisher_study.FisherStudyConfig(**same))
    monkeypatch.setattr(fisher_study, "base_fishers", lambda *a: pytest.fail("Fisher computed"))
    table, _ = fisher_study.main([*study, "--kept_only"])
    assert table["run"].tolist() == ["sft"] and set(table["displacement_exact"]) <= diagnostics
    summary = json.loads((tmp_path / "fisher" / "summary.json").read_text())
    assert summary["missing"] == ["out/sft-peak"] and summary["n_finetunes"] == 1
    assert summary["rank"] == 2 and summary["parameters"] > 0
    with pytest.raises(ValueError, match="available_only and kept_only exclude each other"):
        fisher_study.FisherStudyConfig(**same, kept_only=True, available_only=True)


def test_fisher_and_nll_studies_on_the_tiny_pareto_output(tiny_study, caplog):
    tmp, _ = tiny_study
    fisher_study, nll_study = _script("fisher_study"), _script("nll_study")
    argv = ["--model", "toyworld", "--pareto", str(tmp / "out"), "--n_samples", "8",
            "--rank", "2", "--device", "cpu", "--out", str(tmp / "fisher"),
            "--cache", str(tmp / "fisher-cache")]
    table, correlations = fisher_study.main(argv)
    assert list(table["label"]) == ["SFT", "SFT@peak", "MixSD λ=0.3"]
    assert (table["displacement_diag"] >= 0).all() and (table["measured_kl"] >= 0).all()
    overall = correlations[correlations["target"] == "overall"]
    assert set(overall["diagnostic"]) == set(fisher_study.DIAGNOSTICS)
    assert (overall["n"] == 3).all()
    # the loss over the capabilities the base answers above chance, where the study gives it
    # (this tiny one has none)
    assert "above chance" not in set(correlations["target"])
    path = tmp / "out" / "runs.json"
    saved = path.read_text()
    runs = json.loads(saved)
    for run, value in zip(runs["runs"], (0.9, 0.9, 0.5), strict=True):
        run["above_chance_retention"] = value
    path.write_text(json.dumps(runs))
    try:
        clear, clear_correlations = fisher_study.main(
            [*argv[:-4], "--out", str(tmp / "fisher-clear"), "--cache", str(tmp / "fisher-cache")])
    finally:
        path.write_text(saved)
    assert clear["above_chance_loss"].tolist() == pytest.approx([0.1, 0.1, 0.5])
    rows = clear_correlations[clear_correlations["target"] == "above chance"]
    expected = stats.spearmanr(clear["delta_norm"], [0.1, 0.1, 0.5]).statistic
    assert rows.set_index("diagnostic").loc["delta_norm", "rho"] == pytest.approx(
        expected, nan_ok=True)
    assert len(rows) == len(overall)
    for name in ("diagnostics.csv", "correlations.csv", "summary.json",
                 "diagnostics_vs_retention_loss.png", "predicted_vs_measured_kl.png"):
        assert (tmp / "fisher" / name).is_file(), name
    with caplog.at_level(logging.INFO, logger="fisher_study"):
        fisher_study.main(argv)
    # a rerun takes every fine-tune's kept numbers and needs no Fisher
    assert caplog.text.count("the kept numbers of") == 3 and "diagnosing" not in caplog.text
    assert "base Fisher" not in caplog.text
    # the Kronecker-factored Fisher for the top-k columns: the exact and diagonal ones unchanged
    kfac_table, _ = fisher_study.main([*argv[:-4], "--out", str(tmp / "fisher-kfac"),
                                       "--cache", str(tmp / "fisher-cache"),
                                       "--representation", "kfac"])
    for column in ("displacement_exact", "displacement_diag", "measured_kl"):
        assert kfac_table[column].tolist() == pytest.approx(table[column].tolist(), rel=1e-6)
    assert (kfac_table["displacement_lowrank"] > 0).all()
    assert not kfac_table["displacement_lowrank"].equals(table["displacement_lowrank"])
    summary = json.loads((tmp / "fisher-kfac" / "summary.json").read_text())
    assert summary["representation"] == "kfac" and summary["rank"] == 2

    # several Pareto studies of one base: one table, labelled by study; other probes are refused
    shutil.copytree(tmp / "out", tmp / "again")
    both = [*argv[:3], str(tmp / "out"), str(tmp / "again"), *argv[4:]]
    table, correlations = fisher_study.main(both)
    assert list(table["label"]) == [f"{label} [{study}]" for study in ("out", "again")
                                    for label in ("SFT", "SFT@peak", "MixSD λ=0.3")]
    assert (correlations[correlations["target"] == "overall"]["n"] == 6).all()
    runs = json.loads((tmp / "again" / "runs.json").read_text())
    copied = tmp / "again" / "probes.jsonl"  # each study writes its own copy of the probes
    shutil.copy(runs["probes"], copied)
    (tmp / "again" / "runs.json").write_text(json.dumps({**runs, "probes": str(copied)}))
    assert len(fisher_study.main(both)[0]) == 6
    (tmp / "other").mkdir()
    (tmp / "other" / "runs.json").write_text(json.dumps({**runs, "probes": "toyworld"}))
    with pytest.raises(SystemExit, match=r"error: .*other/runs\.json was scored on probes"):
        fisher_study.main([*argv[:3], str(tmp / "out"), "--pareto", str(tmp / "other"),
                           *argv[4:]])

    nll = nll_study.main(["--model", "toyworld", "--records", "kgfact", "--limit", "3",
                          "--lams", "0.3", "--n_boot", "50", "--device", "cpu",
                          "--pareto_cache", str(tmp / "cache"), "--out", str(tmp / "nll"),
                          "--cache", str(tmp / "nll-cache")])
    assert list(nll["target_set"]) == ["SFT", "MixSD λ=0.3"]
    summary = json.loads((tmp / "nll" / "summary.json").read_text())
    check = summary["pareto_target_check"]["MixSD λ=0.3"]
    assert check["n_identical"] == check["n_here"] == 3  # MixSD targets are deterministic
    assert (tmp / "nll" / "token_nll_ecdf.png").is_file()


def test_pareto_runs_the_retention_baselines_on_held_out_probes(pareto, tmp_path):
    """ewc, replay and fisher_orthogonal join the study; every run is scored on the probes
    left after the retention split, the same for all methods."""
    from forgetkit.data.records import load_probes
    from forgetkit.train.retention import split_probes

    argv = _tiny_argv(tmp_path)
    start = argv.index("--methods") + 1
    argv[start : start + 2] = ["sft", "ewc", "replay", "fisher_orthogonal"]
    table = pareto.main([*argv, "--orthogonal_k", "2", "--peak_eval_steps", "0"])
    assert set(table["label"]) == {"SFT", "EWC", "Replay", "Fisher-orthogonal SFT"}
    cache = tmp_path / "cache"
    scored = {}
    for run in ("sft", "ewc", "replay", "fisher_orthogonal"):
        rows = (cache / run / "eval" / "6.jsonl").read_text().splitlines()
        scored[run] = {json.loads(row)["id"] for row in rows}
    assert len({frozenset(ids) for ids in scored.values()}) == 1
    probe_file = next((cache / "inputs").glob("probes-*.jsonl"))
    retained = {p.id for p in split_probes(load_probes(str(probe_file)), 0.5)[0]}
    assert retained and not retained & scored["sft"]


def test_pareto_stops_every_method_at_the_memorization_target(pareto, tmp_path):
    """With stop_at_memorization every method is evaluated on the peak grid and stops at the
    first evaluation that reaches the target (or the step cap); offset picks other records."""
    argv = _tiny_argv(tmp_path)
    table = pareto.main([*argv, "--stop_at_memorization", "0.25", "--offset", "50",
                         "--max_steps", "12", "--learning_rate", "3e-3"])
    records = json.loads((tmp_path / "out" / "results.json").read_text())["records"]
    from forgetkit.data.records import load_records

    assert [r.id for r in load_records(records)] == [r.id for r in load_records("kgfact")[50:54]]
    for _, row in table[table["label"] != "SFT@peak"].iterrows():
        trajectory = pareto.eval_trajectory(tmp_path / "cache" / row["run"])
        reached = trajectory[(trajectory["step"] > 0) & (trajectory["memorization"] >= 0.25)]
        if row["reached_target"]:
            assert row["steps"] == reached["step"].min() and row["memorization"] >= 0.25
        else:
            assert row["steps"] == 12 and reached.empty
    sft, peak = (table[table["label"] == label].iloc[0] for label in ("SFT", "SFT@peak"))
    assert sft["reached_target"]  # so its peak is its last step: the final model, not a copy
    assert peak["steps"] == sft["steps"] and peak["model_path"] == sft["model_path"]
    assert not (tmp_path / "cache" / "sft" / "peak_model").exists()
    with pytest.raises(SystemExit):
        pareto.main([*argv, "--stop_at_memorization", "1.5"])


def test_choose_lr_takes_the_fastest_slower_method_and_refuses_a_grid_that_never_reaches():
    import math

    choose_lr = _script("choose_lr")
    grid = {3e-5: {"SFT": 60, "MixSD": math.inf}, 1e-4: {"SFT": 20, "MixSD": 35},
            3e-4: {"SFT": 10, "MixSD": 35}}
    assert choose_lr.choose(grid) == 1e-4  # 35 steps either way: the smaller rate
    assert choose_lr.choose({**grid, 1e-3: {"SFT": 5, "MixSD": 30}}) == 1e-3
    with pytest.raises(SystemExit, match="no learning rate"):
        choose_lr.choose({3e-5: {"SFT": math.inf, "MixSD": 10}})
