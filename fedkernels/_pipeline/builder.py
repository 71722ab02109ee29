"""`compressor(template, **options)`: a `Compressor`, its encoder, decoder and jitted round."""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedkernels import _sharding, _validate
from fedkernels._pipeline import aggregate as agg
from fedkernels._pipeline import encode as enc
from fedkernels._pipeline import round as rnd
from fedkernels._pipeline.aggregate import AggregateSums
from fedkernels._pipeline.config import CompressorConfig
from fedkernels._pipeline.encode import ClientReport, Payload
from fedkernels._pipeline.layout import Layout, make_layout
from fedkernels._pipeline.round import RoundResult

# Compiled rounds kept per compressor (one per chunking, mesh and update function).
ROUND_CACHE_SIZE = 8


class _Compiled:
    """The jitted functions of one (config, layout); shared by equal compressors."""

    def __init__(self, config: CompressorConfig, layout: Layout) -> None:
        self.config, self.layout = config, layout
        self.encode = jax.jit(functools.partial(enc.encode, config, layout))
        self.aggregate = jax.jit(
            lambda payload, included, weights: agg.aggregate(
                config, layout, payload, weights, included
            )
        )
        self.finalize = jax.jit(lambda sums: layout.unflatten(agg.finalize(config, layout, sums)))
        self.rounds = rnd.BoundedCache(ROUND_CACHE_SIZE)

    def round_function(
        self, chunk_size: int | None, mesh: Any, update_fn: Any, has_residuals: bool
    ) -> Any:
        return self.rounds.get(
            (chunk_size, mesh, update_fn, has_residuals),
            lambda: rnd.round_function(self.config, self.layout, chunk_size, mesh, update_fn),
        )


@functools.lru_cache(maxsize=64)
def _compiled(config: CompressorConfig, layout: Layout) -> _Compiled:
    # Compressors made again for the same model and settings (a new configuration run, a
    # test) reuse the compiled functions instead of recompiling. Bounded.
    return _Compiled(config, layout)


class Compressor:
    """A batched update compressor built by `fedkernels.compressor`: static `config` and
    `layout`, and pure functions of a cohort (`encode`, `aggregate`, `finalize`, `decode`,
    `round`). Compressors are cheap to rebuild: equal settings on an equal model share their
    compiled functions."""

    __slots__ = ("config", "layout", "_compiled")

    def __init__(self, config: CompressorConfig, layout: Layout) -> None:
        self.config = config
        self.layout = layout
        # `on_nonfinite` is checked after the round; the compiled functions do not depend on it.
        self._compiled = _compiled(dataclasses.replace(config, on_nonfinite="exclude"), layout)

    def __repr__(self) -> str:
        return f"Compressor(config={self.config!r}, layout={self.layout!r})"

    def encode(
        self, updates: Any, residuals: Any, client_ids: Any, key: Any
    ) -> tuple[Payload, jax.Array | None, ClientReport]:
        """Encodes a cohort (client side, every client at once).

        Args:
          updates: pytree of the template's structure, leaves `[C, *leaf_shape]` (float,
            computed in float32).
          residuals: float32 `[C, d_s]` with error feedback (zeros in the first round), else
            None.
          client_ids: int `[C]`, the clients' ids (their quantization and random-k draws are
            `fold_in(key, client_id)`), or None for `arange(C)`.
          key: a `jax.random` key (the round's).

        Returns:
          `(payload, new_residuals, report)`: `Payload` rows (one per client; excluded
          clients' rows are zeros), new residuals float32 `[C, d_s]` (None without error
          feedback; an excluded client keeps its old row), and a `ClientReport` (`included`
          bool `[C]`, `residual_norm` float32 `[C]`).
        """
        c = rnd.check_updates(self.layout, updates)
        ids, residuals, _ = rnd.check_cohort(
            self.layout, self.config, c, client_ids, residuals, None
        )
        key = rnd.check_key(key)
        flat = rnd.flat_updates(self.layout, updates)
        if c == 0:  # empty results of the shapes a cohort of one would get
            shapes = jax.eval_shape(
                self._compiled.encode, jnp.zeros((1, self.layout.size), jnp.float32),
                None if residuals is None else jnp.zeros((1, self.layout.sparse_size)),
                jnp.zeros((1,), jnp.int32), jnp.ones((1,), jnp.bool_), key,
            )
            return jax.tree_util.tree_map(
                lambda s: jnp.zeros((0, *s.shape[1:]), s.dtype), shapes
            )
        return self._compiled.encode(flat, residuals, ids, jnp.ones((c,), jnp.bool_), key)

    def aggregate(self, payload: Payload, included: Any, weights: Any = None) -> AggregateSums:
        """The server's partial sums over a cohort's payloads (add them across chunks or
        devices, then `finalize`).

        Args:
          payload: what `encode` returned, rows `[C, ...]`.
          included: bool `[C]`: the clients to count (`report.included`).
          weights: float `[C]`, finite and >= 0, or None (all 1). Not allowed with
            `shared_range`. The sums are not rescaled here (they must add up across calls):
            keep `sum(weights) * max|value|` within float32 range, or use `decode`/`round`,
            which rescale the weights (`normalized`).

        Raises:
          ValueError: `included` or `weights` not of shape `[C]`; a negative, NaN or Inf
            weight (checked when the weights are concrete, not under jit).
        """
        _check_type("payload", payload, Payload, "encode")
        c = payload.dense.shape[0]
        included = rnd.check_included(included, c)
        weights = rnd.check_weights(self.config, weights, c)
        return self._compiled.aggregate(payload, included, weights)

    def finalize(self, sums: AggregateSums) -> Any:
        """The mean update from summed `AggregateSums` (a pytree shaped like the template:
        floating leaves in their dtype, integer ones float32); 0 where nothing arrived.
        Raises TypeError when `sums` is not `AggregateSums`."""
        _check_type("sums", sums, AggregateSums, "aggregate")
        return self._compiled.finalize(sums)

    def decode(self, payload: Payload, included: Any, weights: Any = None) -> Any:
        """The server's mean update from a cohort's payloads: `finalize(aggregate(payload,
        included, weights / max(weights)))` (the same mean, without overflow for large finite
        weights). Arguments and errors as `aggregate`."""
        _check_type("payload", payload, Payload, "encode")
        if weights is not None:
            c = payload.dense.shape[0]
            weights = rnd.normalized(rnd.check_weights(self.config, weights, c))
        return self.finalize(self.aggregate(payload, included, weights))

    def round(
        self,
        updates: Any,
        key: Any,
        *,
        client_ids: Any = None,
        residuals: Any = None,
        weights: Any = None,
        chunk_size: int | None = None,
        mesh: Any = None,
    ) -> RoundResult:
        """A whole round in one jit: every client's encoding and the server's mean.

        Args:
          updates: pytree with leaves `[C, *leaf_shape]`, or a function
            `client_ids_chunk -> such a pytree`, evaluated chunk by chunk so `[C, d]` is never
            materialised (then `client_ids` is required). Compiles once per (cohort size,
            chunk_size, mesh, update function): pass the same function object every round.
          key: a `jax.random` key.
          client_ids: int `[C]` or None (`arange(C)`).
          residuals: float32 `[C, d_s]` with error feedback, else None.
          weights: float `[C]`, finite and >= 0, or None (all 1). Checked when concrete;
            under `jit` a negative, NaN or Inf weight counts as 0. A client of weight 0 counts
            nowhere (not as a contributor) and keeps its old residual row.
          chunk_size: clients per step of a `lax.scan` over the cohort, or None (all at once).
          mesh: a one-axis `jax.sharding.Mesh` over which the cohort is sharded
            (`fedkernels.client_mesh()`), or None.

        Returns:
          `RoundResult(mean, residuals, metrics)`.

        Raises:
          ValueError: shapes that disagree with the template (the message names the leaf or
            prints both tree structures), missing or extra residuals, weights of the wrong
            shape or negative/NaN/Inf (when concrete), a batch of keys, an update function
            that returns another number of clients than ids it was given; with
            `on_nonfinite="raise"`, a client with NaN/Inf, or a call under `jax.jit`.
          TypeError: `key` that is not a `jax.random` key (e.g. an int), `mesh` that is not a
            `jax.sharding.Mesh`.

        Weights are rescaled by their maximum before use (the same mean; large finite
        weights such as 2e38 do not overflow).
        """
        if chunk_size is not None:
            chunk_size = _validate.static_int("chunk_size", chunk_size, 1)
        if mesh is not None and not isinstance(mesh, jax.sharding.Mesh):
            raise TypeError(
                "mesh must be a jax.sharding.Mesh (fedkernels.client_mesh()) or None, got "
                f"{type(mesh).__name__} {mesh!r}"
            )
        layout, config = self.layout, self.config
        update_fn = updates if callable(updates) else None
        if update_fn is not None:
            if client_ids is None:
                raise ValueError("client_ids must be given when updates is a function, got None")
            if np.ndim(client_ids) != 1:
                raise ValueError(
                    "client_ids must be [C], one id per client, when updates is a function, "
                    f"got shape {np.shape(client_ids)}"
                )
            c = int(np.shape(client_ids)[0])
        else:
            c = rnd.check_updates(layout, updates)
        ids, residuals, weights = rnd.check_cohort(layout, config, c, client_ids, residuals,
                                                   weights)
        key = rnd.check_key(key)
        present = jnp.ones((c,), jnp.bool_)
        if c == 0:
            sums = agg.zero_sums(config, layout)
            report = ClientReport(jnp.zeros((0,), jnp.bool_), jnp.zeros((0,), jnp.float32))
            mean = layout.unflatten(agg.finalize(config, layout, sums))
            arrays = rnd.metric_arrays(layout, sums, report, present)
            return RoundResult(mean, residuals, rnd.round_metrics(layout, 0, arrays))
        if mesh is not None:
            ids, residuals, weights, present, updates = _sharding.pad_to_devices(
                mesh, ids, residuals, weights, present, None if update_fn else updates
            )
        fn = self._compiled.round_function(chunk_size, mesh, update_fn, residuals is not None)
        mean, new_res, arrays = fn(
            None if update_fn else updates, residuals, ids, weights, present, key
        )
        if new_res is not None and new_res.shape[0] != c:
            new_res = new_res[:c]
        result = RoundResult(mean, new_res, rnd.round_metrics(layout, c, arrays))
        if config.on_nonfinite != "raise":
            return result
        if isinstance(result.metrics.num_excluded, jax.core.Tracer):
            raise ValueError(
                "on_nonfinite='raise' cannot be used under jax.jit or vmap (the check reads "
                "metrics.num_excluded on the host); use on_nonfinite='exclude' there and "
                "read metrics.num_excluded / metrics.excluded"
            )
        if int(result.metrics.num_excluded) > 0:
            bad = np.flatnonzero(np.asarray(result.metrics.excluded))
            raise ValueError(
                f"updates must be finite (on_nonfinite='raise'), got {bad.size} client(s) with "
                f"NaN/Inf: cohort positions {bad[:10].tolist()}"
            )
        return result


def _check_type(name: str, value: Any, expected: type, producer: str) -> None:
    if not isinstance(value, expected):
        raise TypeError(
            f"{name} must be the {expected.__name__} that Compressor.{producer} returns, got "
            f"{type(value).__name__}"
        )


def compressor(template: Any, /, **options: Any) -> Compressor:
    """Builds a batched update compressor: client encoder, server decoder, jitted round.

    Top-k sparsification, global over the flattened model (Aji & Heafield 2017; Lin et al.
    2018, DGC), with error feedback (Stich et al. 2018; Karimireddy et al. 2019) and unbiased
    stochastic quantization of the kept values (Suresh et al. 2017), as TFF's
    `quantize_above_threshold` does for dense tensors.

    Per client c (rows of a cohort, all clients at once): `acc = update + residual`;
    select k coordinates of the sparse segment (leaves with more than `dense_threshold`
    elements): top-k by magnitude (ties to the lower index), or k uniformly random ones
    (random-k; when error feedback is off and `aggregation="mean"` the server scales the mean
    by d_s/k, so it is unbiased; the masked mean averages the senders); quantize the k values
    to `bits` bits with the client's own [min, max] (or the shared range); bit-pack codes and
    indices (ceil(log2 d_s) bits each). The dense segment is sent as float32. With error
    feedback the new residual is `acc - decoded(sent)` (selection and quantization error), so
    `scatter(decoded) + new_residual == acc` up to float32 rounding (exactly when `bits` is
    None). Randomness is `fold_in(key, client_id)`.

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
      top_k_fraction: None, or the share in (0, 1] of the sparse segment each client sends:
        k = ceil(top_k_fraction * d_s), at least 1 (`layout.top_k_size`).
      top_k_count: None, or k itself, an int in [1, d_s]. Give at most one of the two;
        neither sends every coordinate of the sparse segment.
      error_feedback: keep what is not sent in a per-client residual (float32 `[C, d_s]`,
        see `fedkernels.residual_store` for N clients).
      bits: None (float32 values) or int in [1, 16].
      dense_threshold: int >= 0: leaves with at most this many elements are sent whole as
        float32 (the dense segment); None (the default) chooses by the settings: 0 (every
        leaf compressed) with top-k or random-k, 1000 with quantization alone (biases and
        other small leaves stay exact), 0 without compression. A setting that leaves no
        leaf to compress is refused; one that compresses less than 90% of the parameters
        warns (`layout.compressed_fraction`). TFF's `quantize_above_threshold` uses 20000.
      random_k: choose the k coordinates uniformly at random instead of by magnitude.
      shared_range: None or (lo, hi), finite, lo < hi; needs `bits`.
      aggregation: "mean" or "masked_mean".
      on_nonfinite: "exclude" or "raise".
      backend: the JAX backend the functions run on ("cpu", "gpu", "tpu"), or None for
        `jax.default_backend()` (read once, here). Chooses the defaults of `radix`.
      radix: how top-k selection runs (`fedkernels.RadixConfig`: batched rows mapped
        or vmapped, the prefix-sum method, the row length from which radix select replaces
        `lax.top_k`), or None for the defaults of `backend`. Every choice gives the same
        result.
      flat_index_limit: largest `C * d_s` whose positions are indexed as one flat int32
        vector (faster on CPU); larger cohorts index in 2-D. The default is int32's limit.
        A round with `chunk_size` indexes its chunks in 2-D whatever the limit.

    Returns:
      A `Compressor` with `config`, `layout` (sizes, `payload_bytes`, `compression_ratio`)
      and the methods `encode`, `aggregate`, `finalize`, `decode` and `round` (see their
      help).

    Raises:
      ValueError: a setting out of range (named with its value), e.g. `top_k_count=0`,
        `bits=17`, `shared_range=(1, 1)`, `aggregation="median"`; or at call time shapes
        that disagree with the template; `dense_threshold` leaving no leaf to compress.
      TypeError: a setting of the wrong type, an unknown option (`top_k=` says to use
        `top_k_fraction` or `top_k_count`), or a template leaf that is not an array.

    Warns:
      UserWarning: less than 90% of the parameters are in compressed leaves (it names
        `dense_threshold` and the share).

    >>> import jax, jax.numpy as jnp
    >>> comp = compressor({"w": jnp.zeros((1000,))}, top_k_fraction=0.01, bits=8)
    >>> comp.layout.k, comp.layout.index_bits, comp.layout.payload_bytes
    (10, 10, 80)
    >>> updates = {"w": jnp.zeros((3, 1000)).at[:, 7].set(1.0)}
    >>> result = comp.round(updates, jax.random.PRNGKey(0))
    >>> float(result.mean["w"][7]), result.metrics.as_dict()["uploaded_bytes"]
    (1.0, 240)
    """
    config = CompressorConfig(**_check_options(options))
    return Compressor(config, make_layout(template, config))


def _check_options(options: dict[str, Any]) -> dict[str, Any]:
    if "top_k" in options:
        raise TypeError(
            f"compressor() takes top_k_fraction or top_k_count, not top_k (got top_k="
            f"{options['top_k']!r}): top_k_fraction=0.01 keeps 1% of the compressed "
            "coordinates, top_k_count=25 keeps 25 of them"
        )
    names = [f.name for f in dataclasses.fields(CompressorConfig)]
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise TypeError(f"compressor() got unknown option(s) {unknown}; the options are {names}")
    return options


def _signature() -> inspect.Signature:
    """compressor's signature, from CompressorConfig's fields (the one declaration)."""
    template = inspect.Parameter("template", inspect.Parameter.POSITIONAL_ONLY, annotation=Any)
    options = [
        inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default,
                          annotation=f.type)
        for f in dataclasses.fields(CompressorConfig)
    ]
    return inspect.Signature([template, *options], return_annotation=Compressor)


compressor.__signature__ = _signature()
