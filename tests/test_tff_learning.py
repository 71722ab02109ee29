"""fedkernels.tff.build_weighted_fed_avg: TFF's client work, fedkernels' JAX aggregation.

Checked against the stock `tff.learning.algorithms.build_weighted_fed_avg` (same initial
weights and data) and against a NumPy float64 FedAvg of the same linear model: local SGD per
batch on the MSE, model deltas weighted by example counts, the server's momentum SGD step.
Tiny model (4 -> 3 Dense), 3 clients, 2 rounds; the processes are built once per module.
"""

from __future__ import annotations

import collections

import numpy as np
import pytest

tff = pytest.importorskip(
    "tensorflow_federated",
    reason="TFF adapter tests need tensorflow-federated (the locked .venv stack, "
    "pip install fedkernels[tff]); this stack has no TensorFlow",
)
tf = pytest.importorskip("tensorflow")

import jax  # noqa: E402

import fedkernels as fk  # noqa: E402
import fedkernels.tff as ft  # noqa: E402

F32 = np.float32
IN, OUT = 4, 3
CLIENT_LR, SERVER_LR, MOMENTUM = 0.1, 0.5, 0.9
BATCH = 2
EXAMPLES = (3, 5, 8)  # per client: unequal weights, a short last batch


def _model_fn():
    keras_model = tf.keras.Sequential(
        [tf.keras.layers.Dense(OUT, input_shape=(IN,), kernel_initializer="glorot_uniform")]
    )
    return tff.learning.models.from_keras_model(
        keras_model,
        input_spec=(tf.TensorSpec([None, IN], tf.float32), tf.TensorSpec([None, OUT], tf.float32)),
        loss=tf.keras.losses.MeanSquaredError(),
    )


def _arrays(seed: int, counts=EXAMPLES) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        (rng.standard_normal((n, IN)).astype(F32), rng.standard_normal((n, OUT)).astype(F32))
        for n in counts
    ]


def _datasets(arrays) -> list:
    return [tf.data.Dataset.from_tensor_slices(xy).batch(BATCH) for xy in arrays]


def _build(**kwargs):
    return ft.build_weighted_fed_avg(
        _model_fn,
        client_optimizer_fn=tff.learning.optimizers.build_sgdm(learning_rate=CLIENT_LR),
        server_optimizer_fn=tff.learning.optimizers.build_sgdm(SERVER_LR, momentum=MOMENTUM),
        **kwargs,
    )


@pytest.fixture(scope="module")
def stock():
    return tff.learning.algorithms.build_weighted_fed_avg(
        _model_fn,
        client_optimizer_fn=tff.learning.optimizers.build_sgdm(learning_rate=CLIENT_LR),
        server_optimizer_fn=tff.learning.optimizers.build_sgdm(SERVER_LR, momentum=MOMENTUM),
    )


@pytest.fixture(scope="module", params=["files", "tff"])
def bridged(request):
    return _build(update_transport=request.param)


# ---- NumPy float64 reference -----------------------------------------------------------------


def _client_update(kernel, bias, x, y):
    """Keras MSE (mean over batch and outputs), SGD per batch; returns (initial - trained)."""
    w, b = kernel.astype(np.float64), bias.astype(np.float64)
    for start in range(0, len(x), BATCH):
        xb, yb = x[start:start + BATCH].astype(np.float64), y[start:start + BATCH]
        residual = 2.0 * (xb @ w + b - yb) / (len(xb) * OUT)
        w, b = w - CLIENT_LR * xb.T @ residual, b - CLIENT_LR * residual.sum(0)
    return kernel - w, bias - b


def _reference_rounds(kernel, bias, rounds):
    """Weighted-mean FedAvg with the server's momentum SGD; returns the weights per round."""
    accumulators = [np.zeros_like(kernel, np.float64), np.zeros_like(bias, np.float64)]
    weights, out = [kernel.astype(np.float64), bias.astype(np.float64)], []
    for arrays in rounds:
        updates = [_client_update(*weights, x, y) for x, y in arrays]
        counts = np.array([len(x) for x, _ in arrays], np.float64)
        for j in range(2):
            mean = sum(c * u[j] for c, u in zip(counts, updates, strict=True)) / counts.sum()
            accumulators[j] = MOMENTUM * accumulators[j] + mean
            weights[j] = weights[j] - SERVER_LR * accumulators[j]
        out.append([w.copy() for w in weights])
    return out


# ---- equality with the stock process ---------------------------------------------------------


def test_plain_mean_equals_stock_process_and_numpy(stock, bridged):
    rounds = [_arrays(1), _arrays(2)]
    stock_state = stock.initialize()
    state = bridged.set_model_weights(bridged.initialize(), stock.get_model_weights(stock_state))
    initial = stock.get_model_weights(stock_state).trainable
    reference = _reference_rounds(np.asarray(initial[0]), np.asarray(initial[1]), rounds)
    for arrays, expected in zip(rounds, reference, strict=True):
        stock_output = stock.next(stock_state, _datasets(arrays))
        output = bridged.next(state, _datasets(arrays))
        stock_state, state = stock_output.state, output.state
        ours = bridged.get_model_weights(state).trainable
        theirs = stock.get_model_weights(stock_state).trainable
        for a, b, ref in zip(ours, theirs, expected, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(a, ref, rtol=1e-4, atol=1e-5)
        # The same metrics, structure and values, as the stock process with MeanFactory.
        assert tf.nest.map_structure(lambda _: 0, output.metrics) == tf.nest.map_structure(
            lambda _: 0, stock_output.metrics
        )
        client_metrics = output.metrics["client_work"]["train"]
        assert int(client_metrics["num_examples"]) == sum(EXAMPLES)
        np.testing.assert_allclose(
            client_metrics["loss"], stock_output.metrics["client_work"]["train"]["loss"],
            rtol=1e-6,
        )
        assert output.metrics["aggregator"] == collections.OrderedDict(
            mean_value=(), mean_weight=()
        )
        assert int(output.metrics["finalizer"]["update_non_finite"]) == 0
    # The server optimizer's state advanced as TFF's does (momentum accumulators).
    for a, b in zip(state.finalizer["accumulator"], stock_state.finalizer["accumulator"],
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert set(bridged.last_round_seconds) == {
        "tff_computation", "read_updates", "aggregation", "server_update"
    }


def test_get_and_set_model_weights_round_trip(bridged):
    state = bridged.initialize()
    weights = bridged.get_model_weights(state)
    assert isinstance(weights, tff.learning.models.ModelWeights)
    shifted = tff.learning.models.ModelWeights(
        trainable=[np.asarray(w) + 1 for w in weights.trainable],
        non_trainable=weights.non_trainable,
    )
    new_state = bridged.set_model_weights(state, shifted)
    for a, b in zip(bridged.get_model_weights(new_state).trainable, shifted.trainable,
                    strict=True):
        np.testing.assert_array_equal(a, b)
    # The original state is untouched (states are values).
    for a, b in zip(bridged.get_model_weights(state).trainable, weights.trainable, strict=True):
        np.testing.assert_array_equal(a, b)


class _Scale(tf.keras.layers.Layer):
    """A layer with a scalar (0-d) trainable weight."""

    def build(self, input_shape):
        self.scale = self.add_weight(name="scale", shape=(), initializer="ones")

    def call(self, x):
        return x * self.scale


def _float64_model_fn():
    keras_model = tf.keras.Sequential(
        [tf.keras.layers.Dense(OUT, input_shape=(IN,), dtype="float64"), _Scale(dtype="float64")]
    )
    return tff.learning.models.from_keras_model(
        keras_model,
        input_spec=(tf.TensorSpec([None, IN], tf.float64), tf.TensorSpec([None, OUT], tf.float64)),
        loss=tf.keras.losses.MeanSquaredError(),
    )


@pytest.mark.parametrize("transport", ["files", "tff"])
def test_float64_and_scalar_leaves_equal_stock(transport):
    """A float64 model with a 0-d weight: the update of every leaf, the scalar one too, is
    read whole and averaged in float64, as the stock process does (the files transport read
    a 0-d leaf into a temporary copy, and float64 means came back float32)."""
    sgd = tff.learning.optimizers.build_sgdm(learning_rate=CLIENT_LR)
    server = tff.learning.optimizers.build_sgdm(SERVER_LR)  # TFF's momentum is float32 only
    stock = tff.learning.algorithms.build_weighted_fed_avg(
        _float64_model_fn, client_optimizer_fn=sgd, server_optimizer_fn=server)
    ours = ft.build_weighted_fed_avg(_float64_model_fn, client_optimizer_fn=sgd,
                                     server_optimizer_fn=server, update_transport=transport)
    stock_state = stock.initialize()
    state = ours.set_model_weights(ours.initialize(), stock.get_model_weights(stock_state))
    for seed in (1, 2):
        arrays = [(x.astype(np.float64), y.astype(np.float64)) for x, y in _arrays(seed)]
        stock_state = stock.next(stock_state, _datasets(arrays)).state
        state = ours.next(state, _datasets(arrays)).state
    theirs = stock.get_model_weights(stock_state).trainable
    mine = ours.get_model_weights(state).trainable
    assert [np.shape(w) for w in mine] == [(IN, OUT), (OUT,), ()]
    for a, b in zip(mine, theirs, strict=True):
        assert np.asarray(a).dtype == np.float64
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    assert float(mine[2]) != 1.0  # the scalar weight was trained


def test_round_without_weight_is_rejected_as_stock():
    """No client with an example: TFF's mean divides by a zero weight and its server step
    rejects the NaN update (`update_non_finite` 1, model and optimizer state kept); the
    bridged process does the same instead of applying a zero update (which server momentum
    would still move)."""
    stock = tff.learning.algorithms.build_weighted_fed_avg(
        _model_fn,
        client_optimizer_fn=tff.learning.optimizers.build_sgdm(learning_rate=CLIENT_LR),
        server_optimizer_fn=tff.learning.optimizers.build_sgdm(SERVER_LR, momentum=MOMENTUM),
    )
    for process in (stock, _build(), _build(top_k_count=K, dense_threshold=0)):
        ids = {} if process is stock else {"client_ids": [0, 1, 2]}
        state = process.initialize()
        state = process.next(state, _datasets(_arrays(1)), **ids).state
        before = [np.asarray(w) for w in process.get_model_weights(state).trainable]
        empty = [(x[:0], y[:0]) for x, y in _arrays(2)]
        output = process.next(state, _datasets(empty), **ids)
        assert int(output.metrics["finalizer"]["update_non_finite"]) == 1
        for a, b in zip(process.get_model_weights(output.state).trainable, before, strict=True):
            np.testing.assert_array_equal(a, b)


# ---- top-k with error feedback, residuals by client id ---------------------------------------

K = 5  # of d = 4 * 3 + 3 = 15 parameters


@pytest.fixture(scope="module")
def feedback_process():
    return _build(top_k_count=K, error_feedback=True, dense_threshold=0)


def test_error_feedback_residuals_follow_client_ids(feedback_process):
    """Two rounds with different samples of clients, against NumPy client updates fed to
    `fedkernels.compressor` with residuals kept in a dict by client id."""
    process = feedback_process
    d = IN * OUT + OUT
    assert process.compressor.layout.sparse_size == d and process.compressor.layout.k == K
    comp = fk.compressor(
        [np.zeros((IN, OUT), F32), np.zeros(OUT, F32)], top_k_count=K, error_feedback=True,
        dense_threshold=0,
    )
    samples = [["a", "b", "c"], ["c", "d", "a"]]
    state = process.initialize()
    weights = [np.asarray(w) for w in process.get_model_weights(state).trainable]
    accumulator = [np.zeros_like(w) for w in weights]
    residuals: dict = {}
    states = []
    for round_num, ids in enumerate(samples):
        arrays = _arrays(10 + round_num)
        output = process.next(state, _datasets(arrays), client_ids=ids)
        # Reference: float64 client updates, then the compressor with residuals by id.
        updates = [_client_update(*weights, x, y) for x, y in arrays]
        stacked = [np.stack([u[j] for u in updates]).astype(F32) for j in range(2)]
        old = np.stack([residuals.get(i, np.zeros(d, F32)) for i in ids])
        acc = np.abs(np.concatenate([stacked[0].reshape(3, -1), stacked[1]], 1) + old)
        gaps = np.diff(np.sort(acc, 1)[:, ::-1], axis=1)[:, K - 1]
        assert np.all(-gaps > 1e-4), "test data must not have near-ties at the k-th value"
        result = comp.round(stacked, jax.random.PRNGKey(0), residuals=old,
                            weights=np.array([len(x) for x, _ in arrays], F32))
        for i, row in zip(ids, np.asarray(result.residuals), strict=True):
            residuals[i] = row
        for j in range(2):
            accumulator[j] = MOMENTUM * accumulator[j] + np.asarray(result.mean[j], np.float64)
            weights[j] = weights[j] - SERVER_LR * accumulator[j]
        state = output.state
        states.append(state)
        table = state.aggregator["residuals"]
        assert sorted(table) == sorted(residuals)
        for i in residuals:
            np.testing.assert_allclose(table[i], residuals[i], rtol=1e-4, atol=1e-6)
        for ours, ref in zip(process.get_model_weights(state).trainable, weights, strict=True):
            np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5)
        metrics = output.metrics["aggregator"]
        assert metrics["num_clients"] == 3 and metrics["num_excluded"] == 0
        assert metrics["compression_ratio"] == process.compressor.layout.compression_ratio
    # "b" sat out round 2 and kept its residual (checked above); round 1's state still holds
    # round 1's table: each state is a value, not a view of a mutable store.
    first, second = (s.aggregator["residuals"] for s in states)
    assert sorted(first) == ["a", "b", "c"] and sorted(second) == ["a", "b", "c", "d"]
    assert np.any(first["a"] != second["a"])
    np.testing.assert_array_equal(first["b"], second["b"])


def test_error_feedback_client_without_examples_keeps_its_residual(feedback_process):
    """A sampled client with no example has weight 0: its upload counts nowhere, so its
    residual is kept (it was zeroed at the coordinates it "sent")."""
    process = feedback_process
    state = process.next(process.initialize(), _datasets(_arrays(3)),
                         client_ids=["a", "b", "c"]).state
    first = state.aggregator["residuals"]
    assert np.any(first["a"] != 0)
    arrays = _arrays(4)
    arrays[0] = (arrays[0][0][:0], arrays[0][1][:0])
    second = process.next(state, _datasets(arrays), client_ids=["a", "b", "c"]).state
    table = second.aggregator["residuals"]
    np.testing.assert_array_equal(table["a"], first["a"])
    assert np.any(table["b"] != first["b"])


def test_uncompressed_mean_leaves_out_nonfinite_clients():
    from fedkernels.tff._learning import _weighted_mean

    rng = np.random.default_rng(5)
    kernel = rng.standard_normal((4, 3, 2)).astype(F32)
    bias = rng.standard_normal((4, 2)).astype(F32)
    weights = np.array([1.0, 2.0, 0.5, 3.0], F32)
    for bad, value in ((None, None), (1, np.nan), (3, np.inf)):
        k, b = kernel.copy(), bias.copy()
        if bad is not None:
            k[bad, 0, 1] = value
        keep = np.arange(4) != bad
        w = weights.astype(np.float64) * keep
        expected = [
            np.tensordot(w, np.where(keep[:, None, None], k, 0), 1) / w.sum(),
            np.tensordot(w, b, 1) / w.sum(),
        ]
        means, total = _weighted_mean([k, b], weights)
        np.testing.assert_allclose(float(total), w.sum(), rtol=1e-6)
        for got, ref in zip(means, expected, strict=True):
            np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)
    # No weight at all: zeros, not NaN, and a zero total (the process then rejects the round).
    zeros, total = _weighted_mean([kernel, bias], np.zeros(4, F32))
    assert float(total) == 0
    assert all(np.array_equal(z, np.zeros_like(z)) for z in zeros)


# ---- bad input -------------------------------------------------------------------------------


def test_error_feedback_needs_client_ids(feedback_process):
    state = feedback_process.initialize()
    with pytest.raises(ValueError, match="client_ids must be given when error_feedback=True"):
        feedback_process.next(state, _datasets(_arrays(0)))
    with pytest.raises(ValueError, match=r"client_ids must have one id per client .*\(3\), got 2"):
        feedback_process.next(state, _datasets(_arrays(0)), client_ids=[1, 2])
    with pytest.raises(ValueError, match=r"client_ids must be distinct within a round.*\[1\]"):
        feedback_process.next(state, _datasets(_arrays(0)), client_ids=[1, 2, 1])
    with pytest.raises(ValueError, match="client_data must hold at least one client"):
        feedback_process.next(state, [], client_ids=[])


def test_builder_refuses_bad_arguments():
    sgd = tff.learning.optimizers.build_sgdm(learning_rate=0.1)
    with pytest.raises(ValueError, match="model_aggregator must be None"):
        ft.build_weighted_fed_avg(_model_fn, sgd, model_aggregator=tff.aggregators.MeanFactory())
    with pytest.raises(ValueError, match="update_transport must be one of"):
        ft.build_weighted_fed_avg(_model_fn, sgd, update_transport="grpc")
    with pytest.raises(TypeError, match="server_optimizer_fn must be a tff.learning.optimizers"):
        ft.build_weighted_fed_avg(_model_fn, sgd, server_optimizer_fn=lambda: None)
    with pytest.raises(ValueError, match="top_k_count"):
        ft.build_weighted_fed_avg(_model_fn, sgd, top_k_count=0)
