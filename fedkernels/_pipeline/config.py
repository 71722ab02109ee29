"""The compressor's settings: declared once, validated once, frozen and hashable.

Every option of `fedkernels.compressor` is a field of `CompressorConfig`; its check lives in
`__post_init__`, so a config that exists is valid. The other modules read the derived,
explicit choices (`quantizer`) instead of testing combinations of fields themselves.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

import numpy as np

from fedkernels import _validate
from fedkernels._quantize import MAX_BITS

AGGREGATIONS = ("mean", "masked_mean")
ON_NONFINITE = ("exclude", "raise")


@dataclasses.dataclass(frozen=True)
class CompressorConfig:
    """Validated, hashable compressor settings (see `fedkernels.compressor` for their meaning).

    Building one checks every field (ValueError/TypeError naming the field and its value) and
    normalises it (Python ints and floats, a `(lo, hi)` tuple), so two equal configs compile
    to the same functions.
    """

    top_k: float | int | None = None
    error_feedback: bool = False
    bits: int | None = None
    dense_threshold: int = 20000
    random_k: bool = False
    shared_range: tuple[float, float] | None = None
    aggregation: str = "mean"
    on_nonfinite: str = "exclude"

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        top_k = self.top_k
        if top_k is not None:
            if isinstance(top_k, bool) or not isinstance(top_k, numbers.Real):
                raise TypeError(
                    f"top_k must be a fraction in (0, 1], a count >= 1 or None, got {top_k!r}"
                )
            if isinstance(top_k, numbers.Integral):
                if top_k < 1:
                    raise ValueError(
                        f"top_k must be a count >= 1 or a fraction in (0, 1), got {top_k}"
                    )
                put("top_k", int(top_k))
            else:
                if not (0.0 < float(top_k) <= 1.0):
                    raise ValueError(f"top_k as a fraction must be in (0, 1], got {float(top_k)}")
                put("top_k", float(top_k))
        for name in ("error_feedback", "random_k"):
            flag = getattr(self, name)
            if not isinstance(flag, bool | np.bool_):
                raise TypeError(f"{name} must be a bool, got {flag!r}")
            put(name, bool(flag))
        if self.bits is not None:
            put("bits", _validate.static_int("bits", self.bits, 1, MAX_BITS))
        put("dense_threshold", _validate.static_int("dense_threshold", self.dense_threshold, 0))
        if self.random_k and self.top_k is None:
            raise ValueError(
                "random_k=True needs top_k (how many coordinates to draw), got top_k=None"
            )
        shared_range = self.shared_range
        if shared_range is not None:
            if self.bits is None:
                raise ValueError(f"shared_range={shared_range!r} needs bits, got bits=None")
            try:
                lo, hi = (float(v) for v in shared_range)
            except (TypeError, ValueError):
                raise ValueError(
                    f"shared_range must be a pair (lo, hi), got {shared_range!r}"
                ) from None
            if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
                raise ValueError(
                    f"shared_range must be finite with lo < hi, got {shared_range!r}"
                )
            put("shared_range", (lo, hi))
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(
                f"aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}"
            )
        if self.on_nonfinite not in ON_NONFINITE:
            raise ValueError(
                f"on_nonfinite must be one of {ON_NONFINITE}, got {self.on_nonfinite!r}"
            )

    @property
    def quantizer(self) -> str:
        """How the kept values travel: "float32" (bits=None), "own_range" (each client's
        [min, max]) or "shared_range" (every client's against the same [lo, hi])."""
        if self.bits is None:
            return "float32"
        return "own_range" if self.shared_range is None else "shared_range"
