"""A whole round in one jit: cohort checks, chunking (`lax.scan`), sharding (`shard_map`
over a client mesh), and the round's metrics."""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fedkernels import _sharding, _validate
from fedkernels._flatten import flatten
from fedkernels._masked import scale_tiny_weights
from fedkernels._pipeline import aggregate as agg
from fedkernels._pipeline.aggregate import AggregateSums
from fedkernels._pipeline.config import CompressorConfig
from fedkernels._pipeline.encode import ClientReport, encode, restore_excluded
from fedkernels._pipeline.layout import Layout


class RoundMetrics(NamedTuple):
    """Measurements of one round. Array fields are device values computed in the round's
    jit; `as_dict()` gives the scalar ones as Python numbers, keyed by their field names.

    Attributes:
      num_clients: C, the cohort size (clients).
      payload_bytes_per_client: bytes one included client uploads (`Layout.payload_bytes`).
      uncompressed_bytes_per_client: bytes of one client's whole update as float32, d * 4
        (the baseline of `compression_ratio`).
      num_included: int32 scalar, clients whose payload was sent (present and not excluded).
      bytes_per_client: int32 `[C]`, bytes each client uploaded (0 for an excluded one).
      num_excluded: int32 scalar, clients left out: NaN/Inf in their update or residual, or
        an encoding that would overflow float32 (a quantization range wider than 3.4e38).
      excluded: bool `[C]`, which clients were left out.
      residual_norm: float32 `[C]`, L2 norm of each client's new residual (0 without error
        feedback).
      contributors_touched: int32 scalar, coordinates of the compressed leaves sent by at
        least one client of positive weight.
      contributors_max: int32 scalar, most clients that sent one coordinate.
      contributors_mean: float32 scalar, clients per touched coordinate, on average.
      residual_norm_mean: float32 scalar, mean residual norm over included clients (0 if
        none).
      residual_norm_max: float32 scalar, largest residual norm over included clients (0 if
        none).
    """

    num_clients: int
    payload_bytes_per_client: int
    uncompressed_bytes_per_client: int
    num_included: jax.Array  # shape=[], dtype=int32
    bytes_per_client: jax.Array  # shape=[C], dtype=int32
    num_excluded: jax.Array  # shape=[], dtype=int32
    excluded: jax.Array  # shape=[C], dtype=bool
    residual_norm: jax.Array  # shape=[C], dtype=float32
    contributors_touched: jax.Array  # shape=[], dtype=int32
    contributors_max: jax.Array  # shape=[], dtype=int32
    contributors_mean: jax.Array  # shape=[], dtype=float32
    residual_norm_mean: jax.Array  # shape=[], dtype=float32
    residual_norm_max: jax.Array  # shape=[], dtype=float32

    @property
    def uploaded_bytes(self) -> Any:
        """Bytes the cohort uploaded: `payload_bytes_per_client * num_included`, an exact
        Python int (a cohort passes 2**31 bytes easily: 100 clients of a 25M-parameter model
        at 8 bits); under a caller's `jit`, where the count is traced, a float32 scalar."""
        if isinstance(self.num_included, jax.core.Tracer):
            return self.num_included.astype(jnp.float32) * jnp.float32(
                self.payload_bytes_per_client)
        return int(self.num_included) * self.payload_bytes_per_client

    @property
    def compression_ratio(self) -> float:
        """uncompressed_bytes_per_client / payload_bytes_per_client (inf for an empty
        payload)."""
        if not self.payload_bytes_per_client:
            return float("inf")
        return self.uncompressed_bytes_per_client / self.payload_bytes_per_client

    def as_dict(self) -> dict[str, Any]:
        """The scalar fields, `uploaded_bytes` and `compression_ratio` as Python numbers,
        keyed by their names, for logs and JSON. Reads only the scalar fields, which every
        process holds whole, so it also works when the cohort spans several processes
        (`jax.distributed`); the per-client fields (`bytes_per_client`, `excluded`,
        `residual_norm`) are then sharded like the cohort and are left out."""
        out: dict[str, Any] = {}
        for name, value in zip(self._fields, self, strict=True):
            if name in _PER_CLIENT:
                continue
            if isinstance(value, int):
                out[name] = value
            elif jnp.issubdtype(value.dtype, jnp.integer):
                out[name] = int(value)
            else:
                out[name] = float(value)
        out["uploaded_bytes"] = self.uploaded_bytes
        out["compression_ratio"] = self.compression_ratio
        return out


class RoundResult(NamedTuple):
    """What `Compressor.round` returns.

    Attributes:
      mean: the server's aggregate, a pytree shaped like the template: each floating leaf
        in its template dtype (computed in float32), an integer leaf as float32.
      residuals: float32 `[C, d_s]`, the clients' new residuals (error feedback), else None;
        an excluded client's or one of weight 0 is its old row.
      metrics: the round's `RoundMetrics`.
    """

    mean: Any
    residuals: jax.Array | None
    metrics: RoundMetrics


_PER_CLIENT = ("bytes_per_client", "excluded", "residual_norm")


def metric_arrays(
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
        num_included=num_included,
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


def round_metrics(layout: Layout, c: int, arrays: dict[str, jax.Array]) -> RoundMetrics:
    return RoundMetrics(
        num_clients=c, payload_bytes_per_client=layout.payload_bytes,
        uncompressed_bytes_per_client=layout.uncompressed_bytes,
        **{name: a[:c] if name in _PER_CLIENT else a for name, a in arrays.items()},
    )


def check_updates(layout: Layout, updates: Any, what: str = "updates") -> int:
    """C, the cohort size of `updates` (the template's tree, leaves `[C, *leaf_shape]`), or a
    ValueError that says which part differs: the tree structure, or a leaf's shape."""
    leaves, treedef = jax.tree_util.tree_flatten(updates)
    if treedef != layout.unflatten.treedef:
        raise ValueError(
            f"{what} must have the tree structure of the template; template "
            f"{layout.unflatten.treedef}, got {treedef}"
        )
    c = None
    for i, (leaf, shape) in enumerate(zip(leaves, layout.unflatten.shapes, strict=True)):
        got = tuple(np.shape(leaf))
        if got[1:] != shape or len(got) != len(shape) + 1:
            raise ValueError(
                f"{what} must hold the template's leaves with a leading client axis "
                f"[C, *leaf_shape]; leaf {i}: template shape {shape}, so [C, *{shape}], got {got}"
            )
        if c is None:
            c = got[0]
        elif got[0] != c:
            raise ValueError(
                f"{what} leaves must share the client axis; leaf 0 has {c} clients, leaf {i} "
                f"has {got[0]}"
            )
    if c is None:
        raise ValueError(f"{what} must have at least one leaf, got an empty pytree")
    return int(c)


def flat_updates(layout: Layout, updates: Any, what: str = "updates") -> jax.Array:
    """updates pytree [C, ...] -> float32 [C, d], checked against the template."""
    check_updates(layout, updates, what)
    flat, _ = flatten(updates, batch_ndim=1, dtype=jnp.float32)
    return flat


def check_key(key: Any) -> jax.Array:
    """One `jax.random` key (typed, shape (), or raw uint32 [n]), else an error naming `key`."""
    if isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.shape != ():
            raise ValueError(
                f"key must be a single jax.random key, got a batch of keys of shape "
                f"{tuple(key.shape)}"
            )
        return key
    if isinstance(key, bool | int | float) or not hasattr(key, "dtype"):
        raise TypeError(
            "key must be a jax.random key (jax.random.key(seed) or jax.random.PRNGKey(seed)), "
            f"got {type(key).__name__} {key!r}"
        )
    if key.dtype != jnp.uint32 or key.ndim == 0:
        raise TypeError(
            "key must be a jax.random key (jax.random.key(seed) or jax.random.PRNGKey(seed)), "
            f"got an array of dtype {key.dtype} and shape {tuple(key.shape)}"
        )
    if key.ndim != 1:
        raise ValueError(
            f"key must be a single jax.random key, got a batch of keys of shape "
            f"{tuple(key.shape)}"
        )
    return key


def check_included(included: Any, c: int) -> jax.Array:
    """bool [C], one flag per client."""
    included = _validate.as_array("included", included)
    _validate.same_shape("included", included, (c,), "one flag per client")
    return included.astype(jnp.bool_)


def check_weights(config: CompressorConfig, weights: Any, c: int) -> jax.Array:
    """float32 [C], finite and >= 0 (checked when concrete; under jit an invalid weight counts
    as 0); None: ones."""
    if weights is None:
        return jnp.ones((c,), jnp.float32)
    if config.shared_range is not None:
        raise ValueError("weights must be None in shared_range mode (codes are summed "
                         "unweighted, as secure aggregation would), got an array")
    return _validate.weights_vector("weights", weights, c).astype(jnp.float32)


def normalized(weights: jax.Array) -> jax.Array:
    """weights / max(weights): the same mean, and no overflow of their sum or of the
    weighted sums however large the finite weights are (ones stay ones, bit for bit).

    The divisor is clipped to [2**-126, 2**126], so that its reciprocal (XLA may divide by
    multiplying with it) is a normal float32 and not flushed to zero: beyond 2**126 the
    largest weight becomes at most 4 instead of 1.

    Weights all below 2**-100 are first scaled up exactly (`scale_tiny_weights`): XLA on CPU
    reads subnormal inputs as 0, so `[1e-40, 1e-40]` would otherwise weigh nothing, where it
    gives the mean of `[1, 1]`."""
    weights = scale_tiny_weights(weights)
    top = jnp.max(weights, initial=0.0)
    scale = jnp.clip(top, jnp.float32(2.0**-126), jnp.float32(2.0**126))
    return jnp.where(top > 0, weights / scale, weights)


def check_cohort(
    layout: Layout, config: CompressorConfig, c: int, client_ids: Any, residuals: Any,
    weights: Any,
) -> tuple[jax.Array, jax.Array | None, jax.Array]:
    """(client ids int32 [C], residuals [C, d_s] or None, weights float32 [C]), checked."""
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
    return client_ids.astype(jnp.int32), residuals, check_weights(config, weights, c)


def round_flat(
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

    def one_chunk(upd, res, ids, w, pres, restore=True):
        what = "updates"
        if callable(upd):
            upd = upd(ids)
            what = "updates(client_ids)"
        flat = flat_updates(layout, upd, what)
        if flat.shape[0] != ids.shape[0]:
            raise ValueError(
                f"{what} must give one row per client id: {ids.shape[0]} ids, got "
                f"{flat.shape[0]} rows"
            )
        payload, new_res, report = encode(config, layout, flat, res, ids, pres, key,
                                          restore=False)
        with jax.named_scope("server_sums"):
            sums = agg.aggregate(config, layout, payload, w, report.included)
        if restore:
            new_res, report = restore_excluded(new_res, report, res, w)
        return sums, new_res, report

    if chunk_size is None or chunk_size >= c:
        return one_chunk(updates, residuals, client_ids, weights, present)
    n = -(-c // chunk_size)
    pad = n * chunk_size - c
    # Inside the chunk loop, a flat view of `acc` for the gather and scatter made XLA compute
    # `acc` twice (once per shape); 2-D indices keep one (bench case `chunked_round`).
    config = dataclasses.replace(config, flat_index_limit=0)

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
        # Excluded clients' old residual rows are put back once, after the chunks, from the
        # whole residual array (`restore_excluded`): inside the loop that would copy each
        # chunk's old rows out first.
        sums, new_res, report = one_chunk(
            upd, x.get("residuals"), x["ids"], x["w"], x["present"], restore=False
        )
        return agg.add_sums(carry, sums), (new_res, report)

    sums, (new_res, report) = lax.scan(body, agg.zero_sums(config, layout), xs)

    def unchunk(a):
        return a.reshape(n * chunk_size, *a.shape[2:])[:c]

    new_res = None if new_res is None else unchunk(new_res)
    new_res, report = restore_excluded(
        new_res, ClientReport(*(unchunk(a) for a in report)), residuals, weights
    )
    return sums, new_res, report


def round_function(
    config: CompressorConfig, layout: Layout, chunk_size: int | None, mesh: Any,
    update_fn: Callable | None,
) -> Callable:
    """The jitted round `(updates, residuals, ids, weights, present, key) -> (mean, new
    residuals, metric arrays)` for one chunking, mesh and update function."""

    def run(updates, residuals, ids, weights, present, key):
        weights = normalized(weights)
        upd = update_fn if update_fn is not None else updates
        if mesh is None:
            sums, new_res, report = round_flat(
                config, layout, upd, residuals, ids, weights, present, key, chunk_size
            )
        else:
            sums, new_res, report = _sharding.sharded_round(
                lambda u, r, i, w, p: round_flat(config, layout, u, r, i, w, p, key, chunk_size),
                mesh, upd, residuals, ids, weights, present,
            )
        mean = layout.unflatten(agg.finalize(config, layout, sums))
        return mean, new_res, metric_arrays(layout, sums, report, present)

    return jax.jit(run)


class BoundedCache:
    """A small least-recently-used map: compiled rounds per (chunking, mesh, update function).

    Bounded so that a caller who passes a new function object every round (each one a new
    key, and a recompilation) does not grow it without end."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._items: collections.OrderedDict[Any, Any] = collections.OrderedDict()

    def get(self, key: Any, make: Callable[[], Any]) -> Any:
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        value = self._items[key] = make()
        while len(self._items) > self.maxsize:
            self._items.popitem(last=False)
        return value

    def __len__(self) -> int:
        return len(self._items)
