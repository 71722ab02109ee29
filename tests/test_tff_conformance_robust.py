"""TFF v0.87.0 `aggregators/robust_test.py`, the cases with `MeanFactory` inside
`clipping_factory` / `zeroing_factory`, ported with `MeanFactory` -> `MaskedMeanFactory`.

Origin: tensorflow_federated/python/aggregators/robust_test.py at v0.87.0, Copyright 2021 The
TensorFlow Federated Authors, Apache License 2.0 (see tests/_tff_conformance.py). Changes are
marked `fedkernels:`.
Not ported, not applicable (no fedkernels factory in them: they test TFF's clipping and
zeroing around `SumFactory`, and TFF's norm helpers): test_clip_type_properties_simple,
test_zero_type_properties_simple, test_zero_type_properties_with_zeroed_count_agg_factory,
test_clip_type_properties_with_clipped_count_agg_factory,
test_clip_preserves_aggregated_dtype_with_mixed_float,
test_zero_preserves_aggregated_dtype_with_mixed_float, test_fixed_clip_sum,
test_fixed_clip_sum_struct, test_increasing_clip_sum, test_clip_mixed_float_dtype,
test_fixed_zero_sum, test_fixed_zero_sum_struct, test_fixed_zero_sum_struct_inf_norm,
test_increasing_zero_sum, test_increasing_zero_clip_sum, test_zero_mixed_float_dtype, NormTest.
"""

import pytest

pytest.importorskip(
    "tensorflow_federated",
    reason="the ported TFF tests need tensorflow-federated (the locked .venv stack)",
)

import collections

import numpy as np
from absl.testing import parameterized
from tensorflow_federated.python.aggregators import robust, sum_factory
from tensorflow_federated.python.core.environments.tensorflow_frontend import (
  tensorflow_computation,
)
from tensorflow_federated.python.core.impl.federated_context import (
  federated_computation,
  intrinsics,
)
from tensorflow_federated.python.core.impl.types import computation_types, placements
from tensorflow_federated.python.core.templates import (
  aggregation_process,
  estimation_process,
  measured_process,
)

import fedkernels.tff as ft  # noqa: E402
from tests._tff_conformance import (  # noqa: F401  (tff_test_context: autouse fixture)
  split_masked_mean_measurements,
  tf,
  tff,
  tff_test_context,
)


class mean:  # noqa: N801  (TFF's module name)
  MeanFactory = ft.MaskedMeanFactory


def _mean_measurements_type(process, wrapper):
  """fedkernels: the inner mean's measurements: TFF's part checked, extras by name."""
  inner = process.next.type_signature.result.measurements.member[wrapper]
  assert tff.to_type(split_masked_mean_measurements(inner)).is_equivalent_to(
      tff.to_type(collections.OrderedDict(mean_value=(), mean_weight=())))
  return inner


_test_struct_type = [(np.float32, (3,)), np.float32]


def _make_test_struct_value(x):
  return [np.full(shape=[3], fill_value=x, dtype=np.float32), x]


def _clipped_mean(clip=2.0):
  return robust.clipping_factory(clip, mean.MeanFactory())


def _clipped_sum(clip=2.0):
  return robust.clipping_factory(clip, sum_factory.SumFactory())


def _zeroed_mean(clip=2.0, norm_order=2.0):
  return robust.zeroing_factory(clip, mean.MeanFactory(), norm_order)


def _zeroed_sum(clip=2.0, norm_order=2.0):
  return robust.zeroing_factory(clip, sum_factory.SumFactory(), norm_order)


_float_at_server = computation_types.FederatedType(
    computation_types.TensorType(np.float32), placements.SERVER
)
_float_at_clients = computation_types.FederatedType(
    computation_types.TensorType(np.float32), placements.CLIENTS
)


@federated_computation.federated_computation()
def _test_init_fn():
  return intrinsics.federated_value(1.0, placements.SERVER)


@federated_computation.federated_computation(
    _float_at_server, _float_at_clients
)
def _test_next_fn(state, value):
  del value
  return intrinsics.federated_map(
      tensorflow_computation.tf_computation(lambda x: x + 1.0, np.float32),
      state,
  )


@federated_computation.federated_computation(_float_at_server)
def _test_report_fn(state):
  return state


def _test_norm_process(
    init_fn=_test_init_fn, next_fn=_test_next_fn, report_fn=_test_report_fn
):
  return estimation_process.EstimationProcess(init_fn, next_fn, report_fn)


class ClippingFactoryComputationTest(tf.test.TestCase, parameterized.TestCase):


  @parameterized.named_parameters(
      ('float_value_float32_weight', np.float32, np.float32),
      ('struct_value_float32_weight', _test_struct_type, np.float32),
      ('float_value_float64_weight', np.float32, np.float64),
      ('struct_value_float64_weight', _test_struct_type, np.float64),
  )
  def test_clip_type_properties_weighted(self, value_type, weight_type):
    factory = _clipped_mean()
    value_type = computation_types.to_type(value_type)
    weight_type = computation_types.to_type(weight_type)
    process = factory.create(value_type, weight_type)
    self.assertIsInstance(process, aggregation_process.AggregationProcess)

    mean_state_type = collections.OrderedDict(
        value_sum_process=(), weight_sum_process=()
    )
    server_state_type = computation_types.FederatedType(
        collections.OrderedDict(
            clipping_norm=(), inner_agg=mean_state_type, clipped_count_agg=()
        ),
        placements.SERVER,
    )
    expected_initialize_type = computation_types.FunctionType(
        parameter=None, result=server_state_type
    )
    self.assertTrue(
        process.initialize.type_signature.is_equivalent_to(
            expected_initialize_type
        )
    )

    expected_measurements_type = computation_types.FederatedType(
        collections.OrderedDict(
            # fedkernels: TFF's part plus the documented extras
            clipping=_mean_measurements_type(process, 'clipping'),
            clipping_norm=robust.NORM_TF_TYPE,
            clipped_count=robust.COUNT_TF_TYPE,
        ),
        placements.SERVER,
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
    self.assertTrue(
        process.next.type_signature.is_equivalent_to(expected_next_type)
    )


  @parameterized.named_parameters(
      ('float_value_float32_weight', np.float32, np.float32),
      ('struct_value_float32_weight', _test_struct_type, np.float32),
      ('float_value_float64_weight', np.float32, np.float64),
      ('struct_value_float64_weight', _test_struct_type, np.float64),
  )
  def test_zero_type_properties_weighted(self, value_type, weight_type):
    factory = _zeroed_mean()
    value_type = computation_types.to_type(value_type)
    weight_type = computation_types.to_type(weight_type)
    process = factory.create(value_type, weight_type)
    self.assertIsInstance(process, aggregation_process.AggregationProcess)

    mean_state_type = collections.OrderedDict(
        value_sum_process=(), weight_sum_process=()
    )
    server_state_type = computation_types.FederatedType(
        collections.OrderedDict(
            zeroing_norm=(), inner_agg=mean_state_type, zeroed_count_agg=()
        ),
        placements.SERVER,
    )
    expected_initialize_type = computation_types.FunctionType(
        parameter=None, result=server_state_type
    )
    self.assertTrue(
        process.initialize.type_signature.is_equivalent_to(
            expected_initialize_type
        )
    )

    expected_measurements_type = computation_types.FederatedType(
        collections.OrderedDict(
            # fedkernels: TFF's part plus the documented extras
            zeroing=_mean_measurements_type(process, 'zeroing'),
            zeroing_norm=robust.NORM_TF_TYPE,
            zeroed_count=robust.COUNT_TF_TYPE,
        ),
        placements.SERVER,
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
    self.assertTrue(
        process.next.type_signature.is_equivalent_to(expected_next_type)
    )





  @parameterized.named_parameters(
      ('clip_float_on_clients', 1.0, placements.CLIENTS, _clipped_mean),
      ('clip_string_on_server', 'bad', placements.SERVER, _clipped_mean),
      ('zero_float_on_clients', 1.0, placements.CLIENTS, _zeroed_mean),
      ('zero_string_on_server', 'bad', placements.SERVER, _zeroed_mean),
  )
  def test_raises_on_bad_norm_process_result(
      self, value, placement, make_factory
  ):
    report_fn = federated_computation.federated_computation(
        lambda s: intrinsics.federated_value(value, placement), _float_at_server
    )
    norm = _test_norm_process(report_fn=report_fn)

    with self.assertRaisesRegex(TypeError, r'Result type .* assignable to'):
      make_factory(norm)

  @parameterized.named_parameters(
      ('clip', _clipped_mean),
      ('zero', _zeroed_mean),
  )
  def test_raises_on_bad_process_next_single_param(self, make_factory):
    next_fn = federated_computation.federated_computation(
        lambda state: state, _float_at_server
    )
    norm = _test_norm_process(next_fn=next_fn)

    with self.assertRaisesRegex(TypeError, '.* must take two arguments.'):
      make_factory(norm)

  @parameterized.named_parameters(
      ('clip', _clipped_mean),
      ('zero', _zeroed_mean),
  )
  def test_raises_on_bad_process_next_three_params(self, make_factory):
    next_fn = federated_computation.federated_computation(
        lambda state, value1, value2: state,
        _float_at_server,
        _float_at_clients,
        _float_at_clients,
    )
    norm = _test_norm_process(next_fn=next_fn)

    with self.assertRaisesRegex(TypeError, '.* must take two arguments.'):
      make_factory(norm)

  @parameterized.named_parameters(
      ('clip', _clipped_mean),
      ('zero', _zeroed_mean),
  )
  def test_raises_on_bad_process_next_not_float(self, make_factory):
    complex_at_clients = computation_types.FederatedType(
        np.complex64, placements.CLIENTS
    )
    next_fn = federated_computation.federated_computation(
        lambda state, value: state, _float_at_server, complex_at_clients
    )
    norm = _test_norm_process(next_fn=next_fn)

    with self.assertRaisesRegex(
        TypeError, 'Second argument .* assignable from'
    ):
      make_factory(norm)

  @parameterized.named_parameters(
      ('clip', _clipped_mean),
      ('zero', _zeroed_mean),
  )
  def test_raises_on_bad_process_next_two_outputs(self, make_factory):
    next_fn = federated_computation.federated_computation(
        lambda state, val: (state, state), _float_at_server, _float_at_clients
    )
    norm = _test_norm_process(next_fn=next_fn)

    with self.assertRaisesRegex(TypeError, 'Result type .* state only.'):
      make_factory(norm)


class ClippingFactoryExecutionTest(tf.test.TestCase, parameterized.TestCase):

  def _check_result(self, expected, result):
    for exp, res in zip(_make_test_struct_value(expected), result, strict=True):
      self.assertAllClose(exp, res)


  def test_fixed_clip_mean(self):
    factory = _clipped_mean()

    value_type = computation_types.TensorType(np.float32)
    weight_type = computation_types.TensorType(np.float32)
    process = factory.create(value_type, weight_type)

    state = process.initialize()

    client_data = [1.0, 3.0, 5.0]
    client_weight = [1.0, 2.0, 1.0]
    output = process.next(state, client_data, client_weight)
    self.assertAllClose(7 / 4, output.result)
    self.assertAllClose(2.0, output.measurements['clipping_norm'])
    self.assertEqual(2, output.measurements['clipped_count'])


  def test_fixed_clip_mean_struct(self):
    factory = _clipped_mean(4.0)

    value_type = computation_types.to_type(_test_struct_type)
    weight_type = computation_types.TensorType(np.float32)
    process = factory.create(value_type, weight_type)

    state = process.initialize()

    # Struct has 4 components so global norm is twice the constant value.
    client_data = [_make_test_struct_value(v) for v in [1.0, 2.0, 3.0]]
    client_weight = [1.0, 2.0, 1.0]
    output = process.next(state, client_data, client_weight)
    self._check_result(7 / 4, output.result)
    self.assertAllClose(4.0, output.measurements['clipping_norm'])
    self.assertEqual(1, output.measurements['clipped_count'])


  def test_increasing_clip_mean(self):
    factory = _clipped_mean(_test_norm_process())

    value_type = computation_types.TensorType(np.float32)
    weight_type = computation_types.TensorType(np.float32)
    process = factory.create(value_type, weight_type)

    state = process.initialize()

    client_data = [1.0, 3.0, 5.0]
    client_weight = [1.0, 2.0, 1.0]
    output = process.next(state, client_data, client_weight)
    self.assertAllClose(1.0, output.result)
    self.assertAllClose(1.0, output.measurements['clipping_norm'])
    self.assertEqual(2, output.measurements['clipped_count'])

    output = process.next(output.state, client_data, client_weight)
    self.assertAllClose(7 / 4, output.result)
    self.assertAllClose(2.0, output.measurements['clipping_norm'])
    self.assertEqual(2, output.measurements['clipped_count'])

    output = process.next(output.state, client_data, client_weight)
    self.assertAllClose(10 / 4, output.result)
    self.assertAllClose(3.0, output.measurements['clipping_norm'])
    self.assertEqual(1, output.measurements['clipped_count'])



  def test_fixed_zero_mean(self):
    factory = _zeroed_mean()

    value_type = computation_types.TensorType(np.float32)
    weight_type = computation_types.TensorType(np.float32)
    process = factory.create(value_type, weight_type)

    state = process.initialize()

    client_data = [1.0, 2.0, 5.0]
    client_weight = [1.0, 2.0, 2.0]
    output = process.next(state, client_data, client_weight)
    # fedkernels: by design a client the zeroing factory zeroes sends all zeros, which the
    # masked mean does not count as a contribution: it drops out of the denominator, so
    # (1*1 + 2*2) / (1 + 2) where MeanFactory divides by all weights, (1*1 + 2*2) / 5.
    self.assertAllClose(5 / 3, output.result)
    self.assertAllClose(2.0, output.measurements['zeroing_norm'])
    self.assertEqual(1, output.measurements['zeroed_count'])


  def test_fixed_zero_mean_struct(self):
    factory = _zeroed_mean(4.0)

    value_type = computation_types.to_type(_test_struct_type)
    weight_type = computation_types.TensorType(np.float32)
    process = factory.create(value_type, weight_type)

    state = process.initialize()

    client_data = [_make_test_struct_value(v) for v in [1.0, 2.0, 5.0]]
    client_weight = [1.0, 2.0, 2.0]
    output = process.next(state, client_data, client_weight)
    # fedkernels: by design a client the zeroing factory zeroes sends all zeros, which the
    # masked mean does not count as a contribution: it drops out of the denominator, so
    # (1*1 + 2*2) / (1 + 2) where MeanFactory divides by all weights, (1*1 + 2*2) / 5.
    self._check_result(5 / 3, output.result)
    self.assertAllClose(4.0, output.measurements['zeroing_norm'])
    self.assertEqual(1, output.measurements['zeroed_count'])


  def test_fixed_zero_mean_struct_inf_norm(self):
    factory = _zeroed_mean(2.0, float('inf'))

    value_type = computation_types.to_type(_test_struct_type)
    weight_type = computation_types.TensorType(np.float32)
    process = factory.create(value_type, weight_type)

    state = process.initialize()

    client_data = [_make_test_struct_value(v) for v in [1.0, 2.0, 5.0]]
    client_weight = [1.0, 2.0, 2.0]
    output = process.next(state, client_data, client_weight)
    # fedkernels: by design a client the zeroing factory zeroes sends all zeros, which the
    # masked mean does not count as a contribution: it drops out of the denominator, so
    # (1*1 + 2*2) / (1 + 2) where MeanFactory divides by all weights, (1*1 + 2*2) / 5.
    self._check_result(5 / 3, output.result)
    self.assertAllClose(2.0, output.measurements['zeroing_norm'])
    self.assertEqual(1, output.measurements['zeroed_count'])


  def test_increasing_zero_mean(self):
    factory = _zeroed_mean(_test_norm_process())

    value_type = computation_types.TensorType(np.float32)
    weight_type = computation_types.TensorType(np.float32)
    process = factory.create(value_type, weight_type)

    state = process.initialize()

    client_data = [0.5, 1.5, 2.5]
    client_weight = [1.0, 2.0, 1.0]
    output = process.next(state, client_data, client_weight)
    # fedkernels: by design zeroed clients drop out of the denominator (see above): 0.5 / 1
    # and 3.5 / 3 where MeanFactory gives 0.5 / 4 and 3.5 / 4.
    self.assertAllClose(0.5 / 1, output.result)
    self.assertAllClose(1.0, output.measurements['zeroing_norm'])
    self.assertEqual(2, output.measurements['zeroed_count'])

    output = process.next(output.state, client_data, client_weight)
    self.assertAllClose(3.5 / 3, output.result)
    self.assertAllClose(2.0, output.measurements['zeroing_norm'])
    self.assertEqual(1, output.measurements['zeroed_count'])

    output = process.next(output.state, client_data, client_weight)
    self.assertAllClose(6 / 4, output.result)
    self.assertAllClose(3.0, output.measurements['zeroing_norm'])
    self.assertEqual(0, output.measurements['zeroed_count'])






