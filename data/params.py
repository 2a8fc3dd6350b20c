"""Ranges of numeric settings, written where the setting is declared.

A learner, backbone or data loader states the range of a number in its signature:

    def __init__(self, backbone, way: PositiveInt, inner_lr: PositiveFloat = 0.4): ...

and the CLI checks every configured value against its parameter's type and range before
any work (runners/validate.py), so a new learner's settings are checked without a table to
keep up to date. Plain `int`/`float` parameters are checked for type (and floats for being
finite) only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Literal


@dataclass(frozen=True)
class Range:
    """low <= value <= high (strict where open); None: unbounded."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def contains(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return False
        return True

    def describe(self) -> str:
        lo = "(" if self.low_open else "["
        hi = ")" if self.high_open else "]"
        low = "-inf" if self.low is None else f"{self.low:g}"
        high = "inf" if self.high is None else f"{self.high:g}"
        if self.high is None and not self.low_open and self.low == 1:
            return "a positive integer"
        if self.high is None and self.low == 0:
            return "positive" if self.low_open else "at least 0"
        return f"in {lo}{low}, {high}{hi}"


def finite_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


PositiveInt = Annotated[int, Range(low=1)]
NonNegativeInt = Annotated[int, Range(low=0)]
PositiveFloat = Annotated[float, Range(low=0, low_open=True)]
NonNegativeFloat = Annotated[float, Range(low=0)]
Probability = Annotated[float, Range(low=0, high=1)]  # [0, 1]
Fraction = Annotated[float, Range(low=0, high=1, high_open=True)]  # [0, 1): momenta, dropout
UnitInterval = Annotated[float, Range(low=0, high=1, low_open=True)]  # (0, 1]: decay factors
Rotations = Literal[1, 2, 4]  # rotations as new classes: none, 180 degrees, or 90-degree steps
