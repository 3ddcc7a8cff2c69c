"""Config dataclasses from YAML files and command-line flags, for any entry point.

A config is a dataclass whose fields carry ``metadata={"help": ...}``; a field may itself be a
config dataclass (nested, e.g. ``TrainConfig.mix``). Sources, later ones winning:

1. the dataclass defaults;
2. ``--config file.yaml``: a mapping of field names (nested configs as nested mappings);
3. flags ``--name value``, ``--name=value`` or a bare ``--name`` (``true`` for booleans).
   Nested fields are ``--mix.lam 0.3``; a nested field whose name no top-level field takes
   may also be given bare (``--lam 0.3``).

Flag values are converted by the field's type (``int``, ``float``, ``bool`` from
``true/false/1/0/yes/no``, ``str``, ``Literal``, ``X | None`` from ``none``/``null``, lists from
comma-separated text). An unknown key raises :class:`ConfigError` naming it and the closest valid
key.

Example:
    >>> config = load_config(TrainConfig, ["--config", "cfg.yaml", "--learning_rate", "1e-5"])  # doctest: +SKIP
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, fields, is_dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "ConfigError",
    "config_to_dict",
    "format_help",
    "from_mapping",
    "help_metadata",
    "load_config",
    "markdown_table",
    "parse_cli",
    "parse_flags",
]

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def help_metadata(text: str) -> dict[str, str]:
    """``field(metadata=help_metadata("..."))``: the help string a config field carries."""
    return {"help": text}


class ConfigError(ValueError):
    """A bad config key or value; the message names the key and where it came from."""


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _nested(hint) -> type | None:
    """The config dataclass behind ``hint`` (``X`` or ``X | None``), else ``None``."""
    for arg in (hint, *typing.get_args(hint)):
        if isinstance(arg, type) and is_dataclass(arg):
            return arg
    return None


def _suggest(key: str, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def valid_keys(cls) -> list[str]:
    """Every settable key of ``cls``: field names and ``nested.field`` names."""
    keys = []
    for f in fields(cls):
        sub = _nested(_hints(cls)[f.name])
        keys.append(f.name)
        if sub is not None:
            keys += [f"{f.name}.{g.name}" for g in fields(sub)]
    return keys


def _aliases(cls) -> dict[str, str]:
    """Bare names of nested fields that no top-level field takes: ``lam`` -> ``mix.lam``."""
    top = {f.name for f in fields(cls)}
    counts: dict[str, list[str]] = {}
    for key in valid_keys(cls):
        if "." in key:
            counts.setdefault(key.split(".", 1)[1], []).append(key)
    return {name: paths[0] for name, paths in counts.items()
            if len(paths) == 1 and name not in top}


def coerce(value: Any, hint: Any, key: str) -> Any:
    """Convert ``value`` (flag text or a YAML scalar) to the field type ``hint``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        is_none = value is None or (isinstance(value, str) and value.lower() in ("none", "null"))
        if is_none and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError("; ".join(errors))
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}={value!r}: expected one of {', '.join(map(str, args))}")
        return value
    if origin in (list, tuple):
        items = value.split(",") if isinstance(value, str) else list(value)
        inner = args[0] if args else str
        converted = [coerce(v.strip() if isinstance(v, str) else v, inner, key) for v in items]
        return converted if origin is list else tuple(converted)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise ConfigError(f"{key}={value!r}: expected true or false")
    if hint is int and not isinstance(value, bool):
        if isinstance(value, int):
            return value
        if isinstance(value, str) and re.fullmatch(r"[-+]?\d+", value.strip()):
            return int(value)
        raise ConfigError(f"{key}={value!r}: expected an integer")
    if hint is float and not isinstance(value, bool):
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}={value!r}: expected a number") from None
    if hint in (int, float):
        raise ConfigError(f"{key}={value!r}: expected a number, not a boolean")
    if hint is str:
        return str(value)
    return value


def from_mapping(cls, data: Mapping[str, Any], source: str = "config"):
    """Build ``cls`` from a (nested) mapping; unknown keys raise :class:`ConfigError`."""
    hints, names = _hints(cls), [f.name for f in fields(cls)]
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key not in hints or key not in names:
            raise ConfigError(f"{source}: unknown config key {key!r}"
                              f"{_suggest(str(key), valid_keys(cls))}")
        sub = _nested(hints[key])
        if sub is not None and isinstance(value, Mapping):
            values[key] = from_mapping(sub, value, f"{source}: {key}")
        else:
            values[key] = coerce(value, hints[key], key)
    return cls(**values)


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


def parse_flags(argv: Sequence[str]) -> list[tuple[str, str | None]]:
    """``["--a", "1", "--b=x", "--flag"]`` -> ``[("a", "1"), ("b", "x"), ("flag", None)]``.

    Raises:
        ConfigError: a token that is neither a flag nor a flag's value.
    """
    pairs: list[tuple[str, str | None]] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--") or token == "--":
            raise ConfigError(f"unexpected argument {token!r}; flags look like --name value")
        name, eq, value = token[2:].partition("=")
        if eq:
            pairs.append((name, value))
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            pairs.append((name, argv[i + 1]))
            i += 1
        else:
            pairs.append((name, None))
        i += 1
    return pairs


def _set_flag(data: dict[str, Any], cls, key: str, value: str | None) -> None:
    aliases = _aliases(cls)
    key = aliases.get(key.replace("-", "_"), key.replace("-", "_"))
    path = key.split(".")
    hints = _hints(cls)
    if path[0] not in hints or (len(path) == 2 and _nested(hints[path[0]]) is None) or len(path) > 2:
        valid = valid_keys(cls) + list(aliases)
        raise ConfigError(f"unknown config key {key!r}{_suggest(key, valid)}")
    hint = hints[path[0]]
    if len(path) == 2:
        sub = _nested(hint)
        sub_hints = _hints(sub)
        if path[1] not in sub_hints:
            raise ConfigError(f"unknown config key {key!r}{_suggest(key, valid_keys(cls))}")
        hint = sub_hints[path[1]]
    if value is None:
        if hint is not bool:
            raise ConfigError(f"--{key} needs a value")
        value = "true"
    target = data
    if len(path) == 2:
        target = data.setdefault(path[0], {})
        if not isinstance(target, dict):
            raise ConfigError(f"--{key}: {path[0]} is not a mapping")
    target[path[-1]] = coerce(value, hint, key)


def load_config(cls, argv: Sequence[str] = ()):
    """Build ``cls`` from ``--config file.yaml`` (optional) and flags (see module docstring).

    Raises:
        ConfigError: unknown key, bad value, unreadable YAML; also any ``ValueError`` of the
            config's own validation, re-raised as is.
    """
    flags = parse_flags(argv)
    data: dict[str, Any] = {}
    for name, value in flags:
        if name == "config":
            if value is None:
                raise ConfigError("--config needs a YAML file path")
            data = _read_yaml(Path(value), cls)
    for name, value in flags:
        if name != "config":
            _set_flag(data, cls, name, value)
    return from_mapping(cls, data, "flags")


def _read_yaml(path: Path, cls) -> dict[str, Any]:
    import yaml

    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(loaded).__name__}")
    checked = from_mapping(cls, loaded, str(path))  # unknown keys and bad values, named by file
    return {k: v for k, v in config_to_dict(checked).items() if k in loaded}


def format_help(cls, prog: str) -> str:
    """A ``--help`` text: one line per key with its default and help string."""
    lines = [f"usage: {prog} [--config FILE.yaml] [--KEY VALUE ...]", ""]
    for f in fields(cls):
        sub = _nested(_hints(cls)[f.name])
        if sub is not None:
            for g in fields(sub):
                lines.append(f"  --{f.name}.{g.name:<24} {g.metadata.get('help', '')} "
                             f"(default: {_default(g)})")
            continue
        lines.append(f"  --{f.name:<28} {f.metadata.get('help', '')} (default: {_default(f)})")
    return "\n".join(lines)


def parse_cli(cls, argv: Sequence[str] | None, prog: str, *, doc: str | None = None,
              log_format: str = "%(message)s", loader=None):
    """The common start of every forgetkit command line: ``--help``, logging, the config.

    Returns ``None`` after printing the help text (``doc``, if given, then :func:`format_help`)
    when ``argv`` holds ``-h``/``--help``; otherwise sets up INFO logging and returns the config
    built by ``loader(argv)`` (default :func:`load_config` of ``cls``). A bad key or value exits
    with ``error: <message>`` (status 1) instead of a traceback.
    """
    import logging
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print((doc.strip() + "\n\n" if doc else "") + format_help(cls, prog))
        return None
    logging.basicConfig(level=logging.INFO, format=log_format)
    try:
        return (loader or (lambda args: load_config(cls, args)))(argv)
    except ValueError as err:  # ConfigError is a ValueError, as is a config's own validation
        raise SystemExit(f"error: {err}") from None


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


def _default(f) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return "required"
