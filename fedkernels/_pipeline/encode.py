"""Client side: a cohort chunk's updates `[C, d]` -> payloads, new residuals, who took part.

Per client: `acc = update + residual` on the sparse segment, select k coordinates (the
selector: "top_k", "random_k" or "none"), quantize the kept values (the quantizer:
"float32", "own_range" or "shared_range"), bit-pack codes and indices. `encode` picks one of
three encoders from those two static choices (`encoder`); they share the rules below, and
end in `_finish`, which zeroes an excluded client's payload and keeps its old residual:

- A client is *included* when it is present (not padding) and its `acc`, its dense segment
  and its decoded values are finite (`finite_rows`); otherwise it uploads nothing.
- Full error feedback: the new residual is `acc - decoded(sent)` (selection and
  quantization error), and an excluded client keeps its old residual (`restore_excluded`):
  nothing was sent, nothing is lost.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from fedkernels._pipeline.config import CompressorConfig
from fedkernels._pipeline.layout import Layout, split
from fedkernels._quantize import (
    _hash_seeds,
    _hash_words,
    decodes_finite,
    dequantize,
    pack_bits,
    pack_codes,
    quantize,
    quantize_rows,
)
from fedkernels._scatter import scatter
from fedkernels._topk import _top_k_indices, top_k_rows_words


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


class ClientReport(NamedTuple):
    """Per-client results of encoding."""

    included: jax.Array  # shape=[C], dtype=bool: False for excluded (non-finite) or padding
    residual_norm: jax.Array  # shape=[C], dtype=float32: L2 norm of the new residual


Encoded = tuple[Payload, jax.Array | None, ClientReport]

# --------------------------------------------------------------------------------------------
# Shared rules
# --------------------------------------------------------------------------------------------


def finite_rows(x: jax.Array) -> jax.Array:
    """bool [C]: every entry of the row is finite."""
    return jnp.all(jnp.isfinite(x), axis=1)


def restore_excluded(
    new_residuals: jax.Array | None, report: ClientReport, residuals: jax.Array | None,
    weights: jax.Array | None = None,
) -> tuple[jax.Array | None, ClientReport]:
    """`(new_residuals, report)` with every excluded client's old residual row (from
    `residuals`, the rows it was encoded from) and its norm put back: an excluded client keeps
    its old residual, and so does a client whose weight (`weights`, float [C]) is 0, whose
    upload the server gives no weight. Without error feedback (`new_residuals is None`):
    unchanged.

    Written without a pass over the rows kept: a loop over the others (usually none) copies
    each old row back into `new_residuals`, in place. `residuals` is read only inside the
    loop, so a chunked round passes its whole residual array once, after the chunks, instead
    of copying each chunk's rows into the loop (bench case `chunked_round` of `--suite
    pipeline`)."""
    if new_residuals is None:
        return new_residuals, report
    included = report.included
    keep = included if weights is None else included & (weights > 0)
    # The rows to restore first. Not `argsort(included)`: inside `shard_map` on jax 0.4.30 it
    # gave wrong rows on every device but the first (tests/test_pipeline.py, sharded test).
    order = jnp.nonzero(~keep, size=keep.shape[0], fill_value=0)[0]

    def restore(j, carry):
        out, norms = carry
        row = order[j]
        old_row = lax.dynamic_index_in_dim(residuals, row, keepdims=False).astype(out.dtype)
        norm = row_norms(old_row[None])[0]
        return lax.dynamic_update_index_in_dim(out, old_row, row, 0), norms.at[row].set(norm)

    new_residuals, norms = lax.fori_loop(
        0, jnp.sum(~keep), restore, (new_residuals, report.residual_norm)
    )
    return new_residuals, ClientReport(included, norms)


# Column block and blocks per loop step of `row_norms` (bench case
# `round_topk1%_ef_8bit`): `jnp.sum(x * x, 1)` writes `x * x` out first on XLA:CPU, and
# narrower or wider blocks were slower.
_NORM_BLOCK = 2048
_NORM_BLOCKS_PER_STEP = 8


# A finite row whose squares sum past float32 (entries from about 1.8e19 on) is summed again
# scaled by this power of two: exact, and its squares then sum well inside float32. The
# squares of entries below about 1e11 then flush to zero: with fewer than 1e9 entries they
# sum to less than float32 rounding of the squares that overflowed (at least 3.4e38).
_NORM_RESCALE = 2.0**-100


def row_norms(x: jax.Array) -> jax.Array:
    """Euclidean norm of each row of float32 `[C, d]`, in one read of `x`: a loop over column
    blocks adds `block**2` into a `[C, _NORM_BLOCK]` accumulator (cache-resident), summed at
    the end. XLA:CPU's own row reduction is slower for long rows. A finite row whose sum of
    squares overflows float32 is summed again scaled (a second read, only when one does): its
    norm is finite whenever it fits float32."""
    norms = _row_norms_unscaled(x)

    def rescaled() -> jax.Array:
        again = _row_norms_unscaled(x.astype(jnp.float32) * jnp.float32(_NORM_RESCALE))
        again = (again / jnp.float32(_NORM_RESCALE)).astype(norms.dtype)
        return jnp.where(jnp.isinf(norms), again, norms)

    return lax.cond(jnp.any(jnp.isinf(norms)), rescaled, lambda: norms)


def _row_norms_unscaled(x: jax.Array) -> jax.Array:
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


def random_k_scores(keys: jax.Array, d: int) -> jax.Array:
    """float32 `[C, d]` scores in [0, 1) whose k largest per row are the client's random-k
    coordinates: the top 24 bits of the quantizer's counter hash (`_hash_words` of coordinate
    j under `keys[c]`), so a key picks the same coordinates on every jax version
    (`jax.random.uniform` depends on `jax_threefry_partitionable`, whose default changed)."""
    counter = lax.iota(jnp.uint32, d)

    def one(k: jax.Array) -> jax.Array:
        words = _hash_words(_hash_seeds(k), counter)
        return (words >> jnp.uint32(8)).astype(jnp.float32) * jnp.float32(2.0**-24)

    return jax.vmap(one)(keys)


def client_keys(key: jax.Array, client_ids: jax.Array, stream: int) -> jax.Array:
    # Per-client randomness from the client's id, not its position in the cohort, so chunking,
    # sharding and cohort order do not change the draws.
    return jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(key, i), stream))(client_ids)


# --------------------------------------------------------------------------------------------
# Quantizers: values [C, k] -> (packed codes, minimum, maximum, decoded [C, k])
# --------------------------------------------------------------------------------------------


def _quantize_float32(config, values, keys):
    c = values.shape[0]
    empty = jnp.zeros((c, 0), jnp.float32)
    return jnp.zeros((c, 0), jnp.uint32), empty, empty, values


def _quantize_own_range(config, values, keys):
    q = jax.vmap(lambda v, kk: quantize(v, kk, config.bits))(values, keys)
    return q.packed, q.minimum, q.maximum, dequantize(q)


def _quantize_shared_range(config, values, keys):
    bits = config.bits
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
    codes = q.codes()[:, :k]
    levels = float((1 << bits) - 1)
    decoded = codes.astype(jnp.float32) * jnp.float32((hi - lo) / levels) + jnp.float32(lo)
    empty = jnp.zeros((c, 0), jnp.float32)
    return pack_codes(codes, bits), empty, empty, decoded


QUANTIZERS: dict[str, Callable] = {
    "float32": _quantize_float32,
    "own_range": _quantize_own_range,
    "shared_range": _quantize_shared_range,
}


def quantize_values(
    config: CompressorConfig, values: jax.Array, client_ids: jax.Array, key: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """values [C, k] -> (packed codes, minimum, maximum, decoded) by `config.quantizer`."""
    keys = None if config.bits is None else client_keys(key, client_ids, 1)
    return QUANTIZERS[config.quantizer](config, values, keys)


def _finish(
    config: CompressorConfig,
    layout: Layout,
    included: jax.Array,
    indices: jax.Array | None,
    values: jax.Array,
    quantized: tuple[jax.Array, jax.Array, jax.Array],
    dense: jax.Array,
    new_residuals: jax.Array | None,
) -> Encoded:
    """The encoders' common end: the payload, with an excluded client's rows zeros (they are
    not counted either), the new residuals and their norms, and the report. An excluded
    client's row of the new residuals is not yet its old one (`encode` puts it back). Without
    error feedback (`new_residuals is None`): no residuals, norms 0."""
    c = values.shape[0]

    def keep(a):
        return jnp.where(included.reshape((c,) + (1,) * (a.ndim - 1)), a, jnp.zeros_like(a))

    codes, minimum, maximum = quantized
    packed_indices = (
        jnp.zeros((c, 0), jnp.uint32)
        if indices is None
        else pack_bits(indices.astype(jnp.uint32), layout.index_bits)
    )
    payload = Payload(
        indices=keep(packed_indices),
        values=keep(values) if config.bits is None else jnp.zeros((c, 0), jnp.float32),
        codes=keep(codes),
        minimum=keep(minimum),
        maximum=keep(maximum),
        dense=keep(dense),
    )
    if new_residuals is None:
        return payload, None, ClientReport(included, jnp.zeros((c,), jnp.float32))
    with jax.named_scope("residual_norms"):
        norms = row_norms(new_residuals)
    return payload, new_residuals, ClientReport(included, norms)


# --------------------------------------------------------------------------------------------
# Encoders
# --------------------------------------------------------------------------------------------


def _encode_generic(
    config: CompressorConfig,
    layout: Layout,
    flat: jax.Array,
    residuals: jax.Array | None,
    client_ids: jax.Array,
    present: jax.Array,
    key: jax.Array,
) -> Encoded:
    """Random-k, or every coordinate sent (float32 or shared-range codes): the rules of the
    module docstring, checking every entry of `acc`."""
    sparse, dense = split(layout, flat)
    acc = sparse if residuals is None else sparse + residuals.astype(jnp.float32)
    finite = present & finite_rows(acc) & finite_rows(dense)
    # Excluded clients encode zeros (their payload is discarded below), so no NaN flows on.
    sparse_safe = jnp.where(finite[:, None], sparse, 0.0)
    old_residuals = None if residuals is None else residuals.astype(jnp.float32)
    residual_safe = (
        None if old_residuals is None else jnp.where(finite[:, None], old_residuals, 0.0)
    )
    acc_safe = sparse_safe if residual_safe is None else sparse_safe + residual_safe
    k, d_s = layout.k, layout.sparse_size
    if layout.selector == "none":
        indices = None
        values = acc_safe
    else:  # random-k
        scores = random_k_scores(client_keys(key, client_ids, 0), d_s)
        # k uniform-random coordinates, no repeats: the k largest of uniform scores.
        indices = _top_k_indices(scores, k, "auto", config.radix).astype(jnp.int32)
        values = jnp.take_along_axis(acc_safe, indices, axis=1)
        # Without error feedback the plain mean is scaled by d_s / k on the server
        # (`aggregate.finalize`), after quantization: a shared range applies to the update.

    codes, minimum, maximum, decoded = quantize_values(config, values, client_ids, key)

    new_residuals = None
    if config.error_feedback:
        if indices is None:
            new_residuals = acc_safe - decoded
        else:
            new_residuals = acc_safe - scatter(decoded, indices, d_s)
    ok_values = finite_rows(decoded)
    if new_residuals is not None:
        ok_values &= finite_rows(new_residuals)
    included = finite & ok_values
    return _finish(config, layout, included, indices, values, (codes, minimum, maximum), dense,
                   new_residuals)


def _encode_own_range_dense(
    config: CompressorConfig,
    layout: Layout,
    flat: jax.Array,
    residuals: jax.Array | None,
    client_ids: jax.Array,
    present: jax.Array,
    key: jax.Array,
) -> Encoded:
    """Every coordinate of the sparse segment quantized with the client's own range (TFF's
    `quantize_above_threshold`), in two passes over `[C, d_s]`. The range pass also finds the
    clients with NaN/Inf (`quantize_rows`) and an overflowing decode is told from the range
    (`decodes_finite`), so neither needs a pass of its own; excluded clients' codes are
    computed but never sent (`_finish` zeroes them)."""
    sparse, dense = split(layout, flat)
    old_residuals = None if residuals is None else residuals.astype(jnp.float32)
    acc = sparse if old_residuals is None else sparse + old_residuals
    q, acc_finite = quantize_rows(acc, client_keys(key, client_ids, 1), config.bits)
    finite = present & acc_finite & finite_rows(dense)
    included = finite & decodes_finite(q)
    new_residuals = None
    if config.error_feedback:
        new_residuals = acc - dequantize(q)
        included &= finite_rows(new_residuals)
    return _finish(config, layout, included, None, acc, (q.packed, q.minimum, q.maximum), dense,
                   new_residuals)


def _encode_top_k(
    config: CompressorConfig,
    layout: Layout,
    flat: jax.Array,
    residuals: jax.Array | None,
    client_ids: jax.Array,
    present: jax.Array,
    key: jax.Array,
) -> Encoded:
    """Top-k selection, in as few passes over `[C, d_s]` as possible.

    With error feedback, `acc = x + residual` is written once, into the buffer that becomes
    the new residual: radix select's counting passes (`top_k_rows_words`: the passes run over
    the whole cohort, only the short per-client work client by client) read `acc` instead of
    `x` and `residual`, the k values are gathered from it, and one scatter of k entries per
    client overwrites the selected coordinates with what the server will not see (the
    quantization error, or 0 without quantization). An excluded client's row is then put back
    to its old residual.

    Gathers and scatters index `acc` as one flat vector when `C * d_s` fits int32
    (`config.flat_index_limit`): on XLA:CPU a 1-D gather is several times faster than
    `take_along_axis`, and the 1-D scatter's loop runs one kernel per update, not two.

    A client is excluded when it is absent or any entry of its `acc` is NaN/Inf: NaN and Inf
    rank above every finite magnitude, so they are selected first and checking the k selected
    values finds them (the rule of the module docstring).
    """
    c = flat.shape[0]
    sparse, dense = split(layout, flat)
    k, d_s = layout.k, layout.sparse_size
    flat_index = c * d_s <= config.flat_index_limit
    # Named scopes label the round's stages in profiles (`python -m bench.profile_round`).
    with jax.named_scope("acc"):
        if residuals is None:
            acc_flat = sparse.reshape(-1)
        else:
            acc_flat = sparse.reshape(-1) + residuals.astype(jnp.float32).reshape(-1)
        acc = acc_flat.reshape(c, d_s)
    with jax.named_scope("select"):
        _, indices = top_k_rows_words((acc,), lambda a: a, k, config.radix)
    with jax.named_scope("gather_values"):
        if flat_index:
            positions = (indices + jnp.arange(c, dtype=jnp.int32)[:, None] * d_s).reshape(-1)
            values = acc_flat[positions].reshape(c, k)
        else:
            values = jnp.take_along_axis(acc, indices, axis=1)
    finite = present & finite_rows(values) & finite_rows(dense)
    values = jnp.where(finite[:, None], values, 0.0)  # excluded clients send zeros (dropped)
    with jax.named_scope("quantize"):
        codes, minimum, maximum, decoded = quantize_values(config, values, client_ids, key)
    included = finite & finite_rows(decoded)

    new_residuals = None
    if config.error_feedback:
        # What the server will not see of the selected coordinates. Ascending, distinct, in
        # range: said so, XLA:CPU scatters in place.
        unseen = values - decoded if config.bits is not None else jnp.zeros_like(values)
        # The rest of the new residual is `acc`, finite for an included client; `unseen` can
        # overflow (values near +-3e38 decoded a step away): such a client is excluded.
        included &= finite_rows(unseen)
        scatter_options = dict(
            indices_are_sorted=True, unique_indices=True, mode="promise_in_bounds"
        )
        with jax.named_scope("residual_scatter"):
            if flat_index:
                new_residuals = acc_flat.at[positions].set(
                    unseen.reshape(-1), **scatter_options
                ).reshape(c, d_s)
            else:
                new_residuals = acc.at[jnp.arange(c)[:, None], indices].set(
                    unseen, **scatter_options
                )
    return _finish(config, layout, included, indices, values, (codes, minimum, maximum), dense,
                   new_residuals)


def encoder(config: CompressorConfig, layout: Layout) -> Callable[..., Encoded]:
    """The encoder for the layout's selector and the config's quantizer."""
    if layout.selector == "top_k":
        return _encode_top_k
    if layout.selector == "none" and config.quantizer == "own_range":
        return _encode_own_range_dense
    return _encode_generic


def encode(
    config: CompressorConfig,
    layout: Layout,
    flat: jax.Array,
    residuals: jax.Array | None,
    client_ids: jax.Array,
    present: jax.Array,
    key: jax.Array,
    restore: bool = True,
) -> Encoded:
    """Encodes a cohort chunk. flat float32 [C, d]; residuals [C, d_s] or None; present
    bool [C] (False for padding rows). With `restore=False` an excluded client's row of the
    new residuals and its norm are left for the caller to restore (`restore_excluded`)."""
    payload, new_residuals, report = encoder(config, layout)(
        config, layout, flat, residuals, client_ids, present, key
    )
    if restore:
        new_residuals, report = restore_excluded(new_residuals, report, residuals)
    return payload, new_residuals, report
