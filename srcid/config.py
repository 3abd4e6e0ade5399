"""Typed configuration objects and `key=value` overrides.

Every configurable part of the project is a (possibly nested) dataclass.
:func:`apply_overrides` sets dotted keys from strings such as
``"model.codebook_size=512"``; an unknown key or a value of the wrong type is
a :class:`~srcid.errors.SrcidError` naming the key and listing the valid ones.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import typing
from typing import Any

from srcid.errors import SrcidError


def _field_types(obj) -> dict[str, Any]:
    hints = typing.get_type_hints(type(obj))
    return {f.name: hints[f.name] for f in dataclasses.fields(obj)}


def valid_keys(obj, prefix: str = "") -> list[str]:
    """All dotted keys settable on a dataclass instance, leaves only."""
    keys = []
    for name in _field_types(obj):
        value = getattr(obj, name)
        if dataclasses.is_dataclass(value):
            keys.extend(valid_keys(value, f"{prefix}{name}."))
        else:
            keys.append(prefix + name)
    return keys


def _parse(text: str, kind, key: str):
    origin = typing.get_origin(kind)
    args = typing.get_args(kind)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        non_none = [a for a in args if a is not type(None)]
        if text.lower() in ("none", "null"):
            return None
        return _parse(text, non_none[0], key)
    try:
        if kind is bool:
            lowered = text.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if kind in (int, float, str):
            return kind(text)
        if origin in (list, tuple):
            value = json.loads(text) if text.strip().startswith("[") else [v for v in text.split(",") if v != ""]
            inner = args[0] if args else str
            items = [_parse(str(v), inner, key) for v in value]
            return tuple(items) if origin is tuple else items
        if origin is typing.Literal:
            for choice in args:
                if str(choice) == text:
                    return choice
            raise SrcidError(f"config key {key}: {text!r} is not one of {', '.join(str(a) for a in args)}")
    except (ValueError, json.JSONDecodeError):
        raise SrcidError(f"config key {key}: cannot read {text!r} as {getattr(kind, '__name__', kind)}") from None
    raise SrcidError(f"config key {key}: values of type {kind} cannot be set from the command line")


def set_key(obj, key: str, text: str) -> None:
    """Set one dotted key on a nested dataclass from its string form."""
    parts = key.split(".")
    target = obj
    for depth, part in enumerate(parts):
        types = _field_types(target)
        if part not in types:
            raise SrcidError(f"unknown config key {key!r}; valid keys: {', '.join(valid_keys(obj))}")
        if depth == len(parts) - 1:
            if dataclasses.is_dataclass(getattr(target, part)):
                raise SrcidError(f"config key {key!r} is a group; valid keys: {', '.join(valid_keys(obj))}")
            setattr(target, part, _parse(text, types[part], key))
        else:
            target = getattr(target, part)
            if not dataclasses.is_dataclass(target):
                raise SrcidError(f"unknown config key {key!r}; valid keys: {', '.join(valid_keys(obj))}")


def apply_overrides(obj, overrides: list[str] | None):
    """Apply ``key=value`` strings to a dataclass (in place) and return it."""
    for item in overrides or []:
        if "=" not in item:
            raise SrcidError(f"override {item!r} is not of the form key=value")
        key, text = item.split("=", 1)
        set_key(obj, key.strip(), text.strip())
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def with_absent_keys(data: dict, absent: dict) -> dict:
    """``data`` (a saved config, nested dicts) with each dotted key of ``absent`` that it lacks set to its value there.

    A key added to a config after files were saved gets, in a file saved before, the value that reproduces that
    file's behaviour, not today's default. ``data`` is not changed; a key whose parent is missing is left alone.
    """
    out = copy.deepcopy(data)
    for key, value in absent.items():
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf not in node:
            node[leaf] = value
    return out


def from_dict(cls, data: dict, where: str = "config"):
    """Build a dataclass from a dict, rejecting unknown keys by name."""
    types = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise SrcidError(f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in data.items():
        kind = types[name]
        if dataclasses.is_dataclass(kind) and isinstance(value, dict):
            kwargs[name] = from_dict(kind, value, f"{where}.{name}")
        elif typing.get_origin(kind) is tuple and isinstance(value, list):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)
