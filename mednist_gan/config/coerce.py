"""Values checked against the config's type annotations, and a section built from a mapping of its keys.

Used by the YAML loader and by configs read back from records (checkpoint.json, export.json), so it knows
nothing of the sections themselves.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any, Literal, Optional

from ..errors import ConfigError

# YAML 1.1 reads these words as booleans; on the command line they stay words (train.precision=no),
# and boolean keys accept them as booleans.
YAML_BOOL_WORDS = {"yes": True, "no": False, "on": True, "off": False, "y": True, "n": False}


def clip_text(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def short_repr(value: Any) -> str:
    """``repr(value)`` cut to 80 characters, for error messages."""
    return clip_text(repr(value))


def coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check ``value`` against ``annotation``; convert only where lossless (int -> float, '1e-4' -> float)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None:
            return None
        return coerce(value, args[0], key)
    if origin is Literal:
        allowed = typing.get_args(annotation)
        if isinstance(value, bool) and "no" in allowed:  # `precision: no` in a YAML file reads as False
            value = {False: "no", True: "yes"}[value]
        if value not in allowed:
            raise ConfigError(f"{key}={short_repr(value)} is not allowed: expected one of "
                              f"{', '.join(map(str, allowed))}")
        return value
    if origin is dict:
        key_type, value_type = typing.get_args(annotation)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={short_repr(value)} has the wrong type: expected a mapping of "
                              f"{key_type.__name__} to {value_type.__name__}")
        return {coerce(k, key_type, key): coerce(v, value_type, f"{key}.{clip_text(str(k))}") for k, v in value.items()}
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={short_repr(value)} has the wrong type: expected a list of {item_type.__name__}")
        return [coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in YAML_BOOL_WORDS:
            return YAML_BOOL_WORDS[value.lower()]
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    if value is None:
        name, colon, rest = key.rpartition(".")[2].partition(":")
        hint = f" (YAML reads {name}:{rest} as one key; write {{{name}: {rest}}})" if colon else ""
        raise ConfigError(f"{key}=null is not allowed: expected {annotation.__name__}{hint}")
    raise ConfigError(f"{key}={short_repr(value)} has the wrong type: expected {annotation.__name__}")


def build_section(cls: type, data: dict, prefix: str, unknown: Optional[list[str]] = None) -> Any:
    """``cls`` from a mapping of its keys; an unknown key is an error, or (a record) appended to ``unknown``."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{clip_text(str(key))}"
        if key not in names:
            if unknown is not None:
                unknown.append(full)
                continue
            close = difflib.get_close_matches(str(key), names, n=1)
            valid = [f"{prefix}{n}" for n in names]
            hint = f"did you mean {prefix}{close[0]}?" if close else f"valid keys: {', '.join(valid)}"
            raise ConfigError(f"unknown config key {full!r}: {hint}")
        annotation = hints[key]
        if dataclasses.is_dataclass(annotation):
            if not isinstance(value, dict):
                raise ConfigError(f"{full} must be a section (a mapping of keys), got {short_repr(value)}")
            kwargs[key] = build_section(annotation, value, f"{full}.", unknown)
        else:
            kwargs[key] = coerce(value, annotation, full)
    return cls(**kwargs)
