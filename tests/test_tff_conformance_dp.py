"""TFF v0.87.0 `aggregators/differential_privacy_test.py`, the cases with an inner sum,
ported with the inner `SumFactory` -> `fedkernels.tff.quantize_above_threshold()` (a sum that
is exact for leaves of at most `threshold` = 20000 elements, as here) and
`concat_factory(SumFactory())` -> `fedkernels.tff.concat_factory(SumFactory())`.

Origin: tensorflow_federated/python/aggregators/differential_privacy_test.py at v0.87.0,
Copyright 2020 The TensorFlow Federated Authors, Apache License 2.0 (see
tests/_tff_conformance.py). Changes are marked `fedkernels:`.
Not ported, not applicable (they test TFF's DP queries and tree aggregation, with TFF's own
inner sums): test_init_non_dp_query_raises, test_init_non_agg_factory_raises,
test_incorrect_value_type_raises, test_inner_sum (SumPlusOneFactory inner),
test_tree_aggregation_inner_sum, test_adaptive_query, test_extract_dp_event_from_state,
test_error_when_extracting_from_initial_state, test_noise, test_gaussian_adaptive_cls,
test_gaussian_fixed_cls, test_adaptive_clip_noise_params, test_tree_aggregation_factory,
test_tree_aggregation_factory_raise, test_tree_adaptive_factory_estimate_clip.
"""

import pytest

pytest.importorskip(
    "tensorflow_federated",
    reason="the ported TFF tests need tensorflow-federated (the locked .venv stack)",
)

import numpy as np
import tensorflow_privacy as tfp
from absl.testing import parameterized
from tensorflow_federated.python.aggregators import differential_privacy
from tensorflow_federated.python.core.impl.types import computation_types, placements

import fedkernels.tff as ft  # noqa: E402
from tests._tff_conformance import tf, tff, tff_test_context  # noqa: F401

_test_dp_query = tfp.GaussianSumQuery(l2_norm_clip=1.0, stddev=0.0)

_test_struct_type = [(np.float32, (2,)), np.float32]

# fedkernels: the inner factories under test.
_INNER = (
    ('quantize_above_threshold', ft.quantize_above_threshold),
    ('concat_sum', lambda: ft.concat_factory(tff.aggregators.SumFactory())),
)


class DPFactoryComputationTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.named_parameters(
      ('float_quantize', np.float32, ft.quantize_above_threshold),
      ('struct_quantize', _test_struct_type, ft.quantize_above_threshold),
      ('float_concat', np.float32, _INNER[1][1]),
      ('struct_concat', _test_struct_type, _INNER[1][1]),
  )
  def test_type_properties(self, value_type, make_inner):
    inner_agg_factory = make_inner()
    factory_ = differential_privacy.DifferentiallyPrivateFactory(
        _test_dp_query, inner_agg_factory
    )
    self.assertIsInstance(factory_, tff.aggregators.UnweightedAggregationFactory)
    value_type = computation_types.to_type(value_type)
    process = factory_.create(value_type)
    self.assertIsInstance(process, tff.templates.AggregationProcess)

    query_state_type = computation_types.StructType(
        [('l2_norm_clip', np.float32), ('stddev', np.float32)]
    )
    query_metrics_type = ()
    # fedkernels: the inner state and measurements are our factory's own.
    inner = inner_agg_factory.create(value_type)
    inner_state_type = inner.initialize.type_signature.result.member
    dp_event_type = computation_types.StructType([
        ('module_name', np.str_),
        ('class_name', np.str_),
        ('noise_multiplier', np.float32),
    ])
    server_state_type = computation_types.FederatedType(
        differential_privacy.DPAggregatorState(
            query_state_type, inner_state_type, dp_event_type, np.bool_
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
    inner_measurements_type = inner.next.type_signature.result.measurements.member
    expected_measurements_type = computation_types.FederatedType(
        dict(dp_query_metrics=query_metrics_type, dp=inner_measurements_type),
        placements.SERVER,
    )
    expected_next_type = computation_types.FunctionType(
        parameter=dict(
            state=server_state_type,
            value=computation_types.FederatedType(
                value_type, placements.CLIENTS
            ),
        ),
        result=tff.templates.MeasuredProcessOutput(
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


class DPFactoryExecutionTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.named_parameters(*_INNER)
  def test_simple_sum(self, make_inner):
    factory_ = differential_privacy.DifferentiallyPrivateFactory(
        _test_dp_query, make_inner())
    value_type = computation_types.TensorType(np.float32)
    process = factory_.create(value_type)

    # The test query has clip 1.0 and no noise, so this computes clipped sum.

    state = process.initialize()

    client_data = [0.5, 1.0, 1.5]
    output = process.next(state, client_data)
    self.assertAllClose(2.5, output.result)

  @parameterized.named_parameters(*_INNER)
  def test_structure_sum(self, make_inner):
    factory_ = differential_privacy.DifferentiallyPrivateFactory(
        _test_dp_query, make_inner())
    value_type = computation_types.to_type([np.float32, np.float32])
    process = factory_.create(value_type)

    # The test query has clip 1.0 and no noise, so this computes clipped sum.

    state = process.initialize()

    # pyformat: disable
    client_data = [
        [0.1, 0.2],         # not clipped (norm < 1)
        [5 / 13, 12 / 13],  # not clipped (norm == 1)
        [3.0, 4.0]          # clipped to 3/5, 4/5
    ]
    output = process.next(state, client_data)

    expected_result = [0.1 +  5 / 13 + 3 / 5,
                       0.2 + 12 / 13 + 4 / 5]
    # pyformat: enable
    self.assertAllClose(expected_result, output.result)
