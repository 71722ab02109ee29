"""fedkernels.tff: bad client weights never corrupt another client's contribution, and the
driver-side residual store neither drops nor aliases residuals."""

from __future__ import annotations

import numpy as np
import pytest

tff = pytest.importorskip(
    "tensorflow_federated",
    reason="TFF adapter tests need tensorflow-federated (the locked .venv stack, "
    "pip install fedkernels[tff]); this stack has no TensorFlow",
)

import fedkernels as fk  # noqa: E402
import fedkernels.tff as ft  # noqa: E402

VALUES = [np.array([1.0, 0.0, 2.0], np.float32), np.array([3.0, 4.0, 0.0], np.float32)]
VALUE_TYPE = tff.TensorType(np.float32, [3])
WEIGHT_TYPE = tff.TensorType(np.float32)
BAD_WEIGHTS = [-1.0, np.nan, np.inf, -np.inf]


@pytest.fixture(scope="module")
def processes():
    return {
        "masked_mean": ft.MaskedMeanFactory().create(VALUE_TYPE, WEIGHT_TYPE),
        "top_k": ft.top_k_factory(k=3).create(VALUE_TYPE, WEIGHT_TYPE),
    }


@pytest.mark.parametrize("name", ["masked_mean", "top_k"])
@pytest.mark.parametrize("bad", BAD_WEIGHTS)
def test_staged_bad_weight_leaves_only_that_client_out(processes, name, bad):
    process = processes[name]
    output = process.next(process.initialize(), VALUES, [1.0, bad])
    # Client 0 alone: its own values, and 0 where it sent nothing.
    expected = np.asarray(fk.masked_mean(np.stack(VALUES[:1])))
    np.testing.assert_array_equal(output.result, expected)
    np.testing.assert_array_equal(output.result, [1.0, 0.0, 2.0])
    assert output.measurements["invalid_weights"] == 1


def test_staged_valid_weights_count_no_invalid(processes):
    process = processes["masked_mean"]
    output = process.next(process.initialize(), VALUES, [1.0, 3.0])
    np.testing.assert_allclose(output.result, [(1 + 9) / 4, 4.0, 2.0], rtol=1e-7)
    assert output.measurements["invalid_weights"] == 0


@pytest.mark.parametrize("weight_dtype", [np.float64, np.int32, np.int64])
@pytest.mark.parametrize("name", ["masked_mean", "top_k"])
def test_staged_weight_dtypes_as_mean_factory(name, weight_dtype):
    """Every weight type `MeanFactory` takes (top_k_factory refused a float64 one: its weight
    went through the JAX step and came back float32), with the same result and a
    `bytes_sent` that counts the weight in its own dtype."""
    weight_type = tff.TensorType(weight_dtype)
    factory = ft.MaskedMeanFactory() if name == "masked_mean" else ft.top_k_factory(k=3)
    process = factory.create(VALUE_TYPE, weight_type)
    output = process.next(process.initialize(), VALUES, [weight_dtype(1), weight_dtype(3)])
    np.testing.assert_allclose(output.result, [(1 + 9) / 4, 4.0, 2.0], rtol=1e-7)
    if name == "top_k":
        assert output.measurements["bytes_sent"] == 3 * (4 + 4) + np.dtype(weight_dtype).itemsize


@pytest.mark.parametrize("bridge", [ft.MaskedMeanProcess(), ft.TopKProcess(k=3)],
                         ids=["masked_mean", "top_k"])
@pytest.mark.parametrize("bad", BAD_WEIGHTS)
def test_bridge_bad_weight_raises_naming_weights(bridge, bad):
    with pytest.raises(ValueError, match=r"weights must be finite and >= 0.*clients \[1\]"):
        bridge.next(bridge.initialize(), VALUES, [1.0, bad])


def test_client_residuals_refuse_repeated_ids():
    store = ft.ClientResiduals(3)
    with pytest.raises(ValueError, match=r"client_ids must be distinct.*\[1\]"):
        store.put([1, 1], [np.ones(3), 2 * np.ones(3)])
    assert len(store) == 0  # nothing stored from the refused call
    with pytest.raises(ValueError, match="client_ids must be distinct"):
        store.get([2, 2])


def test_client_residuals_do_not_alias():
    store = ft.ClientResiduals(3)
    mine = np.ones(3, np.float32)
    store.put([7], [mine])
    mine[0] = 5.0  # the caller's array is not the stored one
    got = store.get([7])[0]
    got[1] = 9.0  # nor is the returned one
    np.testing.assert_array_equal(store.get([7])[0], [1.0, 1.0, 1.0])
