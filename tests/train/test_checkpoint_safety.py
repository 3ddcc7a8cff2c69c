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


def test_resume_refuses_a_malicious_rng_state_and_runs_nothing(tiny, tmp_path):
    train(config_for(tiny, tmp_path / "run", save_steps=3, save_total_limit=None))
    checkpoint = tmp_path / "resumed" / "checkpoint-3"
    shutil.copytree(tmp_path / "run" / "checkpoint-3", checkpoint)
    marker = tmp_path / "code-ran"
    with open(checkpoint / "rng_state_0.pt", "wb") as handle:
        pickle.dump({"python": _Payload(str(marker))}, handle)
    with pytest.raises(CheckpointError, match=r"rng_state_0\.pt: refused"):
        train(config_for(tiny, tmp_path / "resumed", save_steps=3, save_total_limit=None,
                         resume_from_checkpoint="latest"))
    assert not marker.exists()
