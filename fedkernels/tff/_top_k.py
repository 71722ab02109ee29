"""Global top-k sparsification: `TopKFactory` / `top_k_factory`, and the server side of sparse
masked averaging (`sparse_masked_mean_process`, shared with error feedback)."""

from __future__ import annotations

import collections
from typing import Any

import jax.numpy as jnp
import numpy as np

import fedkernels as fk
from fedkernels.tff import _kernels as kernels
from fedkernels.tff._staging import (
    _INDEX_BYTES,
    _check_floats,
    _check_weight_type,
    _Layout,
    _server_constant,
    staged,
    tf,
    tff,
)


def _sparse_mean_computations(d: int, k: int, value_dtype: Any, weight_type: Any) -> dict:
    """The server side of sparse masked averaging: `federated_aggregate` pieces over `(values
    float[k], indices int32[k], weight)` that scatter-add into dense accumulators (float64
    values in float64: JAX's steps then run in 64-bit mode)."""
    x64 = np.dtype(value_dtype) == np.float64
    acc_dtype = np.dtype(jnp.promote_types(value_dtype, jnp.float32))
    encoded_type = tff.StructWithPythonType(
        [tff.TensorType(value_dtype, [k]), tff.TensorType(np.int32, [k]), weight_type], tuple
    )

    @tff.tensorflow.computation
    def zero_fn():
        return collections.OrderedDict(
            numerator=tf.zeros([d], acc_dtype),
            denominator=tf.zeros([d], acc_dtype),
            contributions=tf.zeros([], tf.int32),
            invalid_weights=tf.zeros([], tf.int32),
        )

    accumulator_type = zero_fn.type_signature.result

    def accumulate(acc, encoded):
        values, indices, weight = encoded
        w = jnp.reshape(weight, (1,)).astype(acc_dtype)
        # A negative, NaN or infinite weight leaves this client out (see _valid_weight).
        ok = jnp.isfinite(w) & (w >= 0)
        w = jnp.where(ok, w, 0)
        total, weight_sum, contributions = kernels.sparse_sums(values[None], indices[None], d, w)
        return collections.OrderedDict(
            numerator=acc["numerator"] + total,
            denominator=acc["denominator"] + weight_sum,
            contributions=acc["contributions"] + contributions,
            invalid_weights=acc["invalid_weights"] + jnp.sum(~ok, dtype=jnp.int32),
        )

    @tff.tensorflow.computation(accumulator_type, encoded_type)
    def accumulate_fn(acc, encoded):
        return staged(accumulate, x64)(acc, encoded)

    @tff.tensorflow.computation(accumulator_type, accumulator_type)
    def merge_fn(a, b):
        return tf.nest.map_structure(tf.add, a, b)

    @tff.tensorflow.computation(accumulator_type)
    def report_fn(acc):
        return acc

    return dict(
        encoded_type=encoded_type,
        zero_fn=zero_fn,
        accumulate_fn=accumulate_fn,
        merge_fn=merge_fn,
        report_fn=report_fn,
        accumulator_type=accumulator_type,
        x64=x64,
    )


def _sparse_mean_process(
    d: int,
    k: int,
    value_dtype: Any,
    weight_type: Any,
    client_type: Any,
    encode_fn: Any,
    unflatten: Any = None,
    static_measurements: Any = None,
) -> Any:
    """The AggregationProcess of sparse masked averaging: each client's `(client value,
    weight)` goes through `encode_fn` to `(values float[k], indices int32[k], weight)`, the
    server scatter-adds them (`_sparse_mean_computations`) and returns the masked weighted
    mean, `unflatten`ed if given. Measurements: `static_measurements()` (server values) if
    given, then `invalid_weights` and `contributors`. State: `()`."""
    pieces = _sparse_mean_computations(d, k, value_dtype, weight_type)

    @tff.tensorflow.computation(pieces["accumulator_type"])
    def finish(acc):
        def fn(acc):
            mean = kernels.divide_no_nan(acc["numerator"], acc["denominator"]).astype(value_dtype)
            summary = kernels.contributor_summary(acc["contributions"], acc["denominator"])
            if unflatten is not None:
                mean = unflatten(mean)
            return mean, summary, acc["invalid_weights"]

        return staged(fn, pieces["x64"])(acc)

    @tff.federated_computation()
    def init_fn():
        return tff.federated_value((), tff.SERVER)

    @tff.federated_computation(
        init_fn.type_signature.result,
        tff.FederatedType(client_type, tff.CLIENTS),
        tff.FederatedType(weight_type, tff.CLIENTS),
    )
    def next_fn(state, value, weight):
        encoded = tff.federated_map(encode_fn, (value, weight))
        acc = tff.federated_aggregate(
            encoded, pieces["zero_fn"](), pieces["accumulate_fn"], pieces["merge_fn"],
            pieces["report_fn"],
        )
        mean, contributors, invalid = tff.federated_map(finish, acc)
        measurements = (
            collections.OrderedDict() if static_measurements is None else static_measurements()
        )
        measurements["invalid_weights"] = invalid
        measurements["contributors"] = contributors
        return tff.templates.MeasuredProcessOutput(state, mean, tff.federated_zip(measurements))

    return tff.templates.AggregationProcess(init_fn, next_fn)


def sparse_masked_mean_process(d: int, k: int, value_dtype: Any = np.float32,
                               weight_type: Any = None) -> Any:
    """An AggregationProcess over clients' already-sparse updates `(values[k], indices[k])`.

    `next(state, sparse@CLIENTS, weight@CLIENTS)`, with `sparse = (values: float[k], indices:
    int32[k])` (e.g. from `error_feedback_encoder`), returns the masked weighted mean as a dense
    `float[d]`: each coordinate averaged over the clients that sent it (`fedkernels.scatter_sum`
    into the accumulator, in TFF's `federated_aggregate`). Measurements: `contributors` as in
    `MaskedMeanFactory`. State: `()`.
    """
    weight_type = weight_type or tff.TensorType(np.float32)
    sparse_type = tff.StructWithPythonType(
        [tff.TensorType(value_dtype, [k]), tff.TensorType(np.int32, [k])], tuple
    )

    @tff.tensorflow.computation(sparse_type, weight_type)
    def pack(sparse, weight):
        return sparse[0], sparse[1], weight

    return _sparse_mean_process(d, k, np.dtype(value_dtype), weight_type, sparse_type, pack)


class TopKFactory(tff.aggregators.WeightedAggregationFactory):
    """Global top-k sparsification of the whole update, masked mean on the server.

    Each client flattens its update (`fedkernels.flatten`), keeps the k entries of largest
    magnitude (the set `fedkernels.top_k` selects; ties to the lower index) and sends `(values
    float[k], indices int32[k], weight)`. Without `inner`, the server scatter-adds them into
    dense numerator / denominator accumulators inside `federated_aggregate`
    (`fedkernels.scatter_sum`) and returns the masked weighted mean (`MaskedMeanFactory`'s
    semantics), unflattened to the value structure. With `inner` (a weighted factory), the
    client scatters its top-k into a dense update and `inner` aggregates that (for composing
    with secure or DP sums that need dense values; no transport compression then).

    Use `top_k_factory(fraction=...)` or `top_k_factory(k=...)`. Measurements:
    `bytes_sent` (per client: k values, k int32 indices, one weight in its dtype), `dense_bytes`,
    `compression_ratio`, and `contributors` (without inner) or `inner`.
    Error feedback needs per-client state, which TFF aggregators cannot hold: see
    `error_feedback_encoder`.
    """

    def __init__(self, fraction: float | None = None, k: int | None = None, inner: Any = None):
        kernels.check_k(k, fraction)
        if inner is not None and not isinstance(inner, tff.aggregators.WeightedAggregationFactory):
            raise TypeError(
                f"inner must be a tff.aggregators.WeightedAggregationFactory, "
                f"got {type(inner).__name__}"
            )
        self.fraction, self.k, self.inner = fraction, k, inner

    def create(self, value_type: Any, weight_type: Any) -> Any:
        _check_floats(value_type)
        _check_weight_type(weight_type)
        layout = _Layout(value_type)
        d = layout.d
        k = kernels.resolve_k(d, self.k, self.fraction)
        itemsize = layout.flat_dtype.itemsize
        bytes_sent = k * (itemsize + _INDEX_BYTES) + np.dtype(weight_type.dtype).itemsize
        dense_bytes = d * itemsize

        def static_measurements():
            return collections.OrderedDict(
                bytes_sent=_server_constant(np.int64(bytes_sent)),
                dense_bytes=_server_constant(np.int64(dense_bytes)),
                compression_ratio=_server_constant(np.float32(dense_bytes / bytes_sent)),
            )

        if self.inner is not None:
            return self._create_dense(layout, weight_type, k, static_measurements)

        @tff.tensorflow.computation(value_type, weight_type)
        def encode_fn(value, weight):
            def encode(value):
                flat, _ = fk.flatten(value, dtype=layout.flat_dtype)
                return kernels.top_k_unsorted(flat, k)

            # The weight passes outside the JAX step, keeping its own dtype (float64 too).
            values, indices = staged(encode, layout.x64)(value)
            return values, indices, weight

        return _sparse_mean_process(
            d, k, layout.flat_dtype, weight_type, value_type, encode_fn,
            unflatten=layout.unflatten, static_measurements=static_measurements,
        )

    def _create_dense(self, layout: _Layout, weight_type: Any, k: int, static_measurements):
        inner = self.inner.create(layout.value_type, weight_type)

        @tff.tensorflow.computation(layout.value_type)
        def sparsify(value):
            def fn(value):
                flat, _ = fk.flatten(value, dtype=layout.flat_dtype)
                values, indices = kernels.top_k_unsorted(flat, k)
                return layout.unflatten(fk.scatter(values, indices, layout.d))

            return staged(fn, layout.x64)(value)

        @tff.federated_computation(
            inner.initialize.type_signature.result,
            tff.FederatedType(layout.value_type, tff.CLIENTS),
            tff.FederatedType(weight_type, tff.CLIENTS),
        )
        def next_fn(state, value, weight):
            output = inner.next(state, tff.federated_map(sparsify, value), weight)
            measurements = static_measurements()
            measurements["inner"] = output.measurements
            return tff.templates.MeasuredProcessOutput(
                output.state, output.result, tff.federated_zip(measurements)
            )

        return tff.templates.AggregationProcess(inner.initialize, next_fn)

    def numpy_process(self) -> Any:
        if self.inner is not None:
            raise NotImplementedError("the numpy bridge runs top_k_factory without inner only")
        from fedkernels.tff import _bridge

        return _bridge.TopKProcess(fraction=self.fraction, k=self.k)


def top_k_factory(fraction: float | None = None, k: int | None = None, inner: Any = None) -> Any:
    """A `TopKFactory`: pass exactly one of `fraction` (of the flattened size d, rounded up)
    and `k`; `inner` optional (a weighted factory for the densified top-k updates)."""
    return TopKFactory(fraction=fraction, k=k, inner=inner)


