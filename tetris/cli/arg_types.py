"""argparse `type=` converters; argparse reports their errors as `argument --opt: <message>`."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
#: Range of user-given seconds (SLOs, arrivals, availability): the planners' tick arithmetic
#: needs normal floats (a 1e-320 s SLO becomes NaN) and finite sums (1e308 s overflows).
MIN_SECONDS = 1e-6
MAX_SECONDS = 1e9


def number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_float(text: str) -> float:
    value = number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def nonnegative_float(text: str) -> float:
    value = number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def bounded_float(low: float, high: float) -> Callable[[str], float]:
    """A number in [low, high]."""

    def convert(text: str) -> float:
        value = number(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be in [{low:g}, {high:g}], got {text}")
        return value

    return convert


seconds = bounded_float(MIN_SECONDS, MAX_SECONDS)


def positive_at_most(high: float) -> Callable[[str], float]:
    """A number in (0, high]."""

    def convert(text: str) -> float:
        value = positive_float(text)
        if value > high:
            raise argparse.ArgumentTypeError(f"must be <= {high:g}, got {text}")
        return value

    return convert


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def int_in(low: int, high: int) -> Callable[[str], int]:
    """An integer in [low, high]."""

    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be in [{low}, {high}], got {value}")
        return value

    return convert


def comma_list(item: Callable[[str], T]) -> Callable[[str], list[T]]:
    """`A,B,C` with each entry converted by `item`; errors name the entry's position."""

    def convert(text: str) -> list[T]:
        values = []
        for i, part in enumerate(text.split(",")):
            try:
                values.append(item(part.strip()))
            except argparse.ArgumentTypeError as err:
                raise argparse.ArgumentTypeError(f"entry {i}: {err}") from None
        return values

    return convert
