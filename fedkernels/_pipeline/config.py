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

import jax
import numpy as np

from fedkernels import _validate
from fedkernels._quantize import MAX_BITS
from fedkernels._radix import RadixConfig, for_backend

AGGREGATIONS = ("mean", "masked_mean")
ON_NONFINITE = ("exclude", "raise")
# `dense_threshold=None` with quantization alone: leaves of at most this many elements stay
# float32 (a bias or a normalisation scale; the large leaves carry most of the parameters).
AUTO_QUANTIZED_THRESHOLD = 1000
# Below this share of the parameters in compressed leaves, building a compressor warns.
MIN_COMPRESSED_FRACTION = 0.9
# Largest `C * d_s` whose positions the top-k encoder indexes as flat int32 (beyond, 2-D).
FLAT_INDEX_LIMIT = 2**31 - 1


def check_top_k_arguments(
    fraction: Any,
    count: Any,
    *,
    names: tuple[str, str] = ("fraction", "count"),
    required: bool = True,
) -> None:
    """The checks of the k arguments that need no `d` (`top_k_size` adds those that do), for
    `CompressorConfig` (`names=("top_k_fraction", "top_k_count")`, `required=False`: no top-k
    is fine) and `fedkernels.tff`'s `top_k_factory` (`names=("fraction", "k")`): one of
    `fraction` and `count` given (at most one if not `required`), `fraction` a real number in
    (0, 1], `count` an int >= 1. `names` are the caller's names of the two, for the messages.

    Raises:
      ValueError: both given, or neither when `required`; `fraction` outside (0, 1]; `count`
        < 1.
      TypeError: `count` not an int, `fraction` not a real number.

    >>> check_top_k_arguments(None, 0, names=("fraction", "k"))
    Traceback (most recent call last):
    ...
    ValueError: k must be >= 1, got 0
    """
    fraction_name, count_name = names
    if (fraction is not None and count is not None) or (
        required and fraction is None and count is None
    ):
        raise ValueError(
            f"pass {'exactly' if required else 'at most'} one of {fraction_name} and "
            f"{count_name}, got {fraction_name}={fraction!r} and {count_name}={count!r}"
        )
    if count is not None:
        _validate.static_int(count_name, count, 1)
    elif fraction is not None:
        if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real):
            raise TypeError(f"{fraction_name} must be a float in (0, 1], got {fraction!r}")
        if not 0.0 < float(fraction) <= 1.0:
            raise ValueError(f"{fraction_name} must be in (0, 1], got {float(fraction)}")


@dataclasses.dataclass(frozen=True)
class CompressorConfig:
    """Validated, hashable compressor settings (see `fedkernels.compressor` for their meaning).

    Building one checks every field (ValueError/TypeError naming the field and its value) and
    normalises it (Python ints and floats, a `(lo, hi)` tuple), so two equal configs compile
    to the same functions.
    """

    top_k_fraction: float | None = None
    top_k_count: int | None = None
    error_feedback: bool = False
    bits: int | None = None
    dense_threshold: int | None = None
    random_k: bool = False
    shared_range: tuple[float, float] | None = None
    aggregation: str = "mean"
    on_nonfinite: str = "exclude"
    backend: str | None = None
    radix: RadixConfig | None = None
    flat_index_limit: int = FLAT_INDEX_LIMIT

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        fraction, count = self.top_k_fraction, self.top_k_count
        check_top_k_arguments(
            fraction, count, names=("top_k_fraction", "top_k_count"), required=False
        )
        if fraction is not None:
            put("top_k_fraction", float(fraction))
        if count is not None:
            put("top_k_count", _validate.static_int("top_k_count", count, 1))
        for name in ("error_feedback", "random_k"):
            flag = getattr(self, name)
            if not isinstance(flag, bool | np.bool_):
                raise TypeError(f"{name} must be a bool, got {flag!r}")
            put(name, bool(flag))
        if self.bits is not None:
            put("bits", _validate.static_int("bits", self.bits, 1, MAX_BITS))
        if self.dense_threshold is None:
            put("dense_threshold", self.auto_dense_threshold())
        put("dense_threshold", _validate.static_int("dense_threshold", self.dense_threshold, 0))
        if self.random_k and not self.selects:
            raise ValueError(
                "random_k=True needs top_k_fraction or top_k_count (how many coordinates to "
                "draw), got neither"
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
            # The codes decode in float32: lo, hi and the span must be float32 numbers.
            top = float(np.finfo(np.float32).max)
            if not (max(abs(lo), abs(hi), hi - lo) <= top
                    and float(np.float32(lo)) < float(np.float32(hi))):
                raise ValueError(
                    "shared_range must be within float32 range (lo, hi and hi - lo at most "
                    f"{top:.8g} in magnitude, lo < hi in float32), got {shared_range!r}"
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
        # Resolved here, once: the compiled functions never look at the process's backend.
        if self.backend is None:
            put("backend", jax.default_backend())
        elif not isinstance(self.backend, str):
            raise TypeError(f"backend must be a str such as 'cpu' or 'gpu', got {self.backend!r}")
        if self.radix is None:
            put("radix", for_backend(self.backend))
        elif not isinstance(self.radix, RadixConfig):
            raise TypeError(f"radix must be a RadixConfig or None, got {self.radix!r}")
        put("flat_index_limit", _validate.static_int("flat_index_limit", self.flat_index_limit, 0))

    @property
    def selects(self) -> bool:
        """True when a top-k or random-k selection is asked for."""
        return self.top_k_fraction is not None or self.top_k_count is not None

    @property
    def compresses(self) -> bool:
        """True when the settings compress (a selection or quantization)."""
        return self.selects or self.bits is not None

    def auto_dense_threshold(self) -> int:
        """`dense_threshold=None`: 0 with a selection (top-k is global over the flattened
        model, so small leaves compete on magnitude like every other coordinate and cost
        nothing extra), `AUTO_QUANTIZED_THRESHOLD` with quantization alone (leaves such as
        biases stay exact; their float32 cost is small beside the quantized large leaves),
        0 without compression."""
        if self.selects or self.bits is None:
            return 0
        return AUTO_QUANTIZED_THRESHOLD

    @property
    def quantizer(self) -> str:
        """How the kept values travel: "float32" (bits=None), "own_range" (each client's
        [min, max]) or "shared_range" (every client's against the same [lo, hi])."""
        if self.bits is None:
            return "float32"
        return "own_range" if self.shared_range is None else "shared_range"
