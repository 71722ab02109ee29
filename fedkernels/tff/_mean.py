"""`MaskedMeanFactory`: the weighted mean of each coordinate over the clients that sent it.

Two processes: a fused one (default inner sums, or the fedkernels quantizer as the value sum)
where the server derives every client's contributions inside one `federated_aggregate`, and
a composed one around arbitrary inner factories (secure or DP sums, TFF's encoders).
"""

from __future__ import annotations

import collections
from typing import Any

import numpy as np

from fedkernels.tff._quantize import QuantizeAboveThresholdFactory, _QuantizeCodec
from fedkernels.tff._staging import (
    _check_value_type,
    _check_weight_type,
    _compiled,
    _contributes,
    _contributor_summary,
    _denominator_dtype,
    _divide,
    _leaves,
    _pack,
    _specs,
    _valid_weight,
    tf,
    tff,
)


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
            # The client sends its weight beside the codes and masks: counted in bytes_sent.
            inner_measurements = codec.measurements(weight_dtype.itemsize)
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


