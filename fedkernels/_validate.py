"""Argument checks shared by the kernels.

Everything here runs in plain Python before tracing: static arguments (k, bits, d) are checked
on their Python values, arrays on their shapes and dtypes, and array *contents* only when the
array is concrete (not a tracer), so the same function works eagerly and under `jax.jit`.
"""

from __future__ import annotations

import operator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

MAX_INDEXED_LENGTH = 2**31 - 1  # int32 indices address at most this many coordinates


def indexable_length(name: str, d: int, limit: int | None = None) -> None:
    """Rejects a length that int32 indices cannot address, with what to do instead."""
    limit = MAX_INDEXED_LENGTH if limit is None else limit
    if d > limit:
        raise ValueError(
            f"{name} has length d={d}, more than int32 indices can address ({limit}); "
            "compress the model in segments of at most that many coordinates (for example "
            "per leaf or per block of leaves) and keep each segment's indices as offsets"
        )


def static_int(name: str, value: Any, lo: int, hi: int | None = None) -> int:
    """Returns `value` as a Python int in [lo, hi], or raises naming `name`."""
    if isinstance(value, bool | np.bool_) or isinstance(value, jax.core.Tracer):
        raise TypeError(f"{name} must be a static Python int, got {value!r}")
    try:
        as_int = operator.index(value)
    except TypeError:
        raise TypeError(
            f"{name} must be a static Python int, got {value!r} of type {type(value).__name__}"
        ) from None
    if as_int < lo or (hi is not None and as_int > hi):
        bound = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be {bound}, got {as_int}")
    return as_int


def as_array(name: str, value: Any) -> jax.Array:
    """Converts array-likes with jnp.asarray; rejects what is not numeric with a named error.

    Without `jax_enable_x64`, JAX stores 64-bit numbers in 32 bits: an integer that would wrap
    (an id 2**32 + 1 read as 1) or a finite float beyond float32 (1e39 read as Inf, then
    dropped as non-finite) raises ValueError naming `name` instead."""
    if isinstance(value, jax.Array):
        return value
    if isinstance(value, np.ndarray | np.generic | float | list | tuple):
        try:
            host = np.asarray(value)
        except (TypeError, ValueError):
            host = None  # not one array: jnp.asarray says why below
        if host is not None:
            _check_narrowing(name, host)
    try:
        arr = jnp.asarray(value)
    except OverflowError as err:
        raise ValueError(f"{name} holds a value beyond JAX's integer range: {err}") from None
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name} must be an array, got {type(value).__name__}: {err}") from None
    return arr


def _check_narrowing(name: str, host: np.ndarray) -> None:
    """Raises if JAX would store `host` in a narrower dtype that changes a value."""
    stored = jax.dtypes.canonicalize_dtype(host.dtype)
    if stored.itemsize >= host.dtype.itemsize or host.size == 0:
        return
    if host.dtype.kind == "f":
        largest = np.finfo(stored).max
        # From max + half its ulp on, the cast rounds to Inf; below, to max at most.
        ulp = float(largest) - float(np.nextafter(largest, largest.dtype.type(0)))
        to_inf = float(largest) + ulp / 2
        with np.errstate(invalid="ignore"):
            outside = np.isfinite(host) & (np.abs(host) >= to_inf)
        kind, limits = "float", f"magnitudes up to {float(largest):.8g}"
    elif host.dtype.kind in "iu":
        info = np.iinfo(stored)
        outside = (host < info.min) | (host > info.max)
        kind, limits = "integer", f"[{info.min}, {info.max}]"
    else:
        return
    if np.any(outside):
        raise ValueError(
            f"{name} holds {host[outside].flat[0]}, beyond {stored} (the {kind} type JAX uses "
            f"unless jax_enable_x64 is on: {limits})"
        )


def floating(name: str, value: Any) -> jax.Array:
    """An array with a floating dtype, or TypeError naming `name` and the dtype."""
    arr = as_array(name, value)
    if not jnp.issubdtype(arr.dtype, jnp.floating):
        raise TypeError(f"{name} must have a floating dtype, got {arr.dtype}")
    return arr


def integer(name: str, value: Any) -> jax.Array:
    """An array with an integer dtype, or TypeError naming `name` and the dtype."""
    arr = as_array(name, value)
    if not jnp.issubdtype(arr.dtype, jnp.integer):
        raise TypeError(f"{name} must have an integer dtype, got {arr.dtype}")
    return arr


def min_ndim(name: str, arr: jax.Array, ndim: int, form: str) -> None:
    if arr.ndim < ndim:
        raise ValueError(f"{name} must be {form}, got shape {tuple(arr.shape)}")


def same_shape(name: str, arr: jax.Array, shape: tuple[int, ...], form: str) -> None:
    if tuple(arr.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} ({form}), got {tuple(arr.shape)}")


def is_concrete(arr: Any) -> bool:
    """True when the values are known now (not inside a jit/vmap trace)."""
    return not isinstance(arr, jax.core.Tracer)


def indices_in_range(name: str, indices: jax.Array, d: int) -> None:
    """Eager bounds check: out-of-range indices would be dropped silently by XLA."""
    if not is_concrete(indices) or indices.size == 0:
        return
    host = np.asarray(indices)
    lo, hi = int(host.min()), int(host.max())
    if lo < 0 or hi >= d:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{name} must be in [0, {d - 1}] for d={d}, got {bad}")


def in_range(indices: jax.Array, n: int) -> jax.Array:
    """Bool mask `0 <= indices < n`, compared in the indices' own integer dtype, so that no
    cast (a uint32 or int64 index to int32) can wrap an out-of-range index into range."""
    info = jnp.iinfo(indices.dtype)
    valid = indices >= 0 if info.min < 0 else jnp.ones(indices.shape, jnp.bool_)
    if n <= info.max:
        valid &= indices < jnp.asarray(n, indices.dtype)
    return valid


def weights_vector(name: str, weights: Any, num_clients: int) -> jax.Array:
    """Client weights: float[C], finite and >= 0. Checked when concrete (ValueError); under
    `jit`/`vmap` a negative, NaN or infinite weight counts as 0, so that client contributes
    nothing and the others' result stays as without it. 64-bit integer weights (example
    counts) beyond int32 are taken as floats rather than refused."""
    if isinstance(weights, np.ndarray | list | tuple) and not jax.config.jax_enable_x64:
        try:
            host = np.asarray(weights)
        except Exception:  # noqa: BLE001 (tracers, ragged lists: as_array says what they are)
            host = None
        if host is not None and host.dtype.kind in "iu" and host.dtype.itemsize == 8:
            weights = host.astype(np.float64)
    arr = as_array(name, weights)
    if not (jnp.issubdtype(arr.dtype, jnp.floating) or jnp.issubdtype(arr.dtype, jnp.integer)):
        raise TypeError(f"{name} must be numeric, got dtype {arr.dtype}")
    if arr.shape != (num_clients,):
        raise ValueError(
            f"{name} must have shape ({num_clients},), one weight per client, "
            f"got {tuple(arr.shape)}"
        )
    if is_concrete(arr) and arr.size:
        host = np.asarray(arr, dtype=np.float64)
        if not np.all(np.isfinite(host)):
            raise ValueError(f"{name} must be finite, got {host[~np.isfinite(host)][0]}")
        if np.any(host < 0):
            raise ValueError(f"{name} must be >= 0, got {host[host < 0][0]}")
        return arr
    valid = arr >= 0
    if jnp.issubdtype(arr.dtype, jnp.floating):
        valid &= jnp.isfinite(arr)
    return jnp.where(valid, arr, jnp.zeros_like(arr))
