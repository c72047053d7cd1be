"""Number types that carry their valid range, for constructor signatures.

`patch_size: Size` says what `patch_size: int` says and also that it must be
positive. `vitlab.runs.schema` reads these bounds from the signatures (through
pydantic, which understands `annotated_types`), so a config value out of range is
refused before anything is built, and a new argument declared with one of these
types is checked with no new code.
"""

from typing import Annotated

from annotated_types import Ge, Gt, Interval

Count = Annotated[int, Ge(1)]
"""A number of things that must exist: layers, heads, classes, batch, steps, rounds."""

Size = Annotated[int, Gt(0)]
"""A size in pixels, channels or features."""

NonNegativeInt = Annotated[int, Ge(0)]
"""A count that may be zero: warmup steps, workers, no head (0 classes)."""

Positive = Annotated[float, Gt(0)]
"""A positive amount: a learning rate, a FLOP/s peak."""

NonNegative = Annotated[float, Ge(0)]
"""An amount that may be zero: weight decay, a Beta distribution's alpha (0 turns it off)."""

Rate = Annotated[float, Interval(ge=0, lt=1)]
"""A probability in [0, 1): dropout, stochastic depth, label smoothing."""
