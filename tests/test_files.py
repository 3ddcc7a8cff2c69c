from __future__ import annotations

import pytest

from forgetkit.files import (
    append_jsonl,
    atomic_directory,
    atomic_write,
    atomic_write_json,
    json_rows,
    read_jsonl,
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
