"""Masked averaging: each coordinate averaged over the clients that sent a value there."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from fedkernels import _validate
from fedkernels._loops import ROWS_PER_STEP, fold_rows

# Largest bits (as int32) of a float32 weight that `scale_tiny_weights` scales up: 2**-100.
_TINY_WEIGHT_BITS = 0x0D800000


def scale_tiny_weights(weights: jax.Array) -> jax.Array:
    """float32 weights (all >= 0), all scaled by 2**149 when every one is below 2**-100, from
    their bits, exactly: XLA on CPU reads subnormal inputs as 0, so weights `[1e-40, 1e-40]`
    would weigh nothing where only their ratio matters. A subnormal's value times 2**149 is
    its mantissa field as an integer; a normal weight below 2**-100 times 2**149 is normal.
    Other weights (and other dtypes) are returned unchanged."""
    if weights.dtype != jnp.float32:
        return weights
    bits = lax.bitcast_convert_type(weights, jnp.int32)  # ordered as the weights: all >= 0
    tiny = jnp.max(bits, initial=0) < _TINY_WEIGHT_BITS
    subnormal = (bits & 0x7F800000) == 0
    scaled = jnp.where(subnormal, (bits & 0x7FFFFF).astype(jnp.float32),
                       weights * jnp.float32(2.0**100) * jnp.float32(2.0**49))
    return jnp.where(tiny, scaled, weights)


def _check(x: Any, weights: Any, mask: Any) -> tuple[jax.Array, jax.Array | None, jax.Array]:
    x = _validate.floating("x", x)
    _validate.min_ndim("x", x, 1, "[C, ...] with a leading client axis")
    num_clients = x.shape[0]
    if weights is not None:
        weights = _validate.weights_vector("weights", weights, num_clients)
    if mask is not None:  # None: `x != 0`, computed row by row inside the reduction
        mask = _validate.as_array("mask", mask)
        if mask.dtype != jnp.bool_:
            raise TypeError(f"mask must be boolean, got dtype {mask.dtype}")
        _validate.same_shape("mask", mask, x.shape, "the shape of x")
    return x, weights, mask


def masked_sum(
    x: Any, weights: Any = None, mask: Any = None
) -> tuple[jax.Array, jax.Array]:
    """Numerator and denominator of the masked (weighted) mean over the client axis.

    `numerator[j] = sum_c w_c m_cj x_cj`, `denominator[j] = sum_c w_c m_cj`, where
    `m_cj = mask[c, j] and isfinite(x[c, j])`: NaN/Inf entries never contribute, whatever the
    mask says. One pass over `x`: a loop over groups of client rows that adds them, in client
    order, into one accumulator holding both sums (see `_blocked_sums`), not a column
    reduction, which XLA:CPU runs several times slower. Unweighted counts are exact (counted in
    float32 up to 2**24 clients, past that by an int32 scan).

    Overflow: finite inputs never give NaN or Inf. Where a float sum overflows (a product
    `w_c x_cj`, a partial sum in client order, or the sum itself), those coordinates are
    summed again with `x` scaled per coordinate and `weights` scaled by powers of two (exact),
    and the result saturates: a sum beyond the float range becomes `+-finfo(dtype).max`, a
    representable one comes out as the float sum. This second pass runs only when an overflow
    occurred (a `lax.cond`; under `vmap`, where the condition is batched, both branches run).

    Args:
      x: float `[C, ...]`; axis 0 is the client axis.
      weights: optional `[C]`, finite and >= 0 (checked when concrete; under `jit` a
        negative, NaN or Inf weight counts as 0). None means 1 each.
      mask: optional bool `[C, ...]`; default `x != 0` (a client "sent" a coordinate when its
        value there is nonzero, as after top-k sparsification).

    Returns:
      `(numerator, denominator)`, each `x.shape[1:]`. `numerator` is float32 (float64 for
      float64 `x`); `denominator` is the int32 count of contributing clients when `weights`
      is None, else the float sum of their weights. C = 0 gives zeros.

    Raises:
      TypeError: `x` not floating, `mask` not bool, `weights` not numeric.
      ValueError: shapes disagree, `weights` negative or non-finite.

    >>> import jax.numpy as jnp
    >>> masked_sum(jnp.array([[1., 0.], [3., 0.]]))
    (Array([4., 0.], dtype=float32), Array([2, 0], dtype=int32))
    >>> masked_sum(jnp.array([[3e38], [3e38]]))[0]  # saturates at finfo(float32).max
    Array([3.4028235e+38], dtype=float32)
    """
    x, weights, mask = _check(x, weights, mask)
    acc_dtype = jnp.promote_types(x.dtype, jnp.float32)
    count_dtype = jnp.int32 if weights is None else acc_dtype
    num_clients, out_shape = x.shape[0], x.shape[1:]
    if num_clients == 0 or math.prod(out_shape) == 0:
        return jnp.zeros(out_shape, acc_dtype), jnp.zeros(out_shape, count_dtype)
    weights = None if weights is None else weights.astype(acc_dtype)
    largest = jnp.finfo(acc_dtype).max

    def finish(numerator, denominator):
        return numerator, denominator.astype(count_dtype)

    def repair(result, overflowed, scaled):
        numerator, denominator = result
        restored = jnp.ldexp(scaled.numerator, scaled.numerator_exponent)
        numerator = jnp.where(
            jnp.isfinite(numerator), numerator, jnp.clip(restored, -largest, largest)
        )
        if weights is not None:
            restored = jnp.ldexp(scaled.denominator, scaled.denominator_exponent)
            denominator = jnp.where(
                jnp.isfinite(denominator), denominator, jnp.minimum(restored, largest)
            )
        return numerator, denominator

    numerator, denominator = _guarded_sums(
        x, weights, mask, acc_dtype, count_dtype, finish, repair
    )
    return numerator.reshape(out_shape), denominator.reshape(out_shape)


# Columns per block of the `[num_blocks, 2, block]` accumulator (see `_blocked_sums`): a block
# of both sums stays in cache while a step's rows are added into it (bench case
# `masked_mean`).
_BLOCK = 8192
_ROWS_PER_STEP = ROWS_PER_STEP
# Unweighted counts accumulate in the float accumulator: float32 holds integers up to 2**24.
_MAX_EXACT_FLOAT32_COUNT = 2**24


class _ScaledSums(NamedTuple):
    """Flat sums of scaled terms: `numerator * 2**numerator_exponent` is the true numerator,
    `denominator * 2**denominator_exponent` the true denominator, and
    `numerator / denominator * 2**column_exponent` the mean."""

    numerator: jax.Array  # shape=[d], dtype=acc_dtype
    denominator: jax.Array  # shape=[d], dtype=acc_dtype
    numerator_exponent: jax.Array  # shape=[d], dtype=int32
    denominator_exponent: jax.Array  # shape=[d] (weighted) or [], dtype=int32
    column_exponent: jax.Array  # shape=[d], dtype=int32


def _guarded_sums(
    x: jax.Array,
    weights: jax.Array | None,
    mask: jax.Array | None,
    acc_dtype: Any,
    count_dtype: Any,
    finish: Any,
    repair: Any,
) -> Any:
    """`finish(numerator, denominator)` of the flat plain float sums, passed through
    `repair(result, overflowed [d] bool, _ScaledSums)` only when a sum overflowed. The
    scaled pass sits in the branch of a `lax.cond` taken on overflow, and the result is
    computed outside it (where XLA fuses it with the sums), so an ordinary call costs one
    check of the `[d]` sums."""
    num_clients = x.shape[0]
    if weights is None and acc_dtype == jnp.float32 and num_clients > _MAX_EXACT_FLOAT32_COUNT:
        numerator, denominator = _scan_sums(x, weights, mask, acc_dtype, count_dtype)
        numerator, denominator = numerator.reshape(-1), denominator.reshape(-1)
    else:
        numerator, denominator = _blocked_sums(x, weights, mask, acc_dtype)
    overflowed = ~jnp.isfinite(numerator)
    if weights is not None:
        overflowed |= ~jnp.isfinite(denominator)

    def rescued(result):
        return repair(result, overflowed, _scaled_sums(x, weights, mask, acc_dtype))

    result = finish(numerator, denominator)
    return lax.cond(jnp.any(overflowed), rescued, lambda result: result, result)


def _scaled_sums(
    x: jax.Array, weights: jax.Array | None, mask: jax.Array | None, acc_dtype: Any
) -> _ScaledSums:
    """The sums of `masked_sum`, free of overflow for finite inputs, each column scaled by
    powers of two (exact while results stay normal numbers) so that C terms sum below 1/2.

    Unweighted, each column of `x` is scaled to bring its largest contributing magnitude
    below 4 and every term by `2**-headroom`. Weighted, the numerator's terms `w_c x_cj` are
    formed from mantissas and exponents (`frexp`), scaled per column by the largest product
    contributing there, and the denominator's weights per column by the largest weight
    contributing there: scaling `w` and `x` apart would flush a product of a light weight and
    a huge value to 0 beside a heavy weight on a small value, though it is the column's
    largest term. Only terms some 2**126 times smaller than their column's largest lose bits,
    far below float32 precision."""
    num_clients = x.shape[0]
    flat = x.reshape(num_clients, -1)
    contributes = jnp.isfinite(flat)
    if mask is None:
        contributes &= flat != 0
    else:
        contributes &= mask.reshape(flat.shape)
    headroom = math.ceil(math.log2(num_clients)) + 3  # C terms below 4 * 2**-headroom each
    if weights is not None:
        contributes &= weights[:, None] > 0
        _, x_exponent = jnp.frexp(jnp.where(contributes, flat, 0).astype(acc_dtype))
        _, w_exponent = jnp.frexp(weights)
        lowest = jnp.iinfo(jnp.int32).min
        products = jnp.where(contributes, x_exponent + w_exponent[:, None], lowest)
        product_exponent = jnp.max(products, axis=0).astype(jnp.int32)  # |w x| < 2**it
        product_exponent = jnp.where(product_exponent == lowest, 0, product_exponent)
        column_weight = jnp.max(jnp.where(contributes, weights[:, None], 0), axis=0)
        _, weight_exponent = jnp.frexp(column_weight)  # < 2**weight_exponent, per column
        weight_exponent = weight_exponent.astype(jnp.int32)
        numerator, denominator = _blocked_sums(
            x, weights, mask, acc_dtype,
            scaled=(product_exponent + headroom, weight_exponent + headroom),
        )
        return _ScaledSums(
            numerator,
            denominator,
            product_exponent + headroom,
            weight_exponent + headroom,
            product_exponent - weight_exponent,
        )
    info = jnp.finfo(acc_dtype)
    column_max = jnp.max(jnp.where(contributes, jnp.abs(flat).astype(acc_dtype), 0), axis=0)
    _, column_exponent = jnp.frexp(column_max)  # column_max < 2**column_exponent
    # Scales 2**-e stay normal numbers (XLA may flush subnormals to zero): e <= maxexp - 2
    # leaves the largest scaled magnitude below 2**2.
    column_exponent = jnp.clip(column_exponent, info.minexp + 1, info.maxexp - 2).astype(
        jnp.int32
    )
    column_scale = jnp.ldexp(jnp.ones((), acc_dtype), -column_exponent)
    scaled_weights = jnp.full((num_clients,), 2.0**-headroom, acc_dtype)
    numerator, denominator = _blocked_sums(x, scaled_weights, mask, acc_dtype, column_scale)
    return _ScaledSums(
        numerator, denominator, column_exponent + headroom, jnp.int32(headroom),
        column_exponent,
    )


def _block_size(d: int) -> int:
    """A block length for d columns: d itself when small, else preferably a divisor of d."""
    if d <= _BLOCK:
        return d
    for block in range(_BLOCK, _BLOCK // 2, -1):
        if d % block == 0:
            return block
    return _BLOCK


def _blocked_sums(
    x: jax.Array,
    weights: jax.Array | None,
    mask: jax.Array | None,
    acc_dtype: Any,
    column_scale: jax.Array | None = None,
    scaled: tuple[jax.Array, jax.Array] | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Flat `(numerator, denominator)` of `masked_sum`, both `acc_dtype`, in one pass over `x`
    (each value first multiplied by `column_scale[j]` when given, flat `[d]`). With `scaled =
    (product_shift, weight_shift)` (int32 `[d]`, weights required) the terms are
    `w_c x_cj * 2**-product_shift[j]`, formed from mantissas and exponents so that they never
    overflow, and `w_c * 2**-weight_shift[j]`.

    XLA:CPU emits every output of a loop step as its own loop, so accumulating numerator and
    count as two arrays reads each row twice, and a column reduction (`sum(axis=0)`) is slow.
    Here both live in one accumulator `[num_blocks, 2, block]` (numerator at [:, 0], count at
    [:, 1]), updated by one elementwise fusion per step of `_ROWS_PER_STEP` rows: for each
    block the step reads the rows' `block` columns for the numerator and reads them again from
    cache for the count. Rows are added in client order, as a scan over clients would.
    """
    num_clients = x.shape[0]
    d = math.prod(x.shape[1:])
    x = x.reshape(num_clients, d)
    mask = None if mask is None else mask.reshape(num_clients, d)
    block = _block_size(d)
    main = d - d % block
    # Segments of the columns: (start, num_blocks, block); the tail is a single short block.
    segments = [(0, main // block, block)]
    if main < d:
        segments.append((main, 1, d - main))
    is_numerator = lax.broadcasted_iota(jnp.int32, (1, 2, 1), 1) == 0

    def add_row(accs, client):
        row = lax.dynamic_index_in_dim(x, client, keepdims=False).astype(acc_dtype)
        row_mask = w = None
        if mask is not None:
            row_mask = lax.dynamic_index_in_dim(mask, client, keepdims=False)
        if weights is not None:
            w = lax.dynamic_index_in_dim(weights, client, keepdims=False)
        out = []
        for acc, (start, num_blocks, length) in zip(accs, segments, strict=True):
            shape = (num_blocks, 1, length)
            values = row[start : start + num_blocks * length].reshape(shape)
            contributes = jnp.isfinite(values)
            if row_mask is None:
                contributes &= values != 0
            else:
                contributes &= row_mask[start : start + num_blocks * length].reshape(shape)
            if column_scale is not None:
                values = values * column_scale[start : start + num_blocks * length].reshape(shape)
            one = jnp.ones((), acc_dtype)
            if scaled is not None:
                product_shift, weight_shift = (
                    a[start : start + num_blocks * length].reshape(shape) for a in scaled
                )
                x_mantissa, x_exponent = jnp.frexp(jnp.where(contributes, values, 0))
                w_mantissa, w_exponent = jnp.frexp(w)
                values = jnp.ldexp(x_mantissa * w_mantissa,
                                   x_exponent + w_exponent - product_shift)
                one = jnp.ldexp(w, -weight_shift)
            elif w is not None:
                values, one = values * w, w
            out.append(acc + jnp.where(contributes, jnp.where(is_numerator, values, one), 0))
        return tuple(out)

    accs = tuple(jnp.zeros((n, 2, length), acc_dtype) for _, n, length in segments)
    # The rescue (`scaled`) runs rarely: one row per loop step keeps its code, and so every
    # weighted call's compile time, small.
    accs = fold_rows(add_row, accs, num_clients, 1 if scaled is not None else _ROWS_PER_STEP)
    numerator = jnp.concatenate([acc[:, 0].reshape(-1) for acc in accs])
    denominator = jnp.concatenate([acc[:, 1].reshape(-1) for acc in accs])
    return numerator, denominator


def _scan_sums(
    x: jax.Array,
    weights: jax.Array | None,
    mask: jax.Array | None,
    acc_dtype: Any,
    count_dtype: Any,
) -> tuple[jax.Array, jax.Array]:
    """`masked_sum` as a scan over client rows with an int32 count (for C > 2**24 clients)."""

    def add_client(carry, client):
        numerator, denominator = carry
        row, row_mask, w = client
        contributes = jnp.isfinite(row) & ((row != 0) if row_mask is None else row_mask)
        row = jnp.where(contributes, row.astype(acc_dtype), 0)
        if w is None:
            return (numerator + row, denominator + contributes.astype(count_dtype)), None
        return (numerator + w * row, denominator + jnp.where(contributes, w, 0)), None

    init = (jnp.zeros(x.shape[1:], acc_dtype), jnp.zeros(x.shape[1:], count_dtype))
    totals, _ = lax.scan(add_client, init, (x, mask, weights))
    return totals


def masked_mean(x: Any, weights: Any = None, mask: Any = None) -> jax.Array:
    """Per-coordinate mean over the clients that contributed there; 0 where none did.

    `mean[j] = sum_c w_c m_cj x_cj / sum_c w_c m_cj`, and 0 where the denominator is 0
    (divide-no-nan, as TFF's `tf.math.divide_no_nan`). `m_cj = mask[c, j] & isfinite(x[c, j])`,
    so a NaN or Inf entry never contributes. This is the count-based averaging used with
    sparsified updates (e.g. top-k): a coordinate sent by 3 of 100 clients is averaged over
    those 3, not diluted by 97 zeros.

    The result is always finite, and where the plain float sums overflow (values near the
    float range, or weights whose sum exceeds it) it is still the mean: those coordinates are
    recomputed with `x` scaled per coordinate and the weights scaled by a power of two (weights
    matter only relative to each other), as in `masked_sum`. That pass runs only when an
    overflow occurred; ordinary inputs get the plain sums' result unchanged.

    Args:
      x: float `[C, ...]`.
      weights: optional `[C]`, finite and >= 0 (as `masked_sum`); zero-weight clients never
        contribute; only their ratios matter (tiny weights are scaled up, exactly).
      mask: optional bool `[C, ...]`, default `x != 0`.

    Returns:
      `x.shape[1:]`, the dtype of `x` (computed in float32 or wider).

    Raises:
      As `masked_sum`.

    >>> import jax.numpy as jnp
    >>> x = jnp.array([[2., 0., jnp.nan], [4., 6., 1.]])
    >>> masked_mean(x)
    Array([3., 6., 1.], dtype=float32)
    >>> masked_mean(x, weights=jnp.array([3., 1.]))
    Array([2.5, 6. , 1. ], dtype=float32)
    >>> masked_mean(jnp.array([[3e38], [3e38]]), weights=jnp.array([2e38, 2e38]))
    Array([3.e+38], dtype=float32)
    """
    x, weights, mask = _check(x, weights, mask)
    acc_dtype = jnp.promote_types(x.dtype, jnp.float32)
    count_dtype = jnp.int32 if weights is None else acc_dtype
    num_clients, out_shape = x.shape[0], x.shape[1:]
    if num_clients == 0 or math.prod(out_shape) == 0:
        return jnp.zeros(out_shape, x.dtype)
    if weights is not None:
        # Weights matter only relative to each other: tiny ones are scaled up by a power of
        # two (exact) until the largest is in [1/2, 1), so their products with `x` do not
        # underflow to 0. Larger weights are left as they are (overflow has its own repair).
        if weights.dtype.itemsize > jnp.dtype(acc_dtype).itemsize:
            # Wider weights (float64 with x64 on, float32 x): only their ratios matter, taken
            # in their own dtype, so that 1e300 or 1e-300 survive the cast to acc_dtype.
            top = jnp.max(weights)
            weights = jnp.where(top > 0, weights / jnp.where(top > 0, top, 1), weights)
        weights = scale_tiny_weights(weights.astype(acc_dtype))
        _, exponent = jnp.frexp(jnp.max(weights))
        weights = jnp.ldexp(weights, -jnp.minimum(exponent, 0))

    # A mean lies within its terms' range; rounding can still carry a mean of values at the
    # float limit just past it (to Inf): it is clipped back to the largest float.
    largest = jnp.finfo(x.dtype).max

    def finish(numerator, denominator):
        denominator = denominator.astype(acc_dtype)
        has = denominator > 0
        mean = jnp.where(has, numerator / jnp.where(has, denominator, 1), 0)
        return jnp.clip(mean, -largest, largest)

    def repair(mean, overflowed, scaled):
        ratio = scaled.numerator / jnp.where(scaled.denominator > 0, scaled.denominator, 1)
        rescued = jnp.clip(jnp.ldexp(ratio, scaled.column_exponent), -largest, largest)
        return jnp.where(overflowed, rescued, mean)

    mean = _guarded_sums(x, weights, mask, acc_dtype, count_dtype, finish, repair)
    return mean.reshape(out_shape).astype(x.dtype)
