"""Command lines of forgetkit: config dataclasses parsed by ``transformers.HfArgumentParser``.

Every entry point parses one or more config dataclasses side by side (as TRL's scripts do), each
field a flag with its ``metadata={"help": ...}``. Sources, later ones winning:

1. the dataclass defaults;
2. ``--config file.yaml``: a mapping of option names to values (lists for list options);
3. flags: ``--name value``, ``--name=value``, a bare ``--name`` for ``true`` (``--no_name`` for
   a boolean that defaults to true), ``--name a b c`` for a list (repeating ``--name`` adds to
   it), ``none`` for an optional value.

A config that holds another as a field (``TrainConfig.mix: MixConfig``) gets that config filled
from the second dataclass's flags. A flag name both dataclasses have goes to the first; the
second's is ``--<field>.<name>`` (``--mix.seed``), and every flag of the second also answers to
that dotted form (``--mix.lam``). In YAML such a config may also be a nested mapping
(``mix: {lam: 0.3}``), the form ``config_to_dict`` writes. An unknown key, or a value of the
wrong type, raises :class:`ConfigError` naming it (and the closest valid key).

Example:
    >>> train_config, mix = parse_config((TrainConfig, MixConfig),
    ...                                  ["--config", "cfg.yaml", "--lam", "0.5"])  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import copy
import difflib
import functools
import json
import logging
import os
import re
import sys
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

from transformers import HfArgumentParser

__all__ = ["CommandLineExit", "ConfigError", "ConfigParser", "command_line", "config_to_dict",
           "debug_requested", "error_message", "help_metadata", "markdown_table", "parse_cli",
           "parse_config"]

_SEEN = "_flags_seen"  # namespace attribute: the list flags given so far in this parse


def help_metadata(text: str) -> dict[str, str]:
    """``field(metadata=help_metadata("..."))``: the help string a config field carries."""
    return {"help": text}


class ConfigError(ValueError):
    """A bad config key or value; the message names the key and where it came from."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults after each help string; the description (a module docstring) kept as written."""


class _ListFlag(argparse.Action):
    """A list option: its first use on the command line replaces the default (or the YAML
    value), each later use extends it; ``none`` alone sets an optional list to ``None``."""

    def __call__(self, parser, namespace, values, option_string=None):
        seen = namespace.__dict__.setdefault(_SEEN, set())
        if values == [None]:
            setattr(namespace, self.dest, None)
        elif self.dest in seen and getattr(namespace, self.dest) is not None:
            setattr(namespace, self.dest, [*getattr(namespace, self.dest), *values])
        else:
            setattr(namespace, self.dest, list(values))
        seen.add(self.dest)


def _optional(hint) -> bool:
    return (typing.get_origin(hint) in (typing.Union, types.UnionType)
            and type(None) in typing.get_args(hint))


def _none_or(convert):
    """``convert`` that also reads ``none``/``null`` as ``None`` (for ``X | None`` options)."""
    def parse(text: str):
        return None if text.strip().lower() in ("none", "null") else convert(text)

    parse.__name__ = getattr(convert, "__name__", "value")
    return parse


def _suggest(key: str, valid: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


class ConfigParser(HfArgumentParser):
    """``HfArgumentParser`` over config dataclasses, with ``--config FILE.yaml`` and clear errors.

    Args:
        dataclass_types: the configs, side by side; a later one that an earlier one holds as a
            field (``TrainConfig.mix``) is filled into it.
        prog, description: as ``argparse.ArgumentParser``.
        omit: option names left off the command line (their field keeps its default), e.g.
            ``{"mix.lam"}`` where another option sets it.

    Errors raise :class:`ConfigError` instead of exiting; ``--help`` prints and exits.
    """

    def __init__(self, dataclass_types: type | Sequence[type], *, prog: str | None = None,
                 description: str | None = None, omit: Iterable[str] = ()):
        dataclass_types = (tuple(dataclass_types) if isinstance(dataclass_types, Sequence)
                           else (dataclass_types,))
        self._sections = _sections(dataclass_types)
        self._omit = set(omit)
        self._fields: dict[str, tuple[type, str, Any]] = {}  # dest -> (config, field, type hint)
        self._keys: dict[str, str] = {}  # every accepted key (dest or dotted alias) -> dest
        super().__init__(dataclass_types, prog=prog, description=description,
                         allow_abbrev=False, formatter_class=_HelpFormatter)
        self.add_argument("--config", metavar="FILE.yaml", help=(
            "YAML mapping of option names to values; flags given as well override it"))
        self.add_argument("--debug", action="store_true", help=(
            f"on an error, show the full traceback instead of one line (also {DEBUG_ENV}=1)"))

    def _add_dataclass_arguments(self, dtype):
        hints = typing.get_type_hints(dtype)
        section = self._sections[dtype]
        summary = (dtype.__doc__ or "").strip().splitlines()[0:1]
        group = self.add_argument_group(dtype.__name__, summary[0] if summary else None)
        for field in fields(dtype):
            hint = hints[field.name]
            if not field.init or hint in self._sections:
                continue  # a config held as a field: filled from its own options
            dest = field.name
            if f"--{dest}" in self._option_string_actions:
                if section is None:
                    raise TypeError(f"{dtype.__name__}.{dest}: option --{dest} is taken by an "
                                    "earlier config")
                dest = f"{section}.{field.name}"
            if dest in self._omit:
                continue
            flag = copy.copy(field)
            flag.name, flag.type = dest, hint
            metadata = dict(field.metadata)
            if section is not None and dest == field.name:
                metadata["aliases"] = [f"--{section}.{field.name}"]
            origin = typing.get_origin(next((a for a in typing.get_args(hint) if a is not
                                             type(None)), hint) if _optional(hint) else hint)
            if origin is list:
                metadata["action"] = _ListFlag
            flag.metadata = metadata
            self._parse_dataclass_field(group, flag)
            action = self._option_string_actions[f"--{dest}"]
            if _optional(hint) and hint != bool | None:
                action.type = _none_or(action.type)
            self._fields[dest] = (dtype, field.name, hint)
            self._keys[dest] = dest
            if section is not None:
                self._keys[f"{section}.{field.name}"] = dest

    def error(self, message: str):
        raise ConfigError(message)

    def parse(self, argv: Sequence[str]) -> tuple:
        """The configs of ``argv`` (``--config`` file, then flags), in the order given.

        Raises:
            ConfigError: an unknown option or YAML key, a bad value, an unreadable YAML file.
            ValueError: a config's own validation (its ``__post_init__``).
        """
        pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
        pre.add_argument("--config")
        pre.error = self.error
        known, _ = pre.parse_known_args(list(argv))
        namespace = argparse.Namespace(
            **(self._read_yaml(Path(known.config)) if known.config else {}))
        namespace, unknown = self.parse_known_args(list(argv), namespace)
        if unknown:
            token = next((t for t in unknown if t.startswith("-")), unknown[0])
            if not token.startswith("-"):
                raise ConfigError(f"unexpected argument {token!r}; options look like --name value")
            name = token.split("=", 1)[0]
            options = [o for o in self._option_string_actions if o.startswith("--")]
            raise ConfigError(f"unknown option {name}{_suggest(name, options)}")
        values = vars(namespace)
        inputs: dict[type, dict[str, Any]] = {dtype: {} for dtype in self.dataclass_types}
        for dest, (dtype, name, _) in self._fields.items():
            inputs[dtype][name] = values[dest]
        built: dict[type, Any] = {}
        for dtype in sorted(self.dataclass_types, key=lambda t: self._sections[t] is None):
            held = {name: built[hint] for name, hint in typing.get_type_hints(dtype).items()
                    if hint in built}
            built[dtype] = dtype(**inputs[dtype], **held)
        return tuple(built[dtype] for dtype in self.dataclass_types)

    def _read_yaml(self, path: Path) -> dict[str, Any]:
        """The option values of a YAML file, each checked and converted as its flag would be."""
        import yaml

        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except OSError as err:
            raise ConfigError(f"cannot read config file {path}: {err.strerror}") from err
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from err
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of option names, got "
                              f"{type(loaded).__name__}")
        sections = {name for name in self._sections.values() if name is not None}
        items = []
        for key, value in loaded.items():
            if key in sections and isinstance(value, Mapping):
                items += [(f"{key}.{sub}", sub_value) for sub, sub_value in value.items()]
            else:
                items.append((str(key), value))
        values = {}
        for key, value in items:
            if key not in self._keys:
                raise ConfigError(f"{path}: unknown config key {key!r}"
                                  f"{_suggest(key, [*self._keys, *sections])}")
            values[self._keys[key]] = self._convert(self._keys[key], value, f"{path}: {key}")
        return values

    def _convert(self, dest: str, value: Any, where: str) -> Any:
        """A YAML value of option ``dest``, converted by the flag's own type and choices."""
        action = self._option_string_actions[f"--{dest}"]
        hint = self._fields[dest][2]
        if value is None:
            if _optional(hint):
                return None
            raise ConfigError(f"{where}: null is not allowed here ({_type_name(action)} expected)")
        if action.nargs == "+":
            return [self._scalar(action, item, where)
                    for item in (value if isinstance(value, list) else [value])]
        return self._scalar(action, value, where)

    @staticmethod
    def _scalar(action: argparse.Action, value: Any, where: str) -> Any:
        if isinstance(value, list | dict):
            raise ConfigError(f"{where}: expected one {_type_name(action)}, got a "
                              f"{type(value).__name__}")
        try:
            converted = action.type(str(value)) if action.type else str(value)
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            raise ConfigError(f"{where}: {value!r} is not a valid {_type_name(action)}") from None
        if action.choices is not None and converted not in action.choices:
            raise ConfigError(f"{where}: {value!r} is not one of "
                              f"{', '.join(map(str, action.choices))}")
        return converted


def _type_name(action: argparse.Action) -> str:
    if action.choices is not None:
        return "choice"
    name = getattr(action.type, "__name__", "value")
    return {"string_to_bool": "boolean (true or false)", "int": "integer",
            "float": "number", "str": "string"}.get(name, name)


def _sections(dataclass_types: Sequence[type]) -> dict[type, str | None]:
    """Each config -> the name of the field of an earlier config that holds it (else None)."""
    sections: dict[type, str | None] = {}
    for index, dtype in enumerate(dataclass_types):
        if not is_dataclass(dtype):
            raise TypeError(f"{dtype!r} is not a dataclass")
        holders = [name for earlier in dataclass_types[:index]
                   for name, hint in typing.get_type_hints(earlier).items() if hint is dtype]
        sections[dtype] = holders[0] if holders else None
    return sections


def parse_config(dataclass_types: type | Sequence[type], argv: Sequence[str] = (),
                 omit: Iterable[str] = ()) -> tuple:
    """The configs of ``argv`` (see the module docstring); raises :class:`ConfigError`."""
    return ConfigParser(dataclass_types, omit=omit).parse(argv)


def parse_cli(dataclass_types: type | Sequence[type], argv: Sequence[str] | None, prog: str, *,
              doc: str | None = None, log_format: str = "%(message)s",
              omit: Iterable[str] = ()) -> tuple:
    """The common start of every forgetkit command line: the configs, then INFO logging.

    ``--help`` prints ``doc`` and every option with its help and default, then exits. A bad key
    or value exits with ``error: <message>`` on stderr (status 2) instead of a traceback
    (:func:`command_line`; ``--debug`` raises the error itself).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = ConfigParser(dataclass_types, prog=prog, description=doc and doc.strip(), omit=omit)
    try:
        configs = parser.parse(argv)
    except ValueError as err:  # ConfigError is a ValueError, as is a config's own validation
        if debug_requested(argv):
            raise
        raise CommandLineExit(error_message(err)) from None
    logging.basicConfig(level=logging.INFO, format=log_format)
    return configs


# --- the error boundary of every command line ------------------------------------------------

DEBUG_ENV = "FORGETKIT_DEBUG"
"""Environment variable: set to 1 to see full tracebacks (as ``--debug`` does)."""

EXIT_BAD_INPUT = 2
"""Exit status of a command line stopped by bad input or an environment error."""


class CommandLineExit(SystemExit):
    """The exit of a command line stopped by an error: status :data:`EXIT_BAD_INPUT`; its
    ``str`` is the ``error: ...`` line already printed on stderr."""

    def __init__(self, message: str):
        super().__init__(EXIT_BAD_INPUT)
        self.message = f"error: {message}"
        _close_progress_bars()
        print(self.message, file=sys.stderr, flush=True)

    def __str__(self) -> str:
        return self.message


def _close_progress_bars() -> None:
    """Close the tqdm bars an error left open, so the error line starts a line of its own."""
    if "tqdm" not in sys.modules:
        return
    from tqdm import tqdm

    for bar in list(tqdm._instances):  # every tqdm subclass registers its bars here
        bar.close()


def debug_requested(argv: Sequence[str] | None = None) -> bool:
    """``--debug`` among ``argv`` (default ``sys.argv``) or ``FORGETKIT_DEBUG`` set (not 0)."""
    argv = sys.argv[1:] if argv is None else argv
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")


def _expected_errors() -> tuple[type[BaseException], ...]:
    """What bad input and the environment raise (not bugs): forgetkit's own errors are
    ValueErrors (RecordError, ConfigError, FisherError, OutputError, ...) or OSErrors
    (ModelNotFoundError); decoding and JSON errors are ValueErrors too."""
    import torch
    import yaml
    from safetensors import SafetensorError

    return (ValueError, OSError, yaml.YAMLError, SafetensorError, torch.OutOfMemoryError,
            re.error)


def error_message(err: BaseException) -> str:
    """One line saying what went wrong, naming the file, line, field or flag it knows of."""
    import torch

    if isinstance(err, OSError) and err.filename is not None:
        message = f"{err.filename}: {err.strerror or err}"
        if err.filename2 is not None:
            message += f" ({err.filename2})"
    elif isinstance(err, UnicodeDecodeError):
        message = (f"cannot decode the input as {err.encoding} (byte {err.start}: "
                   f"{err.reason})")
    elif isinstance(err, json.JSONDecodeError):
        message = f"invalid JSON: {err.msg} (line {err.lineno}, column {err.colno})"
    elif isinstance(err, re.error):
        message = (f"invalid regular expression {err.pattern!r}: {err.msg}"
                   + (f" at position {err.pos}" if err.pos is not None else ""))
    elif isinstance(err, torch.OutOfMemoryError):
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        message = (f"out of memory ({first}); lower the batch size options or use a smaller "
                   "model or dtype")
    elif type(err).__name__ == "SafetensorError":
        message = f"corrupt or truncated safetensors file: {err}"
    else:
        message = str(err) or type(err).__name__
    return " ".join(line.strip() for line in message.splitlines() if line.strip())


def command_line(main: Callable[..., typing.Any]) -> Callable[..., typing.Any]:
    """Decorate the ``main(argv=None)`` of a command line: bad input and environment errors
    (forgetkit's own errors, a missing or unreadable file, a corrupt safetensors file, an
    invalid regex, running out of memory) end it with one ``error: ...`` line on stderr and
    exit status 2, no traceback; ``--debug`` or ``FORGETKIT_DEBUG=1`` lets the error through
    with its traceback. Anything else (a bug) keeps its traceback."""

    @functools.wraps(main)
    def run(*args, **kwargs):
        argv = args[0] if args else kwargs.get("argv")
        try:
            return main(*args, **kwargs)
        except _expected_errors() as err:
            if debug_requested(argv):
                raise
            raise CommandLineExit(error_message(err)) from None

    return run


def config_to_dict(config) -> dict[str, Any]:
    """A plain nested dict of ``config`` (tuples as lists), ready for YAML or hashing."""
    out: dict[str, Any] = {}
    for f in fields(config):
        value = getattr(config, f.name)
        if is_dataclass(value):
            value = config_to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def markdown_table(frame, digits: int = 3, style: str = "f") -> str:
    """A Markdown table of a ``pandas.DataFrame``: floats as ``{value:.{digits}{style}}``
    (``style`` ``"f"``: fixed decimals, ``"g"``: significant digits), missing values as
    ``n/a``, everything else as ``str``."""
    import math
    import numbers

    def cell(value: Any) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "n/a"
        if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral | bool):
            return f"{value:.{digits}{style}}"
        return str(value)

    lines = ["| " + " | ".join(map(str, frame.columns)) + " |",
             "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |"
              for row in frame.itertuples(index=False)]
    return "\n".join(lines)
