"""The public API: ``import forgetkit as fk`` gives every name of ``forgetkit.__all__``."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import forgetkit as fk

DESIGN_API = {"load_records", "load_probes", "Record", "Probe", "load_model", "encode",
              "MixConfig", "build_targets", "TrainConfig", "train", "evaluate", "retention",
              "target_nll", "compare_targets", "fisher"}
"""The stable names of the design's public API."""


def test_all_is_sorted_unique_and_covers_the_design():
    assert fk.__all__ == sorted(set(fk.__all__))
    assert set(fk.__all__) >= DESIGN_API, sorted(DESIGN_API - set(fk.__all__))


@pytest.mark.parametrize("name", fk.__all__)
def test_every_public_name_imports(name):
    module = importlib.import_module("forgetkit")
    assert getattr(module, name) is not None
    namespace: dict = {}
    exec(f"from forgetkit import {name}", namespace)  # the form users write
    assert namespace[name] is getattr(fk, name)


def test_star_import_gives_exactly_all():
    namespace: dict = {}
    exec("from forgetkit import *", namespace)
    assert set(fk.__all__) <= set(namespace)


def test_train_stays_the_function_after_its_package_is_imported():
    """``forgetkit.train`` is both a package and the public function: the function wins."""
    code = ("import forgetkit.train.loop, forgetkit.fisher.report, forgetkit as fk; "
            "print(callable(fk.train), fk.train.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["True", "forgetkit.train.run"]
