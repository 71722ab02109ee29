"""The numpy bridge (fedkernels.tff.*Process) against NumPy float64 references.

The bridge needs only jax and numpy, so these run on both stacks; its equality with the staged
TFF factories is checked in test_tff.py (TFF stack only).
"""

from __future__ import annotations

import collections

import numpy as np
import pytest

import fedkernels.tff as ft

C, D = 5, 30


def _values(seed: int, density: float = 0.5) -> list:
    rng = np.random.default_rng(seed)
    return [
        collections.OrderedDict(
            w=(rng.standard_normal((3, D)) * (rng.random((3, D)) < density)).astype(np.float32),
            b=rng.standard_normal(4).astype(np.float32),
        )
        for _ in range(C)
    ]


def _flat(value) -> np.ndarray:
    return np.concatenate([np.ravel(value[k]) for k in value])  # OrderedDict: insertion order


def _masked_mean(x: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = x.astype(np.float64)
    m = (x != 0) & np.isfinite(x)
    wc = w.astype(np.float64).reshape(-1, *([1] * (x.ndim - 1)))
    num = np.where(m, x, 0) * wc
    den = m * wc
    mean = np.divide(num.sum(0), den.sum(0), out=np.zeros(x.shape[1:]), where=den.sum(0) > 0)
    return mean, (m & (wc > 0)).sum(0)


WEIGHTS = np.array([1.0, 0.0, 2.5, 1.0, 0.5], np.float32)


def test_masked_mean_process():
    values = _values(0)
    values[3]["w"][0, 0] = np.nan
    process = ft.MaskedMeanProcess(count_contributors=True)
    output = process.next(process.initialize(), values, WEIGHTS)
    counts = []
    for key in ("w", "b"):
        expected, count = _masked_mean(np.stack([v[key] for v in values]), WEIGHTS)
        np.testing.assert_allclose(output.result[key], expected, rtol=1e-6, atol=1e-7)
        assert output.result[key].dtype == np.float32
        counts.append(count.ravel())
    counts = np.concatenate(counts)
    stats = output.measurements["contributors"]
    assert (stats["min"], stats["max"], stats["uncovered"]) == (
        counts.min(), counts.max(), np.sum(counts == 0)
    )
    assert list(stats) == ["mean", "uncovered", "min", "max"]  # the staged factory's order
    np.testing.assert_allclose(stats["mean"], counts.mean(), rtol=1e-6)
    assert output.measurements["num_clients"] == C


def test_top_k_process():
    values = _values(1, density=0.9)
    # A zeroed client and one with two nonzeros: their top-k pads with zeros, which must
    # not count (the masked rule).
    values[3] = collections.OrderedDict((key, np.zeros_like(v)) for key, v in values[3].items())
    values[2]["w"][:] = 0
    values[2]["b"][:] = 0
    values[2]["w"][1, 2], values[2]["b"][3] = 5.0, -4.0
    k = 12
    process = ft.TopKProcess(k=k)
    output = process.next(process.initialize(), values, WEIGHTS)
    flats = np.stack([_flat(v) for v in values])
    sparse = np.zeros_like(flats)
    for c, row in enumerate(flats):
        keep = np.argsort(-np.abs(row), kind="stable")[:k]
        sparse[c, keep] = row[keep]
    expected, counts = _masked_mean(sparse, WEIGHTS)
    np.testing.assert_allclose(_flat(output.result), expected, rtol=1e-6, atol=1e-7)
    assert output.result["w"].shape == (3, D)
    stats = output.measurements["contributors"]
    assert stats["uncovered"] == np.sum(counts == 0)
    np.testing.assert_allclose(stats["mean"], counts.mean(), rtol=1e-6)
    assert output.measurements["bytes_sent"] == k * 8 + 4


def test_top_k_process_fraction_rounds_up():
    assert ft.TopKProcess(fraction=0.01).resolve_k(150) == 2
    with pytest.raises(ValueError, match="exactly one of fraction and k"):
        ft.TopKProcess()
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\], got 1.5"):
        ft.TopKProcess(fraction=1.5)
    with pytest.raises(ValueError, match=r"k must be in \[1, 150\], got 151"):
        ft.TopKProcess(k=151).resolve_k(150)


def test_quantize_sum_process_error_bound_and_reproducible():
    values = _values(2, density=1.0)
    process = ft.QuantizeSumProcess(quantization_bits=4, threshold=20, seed=3)
    state = process.initialize()
    first = process.next(state, values)
    again = process.next(state, values)
    np.testing.assert_array_equal(first.result["w"], again.result["w"])
    exact = np.sum([v["w"] for v in values], axis=0, dtype=np.float64)
    step = sum((v["w"].max() - v["w"].min()) / 15 for v in values)
    error = np.abs(first.result["w"] - exact)
    assert 0 < error.max() <= step * 1.0001
    # b has 4 <= threshold elements: exact
    np.testing.assert_allclose(
        first.result["b"], np.sum([v["b"] for v in values], axis=0), rtol=1e-6
    )
    assert first.state["round"] == 1
    later = process.next(first.state, values)
    assert not np.array_equal(later.result["w"], first.result["w"])


def test_quantize_sum_is_unbiased_over_rounds():
    values = _values(3, density=1.0)
    process = ft.QuantizeSumProcess(quantization_bits=2, threshold=0, seed=0)
    state = process.initialize()
    exact = np.sum([v["w"] for v in values], axis=0, dtype=np.float64)
    total = np.zeros_like(exact)
    rounds = 200
    for _ in range(rounds):
        output = process.next(state, values)
        state = output.state
        total += output.result["w"]
    step = sum((v["w"].max() - v["w"].min()) / 3 for v in values)
    # the mean of 200 unbiased draws: error ~ step / sqrt(200); 5 sigma bound
    assert np.max(np.abs(total / rounds - exact)) < 5 * step / np.sqrt(rounds)


def test_concat_process():
    values = _values(4)
    process = ft.ConcatProcess(ft.MaskedMeanProcess())
    output = process.next(process.initialize(), values, WEIGHTS)
    expected, _ = _masked_mean(np.stack([_flat(v) for v in values]), WEIGHTS)
    np.testing.assert_allclose(_flat(output.result), expected, rtol=1e-6, atol=1e-7)


def test_rejects_bad_client_values():
    process = ft.MaskedMeanProcess()
    with pytest.raises(ValueError, match="one value"):
        process.next(process.initialize(), [], [])
    with pytest.raises(ValueError, match="one entry per client"):
        process.next(process.initialize(), _values(5), [1.0, 2.0])


def test_float64_leaves_stay_float64_without_x64():
    """A float64 leaf is aggregated and returned in float64 (JAX's x64 flag off, as TFF users
    leave it): values near 1e-300 survive, which float32 would flush to 0."""
    values = [
        collections.OrderedDict(w=np.array([1e-300, 0.0, 2.0]), b=np.float32([1.0, 0.0])),
        collections.OrderedDict(w=np.array([3e-300, 5.0, 2.0 + 2**-40]), b=np.float32([0.0, 4.0])),
    ]
    weights = np.array([1.0, 1.0], np.float32)
    want_w = np.array([2e-300, 5.0, 2.0 + 2**-41])
    for process in (ft.MaskedMeanProcess(), ft.TopKProcess(k=5)):
        result = process.next(process.initialize(), values, weights).result
        assert result["w"].dtype == np.float64 and result["b"].dtype == np.float32
        np.testing.assert_allclose(result["w"], want_w, rtol=1e-15, atol=0)
        np.testing.assert_array_equal(result["b"], [1.0, 4.0])
    # concat_factory's rule, as TFF's: one dtype for all leaves (a float64 one stays float64).
    concat = ft.ConcatProcess(ft.MaskedMeanProcess())
    with pytest.raises(TypeError, match="same dtype, got \\['float32', 'float64'\\]"):
        concat.next(concat.initialize(), values, weights)
    wide = [collections.OrderedDict(w=v["w"], b=v["b"].astype(np.float64)) for v in values]
    result = concat.next(concat.initialize(), wide, weights).result
    assert list(result) == ["w", "b"] and result["w"].dtype == np.float64
    np.testing.assert_allclose(result["w"], want_w, rtol=1e-15, atol=0)
    quantize = ft.QuantizeSumProcess(threshold=5)  # both leaves below: summed exactly
    total = quantize.next(quantize.initialize(), values).result
    assert total["w"].dtype == np.float64
    np.testing.assert_allclose(total["w"], [4e-300, 5.0, 4.0 + 2**-40], rtol=1e-15, atol=0)
