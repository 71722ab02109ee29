"""`concat_factory`: the value structure flattened into one vector for an inner factory."""

from __future__ import annotations

from typing import Any

import numpy as np

from fedkernels.tff._bridge import numpy_process
from fedkernels.tff._staging import _specs, tf, tff


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


