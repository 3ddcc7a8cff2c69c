r"""Format adapters: turn one parsed JSON row of a known dataset layout into Records or Probes.

Each supported layout is one entry of :data:`FORMATS`: a detector that recognizes a row by its
keys, an adapter that turns a row into :class:`~forgetkit.data.records.Record` objects, and optionally
one that turns it into :class:`~forgetkit.data.records.Probe` objects. :func:`detect_format` tries the
detectors in the order of :data:`FORMATS` and returns the first that matches. The loaders
(:func:`forgetkit.data.records.load_records`, :func:`forgetkit.data.records.load_probes`) read files; this
module only maps rows.

What each layout becomes (probes in brackets; ids fall back to ``"{file stem}-{line}"``):

- ``native``: our schema, field for field [id, prompt, answer, capability, choices].
- ``trl_prompt_completion`` / ``trl_messages``: the (last) user turn is the prompt, the
  (final) assistant turn the target; answer = an ``answer`` key, else the last ``\boxed{}``,
  else the stripped target; a system message goes to ``meta["system"]`` [none].
- ``counterfact`` (ROME and EasyEdit layouts): filled prompt, target ``" " + target_new``,
  answer ``target_new`` [neighborhood / locality prompts, capability ``"locality"``].
- ``zsre``: prompt ``src``, target and answer ``alt`` [``loc`` without its ``"nq question: "``
  prefix, answer ``loc_ans``, capability ``"locality"``].
- ``mquake``: one record per requested rewrite: its ``question`` with target ``target_new``, or
  without a question the filled cloze with target ``" " + target_new`` [the multi-hop
  ``questions``, answer ``new_answer``, capability ``"multi_hop"``].
- ``popqa`` / ``triviaqa`` / ``nq_open``: the question, its answer (target = the answer unless
  the row has a ``target``), all answers in ``meta["aliases"]`` [the same, capability = the
  format name].

Every adapter reads fields through :class:`Row`, so a missing field or a field of the wrong
type raises :class:`~forgetkit.data.records.RecordError` naming file, line and the field's path
(``requested_rewrite.target_new.str``, ``messages[2].content``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from forgetkit.data.answers import last_boxed
from forgetkit.data.records import Probe, Record, RecordError

__all__ = ["FORMATS", "Format", "Row", "detect_format"]

_MISSING: Any = object()
_PATH_PART = re.compile(r"([^.\[\]]+)|\[(\d+)\]")
_NATIVE_RECORD_KEYS = {"id", "prompt", "target", "answer", "context", "paraphrases", "meta"}
_NATIVE_PROBE_KEYS = {"id", "prompt", "answer", "capability", "choices", "meta"}
_TYPE_NAMES = {str: "a string", list: "a list", dict: "an object"}


@dataclass(frozen=True)
class Row:
    """One JSON object read from a file, with where it came from.

    Attributes:
        data: the parsed object.
        path: the file, as the caller named it.
        line: 1-based line where the object starts.
        stem: the file name without suffix (used for default ids).
        format: the name of the format being applied.
    """

    data: dict[str, Any]
    path: str
    line: int
    stem: str
    format: str

    def error(self, message: str, field: str | None = None) -> RecordError:
        """A :class:`RecordError` located at this row (and ``field``, if given)."""
        return RecordError(message, path=self.path, line=self.line, field=field)

    def get(self, path: str, kind: type, default: Any = _MISSING) -> Any:
        """The value at ``path`` (``a.b[0].c``), checked to be of type ``kind``.

        Args:
            path: dotted keys and ``[i]`` list indices, starting from the row.
            kind: the required type of the value (``str``, ``list``, ``dict``).
            default: returned when the field (or a parent of it) is absent or ``null``; without
                it the field is required.

        Raises:
            RecordError: the field is missing, or it or one of its parents has the wrong type.
        """
        value: Any = self.data
        walked = ""
        for key, index in _PATH_PART.findall(path):
            parent = walked
            walked += f"[{index}]" if index else f".{key}" if walked else key
            container = list if index else dict
            if not isinstance(value, container):
                raise self.error(f"expected {_describe(container)}, got {_kind_of(value)}", parent)
            if index:
                value = value[int(index)] if int(index) < len(value) else None
            else:
                value = value.get(key)
            if value is None:
                if default is _MISSING:
                    raise self.error("missing required field", walked)
                return default
        if not isinstance(value, kind):
            raise self.error(f"expected {_describe(kind)}, got {_kind_of(value)}", path)
        return value

    def text(self, path: str, default: Any = _MISSING) -> str:
        """A required (or defaulted) non-blank string field."""
        value = self.get(path, str, default)
        if isinstance(value, str) and not value.strip():
            raise self.error("must not be empty", path)
        return value

    def texts(self, path: str, default: Any = _MISSING) -> list[str]:
        """A list of strings; each element is checked and named in errors by its index."""
        values = self.get(path, list, default)
        return [self.text(f"{path}[{i}]") for i in range(len(values))] if values else values

    def ident(self, *keys: str) -> str:
        """The first present id among ``keys`` (string or integer), else ``"{stem}-{line}"``."""
        for key in keys:
            value = self.data.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, str | int):
                raise self.error(f"expected a string or integer id, got {_kind_of(value)}", key)
            if not str(value).strip():
                raise self.error("must not be empty", key)
            return str(value)
        return f"{self.stem}-{self.line}"

    def meta(self, **extra: Any) -> dict[str, Any]:
        """Provenance for a Record/Probe built from this row: format, source location, extras."""
        return {"format": self.format, "source": f"{self.path}:{self.line}",
                **{key: value for key, value in extra.items() if value is not None}}


def _describe(kind: type) -> str:
    return _TYPE_NAMES.get(kind, kind.__name__)


def _kind_of(value: Any) -> str:
    shown = json.dumps(value, ensure_ascii=False, default=str)
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    return f"{type(value).__name__} {shown}"


def _fill(template: str, subject: str, row: Row, field: str) -> str:
    """Put ``subject`` into a ROME-style ``"... {} ..."`` template."""
    if "{}" not in template:
        raise row.error("expected a template containing '{}' for the subject", field)
    return template.replace("{}", subject, 1)


def _answer_from_completion(row: Row, completion: str) -> str:
    r"""``answer`` key if present, else the last ``\boxed{}`` of the completion, else all of it."""
    answer = row.text("answer", None)
    if answer is not None:
        return answer
    boxed = last_boxed(completion)
    return boxed if boxed else completion.strip()


def _turns(row: Row, path: str) -> list[tuple[str, str]]:
    """``(role, content)`` of each chat message in the list at ``path``, every field checked."""
    return [(row.text(f"{path}[{i}].role"), row.get(f"{path}[{i}].content", str))
            for i in range(len(row.get(path, list)))]


def _last_turn(row: Row, path: str, turns: list[tuple[str, str]], role: str,
               before: int | None = None) -> tuple[int, str]:
    """Index and non-blank content of the last ``role`` message (before index ``before``)."""
    for index in reversed(range(len(turns) if before is None else before)):
        if turns[index][0] == role:
            return index, row.text(f"{path}[{index}].content")
    where = "" if before is None else f" before message {before}"
    raise row.error(f"no {role!r} message{where}", path)


def _system(turns: list[tuple[str, str]]) -> str | None:
    return next((content for role, content in turns if role == "system"), None)


def _text_or_chat(row: Row, key: str, role: str) -> tuple[str, str | None]:
    """Field ``key`` as a string, or the last ``role`` message of a chat list; and the system text."""
    if not isinstance(row.data.get(key), list):
        return row.text(key), None
    turns = _turns(row, key)
    return _last_turn(row, key, turns, role)[1], _system(turns)


# --- native -------------------------------------------------------------------------------------


def _check_keys(row: Row, allowed: set[str], kind: str) -> None:
    unknown = sorted(set(row.data) - allowed)
    if unknown:
        raise row.error(f"unknown field; a native {kind} has {sorted(allowed)}", unknown[0])


def _native_records(row: Row) -> list[Record]:
    _check_keys(row, _NATIVE_RECORD_KEYS, "record")
    meta = row.get("meta", dict, {})
    return [Record(id=row.text("id"), prompt=row.text("prompt"), target=row.text("target"),
                   answer=row.text("answer"), context=row.text("context", None),
                   paraphrases=tuple(row.texts("paraphrases", [])), meta=row.meta() | meta)]


def _native_probes(row: Row) -> list[Probe]:
    _check_keys(row, _NATIVE_PROBE_KEYS, "probe")
    answer = row.text("answer")
    choices = row.texts("choices", None)
    if choices is not None and len(choices) < 2:
        raise row.error("a multiple-choice probe needs at least two choices", "choices")
    if choices is not None and answer not in choices:
        raise row.error(f"answer {answer!r} is not one of the choices {choices}", "answer")
    return [Probe(id=row.text("id"), prompt=row.text("prompt"), answer=answer,
                  capability=row.text("capability"),
                  choices=None if choices is None else tuple(choices),
                  meta=row.meta() | row.get("meta", dict, {}))]


# --- TRL ----------------------------------------------------------------------------------------


def _trl_prompt_completion_records(row: Row) -> list[Record]:
    prompt, system = _text_or_chat(row, "prompt", "user")
    completion, _ = _text_or_chat(row, "completion", "assistant")
    answer = _answer_from_completion(row, completion)
    return [Record(row.ident("id"), prompt, completion, answer, meta=row.meta(system=system))]


def _trl_messages_records(row: Row) -> list[Record]:
    turns = _turns(row, "messages")
    final, target = _last_turn(row, "messages", turns, "assistant")
    _, prompt = _last_turn(row, "messages", turns, "user", before=final)
    answer = _answer_from_completion(row, target)
    return [Record(row.ident("id"), prompt, target, answer, meta=row.meta(system=_system(turns)))]


# --- knowledge editing: CounterFact, zsRE, MQuAKE ------------------------------------------------


def _is_rome_counterfact(data: dict[str, Any]) -> bool:
    return isinstance(data.get("requested_rewrite"), dict)


def _counterfact_records(row: Row) -> list[Record]:
    if _is_rome_counterfact(row.data):
        subject = row.text("requested_rewrite.subject")
        prompt = _fill(row.text("requested_rewrite.prompt"), subject, row,
                       "requested_rewrite.prompt")
        target_new = row.text("requested_rewrite.target_new.str")
        target_true = row.text("requested_rewrite.target_true.str")
        paraphrases = row.texts("paraphrase_prompts", [])
        relation = row.get("requested_rewrite.relation_id", str, None)
    else:
        subject = row.text("subject")
        prompt = row.text("prompt")
        target_new = row.text("target_new")
        target_true = row.text("ground_truth")
        rephrase = row.text("rephrase_prompt", None)
        paraphrases = [] if rephrase is None else [rephrase]
        relation = row.get("relation_id", str, None)
    return [Record(id=row.ident("case_id", "id"), prompt=prompt, target=" " + target_new,
                   answer=target_new, paraphrases=tuple(paraphrases),
                   meta=row.meta(subject=subject, target_true=target_true, relation_id=relation))]


def _counterfact_probes(row: Row) -> list[Probe]:
    case = row.ident("case_id", "id")
    if _is_rome_counterfact(row.data):
        answer = row.text("requested_rewrite.target_true.str")
        prompts = row.texts("neighborhood_prompts", [])
        ids = [f"{case}-nbr-{i}" for i in range(len(prompts))]
    else:
        prompt = row.text("locality_prompt", None)
        prompts, ids = ([], []) if prompt is None else ([prompt], [f"{case}-loc"])
        answer = row.text("locality_ground_truth") if prompts else ""
    return [Probe(id=i, prompt=p, answer=answer, capability="locality",
                  meta=row.meta(edit_id=case)) for i, p in zip(ids, prompts, strict=True)]


def _zsre_records(row: Row) -> list[Record]:
    alt = row.text("alt")
    rephrase = row.text("rephrase", None)
    return [Record(id=row.ident("case_id", "id"), prompt=row.text("src"), target=alt, answer=alt,
                   paraphrases=() if rephrase is None else (rephrase,),
                   meta=row.meta(subject=row.text("subject", None),
                                 answers=row.texts("answers", None),
                                 pred=row.get("pred", str, None), cond=row.get("cond", str, None)))]


def _zsre_probes(row: Row) -> list[Probe]:
    loc = row.text("loc", None)
    if loc is None:
        return []
    prompt = loc.removeprefix("nq question:").strip()
    if not prompt:
        raise row.error("must not be empty", "loc")
    case = row.ident("case_id", "id")
    answer = row.text("loc_ans")
    return [Probe(f"{case}-loc", prompt, answer, "locality", meta=row.meta(edit_id=case))]


def _mquake_records(row: Row) -> list[Record]:
    case = row.ident("case_id", "id")
    if not row.get("requested_rewrite", list):
        raise row.error("expected at least one rewrite", "requested_rewrite")
    records = []
    for k in range(len(row.data["requested_rewrite"])):
        field = f"requested_rewrite[{k}]"
        subject = row.text(f"{field}.subject")
        new = row.text(f"{field}.target_new.str")
        question = row.text(f"{field}.question", None)
        if question is None:  # cloze prompt: the completion continues the sentence
            prompt = _fill(row.text(f"{field}.prompt"), subject, row, f"{field}.prompt")
            target = " " + new
        else:
            prompt, target = question, new
        true = row.text(f"{field}.target_true.str", None)
        meta = row.meta(case_id=case, subject=subject, target_true=true)
        records.append(Record(f"{case}-{k}", prompt, target, new, meta=meta))
    return records


def _mquake_probes(row: Row) -> list[Probe]:
    case = row.ident("case_id", "id")
    answer = row.text("new_answer")
    aliases = row.texts("new_answer_alias", [])
    meta = row.meta(edit_id=case, aliases=[answer, *aliases])
    questions = row.texts("questions")
    return [Probe(f"{case}-hop-{i}", q, answer, "multi_hop", meta=meta)
            for i, q in enumerate(questions)]


# --- open-domain QA: PopQA, TriviaQA, NQ-open ------------------------------------------------


class _QA(NamedTuple):
    id: str
    question: str
    answer: str
    aliases: list[str]


def _popqa(row: Row) -> _QA:
    raw = row.data.get("possible_answers")
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as err:
            raise row.error(f"not a JSON-encoded list of strings: {err.msg}",
                            "possible_answers") from err
    if not (isinstance(raw, list) and raw and all(isinstance(a, str) and a.strip() for a in raw)):
        raise row.error("expected a non-empty (JSON-encoded) list of strings", "possible_answers")
    answer = row.text("obj", None) or raw[0]
    return _QA(row.ident("id"), row.text("question"), answer, raw)


def _triviaqa(row: Row) -> _QA:
    answer = row.text("answer.value")
    aliases = row.texts("answer.aliases", [])
    return _QA(row.ident("question_id", "id"), row.text("question"), answer, aliases or [answer])


def _nq_open(row: Row) -> _QA:
    answers = row.texts("answer")
    if not answers:
        raise row.error("expected at least one answer", "answer")
    return _QA(row.ident("id"), row.text("question"), answers[0], answers)


def _qa_records(extract: Callable[[Row], _QA]) -> Callable[[Row], list[Record]]:
    def records(row: Row) -> list[Record]:
        qa = extract(row)
        target = row.text("target", qa.answer)
        return [Record(qa.id, qa.question, target, qa.answer, meta=row.meta(aliases=qa.aliases))]

    return records


def _qa_probes(extract: Callable[[Row], _QA]) -> Callable[[Row], list[Probe]]:
    def probes(row: Row) -> list[Probe]:
        qa = extract(row)
        return [Probe(qa.id, qa.question, qa.answer, row.format, meta=row.meta(aliases=qa.aliases))]

    return probes


# --- the table ------------------------------------------------------------------------------


class Format(NamedTuple):
    """One supported layout.

    Attributes:
        detect: whether a row (the parsed object) looks like this layout, from its keys.
        records: the row as Records.
        probes: the row as Probes, or ``None`` when the layout carries no retention items.
    """

    detect: Callable[[dict[str, Any]], bool]
    records: Callable[[Row], list[Record]]
    probes: Callable[[Row], list[Probe]] | None = None


def _has(*keys: str) -> Callable[[dict[str, Any]], bool]:
    return lambda data: all(key in data for key in keys)


FORMATS: dict[str, Format] = {
    "counterfact": Format(
        lambda d: _is_rome_counterfact(d) or _has("prompt", "target_new", "ground_truth")(d),
        _counterfact_records, _counterfact_probes),
    "mquake": Format(lambda d: isinstance(d.get("requested_rewrite"), list), _mquake_records,
                     _mquake_probes),
    "zsre": Format(_has("src", "alt"), _zsre_records, _zsre_probes),
    "popqa": Format(_has("question", "possible_answers"), _qa_records(_popqa), _qa_probes(_popqa)),
    "triviaqa": Format(
        lambda d: "question" in d and ("question_id" in d or isinstance(d.get("answer"), dict)),
        _qa_records(_triviaqa), _qa_probes(_triviaqa)),
    "nq_open": Format(lambda d: "question" in d and isinstance(d.get("answer"), list),
                      _qa_records(_nq_open), _qa_probes(_nq_open)),
    "trl_messages": Format(_has("messages"), _trl_messages_records),
    "trl_prompt_completion": Format(_has("prompt", "completion"), _trl_prompt_completion_records),
    "native": Format(
        lambda d: "prompt" in d and any(key in d for key in ("answer", "target", "capability")),
        _native_records, _native_probes),
}
"""Supported layouts, in detection order (the first whose detector matches wins)."""


def detect_format(data: dict[str, Any]) -> str | None:
    """The name of the first format in :data:`FORMATS` whose detector accepts ``data``, or ``None``."""
    return next((name for name, spec in FORMATS.items() if spec.detect(data)), None)
