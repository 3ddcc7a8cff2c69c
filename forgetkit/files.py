"""Writing files atomically (JSON, JSONL, PNG figures, whole folders) and reading JSONL: one
implementation each, used everywhere."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "append_jsonl",
    "atomic_directory",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_jsonl",
    "figure_png",
    "json_rows",
    "read_jsonl",
    "write_figure",
]


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[Any]:
    """Open a temporary file beside ``path``; rename it over ``path`` only if the block succeeds.

    A crash or exception inside the block leaves any existing ``path`` untouched and no
    half-written file behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, *, merge: bool = False, last: Sequence[str] = (),
                     staging: str | os.PathLike | None = None) -> Iterator[Path]:
    """Yield a staging folder whose contents take the place of ``path`` only if the block
    succeeds; on an exception the staging folder is removed and ``path`` is left as it was.

    Args:
        path: the folder to write.
        merge: ``False``: the staging folder replaces ``path`` as a whole (a previous ``path`` is
            removed). ``True``: each entry of the staging folder replaces the entry of the same
            name in ``path``, whose other entries stay (the staging folder is then a hidden
            folder inside ``path``).
        last: with ``merge``, entries moved after all others, in this order (e.g. an index page
            that should appear only once what it refers to is in place).
        staging: the staging folder to use (emptied first) instead of a fresh temporary one, for
            several processes that write into it and so must know its name.
    """
    path = Path(path)
    home = path if merge else path.parent  # where the staging folder goes
    home.mkdir(parents=True, exist_ok=True)
    if staging is None:
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=home))
    else:
        staging = Path(staging)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    try:
        yield staging
        if not merge:
            if path.exists():
                shutil.rmtree(path)
            staging.rename(path)
            return
        names = sorted(entry.name for entry in staging.iterdir() if entry.name not in last)
        for name in [*names, *(name for name in last if (staging / name).exists())]:
            target = path / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(staging / name, target)
        staging.rmdir()
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_write(path, "wb") as handle:
        handle.write(data)


def figure_png(fig, dpi: float | None = None) -> bytes:
    """The PNG bytes of a matplotlib figure, rendered in memory (no pyplot, no global state).

    Args:
        fig: a ``matplotlib.figure.Figure``.
        dpi: resolution; ``None``: the figure's own.
    """
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi if dpi is not None else "figure")
    return buffer.getvalue()


def write_figure(path: str | os.PathLike, fig, dpi: float | None = None) -> None:
    """Save a matplotlib figure as a PNG at ``path`` atomically (:func:`figure_png`)."""
    atomic_write_bytes(path, figure_png(fig, dpi))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    """Write ``obj`` as JSON to ``path`` atomically."""
    with atomic_write(path) as handle:
        json.dump(obj, handle, indent=indent, ensure_ascii=False, allow_nan=False)
        handle.write("\n")


def atomic_write_jsonl(path: str | os.PathLike, rows: Iterable[Any]) -> None:
    """Write one JSON object per line to ``path`` atomically."""
    with atomic_write(path) as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n")


def append_jsonl(path: str | os.PathLike, rows: Iterable[Any]) -> None:
    """Append complete lines to a JSONL file, flushed and fsynced (used for resumable logs).

    Each call writes whole lines in one ``write``; :func:`read_jsonl` with ``tolerate_torn_tail``
    drops a torn last line left by a crash mid-write.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n" for row in rows)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def read_jsonl(path: str | os.PathLike, tolerate_torn_tail: bool = False) -> list[Any]:
    """Read a JSONL file; a malformed line raises ``ValueError`` naming file and line.

    Args:
        path: the file.
        tolerate_torn_tail: drop a last line that has no newline and does not parse (the
            signature of a write interrupted mid-line), instead of raising.
    """
    path = Path(path)
    rows = []
    with open(path, encoding="utf-8") as handle:
        lines = handle.readlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            if tolerate_torn_tail and number == len(lines) and not line.endswith("\n"):
                break
            raise ValueError(f"{path}:{number}: malformed JSON: {err.msg}") from err
    return rows


def json_rows(frame) -> list[dict[str, Any]]:
    """The rows of a ``pandas.DataFrame`` as JSON-ready dicts, missing values (NaN) as ``None``."""
    return frame.astype(object).where(frame.notna(), None).to_dict(orient="records")
