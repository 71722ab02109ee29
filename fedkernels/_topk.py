"""Global top-k by magnitude, and top-k with error feedback."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from fedkernels import _radix, _validate
from fedkernels._scatter import scatter

METHODS = ("auto", "lax", "radix")

# method="auto" uses radix select from this row length on (the default of
# `_radix.RadixConfig.min_length`; a compressor carries its own in its config).
AUTO_RADIX_MIN_LENGTH = _radix.DEFAULT_MIN_LENGTH


def magnitude_key(x: jax.Array) -> jax.Array:
    """Integer keys ordered like |x|: the float's bits with the sign bit cleared.

    For IEEE floats `bits(|x|)` is monotone in |x|, so comparing these integers ranks
    magnitudes exactly, without float comparisons (and with a total order: NaN ranks above
    +Inf, and -0.0 ties with 0.0). float16/bfloat16 are widened to float32 first (exact).

    >>> import jax.numpy as jnp
    >>> keys = magnitude_key(jnp.array([-2.0, 1.0, -0.0, jnp.inf]))
    >>> bool(keys[0] > keys[1] > keys[2]), bool(keys[3] > keys[0]), keys.dtype
    (True, True, dtype('int32'))
    """
    if x.dtype == jnp.float64:
        return lax.bitcast_convert_type(x, jnp.int64) & jnp.int64(0x7FFFFFFFFFFFFFFF)
    if x.dtype != jnp.float32:
        x = x.astype(jnp.float32)
    return lax.bitcast_convert_type(x, jnp.int32) & jnp.int32(0x7FFFFFFF)


def _check_top_k(x: Any, k: Any, method: str) -> tuple[jax.Array, int]:
    x = _validate.floating("x", x)
    _validate.min_ndim("x", x, 1, "[..., d] with d >= 1")
    d = x.shape[-1]
    if d < 1:
        raise ValueError(f"x must be [..., d] with d >= 1, got shape {tuple(x.shape)}")
    _validate.indexable_length("x", d)
    k = _validate.static_int("k", k, 1, d)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return x, k


def _top_k_indices(
    x: jax.Array, k: int, method: str, config: _radix.RadixConfig
) -> jax.Array:
    """Indices (ascending) of the k largest magnitude keys per row, ties to the lower index.
    Method "auto": `lax.top_k` below `config.min_length` coordinates per row, radix select
    from there on (the faster of the two on each side on XLA:CPU; the same result)."""
    if method == "auto":
        method = "lax" if x.shape[-1] < config.min_length else "radix"
    if method == "lax":
        # lax.top_k breaks ties toward the lower index, which is the rule we document. The keys
        # go back to float (|x| with NaN kept), where XLA:CPU's top_k is much faster than on
        # int32 and ranks NaN above Inf exactly as the integer keys do (tested).
        keys = magnitude_key(x)
        float_keys = lax.bitcast_convert_type(
            keys, jnp.float64 if keys.dtype == jnp.int64 else jnp.float32
        )
        _, indices = lax.top_k(float_keys, k)
        return jnp.sort(indices, axis=-1)
    # "auto" and "radix": exact threshold search on the keys (fedkernels/_radix.py).
    if x.ndim == 1:
        return _radix.top_k_indices_radix(x, magnitude_key, k, config=config)
    rows = x.reshape(-1, x.shape[-1])
    _, indices = _radix.top_k_rows((rows,), lambda a: a, magnitude_key, k, config=config)
    return indices.reshape(*x.shape[:-1], k)


def top_k_row_words(
    x: jax.Array, k: int, config: _radix.RadixConfig
) -> tuple[jax.Array, jax.Array]:
    """One row `x` `[d]` -> (bit-packed selection mask uint32 `[ceil(d/32)]`, indices `[k]`
    ascending): the set `top_k(x, k)` selects (method "auto"), as a mask and as indices.

    The mask lets callers zero the selected coordinates in one elementwise pass (error
    feedback) instead of scattering into `[d]`.
    """
    d = x.shape[-1]
    if d >= config.min_length:
        words = _radix.top_k_words(x, magnitude_key, k, config=config)
        return words, _radix._compact(words, k, config)
    indices = _top_k_indices(x, k, "lax", config).astype(jnp.int32)
    bits = lax.bitcast_convert_type(
        jnp.uint32(1) << (indices % _radix.WORD).astype(jnp.uint32), jnp.int32
    )
    words = jnp.zeros((-(-d // _radix.WORD),), jnp.int32).at[indices // _radix.WORD].add(bits)
    return lax.bitcast_convert_type(words, jnp.uint32), indices


def top_k_rows_words(
    rows: tuple[jax.Array, ...], combine: Any, k: int, config: _radix.RadixConfig
) -> tuple[jax.Array, jax.Array]:
    """`top_k_row_words` for each row of `combine(*rows)` (arrays `[C, d]`, `combine`
    elementwise): `(words uint32 [C, ceil(d/32)], indices int32 [C, k])`, the sum (or other
    combination) never stored. Radix select's passes run over the whole batch
    (`_radix.top_k_rows`)."""
    d = rows[0].shape[-1]
    if d >= config.min_length:
        return _radix.top_k_rows(rows, combine, magnitude_key, k, config=config)
    return _radix.map_rows(lambda *r: top_k_row_words(combine(*r), k, config), rows, config)


def top_k_rows_feedback(
    rows: tuple[jax.Array, ...], combine: Any, k: int, config: _radix.RadixConfig, *,
    radix: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Top-k with error feedback on each row of `acc = combine(*rows)` (arrays `[C, d]`),
    `acc` never stored: `(values [C, k], indices int32 [C, k] ascending, unsent [C, d])`,
    `unsent` being `acc` with the selected coordinates zeroed (one elementwise pass through
    the selection's bit-packed mask). The selection is `top_k_rows_words` (method by row
    length), or radix select whatever the length with `radix=True`."""
    if radix:
        words, indices = _radix.top_k_rows(rows, combine, magnitude_key, k, config=config)
    else:
        words, indices = top_k_rows_words(rows, combine, k, config)
    values = combine(*(jnp.take_along_axis(a, indices, axis=-1) for a in rows))
    unsent = jax.vmap(_radix.select_unset)(words, combine(*rows))
    return values, indices, unsent


def top_k(x: Any, k: int, *, method: str = "auto") -> tuple[jax.Array, jax.Array]:
    """The k entries of largest magnitude in each row of `x`.

    Global top-k sparsification of a flattened model update (Aji & Heafield 2017; Lin et al.
    2018, "Deep Gradient Compression").

    Args:
      x: float `[..., d]`; leading dimensions are batch (e.g. clients).
      k: static int in `[1, d]`.
      method: "auto" (default: "lax" for rows shorter than 2**16, "radix" from there on,
        the crossover of bench case `top_k` on XLA:CPU), "radix" (exact radix select: the k-th
        largest key is found by counting passes over bit-packed masks, then the selection is
        compacted; faster than `lax.top_k` on long rows, see `fedkernels/_radix.py`) or
        "lax" (`lax.top_k` on the magnitude keys, then a sort of the k indices). All methods
        return the same result.

    Returns:
      `(values, indices)`, both `[..., k]`. `indices` is int32, in ascending order within each
      row; `values = take_along_axis(x, indices)` are the signed entries. The selected set is
      the k largest |x|; ties at the k-th magnitude go to the lower index. Magnitudes compare
      by their float bits: NaN ranks above +Inf, -0.0 ties with 0.0.

    Raises:
      TypeError: `x` not floating, or `k` not a static int.
      ValueError: `k` outside `[1, d]`, `x` scalar, `d > 2**31 - 1` (int32 indices cannot
        address it: compress in segments), or unknown `method`.

    >>> import jax.numpy as jnp
    >>> top_k(jnp.array([0.5, -3.0, 1.0, 3.0, -0.1]), 2)
    (Array([-3.,  3.], dtype=float32), Array([1, 3], dtype=int32))
    """
    x, k = _check_top_k(x, k, method)
    if x.size == 0:  # no rows (d >= 1 is checked): empty [..., k] results
        shape = (*x.shape[:-1], k)
        return jnp.zeros(shape, x.dtype), jnp.zeros(shape, jnp.int32)
    indices = _top_k_indices(x, k, method, _radix.for_backend()).astype(jnp.int32)
    return jnp.take_along_axis(x, indices, axis=-1), indices


def top_k_with_feedback(
    x: Any, residual: Any, k: int, *, method: str = "auto"
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Top-k with error feedback: what is not sent this round is kept and added next round.

    Error feedback / memory for sparsified SGD (Stich, Cordonnier & Jaggi 2018; Karimireddy et
    al. 2019, "Error Feedback Fixes SignSGD").

    `acc = x + residual`; `values, indices = top_k(acc, k)`; `new_residual` is `acc` with the
    selected coordinates set to 0. Exact invariant (no rounding: equal as floats, bit for bit
    except that a -0.0 entry of `acc` comes back as +0.0):
    `scatter(values, indices, d) + new_residual == acc`.

    Args:
      x: float `[..., d]`, this round's update.
      residual: `[..., d]`, same shape and dtype as `x` (zeros in the first round).
      k: static int in `[1, d]`.
      method: as in `top_k`.

    Returns:
      `(values, indices, new_residual)`: `[..., k]`, int32 `[..., k]` (ascending), `[..., d]`.
      Zero rows give empty results.

    Non-finite entries follow the ranking of `top_k`: NaN first, then +-Inf, then finite
    values. A row of `acc` with at most k non-finite entries sends all of them, so none stays
    in `new_residual`. With more than k, k of them are sent (NaN before +-Inf, ties to the
    lower index) and the others stay in `new_residual` unchanged (the invariant above holds
    there too); they rank first again next round. The pipeline excludes clients with
    non-finite updates before this step.

    Raises:
      TypeError, ValueError: as `top_k`; `residual` of another shape or dtype.

    >>> import jax.numpy as jnp
    >>> v, i, r = top_k_with_feedback(jnp.array([1., 0., -2.]), jnp.array([0., 0.5, 0.]), 1)
    >>> v, i, r
    (Array([-2.], dtype=float32), Array([2], dtype=int32), Array([1. , 0.5, 0. ], dtype=float32))
    """
    x, k = _check_top_k(x, k, method)
    residual = _validate.as_array("residual", residual)
    _validate.same_shape("residual", residual, x.shape, "the shape of x")
    if residual.dtype != x.dtype:
        raise TypeError(f"residual must have the dtype of x ({x.dtype}), got {residual.dtype}")
    d = x.shape[-1]
    if x.size == 0:  # no rows: empty selections, and the (empty) accumulated residual
        values, indices = top_k(x, k, method=method)
        return values, indices, x + residual
    config = _radix.for_backend()
    if method == "lax" or (method == "auto" and d < config.min_length):
        acc = x + residual
        values, indices = top_k(acc, k, method="lax")
        # Mask by scatter-add of ones (not `.at[].set`), in the jax2tf-convertible set.
        sent = scatter(jnp.ones(indices.shape, jnp.int32), indices, d) > 0
        return values, indices, jnp.where(sent, jnp.zeros_like(acc), acc)

    # Radix select: the selection's bit-packed mask gives the residual in one elementwise
    # pass (no scatter into [d]); acc is recomputed in each pass, not stored.
    if x.ndim == 1:
        acc = x + residual
        words = _radix.top_k_words(acc, magnitude_key, k, config=config)
        indices = _radix._compact(words, k, config)
        return acc[indices], indices, _radix.select_unset(words, acc)
    lead = x.shape[:-1]
    rows = (x.reshape(-1, d), residual.reshape(-1, d))
    values, indices, new_residual = top_k_rows_feedback(rows, jnp.add, k, config, radix=True)
    return values.reshape(*lead, k), indices.reshape(*lead, k), new_residual.reshape(x.shape)
