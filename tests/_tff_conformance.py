"""Shared pieces of the ported TensorFlow Federated tests (tests/test_tff_conformance_*.py).

Those files port test cases of TensorFlow Federated v0.87.0
(https://github.com/google-parfait/tensorflow-federated, tensorflow_federated/python/...),
Copyright 2020-2024 The TensorFlow Federated Authors, licensed under the Apache License,
Version 2.0 (http://www.apache.org/licenses/LICENSE-2.0), with the factory under test swapped
for its fedkernels.tff counterpart. `SumPlusOneFactory` below is TFF's
`aggregators/aggregator_test_utils.py` (not shipped in the TFF wheel), unchanged but for
imports.

The computations run in TFF's test C++ execution context
(`tff.backends.test.create_sync_test_cpp_execution_context()`), as TFF's own tests do; one
context (one worker) is created per session and installed for each ported module.
"""

from __future__ import annotations

import collections
import typing

import pytest

tff = pytest.importorskip(
    "tensorflow_federated",
    reason="the ported TFF tests need tensorflow-federated (the locked .venv stack)",
)
tf = pytest.importorskip("tensorflow")

MEASUREMENT_CONSTANT = 42

# Measurements fedkernels' weighted means add after TFF's `mean_value` and `mean_weight`.
MASKED_MEAN_EXTRA_MEASUREMENTS = ("num_clients", "invalid_weights", "contributors")

_CONTEXT = []


@pytest.fixture(scope="module", autouse=True)
def tff_test_context():
    """TFF's test execution context, installed for the module (created once per session)."""
    if not _CONTEXT:
        _CONTEXT.append(tff.backends.test.create_sync_test_cpp_execution_context())
    with tff.framework.get_context_stack().install(_CONTEXT[0]):
        yield _CONTEXT[0]


class SumPlusOneFactory(tff.aggregators.UnweightedAggregationFactory):
    """`UnweightedAggregationFactory` for "sum + 1" (TFF's aggregator_test_utils).

    Sums the values placed at CLIENTS and adds 1 to each element; the state starts at 0 and
    is incremented each `next`; the measurements are always `MEASUREMENT_CONSTANT`.
    """

    def create(self, value_type):
        type_args = typing.get_args(tff.aggregators.factory.ValueType)
        if not isinstance(value_type, type_args):
            raise TypeError(f"bad value_type {value_type}")

        @tff.federated_computation()
        def init_fn():
            return tff.federated_value(0, tff.SERVER)

        @tff.federated_computation(
            init_fn.type_signature.result, tff.FederatedType(value_type, tff.CLIENTS)
        )
        def next_fn(state, value):
            state = tff.federated_map(tff.tensorflow.computation(lambda x: x + 1), state)
            result = tff.federated_map(
                tff.tensorflow.computation(lambda x: tf.nest.map_structure(lambda y: y + 1, x)),
                tff.federated_sum(value),
            )
            measurements = tff.federated_value(MEASUREMENT_CONSTANT, tff.SERVER)
            return tff.templates.MeasuredProcessOutput(state, result, measurements)

        return tff.templates.AggregationProcess(init_fn, next_fn)


def split_masked_mean_measurements(measurements_type):
    """TFF's part of a MaskedMeanFactory measurements type (`mean_value`, `mean_weight`) as an
    OrderedDict of types, after checking that the rest are the documented extra names."""
    names = [name for name, _ in tff.structure.iter_elements(measurements_type)]
    assert names == ["mean_value", "mean_weight", *MASKED_MEAN_EXTRA_MEASUREMENTS], names
    return collections.OrderedDict(
        mean_value=measurements_type.mean_value, mean_weight=measurements_type.mean_weight
    )


def tff_measurements(measurements):
    """The `mean_value`/`mean_weight` part of a MaskedMeanFactory measurements value."""
    assert list(measurements)[2:] == list(MASKED_MEAN_EXTRA_MEASUREMENTS), list(measurements)
    return collections.OrderedDict(
        mean_value=measurements["mean_value"], mean_weight=measurements["mean_weight"]
    )
