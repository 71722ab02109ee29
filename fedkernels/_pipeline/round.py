"""A whole round in one jit: cohort checks, chunking (`lax.scan`), sharding (`shard_map`
over a client mesh), and the round's metrics."""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from fedkernels import _sharding, _validate
from fedkernels._flatten import flatten
from fedkernels._pipeline import aggregate as agg
from fedkernels._pipeline.aggregate import AggregateSums
from fedkernels._pipeline.config import CompressorConfig
from fedkernels._pipeline.encode import ClientReport, encode
from fedkernels._pipeline.layout import Layout


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


def round_metrics(layout: Layout, c: int, arrays: dict[str, jax.Array]) -> RoundMetrics:
    return RoundMetrics(
        num_clients=c, payload_bytes=layout.payload_bytes, dense_bytes=layout.dense_bytes,
        **{name: a[:c] if name in _PER_CLIENT else a for name, a in arrays.items()},
    )


def flat_updates(layout: Layout, updates: Any) -> jax.Array:
    """updates pytree [C, ...] -> float32 [C, d], checked against the template."""
    flat, unflatten = flatten(updates, batch_ndim=1, dtype=jnp.float32)
    if (unflatten.treedef, unflatten.shapes) != (layout.unflatten.treedef, layout.unflatten.shapes):
        raise ValueError(
            "updates must have the structure and leaf shapes of the template with a leading "
            f"client axis; template {layout.unflatten.shapes}, got {unflatten.shapes}"
        )
    return flat


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
    if weights is None:
        weights = jnp.ones((c,), jnp.float32)
    else:
        weights = _validate.weights_vector("weights", weights, c).astype(jnp.float32)
        if config.shared_range is not None:
            raise ValueError("weights must be None in shared_range mode (codes are summed "
                             "unweighted, as secure aggregation would), got an array")
    return client_ids.astype(jnp.int32), residuals, weights


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

    def one_chunk(upd, res, ids, w, pres):
        if callable(upd):
            upd = upd(ids)
        flat = flat_updates(layout, upd)
        payload, new_res, report = encode(config, layout, flat, res, ids, pres, key)
        sums = agg.aggregate(config, layout, payload, w, report.included)
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
        return agg.add_sums(carry, sums), (new_res, report)

    sums, (new_res, report) = lax.scan(body, agg.zero_sums(config, layout), xs)

    def unchunk(a):
        return a.reshape(n * chunk_size, *a.shape[2:])[:c]

    new_res = None if new_res is None else unchunk(new_res)
    return sums, new_res, ClientReport(*(unchunk(a) for a in report))


def round_function(
    config: CompressorConfig, layout: Layout, chunk_size: int | None, mesh: Any,
    update_fn: Callable | None,
) -> Callable:
    """The jitted round `(updates, residuals, ids, weights, present, key) -> (mean, new
    residuals, metric arrays)` for one chunking, mesh and update function."""

    def run(updates, residuals, ids, weights, present, key):
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
