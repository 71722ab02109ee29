"""`compression_aggregator`: the fedkernels counterpart of `tff.learning.compression_aggregator`."""

from __future__ import annotations

import math
from typing import Any

from fedkernels.tff._mean import MaskedMeanFactory
from fedkernels.tff._quantize import quantize_above_threshold
from fedkernels.tff._staging import tff
from fedkernels.tff._top_k import top_k_factory


def compression_aggregator(
    *,
    zeroing: bool = True,
    clipping: bool = True,
    weighted: bool = True,
    debug_measurements_fn: Any = None,
    quantization_bits: int = 8,
    threshold: int = 20000,
    seed: int = 0,
    top_k_fraction: float | None = None,
    **kwargs: Any,
) -> Any:
    """The counterpart of `tff.learning.compression_aggregator`, on fedkernels kernels.

    TFF's signature (`zeroing`, `clipping`, `weighted`, `debug_measurements_fn`, `**kwargs`
    for the quantizer: see `quantize_above_threshold`) with TFF's defaults and meaning, plus
    `quantization_bits`, `threshold`, `seed` and `top_k_fraction`.

    Default: `MaskedMeanFactory(value_sum_factory=quantize_above_threshold(8, 20000, seed))`
    (`tff.aggregators.UnweightedMeanFactory` of it when `weighted=False`), which on dense
    updates matches TFF's `MeanFactory(EncodedSumFactory.quantize_above_threshold(8, 20000))`
    up to the random draws. With `top_k_fraction`, the core is `top_k_factory(fraction=...)`
    instead (weighted only). Then `debug_measurements_fn` (TFF's
    `tff.learning.add_debug_measurements` or `..._with_mixed_dtype`), TFF's adaptive L2
    clipping and zeroing wrap it, with the quantile-estimation settings of
    `tff.learning.compression_aggregator`.

    Raises:
      TypeError: `debug_measurements_fn` returns a factory whose weightedness differs (TFF's
        check), or an unknown keyword argument.
      ValueError: `top_k_fraction` with `weighted=False`, or a quantizer keyword value
        fedkernels does not implement.
    """
    if top_k_fraction is not None:
        if not weighted:
            raise ValueError("top_k_fraction needs weighted=True (top_k_factory is weighted)")
        if kwargs:
            raise ValueError(f"quantizer keywords {sorted(kwargs)} do not apply with "
                             "top_k_fraction (no quantization)")
        factory = top_k_factory(fraction=top_k_fraction)
    else:
        quantized = quantize_above_threshold(quantization_bits, threshold, seed, **kwargs)
        factory = (
            MaskedMeanFactory(value_sum_factory=quantized)
            if weighted
            else tff.aggregators.UnweightedMeanFactory(quantized)
        )
    if debug_measurements_fn is not None:
        factory = debug_measurements_fn(factory)
        expected = (tff.aggregators.WeightedAggregationFactory if weighted
                    else tff.aggregators.UnweightedAggregationFactory)
        if not isinstance(factory, expected):
            raise TypeError("debug_measurements_fn should return the same type.")
    quantile = tff.aggregators.PrivateQuantileEstimationProcess.no_noise
    if clipping:
        factory = tff.aggregators.clipping_factory(
            quantile(initial_estimate=1.0, target_quantile=0.8, learning_rate=0.2), factory
        )
    if zeroing:
        factory = tff.aggregators.zeroing_factory(
            quantile(
                initial_estimate=10.0,
                target_quantile=0.98,
                learning_rate=math.log(10.0),
                multiplier=2.0,
                increment=1.0,
            ),
            factory,
        )
    return factory

