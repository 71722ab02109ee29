"""TFF v0.87.0 `aggregators/concat_test.py`, ported with `tff.aggregators.concat_factory` ->
`fedkernels.tff.concat_factory` and `MeanFactory` -> `MaskedMeanFactory`.

Origin: tensorflow_federated/python/aggregators/concat_test.py at v0.87.0, Copyright 2021 The
TensorFlow Federated Authors, Apache License 2.0 (see tests/_tff_conformance.py). Changes are
marked `fedkernels:`:
- `_concat_mean` wraps `MaskedMeanFactory`, whose measurements add documented extras after
  TFF's `mean_value`/`mean_weight`; the checks compare TFF's part and the extras' names.
- `test_concat_impl` / `test_unconcat_impl` test TFF's private `_concat_impl` and
  `_unconcat_impl`; here they run fedkernels' concat / unconcat computations on the same
  values (same expected layouts).
"""

import pytest

pytest.importorskip(
    "tensorflow_federated",
    reason="the ported TFF tests need tensorflow-federated (the locked .venv stack)",
)

import collections

import numpy as np
from absl.testing import parameterized

import fedkernels.tff as ft  # noqa: E402
from fedkernels.tff import _concat  # noqa: E402
from tests._tff_conformance import (  # noqa: F401  (tff_test_context: autouse fixture)
  split_masked_mean_measurements,
  tf,
  tff,
  tff_measurements,
  tff_test_context,
)

computation_types = tff.types
placements = tff
aggregation_process = tff.templates
measured_process = tff.templates
sum_factory = tff.aggregators


class type_test_utils:  # noqa: N801  (TFF's helper module name)
  @staticmethod
  def assert_types_equivalent(a, b):
    assert a.is_equivalent_to(b), f"{a} != {b}"


def _value_type(value):
  return tff.to_type(tf.nest.map_structure(
      lambda x: tff.TensorType(np.asarray(x).dtype, np.shape(x)), value))


class concat:  # noqa: N801  (TFF's module name; fedkernels' computations behind it)
  @staticmethod
  def _concat_impl(value):
    value = tf.nest.map_structure(lambda x: x.numpy(), value)
    fn, _, _ = _concat._concat_fns(_value_type(value))
    return fn(value)

  @staticmethod
  def _unconcat_impl(concat_value, original_structure):
    original = tf.nest.map_structure(lambda x: x.numpy(), original_structure)
    _, fn, flat_type = _concat._concat_fns(_value_type(original))
    # fedkernels: the flat value in the flat type's dtype (TFF's helper takes any tensor)
    return fn(concat_value.numpy().astype(flat_type.dtype))

  concat_factory = staticmethod(ft.concat_factory)


_test_struct_type_int_mixed = [np.int32, (np.int32, (2,)), (np.int32, (3, 3))]
_test_struct_type_float_mixed = [
    np.float32,
    (np.float32, (2,)),
    (np.float32, (3, 3)),
]
_test_struct_type_nested = collections.OrderedDict(
    a=[np.float32, [(np.float32, (2, 2, 2))]], b=(np.float32, (3, 3))
)


def _concat_mean():
  return concat.concat_factory(ft.MaskedMeanFactory())


def _concat_sum():
  return concat.concat_factory(sum_factory.SumFactory())


def _make_test_struct_nested(value):
  return collections.OrderedDict(
      a=[np.array(value, np.float32), [np.ones([2, 2, 2], np.float32) * value]],
      b=np.ones([3, 3], np.float32) * value,
  )


class ConcatFactoryComputationTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.named_parameters(
      ('float', np.float32),
      ('struct_list_int_scalars', [np.int32, np.int32, np.int32]),
      ('struct_list_int_mixed', _test_struct_type_int_mixed),
      ('struct_list_float_mixed', _test_struct_type_float_mixed),
      ('struct_nested', _test_struct_type_nested),
  )
  def test_concat_type_properties_unweighted(self, value_type):
    factory = _concat_sum()
    value_type = computation_types.to_type(value_type)
    process = factory.create(value_type)
    self.assertIsInstance(process, aggregation_process.AggregationProcess)

    # Inner SumFactory has no state.
    server_state_type = computation_types.FederatedType((), placements.SERVER)

    expected_initialize_type = computation_types.FunctionType(
        parameter=None, result=server_state_type
    )
    type_test_utils.assert_types_equivalent(
        process.initialize.type_signature, expected_initialize_type
    )

    # Inner SumFactory has no measurements.
    expected_measurements_type = computation_types.FederatedType(
        (), placements.SERVER
    )
    expected_next_type = computation_types.FunctionType(
        parameter=collections.OrderedDict(
            state=server_state_type,
            value=computation_types.FederatedType(
                value_type, placements.CLIENTS
            ),
        ),
        result=measured_process.MeasuredProcessOutput(
            state=server_state_type,
            result=computation_types.FederatedType(
                value_type, placements.SERVER
            ),
            measurements=expected_measurements_type,
        ),
    )
    type_test_utils.assert_types_equivalent(
        process.next.type_signature, expected_next_type
    )

  @parameterized.named_parameters(
      ('float_value_float32_weight', np.float32, np.float32),
      ('struct_value_float32_weight', _test_struct_type_nested, np.float32),
      ('float_value_float64_weight', np.float32, np.float64),
      ('struct_value_float64_weight', _test_struct_type_nested, np.float64),
  )
  def test_clip_type_properties_weighted(self, value_type, weight_type):
    factory = _concat_mean()
    value_type = computation_types.to_type(value_type)
    weight_type = computation_types.to_type(weight_type)
    process = factory.create(value_type, weight_type)
    self.assertIsInstance(process, aggregation_process.AggregationProcess)

    # State comes from the inner MeanFactory.
    server_state_type = computation_types.FederatedType(
        collections.OrderedDict(value_sum_process=(), weight_sum_process=()),
        placements.SERVER,
    )

    expected_initialize_type = computation_types.FunctionType(
        parameter=None, result=server_state_type
    )
    type_test_utils.assert_types_equivalent(
        process.initialize.type_signature, expected_initialize_type
    )

    # Measurements come from the inner mean factory.
    # fedkernels: with the documented extras after TFF's part.
    measurements = process.next.type_signature.result.measurements.member
    type_test_utils.assert_types_equivalent(
        tff.to_type(split_masked_mean_measurements(measurements)),
        tff.to_type(collections.OrderedDict(mean_value=(), mean_weight=())),
    )
    expected_measurements_type = computation_types.FederatedType(
        measurements, placements.SERVER
    )
    expected_next_type = computation_types.FunctionType(
        parameter=collections.OrderedDict(
            state=server_state_type,
            value=computation_types.FederatedType(
                value_type, placements.CLIENTS
            ),
            weight=computation_types.FederatedType(
                weight_type, placements.CLIENTS
            ),
        ),
        result=measured_process.MeasuredProcessOutput(
            state=server_state_type,
            result=computation_types.FederatedType(
                value_type, placements.SERVER
            ),
            measurements=expected_measurements_type,
        ),
    )
    type_test_utils.assert_types_equivalent(
        process.next.type_signature, expected_next_type
    )

  @parameterized.named_parameters(
      ('bool', np.bool_),
      ('string', np.str_),
      ('string_list', [np.str_, np.str_]),
      ('string_nested', [np.str_, [np.str_]]),
  )
  def test_raises_on_non_numeric_dtypes(self, value_type):
    factory = _concat_sum()
    value_type = computation_types.to_type(value_type)
    with self.assertRaisesRegex(TypeError, 'must all be integers or floats'):
      factory.create(value_type)

  @parameterized.named_parameters(
      ('int32_int64_list', [np.int32, np.int64]),
      ('float32_float64_list', [np.float32, np.float64]),
      ('float32_float64_nested', [np.float32, (np.float64, [np.float64])]),
      ('int32_float32_list', [np.int32, np.float32]),
      ('int32_float32_list_mixed_rank', [(np.int32, (2, 3, 4)), np.float32]),
      ('int32_float32_nested', [np.int32, (np.float32, [np.float32])]),
      ('int32_string_list', [np.int32, np.str_]),
  )
  def test_raises_on_mixed_dtypes(self, value_type):
    factory = _concat_sum()
    value_type = computation_types.to_type(value_type)
    with self.assertRaisesRegex(TypeError, 'should have the same dtype'):
      factory.create(value_type)

  @parameterized.named_parameters(
      ('plain_struct', [('a', np.int32)]),
      ('sequence', computation_types.SequenceType(np.int32)),
      ('function', computation_types.FunctionType(np.int32, np.int32)),
      ('nested_sequence', [[[computation_types.SequenceType(np.int32)]]]),
      ('nested_function', [computation_types.FunctionType(np.int32, np.int32)]),
  )
  def test_raises_on_bad_tff_value_types(self, value_type):
    factory = _concat_sum()
    value_type = computation_types.to_type(value_type)
    with self.assertRaisesRegex(TypeError, 'Expected `value_type` to be'):
      factory.create(value_type)


class ConcatFactoryExecutionTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.named_parameters(
      ('scalar', np.int32, [1, 2, 3], 6),
      ('rank_1_tensor', (np.int32, [3]), [(1, 1, 1), (2, 2, 2)], (3, 3, 3)),
      (
          'rank_2_tensor',
          (np.int32, [2, 2]),
          [((1, 1), (1, 1)), ((2, 2), (2, 2))],
          ((3, 3), (3, 3)),
      ),
      (
          'nested',
          _test_struct_type_nested,
          [_make_test_struct_nested(1), _make_test_struct_nested(2)],
          _make_test_struct_nested(3),
      ),
  )
  def test_concat_sum(self, value_type, client_data, expected_sum):
    factory = _concat_sum()
    process = factory.create(computation_types.to_type(value_type))

    state = process.initialize()
    self.assertEqual(state, ())

    output = process.next(state, client_data)
    self.assertEqual(output.state, ())
    self.assertEqual(output.measurements, ())
    self.assertAllClose(output.result, expected_sum, atol=0)

  @parameterized.named_parameters(
      ('scalar', np.float32, [1.0, 2.0, 3.0], [3.0, 4.0, 5.0], 26.0 / 12.0),
      (
          'rank_1_tensor',
          (np.float32, [2]),
          [(1.0, 1.0), (5.0, 5.0)],
          [3.0, 1.0],
          (2.0, 2.0),
      ),
      (
          'rank_2_tensor',
          (np.float32, [2, 2]),
          [((1.0, 1.0), (1.0, 1.0)), ((5.0, 5.0), (5.0, 5.0))],
          [3.0, 1.0],
          ((2.0, 2.0), (2.0, 2.0)),
      ),
      (
          'nested',
          _test_struct_type_nested,
          [_make_test_struct_nested(1.0), _make_test_struct_nested(5.0)],
          [3.0, 1.0],
          _make_test_struct_nested(2.0),
      ),
  )
  def test_concat_mean(
      self, value_type, client_data, client_weight, expected_mean
  ):
    factory = _concat_mean()
    process = factory.create(
        computation_types.to_type(value_type),
        computation_types.to_type(np.float32),
    )

    expected_state = collections.OrderedDict(
        value_sum_process=(), weight_sum_process=()
    )
    expected_measurements = collections.OrderedDict(
        mean_value=(), mean_weight=()
    )

    state = process.initialize()
    self.assertEqual(state, expected_state)

    output = process.next(state, client_data, client_weight)
    self.assertEqual(output.state, expected_state)
    self.assertEqual(tff_measurements(output.measurements), expected_measurements)
    self.assertAllClose(output.result, expected_mean)

  @parameterized.named_parameters([
      ('scalars', [np.int32(0), np.int32(1), np.int32(2)], np.arange(3)),
      ('rank_1_tensor', np.arange(10), np.arange(10)),
      ('rank_3_tensor', np.arange(24).reshape(3, 2, 4), np.arange(24)),
      (
          'rank_1_tensor_list',
          [np.arange(2), np.arange(3)],
          np.array([0, 1, 0, 1, 2]),
      ),
      (
          'mixed_rank_tensor_list',
          [np.array([[0, 1], [2, 3]]), np.array([4, 5])],
          np.arange(6),
      ),
      (
          'nested_tensors',
          (
              np.array([0]),
              [
                  np.array([[1], [2]]),
                  dict(a=np.array([3]), b=np.array([4, 5])),
              ],
          ),
          np.arange(6),
      ),
      (
          'large_rank_1_tensor_list',
          [np.arange(100), np.arange(100, 500)],
          np.arange(500),
      ),
  ])
  def test_concat_impl(self, value, expected_concat_value):
    """Checks the structure gets flattened/concatenated and packed correctly."""
    # Need to convert np arrays to tensors first.
    value = tf.nest.map_structure(tf.constant, value)
    concat_value = concat._concat_impl(value)
    self.assertAllEqual(concat_value, expected_concat_value)

  @parameterized.named_parameters([
      ('scalars', [np.int32(0), np.int32(1), np.int32(2)], np.arange(3)),
      ('rank_1_tensor', np.arange(10), np.arange(10)),
      ('rank_3_tensor', np.arange(24).reshape(3, 2, 4), np.arange(24)),
      (
          'rank_1_tensor_list',
          [np.arange(2), np.arange(3)],
          np.array([0, 1, 0, 1, 2]),
      ),
      (
          'mixed_rank_tensor_list',
          [np.array([[0, 1], [2, 3]]), np.array([4, 5])],
          np.arange(6),
      ),
      (
          'nested_tensors',
          (
              np.array([0]),
              [
                  np.array([[1], [2]]),
                  dict(a=np.array([3]), b=np.array([4, 5])),
              ],
          ),
          np.arange(6),
      ),
      (
          'large_rank_1_tensor_list',
          [np.arange(100), np.arange(100, 500)],
          np.arange(500),
      ),
  ])
  def test_unconcat_impl(self, original_structure, concat_value):
    # Need to convert np arrays to tensors first.
    original_structure = tf.nest.map_structure(tf.constant, original_structure)
    concat_value = tf.constant(concat_value)

    packed_record = concat._unconcat_impl(concat_value, original_structure)
    tf.nest.assert_same_structure(packed_record, original_structure)
    self.assertAllClose(packed_record, original_structure, atol=0)


