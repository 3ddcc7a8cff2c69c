"""Running forgetkit in other processes from tests: two gloo ranks under torchrun."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def environment() -> dict[str, str]:
    """This environment with one thread per process and the repository importable."""
    return {**os.environ, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def torchrun(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run`` with two processes on ``args``; asserts success."""
    run = subprocess.run([sys.executable, *TORCHRUN, *args], env=environment(),
                         capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, run.stderr[-6000:]
    return run
