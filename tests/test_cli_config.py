"""The shared command-line start (``parse_cli`` on ``HfArgumentParser``), every CLI's
``--help``, and ``markdown_table``."""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pytest

from forgetkit.cli_config import ConfigParser, markdown_table, parse_cli, parse_config


@dataclass
class _Inner:
    """Inner settings."""

    rate: float = field(default=0.5, metadata={"help": "a rate"})
    steps: int = field(default=1, metadata={"help": "inner steps"})


@dataclass
class _Config:
    """What prog does."""

    steps: int = field(default=3, metadata={"help": "how many steps"})
    names: list[str] = field(default_factory=lambda: ["a"], metadata={"help": "some names"})
    limit: int | None = field(default=None, metadata={"help": "a limit"})
    inner: _Inner = field(default_factory=_Inner, metadata={"help": "inner settings"})

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")


def test_parse_cli_help_prints_doc_and_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_cli((_Config, _Inner), ["--help"], "prog", doc="  What prog does.  ")
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: prog") and "\nWhat prog does.\n" in out
    assert "--steps STEPS" in out and "how many steps (default: 3)" in out
    assert "--inner.steps" in out and "inner steps (default: 1)" in out
    assert "--rate RATE, --inner.rate RATE" in out and "--config FILE.yaml" in out


def test_parse_cli_builds_the_configs_or_exits_naming_the_key():
    config, inner = parse_cli((_Config, _Inner), ["--steps", "7", "--inner.steps", "2",
                                                  "--rate", "0.1"], "prog")
    assert config == _Config(steps=7, inner=_Inner(rate=0.1, steps=2)) and config.inner is inner
    with pytest.raises(SystemExit, match=r"error: unknown option --stpes .*'--steps'"):
        parse_cli(_Config, ["--stpes", "7"], "prog")
    with pytest.raises(SystemExit, match=r"error: steps must be >= 1, got 0"):
        parse_cli(_Config, ["--steps", "0"], "prog")
    with pytest.raises(SystemExit, match=r"error: cannot read config file .*nothing\.yaml"):
        parse_cli(_Config, ["--config", "nothing.yaml"], "prog")


def test_lists_and_none(tmp_path):
    (config,) = parse_config(_Config, ["--names", "x", "y", "--names", "z", "--limit", "none"])
    assert (config.names, config.limit) == (["x", "y", "z"], None)
    path = tmp_path / "c.yaml"
    path.write_text("names: b\nlimit: 4\ninner: {rate: 1}\n")
    assert parse_config((_Config, _Inner), ["--config", str(path), "--names", "c"])[0] == \
        _Config(names=["c"], limit=4, inner=_Inner(rate=1.0))  # flags replace YAML lists
    path.write_text("limit: [4]\n")
    with pytest.raises(ValueError, match=r"c\.yaml: limit: expected one integer, got a list"):
        parse_config(_Config, ["--config", str(path)])


def test_a_clash_without_a_holding_config_is_refused():
    @dataclass
    class Other:
        steps: int = field(default=1, metadata={"help": "other steps"})

    with pytest.raises(TypeError, match="--steps is taken"):
        ConfigParser((_Config, Other))


# --- every command line lists every option with its help ---------------------------------------


def _clis():
    from forgetkit import toyworld
    from forgetkit.diagnostics import nll
    from forgetkit.fisher import __main__ as fisher_cli
    from forgetkit.fisher.report import ReportConfig
    from forgetkit.mixsd import MixConfig, targets
    from forgetkit.train import TrainConfig, run
    from tests.test_experiments import _script

    pareto, fisher_study, nll_study = (_script(n) for n in ("pareto", "fisher_study", "nll_study"))
    return {
        "train": (run.main, (TrainConfig, MixConfig), ()),
        "mixsd": (targets.main, (targets.BuildConfig, MixConfig), ()),
        "nll": (nll.main, (nll.NLLConfig, MixConfig), ("mix.lam",)),
        "fisher": (fisher_cli.main, (ReportConfig,), ()),
        "toyworld": (toyworld.main, (toyworld.ToyworldArgs,), ()),
        "pareto": (pareto.main, (pareto.ParetoConfig, MixConfig), ()),
        "fisher_study": (fisher_study.main, (fisher_study.FisherStudyConfig,), ()),
        "nll_study": (nll_study.main, (nll_study.NLLStudyConfig, MixConfig), ("lam",)),
    }


@pytest.mark.parametrize("name", ["train", "mixsd", "nll", "fisher", "toyworld", "pareto",
                                  "fisher_study", "nll_study"])
def test_every_cli_help_lists_every_option_with_its_help(name, capsys):
    main, config_types, omitted = _clis()[name]
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    bare = "".join(out.split())  # help text is wrapped, also after hyphens
    taken: set[str] = set()
    for index, config_type in enumerate(config_types):
        hints = typing.get_type_hints(config_type)
        for f in dataclasses.fields(config_type):
            if hints[f.name] in config_types:
                continue  # a config held as a field: its own options are listed
            option = f.name if (index == 0 or f.name not in taken) else f"mix.{f.name}"
            taken.add(f.name)
            if option in omitted:
                assert f"--{option} " not in out and f"--{option}," not in out
                continue
            assert f"--{option} " in out or f"--{option}," in out, option
            assert "".join(f.metadata["help"].split()) in bare, option


def test_markdown_table_formats_each_kind_of_cell():
    frame = pd.DataFrame({"label": ["SFT", "MixSD"], "n": [3, 4], "x": [0.123456, math.nan],
                          "y": [np.float32(1234.5), None]})
    assert markdown_table(frame).splitlines() == [
        "| label | n | x | y |", "|---|---|---|---|",
        "| SFT | 3 | 0.123 | 1234.500 |", "| MixSD | 4 | n/a | n/a |"]
    assert markdown_table(frame, digits=2, style="g").splitlines()[2] == "| SFT | 3 | 0.12 | 1.2e+03 |"


def test_command_line_turns_expected_errors_into_one_line_and_exit_2(capsys, monkeypatch):
    import json
    import re

    from forgetkit.cli_config import command_line
    from forgetkit.files import OutputError

    monkeypatch.delenv("FORGETKIT_DEBUG", raising=False)

    def failing(error):
        @command_line
        def main(argv=None):
            raise error
        return main

    cases = [(OutputError("--out x is a file"), r"^error: --out x is a file$"),
             (FileNotFoundError(2, "No such file or directory", "a.jsonl"),
              r"^error: a\.jsonl: No such file or directory$"),
             (json.JSONDecodeError("Expecting value", "{\n]", 2), r"invalid JSON: Expecting value "
                                                                  r"\(line 2, column 1\)"),
             (re.error("missing )", "(a", 0), r"invalid regular expression '\(a': missing \)"),
             (ValueError("two\nlines"), r"^error: two lines$")]
    for error, pattern in cases:
        with pytest.raises(SystemExit) as exit_info:
            failing(error)([])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and re.search(pattern, err[0]), err
    with pytest.raises(OutputError):  # --debug: the error itself, with its traceback
        failing(OutputError("x"))(["--debug"])
    monkeypatch.setenv("FORGETKIT_DEBUG", "1")
    with pytest.raises(OutputError):
        failing(OutputError("x"))([])
    with pytest.raises(KeyError):  # a bug keeps its traceback
        failing(KeyError("bug"))([])
