"""The compression pipeline: a whole round (every client's encoding, the server's decoding) jitted.

Client side, batched over a cohort `[C, ...]`: flatten, add the error-feedback residual, select
(top-k or random-k, global over the flattened large leaves), quantize the kept values, bit-pack
values and indices. Server side: unpack, dequantize, `scatter_sum`, mean, unflatten. Leaves with
at most `dense_threshold` elements (TFF's `quantize_above_threshold` rule) are sent dense, in
float32.

The math lives in module-level helpers working on one chunk of clients and returning partial
sums (`AggregateSums`), which add up across chunks (`lax.scan`) and across devices (`psum` in
`shard_map`), so chunked, sharded and plain rounds compute the same thing.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fedkernels import _validate
from fedkernels._flatten import Unflatten, flatten
from fedkernels._masked import masked_sum
from fedkernels._quantize import (
    MAX_BITS,
    Quantized,
    code_row_sum,
    decodes_finite,
    dequantize,
    pack_bits,
    quantize,
    quantize_rows,
    unpack_bits,
    weighted_code_sum,
)
from fedkernels._scatter import scatter, scatter_sum
from fedkernels._topk import top_k as _top_k
from fedkernels._topk import top_k_rows_words

AGGREGATIONS = ("mean", "masked_mean")
ON_NONFINITE = ("exclude", "raise")
FLOAT32_BYTES = 4


# --------------------------------------------------------------------------------------------
# Static configuration and layout
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CompressorConfig:
    """Validated, hashable compressor settings (see `compressor` for their meaning)."""

    top_k: float | int | None = None
    error_feedback: bool = False
    bits: int | None = None
    dense_threshold: int = 20000
    random_k: bool = False
    shared_range: tuple[float, float] | None = None
    aggregation: str = "mean"
    on_nonfinite: str = "exclude"


@dataclasses.dataclass(frozen=True)
class Layout:
    """Static sizes of the flattened model and of one client's payload.

    The flat vector (leaves concatenated in `jax.tree_util` order) splits into a *sparse*
    segment (leaves with more than `dense_threshold` elements: selected, quantized, with
    residual) and a *dense* segment (the small leaves, sent as float32).
    """

    unflatten: Unflatten
    leaf_slices: tuple[tuple[int, int, bool], ...]  # (start, stop, is_sparse) per leaf
    size: int  # d, all parameters
    sparse_size: int  # d_s, parameters in large leaves (the residual's length)
    dense_size: int  # d_d = d - d_s
    k: int  # coordinates sent from the sparse segment (d_s when nothing is selected)
    index_bits: int  # bits per packed index (0 when no selection)
    payload_bytes: int  # bytes one client uploads (filled in by `compressor`)

    @property
    def dense_bytes(self) -> int:
        """Bytes of the uncompressed float32 update, the compression ratio's baseline."""
        return self.size * FLOAT32_BYTES

    @property
    def compression_ratio(self) -> float:
        return self.dense_bytes / self.payload_bytes if self.payload_bytes else float("inf")


class Payload(NamedTuple):
    """What a cohort uploads: one row per client. Unused parts are zero-width arrays.

    A client's upload is the concatenation of its rows; `Layout.payload_bytes` is their size.
    """

    indices: jax.Array  # shape=[C, ceil(k/32)*index_bits], dtype=uint32: bit-packed indices
    values: jax.Array  # shape=[C, k], dtype=float32: unquantized values (bits=None), else [C, 0]
    codes: jax.Array  # shape=[C, ceil(k/32)*bits], dtype=uint32: bit-packed quantization codes
    minimum: jax.Array  # shape=[C] or [C, 0], dtype=float32: per-client range (not shared mode)
    maximum: jax.Array  # shape=[C] or [C, 0], dtype=float32
    dense: jax.Array  # shape=[C, d_d], dtype=float32: the small leaves, sent as is


class AggregateSums(NamedTuple):
    """Server partial sums over some clients; they add up across chunks and devices."""

    sparse_total: jax.Array  # shape=[d_s], dtype=float32: sum_c w_c * decoded_c
    sparse_weight: jax.Array  # shape=[d_s], dtype=float32: sum of w_c over clients that sent j
    contributors: jax.Array  # shape=[d_s], dtype=int32: clients that sent coordinate j
    code_sum: jax.Array  # shape=[d_s] (shared range) or [0], dtype=int32: summed integer codes
    dense_total: jax.Array  # shape=[d_d], dtype=float32: sum_c w_c * dense_c
    weight_sum: jax.Array  # shape=[], dtype=float32: sum of w_c over included clients
    num_included: jax.Array  # shape=[], dtype=int32


class ClientReport(NamedTuple):
    """Per-client results of encoding."""

    included: jax.Array  # shape=[C], dtype=bool: False for excluded (non-finite) or padding
    residual_norm: jax.Array  # shape=[C], dtype=float32: L2 norm of the new residual


class RoundMetrics(NamedTuple):
    """Measurements of one round (arrays are device values; `as_dict` gives Python numbers)."""

    num_clients: int  # C, the cohort size
    payload_bytes: int  # bytes one included client uploads
    dense_bytes: int  # bytes of one uncompressed float32 update
    uploaded_bytes: jax.Array  # shape=[], dtype=int64 or int32: payload_bytes * included
    bytes_per_client: jax.Array  # shape=[C], dtype=int32: payload_bytes, 0 for excluded
    num_excluded: jax.Array  # shape=[], dtype=int32: clients left out (non-finite update)
    excluded: jax.Array  # shape=[C], dtype=bool
    residual_norm: jax.Array  # shape=[C], dtype=float32
    contributors_touched: jax.Array  # shape=[], dtype=int32: sparse coordinates sent by >= 1
    contributors_max: jax.Array  # shape=[], dtype=int32: most clients on one coordinate
    contributors_mean: jax.Array  # shape=[], dtype=float32: mean over touched coordinates
    residual_norm_mean: jax.Array  # shape=[], dtype=float32: over included clients (0 if none)
    residual_norm_max: jax.Array  # shape=[], dtype=float32: over included clients (0 if none)

    @property
    def compression_ratio(self) -> float:
        return self.dense_bytes / self.payload_bytes if self.payload_bytes else float("inf")

    def as_dict(self) -> dict[str, Any]:
        """Plain Python numbers, for logs and JSON. Reads only the scalar fields, which every
        process holds whole, so it also works when the cohort spans several processes
        (`jax.distributed`); the per-client fields are then sharded like the cohort."""
        return {
            "num_clients": self.num_clients,
            "num_excluded": int(self.num_excluded),
            "payload_bytes_per_client": self.payload_bytes,
            "uploaded_bytes": int(self.uploaded_bytes),
            "dense_bytes_per_client": self.dense_bytes,
            "compression_ratio": self.compression_ratio,
            "residual_norm_mean": float(self.residual_norm_mean),
            "residual_norm_max": float(self.residual_norm_max),
            "contributors_touched": int(self.contributors_touched),
            "contributors_max": int(self.contributors_max),
            "contributors_mean": float(self.contributors_mean),
        }


class RoundResult(NamedTuple):
    mean: Any  # the server's aggregate, a pytree shaped like one client's update
    residuals: jax.Array | None  # shape=[C, d_s], dtype=float32: new residuals (EF), else None
    metrics: RoundMetrics


class Compressor(NamedTuple):
    """What `compressor` returns: static layout plus pure functions (see `compressor`)."""

    config: CompressorConfig
    layout: Layout
    encode: Callable[..., tuple[Payload, jax.Array | None, ClientReport]]
    decode: Callable[..., Any]
    aggregate: Callable[..., AggregateSums]
    finalize: Callable[[AggregateSums], Any]
    round: Callable[..., RoundResult]


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _check_config(
    top_k: Any,
    error_feedback: Any,
    bits: Any,
    dense_threshold: Any,
    random_k: Any,
    shared_range: Any,
    aggregation: Any,
    on_nonfinite: Any,
) -> CompressorConfig:
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, numbers.Real):
            raise TypeError(
                f"top_k must be a fraction in (0, 1], a count >= 1 or None, got {top_k!r}"
            )
        if isinstance(top_k, numbers.Integral):
            if top_k < 1:
                raise ValueError(f"top_k must be a count >= 1 or a fraction in (0, 1), got {top_k}")
            top_k = int(top_k)
        else:
            top_k = float(top_k)
            if not (0.0 < top_k <= 1.0):
                raise ValueError(f"top_k as a fraction must be in (0, 1], got {top_k}")
    for name, flag in (("error_feedback", error_feedback), ("random_k", random_k)):
        if not isinstance(flag, bool | np.bool_):
            raise TypeError(f"{name} must be a bool, got {flag!r}")
    if bits is not None:
        bits = _validate.static_int("bits", bits, 1, MAX_BITS)
    dense_threshold = _validate.static_int("dense_threshold", dense_threshold, 0)
    if random_k and top_k is None:
        raise ValueError("random_k=True needs top_k (how many coordinates to draw), got top_k=None")
    if shared_range is not None:
        if bits is None:
            raise ValueError(f"shared_range={shared_range!r} needs bits, got bits=None")
        try:
            lo, hi = (float(v) for v in shared_range)
        except (TypeError, ValueError):
            raise ValueError(
                f"shared_range must be a pair (lo, hi), got {shared_range!r}"
            ) from None
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ValueError(f"shared_range must be finite with lo < hi, got {shared_range!r}")
        shared_range = (lo, hi)
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    if on_nonfinite not in ON_NONFINITE:
        raise ValueError(f"on_nonfinite must be one of {ON_NONFINITE}, got {on_nonfinite!r}")
    return CompressorConfig(
        top_k, bool(error_feedback), bits, dense_threshold, bool(random_k), shared_range,
        aggregation, on_nonfinite,
    )


def _make_layout(template: Any, config: CompressorConfig) -> Layout:
    leaves, treedef = jax.tree_util.tree_flatten(template)
    shapes, dtypes = [], []
    for i, leaf in enumerate(leaves):
        if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
            raise TypeError(
                f"leaf {i} of template must be an array or jax.ShapeDtypeStruct, "
                f"got {type(leaf).__name__}"
            )
        shapes.append(tuple(int(n) for n in leaf.shape))
        dtypes.append(np.dtype(leaf.dtype))
    unflatten = Unflatten(treedef, tuple(shapes), tuple(dtypes), np.dtype(np.float32))
    slices, start, sparse_size = [], 0, 0
    for shape in shapes:
        n = math.prod(shape)
        is_sparse = n > config.dense_threshold
        slices.append((start, start + n, is_sparse))
        sparse_size += n if is_sparse else 0
        start += n
    size = start
    if config.top_k is None or sparse_size == 0:
        k, index_bits = sparse_size, 0
    else:
        if isinstance(config.top_k, int):
            if config.top_k > sparse_size:
                raise ValueError(
                    f"top_k must be in [1, {sparse_size}] (elements in leaves above "
                    f"dense_threshold={config.dense_threshold}), got {config.top_k}"
                )
            k = config.top_k
        else:
            k = max(1, int(round(config.top_k * sparse_size)))
        index_bits = max(1, math.ceil(math.log2(sparse_size))) if k < sparse_size else 0
    return Layout(unflatten, tuple(slices), size, sparse_size, size - sparse_size, k, index_bits, 0)


def _split(layout: Layout, flat: jax.Array) -> tuple[jax.Array, jax.Array]:
    """flat [C, d] -> (sparse [C, d_s], dense [C, d_d]) by static slices."""
    sparse = [flat[:, a:b] for a, b, s in layout.leaf_slices if s and b > a]
    dense = [flat[:, a:b] for a, b, s in layout.leaf_slices if not s and b > a]
    c = flat.shape[0]

    def cat(parts):
        if not parts:
            return jnp.zeros((c, 0), jnp.float32)
        return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)

    return cat(sparse), cat(dense)


def _join(layout: Layout, sparse: jax.Array, dense: jax.Array) -> jax.Array:
    """Inverse of `_split` for one row: ([d_s], [d_d]) -> [d] in leaf order."""
    parts, s_off, d_off = [], 0, 0
    for a, b, is_sparse in layout.leaf_slices:
        n = b - a
        if is_sparse:
            parts.append(sparse[s_off : s_off + n])
            s_off += n
        else:
            parts.append(dense[d_off : d_off + n])
            d_off += n
    if not parts:
        return jnp.zeros((0,), jnp.float32)
    return jnp.concatenate(parts)


# --------------------------------------------------------------------------------------------
# Client side
# --------------------------------------------------------------------------------------------


# Column block and blocks per loop step of `_row_norms`. Measured, X float32 [100, 1e6]
# (fastest of 9): jax 0.4.30 68 ms for jnp.sum(X * X, 1) (its reduce-window rewrite writes
# X * X out first) against 19 ms; jax 0.10.2 32 against 19 ms. 1024 x 4, 4096 x 2 and
# 8192 x 1 were slower (21 to 37 ms).
_NORM_BLOCK = 2048
_NORM_BLOCKS_PER_STEP = 8


def _row_norms(x: jax.Array) -> jax.Array:
    """Euclidean norm of each row of float32 `[C, d]`, in one read of `x`: a loop over column
    blocks adds `block**2` into a `[C, _NORM_BLOCK]` accumulator (cache-resident), summed at
    the end. XLA:CPU's own row reduction is slower for long rows (see above)."""
    c, d = x.shape
    span = _NORM_BLOCK * _NORM_BLOCKS_PER_STEP
    steps = d // span
    if steps == 0:
        return jnp.sqrt(jnp.sum(x * x, axis=1))

    def step(i, acc):
        for j in range(_NORM_BLOCKS_PER_STEP):
            block = lax.dynamic_slice_in_dim(x, (i * _NORM_BLOCKS_PER_STEP + j) * _NORM_BLOCK,
                                             _NORM_BLOCK, axis=1)
            acc = acc + block * block
        return acc

    acc = lax.fori_loop(0, steps, step, jnp.zeros((c, _NORM_BLOCK), jnp.float32))
    tail = x[:, steps * span :]
    return jnp.sqrt(jnp.sum(acc, axis=1) + jnp.sum(tail * tail, axis=1))


def _client_keys(key: jax.Array, client_ids: jax.Array, stream: int) -> jax.Array:
    # Per-client randomness from the client's id, not its position in the cohort, so chunking,
    # sharding and cohort order do not change the draws.
    return jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(key, i), stream))(client_ids)


def _quantize_rows(
    config: CompressorConfig, values: jax.Array, keys: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """values [C, k] -> (codes packed [C, w], minimum, maximum, decoded [C, k])."""
    bits = config.bits
    if config.shared_range is None:
        q = jax.vmap(lambda v, kk: quantize(v, kk, bits))(values, keys)
        return q.packed, q.minimum, q.maximum, dequantize(q)
    lo, hi = config.shared_range
    c, k = values.shape
    # `quantize` takes the range from the data; two extra entries lo and hi (after clipping)
    # pin every client's range to [lo, hi]. They quantize exactly to codes 0 and 2**bits - 1
    # and are dropped before packing, so the payload holds only the k real codes.
    clipped = jnp.clip(values, lo, hi)
    pinned = jnp.concatenate(
        [clipped, jnp.full((c, 1), lo, jnp.float32), jnp.full((c, 1), hi, jnp.float32)], axis=1
    )
    q = jax.vmap(lambda v, kk: quantize(v, kk, bits))(pinned, keys)
    codes = unpack_bits(q.packed, bits, k + 2)[:, :k]
    levels = float((1 << bits) - 1)
    decoded = codes.astype(jnp.float32) * jnp.float32((hi - lo) / levels) + jnp.float32(lo)
    empty = jnp.zeros((c, 0), jnp.float32)
    return pack_bits(codes, bits), empty, empty, decoded


def _quantize_values(
    config: CompressorConfig, values: jax.Array, client_ids: jax.Array, key: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """values [C, k] -> (packed codes, minimum, maximum, decoded); a pass-through without bits."""
    c = values.shape[0]
    if config.bits is None:
        empty = jnp.zeros((c, 0), jnp.float32)
        return jnp.zeros((c, 0), jnp.uint32), empty, empty, values
    return _quantize_rows(config, values, _client_keys(key, client_ids, 1))


def _payload(
    config: CompressorConfig,
    layout: Layout,
    included: jax.Array,
    finite: jax.Array,
    indices: jax.Array | None,
    values: jax.Array,
    quantized: tuple[jax.Array, jax.Array, jax.Array],
    dense: jax.Array,
) -> Payload:
    """What the clients upload; excluded clients' rows are zeros (and are not counted)."""
    c = values.shape[0]

    def keep(a):
        return jnp.where(included.reshape((c,) + (1,) * (a.ndim - 1)), a, jnp.zeros_like(a))

    codes, minimum, maximum = quantized
    packed_indices = (
        jnp.zeros((c, 0), jnp.uint32)
        if indices is None
        else pack_bits(indices.astype(jnp.uint32), layout.index_bits)
    )
    return Payload(
        indices=keep(packed_indices),
        values=keep(values) if config.bits is None else jnp.zeros((c, 0), jnp.float32),
        codes=keep(codes),
        minimum=keep(minimum),
        maximum=keep(maximum),
        dense=keep(jnp.where(finite[:, None], dense, 0.0)),
    )


def _encode_flat(
    config: CompressorConfig,
    layout: Layout,
    flat: jax.Array,
    residuals: jax.Array | None,
    client_ids: jax.Array,
    present: jax.Array,
    key: jax.Array,
) -> tuple[Payload, jax.Array | None, ClientReport]:
    """Encodes a cohort chunk. flat float32 [C, d]; residuals [C, d_s] or None."""
    if layout.index_bits > 0 and not config.random_k:
        return _encode_top_k(config, layout, flat, residuals, client_ids, present, key)
    if layout.index_bits == 0 and config.bits is not None and config.shared_range is None:
        return _encode_dense_quantized(config, layout, flat, residuals, client_ids, present, key)
    c = flat.shape[0]
    sparse, dense = _split(layout, flat)
    acc = sparse if residuals is None else sparse + residuals.astype(jnp.float32)
    finite = (
        present
        & jnp.all(jnp.isfinite(acc), axis=1)
        & jnp.all(jnp.isfinite(dense), axis=1)
    )
    # Excluded clients encode zeros (their payload is discarded below), so no NaN flows on.
    sparse_safe = jnp.where(finite[:, None], sparse, 0.0)
    old_residuals = None if residuals is None else residuals.astype(jnp.float32)
    residual_safe = (
        None if old_residuals is None else jnp.where(finite[:, None], old_residuals, 0.0)
    )
    acc_safe = sparse_safe if residual_safe is None else sparse_safe + residual_safe
    k, d_s = layout.k, layout.sparse_size
    if layout.index_bits == 0:
        indices = None
        values = acc_safe
    else:  # random-k (top-k selection is `_encode_top_k`)
        scores = jax.vmap(lambda kk: jax.random.uniform(kk, (d_s,)))(
            _client_keys(key, client_ids, 0)
        )
        _, indices = _top_k(scores, k)  # k uniform-random coordinates, no repeats
        values = jnp.take_along_axis(acc_safe, indices, axis=1)
        if not config.error_feedback:
            values = values * jnp.float32(d_s / k)  # unbiased: E[sent] = acc

    codes, minimum, maximum, decoded = _quantize_values(config, values, client_ids, key)

    new_residuals = None
    if config.error_feedback:
        # Full error feedback: the residual keeps everything the server will not see,
        # selection *and* quantization error, so decoded-sent + new_residual == acc.
        if indices is None:
            new_residuals = acc_safe - decoded
        else:
            new_residuals = acc_safe - scatter(decoded, indices, d_s)
    ok_values = jnp.all(jnp.isfinite(decoded), axis=1)
    if new_residuals is not None:
        ok_values &= jnp.all(jnp.isfinite(new_residuals), axis=1)
    included = finite & ok_values
    if new_residuals is not None:
        # A client that is left out keeps its old residual: nothing was sent, nothing is lost.
        new_residuals = jnp.where(included[:, None], new_residuals, old_residuals)
        residual_norm = _row_norms(new_residuals)
    else:
        residual_norm = jnp.zeros((c,), jnp.float32)

    payload = _payload(
        config, layout, included, finite, indices, values, (codes, minimum, maximum), dense
    )
    return payload, new_residuals, ClientReport(included, residual_norm)


def _encode_dense_quantized(
    config: CompressorConfig,
    layout: Layout,
    flat: jax.Array,
    residuals: jax.Array | None,
    client_ids: jax.Array,
    present: jax.Array,
    key: jax.Array,
) -> tuple[Payload, jax.Array | None, ClientReport]:
    """Every coordinate of the sparse segment quantized with the client's own range (TFF's
    `quantize_above_threshold`): `_encode_flat`'s rules, in two passes over `[C, d_s]`.
    The range pass also finds the clients with NaN/Inf (`quantize_rows`) and an overflowing
    decode is told from the range (`decodes_finite`), so neither needs a pass of its own;
    excluded clients' codes are computed but never sent (`_payload` zeroes them)."""
    c = flat.shape[0]
    sparse, dense = _split(layout, flat)
    old_residuals = None if residuals is None else residuals.astype(jnp.float32)
    acc = sparse if old_residuals is None else sparse + old_residuals
    q, acc_finite = quantize_rows(acc, _client_keys(key, client_ids, 1), config.bits)
    finite = present & acc_finite & jnp.all(jnp.isfinite(dense), axis=1)
    included = finite & decodes_finite(q)
    new_residuals = None
    residual_norm = jnp.zeros((c,), jnp.float32)
    if config.error_feedback:
        # decoded + new_residual == acc (full error feedback, as in `_encode_flat`).
        new_residuals = acc - dequantize(q)
        included &= jnp.all(jnp.isfinite(new_residuals), axis=1)
        # A client that is left out keeps its old residual: nothing was sent, nothing is lost.
        new_residuals = jnp.where(included[:, None], new_residuals, old_residuals)
        residual_norm = _row_norms(new_residuals)
    payload = _payload(
        config, layout, included, finite, None, acc, (q.packed, q.minimum, q.maximum), dense
    )
    return payload, new_residuals, ClientReport(included, residual_norm)


# Largest `C * d_s` whose flat positions `_encode_top_k` indexes as int32 (beyond it, 2-D).
FLAT_INDEX_LIMIT = 2**31 - 1


def _restore_rows(new: jax.Array, old: jax.Array, keep_new: jax.Array) -> jax.Array:
    """`where(keep_new[:, None], new, old)` without a pass over the rows kept: a loop over the
    others (usually none) copies each old row back, in place."""
    order = jnp.argsort(keep_new)  # the rows to restore first (False sorts before True)

    def restore(j, out):
        row = order[j]
        return lax.dynamic_update_index_in_dim(
            out, lax.dynamic_index_in_dim(old, row, keepdims=False).astype(out.dtype), row, 0
        )

    return lax.fori_loop(0, jnp.sum(~keep_new), restore, new)


def _encode_top_k(
    config: CompressorConfig,
    layout: Layout,
    flat: jax.Array,
    residuals: jax.Array | None,
    client_ids: jax.Array,
    present: jax.Array,
    key: jax.Array,
) -> tuple[Payload, jax.Array | None, ClientReport]:
    """`_encode_flat` for top-k selection, in as few passes over `[C, d_s]` as possible.

    With error feedback, `acc = x + residual` is written once, into the buffer that becomes
    the new residual: radix select's counting passes (`top_k_rows_words`: the passes run over
    the whole cohort, only the short per-client work client by client) read `acc` instead of
    `x` and `residual`, the k values are gathered from it, and one scatter of k entries per
    client overwrites the selected coordinates with what the server will not see (the
    quantization error, or 0 without quantization). An excluded client's row is then put back
    to its old residual (nothing sent, nothing lost). Measured against the previous
    formulation (`acc` recomputed in each pass, a masked pass zeroing the selection, then a
    scatter-add of the errors), jax 0.4.30, C=100, d=1e6, top-k 1% + 8 bits: 257-269 against
    278-312 ms per round (`bench/suite_pipeline.py`'s round, 7 rounds each).

    Gathers and scatters index `acc` as one flat vector when `C * d_s` fits int32: on XLA:CPU
    (jax 0.4.30) a 1-D gather of 1e6 entries from a [100, 1e6] array takes 5 ms against 20
    ms for `take_along_axis`, and the 1-D scatter's loop runs one kernel per update, not two.

    A client is excluded when it is absent or any entry of its `acc` is NaN/Inf: NaN and Inf
    rank above every finite magnitude, so they are selected first and checking the k selected
    values finds them (the rule of `_encode_flat`, which checks every entry).
    """
    c = flat.shape[0]
    sparse, dense = _split(layout, flat)
    k, d_s = layout.k, layout.sparse_size
    flat_index = c * d_s <= FLAT_INDEX_LIMIT
    if residuals is None:
        acc_flat = sparse.reshape(-1)
    else:
        acc_flat = sparse.reshape(-1) + residuals.astype(jnp.float32).reshape(-1)
    acc = acc_flat.reshape(c, d_s)
    _, indices = top_k_rows_words((acc,), lambda a: a, k)
    if flat_index:
        positions = (indices + jnp.arange(c, dtype=jnp.int32)[:, None] * d_s).reshape(-1)
        values = acc_flat[positions].reshape(c, k)
    else:
        values = jnp.take_along_axis(acc, indices, axis=1)
    finite = (
        present & jnp.all(jnp.isfinite(values), axis=1) & jnp.all(jnp.isfinite(dense), axis=1)
    )
    values = jnp.where(finite[:, None], values, 0.0)  # excluded clients send zeros (dropped)
    codes, minimum, maximum, decoded = _quantize_values(config, values, client_ids, key)
    included = finite & jnp.all(jnp.isfinite(decoded), axis=1)

    new_residuals = None
    residual_norm = jnp.zeros((c,), jnp.float32)
    if config.error_feedback:
        # What the server will not see of the selected coordinates (full error feedback:
        # decoded-sent + new residual == acc). Ascending, distinct, in range: said so, XLA:CPU
        # scatters in place.
        unseen = values - decoded if config.bits is not None else jnp.zeros_like(values)
        scatter_options = dict(
            indices_are_sorted=True, unique_indices=True, mode="promise_in_bounds"
        )
        if flat_index:
            new_residuals = acc_flat.at[positions].set(
                unseen.reshape(-1), **scatter_options
            ).reshape(c, d_s)
        else:
            new_residuals = acc.at[jnp.arange(c)[:, None], indices].set(unseen, **scatter_options)
        # A client left out keeps its old residual.
        new_residuals = _restore_rows(new_residuals, residuals, included)
        residual_norm = _row_norms(new_residuals)

    payload = _payload(
        config, layout, included, finite, indices, values, (codes, minimum, maximum), dense
    )
    return payload, new_residuals, ClientReport(included, residual_norm)


# --------------------------------------------------------------------------------------------
# Server side
# --------------------------------------------------------------------------------------------


def _rows_sum(x: jax.Array, weights: jax.Array) -> jax.Array:
    """sum_c w_c x_c over rows, via the core masked_sum (row accumulation, fast on CPU)."""
    if x.shape[1] == 0:
        return jnp.zeros((0,), jnp.float32)
    numerator, _ = masked_sum(x, weights, jnp.ones(x.shape, jnp.bool_))
    return numerator.astype(jnp.float32)


def _aggregate(
    config: CompressorConfig, layout: Layout, payload: Payload, weights: jax.Array,
    included: jax.Array,
) -> AggregateSums:
    """Partial sums of a chunk's payloads. weights float32 [C] (0 for excluded clients)."""
    c = payload.dense.shape[0]
    k, d_s = layout.k, layout.sparse_size
    w = jnp.where(included, weights.astype(jnp.float32), 0.0)
    present = included.astype(jnp.int32)
    selecting = layout.index_bits > 0
    indices = None
    if selecting:
        indices = unpack_bits(payload.indices, layout.index_bits, k).astype(jnp.int32)
    code_sum = jnp.zeros((0,), jnp.int32)
    shared = config.shared_range is not None
    quantized = None if config.bits is None else Quantized(
        payload.codes, payload.minimum, payload.maximum, config.bits, k
    )
    if shared:
        # Integer codes summed as integers (what secure aggregation can do); the affine
        # decode is applied once in `finalize`.
        if selecting:
            codes = unpack_bits(payload.codes, config.bits, k).astype(jnp.int32)
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


def _zero_sums(config: CompressorConfig, layout: Layout) -> AggregateSums:
    d_s = layout.sparse_size
    return AggregateSums(
        jnp.zeros((d_s,), jnp.float32), jnp.zeros((d_s,), jnp.float32),
        jnp.zeros((d_s,), jnp.int32),
        jnp.zeros((d_s if config.shared_range is not None else 0,), jnp.int32),
        jnp.zeros((layout.dense_size,), jnp.float32), jnp.float32(0), jnp.int32(0),
    )


def _add_sums(a: AggregateSums, b: AggregateSums) -> AggregateSums:
    return AggregateSums(*(x + y for x, y in zip(a, b, strict=True)))


def _finalize_flat(config: CompressorConfig, layout: Layout, sums: AggregateSums) -> jax.Array:
    """Partial sums -> the mean update, float32 [d]. Never NaN: 0 where nothing arrived."""
    total = sums.sparse_total
    if config.shared_range is not None:
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
    has_w = sums.weight_sum > 0
    dense_mean = jnp.where(has_w, sums.dense_total / jnp.where(has_w, sums.weight_sum, 1.0), 0.0)
    return _join(layout, sparse_mean, dense_mean)


# --------------------------------------------------------------------------------------------
# A round, optionally chunked
# --------------------------------------------------------------------------------------------


def _flat_updates(layout: Layout, updates: Any) -> jax.Array:
    flat, unflatten = flatten(updates, batch_ndim=1, dtype=jnp.float32)
    if (unflatten.treedef, unflatten.shapes) != (layout.unflatten.treedef, layout.unflatten.shapes):
        raise ValueError(
            "updates must have the structure and leaf shapes of the template with a leading "
            f"client axis; template {layout.unflatten.shapes}, got {unflatten.shapes}"
        )
    return flat


def _round_flat(
    config: CompressorConfig,
    layout: Layout,
    updates: Any,
    residuals: jax.Array | None,
    client_ids: jax.Array,
    weights: jax.Array,
    present: jax.Array,
    key: jax.Array,
    chunk_size: int | None,
) -> tuple[AggregateSums, jax.Array | None, ClientReport]:
    """Encodes and aggregates a cohort; `updates` is a pytree [C, ...] or a function
    `client_ids_chunk -> pytree [chunk, ...]` (called inside the loop, so the full [C, d]
    never exists when chunked)."""
    c = client_ids.shape[0]

    def one_chunk(upd, res, ids, w, pres):
        if callable(upd):
            upd = upd(ids)
        flat = _flat_updates(layout, upd)
        payload, new_res, report = _encode_flat(config, layout, flat, res, ids, pres, key)
        sums = _aggregate(config, layout, payload, w, report.included)
        return sums, new_res, report

    if chunk_size is None or chunk_size >= c:
        return one_chunk(updates, residuals, client_ids, weights, present)
    n = -(-c // chunk_size)
    pad = n * chunk_size - c

    def chunked(a):
        a = jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1))
        return a.reshape(n, chunk_size, *a.shape[1:])

    xs = {
        "ids": chunked(client_ids),
        "w": chunked(weights),
        "present": chunked(present),  # padding rows are absent
    }
    if not callable(updates):
        xs["updates"] = jax.tree_util.tree_map(chunked, updates)
    if residuals is not None:
        xs["residuals"] = chunked(residuals)

    def body(carry, x):
        upd = updates if callable(updates) else x["updates"]
        sums, new_res, report = one_chunk(
            upd, x.get("residuals"), x["ids"], x["w"], x["present"]
        )
        return _add_sums(carry, sums), (new_res, report)

    sums, (new_res, report) = lax.scan(body, _zero_sums(config, layout), xs)

    def unchunk(a):
        return a.reshape(n * chunk_size, *a.shape[2:])[:c]

    new_res = None if new_res is None else unchunk(new_res)
    return sums, new_res, ClientReport(*(unchunk(a) for a in report))


def _metric_arrays(
    layout: Layout, sums: AggregateSums, report: ClientReport, present: jax.Array
) -> dict[str, jax.Array]:
    """The array fields of RoundMetrics (computed under jit; padding rows are not present)."""
    excluded = present & ~report.included
    per_client = jnp.where(report.included, jnp.int32(layout.payload_bytes), 0)
    included = present & report.included
    num_included = jnp.sum(included.astype(jnp.int32))
    norms = jnp.where(included, report.residual_norm, 0.0)
    touched = sums.contributors > 0
    n_touched = jnp.sum(touched.astype(jnp.int32))
    mean_contrib = jnp.where(
        n_touched > 0,
        jnp.sum(sums.contributors).astype(jnp.float32) / jnp.maximum(n_touched, 1),
        0.0,
    )
    return dict(
        uploaded_bytes=jnp.sum(per_client),
        bytes_per_client=per_client,
        num_excluded=jnp.sum(excluded.astype(jnp.int32)),
        excluded=excluded,
        residual_norm=report.residual_norm,
        contributors_touched=n_touched,
        contributors_max=jnp.max(sums.contributors, initial=0),
        contributors_mean=mean_contrib,
        residual_norm_mean=jnp.sum(norms) / jnp.maximum(num_included, 1).astype(jnp.float32),
        residual_norm_max=jnp.max(norms, initial=0.0),
    )


def _metrics(layout: Layout, c: int, arrays: dict[str, jax.Array]) -> RoundMetrics:
    return RoundMetrics(
        num_clients=c, payload_bytes=layout.payload_bytes, dense_bytes=layout.dense_bytes,
        **{name: a[:c] if name in _PER_CLIENT else a for name, a in arrays.items()},
    )


_PER_CLIENT = ("bytes_per_client", "excluded", "residual_norm")


def _check_cohort(
    layout: Layout, config: CompressorConfig, c: int, client_ids: Any, residuals: Any,
    weights: Any,
) -> tuple[jax.Array, jax.Array | None, jax.Array]:
    if client_ids is None:
        client_ids = jnp.arange(c, dtype=jnp.int32)
    client_ids = _validate.integer("client_ids", client_ids)
    _validate.same_shape("client_ids", client_ids, (c,), "one id per client")
    if config.error_feedback:
        if residuals is None:
            raise ValueError(
                "residuals must be given when error_feedback=True (zeros in the first round, "
                f"shape ({c}, {layout.sparse_size})), got None"
            )
        residuals = _validate.floating("residuals", residuals)
        _validate.same_shape("residuals", residuals, (c, layout.sparse_size), "[C, d_s]")
    elif residuals is not None:
        raise ValueError("residuals must be None when error_feedback=False, got an array")
    if weights is None:
        weights = jnp.ones((c,), jnp.float32)
    else:
        weights = _validate.weights_vector("weights", weights, c).astype(jnp.float32)
        if config.shared_range is not None:
            raise ValueError("weights must be None in shared_range mode (codes are summed "
                             "unweighted, as secure aggregation would), got an array")
    return client_ids.astype(jnp.int32), residuals, weights


def compressor(
    template: Any,
    *,
    top_k: float | int | None = None,
    error_feedback: bool = False,
    bits: int | None = None,
    dense_threshold: int = 20000,
    random_k: bool = False,
    shared_range: tuple[float, float] | None = None,
    aggregation: str = "mean",
    on_nonfinite: str = "exclude",
) -> Compressor:
    """Builds a batched update compressor: client encoder, server decoder, jitted round.

    Top-k sparsification, global over the flattened model (Aji & Heafield 2017; Lin et al.
    2018, DGC), with error feedback (Stich et al. 2018; Karimireddy et al. 2019) and unbiased
    stochastic quantization of the kept values (Suresh et al. 2017), as TFF's
    `quantize_above_threshold` does for dense tensors.

    Per client c (rows of a cohort, all clients at once): `acc = update + residual`;
    select k coordinates of the sparse segment (leaves with more than `dense_threshold`
    elements): top-k by magnitude (ties to the lower index), or k uniformly random ones
    (random-k, values scaled by d_s/k when error feedback is off, so the sent update is
    unbiased); quantize the k values to `bits` bits with the client's own [min, max] (or the
    shared range); bit-pack codes and indices (ceil(log2 d_s) bits each). The dense segment is
    sent as float32. With error feedback the new residual is `acc - decoded(sent)` (selection
    and quantization error), so `scatter(decoded) + new_residual == acc` up to float32
    rounding (exactly when `bits` is None). Randomness is `fold_in(key, client_id)`.

    Server: unpack, dequantize, `scatter_sum` weighted by the client weights, then
    `aggregation="mean"`: divide by the summed weight of included clients (FedAvg: an
    unsent coordinate counts as 0) or `"masked_mean"`: divide coordinate j by the weight of
    the clients that sent j (0 where none did).

    Shared-range mode (`shared_range=(lo, hi)`, e.g. from a clipping bound): every client
    quantizes the clipped values against the same [lo, hi]; the server sums the integer codes
    (what secure aggregation can sum; TFF issue #899) and decodes once:
    `sum_c value_cj = n_j * lo + code_sum_j * (hi - lo) / (2**bits - 1)`. Clipping error
    goes into the residual when error feedback is on. Weights are not supported there.

    Non-finite clients: a client whose `update + residual` (or decoded payload) holds NaN or
    Inf is excluded from the round: it uploads nothing, counts in `metrics.num_excluded`, and
    keeps its old residual. `on_nonfinite="raise"` raises ValueError instead (after the
    round, which needs a host sync). An empty or all-excluded cohort gives a zero mean.

    Args:
      template: pytree of arrays or `jax.ShapeDtypeStruct`, one client's update (no client
        axis). Fixes d, the leaf split and the payload size.
      top_k: None (send every coordinate of the sparse segment), a fraction in (0, 1] of d_s
        (k = max(1, round(top_k * d_s))), or a count in [1, d_s].
      error_feedback: keep what is not sent in a per-client residual (float32 `[C, d_s]`,
        see `fedkernels.residual_store` for N clients).
      bits: None (float32 values) or int in [1, 16].
      dense_threshold: int >= 0; leaves with at most this many elements are sent dense.
      random_k: choose the k coordinates uniformly at random instead of by magnitude.
      shared_range: None or (lo, hi), finite, lo < hi; needs `bits`.
      aggregation: "mean" or "masked_mean".
      on_nonfinite: "exclude" or "raise".

    Returns:
      A `Compressor` with `layout` (sizes, `payload_bytes`, `compression_ratio`) and pure
      functions:
      `encode(updates, residuals, client_ids, key) -> (Payload, new_residuals, ClientReport)`;
      `aggregate(payload, included, weights=None) -> AggregateSums` (partial sums, add them
      across chunks or devices); `finalize(sums) -> mean pytree`;
      `decode(payload, included, weights=None) -> mean pytree`;
      `round(updates, key, *, client_ids=None, residuals=None, weights=None,
      chunk_size=None, mesh=None) -> RoundResult(mean, residuals, metrics)`, the whole round
      in one jit. `updates` is a pytree with leaves `[C, *leaf_shape]` (float32 after
      flattening), or for `round` also a function `client_ids_chunk -> such a pytree`,
      evaluated chunk by chunk so `[C, d]` is never materialised. `round` compiles once per
      (cohort size, chunk_size, mesh, update function): pass the same function object every
      round. A new lambda each round is a new cache key and recompiles every round.

    Raises:
      ValueError: a setting out of range (named with its value), e.g. `top_k=0`,
        `bits=17`, `shared_range=(1, 1)`, `aggregation="median"`; or at call time shapes
        that disagree with the template.
      TypeError: a setting of the wrong type, or a template leaf that is not an array.

    >>> import jax, jax.numpy as jnp
    >>> comp = compressor({"w": jnp.zeros((1000,))}, top_k=0.01, bits=8, dense_threshold=0)
    >>> comp.layout.k, comp.layout.index_bits, comp.layout.payload_bytes
    (10, 10, 80)
    >>> updates = {"w": jnp.zeros((3, 1000)).at[:, 7].set(1.0)}
    >>> result = comp.round(updates, jax.random.PRNGKey(0))
    >>> float(result.mean["w"][7]), result.metrics.as_dict()["uploaded_bytes"]
    (1.0, 240)
    """
    config = _check_config(
        top_k, error_feedback, bits, dense_threshold, random_k, shared_range, aggregation,
        on_nonfinite,
    )
    layout = _make_layout(template, config)
    # Built once per (settings, model layout): compressors made again for the same model (a
    # new configuration run, a test) reuse the compiled functions instead of recompiling.
    built = _build(dataclasses.replace(config, on_nonfinite="exclude"), layout)
    if config.on_nonfinite == "exclude":
        return built

    def round_raising(*args: Any, **kwargs: Any) -> RoundResult:
        result = built.round(*args, **kwargs)
        if int(result.metrics.num_excluded) > 0:
            bad = np.flatnonzero(np.asarray(result.metrics.excluded))
            raise ValueError(
                f"updates must be finite (on_nonfinite='raise'), got {bad.size} client(s) with "
                f"NaN/Inf: cohort positions {bad[:10].tolist()}"
            )
        return result

    return built._replace(config=config, round=round_raising)


@functools.lru_cache(maxsize=64)
def _build(config: CompressorConfig, layout: Layout) -> Compressor:
    """The jitted functions of a compressor (see `compressor`)."""

    def encode(updates, residuals, client_ids, key):
        flat = _flat_updates(layout, updates)
        c = flat.shape[0]
        ids, residuals, _ = _check_cohort(layout, config, c, client_ids, residuals, None)
        present = jnp.ones((c,), jnp.bool_)
        return _encode_jit(flat, residuals, ids, present, key)

    @jax.jit
    def _encode_jit(flat, residuals, ids, present, key):
        return _encode_flat(config, layout, flat, residuals, ids, present, key)

    # Payload size: the bytes of one client's row of every Payload field, from the shapes the
    # encoder really produces.
    probe = jax.eval_shape(
        lambda: _encode_flat(
            config, layout, jnp.zeros((1, layout.size), jnp.float32),
            jnp.zeros((1, layout.sparse_size), jnp.float32) if config.error_feedback else None,
            jnp.zeros((1,), jnp.int32), jnp.ones((1,), jnp.bool_), jax.random.PRNGKey(0),
        )
    )[0]
    payload_bytes = sum(
        math.prod(leaf.shape[1:]) * np.dtype(leaf.dtype).itemsize for leaf in probe
    )
    layout = dataclasses.replace(layout, payload_bytes=int(payload_bytes))

    @jax.jit
    def _aggregate_jit(payload, included, weights):
        return _aggregate(config, layout, payload, weights, included)

    def aggregate(payload: Payload, included: Any, weights: Any = None) -> AggregateSums:
        c = payload.dense.shape[0]
        if weights is None:
            weights = jnp.ones((c,), jnp.float32)
        return _aggregate_jit(payload, jnp.asarray(included, jnp.bool_), weights)

    @jax.jit
    def _finalize_jit(sums):
        return layout.unflatten(_finalize_flat(config, layout, sums))

    def finalize(sums: AggregateSums) -> Any:
        return _finalize_jit(sums)

    def decode(payload: Payload, included: Any, weights: Any = None) -> Any:
        return finalize(aggregate(payload, included, weights))

    from fedkernels import _sharding  # local: avoids an import cycle at module load

    _round_cache: dict[Any, Callable] = {}

    def _round_fn(chunk_size, mesh, update_fn, has_residuals):
        cache_key = (chunk_size, mesh, update_fn, has_residuals)
        if cache_key not in _round_cache:

            def run(updates, residuals, ids, weights, present, key):
                upd = update_fn if update_fn is not None else updates
                if mesh is None:
                    sums, new_res, report = _round_flat(
                        config, layout, upd, residuals, ids, weights, present, key, chunk_size
                    )
                else:
                    sums, new_res, report = _sharding.sharded_round(
                        lambda u, r, i, w, p: _round_flat(
                            config, layout, u, r, i, w, p, key, chunk_size
                        ),
                        mesh, upd, residuals, ids, weights, present,
                    )
                mean = layout.unflatten(_finalize_flat(config, layout, sums))
                return mean, new_res, _metric_arrays(layout, sums, report, present)

            _round_cache[cache_key] = jax.jit(run)
        return _round_cache[cache_key]

    def round_(
        updates: Any,
        key: Any,
        *,
        client_ids: Any = None,
        residuals: Any = None,
        weights: Any = None,
        chunk_size: int | None = None,
        mesh: Any = None,
    ) -> RoundResult:
        if chunk_size is not None:
            chunk_size = _validate.static_int("chunk_size", chunk_size, 1)
        update_fn = updates if callable(updates) else None
        if update_fn is not None:
            if client_ids is None:
                raise ValueError("client_ids must be given when updates is a function, got None")
            c = int(np.shape(client_ids)[0])
        else:
            leaves = jax.tree_util.tree_leaves(updates)
            if not leaves:
                raise ValueError("updates must have at least one leaf, got an empty pytree")
            c = int(np.shape(leaves[0])[0])
        ids, residuals, weights = _check_cohort(layout, config, c, client_ids, residuals, weights)
        present = jnp.ones((c,), jnp.bool_)
        if c == 0:
            sums = _zero_sums(config, layout)
            report = ClientReport(jnp.zeros((0,), jnp.bool_), jnp.zeros((0,), jnp.float32))
            mean = layout.unflatten(_finalize_flat(config, layout, sums))
            arrays = _metric_arrays(layout, sums, report, present)
            return RoundResult(mean, residuals, _metrics(layout, 0, arrays))
        if mesh is not None:
            ids, residuals, weights, present, updates = _sharding.pad_to_devices(
                mesh, ids, residuals, weights, present, None if update_fn else updates
            )
        fn = _round_fn(chunk_size, mesh, update_fn, residuals is not None)
        mean, new_res, arrays = fn(
            None if update_fn else updates, residuals, ids, weights, present, key
        )
        if new_res is not None and new_res.shape[0] != c:
            new_res = new_res[:c]
        metrics = _metrics(layout, c, arrays)
        return RoundResult(mean, new_res, metrics)

    return Compressor(config, layout, encode, decode, aggregate, finalize, round_)
