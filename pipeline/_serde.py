"""Frozen dataclasses <-> JSON-compatible data, checked against the type hints.

Used at the edges: parsing config sections (YAML) and the JSON round-trip of
:class:`pipeline.RunSettings` (what travels to Prefect tasks, Dask workers and the child
process). Values are checked against the field types once, here, so a ``Literal`` or a
``tuple[float, float]`` is never re-parsed deeper in the code.
"""

from __future__ import annotations

import dataclasses
import types
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from ._errors import ConfigError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

__all__ = ["to_data", "from_data"]

T = TypeVar("T", bound="DataclassInstance")


def to_data(value: object) -> Any:
    """A dataclass (nested, with tuples and paths) as JSON-compatible data."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_data(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (tuple, list)):
        return [to_data(v) for v in value]
    if isinstance(value, dict):
        return {str(k): to_data(v) for k, v in value.items()}
    return value


def _type_name(tp: object) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(tp: Any, data: Any, where: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return data
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if data is None:
            if type(None) in options:
                return None
            raise ConfigError(f"{where} must not be empty (null)")
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(option, data, where)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0]
    if origin is Literal:
        allowed = get_args(tp)
        if data not in allowed:
            raise ConfigError(
                f"{where} = {data!r} is not allowed", hint=f"use one of {', '.join(map(str, allowed))}"
            )
        return data
    if origin is tuple:
        args = get_args(tp)
        if not isinstance(data, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {type(data).__name__}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], item, f"{where}[{i}]") for i, item in enumerate(data))
        if len(data) != len(args):
            raise ConfigError(f"{where} must have {len(args)} values, got {len(data)}")
        return tuple(_convert(a, item, f"{where}[{i}]") for i, (a, item) in enumerate(zip(args, data, strict=True)))
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return from_data(tp, data, where=where)
    if tp is Path:
        if not isinstance(data, str):
            raise ConfigError(f"{where} must be a path (text), got {type(data).__name__}")
        return Path(data).expanduser()
    if tp is bool:
        if not isinstance(data, bool):
            raise ConfigError(f"{where} = {data!r} must be true or false")
        return data
    if tp is int:
        if isinstance(data, bool) or not isinstance(data, int):
            raise ConfigError(f"{where} = {data!r} must be a whole number")
        return data
    if tp is float:
        if isinstance(data, bool) or not isinstance(data, (int, float)):
            raise ConfigError(f"{where} = {data!r} must be a number")
        return float(data)
    if tp is str:
        if not isinstance(data, str):
            raise ConfigError(f"{where} = {data!r} must be text")
        return data
    raise ConfigError(f"{where}: cannot read a value of type {_type_name(tp)}")  # a programming error


def _allows_none(tp: Any) -> bool:
    return tp is Any or (get_origin(tp) in (Union, types.UnionType) and type(None) in get_args(tp))


def from_data(cls: type[T], data: object, *, where: str = "settings") -> T:
    """Build ``cls`` (a dataclass) from mapping ``data``; missing keys take the defaults.

    ``null`` for a field that cannot be None means its default. Unknown keys and values of
    the wrong type raise :class:`ConfigError` naming ``where``.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(map(str, unknown))} in {where}",
            hint=f"allowed keys: {', '.join(sorted(names))}",
        )
    has_default = {
        f.name for f in dataclasses.fields(cls)
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
    }
    kwargs = {
        name: _convert(hints[name], value, f"{where}.{name}")
        for name, value in data.items()
        # null for a field that cannot be None means "the default" (as in default.yaml).
        if not (value is None and name in has_default and not _allows_none(hints[name]))
    }
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
