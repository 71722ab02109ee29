"""Server side: payloads -> partial sums (`AggregateSums`) -> the mean update.

`aggregate` works on one chunk of clients and returns sums that add up across chunks
(`add_sums`, a `lax.scan` carry) and devices (`psum`), so chunked, sharded and plain rounds
compute the same thing; `finalize` divides once, at the end.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from fedkernels._masked import masked_sum
from fedkernels._pipeline.config import CompressorConfig
from fedkernels._pipeline.encode import Payload
from fedkernels._pipeline.layout import Layout, join
from fedkernels._quantize import (
    Quantized,
    code_row_sum,
    dequantize,
    unpack_bits,
    unpack_codes,
    weighted_code_sum,
)
from fedkernels._scatter import scatter, scatter_sum


class AggregateSums(NamedTuple):
    """Server partial sums over some clients; they add up across chunks and devices."""

    sparse_total: jax.Array  # shape=[d_s], dtype=float32: sum_c w_c * decoded_c
    sparse_weight: jax.Array  # shape=[d_s], dtype=float32: sum of w_c over clients that sent j
    contributors: jax.Array  # shape=[d_s], dtype=int32: clients that sent coordinate j
    code_sum: jax.Array  # shape=[d_s] (shared range) or [0], dtype=int32: summed integer codes
    dense_total: jax.Array  # shape=[d_d], dtype=float32: sum_c w_c * dense_c
    weight_sum: jax.Array  # shape=[], dtype=float32: sum of w_c over included clients
    num_included: jax.Array  # shape=[], dtype=int32


def _rows_sum(x: jax.Array, weights: jax.Array) -> jax.Array:
    """sum_c w_c x_c over rows, via the core masked_sum (row accumulation, fast on CPU)."""
    if x.shape[1] == 0:
        return jnp.zeros((0,), jnp.float32)
    numerator, _ = masked_sum(x, weights, jnp.ones(x.shape, jnp.bool_))
    return numerator.astype(jnp.float32)


def aggregate(
    config: CompressorConfig, layout: Layout, payload: Payload, weights: jax.Array,
    included: jax.Array,
) -> AggregateSums:
    """Partial sums of a chunk's payloads. weights float32 [C] (0 for excluded clients)."""
    c = payload.dense.shape[0]
    k, d_s = layout.k, layout.sparse_size
    w = jnp.where(included, weights.astype(jnp.float32), 0.0)
    # A client of weight 0 counts nowhere, not as a contributor either.
    present = (w > 0).astype(jnp.int32)
    selecting = layout.selector != "none"
    indices = None
    if selecting:
        indices = unpack_bits(payload.indices, layout.index_bits, k).astype(jnp.int32)
    code_sum = jnp.zeros((0,), jnp.int32)
    shared = config.quantizer == "shared_range"
    quantized = None if config.bits is None else Quantized(
        payload.codes, payload.minimum, payload.maximum, config.bits, k
    )
    if shared:
        # Integer codes summed as integers (what secure aggregation can do); the affine
        # decode is applied once in `finalize`.
        if selecting:
            codes = unpack_codes(payload.codes, config.bits, k).astype(jnp.int32)
            code_sum = scatter((codes * present[:, None]).reshape(-1), indices.reshape(-1), d_s)
        else:  # straight from the packed words, as weighted_code_sum
            code_sum = code_row_sum(payload.codes, config.bits, k, present)
    if selecting:
        ones = jnp.broadcast_to(present[:, None], (c, k))
        contributors = scatter(ones.reshape(-1), indices.reshape(-1), d_s)
        if shared:
            sparse_total = jnp.zeros((d_s,), jnp.float32)
            sparse_weight = contributors.astype(jnp.float32)
        else:
            decoded = payload.values if quantized is None else dequantize(quantized)
            sparse_total, sparse_weight = scatter_sum(decoded, indices, d_s, weights=w)
    else:
        contributors = jnp.full((d_s,), jnp.sum(present), jnp.int32)
        sparse_weight = jnp.full((d_s,), jnp.sum(w), jnp.float32)
        if shared:
            sparse_total = jnp.zeros((d_s,), jnp.float32)
        elif quantized is None:
            sparse_total = _rows_sum(payload.values, w)
        else:  # straight from the packed codes: the decoded [C, d_s] is never written
            sparse_total = weighted_code_sum(quantized, w)
    return AggregateSums(
        sparse_total=sparse_total.astype(jnp.float32),
        sparse_weight=sparse_weight.astype(jnp.float32),
        contributors=contributors.astype(jnp.int32),
        code_sum=code_sum,
        dense_total=_rows_sum(payload.dense, w),
        weight_sum=jnp.sum(w),
        num_included=jnp.sum(present),
    )


def zero_sums(config: CompressorConfig, layout: Layout) -> AggregateSums:
    """The sums over no client (the identity of `add_sums`)."""
    d_s = layout.sparse_size
    return AggregateSums(
        jnp.zeros((d_s,), jnp.float32), jnp.zeros((d_s,), jnp.float32),
        jnp.zeros((d_s,), jnp.int32),
        jnp.zeros((d_s if config.quantizer == "shared_range" else 0,), jnp.int32),
        jnp.zeros((layout.dense_size,), jnp.float32), jnp.float32(0), jnp.int32(0),
    )


def add_sums(a: AggregateSums, b: AggregateSums) -> AggregateSums:
    return AggregateSums(*(x + y for x, y in zip(a, b, strict=True)))


def unbiased_scale(config: CompressorConfig, layout: Layout) -> float:
    """d_s / k for random-k's plain mean without error feedback (each coordinate is sent with
    probability k / d_s, so the scaled mean is unbiased), else 1. The masked mean divides by
    the senders' weight, which already accounts for the sampling; error feedback keeps what
    was not sent."""
    if layout.selector == "random_k" and config.aggregation == "mean" and (
        not config.error_feedback
    ):
        return layout.sparse_size / layout.k
    return 1.0


def finalize(config: CompressorConfig, layout: Layout, sums: AggregateSums) -> jax.Array:
    """Partial sums -> the mean update, float32 [d]. Never NaN: 0 where nothing arrived."""
    total = sums.sparse_total
    if config.quantizer == "shared_range":
        lo, hi = config.shared_range
        levels = float((1 << config.bits) - 1)
        total = sums.contributors.astype(jnp.float32) * jnp.float32(lo) + sums.code_sum.astype(
            jnp.float32
        ) * jnp.float32((hi - lo) / levels)
        # Shared-range mode sums unweighted codes: the mean is over contributing clients.
        weight = sums.contributors.astype(jnp.float32)
        denominator = jnp.broadcast_to(
            sums.num_included.astype(jnp.float32), total.shape
        ) if config.aggregation == "mean" else weight
    elif config.aggregation == "masked_mean":
        denominator = sums.sparse_weight
    else:
        denominator = jnp.broadcast_to(sums.weight_sum, total.shape)
    has = denominator > 0
    sparse_mean = jnp.where(has, total / jnp.where(has, denominator, 1.0), 0.0)
    scale = unbiased_scale(config, layout)
    if scale != 1:
        sparse_mean = sparse_mean * jnp.float32(scale)
    has_w = sums.weight_sum > 0
    dense_mean = jnp.where(has_w, sums.dense_total / jnp.where(has_w, sums.weight_sum, 1.0), 0.0)
    return join(layout, sparse_mean, dense_mean)
