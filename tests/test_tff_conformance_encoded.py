"""TFF v0.87.0 `aggregators/encoded_test.py`, the `quantize_above_threshold` cases, ported with
`tff.aggregators.EncodedSumFactory.quantize_above_threshold` ->
`fedkernels.tff.QuantizeAboveThresholdFactory.quantize_above_threshold` (the same classmethod
signature; `fedkernels.tff.quantize_above_threshold` is the same factory).

Origin: tensorflow_federated/python/aggregators/encoded_test.py at v0.87.0, Copyright 2020 The
TensorFlow Federated Authors, Apache License 2.0 (see tests/_tff_conformance.py). Changes are
marked `fedkernels:`.
Not ported, not applicable: the cases of `EncodedSumFactory(encoder_fn)` with
tensorflow-model-optimization encoders (`test_type_properties` for identity / uniform /
hadamard / one-over-n / state-update encoders, `test_simple_sum`, `test_structure_sum`, and
the `StateUpdateTensorsEncodingStage` they use): fedkernels replaces only the
`quantize_above_threshold` configuration, not the generic encoder factory.
"""

import pytest

pytest.importorskip(
    "tensorflow_federated",
    reason="the ported TFF tests need tensorflow-federated (the locked .venv stack)",
)

import random

import numpy as np
from absl.testing import parameterized

import fedkernels.tff as ft  # noqa: E402
from tests._tff_conformance import tf, tff, tff_test_context  # noqa: F401

computation_types = tff.types


class encoded:  # noqa: N801  (TFF's module name)
  EncodedSumFactory = ft.QuantizeAboveThresholdFactory


class EncodedSumFactoryComputationTest(
    tf.test.TestCase, parameterized.TestCase
):

  def test_quantize_above_threshold_negative_threshold_raises(self):
    with self.assertRaises(ValueError):
      encoded.EncodedSumFactory.quantize_above_threshold(
          quantization_bits=8, threshold=-1
      )

  @parameterized.named_parameters(
      ('zero', 0),
      ('negative', -1),
      ('too_large', 17),
  )
  def test_quantize_above_threshold_quantization_bits_raises(
      self, quantization_bits
  ):
    with self.assertRaises(ValueError):
      encoded.EncodedSumFactory.quantize_above_threshold(
          quantization_bits=quantization_bits, threshold=10000
      )

  # fedkernels: TFF's **kwargs (UniformQuantizationEncodingStage's) are accepted with their
  # defaults; other values are refused with a message naming what to use instead.
  def test_quantize_above_threshold_kwargs(self):
    encoded.EncodedSumFactory.quantize_above_threshold(8, 100, stochastic=True, min_max=None)
    with self.assertRaisesRegex(ValueError, 'stochastic=False is not supported'):
      encoded.EncodedSumFactory.quantize_above_threshold(8, 100, stochastic=False)
    with self.assertRaisesRegex(ValueError, 'min_max=.* is not supported: .*clipping'):
      encoded.EncodedSumFactory.quantize_above_threshold(8, 100, min_max=(-1.0, 1.0))
    with self.assertRaisesRegex(TypeError, "unexpected keyword argument 'bogus'"):
      encoded.EncodedSumFactory.quantize_above_threshold(8, 100, bogus=1)


class EncodedSumFactoryExecutionTest(tf.test.TestCase):

  def test_quantize_above_threshold_zero(self):
    encoded_f = encoded.EncodedSumFactory.quantize_above_threshold(
        quantization_bits=1, threshold=0
    )
    test_type = computation_types.to_type(
        [(np.float32, (3,)), (np.float32, (5,))]
    )
    process = encoded_f.create(test_type)

    single_client_data = [[[0.0, 1.0, 2.0], [1.0, 2.0, 3.0, 4.0, 5.0]]]
    state = process.initialize()
    output = process.next(state, single_client_data)
    # Both tensors are quantized to their min and max, independently.
    self.assertSetEqual(set([0.0, 2.0]), set(output.result[0]))
    self.assertSetEqual(set([1.0, 5.0]), set(output.result[1]))

  def test_quantize_above_threshold_positive(self):
    encoded_f = encoded.EncodedSumFactory.quantize_above_threshold(
        quantization_bits=1, threshold=4
    )
    test_type = computation_types.to_type(
        [(np.float32, (3,)), (np.float32, (5,))]
    )
    process = encoded_f.create(test_type)

    single_client_data = [[[0.0, 1.0, 2.0], [1.0, 2.0, 3.0, 4.0, 5.0]]]
    state = process.initialize()
    output = process.next(state, single_client_data)
    # The first tensor is not quantized.
    self.assertAllClose([0.0, 1.0, 2.0], output.result[0])
    # The second tensor is quantized to its min and max.
    self.assertSetEqual(set([1.0, 5.0]), set(output.result[1]))

  def test_quantize_above_threshold(self):
    encoded_f = encoded.EncodedSumFactory.quantize_above_threshold(
        quantization_bits=4, threshold=0
    )
    process = encoded_f.create(
        computation_types.to_type((np.float32, (10000,)))
    )

    # Creates random values in range [0., 15.] plus the bondaries exactly.
    # After randomized quantization, 16 unique values should be present.
    rng = random.Random(0)  # fedkernels: seeded, so the test reproduces
    single_client_data = [
        [rng.uniform(0.0, 15.0) for _ in range(9998)] + [0.0, 15.0]
    ]
    state = process.initialize()
    output = process.next(state, single_client_data)
    unique_values = sorted(list(set(output.result)))
    self.assertAllClose([float(i) for i in range(16)], unique_values)

  # fedkernels: every float dtype keeps its own dtype; a float64 leaf below the threshold is
  # summed exactly (bit for bit with TFF's), one above it is quantized.
  def test_dtypes(self):
    value_type = computation_types.to_type(
        [(np.float16, (40,)), (np.float64, (40,)), (np.float64, (3,))]
    )
    ours = encoded.EncodedSumFactory.quantize_above_threshold(8, 10).create(value_type)
    theirs = tff.aggregators.EncodedSumFactory.quantize_above_threshold(8, 10).create(
        value_type)
    rng = np.random.default_rng(0)
    data = [[rng.standard_normal(40).astype(np.float16), rng.standard_normal(40),
             rng.standard_normal(3) * 1e-300] for _ in range(3)]
    got = ours.next(ours.initialize(), data).result
    want = theirs.next(theirs.initialize(), data).result
    for g, w in zip(got, want, strict=True):
      self.assertEqual(np.asarray(g).dtype, np.asarray(w).dtype)
    np.testing.assert_array_equal(got[2], want[2])
    exact = np.sum([d[1] for d in data], axis=0)
    step = sum(np.ptp(d[1]) / 255 for d in data)
    self.assertLessEqual(np.max(np.abs(got[1] - exact)), step * 1.0001)
