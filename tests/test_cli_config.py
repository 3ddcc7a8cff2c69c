"""The shared command-line start (``parse_cli``) and ``markdown_table``."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pytest

from forgetkit.cli_config import markdown_table, parse_cli


@dataclass
class _Config:
    steps: int = field(default=3, metadata={"help": "how many steps"})
    name: str = field(default="a", metadata={"help": "a name"})

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")


def test_parse_cli_help_prints_doc_and_keys(capsys):
    assert parse_cli(_Config, ["--help"], "prog", doc="  What prog does.  ") is None
    out = capsys.readouterr().out
    assert out.startswith("What prog does.\n\nusage: prog")
    assert "--steps" in out and "how many steps" in out and "(default: 3)" in out


def test_parse_cli_builds_the_config_or_exits_naming_the_key():
    assert parse_cli(_Config, ["--steps", "7"], "prog") == _Config(steps=7)
    with pytest.raises(SystemExit, match=r"error: .*stpes.*steps"):
        parse_cli(_Config, ["--stpes", "7"], "prog")
    with pytest.raises(SystemExit, match=r"error: steps must be >= 1, got 0"):
        parse_cli(_Config, ["--steps", "0"], "prog")


def test_parse_cli_uses_the_given_loader():
    seen = []
    config = parse_cli(_Config, ["--x"], "prog", loader=lambda argv: seen.append(argv) or "ok")
    assert config == "ok" and seen == [["--x"]]


def test_markdown_table_formats_each_kind_of_cell():
    frame = pd.DataFrame({"label": ["SFT", "MixSD"], "n": [3, 4], "x": [0.123456, math.nan],
                          "y": [np.float32(1234.5), None]})
    assert markdown_table(frame).splitlines() == [
        "| label | n | x | y |", "|---|---|---|---|",
        "| SFT | 3 | 0.123 | 1234.500 |", "| MixSD | 4 | n/a | n/a |"]
    assert markdown_table(frame, digits=2, style="g").splitlines()[2] == "| SFT | 3 | 0.12 | 1.2e+03 |"
