"""Reading a config: YAML files (StrictLoader, ``base:`` overlays), then ``key=value`` overrides, then the checks.

Precedence: dataclass defaults < YAML file (and the files it names as ``base``) < ``key=value`` arguments.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Optional

import yaml

from ..errors import ConfigError
from .coerce import YAML_BOOL_WORDS, build_section, clip_text, short_repr
from .legacy import LEGACY_KEYS, move_legacy_key, move_legacy_keys
from .schema import Config, walk_keys

MAX_YAML_BYTES = 1 << 20  # a config or sweep file is a few KiB
MAX_YAML_VALUES = 100_000  # values a YAML document may stand for, each use of an alias counted again


class _Refused(yaml.MarkedYAMLError):
    """Well-formed YAML that StrictLoader will not load."""


class StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping, a node that contains itself, and documents
    that stand for more than MAX_YAML_VALUES values once their aliases are expanded (a "billion laughs")."""

    def get_single_node(self) -> Optional[yaml.Node]:
        node = super().get_single_node()
        if node is not None:
            _count_values(node, {}, set())
        return node

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` then keys of its own may override base's
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                if key in seen:
                    raise _Refused(problem=f"key {short_repr(key)} appears twice in one mapping",
                                   problem_mark=key_node.start_mark)
                seen.add(key)
            except TypeError:  # an unhashable key: the base class refuses it
                pass
        return super().construct_mapping(node, deep)


def _count_values(node: yaml.Node, counted: dict[int, int], open_: set[int]) -> int:
    """The values ``node`` stands for, each use of an alias counted again; a refusal past MAX_YAML_VALUES."""
    if id(node) in counted:
        return counted[id(node)]
    if id(node) in open_:
        raise _Refused(problem="an alias refers to a node that contains it", problem_mark=node.start_mark)
    open_.add(id(node))
    children = node.value if isinstance(node, yaml.SequenceNode) else \
        [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else ()
    total = 1
    for child in children:
        total += _count_values(child, counted, open_)
        if total > MAX_YAML_VALUES:
            raise _Refused(problem=f"more than {MAX_YAML_VALUES} values once aliases are expanded",
                           problem_mark=node.start_mark)
    open_.discard(id(node))
    counted[id(node)] = total
    return total


def read_yaml(path: Path, what: str = "config file") -> Any:
    """A YAML file's content ({} when empty), read with StrictLoader. A file that cannot be read, is larger than
    MAX_YAML_BYTES, is not UTF-8 or is not acceptable YAML is a one-line ConfigError naming ``what``, the file
    and where possible the line."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_YAML_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{what} {path}: cannot be read ({exc.strerror or type(exc).__name__})") from None
    if len(raw) > MAX_YAML_BYTES:
        raise ConfigError(f"{what} {path}: larger than {MAX_YAML_BYTES >> 20} MiB, the most a YAML file may hold")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"{what} {path} line {line}: not UTF-8 text (byte 0x{raw[exc.start]:02x}); "
                          "save it as UTF-8") from None
    try:
        return yaml.load(text, Loader=StrictLoader) or {}
    except RecursionError:
        raise ConfigError(f"{what} {path}: nested too deeply") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = clip_text(getattr(exc, "problem", None) or str(exc).splitlines()[0], 200)
        kind = "" if isinstance(exc, _Refused) else "YAML syntax error: "
        raise ConfigError(f"{what} {path}{where}: {kind}{problem}") from None


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """Read one YAML file, merging the file it names under ``base`` (relative to it) underneath."""
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    if path.resolve() in seen:
        raise ConfigError(f"config file {path}: 'base' chain loops back to itself")
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of sections at the top level")
    move_legacy_keys(data)  # file by file, so that a file's old key overrides its base's new one
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str) or not base:
        raise ConfigError(f"config file {path}: base: expected a path (a string), got {short_repr(base)}")
    return _merge(_read_yaml(path.parent / base, seen + (path.resolve(),)), data)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _parse_override(arg: str) -> tuple[list[str], Any]:
    key, sep, raw = arg.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {short_repr(arg)} is not of the form key=value (e.g. train.epochs=5)")
    if raw.lower() in YAML_BOOL_WORDS:
        return key.split("."), raw
    try:
        value = yaml.load(raw, Loader=StrictLoader) if raw != "" else ""
    except _Refused as exc:
        raise ConfigError(f"override {short_repr(arg)}: {exc.problem}") from None
    except (yaml.YAMLError, RecursionError):
        value = raw
    return key.split("."), value


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = (),
                values: Optional[dict[str, Any]] = None) -> Config:
    """Load a config file (if any), apply ``key=value`` overrides and validate the result.

    ``values``: dotted keys set to Python values after the overrides (a sweep trial's parameters), so that
    they need no round trip through text.
    """
    data: dict = {}
    if path is not None:
        path = Path(path)
        data = _read_yaml(path)
        data.setdefault("name", path.stem)
    settings = [(arg, *_parse_override(arg)) for arg in overrides]
    settings += [(f"{key}={value!r}", key.split("."), value) for key, value in (values or {}).items()]
    for arg, keys, value in settings:
        if ".".join(keys) in LEGACY_KEYS:  # an old name on the command line still overrides the files
            moved = move_legacy_key(".".join(keys), value)
            if moved is None:
                continue
            keys, value = moved[0].split("."), moved[1]
        node = data
        for k in keys[:-1]:
            child = node.setdefault(k, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {short_repr(arg)}: {clip_text(k)} is a value, not a section")
            node = child
        node[keys[-1]] = value
    cfg = build_section(Config, data, "")
    cfg.check()
    names = cfg.data.class_names
    if len(names) > 1:  # the generator learns these classes, in this order: its labels are their indices
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, classes=names))
        cfg.model.check()
    return cfg


def yaml_value(value: Any) -> str:
    """``value`` as a config file spells it, on one line: ``null``, ``false``, ``[0.5, 0.999]``, ``{Hand: 3}``."""
    if isinstance(value, tuple):
        value = list(value)
    return yaml.safe_dump(value, default_flow_style=True, width=1 << 20).removesuffix("\n...\n").strip()


class _ConfigDumper(yaml.SafeDumper):
    """Mappings as blocks, lists of plain values on one line (``betas: [0.5, 0.999]``)."""

    def represent_list(self, data):
        flat = all(not isinstance(item, (list, dict)) for item in data)
        return self.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flat)


_ConfigDumper.add_representer(list, _ConfigDumper.represent_list)


def dump_yaml(data: dict) -> str:
    """A config as the config files are written: block mappings, short lists on one line, keys in order."""
    return yaml.dump(data, Dumper=_ConfigDumper, sort_keys=False, default_flow_style=False, width=120)


def describe_fields() -> str:
    """Every key with its default and help, for ``mednist-gan config-help``."""
    return "\n".join(f"{key}: {yaml_value(default)}\n    {f.metadata.get('help', '')}"
                     for key, f, default in walk_keys(Config()))
