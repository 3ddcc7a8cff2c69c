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
    "OutputError",
    "append_jsonl",
    "atomic_directory",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_jsonl",
    "check_writable",
    "content_hash",
    "figure_png",
    "json_rows",
    "read_jsonl",
    "recover_directory",
    "replace_directory",
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


class OutputError(ValueError):
    """An output path that cannot be written; the message names it."""


def check_writable(path: str | os.PathLike, what: str, folder: bool = True) -> Path:
    """Check, before any work, that ``path`` can be written as a folder (``folder``) or a
    file: not an existing entry of the other kind, and its nearest existing ancestor a
    writable folder. Returns ``path``.

    Raises:
        OutputError: naming ``what`` (e.g. ``--out``) and the path.
    """
    path = Path(path)
    if path.exists() and folder and not path.is_dir():
        raise OutputError(f"{what} {path} is a file, not a folder")
    if path.exists() and not folder and path.is_dir():
        raise OutputError(f"{what} {path} is a folder, not a file")
    ancestor = path if path.is_dir() else path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(f"{what} {path}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputError(f"{what} {path}: {ancestor} is not writable")
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _dead_leftovers(path: Path, kind: str) -> list[Path]:
    """Hidden ``.<name>.<kind>-<pid>-*`` folders beside ``path`` whose process is gone."""
    out = []
    for entry in path.parent.glob(f".{path.name}.{kind}-*"):
        pid = entry.name.removeprefix(f".{path.name}.{kind}-").split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            out.append(entry)
    return out


def recover_directory(path: str | os.PathLike) -> None:
    """Put ``path`` back in order after a replacement (:func:`atomic_directory`) was killed:
    staging folders of dead processes are removed, and if ``path`` is missing because the kill
    fell between the two renames of the swap, the old folder is put back."""
    path = Path(path)
    if not path.parent.is_dir():
        return
    for entry in _dead_leftovers(path, "staging"):
        shutil.rmtree(entry, ignore_errors=True)
    backups = sorted((entry for entry in _dead_leftovers(path, "old")
                      if (entry / "folder").is_dir()), key=lambda entry: entry.stat().st_mtime)
    if backups and not path.exists():
        os.rename(backups[-1] / "folder", path)
    for entry in _dead_leftovers(path, "old"):
        shutil.rmtree(entry, ignore_errors=True)


def replace_directory(staging: str | os.PathLike, path: str | os.PathLike,
                      keep: Sequence[str] = ()) -> None:
    """Swap the complete folder ``staging`` in as ``path`` by renames: a reader sees the old
    folder or the new one, never a mix. Entries of the old folder named in ``keep`` (e.g. a
    cache) are moved into the new one first, unless it has its own."""
    staging, path = Path(staging), Path(path)
    backup = None
    if path.exists():
        for name in keep:
            if (path / name).exists() and not (staging / name).exists():
                os.rename(path / name, staging / name)
        backup = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-{os.getpid()}-",
                                       dir=path.parent))
        os.rename(path, backup / "folder")
    os.rename(staging, path)
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, *, merge: bool = False, last: Sequence[str] = (),
                     staging: str | os.PathLike | None = None,
                     keep: Sequence[str] = ()) -> Iterator[Path]:
    """Yield a staging folder whose contents take the place of ``path`` only if the block
    succeeds; on an exception the staging folder is removed and ``path`` is left as it was.

    Args:
        path: the folder to write.
        merge: ``False``: the staging folder replaces ``path`` as a whole by renames
            (:func:`replace_directory`; leftovers of a killed earlier replacement are cleaned
            first, :func:`recover_directory`). ``True``: each entry of the staging folder
            replaces the entry of the same name in ``path``, whose other entries stay (the
            staging folder is then a hidden folder inside ``path``).
        last: with ``merge``, entries moved after all others, in this order (e.g. an index page
            that should appear only once what it refers to is in place).
        staging: the staging folder to use (emptied first) instead of a fresh temporary one, for
            several processes that write into it and so must know its name.
        keep: without ``merge``, entries of the old folder carried over into the new one.
    """
    path = Path(path)
    home = path if merge else path.parent  # where the staging folder goes
    home.mkdir(parents=True, exist_ok=True)
    if not merge:
        recover_directory(path)
    if staging is None:
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.staging-{os.getpid()}-",
                                        dir=home))
    else:
        staging = Path(staging)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    try:
        yield staging
        if not merge:
            replace_directory(staging, path, keep)
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


def content_hash(path: str | os.PathLike) -> str:
    """SHA-256 of what ``path`` holds, independent of how it is spelled: a file's bytes, or a
    folder's files (relative names and bytes, hidden entries such as staging folders left out)."""
    import hashlib

    path = Path(path).expanduser()
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
    for file in files:
        if file != path:
            digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()
