"""MixSD targets as a TRL prompt-completion dataset (rows ``{"prompt", "completion"}``).

TRL 1.16's ``SFTTrainer`` takes two prompt-completion layouts, and :func:`trl_rows` writes
the one that trains on the tokens forgetkit's own MixSD trainer uses
(:func:`forgetkit.train.methods.mixsd_examples`: ``encode(tokenizer, record.prompt)`` followed
by the target's tokens):

- standard (a tokenizer without a chat template): ``prompt`` is ``record.prompt`` and
  ``completion`` the target's text, with a leading space unless it already starts with one
  (the space :func:`forgetkit.models.encode` puts between prompt and completion). TRL appends
  the end-of-sequence token and tokenizes ``prompt + completion``; its loss covers the
  completion tokens (``completion_only_loss`` defaults to on for this layout).
- conversational (a tokenizer with a chat template): ``prompt`` is
  ``[{"role": "user", "content": record.prompt}]`` and ``completion``
  ``[{"role": "assistant", "content": text}]``; TRL renders both through the chat template.

TRL re-tokenizes the text, so where a target ends without the end token (it hit
``max_new_tokens``) TRL still appends one. Each row also carries ``record_id``, which TRL drops
with the other columns the model does not take.

:func:`write_trl_jsonl` writes such rows as JSONL that ``datasets.load_dataset("json", ...)``
and ``SFTTrainer`` read as they are; :func:`load_trl_dataset` reads one back after checking
every row. ``datasets`` is imported only by the functions that return a ``datasets.Dataset``
(``pip install "forgetkit[integrations]"``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from forgetkit.data.records import Record, RecordError
from forgetkit.files import atomic_write_jsonl

__all__ = ["TRL_COLUMNS", "load_trl_dataset", "to_trl_dataset", "trl_rows", "write_trl_jsonl"]

TRL_COLUMNS = ("prompt", "completion")
"""The columns TRL's prompt-completion layout requires."""


class _Target(Protocol):
    """What a row needs of a :class:`~forgetkit.mixsd.targets.MixedTarget` (this module is
    imported by ``targets``' command line, so it does not import ``targets`` back)."""

    record_id: str
    text: str


def trl_rows(targets: Sequence[_Target], records: Sequence[Record],
             conversational: bool = False) -> list[dict[str, Any]]:
    """One TRL prompt-completion row per target, in target order.

    Args:
        targets: MixSD targets (:func:`forgetkit.mixsd.build_targets`).
        records: the records they were built from (looked up by ``record_id``; any order).
        conversational: the chat layout (for a tokenizer with a chat template), else the
            standard one; see the module docstring.

    Returns:
        ``[{"prompt": ..., "completion": ..., "record_id": ...}, ...]``.

    Raises:
        ValueError: a target of a record not in ``records``, or with empty text.
    """
    by_id = {r.id: r for r in records}
    rows = []
    for target in targets:
        record = by_id.get(target.record_id)
        if record is None:
            raise ValueError(f"MixSD target of unknown record {target.record_id!r}: pass the "
                             "records the targets were built from")
        if not target.text.strip():
            raise ValueError(f"MixSD target of record {target.record_id!r} has empty text: "
                             "nothing to train on")
        if conversational:
            prompt: Any = [{"role": "user", "content": record.prompt}]
            completion: Any = [{"role": "assistant", "content": target.text}]
        else:
            prompt = record.prompt
            completion = target.text if target.text[:1].isspace() else " " + target.text
        rows.append({"prompt": prompt, "completion": completion, "record_id": record.id})
    return rows


def _datasets():
    try:
        import datasets
    except ImportError as err:
        raise ImportError("MixSD targets as a datasets.Dataset need the datasets library: "
                          'pip install "forgetkit[integrations]"') from err
    return datasets


def to_trl_dataset(targets: Sequence[_Target], records: Sequence[Record],
                   conversational: bool = False):
    """:func:`trl_rows` as a ``datasets.Dataset`` (columns ``prompt``, ``completion``,
    ``record_id``), ready for ``trl.SFTTrainer(train_dataset=...)``.

    Example:
        >>> targets = build_targets(model, tokenizer, records, MixConfig())  # doctest: +SKIP
        >>> dataset = to_trl_dataset(targets, records,  # doctest: +SKIP
        ...                          conversational=bool(tokenizer.chat_template))
    """
    return _datasets().Dataset.from_list(trl_rows(targets, records, conversational))


def write_trl_jsonl(path: str | os.PathLike, rows: Sequence[dict[str, Any]]) -> None:
    """Write :func:`trl_rows` as JSONL (atomically)."""
    atomic_write_jsonl(path, rows)


def _is_messages(value: Any) -> bool:
    return (isinstance(value, list) and bool(value)
            and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                    and isinstance(m.get("content"), str) for m in value))


def _check_rows(path: Path) -> list[dict[str, Any]]:
    """Every row of ``path``, checked: a JSON object with ``prompt`` and ``completion`` both
    strings or both message lists, the same layout on every line."""
    rows, layout = [], None
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise RecordError(f"{path}:{line_number}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise RecordError(f"{path}:{line_number}: expected a JSON object with columns "
                                  f"{list(TRL_COLUMNS)}, got {type(row).__name__}")
            for column in TRL_COLUMNS:
                if column not in row:
                    raise RecordError(f"{path}:{line_number}: missing column {column!r} (a TRL "
                                      f"prompt-completion row needs {list(TRL_COLUMNS)}; it has "
                                      f"{sorted(row)})")
            kinds = {c: "messages" if _is_messages(row[c])
                     else "text" if isinstance(row[c], str) and row[c].strip() else None
                     for c in TRL_COLUMNS}
            for column, kind in kinds.items():
                if kind is None:
                    raise RecordError(f"{path}:{line_number}: column {column!r} must be a "
                                      "non-empty string or a list of {role, content} messages, "
                                      f"got {row[column]!r:.80}")
            if kinds["prompt"] != kinds["completion"]:
                raise RecordError(f"{path}:{line_number}: 'prompt' is {kinds['prompt']} but "
                                  f"'completion' is {kinds['completion']}; use one layout")
            if layout is not None and kinds["prompt"] != layout[0]:
                raise RecordError(f"{path}:{line_number}: {kinds['prompt']} row in a file whose "
                                  f"line {layout[1]} is {layout[0]}; use one layout per file")
            layout = layout or (kinds["prompt"], line_number)
            rows.append(row)
    if not rows:
        raise RecordError(f"{path}: no rows")
    return rows


def load_trl_dataset(path: str | os.PathLike):
    """Read a TRL prompt-completion JSONL file (e.g. from ``python -m forgetkit.mixsd --format
    trl``) into a ``datasets.Dataset``, after checking every row.

    Raises:
        RecordError: no such file, a line that is not a JSON object, a missing ``prompt`` or
            ``completion`` column, an empty or mistyped value, or layouts mixed in one file;
            the message names the file, line and column.
    """
    path = Path(path)
    if not path.is_file():
        raise RecordError(f"{path}: no such file")
    return _datasets().Dataset.from_list(_check_rows(path))
