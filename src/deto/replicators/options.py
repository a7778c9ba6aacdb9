"""Each replicator's knobs, declared once: a frozen dataclass whose fields carry their bounds.

A field made with :func:`knob` states its default, one line of help, and its bounds (numbers)
or choices (strings). Building an options object checks every field against them, naming the
bad value: a value of the wrong type raises :class:`KnobTypeError` (a ``TypeError`` and a
``ValueError``: bad input either way), one out of bounds a ``ValueError``. Every replicator
class names its options class (``Replicator.Options``); its constructor builds one from its
keyword arguments, and ``deto train``'s flags, config keys, presets and ``--help`` are derived
from the same classes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

OptionsT = TypeVar("OptionsT", bound="Options")

MAX_LR = 1e3
"""The largest learning rate a knob or ``deto train`` flag takes (``--lr``, ``--outer-lr``): far
above any that trains (peaks lie near 1e-4 to 1, DiLoCo's outer rate near 1). Finite, so that
a slip such as ``1e20`` is refused when the flag is read, not found as non-finite weights on
every rank after the first steps."""


class KnobTypeError(TypeError, ValueError):
    """A knob given a value of the wrong type."""


def knob(
    default: Any,
    help: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    choices: tuple[str, ...] | None = None,
    metavar: str | None = None,
) -> Any:
    """A dataclass field for a knob. Numbers lie in ``[low, high]`` (an end open as asked,
    ``None``: unbounded, so never infinite); strings are one of ``choices``."""
    return field(
        default=default,
        metadata={
            "help": help, "low": low, "high": high, "low_open": low_open,
            "high_open": high_open, "choices": choices, "metavar": metavar,
        },
    )  # fmt: skip


def check_knob(f: dataclasses.Field[Any], value: Any) -> Any:
    """``value`` if it fits knob ``f`` (a float knob's value as a float), else raise."""
    name, meta, kind = f.name, f.metadata, f.type
    if kind == "bool":
        if not isinstance(value, bool):
            raise KnobTypeError(f"Invalid {name}: {value!r} ({name} must be a bool, {_got(value)})")
        return value
    if kind == "str":
        choices = meta["choices"]
        if value not in choices:
            raise ValueError(f"Invalid {name}: {value!r} (expected one of {', '.join(choices)})")
        return value
    if kind == "int":
        if not isinstance(value, int) or isinstance(value, bool):
            raise KnobTypeError(f"Invalid {name}: {value!r} ({name} must be an int, {_got(value)})")
    elif not isinstance(value, (int, float)) or isinstance(value, bool):
        raise KnobTypeError(f"Invalid {name}: {value!r} ({name} must be a number, {_got(value)})")
    if not in_range(f, value):
        raise ValueError(f"Invalid {name}: {value!r} (must be {describe_range(f)})")
    return value if kind == "int" else float(value)


def in_range(f: dataclasses.Field[Any], value: float) -> bool:
    """Whether a number lies within numeric knob ``f``'s bounds (never for NaN)."""
    meta = f.metadata
    lo = -math.inf if meta["low"] is None else meta["low"]
    hi = math.inf if meta["high"] is None else meta["high"]
    above = value > lo if meta["low_open"] or meta["low"] is None else value >= lo
    below = value < hi if meta["high_open"] or meta["high"] is None else value <= hi
    return above and below  # both False for NaN


def describe_range(f: dataclasses.Field[Any]) -> str:
    """What numeric knob ``f`` takes, in words: ``an integer >= 1``, ``a number in (0.0, 1.0]``."""
    meta = f.metadata
    low, high = meta["low"], meta["high"]
    if f.type == "int":
        low = None if low is None else low + 1 if meta["low_open"] else low
        high = None if high is None else high - 1 if meta["high_open"] else high
        if high is None:
            return "an integer" if low is None else f"an integer >= {low}"
        return f"an integer <= {high}" if low is None else f"an integer in [{low}, {high}]"
    lo = -math.inf if low is None else low
    hi = math.inf if high is None else high
    opening = "(" if meta["low_open"] or low is None else "["
    closing = ")" if meta["high_open"] or high is None else "]"
    return f"a number in {opening}{lo}, {hi}{closing}"


def parse_knob(f: dataclasses.Field[Any], text: str) -> int | float:
    """Numeric knob ``f``'s value from a command line's ``text``; ``ValueError`` saying what it
    takes (``must be an integer >= 1, got 0``) for text that is not such a number."""
    value: int | float | None
    try:
        value = int(text) if f.type == "int" else float(text)
    except ValueError:
        value = None
    if value is None or not in_range(f, value):
        shown = repr(text) if value is None else text.strip()  # int() and float() strip it
        raise ValueError(f"must be {describe_range(f)}, got {shown}")
    return value


def _got(value: Any) -> str:
    return f"got {type(value).__name__}"


@dataclass(frozen=True)
class Options:
    """Knobs of a replicator; this base class has none (e.g. ``NoReplication``)."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, check_knob(f, getattr(self, f.name)))

    @classmethod
    def knobs(cls) -> Mapping[str, dataclasses.Field[Any]]:
        """The knobs, by name, in declaration order."""
        return {f.name: f for f in dataclasses.fields(cls)}

    @classmethod
    def take(cls: type[OptionsT], kwargs: Mapping[str, Any]) -> tuple[OptionsT, dict[str, Any]]:
        """The options among a constructor's ``kwargs``, and the other arguments."""
        knobs = cls.knobs()
        options = cls(**{k: v for k, v in kwargs.items() if k in knobs})
        return options, {k: v for k, v in kwargs.items() if k not in knobs}

    def changed(self) -> dict[str, Any]:
        """The knobs that differ from their defaults: all a constructor needs to rebuild this."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != f.default
        }


@dataclass(frozen=True)
class ReplicatorOptions(Options):
    """The schedule every replicator with options has."""

    every: int = knob(1, "replicate every N steps", low=1, metavar="N")


@dataclass(frozen=True)
class OverlapOptions(ReplicatorOptions):
    """Replicators that can run their exchange under compute (Full, DeMo)."""

    overlap: bool = knob(
        False,
        "hide the exchange under compute (full: all-reduce each gradient as the backward pass "
        "makes it, same numbers; demo: the aggregate arrives a step late, see --overlap-mode)",
    )


@dataclass(frozen=True)
class MomentumOptions(ReplicatorOptions):
    """Replicators with a decoupled momentum (see ``MomentumReplicator``)."""

    decay: float = knob(
        0.999, "decoupled momentum decay", low=0.0, high=1.0, high_open=True, metavar="BETA"
    )
