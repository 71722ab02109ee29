"""The JAX side of the TFF adapters: small compositions of the fedkernels kernels.

Everything here is pure JAX (no TensorFlow), traced twice: by `jax2tf.convert` into the graphs
that run in TFF's worker, and by `jax.jit` in the numpy bridge. Both paths therefore compute
the same thing with the same kernels; the only math written here is glue (division with a 0
fallback, summary statistics, the client fingerprint).

Convertibility (jax2tf, `enable_xla=False`), with jax 0.4.30 / TF 2.14 in TFF 0.87's
worker: `masked_sum` (`lax.fori_loop`), `scatter`/`scatter_sum` (`mode="drop"` scatter-add),
`quantize`/`dequantize` (threefry, shifts, ors), `flatten`/`Unflatten`, `magnitude_key`,
`lax.top_k` convert and match JAX. `fedkernels.top_k` does not: it orders the indices with
`jnp.sort` ("Call to sort cannot be converted with enable_xla=False"). `jnp.cumsum` converts
(primitive `cumsum` -> `reduce_window` sum -> TF `AvgPool` times the window) but gives WRONG
values, silently: all zeros but the last for int32 (`[0 0 0 0 0 0 0 8]` for ones[8]), and wrong
float32 sums at length 200. `lax.associative_scan` is correct, so `ascending` below uses it.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

import fedkernels as fk
from fedkernels._pipeline.config import check_top_k_arguments
from fedkernels._pipeline.layout import top_k_size

_K_NAMES = ("fraction", "k")  # the adapters' names of the core's `fraction` and `count`


def enable_x64() -> contextlib.AbstractContextManager:
    """JAX's 64-bit mode while tracing, whatever the user's x64 flag says (`jax.enable_x64` on
    newer jax, `jax.experimental.enable_x64` on jax 0.4)."""
    enable = getattr(jax, "enable_x64", None)
    if enable is None:
        from jax.experimental import enable_x64 as enable
    return enable(True)


def x64_for(dtypes: Iterable[Any]) -> contextlib.AbstractContextManager:
    """`enable_x64()` when any of `dtypes` is float64, else nothing: a float64 leaf is
    computed and returned in float64."""
    if any(jnp.dtype(t) == jnp.float64 for t in dtypes):
        return enable_x64()
    return contextlib.nullcontext()


def check_k(k: Any, fraction: Any) -> None:
    """The k arguments of `top_k_factory`, `error_feedback_encoder` and the numpy bridge's
    `TopKProcess`, checked when they are passed (before d is known): exactly one of `k` (an
    int >= 1) and `fraction` (in (0, 1]), the core's `check_top_k_arguments`."""
    check_top_k_arguments(fraction, k, names=_K_NAMES)


def resolve_k(d: int, k: int | None, fraction: float | None) -> int:
    """The k that `k=` or `fraction=` (exactly one) means out of `d` coordinates: `k` in
    [1, d], or `ceil(fraction * d)` clipped to [1, d], the core's one rule (`top_k_size`, as
    `fedkernels.compressor`'s `top_k_fraction`), with messages naming `k` and `fraction`."""
    return top_k_size(d, fraction=fraction, count=k, names=_K_NAMES)


def top_k_unsorted(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """`fedkernels.top_k` without the ascending sort: the same selected set, any order.

    `x: float[..., d]` -> `(values, indices)`, `[..., k]`, int32, ordered by decreasing
    magnitude (`lax.top_k` on `fedkernels.magnitude_key`; ties go to the lower index, the same
    rule as `fedkernels.top_k`). Convertible by jax2tf without XLA ops, unlike the sort, for
    1-D `x` only: on `[C, d]` the `take_along_axis` is a gather with two collapsed dimensions,
    which jax2tf cannot convert without XLA (fine under `jax.jit`).
    """
    _, indices = lax.top_k(fk.magnitude_key(x), k)
    indices = indices.astype(jnp.int32)
    return jnp.take_along_axis(x, indices, axis=-1), indices


def ascending(indices: jax.Array, d: int) -> jax.Array:
    """Distinct indices `int32[k]` in `[0, d)` reordered ascending, without a sort.

    A selection mask by scatter-add, its running count (`lax.associative_scan`; `jnp.cumsum`
    converts to wrong values), then each selected coordinate scatter-added to its rank.
    O(d log d) work; convertible by jax2tf without XLA ops.
    """
    k = indices.shape[-1]
    selected = fk.scatter(jnp.ones(indices.shape, jnp.int32), indices, d)
    rank = lax.associative_scan(jnp.add, selected) - 1
    # Unselected coordinates go to the extra slot k, which is dropped.
    slot = jnp.where(selected > 0, rank, k)
    return fk.scatter(jnp.arange(d, dtype=jnp.int32), slot, k + 1)[:k]


def top_k_with_feedback(
    x: jax.Array, residual: jax.Array, k: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`fedkernels.top_k_with_feedback` for one client `[d]`, convertible by jax2tf.

    Same outputs bit for bit (ascending indices), with the sort replaced by `ascending`.
    """
    d = x.shape[-1]
    acc = x + residual
    _, unsorted = top_k_unsorted(acc, k)
    indices = ascending(unsorted, d)
    values = jnp.take(acc, indices)
    sent = fk.scatter(jnp.ones(indices.shape, jnp.int32), indices, d) > 0
    return values, indices, jnp.where(sent, jnp.zeros_like(acc), acc)


def sparse_sums(
    values: jax.Array, indices: jax.Array, d: int, weights: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`(numerator [d], denominator [d], contributions)` of clients' sparse updates
    (`values`/`indices` `[C, k]`, distinct indices per client, `weights` `[C]`, >= 0): the
    masked mean's rule, as `MaskedMeanFactory`: a value a client sends as exactly 0 (a zeroed
    client's, or a row with fewer than k nonzeros) or as NaN/Inf does not count for that
    client. Zeros become NaN, which `scatter_sum` leaves out of both sums."""
    sent = jnp.isfinite(values) & (values != 0)
    numerator, denominator = fk.scatter_sum(
        jnp.where(sent, values, jnp.nan), indices, d, weights
    )
    contributions = jnp.sum(sent & (weights[:, None] > 0), dtype=jnp.int32)
    return numerator, denominator, contributions


def divide_no_nan(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
    """`numerator / denominator`, 0 where the denominator is 0 (as `fedkernels.masked_mean`)."""
    denominator = denominator.astype(numerator.dtype)
    has = denominator > 0
    return jnp.where(has, numerator / jnp.where(has, denominator, 1), 0)


def client_masked_sum(value: Any, weight: jax.Array, per_coordinate: bool = False) -> tuple:
    """One client's share of the masked mean, leaf by leaf: `fedkernels.masked_sum` on `[1, ...]`.

    Returns `(numerators, denominators, contributions)` and, with `per_coordinate`, `counts`:
    `w * m * x` and `w * m` (pytrees like `value`, leaf dtype), the int32 number of coordinates
    this client contributes to, and the int32 indicator `m` per coordinate, where
    `m = (x != 0) & isfinite(x)` and nothing counts when `w == 0`.
    """
    leaves, treedef = jax.tree_util.tree_flatten(value)
    numerators, denominators, counts = [], [], []
    for x in leaves:
        w = jnp.reshape(weight, (1,)).astype(jnp.promote_types(x.dtype, jnp.float32))
        numerator, denominator = fk.masked_sum(x[None], w)
        numerators.append(numerator.astype(x.dtype))
        denominators.append(denominator.astype(x.dtype))
        counts.append((denominator > 0).astype(jnp.int32))
    contributions = sum((jnp.sum(c) for c in counts), jnp.int32(0))
    out = (
        jax.tree_util.tree_unflatten(treedef, numerators),
        jax.tree_util.tree_unflatten(treedef, denominators),
        contributions,
    )
    if per_coordinate:
        out += (jax.tree_util.tree_unflatten(treedef, counts),)
    return out


def contributor_summary(contributions: jax.Array, denominators: Any,
                        counts: Any = None) -> dict[str, jax.Array]:
    """Measurements of how many clients contributed per coordinate.

    `mean` (float32): the mean over coordinates of the number of positive-weight clients that
    contributed (total `contributions` / d); `uncovered` (int32): coordinates where none did
    (denominator 0). With per-coordinate `counts` (int32 pytree), also `min` and `max`.
    """
    leaves = [x.reshape(-1) for x in jax.tree_util.tree_leaves(denominators)]
    d = sum(x.size for x in leaves)
    summary = {
        "mean": contributions.astype(jnp.float32) / jnp.float32(max(d, 1)),
        "uncovered": sum((jnp.sum((x == 0).astype(jnp.int32)) for x in leaves), jnp.int32(0)),
    }
    if counts is not None:
        flat = [c.reshape(-1) for c in jax.tree_util.tree_leaves(counts)]
        if d:
            summary["min"] = jnp.min(jnp.concatenate(flat))
            summary["max"] = jnp.max(jnp.concatenate(flat))
        else:
            summary["min"] = summary["max"] = jnp.int32(0)
    return summary


def fingerprint(value: Any) -> jax.Array:
    """An int32 digest of a client's value: the wrapping sum of its float bits, per leaf mixed.

    TFF gives a client computation no client id, so per-client random streams are keyed by
    this digest (`fold_in(round_key, fingerprint(value))`). Integer addition is associative, so
    TFF's worker and XLA agree bit for bit. Clients with identical values get identical noise.
    """
    total = jnp.int32(0)
    for i, x in enumerate(jax.tree_util.tree_leaves(value)):
        bits = lax.bitcast_convert_type(x.astype(jnp.float32).reshape(-1), jnp.int32)
        total = total * jnp.int32(31) + jnp.sum(bits) + jnp.int32(i)
    return total


def round_key(seed: jax.Array, round_num: jax.Array) -> jax.Array:
    """The round's PRNG key from the state: `fold_in(PRNGKey(seed), round_num)`."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), round_num)


def client_quantize(
    value: Any, seed: jax.Array, round_num: jax.Array, bits: int, quantized: tuple[bool, ...],
    tf_graph: bool = True,
) -> list[Any]:
    """Encodes one client's value: leaves flagged in `quantized` with `fedkernels.quantize`.

    Leaf i uses key `fold_in(fold_in(round_key, fingerprint(value)), i)`. Returns a list, one
    entry per leaf: `(packed uint32[w], minimum, maximum)` for quantized leaves, else the leaf.
    `tf_graph`: the formulation for TensorFlow graphs (TFF's worker; the same codes), False
    for XLA (the numpy bridge).
    """
    key = jax.random.fold_in(round_key(seed, round_num), fingerprint(value))
    encoded = []
    for i, (x, flag) in enumerate(zip(jax.tree_util.tree_leaves(value), quantized, strict=True)):
        if flag:
            q = fk._quantize._quantize(
                x.reshape(-1), jax.random.fold_in(key, i), bits, "hash", tf_graph=tf_graph
            )
            encoded.append((q.packed, q.minimum, q.maximum))
        else:
            encoded.append(x)
    return encoded


def dequantize_staged(q: fk.Quantized) -> jax.Array:
    """`fedkernels.dequantize(q)` (the same values bit for bit when both are staged in TFF's
    worker; within float32 rounding of the XLA-compiled decode), in the form jax2tf converts to
    the faster TensorFlow graph: 8- and 16-bit codes are read by a bitcast of the packed words
    to uint8 / uint16 (byte or half-word p of word w is plane p's code on a little-endian
    host, see `fedkernels.Quantized`) and one transpose to planes, where a broadcast shift
    runs slower in TensorFlow (under XLA it is the faster of the two, so the jitted kernels
    keep it)."""
    if q.bits not in (8, 16) or sys.byteorder != "little":
        return fk.dequantize(q)
    small = jnp.uint8 if q.bits == 8 else jnp.uint16
    codes = lax.bitcast_convert_type(q.packed, small)  # [..., W, P]
    codes = jnp.swapaxes(codes, -1, -2).reshape(*q.packed.shape[:-1], -1)[..., : q.length]
    return fk._quantize._decode(codes.astype(jnp.float32), q)


def decode(encoded: list[Any], shapes: list[tuple[int, ...]], dtypes: list[Any], bits: int) -> list:
    """Inverse of `client_quantize` per leaf (`fedkernels.dequantize`, cast to the leaf dtype)."""
    out = []
    for item, shape, dtype in zip(encoded, shapes, dtypes, strict=True):
        if isinstance(item, tuple | list):
            n = 1
            for s in shape:
                n *= s
            q = fk.Quantized(item[0], item[1], item[2], bits, n)
            out.append(fk.dequantize(q).reshape(shape).astype(dtype))
        else:
            out.append(item)
    return out
