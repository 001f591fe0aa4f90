"""The options every trainer shares: how they are checked."""

from __future__ import annotations

import math
from typing import Any

from mmcache.errors import MMCacheError


def check_number(name: str, value: Any, low: float, high: float = math.inf, integer: bool = False,
                  low_open: bool = False) -> None:
    """Refuse, in one line naming `name`, a value that is not a finite number in [low, high] (or (low, high] with
    `low_open`; a whole number with `integer`)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and integer:
        ok = float(value).is_integer()
    if ok:
        ok = (value > low if low_open else value >= low) and value <= high
    if not ok:
        kind = "a whole number" if integer else "a number"
        def fmt(v: float) -> str:
            return str(int(v)) if integer and math.isfinite(v) else f"{v:g}"

        bound = f"{'>' if low_open else '>='} {fmt(low)}" + (f" and <= {fmt(high)}" if high != math.inf else "")
        if low == -math.inf and high == math.inf:
            bound = "(finite)"
        raise MMCacheError(f"{name} must be {kind} {bound}, got {value!r}")
