"""The notebooks in ``notebooks/``: committed clean, and executed top to bottom with their
default parameters (what CI runs).

Each notebook runs in a fresh kernel of this interpreter, in a temporary working directory, with
``TMPDIR`` pointing there too (a notebook's default ``OUTPUT_DIR = None`` is a fresh temporary
folder), so nothing it writes lands in the repository.
"""

from __future__ import annotations

import ast
import os
import time
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = REPO / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
EXPECTED = ("01_quickstart.ipynb", "02_target_nll.ipynb", "03_fisher_and_projection.ipynb",
            "04_pareto.ipynb")
ALLOWED_IMPORTS = {"forgetkit", "pandas", "matplotlib", "seaborn", "tempfile", "pathlib"}
"""Notebooks consume the library: forgetkit for every number, pandas/matplotlib/seaborn to
display, tempfile/pathlib for the output folder."""
CELL_TIMEOUT_S = 600

by_name = pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.name)


def code_cells(nb) -> list:
    return [cell for cell in nb.cells if cell.cell_type == "code"]


def python_source(cell) -> str:
    """The cell's source without IPython magics (``%...`` lines), ready for ``ast.parse``."""
    return "\n".join("" if line.lstrip().startswith("%") else line
                     for line in cell.source.splitlines())


def test_the_notebooks_are_all_there():
    assert set(EXPECTED) <= {path.name for path in NOTEBOOKS}, (
        f"missing from {NOTEBOOK_DIR}: {sorted(set(EXPECTED) - {p.name for p in NOTEBOOKS})}")


@by_name
def test_committed_without_outputs(path: Path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [index for index, cell in enumerate(nb.cells) if cell.cell_type == "code"
             and (cell.outputs or cell.execution_count is not None)]
    assert not dirty, (f"{path.name}: cells {dirty} hold outputs or execution counts; clear "
                       "them before committing (jupyter nbconvert --clear-output --inplace)")


@by_name
def test_first_code_cell_holds_the_parameters(path: Path):
    """Papermill convention: the first code cell is tagged ``parameters`` and only assigns
    literals, so every knob can be overridden by injecting a cell after it."""
    cells = code_cells(nbformat.read(path, as_version=4))
    assert cells, f"{path.name} has no code cell"
    assert "parameters" in cells[0].metadata.get("tags", []), (
        f"{path.name}: the first code cell is not tagged 'parameters'")
    tagged_later = [i for i, cell in enumerate(cells[1:], 1)
                    if "parameters" in cell.metadata.get("tags", [])]
    assert not tagged_later, f"{path.name}: code cells {tagged_later} are also tagged 'parameters'"
    for statement in ast.parse(cells[0].source).body:
        assert isinstance(statement, ast.Assign), (
            f"{path.name}: the parameters cell should only assign values, found "
            f"{ast.unparse(statement)!r}")
        ast.literal_eval(statement.value)  # a literal, not a computation


@by_name
def test_imports_only_the_library_and_display_packages(path: Path):
    imported = set()
    for cell in code_cells(nbformat.read(path, as_version=4)):
        for node in ast.walk(ast.parse(python_source(cell))):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                imported.add((node.module or "").split(".")[0])
    assert imported <= ALLOWED_IMPORTS, (
        f"{path.name} imports {sorted(imported - ALLOWED_IMPORTS)}; notebooks only call "
        "forgetkit and display with pandas/matplotlib/seaborn")


@by_name
def test_data_is_passed_as_objects_not_registered_by_name(path: Path):
    """Notebooks give the library lists of records and probes; they never register a global
    name for a subset (``register_records`` / ``register_probes``)."""
    for cell in code_cells(nbformat.read(path, as_version=4)):
        called = {node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id
                  for node in ast.walk(ast.parse(python_source(cell)))
                  if isinstance(node, ast.Call)
                  and isinstance(node.func, ast.Attribute | ast.Name)}
        assert not called & {"register_records", "register_probes"}, (
            f"{path.name}: pass the records and probes to the library instead of registering "
            "them under a name")


@pytest.fixture
def kernel_manager(tmp_path: Path):
    """A kernel manager that starts this interpreter, whatever kernels the user has installed."""
    from ipykernel.kernelspec import write_kernel_spec
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    kernels = tmp_path / "kernels"
    write_kernel_spec(kernels / "forgetkit-tests")
    manager = KernelManager(kernel_name="forgetkit-tests",
                            kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernels)]))
    yield manager
    if manager.has_kernel:  # NotebookClient leaves a kernel it did not create running
        manager.shutdown_kernel(now=True)


@pytest.mark.slow
@by_name
def test_runs_top_to_bottom(path: Path, tmp_path: Path, monkeypatch, kernel_manager):
    from nbclient import NotebookClient

    workdir = tmp_path / "work"
    workdir.mkdir()
    monkeypatch.setenv("MPLBACKEND", "agg")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("TMPDIR", str(workdir))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))  # this checkout's forgetkit
    if "OMP_NUM_THREADS" not in os.environ:  # the models are tiny: threads only add overhead
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
    repo_files_before = sorted(NOTEBOOK_DIR.iterdir())
    nb = nbformat.read(path, as_version=4)

    started = time.perf_counter()
    NotebookClient(nb, km=kernel_manager, timeout=CELL_TIMEOUT_S,
                   resources={"metadata": {"path": str(workdir)}}).execute()
    seconds = time.perf_counter() - started
    print(f"{path.name}: {seconds:.1f} s")

    not_run = [i for i, cell in enumerate(code_cells(nb)) if cell.execution_count is None]
    assert not not_run, f"{path.name}: code cells {not_run} were not executed"
    errors = [out for cell in code_cells(nb) for out in cell.outputs
              if out.output_type == "error"]
    assert not errors, f"{path.name}: {errors[0].ename}: {errors[0].evalue}"
    assert sorted(NOTEBOOK_DIR.iterdir()) == repo_files_before, (
        f"{path.name} wrote into {NOTEBOOK_DIR}")
