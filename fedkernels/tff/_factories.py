"""`tff.aggregators` factories whose client and server work is the fedkernels kernels.

The kernels with real work (quantization, top-k, scatter) run as `staged(kernel)`:
`jax2tf.convert(..., native_serialization=False, enable_xla=False, with_gradient=False)`, the
form TFF 0.87's C++ worker can run (no PyFunc, no XLA ops; see `_kernels.py` for which
primitives convert). The per-coordinate steps of the masked mean (compare, select, add) and
concatenation are TensorFlow ops, so every leaf keeps its dtype whatever JAX's x64 flag says;
`fedkernels.masked_sum` / `fedkernels.flatten` are their references in the tests. The
federated plumbing (`federated_map`, `federated_aggregate`, inner processes) follows TFF's
own factories (`mean.py`, `concat.py`, `encoded.py`).
"""

from __future__ import annotations

import atexit
import collections
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import fedkernels as fk
from fedkernels.tff import _deps
from fedkernels.tff import _kernels as kernels

tf = _deps.tf()
tff = _deps.tff()
jax2tf = _deps.jax2tf()
atexit.register(_deps.stop_local_workers)

_INDEX_BYTES = 4  # int32 indices


def staged(fn: Any) -> Any:
    """`fn` (a JAX function) as a TensorFlow function that TFF's worker can execute."""
    return jax2tf.convert(fn, native_serialization=False, enable_xla=False, with_gradient=False)


# ----------------------------------------------------------------------------------------------
# Types


def _specs(value_type: Any) -> Any:
    """The Python structure of `tf.TensorSpec`s for a TFF value type (as `concat.py` does)."""
    if isinstance(value_type, tff.TensorType):
        return tf.TensorSpec(value_type.shape, value_type.dtype)
    if isinstance(value_type, tff.StructWithPythonType) and tff.types.is_structure_of_tensors(
        value_type
    ):
        return tff.types.structure_from_tensor_type_tree(
            lambda t: tf.TensorSpec(t.shape, t.dtype), value_type
        )
    raise TypeError(
        "value_type must be a tff.TensorType or a tff.StructWithPythonType of tensors, "
        f"got {value_type!r}"
    )


def _check_floats(value_type: Any) -> None:
    if not tff.types.is_structure_of_floats(value_type):
        raise TypeError(f"all tensors in value_type must be floating, got {value_type}")


class _Layout:
    """Leaves of a value type in `jax.tree_util` order, and its `fedkernels.flatten` layout."""

    def __init__(self, value_type: Any):
        self.value_type = value_type
        self.specs = _specs(value_type)
        leaves, self.treedef = jax.tree_util.tree_flatten(self.specs)
        self.shapes = [tuple(int(n) for n in s.shape) for s in leaves]
        self.dtypes = [np.dtype(s.dtype.as_numpy_dtype) for s in leaves]
        self.sizes = [math.prod(s) for s in self.shapes]
        zeros = [np.zeros(s, t) for s, t in zip(self.shapes, self.dtypes, strict=True)]
        _, self.unflatten = fk.flatten(jax.tree_util.tree_unflatten(self.treedef, zeros))
        self.d = self.unflatten.size
        self.flat_dtype = np.dtype(self.unflatten.flat_dtype)
        self.flat_type = tff.TensorType(self.flat_dtype, [self.d])


def _resolve_k(d: int, k: int | None, fraction: float | None) -> int:
    if (k is None) == (fraction is None):
        raise ValueError(f"pass exactly one of k and fraction, got k={k!r}, fraction={fraction!r}")
    if k is not None:
        return fk._validate.static_int("k", k, 1, d)
    return kernels.k_from_fraction(fraction, d)


def _check_fraction(k: Any, fraction: Any) -> None:
    if (k is None) == (fraction is None):
        raise ValueError(f"pass exactly one of k and fraction, got k={k!r}, fraction={fraction!r}")
    if fraction is not None and not (isinstance(fraction, int | float) and 0 < fraction <= 1):
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    if k is not None:
        fk._validate.static_int("k", k, 1)


def _server_constant(value: Any) -> Any:
    return tff.federated_value(value, tff.SERVER)


# ----------------------------------------------------------------------------------------------
# Client weights and contributions, in TensorFlow ops
#
# The per-client pieces of the masked mean are a compare, a select and an add per coordinate.
# They are written with TensorFlow ops (not a converted JAX graph) because they then run in
# every leaf's own dtype (float16/32/64, whatever JAX's x64 flag says) and as TF's native
# kernels in TFF's worker; `fedkernels.masked_sum` is the reference they are tested against.


def _compiled(fn: Any) -> Any:
    """`fn` as one XLA-compiled TensorFlow function (TFF's worker runs it: it carries
    `_XlaCompile`/`_XlaRun`), so a client's compare/select/add steps fuse into one pass."""
    return tf.function(fn, jit_compile=True, autograph=False)


def _leaves(structure: Any) -> list:
    """Leaves in `jax.tree_util` order (insertion order for an OrderedDict, unlike `tf.nest`),
    the order the JAX kernels and the numpy bridge see, so both draw the same random streams."""
    return jax.tree_util.tree_leaves(structure)


def _pack(structure: Any, leaves: list) -> Any:
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(structure), leaves)


def _valid_weight(weight: Any) -> tuple[Any, Any]:
    """`(ok, weight or 0)`: a weight counts when it is finite and >= 0.

    A negative, NaN or infinite weight is the client's own error: that client is left out (its
    value and weight count nowhere) and the `invalid_weights` measurement counts it, so it
    never changes another client's contribution (a negative weight would cancel a valid
    client's weight in the per-coordinate denominator).
    """
    ok = weight >= tf.zeros_like(weight)
    if weight.dtype.is_floating:
        ok = tf.logical_and(ok, tf.math.is_finite(weight))
    return ok, tf.where(ok, weight, tf.zeros_like(weight))


def _contributes(x: Any) -> Any:
    """bool mask of the coordinates a client contributes to: nonzero and finite."""
    return tf.logical_and(tf.not_equal(x, tf.zeros_like(x)), tf.math.is_finite(x))


def _denominator_dtype(weight_dtype: Any) -> Any:
    """Per-coordinate weight sums keep the weight's dtype (TFF's `MeanFactory` sums weights in
    their own dtype and casts the sum to the value dtype when dividing)."""
    return tf.as_dtype(weight_dtype)


def _divide(numerator: Any, denominator: Any, nan_fill: Any) -> Any:
    """`numerator / denominator` per coordinate; where the denominator is 0, `nan_fill`
    (NaN when the whole weight is 0 and `no_nan_division=False`, else 0)."""
    has = denominator > tf.zeros_like(denominator)
    safe = tf.where(has, denominator, tf.ones_like(denominator))
    fill = tf.cast(nan_fill, numerator.dtype)
    return tf.where(has, numerator / tf.cast(safe, numerator.dtype), fill)


def _contributor_summary(contributions: Any, denominators: list, counts: list | None) -> Any:
    d = sum(int(np.prod(x.shape.as_list())) for x in denominators)
    summary = collections.OrderedDict(
        mean=tf.cast(contributions, tf.float32) / np.float32(max(d, 1)),
        uncovered=tf.add_n(
            [tf.reduce_sum(tf.cast(tf.equal(x, tf.zeros_like(x)), tf.int32))
             for x in denominators] or [tf.constant(0, tf.int32)]
        ),
    )
    if counts is not None:
        flat = tf.concat([tf.reshape(c, [-1]) for c in counts], 0)
        has = tf.size(flat) > 0
        summary["min"] = tf.cond(has, lambda: tf.reduce_min(flat), lambda: tf.constant(0))
        summary["max"] = tf.cond(has, lambda: tf.reduce_max(flat), lambda: tf.constant(0))
    return summary


# ----------------------------------------------------------------------------------------------
# Masked mean


def _check_value_type(value_type: Any) -> None:
    """TFF's `MeanFactory` checks: a tensor or struct of tensors, all floating."""
    if not isinstance(value_type, tff.TensorType | tff.StructType) or not (
        tff.types.is_structure_of_tensors(value_type)
    ):
        raise TypeError(
            "value_type must be a tff.TensorType or a tff.StructType of tensors, "
            f"got {value_type!r}"
        )
    _check_floats(value_type)


def _check_weight_type(weight_type: Any) -> None:
    if not isinstance(weight_type, tff.TensorType) or weight_type.shape not in ((), None):
        raise TypeError(f"weight_type must be a scalar tff.TensorType, got {weight_type!r}")
    dtype = np.dtype(weight_type.dtype)
    if not (np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.integer)):
        raise TypeError(f"weight_type must be integer or floating, got {weight_type!r}")


class MaskedMeanFactory(tff.aggregators.WeightedAggregationFactory):
    """Weighted mean of each coordinate over the clients that sent a nonzero value there.

    A drop-in for `tff.aggregators.MeanFactory` (same arguments, state and measurements, plus
    the measurements below): `mean[j] = sum_c w_c m_cj x_cj / sum_c w_c m_cj` with
    `m_cj = (x_cj != 0) & isfinite(x_cj)`, 0 where no client contributes. On dense updates (no
    exact zeros) it equals `MeanFactory`; on sparse updates (after top-k) a coordinate sent by 3
    of 100 clients is averaged over those 3. Every leaf keeps its dtype (float16/32/64); the
    weight may be any integer or float scalar type.

    Args:
      value_sum_factory: an unweighted factory for the weighted values (default `SumFactory`).
      weight_sum_factory: an unweighted factory for the per-coordinate weight sums (default
        `SumFactory`).
      no_nan_division: as in `MeanFactory`: when the sum of all (valid) client weights is 0 the
        mean is NaN with `False` (the default) and 0 with `True`. A coordinate no client
        contributes to is 0 either way.
      count_contributors: also report the min and max over coordinates of the number of
        contributing clients (free with the default inner sums, which count on the server;
        one int32[d] per client otherwise).

    What travels: with the default inner sums, each client sends its value and weight (as
    `MeanFactory`'s client does) into one `tff.federated_aggregate`, whose accumulate derives
    the client's contributions (`m`) and weighted sums on the server; with
    `value_sum_factory=fedkernels.tff.quantize_above_threshold(...)`, the client sends the
    quantized weighted value, a 1-bit mask of `m` per quantized leaf and its weight into one
    `federated_aggregate` (the quantizer's state and measurements stay under
    `value_sum_process`/`mean_value`); with any other inner factory the numerator goes through
    `value_sum_factory` and a dense per-coordinate denominator through `weight_sum_factory`.

    Weights: a client whose weight is negative, NaN or infinite is left out (contributes
    nowhere) and counted in `invalid_weights`; it never changes another client's contribution.

    State: `OrderedDict(value_sum_process=..., weight_sum_process=...)`.
    Measurements: `OrderedDict(mean_value=..., mean_weight=...)` (the inner measurements, as in
    `MeanFactory`), then `num_clients` (int32), `invalid_weights` (int32) and
    `contributors=OrderedDict(mean, uncovered[, min, max])`: the mean over coordinates of the
    number of positive-weight clients contributing there, and how many coordinates had none.
    """

    def __init__(self, value_sum_factory: Any = None, weight_sum_factory: Any = None,
                 no_nan_division: bool = False, count_contributors: bool = False):
        for name, inner in (("value_sum_factory", value_sum_factory),
                            ("weight_sum_factory", weight_sum_factory)):
            if inner is not None and not isinstance(
                inner, tff.aggregators.UnweightedAggregationFactory
            ):
                raise TypeError(
                    f"{name} must be a tff.aggregators.UnweightedAggregationFactory, "
                    f"got {type(inner).__name__}"
                )
        for name, flag in (("no_nan_division", no_nan_division),
                           ("count_contributors", count_contributors)):
            if not isinstance(flag, bool | np.bool_):
                raise TypeError(f"{name} must be a bool, got {flag!r}")
        self.no_nan_division = bool(no_nan_division)
        self.count_contributors = bool(count_contributors)
        self._value_sum_factory = value_sum_factory or tff.aggregators.SumFactory()
        self._weight_sum_factory = weight_sum_factory or tff.aggregators.SumFactory()

    @property
    def default_inner(self) -> bool:
        """True when both inner sums are plain `SumFactory` (what the numpy bridge runs)."""
        return all(
            type(f) is tff.aggregators.SumFactory
            for f in (self._value_sum_factory, self._weight_sum_factory)
        )

    def create(self, value_type: Any, weight_type: Any) -> Any:
        _check_value_type(value_type)
        _check_weight_type(weight_type)
        plain_weight_sum = type(self._weight_sum_factory) is tff.aggregators.SumFactory
        if plain_weight_sum and type(self._value_sum_factory) is tff.aggregators.SumFactory:
            return _fused_masked_mean(self, value_type, weight_type, None)
        if plain_weight_sum and isinstance(self._value_sum_factory,
                                           QuantizeAboveThresholdFactory):
            return _fused_masked_mean(self, value_type, weight_type, self._value_sum_factory)
        return _composed_masked_mean(self, value_type, weight_type)

    def numpy_process(self) -> Any:
        """The numpy bridge for this factory (see `fedkernels.tff.numpy_process`)."""
        if not self.default_inner:
            raise NotImplementedError(
                "the numpy bridge runs MaskedMeanFactory with the default SumFactory inner "
                "sums only"
            )
        from fedkernels.tff import _bridge

        return _bridge.MaskedMeanProcess(count_contributors=self.count_contributors,
                                         no_nan_division=self.no_nan_division)


def _masked_accumulators(specs: list, weight_dtype: Any, per_coordinate: bool) -> Any:
    den_dtype = _denominator_dtype(weight_dtype)
    acc = collections.OrderedDict(
        numerator=[tf.zeros(s.shape, s.dtype) for s in specs],
        denominator=[tf.zeros(s.shape, den_dtype) for s in specs],
        weight_sum=tf.zeros([], den_dtype),
        num_clients=tf.constant(0, tf.int32),
        invalid_weights=tf.constant(0, tf.int32),
        contributions=tf.constant(0, tf.int32),
    )
    if per_coordinate:
        acc["counts"] = [tf.zeros(s.shape, tf.int32) for s in specs]
    return acc


def _add_client(acc: Any, weighted: list, masks: list, ok: Any, weight: Any) -> Any:
    """Adds one client: `weighted[i]` its weighted leaf values (already 0 off the mask),
    `masks[i]` its contributing coordinates, `weight` its valid weight (0 if not `ok`)."""
    den_dtype = acc["weight_sum"].dtype
    w = tf.cast(weight, den_dtype)
    zero = tf.zeros([], den_dtype)
    positive = weight > tf.zeros_like(weight)
    new = collections.OrderedDict(
        numerator=[a + v for a, v in zip(acc["numerator"], weighted, strict=True)],
        denominator=[a + tf.where(m, w, zero) for a, m in zip(acc["denominator"], masks,
                                                            strict=True)],
        weight_sum=acc["weight_sum"] + w,
        num_clients=acc["num_clients"] + 1,
        invalid_weights=acc["invalid_weights"] + tf.cast(tf.logical_not(ok), tf.int32),
        contributions=acc["contributions"] + tf.cast(positive, tf.int32) * tf.add_n(
            [tf.reduce_sum(tf.cast(m, tf.int32)) for m in masks] or [tf.constant(0)]
        ),
    )
    if "counts" in acc:
        one = tf.cast(positive, tf.int32)
        new["counts"] = [a + tf.cast(m, tf.int32) * one for a, m in zip(acc["counts"], masks,
                                                                        strict=True)]
    return new


def _merge_accumulators(a: Any, b: Any) -> Any:
    return tf.nest.map_structure(tf.add, a, b)


def _masked_report(acc: Any, structure: Any, no_nan_division: bool) -> tuple[Any, Any]:
    """The mean (in `structure`) and the `contributors` summary from the accumulator."""
    nan_fill = tf.constant(0.0, tf.float32)
    if not no_nan_division:
        nan_fill = tf.where(acc["weight_sum"] > tf.zeros_like(acc["weight_sum"]),
                            tf.constant(0.0, tf.float32), tf.constant(np.nan, tf.float32))
    means = [_divide(n, d, nan_fill) for n, d in zip(acc["numerator"], acc["denominator"],
                                                      strict=True)]
    summary = _contributor_summary(acc["contributions"], acc["denominator"], acc.get("counts"))
    return _pack(structure, means), summary


def _fused_masked_mean(factory: MaskedMeanFactory, value_type: Any, weight_type: Any,
                       quantizer: Any) -> Any:
    """MaskedMeanFactory with the server deriving every client's contributions in one
    `federated_aggregate` (no per-coordinate denominator sent by the client)."""
    structure = _specs(value_type)
    specs = _leaves(structure)
    weight_dtype = np.dtype(weight_type.dtype)
    per_coordinate = factory.count_contributors
    no_nan_division = factory.no_nan_division
    codec = None if quantizer is None else _QuantizeCodec(specs, quantizer, masked=True)
    value_sum_process = None if quantizer is None else quantizer.create(value_type)

    @tff.tensorflow.computation
    def zero_fn():
        return _masked_accumulators(specs, weight_dtype, per_coordinate)

    accumulator_type = zero_fn.type_signature.result

    if codec is None:
        encoded_type = tff.StructWithPythonType([value_type, weight_type], tuple)

        def accumulate(acc, encoded):
            value, weight = encoded
            ok, w = _valid_weight(weight)
            leaves = _leaves(value)
            masks = [_contributes(x) for x in leaves]
            weighted = [tf.where(m, x * tf.cast(w, x.dtype), tf.zeros_like(x))
                        for x, m in zip(leaves, masks, strict=True)]
            return _add_client(acc, weighted, masks, ok, w)
    else:
        @tff.tensorflow.computation(value_type, weight_type, codec.state_type)
        def client_encode(value, weight, state):
            ok, w = _valid_weight(weight)
            leaves = _leaves(value)
            masks = [_contributes(x) for x in leaves]
            weighted = [tf.where(m, x * tf.cast(w, x.dtype), tf.zeros_like(x))
                        for x, m in zip(leaves, masks, strict=True)]
            # quantized leaves: the weighted values and the mask bits; others: the raw value
            return codec.encode(weighted, masks, state, raw=leaves), weight

        encoded_type = client_encode.type_signature.result

        def accumulate(acc, encoded):
            payload, weight = encoded
            ok, w = _valid_weight(weight)
            decoded, masks = codec.decode(list(payload))
            weighted = []
            for i, (x, m) in enumerate(zip(decoded, masks, strict=True)):
                if m is None:  # sent as is: derive the mask and weight it here
                    m = masks[i] = _contributes(x)
                    x = x * tf.cast(w, x.dtype)
                weighted.append(tf.where(m, x, tf.zeros_like(x)))
            return _add_client(acc, weighted, masks, ok, w)

    @tff.tensorflow.computation(accumulator_type, encoded_type)
    def accumulate_fn(acc, encoded):
        return _compiled(accumulate)(acc, encoded)

    @tff.tensorflow.computation(accumulator_type, accumulator_type)
    def merge_fn(a, b):
        return _merge_accumulators(a, b)

    @tff.tensorflow.computation(accumulator_type)
    def report_fn(acc):
        return acc

    @tff.tensorflow.computation(accumulator_type)
    def finish_fn(acc):
        mean, summary = _masked_report(acc, structure, no_nan_division)
        return mean, summary, acc["num_clients"], acc["invalid_weights"]

    @tff.federated_computation()
    def init_fn():
        inner = (value_sum_process.initialize() if value_sum_process is not None
                 else tff.federated_value((), tff.SERVER))
        return tff.federated_zip(collections.OrderedDict(
            value_sum_process=inner, weight_sum_process=tff.federated_value((), tff.SERVER)))

    @tff.federated_computation(
        init_fn.type_signature.result,
        tff.FederatedType(value_type, tff.CLIENTS),
        tff.FederatedType(weight_type, tff.CLIENTS),
    )
    def next_fn(state, value, weight):
        if codec is None:
            encoded = tff.federated_zip((value, weight))
            inner_state = state["value_sum_process"]
            inner_measurements = tff.federated_value((), tff.SERVER)
        else:
            quantizer_state = state["value_sum_process"]
            encoded = tff.federated_map(
                client_encode, (value, weight, tff.federated_broadcast(quantizer_state))
            )
            inner_state = tff.federated_map(codec.advance, quantizer_state)
            inner_measurements = codec.measurements()
        acc = tff.federated_aggregate(encoded, zero_fn(), accumulate_fn, merge_fn, report_fn)
        mean, contributors, num_clients, invalid = tff.federated_map(finish_fn, acc)
        new_state = collections.OrderedDict(
            value_sum_process=inner_state,
            weight_sum_process=state["weight_sum_process"],
        )
        measurements = collections.OrderedDict(
            mean_value=inner_measurements,
            mean_weight=tff.federated_value((), tff.SERVER),
            num_clients=num_clients,
            invalid_weights=invalid,
            contributors=contributors,
        )
        return tff.templates.MeasuredProcessOutput(
            tff.federated_zip(new_state), mean, tff.federated_zip(measurements)
        )

    return tff.templates.AggregationProcess(init_fn, next_fn)


def _composed_masked_mean(factory: MaskedMeanFactory, value_type: Any, weight_type: Any) -> Any:
    """MaskedMeanFactory around arbitrary inner factories (secure or DP sums, TFF's encoders):
    the client sends its masked weighted value through `value_sum_factory` and its
    per-coordinate weight (`w * m`, in the value's dtypes) through `weight_sum_factory`."""
    structure = _specs(value_type)
    value_sum_process = factory._value_sum_factory.create(value_type)
    weight_sum_process = factory._weight_sum_factory.create(value_type)
    per_coordinate = factory.count_contributors
    no_nan_division = factory.no_nan_division

    @tff.tensorflow.computation(value_type, weight_type)
    def client_fn(value, weight):
        ok, w = _valid_weight(weight)
        leaves = _leaves(value)
        masks = [_contributes(x) for x in leaves]
        weighted = [tf.where(m, x * tf.cast(w, x.dtype), tf.zeros_like(x))
                    for x, m in zip(leaves, masks, strict=True)]
        denominators = [tf.where(m, tf.cast(w, x.dtype) * tf.ones_like(x), tf.zeros_like(x))
                        for x, m in zip(leaves, masks, strict=True)]
        positive = tf.cast(w > tf.zeros_like(w), tf.int32)
        scalars = collections.OrderedDict(
            weight_sum=w,
            num_clients=tf.constant(1, tf.int32),
            invalid_weights=tf.cast(tf.logical_not(ok), tf.int32),
            contributions=positive * tf.add_n(
                [tf.reduce_sum(tf.cast(m, tf.int32)) for m in masks] or [tf.constant(0)]),
        )
        out = (_pack(structure, weighted), _pack(structure, denominators), scalars)
        if per_coordinate:
            out += ([tf.cast(m, tf.int32) * positive for m in masks],)
        return out

    result_type = client_fn.type_signature.result
    parts_type = tff.StructWithPythonType(
        [value_type, value_type, result_type[2], *([result_type[3]] if per_coordinate else [])],
        tuple,
    )

    # One struct parameter: TFF computations take no varargs.
    @tff.tensorflow.computation(parts_type)
    def finish_fn(parts):
        numerator, denominator, scalars, *counts = parts
        numerators = _leaves(numerator)
        denominators = _leaves(denominator)
        # NaN where nobody contributes when the whole weight is 0, as MeanFactory's division
        # by a zero weight sum, unless no_nan_division.
        nan_fill = tf.constant(0.0, tf.float32)
        if not no_nan_division:
            total = scalars["weight_sum"]
            nan_fill = tf.where(total > tf.zeros_like(total), tf.constant(0.0, tf.float32),
                                tf.constant(np.nan, tf.float32))
        means = [_divide(n, d, nan_fill) for n, d in zip(numerators, denominators, strict=True)]
        summary = _contributor_summary(scalars["contributions"], denominators,
                                       list(counts[0]) if counts else None)
        return _pack(structure, means), summary

    @tff.federated_computation()
    def init_fn():
        return tff.federated_zip(
            collections.OrderedDict(
                value_sum_process=value_sum_process.initialize(),
                weight_sum_process=weight_sum_process.initialize(),
            )
        )

    @tff.federated_computation(
        init_fn.type_signature.result,
        tff.FederatedType(value_type, tff.CLIENTS),
        tff.FederatedType(weight_type, tff.CLIENTS),
    )
    def next_fn(state, value, weight):
        numerator, denominator, scalars, *counts = tff.federated_map(client_fn, (value, weight))
        value_output = value_sum_process.next(state["value_sum_process"], numerator)
        weight_output = weight_sum_process.next(state["weight_sum_process"], denominator)
        scalars = tff.federated_sum(scalars)
        summed = [tff.federated_sum(c) for c in counts]
        mean, contributors = tff.federated_map(
            finish_fn,
            tff.federated_zip((value_output.result, weight_output.result, scalars, *summed)),
        )
        new_state = collections.OrderedDict(
            value_sum_process=value_output.state, weight_sum_process=weight_output.state
        )
        measurements = collections.OrderedDict(
            mean_value=value_output.measurements,
            mean_weight=weight_output.measurements,
            num_clients=scalars["num_clients"],
            invalid_weights=scalars["invalid_weights"],
            contributors=contributors,
        )
        return tff.templates.MeasuredProcessOutput(
            tff.federated_zip(new_state), mean, tff.federated_zip(measurements)
        )

    return tff.templates.AggregationProcess(init_fn, next_fn)


# ----------------------------------------------------------------------------------------------
# Concatenation


def _concat_specs(value_type: Any) -> list:
    """The leaves of `value_type`, checked as `tff.aggregators.concat_factory` checks them."""
    if not (isinstance(value_type, tff.TensorType) or (
        isinstance(value_type, tff.StructWithPythonType)
        and tff.types.is_structure_of_tensors(value_type)
    )):
        raise TypeError(
            "Expected `value_type` to be `TensorType` or `StructWithPythonType` of tensors, "
            f"got {value_type!r}"
        )
    specs = tf.nest.flatten(_specs(value_type))
    dtypes = [np.dtype(s.dtype.as_numpy_dtype) for s in specs]
    if len(set(dtypes)) > 1:
        raise TypeError(f"Component dtypes of `value_type` should have the same dtype, "
                        f"got {value_type}")
    if not all(np.issubdtype(t, np.integer) or np.issubdtype(t, np.floating) for t in dtypes):
        raise TypeError(f"Component dtypes of `value_type` must all be integers or floats, "
                        f"got {value_type}")
    return specs


def _concat_fns(value_type: Any) -> tuple[Any, Any, Any]:
    """`(concat, unconcat, flat_type)`: leaves in `tf.nest` order (dict keys sorted, as TFF's
    `concat_factory`), each raveled in C order, in the leaves' own dtype."""
    specs = _concat_specs(value_type)
    structure = _specs(value_type)
    shapes = [s.shape.as_list() for s in specs]
    sizes = [int(np.prod(s, dtype=np.int64)) for s in shapes]
    flat_type = tff.TensorType(specs[0].dtype.as_numpy_dtype, [sum(sizes)])

    @tff.tensorflow.computation(value_type)
    def concat(value):
        return tf.concat([tf.reshape(x, [-1]) for x in tf.nest.flatten(value)], axis=0)

    @tff.tensorflow.computation(flat_type)
    def unconcat(flat):
        pieces = tf.split(flat, sizes) if len(sizes) > 1 else [flat]
        leaves = [tf.reshape(p, s) for p, s in zip(pieces, shapes, strict=True)]
        return tf.nest.pack_sequence_as(structure, leaves)

    return concat, unconcat, flat_type


class _ConcatFactory:
    def __init__(self, inner: Any):
        self._inner = inner

    def numpy_process(self) -> Any:
        from fedkernels.tff import _bridge

        return _bridge.ConcatProcess(numpy_process(self._inner))


class _WeightedConcatFactory(_ConcatFactory, tff.aggregators.WeightedAggregationFactory):
    def create(self, value_type: Any, weight_type: Any) -> Any:
        concat, unconcat, flat_type = _concat_fns(value_type)
        inner = self._inner.create(flat_type, weight_type)

        @tff.federated_computation(
            inner.initialize.type_signature.result,
            tff.FederatedType(value_type, tff.CLIENTS),
            tff.FederatedType(weight_type, tff.CLIENTS),
        )
        def next_fn(state, value, weight):
            output = inner.next(state, tff.federated_map(concat, value), weight)
            return tff.templates.MeasuredProcessOutput(
                output.state, tff.federated_map(unconcat, output.result), output.measurements
            )

        return tff.templates.AggregationProcess(inner.initialize, next_fn)


class _UnweightedConcatFactory(_ConcatFactory, tff.aggregators.UnweightedAggregationFactory):
    def create(self, value_type: Any) -> Any:
        concat, unconcat, flat_type = _concat_fns(value_type)
        inner = self._inner.create(flat_type)

        @tff.federated_computation(
            inner.initialize.type_signature.result,
            tff.FederatedType(value_type, tff.CLIENTS),
        )
        def next_fn(state, value):
            output = inner.next(state, tff.federated_map(concat, value))
            return tff.templates.MeasuredProcessOutput(
                output.state, tff.federated_map(unconcat, output.result), output.measurements
            )

        return tff.templates.AggregationProcess(inner.initialize, next_fn)


def concat_factory(inner_agg_factory: Any = None, *, inner: Any = None) -> Any:
    """Flattens the value structure into one vector for `inner_agg_factory`, and restores it.

    `tff.aggregators.concat_factory`'s contract: weighted or unweighted as the inner factory
    is; leaves in `tf.nest` order (dict and OrderedDict keys sorted), each raveled in C order;
    all leaves must share one integer or float dtype, which the vector and the result keep
    (TypeError otherwise, as TFF's). `inner=` is an alias of `inner_agg_factory`.
    """
    if inner is not None:
        if inner_agg_factory is not None:
            raise TypeError("pass the inner factory once: inner_agg_factory or inner")
        inner_agg_factory = inner
    if isinstance(inner_agg_factory, tff.aggregators.WeightedAggregationFactory):
        return _WeightedConcatFactory(inner_agg_factory)
    if isinstance(inner_agg_factory, tff.aggregators.UnweightedAggregationFactory):
        return _UnweightedConcatFactory(inner_agg_factory)
    raise TypeError(
        f"inner_agg_factory must be a tff.aggregators factory, got "
        f"{type(inner_agg_factory).__name__}"
    )


# ----------------------------------------------------------------------------------------------
# Sparse (top-k) aggregation


def _sparse_mean_computations(d: int, k: int, value_dtype: Any, weight_type: Any) -> dict:
    """The server side of sparse masked averaging: `federated_aggregate` pieces over `(values
    float[k], indices int32[k], weight)` that scatter-add into dense accumulators."""
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
        total, weight_sum = fk.scatter_sum(values[None], indices[None], d, w)
        return collections.OrderedDict(
            numerator=acc["numerator"] + total,
            denominator=acc["denominator"] + weight_sum,
            # distinct indices (top-k): each finite value of a positive-weight client counts
            contributions=acc["contributions"]
            + jnp.sum((jnp.isfinite(values) & (w > 0)).astype(jnp.int32)),
            invalid_weights=acc["invalid_weights"] + jnp.sum((~ok).astype(jnp.int32)),
        )

    @tff.tensorflow.computation(accumulator_type, encoded_type)
    def accumulate_fn(acc, encoded):
        return staged(accumulate)(acc, encoded)

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
    )


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
    pieces = _sparse_mean_computations(d, k, np.dtype(value_dtype), weight_type)
    sparse_type = tff.StructWithPythonType(
        [tff.TensorType(value_dtype, [k]), tff.TensorType(np.int32, [k])], tuple
    )

    @tff.tensorflow.computation(sparse_type, weight_type)
    def pack(sparse, weight):
        return sparse[0], sparse[1], weight

    @tff.tensorflow.computation(pieces["accumulator_type"])
    def finish(acc):
        def fn(acc):
            mean = kernels.divide_no_nan(acc["numerator"], acc["denominator"])
            summary = kernels.contributor_summary(acc["contributions"], acc["denominator"])
            return mean.astype(value_dtype), summary, acc["invalid_weights"]

        return staged(fn)(acc)

    @tff.federated_computation()
    def init_fn():
        return tff.federated_value((), tff.SERVER)

    @tff.federated_computation(
        init_fn.type_signature.result,
        tff.FederatedType(sparse_type, tff.CLIENTS),
        tff.FederatedType(weight_type, tff.CLIENTS),
    )
    def next_fn(state, sparse, weight):
        encoded = tff.federated_map(pack, (sparse, weight))
        acc = tff.federated_aggregate(
            encoded, pieces["zero_fn"](), pieces["accumulate_fn"], pieces["merge_fn"],
            pieces["report_fn"],
        )
        mean, contributors, invalid = tff.federated_map(finish, acc)
        measurements = tff.federated_zip(
            collections.OrderedDict(invalid_weights=invalid, contributors=contributors)
        )
        return tff.templates.MeasuredProcessOutput(state, mean, measurements)

    return tff.templates.AggregationProcess(init_fn, next_fn)


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
    `bytes_sent` (per client: k values, k int32 indices, one weight), `dense_bytes`,
    `compression_ratio`, and `contributors` (without inner) or `inner`.
    Error feedback needs per-client state, which TFF aggregators cannot hold: see
    `error_feedback_encoder`.
    """

    def __init__(self, fraction: float | None = None, k: int | None = None, inner: Any = None):
        _check_fraction(k, fraction)
        if inner is not None and not isinstance(inner, tff.aggregators.WeightedAggregationFactory):
            raise TypeError(
                f"inner must be a tff.aggregators.WeightedAggregationFactory, "
                f"got {type(inner).__name__}"
            )
        self.fraction, self.k, self.inner = fraction, k, inner

    def create(self, value_type: Any, weight_type: Any) -> Any:
        _check_floats(value_type)
        layout = _Layout(value_type)
        d = layout.d
        k = _resolve_k(d, self.k, self.fraction)
        itemsize = layout.flat_dtype.itemsize
        bytes_sent = k * (itemsize + _INDEX_BYTES) + 4
        dense_bytes = d * itemsize

        def static_measurements():
            return collections.OrderedDict(
                bytes_sent=_server_constant(np.int64(bytes_sent)),
                dense_bytes=_server_constant(np.int64(dense_bytes)),
                compression_ratio=_server_constant(np.float32(dense_bytes / bytes_sent)),
            )

        if self.inner is not None:
            return self._create_dense(layout, weight_type, k, static_measurements)

        pieces = _sparse_mean_computations(d, k, layout.flat_dtype, weight_type)

        @tff.tensorflow.computation(value_type, weight_type)
        def encode_fn(value, weight):
            def encode(value, weight):
                flat, _ = fk.flatten(value, dtype=layout.flat_dtype)
                values, indices = kernels.top_k_unsorted(flat, k)
                return values, indices, weight

            return staged(encode)(value, weight)

        @tff.tensorflow.computation(pieces["accumulator_type"])
        def finish(acc):
            def fn(acc):
                mean = kernels.divide_no_nan(acc["numerator"], acc["denominator"])
                mean = layout.unflatten(mean.astype(layout.flat_dtype))
                return mean, kernels.contributor_summary(
                    acc["contributions"], acc["denominator"]
                ), acc["invalid_weights"]

            return staged(fn)(acc)

        @tff.federated_computation()
        def init_fn():
            return tff.federated_value((), tff.SERVER)

        @tff.federated_computation(
            init_fn.type_signature.result,
            tff.FederatedType(value_type, tff.CLIENTS),
            tff.FederatedType(weight_type, tff.CLIENTS),
        )
        def next_fn(state, value, weight):
            encoded = tff.federated_map(encode_fn, (value, weight))
            acc = tff.federated_aggregate(
                encoded, pieces["zero_fn"](), pieces["accumulate_fn"], pieces["merge_fn"],
                pieces["report_fn"],
            )
            mean, contributors, invalid = tff.federated_map(finish, acc)
            measurements = static_measurements()
            measurements["invalid_weights"] = invalid
            measurements["contributors"] = contributors
            return tff.templates.MeasuredProcessOutput(
                state, mean, tff.federated_zip(measurements)
            )

        return tff.templates.AggregationProcess(init_fn, next_fn)

    def _create_dense(self, layout: _Layout, weight_type: Any, k: int, static_measurements):
        inner = self.inner.create(layout.value_type, weight_type)

        @tff.tensorflow.computation(layout.value_type)
        def sparsify(value):
            def fn(value):
                flat, _ = fk.flatten(value, dtype=layout.flat_dtype)
                values, indices = kernels.top_k_unsorted(flat, k)
                return layout.unflatten(fk.scatter(values, indices, layout.d))

            return staged(fn)(value)

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


# ----------------------------------------------------------------------------------------------
# Quantization

# Keyword arguments of TFF's `quantize_above_threshold(..., **kwargs)` (passed on to
# `UniformQuantizationEncodingStage`), with the values fedkernels implements.
_TFF_QUANTIZE_KWARGS = {"stochastic": True, "min_max": None}


def _check_tff_quantize_kwargs(kwargs: dict) -> None:
    for name, value in kwargs.items():
        if name not in _TFF_QUANTIZE_KWARGS:
            raise TypeError(
                f"quantize_above_threshold got an unexpected keyword argument {name!r} "
                f"(TFF's accepts {sorted(_TFF_QUANTIZE_KWARGS)}; fedkernels also takes seed)"
            )
        if value is not _TFF_QUANTIZE_KWARGS[name] and value != _TFF_QUANTIZE_KWARGS[name]:
            use = ("stochastic rounding (unbiased) is the only mode; for a deterministic "
                   "result fix `seed`" if name == "stochastic" else
                   "each client quantizes over its own [min, max]; clip before with "
                   "tff.aggregators.clipping_factory for a fixed range")
            raise ValueError(f"{name}={value!r} is not supported: {use}")


class _QuantizeCodec:
    """Client encoding and server decoding of `quantize_above_threshold`, per leaf.

    Leaves with more than `threshold` elements are quantized by the staged JAX kernels
    (`fedkernels.quantize` on the float32 values, bit-packed codes plus the float32 range) and
    decoded back to the leaf's dtype; the other leaves travel in their own dtype. With masks
    (the masked mean), each quantized leaf also carries a 1-bit mask of its contributing
    coordinates (`fedkernels.pack_bits(m, 1)`), so the server knows who contributed where.
    """

    def __init__(self, specs: list, factory: Any, masked: bool = False):
        self.specs, self.bits, self.seed, self.masked = specs, factory.bits, factory.seed, masked
        self.shapes = [tuple(s.shape.as_list()) for s in specs]
        self.dtypes = [s.dtype for s in specs]
        self.sizes = [int(np.prod(s, dtype=np.int64)) for s in self.shapes]
        self.flags = tuple(n > factory.threshold for n in self.sizes)
        seed = self.seed

        @tff.tensorflow.computation
        def init_tf():
            return collections.OrderedDict(
                seed=tf.constant(seed, tf.int32), round=tf.constant(0, tf.int32)
            )

        self.init_tf = init_tf
        self.state_type = init_tf.type_signature.result

        @tff.tensorflow.computation(self.state_type)
        def advance(state):
            return collections.OrderedDict(seed=state["seed"], round=state["round"] + 1)

        self.advance = advance

    def bytes_sent(self, weight_bytes: int = 0) -> int:
        total = weight_bytes
        for n, dtype, flag in zip(self.sizes, self.dtypes, self.flags, strict=True):
            if flag:
                total += fk._quantize.packed_words(n, self.bits) * 4 + 8
                if self.masked:
                    total += fk._quantize.packed_words(n, 1) * 4
            else:
                total += n * dtype.size
        return total

    def dense_bytes(self) -> int:
        return sum(n * t.size for n, t in zip(self.sizes, self.dtypes, strict=True))

    def measurements(self, weight_bytes: int = 0) -> Any:
        sent = self.bytes_sent(weight_bytes)
        return tff.federated_zip(collections.OrderedDict(
            bytes_sent=_server_constant(np.int64(sent)),
            compression_ratio=_server_constant(np.float32(self.dense_bytes() / sent)),
        ))

    def encode(self, leaves: list, masks: list | None, state: Any, raw: list | None = None
               ) -> list:
        """One entry per leaf: `(packed, minimum, maximum[, mask_bits])` for a quantized leaf
        of `leaves`, else the leaf of `raw` (default `leaves`) itself."""
        bits, flags, masked = self.bits, self.flags, self.masked

        def fn(values, seed, round_num, masks):
            encoded = kernels.client_quantize(values, seed, round_num, bits, flags)
            out = []
            for i, flag in enumerate(flags):
                if flag:
                    item = encoded[i]
                    if masked:
                        mask = masks[i].reshape(-1).astype(jnp.uint32)
                        item = (*item, fk._quantize.pack_bits(mask, 1))
                    out.append(tuple(item))
            return out

        as_f32 = [tf.cast(x, tf.float32) for x in leaves]
        staged_masks = [m if f else tf.zeros([], tf.bool)
                        for m, f in zip(masks, flags, strict=True)] if masked else []
        quantized = iter(staged(fn)(as_f32, state["seed"], state["round"], staged_masks))
        raw = leaves if raw is None else raw
        return [tuple(next(quantized)) if f else x for x, f in zip(raw, flags, strict=True)]

    def decode(self, encoded: list) -> tuple[list, list | None]:
        """Per leaf: the decoded values in the leaf dtype, and (masked) the contributing mask;
        `None` for a leaf sent as is."""
        bits = self.bits
        quantized = [list(e) for e, f in zip(encoded, self.flags, strict=True) if f]
        sizes = [n for n, f in zip(self.sizes, self.flags, strict=True) if f]
        masked = self.masked

        def fn(items):
            values, masks = [], []
            for item, n in zip(items, sizes, strict=True):
                q = fk.Quantized(item[0], item[1], item[2], bits, n)
                values.append(fk.dequantize(q))
                if masked:
                    masks.append(fk._quantize.unpack_bits(item[3], 1, n) > 0)
            return values, masks

        values, masks = staged(fn)(quantized) if quantized else ([], [])
        values, masks = iter(values), iter(masks)
        out_values, out_masks = [], []
        for e, f, shape, dtype in zip(encoded, self.flags, self.shapes, self.dtypes,
                                      strict=True):
            if f:
                out_values.append(tf.cast(tf.reshape(next(values), shape), dtype))
                out_masks.append(tf.reshape(next(masks), shape) if masked else None)
            else:
                out_values.append(e)
                out_masks.append(None)
        return out_values, out_masks


class QuantizeAboveThresholdFactory(tff.aggregators.UnweightedAggregationFactory):
    """Sum with stochastic b-bit quantization of the leaves with more than `threshold` elements.

    A drop-in for `tff.aggregators.EncodedSumFactory.quantize_above_threshold(bits,
    threshold)`: each client quantizes every leaf with more than `threshold` elements over its
    own [min, max] with unbiased stochastic rounding (`fedkernels.quantize`, the semantics of
    TFF's `UniformQuantizationEncodingStage`, Suresh et al. 2017) and sends the bit-packed
    codes; the aggregator dequantizes each client's codes (`fedkernels.dequantize`) while
    summing (`federated_aggregate`); other leaves are summed exactly. Every leaf keeps its
    dtype (quantization itself runs in float32: a float64 leaf above the threshold is
    quantized from its float32 rounding, far finer than the quantization step).

    Unlike TFF's (which seeds from the clock), the randomness is reproducible: state is
    `OrderedDict(seed=int32, round=int32)`; the server broadcasts it, client randomness is
    `fold_in(fold_in(fold_in(PRNGKey(seed), round), fingerprint(value)), leaf_index)`
    (`fingerprint` stands in for a client id, which TFF computations do not have), and `round`
    advances by 1 each `next`. Same seed, same round, same values: same result.
    Measurements: `bytes_sent` per client and `compression_ratio` (TFF's has none).

    TFF's keyword arguments (`**kwargs` of its classmethod, passed to
    `UniformQuantizationEncodingStage`): `stochastic=True` and `min_max=None` are accepted;
    other values raise a ValueError saying what to use instead.
    """

    def __init__(self, quantization_bits: int = 8, threshold: int = 20000, seed: int = 0,
                 **kwargs: Any):
        _check_tff_quantize_kwargs(kwargs)
        self.bits = fk._validate.static_int("quantization_bits", quantization_bits, 1, 16)
        self.threshold = fk._validate.static_int("threshold", threshold, 0)
        self.seed = fk._validate.static_int("seed", seed, -(2**31), 2**31 - 1)

    @classmethod
    def quantize_above_threshold(cls, quantization_bits: int = 8, threshold: int = 20000,
                                 **kwargs: Any) -> QuantizeAboveThresholdFactory:
        """As `tff.aggregators.EncodedSumFactory.quantize_above_threshold` (plus `seed=`)."""
        return cls(quantization_bits, threshold, **kwargs)

    def create(self, value_type: Any) -> Any:
        _check_value_type(value_type)
        structure = _specs(value_type)
        specs = _leaves(structure)
        codec = _QuantizeCodec(specs, self)

        @tff.federated_computation()
        def init_fn():
            return tff.federated_eval(codec.init_tf, tff.SERVER)

        @tff.tensorflow.computation(value_type, codec.state_type)
        def encode_fn(value, state):
            return codec.encode(_leaves(value), None, state)

        @tff.tensorflow.computation
        def zero_fn():
            return [tf.zeros(s.shape, s.dtype) for s in specs]

        accumulator_type = zero_fn.type_signature.result

        @tff.tensorflow.computation(accumulator_type, encode_fn.type_signature.result)
        def accumulate_fn(acc, encoded):
            decoded, _ = codec.decode(list(encoded))
            return [a + b for a, b in zip(acc, decoded, strict=True)]

        @tff.tensorflow.computation(accumulator_type, accumulator_type)
        def merge_fn(a, b):
            return [x + y for x, y in zip(a, b, strict=True)]

        @tff.tensorflow.computation(accumulator_type)
        def report_fn(acc):
            return _pack(structure, list(acc))

        @tff.federated_computation(
            tff.FederatedType(codec.state_type, tff.SERVER),
            tff.FederatedType(value_type, tff.CLIENTS),
        )
        def next_fn(state, value):
            encoded = tff.federated_map(encode_fn, (value, tff.federated_broadcast(state)))
            total = tff.federated_aggregate(encoded, zero_fn(), accumulate_fn, merge_fn,
                                            report_fn)
            return tff.templates.MeasuredProcessOutput(
                tff.federated_map(codec.advance, state), total, codec.measurements()
            )

        return tff.templates.AggregationProcess(init_fn, next_fn)

    def numpy_process(self) -> Any:
        from fedkernels.tff import _bridge

        return _bridge.QuantizeSumProcess(self.bits, self.threshold, self.seed)


def quantize_above_threshold(
    quantization_bits: int = 8, threshold: int = 20000, seed: int = 0, **kwargs: Any
) -> QuantizeAboveThresholdFactory:
    """A `QuantizeAboveThresholdFactory` (drop-in for
    `tff.aggregators.EncodedSumFactory.quantize_above_threshold`, with TFF's `**kwargs`),
    seeded by `seed`."""
    return QuantizeAboveThresholdFactory(quantization_bits, threshold, seed, **kwargs)


# ----------------------------------------------------------------------------------------------
# The learning-level aggregator


def compression_aggregator(
    *,
    zeroing: bool = True,
    clipping: bool = True,
    weighted: bool = True,
    debug_measurements_fn: Any = None,
    quantization_bits: int = 8,
    threshold: int = 20000,
    seed: int = 0,
    top_k_fraction: float | None = None,
    **kwargs: Any,
) -> Any:
    """The counterpart of `tff.learning.compression_aggregator`, on fedkernels kernels.

    TFF's signature (`zeroing`, `clipping`, `weighted`, `debug_measurements_fn`, `**kwargs`
    for the quantizer: see `quantize_above_threshold`) with TFF's defaults and meaning, plus
    `quantization_bits`, `threshold`, `seed` and `top_k_fraction`.

    Default: `MaskedMeanFactory(value_sum_factory=quantize_above_threshold(8, 20000, seed))`
    (`tff.aggregators.UnweightedMeanFactory` of it when `weighted=False`), which on dense
    updates matches TFF's `MeanFactory(EncodedSumFactory.quantize_above_threshold(8, 20000))`
    up to the random draws. With `top_k_fraction`, the core is `top_k_factory(fraction=...)`
    instead (weighted only). Then `debug_measurements_fn` (TFF's
    `tff.learning.add_debug_measurements` or `..._with_mixed_dtype`), TFF's adaptive L2
    clipping and zeroing wrap it, with the quantile-estimation settings of
    `tff.learning.compression_aggregator`.

    Raises:
      TypeError: `debug_measurements_fn` returns a factory whose weightedness differs (TFF's
        check), or an unknown keyword argument.
      ValueError: `top_k_fraction` with `weighted=False`, or a quantizer keyword value
        fedkernels does not implement.
    """
    if top_k_fraction is not None:
        if not weighted:
            raise ValueError("top_k_fraction needs weighted=True (top_k_factory is weighted)")
        if kwargs:
            raise ValueError(f"quantizer keywords {sorted(kwargs)} do not apply with "
                             "top_k_fraction (no quantization)")
        factory = top_k_factory(fraction=top_k_fraction)
    else:
        quantized = quantize_above_threshold(quantization_bits, threshold, seed, **kwargs)
        factory = (
            MaskedMeanFactory(value_sum_factory=quantized)
            if weighted
            else tff.aggregators.UnweightedMeanFactory(quantized)
        )
    if debug_measurements_fn is not None:
        factory = debug_measurements_fn(factory)
        expected = (tff.aggregators.WeightedAggregationFactory if weighted
                    else tff.aggregators.UnweightedAggregationFactory)
        if not isinstance(factory, expected):
            raise TypeError("debug_measurements_fn should return the same type.")
    quantile = tff.aggregators.PrivateQuantileEstimationProcess.no_noise
    if clipping:
        factory = tff.aggregators.clipping_factory(
            quantile(initial_estimate=1.0, target_quantile=0.8, learning_rate=0.2), factory
        )
    if zeroing:
        factory = tff.aggregators.zeroing_factory(
            quantile(
                initial_estimate=10.0,
                target_quantile=0.98,
                learning_rate=math.log(10.0),
                multiplier=2.0,
                increment=1.0,
            ),
            factory,
        )
    return factory


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
