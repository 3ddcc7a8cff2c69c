"""Nothing loaded from a checkpoint can run code: a crafted state file is refused, by name."""

from __future__ import annotations

import pickle
import shutil

import pytest

from forgetkit.train import train
from forgetkit.train.checkpoint import CheckpointError
from tests.train.test_run import config_for


class _Payload:
    """Unpickling this calls ``open(marker, "w")``: the kind of call a crafted file makes."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("name", ["random_states_0.pkl", "optimizer.bin", "scheduler.bin",
                                  "custom_checkpoint_0.pkl"])
def test_resume_refuses_a_malicious_state_file_and_runs_nothing(tiny, tmp_path, name):
    train(config_for(tiny, tmp_path / "run", save_steps=3, save_total_limit=None))
    checkpoint = tmp_path / "resumed" / "checkpoint-3"
    shutil.copytree(tmp_path / "run" / "checkpoint-3", checkpoint)
    marker = tmp_path / "code-ran"
    with open(checkpoint / name, "wb") as handle:
        pickle.dump({"random_state": _Payload(str(marker))}, handle)
    with pytest.raises(CheckpointError, match=rf"{name.replace('.', '[.]')}: refused"):
        train(config_for(tiny, tmp_path / "resumed", save_steps=3, save_total_limit=None,
                         resume_from_checkpoint="latest"))
    assert not marker.exists()


def test_resume_refuses_a_random_state_file_without_the_states(tiny, tmp_path):
    """accelerate would skip an unreadable random state silently; the resume would not be exact."""
    import torch

    train(config_for(tiny, tmp_path / "run", save_steps=3, save_total_limit=None))
    torch.save({"step": 0}, tmp_path / "run" / "checkpoint-6" / "random_states_0.pkl")
    with pytest.raises(CheckpointError, match=r"random_states_0\.pkl: not a random-state file"):
        train(config_for(tiny, tmp_path / "run", save_steps=3, save_total_limit=None,
                         resume_from_checkpoint="latest"))
