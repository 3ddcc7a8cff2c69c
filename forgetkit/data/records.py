"""Knowledge records (what to inject) and probes (what must be retained).

A :class:`Record` is one fact to teach; a :class:`Probe` is one retention item.
:func:`load_records` and :func:`load_probes` read them from a built-in set (registered with
:func:`register_records` / :func:`register_probes`) or from a JSONL / JSON-array file in any
layout of :data:`forgetkit.data.formats.FORMATS`, detected from the keys of the first object.

Example:
    >>> records = load_records("facts.jsonl")  # doctest: +SKIP
    >>> probes = load_probes("counterfact.json", format="counterfact")  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from forgetkit.seeding import stable_hash

__all__ = [
    "BUILTIN_PROBES",
    "BUILTIN_RECORDS",
    "Probe",
    "Record",
    "RecordError",
    "load_probe_sets",
    "load_probes",
    "load_records",
    "records_hash",
    "register_probes",
    "register_records",
]


class RecordError(ValueError):
    """Bad record or probe input. The message names file, line and field where they apply."""

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None,
                 field: str | None = None):
        where = [] if path is None else [f"{path}" if line is None else f"{path}:{line}"]
        if field is not None:
            where.append(f"field {field!r}")
        super().__init__("".join(f"{part}: " for part in where) + message)
        self.path, self.line, self.field = path, line, field


@dataclass(frozen=True)
class Record:
    """One fact to inject.

    Attributes:
        id: unique within its set.
        prompt: the question as a user asks it (the naive prompt x).
        target: the canonical completion y* (the SFT target).
        answer: short string that decides correctness.
        context: the text the expert conditional sees; ``None`` means ``target``.
        paraphrases: other wordings of ``prompt`` with the same answer.
        meta: free-form provenance (domain, relation, source format, ...).
    """

    id: str
    prompt: str
    target: str
    answer: str
    context: str | None = None
    paraphrases: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def expert_context(self) -> str:
        """The text shown to the expert conditional: ``context`` or else ``target``."""
        return self.context if self.context is not None else self.target


@dataclass(frozen=True)
class Probe:
    """One retention item.

    With ``choices`` it is scored by log-likelihood (lm-eval style: the choice with the highest
    summed log-probability wins); without, by greedy generation and normalized exact match /
    contains against ``answer``.

    Attributes:
        id: unique within its set.
        prompt: the question.
        answer: the correct answer (one of ``choices`` when given).
        capability: the skill probed (e.g. ``"known_fact"``, ``"arithmetic"``).
        choices: candidate completions, or ``None`` for generation.
    """

    id: str
    prompt: str
    answer: str
    capability: str
    choices: tuple[str, ...] | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


def records_hash(records: Sequence[Record]) -> str:
    """A digest of what training and MixSD read from each record (id, prompt, target, answer,
    context), in order; paraphrases and meta, which only evaluation reads, are left out."""
    return stable_hash([(r.id, r.prompt, r.target, r.answer, r.context) for r in records])


# --- built-in sets ------------------------------------------------------------------------------

BUILTIN_RECORDS: dict[str, Callable[[], list[Record]]] = {}
"""Built-in record sets by name; filled by :func:`register_records` (``forgetkit.data.corpora``)."""

BUILTIN_PROBES: dict[str, Callable[[], list[Probe]]] = {}
"""Built-in probe sets by name; filled by :func:`register_probes` (``forgetkit.data.corpora``)."""

_Item = TypeVar("_Item", Record, Probe)


def _register(registry: dict[str, Callable[[], Any]], name: str, fn: Callable[[], Any]) -> None:
    existing = registry.get(name)
    same = existing is not None and (existing.__module__, existing.__qualname__) == (
        fn.__module__, fn.__qualname__)
    if existing is not None and existing is not fn and not same:
        raise ValueError(f"built-in name {name!r} is already registered to {existing!r}")
    registry[name] = fn


def register_records(name: str, fn: Callable[[], list[Record]]) -> None:
    """Make ``load_records(name)`` return ``fn()``.

    Args:
        name: the built-in name, e.g. ``"kgfact"``.
        fn: builds the records; called on every load, with no arguments.

    Raises:
        ValueError: ``name`` is already registered to a different function.
    """
    _register(BUILTIN_RECORDS, name, fn)


def register_probes(name: str, fn: Callable[[], list[Probe]]) -> None:
    """Make ``load_probes(name)`` return ``fn()``; see :func:`register_records`."""
    _register(BUILTIN_PROBES, name, fn)


def _import_corpora() -> None:
    """Import :mod:`forgetkit.data.corpora`, which registers the built-in sets (it imports this
    module, so it is imported here on first use rather than at the top)."""
    importlib.import_module("forgetkit.data.corpora")


# --- loading ------------------------------------------------------------------------------------


def load_records(source: str | os.PathLike[str], format: str | None = None) -> list[Record]:
    """Load the records of a built-in set or a file.

    Args:
        source: a built-in name (a key of :data:`BUILTIN_RECORDS`) or a path to a JSONL file or
            a JSON file holding an array of objects. A plain string is looked up as a built-in
            name first.
        format: a key of :data:`forgetkit.data.formats.FORMATS`; ``None`` detects it from the keys of
            the first non-empty object.

    Returns:
        The records, in file order (a row of a multi-edit layout such as MQuAKE gives several).

    Raises:
        RecordError: unknown name and no such file, malformed JSON, unknown format, a missing or
            mistyped field, duplicate ids, or no records at all. The message names file, line and
            field; nothing is skipped and no partial list is returned.
    """
    return _load(source, format, BUILTIN_RECORDS, "records", Record)


def load_probes(source: str | os.PathLike[str], format: str | None = None) -> list[Probe]:
    """Load the probes of a built-in set or a file.

    Same sources and formats as :func:`load_records`. Knowledge-editing layouts give their
    retention items: CounterFact neighborhood / locality prompts and zsRE ``loc`` questions
    (capability ``"locality"``), MQuAKE multi-hop questions (``"multi_hop"``); QA layouts give
    one probe per question with the format name as capability. Native probes may carry
    ``choices``, and then ``answer`` must be one of them.

    Raises:
        RecordError: as :func:`load_records`; also a format that carries no probes, and a
            probe whose answer is not among its choices.
    """
    return _load(source, format, BUILTIN_PROBES, "probes", Probe)


def load_probe_sets(sources: Sequence[str]) -> list[Probe]:
    """Probes of several sets; a capability name already taken by an earlier set is renamed
    ``"<source>:<capability>"`` (e.g. toyworld's and kgfact's ``retrieval`` stay apart), and a
    set that repeats an id of an earlier set has all its ids prefixed ``"<source>:"``
    (kgfact-large repeats kgfact's).

    A source ``"<set>:<capability>"`` (a built-in name, or a path that is not itself a file)
    keeps only that capability of the set, e.g. ``"kgfact-large:retrieval"``.

    Raises:
        RecordError: as :func:`load_probes`; also a selected capability the set does not have.
    """
    probes, owner, ids = [], {}, set()
    for source in sources:
        name, capability = source, None
        head, sep, tail = source.rpartition(":")
        if sep and head and not Path(source).is_file():
            name, capability = head, tail
        loaded = load_probes(name)
        if capability is not None:
            present = sorted({p.capability for p in loaded})
            if capability not in present:
                raise RecordError(f"probe set {name!r} has no capability {capability!r} "
                                  f"(it has: {', '.join(present)})", path=source)
            loaded = [p for p in loaded if p.capability == capability]
        prefix = f"{name}:" if any(p.id in ids for p in loaded) else ""
        for probe in loaded:
            if owner.setdefault(probe.capability, name) != name:
                probe = replace(probe, capability=f"{name}:{probe.capability}")
            if prefix:
                probe = replace(probe, id=prefix + probe.id)
                if probe.id in ids:
                    raise RecordError(f"probe id {probe.id!r} repeats", path=source)
            ids.add(probe.id)
            probes.append(probe)
    return probes


def _load(source: str | os.PathLike[str], format: str | None,
          registry: dict[str, Callable[[], list[_Item]]], noun: str, item_type: type[_Item]
          ) -> list[_Item]:
    if isinstance(source, str):
        _import_corpora()
        if source in registry:
            if format is not None:
                raise RecordError(f"format= does not apply to the built-in {noun} {source!r}")
            return _checked_builtin(source, registry[source](), item_type)
    path = Path(source).expanduser()
    if not path.is_file():
        known = ", ".join(sorted(registry)) or "none registered"
        raise RecordError(f"no such file, and not a built-in {noun} name (built-in: {known})",
                          path=str(source))
    return _load_file(path, str(source), format, noun)


def _checked_builtin(name: str, items: Sequence[Any], item_type: type[_Item]) -> list[_Item]:
    where = f"built-in {name!r}"
    if not isinstance(items, list | tuple) or not items:
        raise RecordError(f"{where} returned no {item_type.__name__} list")
    seen: dict[str, int] = {}
    for index, item in enumerate(items):
        if not isinstance(item, item_type):
            raise RecordError(f"{where}: item {index} is {type(item).__name__}, not "
                              f"{item_type.__name__}")
        if item.id in seen:
            raise RecordError(f"{where}: duplicate id {item.id!r} (items {seen[item.id]} and "
                              f"{index})")
        seen[item.id] = index
    return list(items)


def _load_file(path: Path, shown: str, format: str | None, noun: str) -> list[Any]:
    from forgetkit.data.formats import FORMATS, Row, detect_format  # formats imports this module

    rows = _read_objects(path, shown)
    if not rows:
        raise RecordError(f"empty file: no {noun}", path=shown)
    if format is None:
        first_line, first = next(((n, d) for n, d in rows if d), rows[0])
        format = detect_format(first)
        if format is None:
            raise RecordError(f"unknown format: cannot recognize the keys {sorted(first)}; "
                              f"supported formats: {', '.join(FORMATS)} (pass format= to choose "
                              "one)", path=shown, line=first_line)
    elif format not in FORMATS:
        raise RecordError(f"unknown format {format!r}; supported formats: {', '.join(FORMATS)}",
                          path=shown)
    adapter = FORMATS[format].records if noun == "records" else FORMATS[format].probes
    if adapter is None:
        with_probes = ", ".join(name for name, spec in FORMATS.items() if spec.probes)
        raise RecordError(f"format {format!r} carries no probes; formats with probes: "
                          f"{with_probes}", path=shown)

    items: list[Any] = []
    first_seen: dict[str, int] = {}
    for line, data in rows:
        for item in adapter(Row(data, shown, line, path.stem, format)):
            if item.id in first_seen:
                raise RecordError(f"duplicate id {item.id!r} (also at line "
                                  f"{first_seen[item.id]})", path=shown, line=line, field="id")
            first_seen[item.id] = line
            items.append(item)
    if not items:
        raise RecordError(f"no {noun} in {len(rows)} rows of format {format!r}", path=shown)
    return items


_WHITESPACE = re.compile(r"[ \t\n\r]*")

MAX_LINE_CHARS = 1_000_000
"""Longest JSONL line read (characters): a record is a few sentences, not megabytes."""
MAX_DEPTH = 32
"""Deepest nesting of JSON arrays and objects read (the deepest format, MQuAKE, needs 4)."""


def _decode(data: bytes, shown: str) -> str:
    """``data`` as UTF-8 text (a byte-order mark dropped); an undecodable byte names its line."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise RecordError(f"not UTF-8 text: byte 0x{data[err.start]:02x} at column {column} "
                          f"({err.reason}); save the file as UTF-8", path=shown,
                          line=line) from None


def _depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value (a scalar 0, ``[]`` or ``{}`` 1), without
    recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(
            item, list) else None
        if children is not None:
            deepest = max(deepest, level)
            stack.extend((child, level + 1) for child in children)
    return deepest


def _read_objects(path: Path, shown: str) -> list[tuple[int, dict[str, Any]]]:
    """``(line, object)`` for each object of a JSONL file or a JSON array; blank lines skipped.

    A file whose first non-blank character is ``[`` is one JSON array (any suffix); anything
    else is JSONL. ``line`` is the 1-based line where the object starts.
    """
    text = _decode(path.read_bytes(), shown)
    start = _WHITESPACE.match(text).end()
    if text.startswith("[", start):
        pairs = _json_array(text, start, shown)
    else:
        pairs = []
        for number, line in enumerate(text.split("\n"), start=1):
            if len(line) > MAX_LINE_CHARS:
                raise RecordError(f"line of {len(line):,} characters, over the limit of "
                                  f"{MAX_LINE_CHARS:,} (forgetkit.data.records.MAX_LINE_CHARS)",
                                  path=shown, line=number)
            if line.strip():
                pairs.append((number, _parse(line, shown, number)))
    for number, value in pairs:
        if _depth(value) > MAX_DEPTH:
            raise RecordError(f"JSON nested deeper than {MAX_DEPTH} levels "
                              "(forgetkit.data.records.MAX_DEPTH)", path=shown, line=number)
        if not isinstance(value, dict):
            raise RecordError(f"expected a JSON object, got {type(value).__name__}", path=shown,
                              line=number)
    return pairs


def _parse(line: str, shown: str, number: int) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise RecordError(f"malformed JSON: {err.msg} (column {err.colno})", path=shown,
                          line=number) from err
    except RecursionError:
        raise RecordError(f"JSON nested deeper than {MAX_DEPTH} levels "
                          "(forgetkit.data.records.MAX_DEPTH)", path=shown, line=number) from None


def _json_array(text: str, start: int, shown: str) -> list[tuple[int, Any]]:
    """The elements of the JSON array at ``text[start:]``, each with the line it starts on."""
    try:
        values = json.loads(text)
    except json.JSONDecodeError as err:
        raise RecordError(f"malformed JSON: {err.msg} (column {err.colno})", path=shown,
                          line=err.lineno) from err
    except RecursionError:
        raise RecordError(f"JSON nested deeper than {MAX_DEPTH} levels "
                          "(forgetkit.data.records.MAX_DEPTH)", path=shown) from None
    if any(_depth(value) > MAX_DEPTH - 1 for value in values):  # checked before the walk below
        line = next(n for n, v in _json_array_lines(text, start, values) if _depth(v) >= MAX_DEPTH)
        raise RecordError(f"JSON nested deeper than {MAX_DEPTH} levels "
                          "(forgetkit.data.records.MAX_DEPTH)", path=shown, line=line)
    return _json_array_lines(text, start, values)


def _json_array_lines(text: str, start: int, values: list[Any]) -> list[tuple[int, Any]]:
    """Each element of the parsed array ``values`` with the line of ``text`` it starts on."""
    decoder = json.JSONDecoder()
    position, line, counted, pairs = start + 1, 1, 0, []
    for value in values:  # the text is valid JSON: walk it only to find where each element starts
        begin = _WHITESPACE.match(text, position).end()
        line += text.count("\n", counted, begin)
        counted = begin
        pairs.append((line, value))
        _, end = decoder.raw_decode(text, begin)
        position = _WHITESPACE.match(text, end).end() + 1  # past the "," (or the closing "]")
    return pairs
