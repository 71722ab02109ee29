"""TFF v0.87.0 `aggregators/mean_test.py`, ported with `MeanFactory` -> `MaskedMeanFactory`.

Origin: tensorflow_federated/python/aggregators/mean_test.py at v0.87.0, Copyright 2020 The
TensorFlow Federated Authors, Apache License 2.0 (see tests/_tff_conformance.py). Only the
factory is swapped; every other change is marked `fedkernels:` with its reason:
- Measurements: `MaskedMeanFactory` reports TFF's `mean_value` and `mean_weight` and, after
  them, the documented extras `num_clients`, `invalid_weights`, `contributors`; the checks
  compare TFF's part exactly and the names of the rest.
- Not ported, not applicable: the `UnweightedMeanFactory` cases (`test_type_properties_
  unweighted`, `..._with_inner_factory_unweighted`, `test_scalar_value_unweighted`,
  `test_structure_value_unweighted`, `test_inner_value_sum_factory_unweighted` and the
  unweighted half of `test_incorrect_create_type_raises`): fedkernels has no unweighted mean
  (its `compression_aggregator(weighted=False)` uses TFF's `UnweightedMeanFactory`).
"""

import pytest

pytest.importorskip(
    "tensorflow_federated",
    reason="the ported TFF tests need tensorflow-federated (the locked .venv stack)",
)

import collections
import math

import numpy as np
from absl.testing import parameterized

import fedkernels.tff as ft  # noqa: E402
from tests._tff_conformance import (  # noqa: F401  (tff_test_context: autouse fixture)
    MEASUREMENT_CONSTANT,
    SumPlusOneFactory,
    split_masked_mean_measurements,
    tf,
    tff,
    tff_measurements,
    tff_test_context,
)

computation_types = tff.types
placements = tff
M_CONST = MEASUREMENT_CONSTANT

_test_struct_type = ((np.float32, (2,)), np.float64)


def _assert_masked_mean_next_type(process, value_type, weight_type, state, measurements):
    """TFF's `expected_next_type` check, with the measurements split (fedkernels extras)."""
    signature = process.next.type_signature
    expected_state_type = tff.FederatedType(state, tff.SERVER)
    assert process.initialize.type_signature.is_equivalent_to(
        tff.FunctionType(parameter=None, result=expected_state_type)
    )
    expected_parameter = tff.to_type(collections.OrderedDict(
        state=expected_state_type,
        value=tff.FederatedType(value_type, tff.CLIENTS),
        weight=tff.FederatedType(weight_type, tff.CLIENTS),
    ))
    assert signature.parameter.is_equivalent_to(expected_parameter)
    assert signature.result.state.is_equivalent_to(expected_state_type)
    assert signature.result.result.is_equivalent_to(
        tff.FederatedType(value_type, tff.SERVER))
    assert signature.result.measurements.placement == tff.SERVER
    ours = split_masked_mean_measurements(signature.result.measurements.member)
    assert tff.to_type(ours).is_equivalent_to(tff.to_type(measurements))


class MeanFactoryComputationTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.named_parameters(
      ('float_value_float32_weight', np.float32, np.float32),
      ('struct_value_float32_weight', _test_struct_type, np.float32),
      ('float_value_float64_weight', np.float32, np.float64),
      ('struct_value_float64_weight', _test_struct_type, np.float64),
      ('float_value_int32_weight', np.float32, np.int32),
      ('struct_value_int32_weight', _test_struct_type, np.int32),
      ('float_value_int64_weight', np.float32, np.int64),
      ('struct_value_int64_weight', _test_struct_type, np.int64),
  )
  def test_type_properties(self, value_type, weight_type):
    value_type = computation_types.to_type(value_type)
    weight_type = computation_types.to_type(weight_type)

    factory_ = ft.MaskedMeanFactory()
    self.assertIsInstance(factory_, tff.aggregators.WeightedAggregationFactory)
    process = factory_.create(value_type, weight_type)

    self.assertIsInstance(process, tff.templates.AggregationProcess)
    # fedkernels: measurements split into TFF's part and the documented extras.
    _assert_masked_mean_next_type(
        process, value_type, weight_type,
        collections.OrderedDict(value_sum_process=(), weight_sum_process=()),
        collections.OrderedDict(mean_value=(), mean_weight=()),
    )

  @parameterized.named_parameters(
      ('float_value_float32_weight', np.float32, np.float32),
      ('struct_value_float32_weight', _test_struct_type, np.float32),
      ('float_value_float64_weight', np.float32, np.float64),
      ('struct_value_float64_weight', _test_struct_type, np.float64),
      ('float_value_int32_weight', np.float32, np.int32),
      ('struct_value_int32_weight', _test_struct_type, np.int32),
      ('float_value_int64_weight', np.float32, np.int64),
      ('struct_value_int64_weight', _test_struct_type, np.int64),
  )
  def test_type_properties_with_inner_factory(self, value_type, weight_type):
    value_type = computation_types.to_type(value_type)
    weight_type = computation_types.to_type(weight_type)
    sum_factory = SumPlusOneFactory()

    factory_ = ft.MaskedMeanFactory(
        value_sum_factory=sum_factory, weight_sum_factory=sum_factory
    )
    self.assertIsInstance(factory_, tff.aggregators.WeightedAggregationFactory)
    process = factory_.create(value_type, weight_type)

    self.assertIsInstance(process, tff.templates.AggregationProcess)
    _assert_masked_mean_next_type(
        process, value_type, weight_type,
        collections.OrderedDict(value_sum_process=np.int32, weight_sum_process=np.int32),
        collections.OrderedDict(mean_value=np.int32, mean_weight=np.int32),
    )

  @parameterized.named_parameters(
      (
          'federated_type',
          computation_types.FederatedType(np.float32, placements.SERVER),
      ),
      ('function_type', computation_types.FunctionType(None, ())),
      ('sequence_type', computation_types.SequenceType(np.float32)),
  )
  def test_incorrect_create_type_raises(self, wrong_type):
    factory_ = ft.MaskedMeanFactory()
    correct_type = computation_types.TensorType(np.float32)
    with self.assertRaises(TypeError):
      factory_.create(wrong_type, correct_type)
    with self.assertRaises(TypeError):
      factory_.create(correct_type, wrong_type)


class MeanFactoryExecutionTest(tf.test.TestCase):

  def test_scalar_value(self):
    factory_ = ft.MaskedMeanFactory()
    value_type = computation_types.TensorType(np.float32)
    weight_type = computation_types.TensorType(np.float32)

    process = factory_.create(value_type, weight_type)
    expected_state = collections.OrderedDict(
        value_sum_process=(), weight_sum_process=()
    )
    expected_measurements = collections.OrderedDict(
        mean_value=(), mean_weight=()
    )

    state = process.initialize()
    self.assertAllEqual(expected_state, state)

    client_data = [1.0, 2.0, 3.0]
    weights = [3.0, 2.0, 1.0]
    output = process.next(state, client_data, weights)
    self.assertAllClose(10.0 / 6.0, output.result)

    self.assertAllEqual(expected_state, output.state)
    self.assertEqual(expected_measurements, tff_measurements(output.measurements))

  def test_structure_value(self):
    factory_ = ft.MaskedMeanFactory()
    value_type = computation_types.to_type(_test_struct_type)
    weight_type = computation_types.TensorType(np.float32)
    process = factory_.create(value_type, weight_type)
    expected_state = collections.OrderedDict(
        value_sum_process=(), weight_sum_process=()
    )
    expected_measurements = collections.OrderedDict(
        mean_value=(), mean_weight=()
    )

    state = process.initialize()
    self.assertAllEqual(expected_state, state)

    client_data = [((1.0, 2.0), 3.0), ((2.0, 5.0), 4.0), ((3.0, 0.0), 5.0)]
    weights = [3.0, 2.0, 1.0]
    output = process.next(state, client_data, weights)
    self.assertAllEqual(expected_state, output.state)
    # fedkernels: by design the third client's exact 0.0 does not count for it (masked mean:
    # a coordinate a client sends as exactly 0 is not a contribution), so the second
    # coordinate is (3*2 + 2*5) / (3 + 2) = 16/5, where MeanFactory gives 16/6.
    self.assertAllClose(((10.0 / 6.0, 16.0 / 5.0), 22.0 / 6.0), output.result)
    self.assertEqual(expected_measurements, tff_measurements(output.measurements))
    # fedkernels: each leaf comes back in its own dtype (float32 and float64).
    self.assertEqual(output.result[0].dtype, np.float32)
    self.assertEqual(np.asarray(output.result[1]).dtype, np.float64)

  def test_weight_arg(self):
    factory_ = ft.MaskedMeanFactory()
    value_type = computation_types.TensorType(np.float32)
    weight_type = computation_types.TensorType(np.float32)
    process = factory_.create(value_type, weight_type)

    state = process.initialize()
    client_data = [1.0, 2.0, 3.0]
    weights = [1.0, 1.0, 1.0]
    self.assertEqual(2.0, process.next(state, client_data, weights).result)
    weights = [0.1, 0.1, 0.1]
    self.assertEqual(2.0, process.next(state, client_data, weights).result)
    weights = [6.0, 3.0, 1.0]
    self.assertEqual(1.5, process.next(state, client_data, weights).result)

  def test_weight_arg_all_zeros_nan_division(self):
    factory_ = ft.MaskedMeanFactory(no_nan_division=False)
    value_type = computation_types.TensorType(np.float32)
    weight_type = computation_types.TensorType(np.float32)
    process = factory_.create(value_type, weight_type)

    state = process.initialize()
    client_data = [1.0, 2.0, 3.0]
    weights = [0.0, 0.0, 0.0]

    # Division by zero resulting in NaN/Inf *should* occur.
    self.assertFalse(
        math.isfinite(process.next(state, client_data, weights).result)
    )

  def test_weight_arg_all_zeros_no_nan_division(self):
    factory_ = ft.MaskedMeanFactory(no_nan_division=True)
    value_type = computation_types.TensorType(np.float32)
    weight_type = computation_types.TensorType(np.float32)
    process = factory_.create(value_type, weight_type)

    state = process.initialize()
    client_data = [1.0, 2.0, 3.0]
    weights = [0.0, 0.0, 0.0]

    # Division by zero resulting in NaN/Inf *should not* occur.
    self.assertEqual(0.0, process.next(state, client_data, weights).result)

  def test_inner_value_sum_factory(self):
    sum_factory = SumPlusOneFactory()
    factory_ = ft.MaskedMeanFactory(value_sum_factory=sum_factory)
    value_type = computation_types.TensorType(np.float32)
    weight_type = computation_types.TensorType(np.float32)
    process = factory_.create(value_type, weight_type)

    state = process.initialize()
    self.assertAllEqual(
        collections.OrderedDict(value_sum_process=0, weight_sum_process=()),
        state,
    )

    # Weighted values will be summed to 11.0.
    client_data = [1.0, 2.0, 3.0]
    weights = [3.0, 2.0, 1.0]

    output = process.next(state, client_data, weights)
    self.assertAllEqual(
        collections.OrderedDict(value_sum_process=1, weight_sum_process=()),
        output.state,
    )
    self.assertAllClose(11 / 6, output.result)
    self.assertEqual(
        collections.OrderedDict(mean_value=M_CONST, mean_weight=()),
        tff_measurements(output.measurements),
    )

  def test_inner_weight_sum_factory(self):
    sum_factory = SumPlusOneFactory()
    factory_ = ft.MaskedMeanFactory(weight_sum_factory=sum_factory)
    value_type = computation_types.TensorType(np.float32)
    weight_type = computation_types.TensorType(np.float32)
    process = factory_.create(value_type, weight_type)

    state = process.initialize()
    self.assertAllEqual(
        collections.OrderedDict(value_sum_process=(), weight_sum_process=0),
        state,
    )

    # Weights will be summed to 7.0.
    client_data = [1.0, 2.0, 3.0]
    weights = [3.0, 2.0, 1.0]

    output = process.next(state, client_data, weights)
    self.assertAllEqual(
        collections.OrderedDict(value_sum_process=(), weight_sum_process=1),
        output.state,
    )
    self.assertAllClose(10 / 7, output.result)
    self.assertEqual(
        collections.OrderedDict(mean_value=(), mean_weight=M_CONST),
        tff_measurements(output.measurements),
    )

  def test_inner_value_and_weight_sum_factory(self):
    sum_factory = SumPlusOneFactory()
    factory_ = ft.MaskedMeanFactory(
        value_sum_factory=sum_factory, weight_sum_factory=sum_factory
    )
    value_type = computation_types.TensorType(np.float32)
    weight_type = computation_types.TensorType(np.float32)
    process = factory_.create(value_type, weight_type)

    state = process.initialize()
    self.assertAllEqual(
        collections.OrderedDict(value_sum_process=0, weight_sum_process=0),
        state,
    )

    # Weighted values will be summed to 11.0 and weights will be summed to 7.0.
    client_data = [1.0, 2.0, 3.0]
    weights = [3.0, 2.0, 1.0]

    output = process.next(state, client_data, weights)
    self.assertAllEqual(
        collections.OrderedDict(value_sum_process=1, weight_sum_process=1),
        output.state,
    )
    self.assertAllClose(11 / 7, output.result)
    self.assertEqual(
        collections.OrderedDict(mean_value=M_CONST, mean_weight=M_CONST),
        tff_measurements(output.measurements),
    )


# fedkernels: beyond TFF's cases, the dtypes the issue names, each returned in its own dtype
# and bit for bit equal to MeanFactory's on dense values.
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_dtypes_bit_for_bit_with_mean_factory(dtype):
  value_type = tff.to_type(((dtype, (3,)), np.float64))
  weight_type = tff.TensorType(np.float32)
  client_data = [((1.5, -2.25, 3.0), 1e-300), ((2.0, 4.5, -1.0), 3e-300)]
  weights = [2.0, 1.0]
  ours = ft.MaskedMeanFactory().create(value_type, weight_type)
  theirs = tff.aggregators.MeanFactory().create(value_type, weight_type)
  got = ours.next(ours.initialize(), client_data, weights).result
  want = theirs.next(theirs.initialize(), client_data, weights).result
  for g, w in zip(got, want, strict=True):
    assert np.asarray(g).dtype == np.asarray(w).dtype
    np.testing.assert_array_equal(g, w)
