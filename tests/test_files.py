from __future__ import annotations

from pathlib import Path

import pytest

from forgetkit.files import (
    append_jsonl,
    atomic_directory,
    atomic_write,
    atomic_write_json,
    figure_png,
    json_rows,
    read_jsonl,
    write_figure,
)


def test_atomic_write_keeps_old_file_on_error(tmp_path):
    path = tmp_path / "out.json"
    atomic_write_json(path, {"a": 1})
    with pytest.raises(RuntimeError), atomic_write(path) as handle:
        handle.write("half")
        raise RuntimeError("crash")
    assert path.read_text() == '{\n  "a": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_read_jsonl_names_line_and_tolerates_torn_tail(tmp_path):
    path = tmp_path / "x.jsonl"
    append_jsonl(path, [{"a": 1}, {"a": 2}])
    with open(path, "a") as handle:
        handle.write('{"a": ')
    assert read_jsonl(path, tolerate_torn_tail=True) == [{"a": 1}, {"a": 2}]
    with pytest.raises(ValueError, match=r"x.jsonl:3"):
        read_jsonl(path)


def test_atomic_directory_replaces_only_on_success(tmp_path):
    target = tmp_path / "model"
    with atomic_directory(target) as staging:
        (staging / "a.txt").write_text("one")
    assert (target / "a.txt").read_text() == "one"
    with pytest.raises(RuntimeError), atomic_directory(target) as staging:
        (staging / "a.txt").write_text("half")
        raise RuntimeError("crash")
    assert (target / "a.txt").read_text() == "one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    with atomic_directory(target) as staging:
        (staging / "b.txt").write_text("two")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]


def test_json_rows_turn_missing_values_into_none():
    import json
    import math

    import numpy as np
    import pandas as pd

    frame = pd.DataFrame({"a": [1.5, math.nan], "b": ["x", None], "c": [np.int64(2), np.int64(3)]})
    rows = json_rows(frame)
    assert rows == [{"a": 1.5, "b": "x", "c": 2}, {"a": None, "b": None, "c": 3}]
    assert json.loads(json.dumps(rows)) == rows  # no NaN survives into the JSON


def test_atomic_directory_merge_replaces_entries_and_keeps_the_rest(tmp_path, monkeypatch):
    import forgetkit.files

    moved = []
    replace = forgetkit.files.os.replace
    monkeypatch.setattr(forgetkit.files.os, "replace",
                        lambda src, dst: moved.append(Path(dst).name) or replace(src, dst))
    folder = tmp_path / "run"
    (folder / "adapter").mkdir(parents=True)
    (folder / "adapter" / "old.bin").write_text("old")
    (folder / "metrics.jsonl").write_text("kept")
    with atomic_directory(folder, merge=True, last=["index.html"]) as staging:
        assert staging.parent == folder and staging.name.startswith(".")
        (staging / "adapter").mkdir()
        (staging / "adapter" / "new.bin").write_text("new")
        for name in ("index.html", "b.png", "a.json"):
            (staging / name).write_text(name)
    assert sorted(p.name for p in folder.iterdir()) == ["a.json", "adapter", "b.png",
                                                        "index.html", "metrics.jsonl"]
    assert [p.name for p in (folder / "adapter").iterdir()] == ["new.bin"]  # replaced whole
    assert (folder / "metrics.jsonl").read_text() == "kept"
    assert moved == ["a.json", "adapter", "b.png", "index.html"]  # sorted, the last ones last
    with pytest.raises(RuntimeError), atomic_directory(folder, merge=True) as staging:
        (staging / "a.json").write_text("half")
        raise RuntimeError("crash")
    assert (folder / "a.json").read_text() == "a.json"
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]


def test_atomic_directory_with_a_named_staging_folder(tmp_path):
    staging = tmp_path / ".out.staging"
    staging.mkdir()
    (staging / "stale.txt").write_text("from a crashed run")
    with atomic_directory(tmp_path / "out", staging=staging) as folder:
        assert folder == staging and not list(folder.iterdir())  # emptied first
        (folder / "a.txt").write_text("one")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["a.txt"] and not staging.exists()


def test_figure_png_renders_in_memory_and_write_figure_is_atomic(tmp_path):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2, 1), dpi=50)
    fig.subplots().plot([0, 1], [1, 0])
    small, large = figure_png(fig), figure_png(fig, dpi=100)
    assert small.startswith(b"\x89PNG\r\n\x1a\n") and len(large) > len(small)
    write_figure(tmp_path / "plot.png", fig, dpi=100)
    assert (tmp_path / "plot.png").read_bytes() == large
    assert [p.name for p in tmp_path.iterdir()] == ["plot.png"]


def test_replace_keeps_listed_entries_and_leaves_no_backup(tmp_path):
    target = tmp_path / "report"
    (target / "finetunes").mkdir(parents=True)
    (target / "finetunes" / "model.bin").write_text("cached")
    (target / "report.json").write_text("old")
    (target / "stale.png").write_text("old")
    with atomic_directory(target, keep=["finetunes"]) as staging:
        (staging / "report.json").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["finetunes", "report.json"]
    assert (target / "finetunes" / "model.bin").read_text() == "cached"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]


def _killed_swap(tmp_path, stop_after_renames: int):
    """Start a subprocess that replaces ``tmp_path/out`` and kill it (SIGKILL) after the given
    number of renames of the swap; return the folder."""
    import signal
    import subprocess
    import sys
    import textwrap

    target = tmp_path / "out"
    target.mkdir()
    (target / "a.txt").write_text("old")
    script = textwrap.dedent(f"""
        import os, signal
        import forgetkit.files as files
        real, calls = os.rename, []
        def rename(src, dst):
            if len(calls) == {stop_after_renames}:
                os.kill(os.getpid(), signal.SIGKILL)
            calls.append(dst)
            real(src, dst)
        files.os.rename = rename
        with files.atomic_directory({str(target)!r}) as staging:
            (staging / "a.txt").write_text("new")
            (staging / "b.txt").write_text("new")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert done.returncode == -signal.SIGKILL
    return target


@pytest.mark.parametrize("stop_after_renames", [0, 1])
def test_a_replacement_killed_midway_leaves_the_old_folder_or_the_new(tmp_path,
                                                                       stop_after_renames):
    target = _killed_swap(tmp_path, stop_after_renames)
    assert len(list(tmp_path.iterdir())) > 1  # leftovers of the killed run
    with atomic_directory(target) as staging:  # the next run cleans up first
        assert (target / "a.txt").read_text() == "old"  # the old folder is back, whole
        assert not (target / "b.txt").exists()
        (staging / "c.txt").write_text("next")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in target.iterdir()) == ["c.txt"]
