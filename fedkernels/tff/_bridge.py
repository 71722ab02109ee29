"""The numpy bridge: AggregationProcess-shaped objects that run the JAX kernels in-process.

For a TFF user's Python driver holding client updates as numpy arrays (or lists / dicts of
them), these objects do one aggregation round with `jax.jit`-compiled fedkernels kernels,
on a GPU when JAX has one, without TensorFlow. They follow `tff.templates.AggregationProcess`:
`initialize()` returns the state, `next(state, client_values[, weights])` returns
`MeasuredOutput(state, result, measurements)`, and the result equals the staged factory's
(`fedkernels.tff.MaskedMeanFactory()` etc.) up to float summation order: the same kernels,
the same client keys for quantization. Client values are a list with one pytree per client.

This module imports only jax and numpy.
"""

from __future__ import annotations

import collections
import collections.abc
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import fedkernels as fk
from fedkernels.tff import _kernels as kernels


class MeasuredOutput(NamedTuple):
    """As `tff.templates.MeasuredProcessOutput`: the new state, the result, measurements."""

    state: Any
    result: Any
    measurements: Any


def _check_client_values(client_values: Any) -> None:
    if not isinstance(client_values, list | tuple) or not client_values:
        raise ValueError(
            "client_values must be a non-empty list with one value (pytree) per client, "
            f"got {type(client_values).__name__}"
        )


def _stack(client_values: Any) -> Any:
    _check_client_values(client_values)
    return jax.tree_util.tree_map(lambda *xs: np.stack([np.asarray(x) for x in xs]),
                                  *client_values)


def _dtypes(tree: Any) -> list:
    """The dtypes of a pytree's leaves (a float64 leaf runs the round in JAX's x64 mode,
    `kernels.x64_for`)."""
    return [np.asarray(x).dtype for x in jax.tree_util.tree_leaves(tree)]


def _weights(weights: Any, num_clients: int) -> np.ndarray:
    """The client weights as float32 `[C]`; raises on a negative, NaN or infinite weight (the
    staged factories leave such a client out and count it in `invalid_weights`)."""
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.shape != (num_clients,):
        raise ValueError(f"weights must have one entry per client ({num_clients}), got {w.shape}")
    bad = ~np.isfinite(w) | (w < 0) | (np.abs(w) > np.finfo(np.float32).max)
    if bad.any():
        raise ValueError(
            "weights must be finite and >= 0 (within float32 range), got "
            f"{w[bad].tolist()} for clients {np.flatnonzero(bad).tolist()}"
        )
    return w.astype(np.float32)


def _to_numpy(tree: Any) -> Any:
    return jax.tree_util.tree_map(np.asarray, tree)


def _summary(stats: dict) -> collections.OrderedDict:
    """`contributors` as numpy values in the staged factory's order (mean, uncovered, then min
    and max when counted); `jax.jit` returns a dict's keys sorted."""
    names = [n for n in ("mean", "uncovered", "min", "max") if n in stats]
    return collections.OrderedDict((n, np.asarray(stats[n])) for n in names)


@functools.partial(jax.jit, static_argnames=("per_coordinate",))
def _masked_mean_round(stacked: Any, weights: jax.Array, per_coordinate: bool) -> tuple:
    leaves, treedef = jax.tree_util.tree_flatten(stacked)
    means, denominators, counts = [], [], []
    for x in leaves:
        w = weights.astype(jnp.promote_types(x.dtype, jnp.float32))
        numerator, denominator = fk.masked_sum(x, w)
        _, count = fk.masked_sum(x, (w > 0).astype(w.dtype))
        means.append(kernels.divide_no_nan(numerator, denominator).astype(x.dtype))
        denominators.append(denominator)
        counts.append(count.astype(jnp.int32))
    contributions = sum((jnp.sum(c) for c in counts), jnp.int32(0))
    summary = kernels.contributor_summary(
        contributions, denominators, counts if per_coordinate else None
    )
    return jax.tree_util.tree_unflatten(treedef, means), summary


class MaskedMeanProcess:
    """Numpy bridge of `MaskedMeanFactory()`: per-coordinate weighted mean over contributors.

    `no_nan_division` as in the factory: with `False` (the default) the mean is NaN when the
    weights sum to 0. Weights must be finite and >= 0 (ValueError naming `weights`).
    """

    weighted = True

    def __init__(self, count_contributors: bool = False, no_nan_division: bool = False):
        self.count_contributors = bool(count_contributors)
        self.no_nan_division = bool(no_nan_division)

    def initialize(self) -> Any:
        return collections.OrderedDict(value_sum_process=(), weight_sum_process=())

    def next(self, state: Any, client_values: Any, weights: Any) -> MeasuredOutput:
        stacked = _stack(client_values)
        num_clients = len(client_values)
        w = _weights(weights, num_clients)
        with kernels.x64_for(_dtypes(stacked)):
            mean, stats = _masked_mean_round(stacked, w, self.count_contributors)
        mean = _to_numpy(mean)
        if not self.no_nan_division and not np.sum(w, dtype=np.float64) > 0:
            # as MeanFactory's division by a zero weight sum
            mean = jax.tree_util.tree_map(lambda m: np.full_like(m, np.nan), mean)
        measurements = collections.OrderedDict(
            mean_value=(), mean_weight=(), num_clients=np.int32(num_clients),
            invalid_weights=np.int32(0), contributors=_summary(stats),
        )
        return MeasuredOutput(state, mean, measurements)


@functools.partial(jax.jit, static_argnames=("k",))
def _top_k_round(stacked: Any, weights: jax.Array, k: int) -> tuple[Any, dict]:
    flat, unflatten = fk.flatten(stacked, batch_ndim=1)
    d = flat.shape[-1]
    # fedkernels.top_k itself (its sort is fine outside jax2tf): the same selected set as the
    # staged factory's convertible variant, and whatever speed-ups the core kernel gets.
    values, indices = fk.top_k(flat, k)
    acc_dtype = jnp.promote_types(flat.dtype, jnp.float32)
    w = weights.astype(acc_dtype)
    total, weight_sum, contributions = kernels.sparse_sums(values, indices, d, w)
    mean = kernels.divide_no_nan(total, weight_sum).astype(flat.dtype)
    return unflatten(mean), kernels.contributor_summary(contributions, weight_sum)


class TopKProcess:
    """Numpy bridge of `top_k_factory(fraction=..., k=...)` (without inner)."""

    weighted = True

    def __init__(self, fraction: float | None = None, k: int | None = None):
        kernels.check_k(k, fraction)
        self.fraction, self.k = fraction, k

    def resolve_k(self, d: int) -> int:
        return kernels.resolve_k(d, self.k, self.fraction)

    def initialize(self) -> Any:
        return ()

    def next(self, state: Any, client_values: Any, weights: Any) -> MeasuredOutput:
        stacked = _stack(client_values)
        leaves = jax.tree_util.tree_leaves(stacked)
        d = sum(math.prod(x.shape[1:]) for x in leaves)
        flat_dtype = np.dtype(jnp.result_type(*leaves)) if leaves else np.dtype(np.float32)
        k = self.resolve_k(d)
        with kernels.x64_for(_dtypes(stacked)):
            mean, stats = _top_k_round(stacked, _weights(weights, len(client_values)), k)
        bytes_sent = k * (flat_dtype.itemsize + 4) + 4
        dense_bytes = d * flat_dtype.itemsize
        measurements = collections.OrderedDict(
            bytes_sent=np.int64(bytes_sent),
            dense_bytes=np.int64(dense_bytes),
            compression_ratio=np.float32(dense_bytes / bytes_sent),
            contributors=_summary(stats),
        )
        return MeasuredOutput(state, _to_numpy(mean), measurements)


@functools.partial(jax.jit, static_argnames=("bits", "flags"))
def _quantize_round(stacked: Any, seed: jax.Array, round_num: jax.Array, bits: int,
                    flags: tuple[bool, ...]) -> Any:
    leaves, treedef = jax.tree_util.tree_flatten(stacked)
    shapes = [x.shape[1:] for x in leaves]
    dtypes = [x.dtype for x in leaves]
    encode = lambda value: kernels.client_quantize(
        value, seed, round_num, bits, flags, tf_graph=False
    )
    decode = lambda encoded: kernels.decode(encoded, shapes, dtypes, bits)
    client_tree = jax.tree_util.tree_unflatten(treedef, leaves)
    decoded = jax.vmap(lambda v: decode(encode(v)))(client_tree)
    return jax.tree_util.tree_unflatten(treedef, [jnp.sum(x, axis=0) for x in decoded])


class QuantizeSumProcess:
    """Numpy bridge of `quantize_above_threshold(bits, threshold, seed)`: an unweighted sum."""

    weighted = False

    def __init__(self, quantization_bits: int = 8, threshold: int = 20000, seed: int = 0):
        self.bits = fk._validate.static_int("quantization_bits", quantization_bits, 1, 16)
        self.threshold = fk._validate.static_int("threshold", threshold, 0)
        self.seed = fk._validate.static_int("seed", seed, -(2**31), 2**31 - 1)

    def initialize(self) -> Any:
        return collections.OrderedDict(seed=np.int32(self.seed), round=np.int32(0))

    def next(self, state: Any, client_values: Any) -> MeasuredOutput:
        stacked = _stack(client_values)
        leaves = jax.tree_util.tree_leaves(stacked)
        sizes = [math.prod(x.shape[1:]) for x in leaves]
        flags = tuple(n > self.threshold for n in sizes)
        with kernels.x64_for(_dtypes(stacked)):
            total = _quantize_round(
                stacked, jnp.int32(state["seed"]), jnp.int32(state["round"]), self.bits, flags
            )
        bytes_sent = sum(
            (fk._quantize.packed_words(n, self.bits) * 4 + 8) if flag else n * x.dtype.itemsize
            for n, x, flag in zip(sizes, leaves, flags, strict=True)
        )
        dense_bytes = sum(n * x.dtype.itemsize for n, x in zip(sizes, leaves, strict=True))
        new_state = collections.OrderedDict(
            seed=np.int32(state["seed"]), round=np.int32(state["round"] + 1)
        )
        measurements = collections.OrderedDict(
            bytes_sent=np.int64(bytes_sent),
            compression_ratio=np.float32(dense_bytes / bytes_sent),
        )
        return MeasuredOutput(new_state, _to_numpy(total), measurements)


class ConcatProcess:
    """Numpy bridge of `concat_factory(inner)`: flatten each client's value, run `inner`."""

    def __init__(self, inner: Any):
        self.inner = inner
        self.weighted = inner.weighted

    def initialize(self) -> Any:
        return self.inner.initialize()

    def next(self, state: Any, client_values: Any, *weights: Any) -> MeasuredOutput:
        _check_client_values(client_values)
        # `concat_factory`'s layout: leaves in `tf.nest` order (every mapping's keys sorted),
        # raveled, one dtype for all.
        leaves, treedef = jax.tree_util.tree_flatten(_keys_sorted(client_values[0]))
        leaves = [np.asarray(x) for x in leaves]
        if len({x.dtype for x in leaves}) > 1:
            raise TypeError("Component dtypes of `value_type` should have the same dtype, got "
                            f"{[str(x.dtype) for x in leaves]}")
        shapes = [x.shape for x in leaves]
        flats = [
            np.concatenate([np.asarray(x).reshape(-1) for x in
                            jax.tree_util.tree_leaves(_keys_sorted(value))] or [np.zeros(0)])
            for value in client_values
        ]
        output = self.inner.next(state, flats, *weights)
        flat = np.asarray(output.result)
        pieces = np.split(flat, np.cumsum([math.prod(s) for s in shapes])[:-1]) if shapes else []
        restored = jax.tree_util.tree_unflatten(
            treedef, [p.reshape(s) for p, s in zip(pieces, shapes, strict=True)])
        result = _restore_order(client_values[0], restored)
        return MeasuredOutput(output.state, result, output.measurements)


def _keys_sorted(tree: Any) -> Any:
    """`tree` with every mapping a plain dict, so `jax.tree_util` orders leaves as `tf.nest`
    does (keys sorted; it keeps an OrderedDict's insertion order)."""
    if isinstance(tree, collections.abc.Mapping):
        return {k: _keys_sorted(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        items = [_keys_sorted(v) for v in tree]
        return type(tree)(*items) if hasattr(tree, "_fields") else type(tree)(items)
    return tree


def _restore_order(template: Any, tree: Any) -> Any:
    """The inverse of `_keys_sorted`: `tree`'s leaves in `template`'s structure and types."""
    if isinstance(template, collections.abc.Mapping):
        return type(template)((k, _restore_order(v, tree[k])) for k, v in template.items())
    if isinstance(template, list | tuple):
        items = [_restore_order(t, v) for t, v in zip(template, tree, strict=True)]
        return type(template)(*items) if hasattr(template, "_fields") else type(template)(items)
    return tree


def numpy_process(factory: Any) -> Any:
    """The numpy bridge for a fedkernels.tff factory: an object with AggregationProcess's
    `initialize()` / `next(state, client_values, weights)` that runs the JAX kernels directly
    on the values held in Python. Raises NotImplementedError for compositions it cannot run
    (TFF's own factories, clipping, zeroing)."""
    make = getattr(factory, "numpy_process", None)
    if make is None:
        raise NotImplementedError(
            f"no numpy bridge for {type(factory).__name__}: only fedkernels.tff factories "
            "(MaskedMeanFactory, concat_factory, top_k_factory, quantize_above_threshold)"
        )
    return make()
