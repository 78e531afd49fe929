"""Recipe values against type annotations: scalars, `X | None`, list/dict, Literal enums and Annotated bounds."""
from __future__ import annotations

import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal


class Constraint:
    """Metadata of `Annotated[T, ...]` that a value of type T must also meet."""

    def problem(self, value: Any) -> str | None:
        raise NotImplementedError


@dataclass(frozen=True)
class AtLeast(Constraint):
    """value >= minimum."""

    minimum: float

    def problem(self, value: Any) -> str | None:
        return None if value >= self.minimum else f"must be >= {self.minimum}, got {value!r}"


@dataclass(frozen=True)
class Above(Constraint):
    """value > bound."""

    bound: float

    def problem(self, value: Any) -> str | None:
        return None if value > self.bound else f"must be > {self.bound}, got {value!r}"


@dataclass(frozen=True)
class Range(Constraint):
    """low <= value <= high, or low <= value < high when `include_high` is false."""

    low: float
    high: float
    include_high: bool = True

    def problem(self, value: Any) -> str | None:
        inside = self.low <= value and (value <= self.high if self.include_high else value < self.high)
        return None if inside else f"must be in [{self.low}, {self.high}{']' if self.include_high else ')'}, got {value!r}"


@dataclass(frozen=True)
class OneOf(Constraint):
    """One of the names of a runtime table (a Literal would copy the table's keys): `OneOf(tuple(TEMPLATES))`."""

    choices: tuple[str, ...]

    def problem(self, value: Any) -> str | None:
        return None if value in self.choices else f"expected one of {', '.join(self.choices)}, got {value!r}"


PositiveInt = Annotated[int, AtLeast(1)]
NonNegativeInt = Annotated[int, AtLeast(0)]
PositiveFloat = Annotated[float, Above(0)]
NonNegativeFloat = Annotated[float, AtLeast(0)]
Fraction = Annotated[float, Range(0, 1)]
Dropout = Annotated[float, Range(0, 1, include_high=False)]
Feature = Literal["patch", "pooled"]  # an encoder's output: patch tokens, or the pooled embedding as one token
Dtype = Literal["float32", "bfloat16", "float16"]  # weights dtype of a frozen model, as torch names it


def check(annotation: Any, value: Any) -> tuple[Any, str | None]:
    """(value, None) if `value` fits `annotation`, converted where lossless (int -> float, '3e-4' -> 3e-4); else
    (value, what was expected). Unknown annotations (classes, Any, unannotated) accept anything."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Annotated:
        value, problem = check(args[0], value)
        bounds = [extra for extra in args[1:] if isinstance(extra, Constraint)]
        return value, problem or next((found for bound in bounds if (found := bound.problem(value))), None)
    if origin is Literal:
        if any(value == choice and type(value) is type(choice) for choice in args):
            return value, None
        return value, f"expected one of {', '.join(map(str, args))}, got {value!r}"
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None, None
        options = [a for a in args if a is not type(None)]
        for option in options:
            converted, problem = check(option, value)
            if problem is None:
                return converted, None
        return (value, problem) if len(options) == 1 else (value, f"expected {describe(annotation)}, got {value!r}")
    if origin is list:
        return _check_list(args[0] if args else Any, value, annotation)
    if origin is dict:
        return _check_dict(*(args or (Any, Any)), value, annotation)
    scalar = SCALARS.get(annotation)
    if scalar is None:
        return value, None
    converted = scalar(value)
    return (value, f"expected {describe(annotation)}, got {value!r}") if converted is NOT_OK else (converted, None)


def _check_list(item: Any, value: Any, annotation: Any) -> tuple[Any, str | None]:
    if not isinstance(value, list):
        return value, f"expected {describe(annotation)}, got {value!r}"
    converted = []
    for index, entry in enumerate(value):
        entry, problem = check(item, entry)
        if problem is not None:
            return value, f"item {index}: {problem}"
        converted.append(entry)
    return converted, None


def _check_dict(key_type: Any, item: Any, value: Any, annotation: Any) -> tuple[Any, str | None]:
    if not isinstance(value, dict):
        return value, f"expected {describe(annotation)}, got {value!r}"
    converted = {}
    for key, entry in value.items():
        _, problem = check(key_type, key)
        if problem is not None:
            return value, f"key {key!r}: {problem}"
        converted[key], problem = check(item, entry)
        if problem is not None:
            return value, f"value of {key!r}: {problem}"
    return converted, None


NOT_OK = object()


def _int(value: Any) -> Any:
    return value if isinstance(value, int) and not isinstance(value, bool) else NOT_OK


def _float(value: Any) -> Any:
    """Ints, and text YAML 1.1 did not read as a number ('3e-4' without a dot), become floats."""
    if isinstance(value, bool):
        return NOT_OK
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(value) if isinstance(value, str) else NOT_OK
    except ValueError:
        return NOT_OK


SCALARS: dict[Any, Any] = {
    int: _int,
    float: _float,
    bool: lambda value: value if isinstance(value, bool) else NOT_OK,
    str: lambda value: value if isinstance(value, str) else NOT_OK,
}


def describe(annotation: Any) -> str:
    """An annotation as a recipe author reads it: int, list[str], float | None, one of a, b."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        return describe(args[0])
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if origin in (typing.Union, types.UnionType):
        return " | ".join("None" if a is type(None) else describe(a) for a in args)
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(describe(a) for a in args)}]"
    return getattr(annotation, "__name__", str(annotation))


def hints(function: Any) -> dict[str, Any]:
    """A function's evaluated annotations with their Annotated metadata; {} when they cannot be evaluated (a plugin
    naming types it imports only for type checkers), so its values are accepted as they are."""
    try:
        return typing.get_type_hints(function, include_extras=True)
    except Exception:  # noqa: BLE001 - any failure to evaluate foreign annotations means: nothing to check
        return {}
