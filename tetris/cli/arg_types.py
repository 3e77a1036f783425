"""argparse `type=` converters; argparse reports their errors as `argument --opt: <message>`."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


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


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


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
