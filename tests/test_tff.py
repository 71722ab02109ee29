"""fedkernels.tff staged factories in TFF 0.87's runtime: type signatures, then execution.

Values are checked against NumPy float64 references, against TFF's stock factories, and
against the numpy bridge. TFF computations are slow to build, so shapes are small.
"""

from __future__ import annotations

import collections
import math

import numpy as np
import pytest

tff = pytest.importorskip(
    "tensorflow_federated",
    reason="TFF adapter tests need tensorflow-federated (the locked .venv stack, "
    "pip install fedkernels[tff]); this stack has no TensorFlow",
)
tf = pytest.importorskip("tensorflow")

import fedkernels as fk  # noqa: E402
import fedkernels.tff as ft  # noqa: E402

C, D = 4, 40
F32 = np.float32
WEIGHT_TYPE = tff.TensorType(F32)
STRUCT_TYPE = tff.to_type(
    collections.OrderedDict(
        b=tff.TensorType(F32, [D]),
        a=tff.TensorType(F32, [2, 3]),
    )
)


def _client_values(seed: int = 0, density: float = 0.5, num_clients: int = C) -> list:
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(num_clients):
        b = rng.standard_normal(D).astype(F32) * (rng.random(D) < density)
        a = rng.standard_normal((2, 3)).astype(F32)
        values.append(collections.OrderedDict(b=b, a=a))
    return values


WEIGHTS = [1.0, 2.0, 0.5, 3.0]


def _masked_mean_reference(xs: list[np.ndarray], weights: list[float]) -> np.ndarray:
    """NumPy float64: per coordinate, weighted mean over clients with a finite nonzero value."""
    x = np.stack(xs).astype(np.float64)
    w = np.asarray(weights, np.float64)[:, None]
    m = (x != 0) & np.isfinite(x)
    numerator = np.where(m, x, 0).reshape(len(xs), -1) * w
    denominator = m.reshape(len(xs), -1) * w
    num, den = numerator.sum(0), denominator.sum(0)
    mean = np.divide(num, den, out=np.zeros_like(num), where=den > 0)
    return mean.reshape(x.shape[1:]), (m.reshape(len(xs), -1) & (w > 0)).sum(0)


def _flat(value) -> np.ndarray:
    """Leaves in jax.tree_util order (dict keys sorted), as fedkernels.flatten does."""
    return np.concatenate([np.ravel(value[key]) for key in sorted(value)])


@pytest.fixture(scope="module")
def masked_mean_process():
    return ft.MaskedMeanFactory().create(STRUCT_TYPE, WEIGHT_TYPE)


@pytest.fixture(scope="module")
def top_k_process():
    return ft.top_k_factory(k=7).create(STRUCT_TYPE, WEIGHT_TYPE)


@pytest.fixture(scope="module")
def quantize_process():
    return ft.quantize_above_threshold(quantization_bits=8, threshold=10, seed=7).create(
        STRUCT_TYPE
    )


class TestTypeSignatures:
    def test_masked_mean(self, masked_mean_process):
        signature = masked_mean_process.next.type_signature
        assert signature.parameter[1] == tff.FederatedType(STRUCT_TYPE, tff.CLIENTS)
        assert signature.parameter[2] == tff.FederatedType(WEIGHT_TYPE, tff.CLIENTS)
        assert signature.result.result == tff.FederatedType(STRUCT_TYPE, tff.SERVER)
        measurements = signature.result.measurements.member
        assert measurements.num_clients == tff.TensorType(np.int32)
        assert set(dir(measurements.contributors)) == {"mean", "uncovered"}
        counted = ft.MaskedMeanFactory(count_contributors=True).create(STRUCT_TYPE, WEIGHT_TYPE)
        contributors = counted.next.type_signature.result.measurements.member.contributors
        assert set(dir(contributors)) == {"min", "max", "mean", "uncovered"}
        assert isinstance(ft.MaskedMeanFactory(), tff.aggregators.WeightedAggregationFactory)

    def test_top_k(self, top_k_process):
        signature = top_k_process.next.type_signature
        assert signature.result.result == tff.FederatedType(STRUCT_TYPE, tff.SERVER)
        assert str(top_k_process.initialize.type_signature.result.member) == "<>"
        measurements = signature.result.measurements.member
        assert measurements.bytes_sent == tff.TensorType(np.int64)
        assert measurements.compression_ratio == tff.TensorType(np.float32)

    def test_quantize(self, quantize_process):
        factory = ft.quantize_above_threshold()
        assert isinstance(factory, tff.aggregators.UnweightedAggregationFactory)
        state_type = quantize_process.initialize.type_signature.result.member
        assert state_type.seed == tff.TensorType(np.int32)
        assert state_type.round == tff.TensorType(np.int32)
        signature = quantize_process.next.type_signature
        assert signature.result.result == tff.FederatedType(STRUCT_TYPE, tff.SERVER)

    def test_concat_weightedness_and_mixed_dtypes(self):
        mixed = tff.to_type(
            collections.OrderedDict(
                h=tff.TensorType(np.float16, [3]), s=tff.TensorType(F32, [2, 2])
            )
        )
        weighted = ft.concat_factory(ft.MaskedMeanFactory())
        unweighted = ft.concat_factory(ft.quantize_above_threshold())
        assert isinstance(weighted, tff.aggregators.WeightedAggregationFactory)
        assert isinstance(unweighted, tff.aggregators.UnweightedAggregationFactory)
        # TFF's concat_factory rule: one dtype for all leaves
        with pytest.raises(TypeError, match="should have the same dtype"):
            weighted.create(mixed, WEIGHT_TYPE)
        same = tff.to_type(collections.OrderedDict(h=tff.TensorType(np.float64, [3]),
                                                   s=tff.TensorType(np.float64, [2, 2])))
        process = weighted.create(same, WEIGHT_TYPE)
        assert process.next.type_signature.result.result == tff.FederatedType(same, tff.SERVER)

    def test_rejects_bad_arguments(self):
        with pytest.raises(ValueError, match="exactly one of fraction and k"):
            ft.top_k_factory()
        with pytest.raises(ValueError, match="fraction must be in"):
            ft.top_k_factory(fraction=1.5)
        with pytest.raises(ValueError, match="quantization_bits must be in"):
            ft.quantize_above_threshold(quantization_bits=17)
        with pytest.raises(TypeError, match="value_sum_factory"):
            ft.MaskedMeanFactory(value_sum_factory=tff.aggregators.MeanFactory())
        with pytest.raises(TypeError, match="floating"):
            ft.MaskedMeanFactory().create(tff.TensorType(np.int32, [3]), WEIGHT_TYPE)


class TestExecution:
    @pytest.mark.parametrize("count_contributors", [False, True])
    def test_masked_mean_against_numpy(self, masked_mean_process, count_contributors):
        process = (
            ft.MaskedMeanFactory(count_contributors=True).create(STRUCT_TYPE, WEIGHT_TYPE)
            if count_contributors
            else masked_mean_process
        )
        values = _client_values(1, density=0.4)
        values[2]["b"][3] = np.nan  # never contributes
        weights = [1.0, 2.0, 0.0, 3.0]  # a zero-weight client contributes nowhere
        output = process.next(process.initialize(), values, weights)
        for key in ("a", "b"):
            expected, _ = _masked_mean_reference([v[key] for v in values], weights)
            np.testing.assert_allclose(output.result[key], expected, rtol=1e-6, atol=1e-6)
        _, counts_b = _masked_mean_reference([v["b"] for v in values], weights)
        _, counts_a = _masked_mean_reference([v["a"] for v in values], weights)
        counts = np.concatenate([counts_b, counts_a])
        contributors = output.measurements["contributors"]
        assert contributors["uncovered"] == np.sum(counts == 0) > 0
        np.testing.assert_allclose(contributors["mean"], counts.mean(), rtol=1e-6)
        if count_contributors:
            assert contributors["min"] == counts.min() and contributors["max"] == counts.max()
        assert output.measurements["num_clients"] == C

    def test_equals_mean_factory_on_dense_updates(self, masked_mean_process):
        values = _client_values(2, density=1.0)
        mean = tff.aggregators.MeanFactory().create(STRUCT_TYPE, WEIGHT_TYPE)
        expected = mean.next(mean.initialize(), values, WEIGHTS).result
        result = masked_mean_process.next(masked_mean_process.initialize(), values, WEIGHTS)
        for key in ("a", "b"):
            np.testing.assert_allclose(result.result[key], expected[key], rtol=2e-7, atol=1e-7)

    def test_top_k_against_numpy(self, top_k_process):
        values = _client_values(3, density=0.8)
        values[0]["b"][5] = values[0]["b"][6] = 9.0  # tie at the top: both kept
        # Fewer than k nonzeros: a client zeroed (as TFF's zeroing_factory does) and one with
        # two nonzeros. Their top-k pads with zeros, which must not count (the masked rule).
        values[1] = collections.OrderedDict((key, np.zeros_like(v)) for key, v in values[1].items())
        values[2]["b"][:] = 0
        values[2]["a"][:] = 0
        values[2]["a"][1, 2], values[2]["b"][3] = 5.0, -4.0
        k = 7
        flats = np.stack([_flat(v) for v in values]).astype(np.float64)
        sparse = np.zeros_like(flats)
        for c, row in enumerate(flats):
            keep = np.argsort(-np.abs(row), kind="stable")[:k]  # ties: lower index first
            sparse[c, keep] = row[keep]
        expected, counts = _masked_mean_reference(list(sparse), WEIGHTS)
        output = top_k_process.next(top_k_process.initialize(), values, WEIGHTS)
        np.testing.assert_allclose(_flat(output.result), expected, rtol=1e-6, atol=1e-7)
        assert output.measurements["contributors"]["uncovered"] == np.sum(counts == 0)
        d = D + 6
        assert output.measurements["bytes_sent"] == k * 8 + 4
        np.testing.assert_allclose(output.measurements["compression_ratio"], d * 4 / (k * 8 + 4))

    def test_top_k_with_inner_equals_sparse_path(self):
        values = _client_values(4)
        dense = ft.top_k_factory(fraction=0.25, inner=ft.MaskedMeanFactory()).create(
            STRUCT_TYPE, WEIGHT_TYPE
        )
        sparse = ft.top_k_factory(fraction=0.25).create(STRUCT_TYPE, WEIGHT_TYPE)
        a = dense.next(dense.initialize(), values, WEIGHTS).result
        b = sparse.next(sparse.initialize(), values, WEIGHTS).result
        np.testing.assert_allclose(_flat(a), _flat(b), rtol=1e-6, atol=1e-7)

    def test_quantize_error_bound_and_exact_small_leaves(self, quantize_process):
        values = _client_values(5, density=1.0)
        output = quantize_process.next(quantize_process.initialize(), values)
        exact_b = np.sum([v["b"] for v in values], axis=0, dtype=np.float64)
        step = sum((v["b"].max() - v["b"].min()) / 255 for v in values)
        assert np.max(np.abs(output.result["b"] - exact_b)) <= step * 1.0001
        assert np.max(np.abs(output.result["b"] - exact_b)) > 0  # it was quantized
        # a has 6 <= threshold=10 elements: summed exactly.
        exact_a = np.sum([v["a"] for v in values], axis=0, dtype=np.float64)
        np.testing.assert_allclose(output.result["a"], exact_a, rtol=1e-6)
        assert output.state["round"] == 1 and output.state["seed"] == 7

    def test_quantize_is_reproducible_from_state_seed(self, quantize_process):
        values = _client_values(6, density=1.0)
        state = quantize_process.initialize()
        first = quantize_process.next(state, values)
        again = quantize_process.next(state, values)
        np.testing.assert_array_equal(first.result["b"], again.result["b"])
        later = quantize_process.next(first.state, values)  # round 1: new draws
        assert not np.array_equal(first.result["b"], later.result["b"])
        other = ft.quantize_above_threshold(8, 10, seed=8).create(STRUCT_TYPE)
        other_result = other.next(other.initialize(), values).result
        assert not np.array_equal(first.result["b"], other_result["b"])

    def test_quantize_matches_tff_encoded_sum_semantics(self, quantize_process):
        # Same rounding rule as TFF's: both within one step per client, both exact below the
        # threshold; over many rounds both are unbiased (the mean error shrinks).
        values = _client_values(7, density=1.0)
        stock = tff.aggregators.EncodedSumFactory.quantize_above_threshold(8, 10).create(
            STRUCT_TYPE
        )
        theirs = stock.next(stock.initialize(), values).result
        ours = quantize_process.next(quantize_process.initialize(), values).result
        exact = np.sum([v["b"] for v in values], axis=0, dtype=np.float64)
        step = sum((v["b"].max() - v["b"].min()) / 255 for v in values)
        for result in (theirs, ours):
            assert np.max(np.abs(result["b"] - exact)) <= step * 1.0001
        np.testing.assert_allclose(ours["a"], theirs["a"], rtol=1e-6)

    def test_masked_quantized_mean_counts_every_byte_sent(self, weight_dtype=np.int64):
        """bytes_sent of MaskedMeanFactory(quantize_above_threshold): per client the packed
        codes and the range of the quantized leaf, its 1-bit mask, the small leaf as is and
        the weight (which it left out)."""
        factory = ft.MaskedMeanFactory(value_sum_factory=ft.quantize_above_threshold(8, 10))
        process = factory.create(STRUCT_TYPE, tff.TensorType(weight_dtype))
        values = _client_values(3, density=1.0)
        output = process.next(process.initialize(), values, [weight_dtype(1)] * len(values))
        words = -(-D // 32)
        expected = words * 8 * 4 + 8 + words * 4 + 6 * 4 + np.dtype(weight_dtype).itemsize
        measured = output.measurements["mean_value"]
        assert measured["bytes_sent"] == expected
        np.testing.assert_allclose(measured["compression_ratio"], (D + 6) * 4 / expected)

    def test_masked_mean_mixed_dtypes(self):
        mixed = tff.to_type(
            collections.OrderedDict(
                h=tff.TensorType(np.float16, [3]), s=tff.TensorType(np.float64, [2, 2])
            )
        )
        process = ft.MaskedMeanFactory().create(mixed, WEIGHT_TYPE)
        rng = np.random.default_rng(8)
        values = [
            collections.OrderedDict(
                h=rng.standard_normal(3).astype(np.float16),
                s=rng.standard_normal((2, 2)) * 1e-300,
            )
            for _ in range(C)
        ]
        output = process.next(process.initialize(), values, WEIGHTS)
        for key, tol in (("h", 2e-3), ("s", 1e-12)):
            expected, _ = _masked_mean_reference([v[key] for v in values], WEIGHTS)
            assert output.result[key].dtype == values[0][key].dtype
            np.testing.assert_allclose(output.result[key], expected, rtol=tol,
                                       atol=tol if key == "h" else 0)

    @pytest.mark.parametrize("wrapper", ["zeroing", "clipping"])
    def test_composes_in_robust_factories(self, wrapper):
        values = _client_values(9, density=0.5)
        if wrapper == "zeroing":
            factory = tff.aggregators.zeroing_factory(1e6, ft.MaskedMeanFactory())
        else:
            factory = tff.aggregators.clipping_factory(1e6, ft.MaskedMeanFactory())
        process = factory.create(STRUCT_TYPE, WEIGHT_TYPE)
        output = process.next(process.initialize(), values, WEIGHTS)
        expected, _ = _masked_mean_reference([v["b"] for v in values], WEIGHTS)
        np.testing.assert_allclose(output.result["b"], expected, rtol=1e-5, atol=1e-6)

        tight = (
            tff.aggregators.zeroing_factory(1e-3, ft.MaskedMeanFactory())
            if wrapper == "zeroing"
            else tff.aggregators.clipping_factory(1e-3, ft.MaskedMeanFactory())
        ).create(STRUCT_TYPE, WEIGHT_TYPE)
        out = tight.next(tight.initialize(), values, WEIGHTS).result
        if wrapper == "zeroing":  # every client zeroed: no contributors, the mean is 0
            assert np.all(out["b"] == 0)
        else:  # clipped to norm 1e-3: each client's share is tiny
            assert np.max(np.abs(out["b"])) <= 1e-3

    def test_zeroed_client_drops_out_of_top_k_mean(self):
        """A client that TFF's zeroing_factory zeroes sends k zeros through top-k; they do not
        count, so the mean is that of the other clients' top-k (the README's masked rule)."""
        values = _client_values(13, density=1.0)
        values[3] = collections.OrderedDict((key, v * 1e4) for key, v in values[3].items())
        k = 7
        factory = tff.aggregators.zeroing_factory(1e3, ft.top_k_factory(k=k))
        process = factory.create(STRUCT_TYPE, WEIGHT_TYPE)
        output = process.next(process.initialize(), values, WEIGHTS)
        sparse = np.zeros((len(values), D + 6))
        for c, value in enumerate(values[:3]):
            row = _flat(value).astype(np.float64)
            keep = np.argsort(-np.abs(row), kind="stable")[:k]
            sparse[c, keep] = row[keep]
        expected, _ = _masked_mean_reference(list(sparse), WEIGHTS)
        assert output.measurements["zeroed_count"] == 1
        np.testing.assert_allclose(_flat(output.result), expected, rtol=1e-6, atol=1e-7)

    def test_top_k_float64_leaves_stay_float64(self):
        """float64 leaves go through top-k and the sparse mean in float64 (JAX's x64 flag
        off): 1e-300 survives; the float32 leaf stays float32; the bridge agrees."""
        value_type = tff.StructWithPythonType(
            [("w", tff.TensorType(np.float64, [3])), ("b", tff.TensorType(np.float32, [2]))],
            collections.OrderedDict,
        )
        values = [
            collections.OrderedDict(w=np.array([1e-300, 0.0, 2.0]), b=np.float32([1.0, 0.0])),
            collections.OrderedDict(w=np.array([3e-300, 5.0, 2.0 + 2**-40]),
                                    b=np.float32([0.0, 4.0])),
        ]
        process = ft.top_k_factory(k=4).create(value_type, WEIGHT_TYPE)
        assert process.next.type_signature.result.result.member == value_type
        result = process.next(process.initialize(), values, [1.0, 1.0]).result
        bridge = ft.TopKProcess(k=4).next((), values, [1.0, 1.0]).result
        for out in (result, bridge):
            assert out["w"].dtype == np.float64 and out["b"].dtype == np.float32
            # client 0 keeps w[0], w[2], b[0] (three nonzeros); client 1 drops b[0] = 0
            np.testing.assert_allclose(out["w"], [2e-300, 5.0, 2.0 + 2**-41], rtol=1e-15, atol=0)
            np.testing.assert_array_equal(out["b"], [1.0, 4.0])

    def test_compression_aggregator(self):
        values = _client_values(10, density=1.0)
        factory = ft.compression_aggregator()
        process = factory.create(STRUCT_TYPE, WEIGHT_TYPE)
        output = process.next(process.initialize(), values, WEIGHTS)
        stock = tff.learning.compression_aggregator().create(STRUCT_TYPE, WEIGHT_TYPE)
        theirs = stock.next(stock.initialize(), values, WEIGHTS).result
        # Both clip to the same adaptive norm and quantize only leaves above 20000 elements
        # (none here), so they agree up to float rounding.
        for key in ("a", "b"):
            np.testing.assert_allclose(output.result[key], theirs[key], rtol=1e-5, atol=1e-6)
        sparse = ft.compression_aggregator(top_k_fraction=0.1).create(STRUCT_TYPE, WEIGHT_TYPE)
        assert sparse.next(sparse.initialize(), values, WEIGHTS).result["b"].shape == (D,)


class TestNumpyBridge:
    """The bridge runs the JAX kernels in-process and equals the staged factory."""

    def test_masked_mean(self, masked_mean_process):
        values = _client_values(11, density=0.4)
        staged = masked_mean_process.next(masked_mean_process.initialize(), values, WEIGHTS)
        bridge = ft.numpy_process(ft.MaskedMeanFactory())
        output = bridge.next(bridge.initialize(), values, WEIGHTS)
        for key in ("a", "b"):
            np.testing.assert_allclose(output.result[key], staged.result[key], rtol=1e-6,
                                       atol=1e-7)
        assert output.measurements["contributors"] == pytest.approx(
            dict(staged.measurements["contributors"])
        )
        # the same names in the same order as the staged factory's measurement
        assert list(output.measurements["contributors"]) == list(
            staged.measurements["contributors"]
        )

    def test_top_k(self, top_k_process):
        values = _client_values(12, density=0.9)
        staged = top_k_process.next(top_k_process.initialize(), values, WEIGHTS)
        bridge = ft.numpy_process(ft.top_k_factory(k=7))
        output = bridge.next(bridge.initialize(), values, WEIGHTS)
        np.testing.assert_allclose(_flat(output.result), _flat(staged.result), rtol=1e-6,
                                   atol=1e-7)
        assert output.measurements["bytes_sent"] == staged.measurements["bytes_sent"]

    def test_quantize_same_draws(self, quantize_process):
        values = _client_values(13, density=1.0)
        state = quantize_process.initialize()
        staged = quantize_process.next(state, values)
        bridge = ft.numpy_process(ft.quantize_above_threshold(8, 10, seed=7))
        bridge_state = bridge.initialize()
        output = bridge.next(bridge_state, values)
        # Same keys, same codes: only the order of the float sum over clients differs.
        step = max(v["b"].max() - v["b"].min() for v in values) / 255
        np.testing.assert_allclose(output.result["b"], staged.result["b"], atol=1e-5 * step + 1e-6)
        assert output.state == {"seed": 7, "round": 1}

    def test_concat(self):
        values = _client_values(14)
        factory = ft.concat_factory(ft.MaskedMeanFactory())
        staged = factory.create(STRUCT_TYPE, WEIGHT_TYPE)
        expected = staged.next(staged.initialize(), values, WEIGHTS).result
        bridge = ft.numpy_process(factory)
        output = bridge.next(bridge.initialize(), values, WEIGHTS)
        np.testing.assert_allclose(_flat(output.result), _flat(expected), rtol=1e-6, atol=1e-7)

    def test_concat_around_quantizer_same_draws(self):
        """Around the quantizer the layout decides which coordinate gets which random draw:
        the bridge flattens in `tf.nest` order (STRUCT_TYPE's keys b, a are sorted to a, b)
        as concat_factory does, so both quantize the same vector with the same codes."""
        values = _client_values(15, density=1.0)
        factory = ft.concat_factory(ft.quantize_above_threshold(8, 10, seed=3))
        staged = factory.create(STRUCT_TYPE)
        expected = staged.next(staged.initialize(), values).result
        bridge = ft.numpy_process(factory)
        output = bridge.next(bridge.initialize(), values).result
        assert list(output) == list(expected) == ["b", "a"]
        for key in ("a", "b"):
            np.testing.assert_allclose(output[key], expected[key], rtol=1e-6, atol=1e-6)

    def test_unsupported_compositions_say_so(self):
        with pytest.raises(NotImplementedError, match="numpy bridge"):
            ft.numpy_process(ft.compression_aggregator())
        with pytest.raises(NotImplementedError, match="inner"):
            ft.numpy_process(ft.top_k_factory(k=1, inner=tff.aggregators.MeanFactory()))


class TestNumpyFunctionWrappers:
    def test_eager_and_tf_function(self):
        x = np.array([[2.0, 0.0, 1.0], [4.0, 6.0, 0.0]], F32)
        np.testing.assert_allclose(ft.masked_mean_tf(tf.constant(x)).numpy(), [3.0, 6.0, 1.0])

        @tf.function
        def graph(x):
            values, indices = ft.top_k_tf(x, 2)
            return values, indices

        values, indices = graph(tf.constant(x))
        expected_values, expected_indices = fk.top_k(x, 2)
        np.testing.assert_array_equal(values.numpy(), expected_values)
        np.testing.assert_array_equal(indices.numpy(), expected_indices)
        assert values.shape == (2, 2)

    def test_refuses_inside_tff_computation(self):
        with pytest.raises(ft.NumpyFunctionInTFFError, match="cannot run inside a TFF"):

            @tff.tensorflow.computation(tff.TensorType(F32, [2, 3]))
            def comp(x):
                return ft.masked_mean_tf(x)


class TestErrorFeedback:
    def test_encoder_equals_top_k_with_feedback(self):
        value_type = tff.TensorType(F32, [D])
        encoder = ft.error_feedback_encoder(value_type, k=5)
        rng = np.random.default_rng(15)
        update = rng.standard_normal(D).astype(F32)
        residual = (0.3 * rng.standard_normal(D)).astype(F32)
        update[[1, 2]] = 5.0  # a tie
        values, indices, new_residual = encoder(update, residual)
        ref_values, ref_indices, ref_residual = fk.top_k_with_feedback(update, residual, 5)
        np.testing.assert_array_equal(indices, ref_indices)  # ascending, as fedkernels
        np.testing.assert_array_equal(values, ref_values)
        np.testing.assert_array_equal(new_residual, ref_residual)
        restored = np.asarray(fk.scatter(values, indices, D)) + new_residual
        np.testing.assert_array_equal(restored, update + residual)

    def test_fedavg_round_keeps_residuals_per_client(self):
        dim, n = 8, 16
        model_type = tff.TensorType(F32, [dim])
        data_type = tff.types.to_type(
            (tff.TensorType(F32, [n, dim]), tff.TensorType(F32, [n]))
        )

        @tff.tensorflow.computation(model_type, data_type)
        def client_update(weights, data):
            features, labels = data
            error = tf.linalg.matvec(features, weights) - labels
            gradient = tf.linalg.matvec(features, error, transpose_a=True) / float(n)
            return -0.1 * gradient, tf.constant(float(n))

        rng = np.random.default_rng(16)
        true_w = rng.standard_normal(dim).astype(F32)
        data = {}
        for i in range(6):
            x = rng.standard_normal((n, dim)).astype(F32)
            data[i] = (x, (x @ true_w).astype(F32))

        def loss(w):
            return float(np.mean([np.mean((x @ w - y) ** 2) for x, y in data.values()]))

        round_fn = ft.build_error_feedback_round(client_update, model_type, data_type, k=2)
        residuals = ft.ClientResiduals(round_fn.d)
        model = np.zeros(dim, F32)
        losses = [loss(model)]
        for r in range(8):
            ids = [(r + j) % 6 for j in range(3)]
            model, new_residuals, metrics = round_fn(
                model, [data[i] for i in ids], residuals.get(ids)
            )
            residuals.put(ids, new_residuals)
            losses.append(loss(model))
        assert len(residuals) == 6 and all(i in residuals for i in range(6))
        assert losses[-1] < 0.8 * losses[0]
        assert 0 < metrics["contributors"]["mean"] <= 3 * 2 / dim
        assert any(np.any(r != 0) for r in residuals.get(range(6)))


def _keras_model_fn():
    keras_model = tf.keras.Sequential(
        [tf.keras.layers.Dense(1, kernel_initializer="zeros", input_shape=(4,))]
    )
    return tff.learning.models.from_keras_model(
        keras_model,
        input_spec=(tf.TensorSpec([None, 4], tf.float32), tf.TensorSpec([None, 1], tf.float32)),
        loss=tf.keras.losses.MeanSquaredError(),
    )


def _keras_client_data(num_clients: int = 3):
    rng = np.random.default_rng(17)
    true_w = np.array([[1.0], [-2.0], [0.5], [3.0]], F32)
    datasets = []
    for _ in range(num_clients):
        x = rng.standard_normal((32, 4)).astype(F32)
        datasets.append(tf.data.Dataset.from_tensor_slices((x, x @ true_w)).batch(8))
    return datasets


@pytest.mark.parametrize(
    "make_aggregator",
    [lambda: ft.MaskedMeanFactory(), lambda: ft.top_k_factory(fraction=0.6)],
    ids=["masked_mean", "top_k"],
)
def test_fed_avg_with_keras_model_decreases_loss(make_aggregator):
    process = tff.learning.algorithms.build_weighted_fed_avg(
        _keras_model_fn,
        client_optimizer_fn=tff.learning.optimizers.build_sgdm(learning_rate=0.05),
        model_aggregator=make_aggregator(),
    )
    data = _keras_client_data()
    state = process.initialize()
    losses = []
    for _ in range(4):
        output = process.next(state, data)
        state = output.state
        losses.append(float(output.metrics["client_work"]["train"]["loss"]))
    assert losses[-1] < losses[0], losses
    assert all(math.isfinite(v) for v in losses)


def test_readme_drop_in_example():
    # The README's "TFF drop-in" snippet, verbatim apart from the model and data helpers.
    import tensorflow_federated as tff

    import fedkernels.tff as fktff

    model_fn, client_datasets = _keras_model_fn, _keras_client_data()

    aggregator = fktff.compression_aggregator(top_k_fraction=0.01)  # top-k + masked mean
    process = tff.learning.algorithms.build_weighted_fed_avg(
        model_fn,
        client_optimizer_fn=tff.learning.optimizers.build_sgdm(learning_rate=0.05),
        model_aggregator=aggregator,
    )
    state = process.initialize()
    for _ in range(3):
        output = process.next(state, client_datasets)
        state = output.state
    print(output.metrics["client_work"]["train"]["loss"])


class TestStagedKernels:
    """The converted kernels, run in TFF's worker, against the same JAX kernels run by XLA."""

    @staticmethod
    def _run_in_tff(fn, *args):
        types = [tff.TensorType(np.asarray(a).dtype, np.shape(a)) for a in args]
        converted = ft.staged(fn)
        if len(args) == 1:
            comp = tff.tensorflow.computation(lambda a: converted(a), *types)
        elif len(args) == 2:
            comp = tff.tensorflow.computation(lambda a, b: converted(a, b), *types)
        else:
            comp = tff.tensorflow.computation(lambda a, b, c: converted(a, b, c), *types)
        return comp(*args)

    def test_bit_exact(self):
        import jax

        from fedkernels.tff import _kernels

        rng = np.random.default_rng(20)
        x = (rng.standard_normal((3, 50)) * (rng.random((3, 50)) < 0.5)).astype(F32)
        indices = np.stack([rng.choice(50, 6, replace=False) for _ in range(3)]).astype(np.int32)
        values = rng.standard_normal((3, 6)).astype(F32)
        cases = [
            (lambda a: fk.masked_sum(a), (x,)),
            (lambda v, i: fk.scatter_sum(v, i, 50), (values, indices)),
            (lambda a, s: tuple(fk.quantize(a, jax.random.PRNGKey(s), 5))[:3], (x, np.int32(4))),
            # 1-D only: a batched take_along_axis is a gather jax2tf cannot convert without XLA
            (lambda a: _kernels.top_k_unsorted(a, 9), (x[0],)),
            (lambda a: _kernels.ascending(_kernels.top_k_unsorted(a, 9)[1], 50), (x[0],)),
            (lambda a, r: _kernels.top_k_with_feedback(a, r, 4), (x[0], x[1])),
            (lambda a: fk.flatten({"p": a, "q": a[:2]})[0], (x,)),
        ]
        for fn, args in cases:
            got = jax.tree_util.tree_leaves(self._run_in_tff(fn, *args))
            want = jax.tree_util.tree_leaves(fn(*args))
            assert len(got) == len(want)
            for g, w in zip(got, want, strict=True):
                np.testing.assert_array_equal(np.asarray(g), np.asarray(w))

    @pytest.mark.parametrize("bits", [8, 16, 5])
    def test_staged_dequantize_equals_dequantize_bit_for_bit(self, bits):
        # 8 and 16 bits read the codes by a bitcast and a transpose in the staged graph, other
        # widths as dequantize does: in TFF's worker the same values as dequantize staged there,
        # bit for bit, and within rounding of XLA's (whose float arithmetic may contract).
        import jax

        from fedkernels.tff import _kernels

        x = np.random.default_rng(bits).standard_normal((3, 50)).astype(F32)  # 50: padding
        q = fk.quantize(x, jax.random.PRNGKey(bits), bits)
        args = (np.asarray(q.packed), np.asarray(q.minimum), np.asarray(q.maximum))
        got = self._run_in_tff(
            lambda p, lo, hi: _kernels.dequantize_staged(fk.Quantized(p, lo, hi, bits, 50)), *args
        )
        plain = self._run_in_tff(
            lambda p, lo, hi: fk.dequantize(fk.Quantized(p, lo, hi, bits, 50)), *args
        )
        np.testing.assert_array_equal(np.asarray(got), np.asarray(plain))
        ulp = np.spacing(np.abs(x).max())
        np.testing.assert_allclose(np.asarray(got), np.asarray(fk.dequantize(q)), rtol=0,
                                   atol=2 * ulp)

    def test_ascending_equals_fedkernels_top_k(self):
        from fedkernels.tff import _kernels

        x = np.random.default_rng(21).standard_normal(300).astype(F32)
        x[[10, 20, 30]] = 4.0  # ties
        _, unsorted = _kernels.top_k_unsorted(x, 25)
        np.testing.assert_array_equal(_kernels.ascending(unsorted, 300), fk.top_k(x, 25)[1])

    def test_weighted_masked_sum_within_a_few_ulps(self):
        rng = np.random.default_rng(22)
        x = rng.standard_normal((4, 30)).astype(F32)
        w = rng.uniform(0.5, 2, 4).astype(F32)
        got = self._run_in_tff(lambda a, b: fk.masked_sum(a, b), x, w)
        want = fk.masked_sum(x, w)
        for g, ref in zip(got, want, strict=True):  # XLA may fuse multiply-adds; TF does not
            np.testing.assert_allclose(g, ref, rtol=4e-6, atol=1e-6)
