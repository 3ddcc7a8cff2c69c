"""Resuming a run: after ``kill -9`` (as subprocesses), before the first checkpoint, and with
input files whose path spelling or content changed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from forgetkit.train import OutputDirError, train
from tests.train.test_run import REPO, config_for, max_difference, weights

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 30


def cli_args(tiny, out: Path, **overrides) -> list[str]:
    """Flags of the run :func:`uninterrupted` trains in process (run-control fields may differ)."""
    values = dict(model_name_or_path=tiny[0], records=tiny[1], output_dir=out, max_steps=STEPS,
                  per_device_train_batch_size=4, learning_rate=1e-2, warmup_steps=1,
                  logging_steps=1, save_steps=0, do_eval=False, disable_tqdm=True,
                  dtype="float64", device="cpu", opsd_max_new_tokens=6)
    values.update(overrides)
    return [f"--{k}={v}" for k, v in values.items()]


def start(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "forgetkit.train", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(args: list[str]) -> None:
    process = start(args)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]


def kill_when(process: subprocess.Popen, ready, timeout: float = 120) -> None:
    """``kill -9`` the process as soon as ``ready()`` holds (it must still be running)."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, f"the run ended before the kill: {process.stderr.read()}"
        assert time.monotonic() < deadline, "timed out waiting to kill the run"
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def metrics_rows(out: Path) -> int:
    path = out / "metrics.jsonl"
    return path.read_text().count("\n") if path.exists() else 0


@pytest.fixture(scope="module")
def uninterrupted(tiny, tmp_path_factory):
    """The final weights of the run, trained in one go in this process."""
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    result = train(config_for(tiny, out, max_steps=STEPS, mix={}))
    return weights(result.model_path)


def test_resume_after_kill_9_gives_the_uninterrupted_weights(tiny, tmp_path, uninterrupted):
    out = tmp_path / "run"
    args = cli_args(tiny, out, save_steps=2, save_total_limit=2)
    kill_when(start(args), lambda: any(out.glob("checkpoint-*[468]")))
    assert not (out / "results.json").exists()
    stale = out / f".checkpoint-99.staging-{dead_pid()}-1"  # as a kill during a save leaves
    stale.mkdir()
    finish([*args, "--resume_from_checkpoint=latest"])
    assert not stale.exists() and not list(out.glob(".checkpoint-*"))
    assert max_difference(uninterrupted, weights(out)) == 0.0
    steps = [row["step"] for row in map(json.loads, (out / "metrics.jsonl").read_text().split(
        "\n")[:-1])]
    assert steps == list(range(1, STEPS + 1))  # rows after the checkpoint written again once


def test_run_killed_before_its_first_checkpoint_restarts_with_a_plain_rerun(
        tiny, tmp_path, uninterrupted):
    out = tmp_path / "run"
    args = cli_args(tiny, out)  # save_steps=0: no checkpoint ever
    kill_when(start(args), lambda: metrics_rows(out) >= 3)
    assert not list(out.glob("checkpoint-*")) and (out / "train_config.yaml").exists()
    finish(args)
    assert max_difference(uninterrupted, weights(out)) == 0.0
    with pytest.raises(OutputDirError, match="already holds this run"):  # finished: not again
        train(config_for(tiny, out, max_steps=STEPS, mix={}))


def test_resume_is_refused_when_a_records_file_changed_naming_it(tiny, tmp_path):
    records = tmp_path / "records.jsonl"
    shutil.copy(tiny[1], records)
    out = tmp_path / "run"
    train(config_for(tiny, out, records=str(records), save_steps=3))
    lines = records.read_text().splitlines()
    row = json.loads(lines[0])
    records.write_text("\n".join([json.dumps({**row, "target": row["target"] + " ."}),
                                  *lines[1:]]) + "\n")
    with pytest.raises(OutputDirError, match=rf"records: the content of {records} changed"):
        train(config_for(tiny, out, records=str(records), save_steps=3,
                         resume_from_checkpoint="latest"))
    with pytest.raises(OutputDirError, match=rf"other inputs.*content of {records} changed"):
        train(config_for(tiny, out, records=str(records), save_steps=3))


def test_absolute_and_relative_paths_of_one_file_are_the_same_run(tiny, tmp_path,
                                                                  monkeypatch):
    shutil.copy(tiny[1], tmp_path / "records.jsonl")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    whole = weights(train(config_for(tiny, out, records="records.jsonl", save_steps=3,
                                     save_total_limit=None)).model_path)
    resumed = train(config_for(tiny, out, records=str(tmp_path / "records.jsonl"), save_steps=3,
                               resume_from_checkpoint=str(out / "checkpoint-3")))
    assert resumed.global_step == 6 and max_difference(whole, weights(out)) == 0.0
