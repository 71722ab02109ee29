"""Sparse to dense: scatter one row, or sum many clients' (values, indices) on the server."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from fedkernels import _validate

# Longest 1-D operand the batched `scatter` builds (rows * d): its flat indices are int32, and
# XLA:CPU does not index a longer dimension safely. Longer batches scatter into `[rows, d]`.
_MAX_FLAT_LENGTH = 2**31 - 1


def _check_sparse(
    values: Any, indices: Any, d: Any, checked: bool = False
) -> tuple[jax.Array, jax.Array, jax.Array | None, int]:
    """`(values, indices as int32, valid, d)`; `valid` is None when the indices are concrete
    (checked here: all in range) and else the traced in-range mask, which callers use to drop
    out-of-range entries (an int32 cast or a flat row offset would otherwise move them)."""
    values = _validate.as_array("values", values)
    indices = _validate.integer("indices", indices)
    d = _validate.static_int("d", d, 0, 2**31 - 1)
    if values.shape != indices.shape:
        raise ValueError(
            f"values and indices must have the same shape [..., k], got values "
            f"{tuple(values.shape)} and indices {tuple(indices.shape)}"
        )
    _validate.min_ndim("values", values, 1, "[..., k]")
    _validate.indices_in_range("indices", indices, d)
    if _validate.is_concrete(indices):
        return values, indices.astype(jnp.int32), None, d
    valid = _validate.in_range(indices, d)
    if checked and indices.size:
        from jax.experimental import checkify

        checkify.check(
            jnp.all(valid),
            "indices must be in [0, {d}), got min {lo} max {hi}",
            d=jnp.int32(d),
            lo=jnp.min(indices),
            hi=jnp.max(indices),
        )
    return values, indices.astype(jnp.int32), valid, d


def scatter(values: Any, indices: Any, d: int, *, checked: bool = False) -> jax.Array:
    """Dense rows from sparse (values, indices): `dense[..., indices[..., i]] += values[..., i]`.

    Args:
      values: `[..., k]`, any numeric dtype except bool (kept).
      indices: int `[..., k]` (any integer dtype), each in `[0, d)`.
      d: static int, the dense length.
      checked: under `jit`, add a `checkify.check` that every index is in `[0, d)`; the caller
        wraps the jitted function in `jax.experimental.checkify.checkify` and calls
        `err.throw()`.

    Returns:
      `[..., d]` with the same dtype as `values`, zero where no index points. Duplicate indices
      in one row are summed (scatter-add), so `scatter(*top_k(x, k), d)` is exact because
      `top_k` never repeats an index. An empty batch gives an empty `[..., d]`.

    Out-of-range indices: eagerly (concrete `indices`) they raise `ValueError`. Under `jit` or
    `vmap` the indices cannot be inspected, and an entry whose index is outside `[0, d)`
    (negative, `>= d`, or beyond int32 for wider index dtypes) is dropped: it changes no
    coordinate of its own row or any other. `checked=True` turns them into an error under
    `jax.experimental.checkify`.

    Raises:
      ValueError: shapes differ, `d` out of range, or (concrete `indices`) an index outside
        `[0, d)`.
      TypeError: `indices` not integer, `values` bool.

    >>> import jax.numpy as jnp
    >>> scatter(jnp.array([2., -1.]), jnp.array([3, 0]), 5)
    Array([-1.,  0.,  0.,  2.,  0.], dtype=float32)
    """
    values, indices, valid, d = _check_sparse(values, indices, d, checked)
    if values.dtype == jnp.bool_:
        raise TypeError(
            "values must be numeric, got dtype bool (duplicate indices add up): cast them, "
            "e.g. values.astype(jnp.int32)"
        )
    batch = values.shape[:-1]
    rows = math.prod(batch)
    if rows == 0:
        return jnp.zeros((*batch, d), values.dtype)
    k = values.shape[-1]
    indices = indices.reshape(rows, k)
    values = values.reshape(rows, k)
    valid = None if valid is None else valid.reshape(rows, k)
    if rows * d > _MAX_FLAT_LENGTH:
        # A `[rows, d]` scatter: every index stays within int32, and an index at d (the value
        # out-of-range entries get) is dropped by its own row's bound.
        if valid is not None:
            indices = jnp.where(valid, indices, d)
        rows_index = jnp.broadcast_to(jnp.arange(rows, dtype=jnp.int32)[:, None], (rows, k))
        dense = jnp.zeros((rows, d), values.dtype).at[rows_index, indices].add(
            values, mode="drop"
        )
        return dense.reshape(*batch, d)
    # One 1-D scatter-add over all rows, offsets folded into the index: a single XLA scatter
    # with one indexed dimension, which also converts through jax2tf without XLA ops. An
    # out-of-range entry goes to rows * d, past every row, and is dropped.
    flat_indices = indices + (jnp.arange(rows, dtype=jnp.int32) * d)[:, None]
    if valid is not None:
        flat_indices = jnp.where(valid, flat_indices, rows * d)
    dense = jnp.zeros((rows * d,), values.dtype).at[flat_indices.reshape(-1)].add(
        values.reshape(-1), mode="drop"
    )
    return dense.reshape(*batch, d)


def scatter_sum(
    values: Any, indices: Any, d: int, weights: Any = None, *, checked: bool = False
) -> tuple[jax.Array, jax.Array]:
    """Server-side sparse aggregation: sums C clients' (values, indices) into dense vectors.

    Args:
      values: float `[C, k]`, client c's sent values.
      indices: int `[C, k]`, their coordinates in `[0, d)`.
      d: static int, the dense length.
      weights: optional float `[C]`, finite and >= 0 (checked when concrete; under `jit` a
        negative, NaN or Inf weight counts as 0).
      checked: as in `scatter`.

    Returns:
      `(total, count)`, both `[d]`:
      `total[j] = sum over (c, i) with indices[c, i] == j of w_c * values[c, i]` (float32 for
      float16/bfloat16/float32 values, else the value dtype);
      `count[j]` = number of (client, entry) pairs that hit j, int32, which is the number of
      clients that sent j when each client's indices are distinct (as from `top_k`); with
      `weights`, the sum of those clients' weights instead (float). Entries whose value is
      NaN/Inf are left out of both, so `total / count` is the mean over finite contributions.
      `masked_mean`-style division is left to the caller: `jnp.where(count > 0, total / count,
      0)`.

    Raises:
      ValueError: shapes disagree, `values` not 2-D, weights of the wrong length or negative,
        or a concrete index out of `[0, d)`. Under `jit`/`vmap` an out-of-range entry is
        dropped from both `total` and `count`, as in `scatter`.
      TypeError: non-integer indices, non-floating values.

    >>> import jax.numpy as jnp
    >>> total, count = scatter_sum(jnp.array([[1., 2.], [3., 4.]]),
    ...                            jnp.array([[0, 2], [2, 3]]), 4)
    >>> total, count
    (Array([1., 0., 5., 4.], dtype=float32), Array([1, 0, 2, 1], dtype=int32))
    """
    values = _validate.floating("values", values)
    values, indices, valid, d = _check_sparse(values, indices, d, checked)
    if values.ndim != 2:
        raise ValueError(f"values must be [C, k] (clients x entries), got {tuple(values.shape)}")
    num_clients = values.shape[0]
    acc_dtype = jnp.promote_types(values.dtype, jnp.float32)
    finite = jnp.isfinite(values)
    values = jnp.where(finite, values, 0).astype(acc_dtype)
    if valid is not None:  # out of range under jit/vmap: index d, dropped from both sums
        indices = jnp.where(valid, indices, d)
    flat_indices = indices.reshape(-1)
    if weights is None:
        contributions = finite.astype(jnp.int32)
    else:
        weights = _validate.weights_vector("weights", weights, num_clients).astype(acc_dtype)
        values = values * weights[:, None]
        contributions = jnp.where(finite, weights[:, None], 0).astype(acc_dtype)
    total = jnp.zeros((d,), acc_dtype).at[flat_indices].add(values.reshape(-1), mode="drop")
    count = jnp.zeros((d,), contributions.dtype).at[flat_indices].add(
        contributions.reshape(-1), mode="drop"
    )
    return total, count
