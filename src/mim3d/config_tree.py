"""Plain YAML/JSON trees <-> frozen config dataclasses, with type coercion and precise errors.

The machinery under :mod:`mim3d.config` (which re-exports :class:`ConfigError`,
:func:`to_dict` and :func:`parse_override`): it knows no config class, only dataclass fields and
their type hints. Like :mod:`mim3d.config` it does not import torch.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

import yaml

__all__ = ["ConfigError", "apply_override", "build_dataclass", "merge_trees", "parse_override",
           "to_dict"]


class ConfigError(ValueError):
    """A configuration key or value that cannot work; the message names it."""


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Convert a YAML value to the annotated type, or raise ConfigError naming ``key``."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"config section {key} must be a mapping, got {value!r}")
        return build_dataclass(hint, value, key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config value {key}={value!r} is invalid: expected a list")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"config value {key}={value!r} is invalid: expected {len(args)} "
                              "items")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config value {key}={value!r} is invalid: expected a mapping")
        return {_coerce(k, args[0], key): _coerce(v, args[1], key) for k, v in value.items()}
    return _coerce_scalar(value, hint, key)


def _coerce_scalar(value: Any, hint: Any, key: str) -> Any:
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
    else:
        return value
    raise ConfigError(f"config value {key}={value!r} is invalid: expected {hint.__name__}")


def build_dataclass(cls: type, values: dict, prefix: str = "") -> Any:
    """``cls(**values)`` with every value coerced to its field's type hint (nested sections
    too); an unknown key or a value of the wrong type raises ConfigError naming its dotted key."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else name
        if name not in names:
            raise ConfigError(f"unknown config key {key!r}; valid keys here: "
                              f"{', '.join(sorted(names))}")
        kwargs[name] = _coerce(value, hints[name], key)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    """A plain, YAML/JSON-safe dict of a config (tuples become lists)."""

    def plain(v: Any) -> Any:
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def merge_trees(base: dict, update: dict) -> dict:
    """``base`` with ``update`` merged in, section by section (update wins)."""
    out = dict(base)
    for k, v in update.items():
        nested = isinstance(v, dict) and isinstance(out.get(k), dict)
        out[k] = merge_trees(out[k], v) if nested else v
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b=value`` into a key path and a YAML-parsed value."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r} is invalid: write it as section.key=value")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"--set {text!r} is invalid: the key is empty")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text!r} is invalid: value is not YAML ({exc})") from None
    return path, value


def apply_override(tree: dict, path: list[str], value: Any) -> dict:
    """Set ``tree[path[0]]...[path[-1]] = value`` in place, creating sections as needed."""
    node = tree
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {'.'.join(path)}: {part!r} is a value, not a section")
    node[path[-1]] = value
    return tree
