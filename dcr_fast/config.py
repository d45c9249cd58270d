"""Dataclass configs that mirror YAML files and command-line flags.

Every long job in dcr-fast is driven by one dataclass. This module turns such a dataclass into
argparse flags with the same names (``lora_rank`` -> ``--lora-rank``), reads a YAML file given
with ``--config FILE``, and merges the three layers in a fixed order: dataclass defaults, then
the file, then the flags the user actually typed. Unknown keys and values of the wrong type
raise ``ValueError`` naming the field, so a typo in a config never trains silently with a
default. Fields typed ``list[...]`` or ``tuple[X, ...]`` take several values and come back as
that container. ``config_to_dict`` is what checkpoints store, and ``config_from_dict`` reads it
back. The benchmarks under ``bench/`` build their configs with the same functions.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from typing import Any, TypeVar

import yaml
from dcr_fast import atomic

C = TypeVar("C")

_PACKAGE_CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add ``--config FILE`` and one ``--field-name`` flag per field of dataclass ``cls``.

    Flags default to ``None`` so that ``config_from_args`` can tell typed flags from defaults.
    """
    parser.add_argument(
        "--config",
        default=None,
        help="YAML file with config fields (a path, or the name of a shipped config such as 'tiny'); "
        "flags given on the command line override it",
    )
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        flag = "--" + field.name.replace("_", "-")
        base, optional = _unwrap_optional(hints[field.name])
        help_text = field.metadata.get("help", "")
        default = _field_default(field)
        help_text = f"{help_text} (default: {default!r})" if help_text else f"default: {default!r}"
        if base is bool:
            parser.add_argument(flag, dest=field.name, default=None, action=argparse.BooleanOptionalAction, help=help_text)
        elif typing.get_origin(base) in (list, tuple):
            parser.add_argument(flag, dest=field.name, default=None, nargs="*", help=help_text)
        else:
            parser.add_argument(flag, dest=field.name, default=None, help=help_text)


def config_from_args(cls: type[C], args: argparse.Namespace, section: str | None = None) -> C:
    """Build ``cls`` from defaults, then ``args.config`` (YAML), then the flags that were given.

    A YAML file is either flat (``field: value``) or holds one mapping per command
    (``dcr: {...}``, ``sft: {...}``, plus an optional ``description``); ``section`` picks one.
    """
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        values.update(load_yaml(resolve_config_path(args.config), section))
    for field in dataclasses.fields(cls):
        given = getattr(args, field.name, None)
        if given is not None:
            values[field.name] = given
    return config_from_dict(cls, values)


def config_from_dict(cls: type[C], values: dict[str, Any]) -> C:
    """Build ``cls`` from a mapping, converting strings from flags and checking every field."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown config field(s) for {cls.__name__}: {', '.join(unknown)}; expected some of {sorted(names)}")
    hints = typing.get_type_hints(cls)
    converted = {name: _convert(name, hints[name], value) for name, value in values.items()}
    return cls(**converted)


def config_to_dict(config: Any) -> dict[str, Any]:
    """Plain-data form of a config (what checkpoints and run summaries store)."""
    return dataclasses.asdict(config)


def load_yaml(path: str, section: str | None = None) -> dict[str, Any]:
    """Read a YAML mapping of config fields (``section``'s mapping if the file has one); errors name the file."""
    if not os.path.isfile(path):
        raise ValueError(f"config: file {path!r} does not exist")
    with open(path, encoding="utf-8") as handle:
        try:
            data = yaml.safe_load(handle)
        except yaml.YAMLError as err:
            where = getattr(err, "problem_mark", None)
            line = f" line {where.line + 1}" if where is not None else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ValueError(f"config: {path!r}{line} is not valid YAML ({problem})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config: {path!r} must hold a mapping of field: value, got {type(data).__name__}")
    if section is None or not any(isinstance(v, dict) for v in data.values()):
        return data
    if not isinstance(data.get(section), dict):
        raise ValueError(f"config: {path!r} has no {section!r} section; it has {sorted(k for k, v in data.items() if isinstance(v, dict))}")
    return data[section]


def save_yaml(config: Any, path: str) -> None:
    """Write ``config`` as YAML atomically (temporary file, then ``os.replace``)."""
    atomic.write_text(path, yaml.safe_dump(config_to_dict(config), sort_keys=False))


def resolve_config_path(name_or_path: str) -> str:
    """A path as given, or ``dcr_fast/configs/<name>.yaml`` for a shipped config name."""
    if os.path.exists(name_or_path):
        return name_or_path
    shipped = os.path.join(_PACKAGE_CONFIGS, f"{name_or_path}.yaml")
    if os.path.exists(shipped):
        return shipped
    available = sorted(f[:-5] for f in os.listdir(_PACKAGE_CONFIGS) if f.endswith(".yaml"))
    raise ValueError(f"config: {name_or_path!r} is neither a file nor a shipped config; shipped: {available}")


def shipped_configs() -> list[str]:
    """Names of the YAML configs shipped with the package."""
    return sorted(f[:-5] for f in os.listdir(_PACKAGE_CONFIGS) if f.endswith(".yaml"))


def _field_default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def _unwrap_optional(hint: Any) -> tuple[Any, bool]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return hint, False


def _convert(name: str, hint: Any, value: Any) -> Any:
    base, optional = _unwrap_optional(hint)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise ValueError(f"config field {name!r} may not be empty; expected {_type_name(base)}")
    origin = typing.get_origin(base)
    if origin in (list, tuple):
        (item,) = typing.get_args(base)[:1] or (str,)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config field {name!r} expected a list of {_type_name(item)}, got {value!r}")
        items = [_convert(name, item, v) for v in value]
        return tuple(items) if origin is tuple else items
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ValueError(f"config field {name!r} expected true or false, got {value!r}")
    if base in (int, float):
        accepted = (int,) if base is int else (int, float)
        if isinstance(value, str):
            try:
                value = base(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, accepted):
            raise ValueError(f"config field {name!r} expected {_type_name(base)}, got {value!r}")
        return base(value)
    if base is str:
        if not isinstance(value, (str, int, float)):
            raise ValueError(f"config field {name!r} expected a string, got {value!r}")
        return str(value)
    return value


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", str(hint))
