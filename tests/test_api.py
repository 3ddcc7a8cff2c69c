"""The public API: ``import forgetkit as fk`` gives every name of ``forgetkit.__all__``, and the
quickstart notebook needs nothing else."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

import forgetkit as fk

DESIGN_API = {"load_records", "load_probes", "Record", "Probe", "load_model", "encode",
              "MixConfig", "build_targets", "TrainConfig", "train", "evaluate", "retention",
              "target_nll", "compare_targets", "fisher"}
"""The stable names of the design's public API."""
QUICKSTART = Path(__file__).resolve().parents[1] / "notebooks" / "01_quickstart.ipynb"


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


def test_quickstart_uses_the_public_api_only():
    """The quickstart imports ``forgetkit as fk`` and nothing else from forgetkit, and every
    ``fk.<name>`` it uses is public."""
    source = "\n".join(cell.source for cell in nbformat.read(QUICKSTART, as_version=4).cells
                       if cell.cell_type == "code")
    tree = ast.parse("\n".join(line for line in source.splitlines()
                               if not line.lstrip().startswith("%")))
    imports = [node for node in ast.walk(tree) if isinstance(node, ast.Import | ast.ImportFrom)]
    from_forgetkit = [ast.unparse(node) for node in imports if isinstance(node, ast.ImportFrom)
                      and (node.module or "").split(".")[0] == "forgetkit"]
    plain = [alias for node in imports if isinstance(node, ast.Import) for alias in node.names
             if alias.name.startswith("forgetkit")]
    assert not from_forgetkit, from_forgetkit
    assert [(a.name, a.asname) for a in plain] == [("forgetkit", "fk")]
    used = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name) and node.value.id == "fk"}
    assert used, "the quickstart should call forgetkit through fk."
    assert used <= set(fk.__all__), sorted(used - set(fk.__all__))
    fisher_used = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
                   and isinstance(node.value, ast.Attribute) and node.value.attr == "fisher"
                   and isinstance(node.value.value, ast.Name) and node.value.value.id == "fk"}
    assert fisher_used <= set(fk.fisher.__all__), sorted(fisher_used - set(fk.fisher.__all__))
