"""The compression pipeline against NumPy float64 references, then invariants and errors."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedkernels as fk
from fedkernels import _radix
from fedkernels._pipeline.encode import row_norms
from tests import _reference as ref
from tests import _variants as variants

# Template: a 40x30 weight (1200 > threshold: sparse segment) and a 30-bias (dense segment).
TEMPLATE = {"b": jnp.zeros((30,)), "w": jnp.zeros((40, 30))}
THRESHOLD = 100
D_SPARSE, D_DENSE = 1200, 30
KEY = jax.random.PRNGKey(0)
# One setting shared by several tests (same cohort size 5), so they reuse one compilation.
EF8 = {"top_k_count": 25, "error_feedback": True, "bits": 8, "dense_threshold": THRESHOLD}


def _selection(name: str) -> dict:
    """The compressor options of one of the pipeline's row selections."""
    radix = _radix.for_backend("cpu")
    if name.startswith("radix"):  # radix select whatever the row length
        radix = dataclasses.replace(radix, min_length=1)
    if name == "radix-vmap":  # the batched rows used on GPU/TPU, run here on CPU
        radix = dataclasses.replace(radix, rows="vmap")
    return {"radix": radix}


@pytest.fixture(params=["lax", "radix"])
def selection(request):
    """Options running a test with each of the pipeline's row selections: `lax.top_k` (rows
    below `RadixConfig.min_length`, as here) and radix select with its bit-packed mask."""
    return _selection(request.param)


@pytest.fixture(params=["lax", "radix", variants.variant("vmap", "radix-vmap", id="radix-vmap")])
def any_selection(request):
    """As `selection`, plus radix select with the rows batched by vmap (the GPU/TPU path)."""
    return _selection(request.param)


def make_updates(c: int, seed: int = 0) -> dict[str, jnp.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "b": jnp.asarray(rng.normal(size=(c, 30)), jnp.float32),
        "w": jnp.asarray(rng.normal(size=(c, 40, 30)), jnp.float32),
    }


def split_np(updates) -> tuple[np.ndarray, np.ndarray]:
    """(sparse [C, 1200], dense [C, 30]) in float64, in the pipeline's leaf order (b, w)."""
    c = updates["w"].shape[0]
    return (
        np.asarray(updates["w"], np.float64).reshape(c, -1),
        np.asarray(updates["b"], np.float64),
    )


def reference_round(updates, k, residuals=None, weights=None, aggregation="mean"):
    """NumPy float64 top-k (+ error feedback) round without quantization."""
    sparse, dense = split_np(updates)
    c = sparse.shape[0]
    acc = sparse if residuals is None else sparse + np.asarray(residuals, np.float64)
    w = np.ones(c) if weights is None else np.asarray(weights, np.float64)
    values, indices = ref.top_k(acc.astype(np.float32), k)
    total, count = ref.scatter_sum(values, indices, D_SPARSE, w)
    if aggregation == "mean":
        sparse_mean = total / w.sum()
    else:
        sparse_mean = np.divide(total, count, out=np.zeros_like(total), where=count > 0)
    new_res = acc.copy()
    np.put_along_axis(new_res, indices, 0.0, axis=1)
    dense_mean = (w[:, None] * dense).sum(0) / w.sum()
    return sparse_mean, dense_mean, new_res


def mean_np(mean) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(mean["w"], np.float64).reshape(-1), np.asarray(mean["b"], np.float64)


# ------------------------------------------------------------------------------------------
# Layout and payload sizes
# ------------------------------------------------------------------------------------------


def test_layout_sizes_and_payload_bytes_are_the_real_arrays():
    # The settings of test_error_feedback_conservation[topk-8bit] (one compilation for both).
    comp = fk.compressor(TEMPLATE, top_k_fraction=0.05, bits=8, error_feedback=True,
                         dense_threshold=THRESHOLD)
    lay = comp.layout
    assert (lay.size, lay.sparse_size, lay.dense_size, lay.k) == (1230, 1200, 30, 60)
    assert lay.index_bits == 11  # ceil(log2(1200))
    payload, _, _ = comp.encode(make_updates(3), jnp.zeros((3, D_SPARSE)), jnp.arange(3), KEY)
    per_client = sum(np.asarray(a).nbytes for a in payload) // 3
    assert lay.payload_bytes == per_client
    # 60 indices x 11 bits and 60 codes x 8 bits, packed by groups of 32 codes (2 groups);
    # min and max; the 30 dense floats.
    assert per_client == 2 * 11 * 4 + 2 * 8 * 4 + 8 + 30 * 4
    assert lay.compression_ratio == pytest.approx(1230 * 4 / per_client)


def test_dense_threshold_sends_small_leaves_dense():
    # Every coordinate kept (top_k_fraction=1.0): the 30-bias is sent dense, the weight through
    # the sparse segment; both exactly.
    comp = fk.compressor(TEMPLATE, top_k_fraction=1.0, dense_threshold=THRESHOLD)
    assert comp.layout.sparse_size == 1200 and comp.layout.dense_size == 30
    result = comp.round(make_updates(4), KEY)
    for leaf in ("w", "b"):
        expected = np.asarray(make_updates(4)[leaf], np.float64).mean(0)
        np.testing.assert_allclose(result.mean[leaf], expected, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------
# Decoding equals the dense reference (no quantization)
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("aggregation", ["mean", "masked_mean"])
def test_topk_round_equals_numpy_reference(aggregation, selection):
    c, k = 6, 50
    updates = make_updates(c)
    weights = np.arange(1.0, c + 1)
    comp = fk.compressor(TEMPLATE, **selection, top_k_count=k, dense_threshold=THRESHOLD,
                         aggregation=aggregation)
    result = comp.round(updates, KEY, weights=weights)
    sparse_mean, dense_mean, _ = reference_round(updates, k, weights=weights,
                                                 aggregation=aggregation)
    got_sparse, got_dense = mean_np(result.mean)
    np.testing.assert_allclose(got_sparse, sparse_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_dense, dense_mean, rtol=1e-5, atol=1e-6)
    m = result.metrics.as_dict()
    assert m["uploaded_bytes"] == c * comp.layout.payload_bytes
    assert m["num_excluded"] == 0


def test_uncompressed_round_is_the_weighted_mean():
    updates = make_updates(5)
    weights = np.array([1.0, 0.0, 2.0, 3.0, 0.5])
    result = fk.compressor(TEMPLATE).round(updates, KEY, weights=weights)
    for leaf in ("w", "b"):
        x = np.asarray(updates[leaf], np.float64)
        expected = np.tensordot(weights, x, axes=1) / weights.sum()
        np.testing.assert_allclose(result.mean[leaf], expected, rtol=1e-5, atol=1e-6)
    assert result.metrics.payload_bytes_per_client == 1230 * 4
    assert result.metrics.compression_ratio == 1.0


def test_error_feedback_residual_equals_reference_over_rounds(selection):
    c, k = 4, 30
    comp = fk.compressor(TEMPLATE, **selection, top_k_count=k, error_feedback=True,
                         dense_threshold=THRESHOLD)
    residuals = jnp.zeros((c, D_SPARSE))
    ref_res = np.zeros((c, D_SPARSE))
    for r in range(3):
        updates = make_updates(c, seed=r)
        result = comp.round(updates, KEY, residuals=residuals)
        sparse_mean, _, ref_res = reference_round(updates, k, residuals=ref_res)
        np.testing.assert_allclose(mean_np(result.mean)[0], sparse_mean, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(result.residuals, ref_res, rtol=1e-5, atol=1e-5)
        residuals = result.residuals
        ref_res = np.asarray(residuals, np.float64)  # follow the float32 trajectory


# ------------------------------------------------------------------------------------------
# Error-feedback conservation, quantization, shared range, random-k
# ------------------------------------------------------------------------------------------


CONSERVATION_OPTIONS = {
    "topk-8bit": {"top_k_fraction": 0.05, "bits": 8},
    "4bit": {"bits": 4},
    "randomk-8bit": {"top_k_count": 40, "random_k": True, "bits": 8},
    "shared-range": {"top_k_fraction": 0.05, "bits": 4, "shared_range": (-1.0, 1.0)},
}


@pytest.mark.parametrize(
    "options, any_selection",
    [
        pytest.param(options, selection, id=f"{name}-{selection}",
                     marks=variants.marks("vmap" if selection == "radix-vmap" else selection))
        for name, options in CONSERVATION_OPTIONS.items()
        # Without top_k nothing is selected: the three selections would compile one program.
        for selection in (
            ["lax", "radix", "radix-vmap"] if {"top_k_fraction", "top_k_count"} & options.keys()
            else ["lax"]
        )
    ],
    indirect=["any_selection"],
)
def test_error_feedback_conservation(options, any_selection):
    """decoded(sent_c) + new_residual_c == update_c + residual_c for every client."""
    c = 3
    comp = fk.compressor(TEMPLATE, **any_selection, error_feedback=True,
                         dense_threshold=THRESHOLD, **options)
    updates = make_updates(c, seed=1)
    residuals = jnp.asarray(np.random.default_rng(2).normal(size=(c, D_SPARSE)), jnp.float32)
    ids = jnp.array([7, 3, 11])
    payload, new_res, report = comp.encode(updates, residuals, ids, KEY)
    assert bool(jnp.all(report.included))
    acc = split_np(updates)[0] + np.asarray(residuals, np.float64)
    for client in range(c):
        if comp.config.shared_range is None:
            one_hot = jnp.zeros((c,)).at[client].set(1.0)
            sent = comp.decode(payload, report.included, weights=one_hot)
        else:  # unweighted: decode a cohort in which only this client is included
            sent = comp.decode(payload, jnp.arange(c) == client)
        got = np.asarray(sent["w"], np.float64).reshape(-1) + np.asarray(new_res[client])
        tol = 1e-6 if "bits" not in options else 1e-5
        np.testing.assert_allclose(got, acc[client], rtol=tol, atol=tol)


def test_quantized_round_is_close_and_unbiased():
    c, bits, k = 5, 8, EF8["top_k_count"]
    updates = make_updates(c)
    comp = fk.compressor(TEMPLATE, **EF8)  # zero residuals: a plain top-k + 8-bit round
    zeros = jnp.zeros((c, D_SPARSE))
    exact = reference_round(updates, k)[0]
    draws = [
        mean_np(comp.round(updates, jax.random.PRNGKey(s), residuals=zeros).mean)[0]
        for s in range(200)
    ]
    kept = ref.top_k(np.asarray(split_np(updates)[0], np.float32), k)[0]
    step = float(np.ptp(kept, axis=1).max()) / (2**bits - 1)
    assert np.max(np.abs(draws[0] - exact)) <= step + 1e-6  # at most one step per client / C
    assert np.max(np.abs(draws[0] - exact)) > 0  # the test can fail: values were quantized
    # Unbiased: the mean of 200 draws is within 5 standard errors of the exact mean.
    assert np.max(np.abs(np.mean(draws, 0) - exact)) < 5 * step / np.sqrt(200) + 1e-6


@pytest.mark.parametrize("error_feedback", [False, True])
def test_dense_quantized_round_equals_per_client_quantize(error_feedback):
    """Quantization without selection (TFF's `quantize_above_threshold`): the mean is the
    weighted mean of each client's own `fk.quantize` decode (same key rule), clients with
    NaN/Inf or a range whose decode overflows are excluded and keep their residual."""
    c = 6
    updates = make_updates(c, seed=5)
    updates["w"] = updates["w"].at[1, 2, 3].set(jnp.nan)  # sparse segment
    updates["b"] = updates["b"].at[2, 7].set(-jnp.inf)  # dense segment
    updates["w"] = updates["w"].at[4, 0, :2].set(jnp.array([-3e38, 3e38]))  # decode overflows
    ids = jnp.array([10, 11, 3, 0, 7, 5])
    weights = np.array([1.0, 2.0, 1.0, 0.5, 1.0, 3.0], np.float32)
    residuals = None
    if error_feedback:
        residuals = jnp.asarray(np.random.default_rng(6).normal(size=(c, D_SPARSE)), jnp.float32)
    comp = fk.compressor(TEMPLATE, bits=8, error_feedback=error_feedback,
                         dense_threshold=THRESHOLD)
    result = comp.round(updates, KEY, client_ids=ids, residuals=residuals, weights=weights)
    excluded = np.array([False, True, True, False, True, False])
    np.testing.assert_array_equal(result.metrics.excluded, excluded)
    assert int(result.metrics.uploaded_bytes) == 3 * comp.layout.payload_bytes
    sparse, dense = split_np(updates)
    acc = sparse if residuals is None else sparse + np.asarray(residuals, np.float64)
    total, w_sum = np.zeros(D_SPARSE), 0.0
    for client in np.flatnonzero(~excluded):
        key = jax.random.fold_in(jax.random.fold_in(KEY, ids[client]), 1)
        q = fk.quantize(jnp.asarray(acc[client], jnp.float32), key, bits=8)
        decoded = np.asarray(fk.dequantize(q), np.float64)
        total += weights[client] * decoded
        w_sum += weights[client]
        if error_feedback:  # the new residual is what the server did not get
            np.testing.assert_allclose(result.residuals[client], acc[client] - decoded,
                                       rtol=1e-5, atol=1e-5)
    got_sparse, got_dense = mean_np(result.mean)
    np.testing.assert_allclose(got_sparse, total / w_sum, rtol=1e-5, atol=1e-5)
    keep = ~excluded
    np.testing.assert_allclose(got_dense, weights[keep] @ dense[keep] / w_sum, rtol=1e-5,
                               atol=1e-6)
    if error_feedback:
        for client in np.flatnonzero(excluded):
            np.testing.assert_array_equal(result.residuals[client], residuals[client])
    else:
        assert result.residuals is None


@pytest.mark.parametrize("top_k", [0.05, None], ids=["topk", "every-coordinate"])
def test_shared_range_commutes_with_the_sum(top_k):
    """The server's one decode of the summed integer codes equals the mean of the clients'
    individual decodes, and every value lies on the shared [lo, hi] grid."""
    c = 3
    # With top-k: the settings of test_error_feedback_conservation[shared-range].
    comp = fk.compressor(TEMPLATE, error_feedback=True, dense_threshold=THRESHOLD,
                         top_k_fraction=top_k, bits=4, shared_range=(-1.0, 1.0))
    updates = make_updates(c, seed=3)
    payload, _, report = comp.encode(updates, jnp.zeros((c, D_SPARSE)), jnp.array([9, 4, 8]),
                                     KEY)
    together = mean_np(comp.decode(payload, report.included))[0]
    singles = np.stack([mean_np(comp.decode(payload, jnp.arange(c) == i))[0] for i in range(c)])
    np.testing.assert_allclose(together, singles.mean(0), rtol=1e-5, atol=1e-6)
    grid = (singles + 1.0) / 2.0 * 15  # codes: integers in [0, 15] where sent
    assert np.all(np.abs(singles) <= 1.0 + 1e-6)
    np.testing.assert_allclose(grid[singles != 0], np.round(grid[singles != 0]), atol=1e-4)
    assert np.count_nonzero(singles) > c * 30  # the test can fail: values were sent
    if top_k is None:  # every coordinate sent: clipped to [-1, 1] within one step (2 / 15)
        clipped = np.clip(split_np(updates)[0], -1.0, 1.0)
        assert np.max(np.abs(singles - clipped)) <= 2 / 15 + 1e-6


def test_invalid_weights_under_jit_count_as_zero():
    """Under jit the round's weights are not checked: a negative, NaN or Inf weight counts as
    0 (never a NaN mean), as if the client had weight 0."""
    comp = fk.compressor({"w": jnp.zeros(200)}, top_k_fraction=0.1, bits=8)
    updates = {"w": jax.random.normal(jax.random.PRNGKey(1), (3, 200))}
    run = jax.jit(lambda w: comp.round(updates, KEY, weights=w).mean["w"])
    want = run(jnp.array([1.0, 0.0, 2.0]))
    assert bool(jnp.all(jnp.isfinite(want))) and bool(jnp.any(want != 0))
    for bad in (jnp.nan, jnp.inf, -1.0):
        np.testing.assert_array_equal(run(jnp.array([1.0, bad, 2.0])), want)


def test_random_k_masked_mean_averages_the_senders():
    """Random-k without error feedback scales by d_s/k only for the plain mean: the masked
    mean divides by the weight of the clients that sent each coordinate, so identical clients
    give back their update wherever any sent it (it was d_s/k times too large)."""
    x = jnp.arange(1, 101, dtype=jnp.float32)
    comp = fk.compressor({"w": jnp.zeros(100)}, top_k_fraction=0.1, random_k=True,
                         aggregation="masked_mean", dense_threshold=0)
    mean = np.asarray(comp.round({"w": jnp.tile(x, (8, 1))}, KEY).mean["w"])
    sent = mean != 0
    assert 10 <= sent.sum() <= 80  # 8 clients x 10 random coordinates
    np.testing.assert_allclose(mean[sent], np.asarray(x)[sent], rtol=1e-6)


@pytest.mark.parametrize("shared_range", [None, (-1.0, 1.0), (-10.0, 10.0)])
def test_random_k_shared_range_applies_to_the_update(shared_range):
    """Random-k's d_s/k scaling (plain mean, no error feedback) happens on the server, after
    quantization: a shared range that holds every update entry must not clip them (the
    client-side scaling made values of 0.5 into 5, clipped to 1: a mean of 0.1)."""
    c, d, k = 200, 100, 10
    opts = dict(top_k_count=k, random_k=True, bits=8, dense_threshold=0)
    if shared_range is not None:
        opts["shared_range"] = shared_range
    comp = fk.compressor({"w": jnp.zeros(d)}, **opts)
    mean = np.asarray(comp.round({"w": jnp.full((c, d), 0.5)}, KEY).mean["w"], np.float64)
    # Every client sends exactly k coordinates: the coordinates' mean is 0.5 up to the
    # (unbiased) rounding of c * k codes, each within one step.
    step = 2 / 255 if shared_range is None else (shared_range[1] - shared_range[0]) / 255
    assert abs(mean.mean() - 0.5) < 5 * step / (2 * np.sqrt(c * k)) + 1e-6  # 5 sigma
    assert 0 < np.count_nonzero(mean) <= d


def test_random_k_coordinates_follow_the_hash_stream():
    """A client's random-k coordinates are the k largest of `lowbias32` words of its key
    (the quantizer's counter hash), computed here in NumPy from the key data alone: the same
    on every jax version (`jax.random.uniform` picked other ones on jax 0.4 and newer)."""
    d, k = 300, 7
    comp = fk.compressor({"w": jnp.zeros(d)}, top_k_count=k, random_k=True, dense_threshold=0)
    x = jnp.arange(1, d + 1, dtype=jnp.float32)[None]
    root = np.asarray(jax.random.key_data(KEY), np.uint32)
    for client_id in (0, 5, 123456):
        mean = comp.round({"w": x}, KEY, client_ids=jnp.array([client_id])).mean["w"]
        s0, s1 = ref.fold_in(ref.fold_in(ref.fold_in(root, client_id), 0), 0x48415348)
        with np.errstate(over="ignore"):
            words = ref.lowbias32((np.arange(d, dtype=np.uint32) ^ s0) + s1)
        scores = words >> np.uint32(8)
        expected = np.sort(np.lexsort((np.arange(d), -scores.astype(np.int64)))[:k])
        np.testing.assert_array_equal(np.flatnonzero(np.asarray(mean)), expected)


def test_random_k_is_unbiased():
    template = {"w": jnp.zeros((200,))}
    x = jax.random.normal(KEY, (2, 200))
    comp = fk.compressor(template, top_k_count=20, random_k=True, dense_threshold=0)
    draws = np.stack([
        np.asarray(comp.round({"w": x}, jax.random.PRNGKey(s)).mean["w"], np.float64)
        for s in range(200)
    ])
    exact = np.asarray(x, np.float64).mean(0)
    # Each coordinate: sent with probability 0.1, scaled by 10: std 3 |x| per client and draw.
    stderr = 3.0 * np.abs(np.asarray(x)).max() / np.sqrt(200)
    assert np.max(np.abs(draws.mean(0) - exact)) < 5 * stderr
    assert np.all(np.abs(draws.mean(0) - exact) < 0.9 * np.abs(exact) + 5 * stderr)


# ------------------------------------------------------------------------------------------
# Non-finite clients, empty cohorts
# ------------------------------------------------------------------------------------------


def test_nonfinite_client_is_excluded_counted_and_keeps_its_residual(any_selection):
    c = 5
    updates = make_updates(c)
    updates["w"] = updates["w"].at[1, 3, 4].set(jnp.nan)
    updates["b"] = updates["b"].at[3, 0].set(jnp.inf)
    residuals = jnp.asarray(np.random.default_rng(4).normal(size=(c, D_SPARSE)), jnp.float32)
    comp = fk.compressor(TEMPLATE, **any_selection, **EF8)
    result = comp.round(updates, KEY, residuals=residuals)
    m = result.metrics
    assert int(m.num_excluded) == 2
    np.testing.assert_array_equal(m.excluded, [False, True, False, True, False])
    assert int(m.uploaded_bytes) == 3 * comp.layout.payload_bytes
    np.testing.assert_array_equal(m.bytes_per_client, np.array([1, 0, 1, 0, 1]) *
                                  comp.layout.payload_bytes)
    # Chunked (the last chunk padded), the old rows are put back after the chunks.
    chunked = comp.round(updates, KEY, residuals=residuals, chunk_size=2)
    for res in (result.residuals, chunked.residuals):
        assert bool(jnp.all(jnp.isfinite(res)))
        np.testing.assert_array_equal(res[1], residuals[1])
        np.testing.assert_array_equal(res[3], residuals[3])
    np.testing.assert_array_equal(chunked.residuals, result.residuals)
    np.testing.assert_array_equal(chunked.metrics.excluded, m.excluded)
    # The mean is that of the three finite clients: the same round with the two bad clients
    # replaced by zero-weight zeros (same ids, so the same quantization draws).
    weights = jnp.array([1.0, 0.0, 1.0, 0.0, 1.0])
    zeroed = jax.tree_util.tree_map(lambda a: a * weights.reshape((-1,) + (1,) * (a.ndim - 1)),
                                    jax.tree_util.tree_map(jnp.nan_to_num, updates))
    alone = comp.round(zeroed, KEY, residuals=residuals, weights=weights)
    for leaf in ("w", "b"):
        np.testing.assert_allclose(result.mean[leaf], alone.mean[leaf], rtol=1e-5, atol=1e-6)
        assert bool(jnp.all(jnp.isfinite(result.mean[leaf])))

    raising = fk.compressor(TEMPLATE, **any_selection, **EF8, on_nonfinite="raise")
    with pytest.raises(ValueError, match=r"cohort positions \[1, 3\]"):
        raising.round(updates, KEY, residuals=residuals)


def test_zero_weight_client_counts_nowhere_and_keeps_its_residual():
    """A client of weight 0 (or, under jit, an invalid weight) adds nothing to the mean, so
    what it encoded did not reach the server: it keeps its old residual (error feedback would
    otherwise drop its selected coordinates for good) and is no contributor. The round equals
    the one over the positive-weight clients alone (same ids, so the same draws)."""
    c = 4
    updates = make_updates(c)
    residuals = jnp.asarray(np.random.default_rng(5).normal(size=(c, D_SPARSE)), jnp.float32)
    ids = jnp.array([7, 3, 5, 9])
    # The restore and the contributor count are the same code for every selection method.
    comp = fk.compressor(TEMPLATE, **EF8)
    weights = jnp.array([1.0, 0.0, 2.0, 0.0])
    kept = np.array([0, 2])
    alone = comp.round(jax.tree_util.tree_map(lambda a: a[kept], updates), KEY,
                       client_ids=ids[kept], residuals=residuals[kept], weights=weights[kept])
    under_jit = jax.jit(lambda w: comp.round(updates, KEY, client_ids=ids, residuals=residuals,
                                             weights=w))
    runs = [comp.round(updates, KEY, client_ids=ids, residuals=residuals, weights=weights),
            comp.round(updates, KEY, client_ids=ids, residuals=residuals, weights=weights,
                       chunk_size=3),
            under_jit(jnp.array([1.0, jnp.nan, 2.0, -1.0]))]
    for result in runs:
        np.testing.assert_array_equal(result.residuals[1], residuals[1])
        np.testing.assert_array_equal(result.residuals[3], residuals[3])
        np.testing.assert_array_equal(result.residuals[kept], alone.residuals)
        np.testing.assert_allclose(result.metrics.residual_norm[1],
                                   np.linalg.norm(np.asarray(residuals[1], np.float64)),
                                   rtol=1e-5)
        for leaf in ("w", "b"):
            np.testing.assert_allclose(result.mean[leaf], alone.mean[leaf], rtol=1e-6,
                                       atol=1e-7)
        assert int(result.metrics.contributors_touched) == int(
            alone.metrics.contributors_touched)
        assert int(result.metrics.contributors_max) <= 2
    assert int(alone.metrics.contributors_touched) > 0  # the test can fail: coordinates sent


@pytest.mark.parametrize(
    "residual_dtype, selection", [(jnp.float32, "lax"), (jnp.bfloat16, "radix")],
    indirect=["selection"],
)
def test_top_k_round_flat_and_2d_indexing_agree(residual_dtype, selection):
    """The top-k round gathers and scatters through flat int32 positions while `C * d_s` fits
    (`flat_index_limit`), through 2-D indices beyond: both give the same round, including an
    excluded client's restored residual, with and without quantization. Each residual dtype
    and each selection is run (paired, not crossed: the indexing comes after the selection
    and the residual's cast, which do not depend on each other; each pair is 4 compilations)."""
    c = 5
    updates = make_updates(c, seed=7)
    updates["w"] = updates["w"].at[2, 0, 0].set(jnp.nan)
    residuals = jnp.asarray(
        np.random.default_rng(8).normal(size=(c, D_SPARSE)), jnp.float32
    ).astype(residual_dtype)
    results = []
    for limit in (2**31 - 1, 0):
        for bits in (8, None):
            comp = fk.compressor(TEMPLATE, **selection, **{**EF8, "bits": bits},
                                 flat_index_limit=limit)
            results.append(comp.round(updates, KEY, residuals=residuals))
    for flat, two_d in zip(results[:2], results[2:], strict=True):
        np.testing.assert_array_equal(flat.residuals, two_d.residuals)
        np.testing.assert_array_equal(flat.residuals[2], residuals[2].astype(jnp.float32))
        for leaf in ("w", "b"):
            np.testing.assert_array_equal(flat.mean[leaf], two_d.mean[leaf])
        assert np.asarray(flat.metrics.excluded).tolist() == [False, False, True, False, False]


@pytest.mark.parametrize("d", [100, 16_384, 16_384 * 3 + 77])
def test_row_norms_match_float64(d):
    """The residual norm's blocked loop (rows of 16384 or more), its tail, and short rows."""
    rng = np.random.default_rng(d)
    x = (rng.normal(size=(3, d)) * np.array([[1.0], [1e-3], [50.0]])).astype(np.float32)
    x[1, -1] = 7.0  # in the tail
    got = jax.jit(row_norms)(jnp.asarray(x))
    want = np.sqrt(np.sum(np.asarray(x, np.float64) ** 2, axis=1))
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-5)


@pytest.mark.parametrize("d", [100, 16_384 * 2])
def test_row_norms_of_finite_rows_whose_squares_overflow(d):
    """Entries from about 1.8e19 on overflow float32 squares: the norm is still the finite
    float64 one wherever it fits float32, a row with Inf stays Inf, and an ordinary row in
    the same batch keeps its norm."""
    rng = np.random.default_rng(d)
    x = rng.normal(size=(5, d)).astype(np.float32)
    x[0, :10] = 1e20
    x[1, 1] = -2e38  # norm 2e38: fits float32, its square does not
    x[2, 3] = np.inf
    x[3, 0] = 3e38
    x[3, 1] = 3e38  # norm 4.2e38: beyond float32
    got = np.asarray(jax.jit(row_norms)(jnp.asarray(x)), np.float64)
    want = np.sqrt(np.sum(np.asarray(x, np.float64) ** 2, axis=1))
    np.testing.assert_allclose(got[[0, 1, 4]], want[[0, 1, 4]], rtol=1e-5)
    assert np.isinf(got[2]) and np.isinf(got[3])


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_row_norms_of_half_precision_rows(dtype):
    """The rescaled branch is computed in float32 and returned in the rows' norm dtype (the
    two branches of its lax.cond must agree)."""
    x = jnp.ones((2, 8), dtype)
    np.testing.assert_allclose(np.asarray(row_norms(x), np.float32), [np.sqrt(8)] * 2,
                               rtol=1e-2)


def test_residual_norm_of_a_huge_finite_residual_is_finite():
    """A client whose residual keeps entries of 1e20 (finite, unsent) reports their norm, not
    Inf, and so do the round's summaries; also when the client is excluded and its old
    residual (with the same entries) is restored."""
    c = 3
    updates = make_updates(c)
    residuals = np.random.default_rng(9).normal(size=(c, D_SPARSE)).astype(np.float32) * 1e-2
    residuals[1, :3] = 1e20  # three entries above the rest; k is larger, all three are sent
    residuals[1, 3:40] = 1e19  # more of them than k: some stay in the residual
    comp = fk.compressor(TEMPLATE, **{**EF8, "bits": None})
    result = comp.round(updates, KEY, residuals=jnp.asarray(residuals))
    want = np.linalg.norm(np.asarray(result.residuals, np.float64), axis=1)
    assert want[1] > 1e19  # the test can fail: huge entries stayed in the residual
    np.testing.assert_allclose(result.metrics.residual_norm, want, rtol=1e-5)
    assert result.metrics.as_dict()["residual_norm_max"] == pytest.approx(want.max(), rel=1e-5)
    updates["w"] = updates["w"].at[1, 0, 0].set(jnp.nan)  # excluded: the old residual is kept
    result = comp.round(updates, KEY, residuals=jnp.asarray(residuals))
    np.testing.assert_allclose(result.metrics.residual_norm[1],
                               np.linalg.norm(residuals[1].astype(np.float64)), rtol=1e-5)


def test_residual_norm_metrics_are_those_of_the_new_residuals():
    c = 5
    updates = make_updates(c)
    updates["w"] = updates["w"].at[1, 3, 4].set(jnp.nan)  # excluded: not in the summary
    residuals = jnp.asarray(np.random.default_rng(5).normal(size=(c, D_SPARSE)), jnp.float32)
    comp = fk.compressor(TEMPLATE, **EF8)
    for chunk_size in (None, 2):
        result = comp.round(updates, KEY, residuals=residuals, chunk_size=chunk_size)
        norms = np.linalg.norm(np.asarray(result.residuals, np.float64), axis=1)
        np.testing.assert_allclose(result.metrics.residual_norm, norms, rtol=1e-5)
        kept = norms[[0, 2, 3, 4]]
        d = result.metrics.as_dict()
        assert d["residual_norm_mean"] == pytest.approx(kept.mean(), rel=1e-5)
        assert d["residual_norm_max"] == pytest.approx(kept.max(), rel=1e-5)
    d = comp.round(jax.tree_util.tree_map(lambda a: a * jnp.nan, updates), KEY,
                   residuals=residuals).metrics.as_dict()
    assert d["residual_norm_mean"] == 0.0 and d["residual_norm_max"] == 0.0  # none included


def test_integer_leaf_mean_is_float32_and_float_leaves_keep_their_dtype():
    """The mean of an integer leaf is float32 (it was rounded back into the template's int
    dtype: clients sending 0 and 1 gave 0); a float16 leaf's mean stays float16."""
    template = {"w": jnp.zeros(64), "n": jnp.zeros(8, jnp.int32), "h": jnp.zeros(8, jnp.float16)}
    comp = fk.compressor(template, top_k_fraction=1.0, dense_threshold=0)
    updates = {"w": jnp.ones((2, 64)), "n": jnp.array([[0] * 8, [1] * 8], jnp.int32),
               "h": jnp.full((2, 8), 3.0, jnp.float16)}
    mean = comp.round(updates, KEY).mean
    assert mean["n"].dtype == jnp.float32 and mean["h"].dtype == jnp.float16
    np.testing.assert_array_equal(mean["n"], np.full(8, 0.5))
    np.testing.assert_array_equal(mean["h"], np.full(8, 3.0))


def test_uploaded_bytes_are_exact_past_int32():
    """uploaded_bytes = payload bytes x included clients as a Python int: past 2**31 bytes
    (100 clients of a 25M-parameter model at 8 bits) the int32 sum it was wrapped negative;
    under a caller's jit it is a float32 (approximate, never wrapped)."""
    comp = fk.compressor({"w": jnp.zeros(1000)}, bits=8, dense_threshold=0)
    metrics = comp.round({"w": jnp.ones((3, 1000))}, KEY).metrics
    assert metrics.uploaded_bytes == 3 * comp.layout.payload_bytes
    big = metrics._replace(payload_bytes_per_client=25_000_008, num_included=jnp.int32(100))
    assert big.uploaded_bytes == big.as_dict()["uploaded_bytes"] == 2_500_000_800
    traced = jax.jit(lambda u: comp.round(u, KEY).metrics.uploaded_bytes)
    assert float(traced({"w": jnp.ones((3, 1000))})) == 3 * comp.layout.payload_bytes


def test_top_k_overflowing_residual_excludes_the_client():
    """With values near +-3e38, a 1-bit code decodes far away and `value - decoded` can
    overflow: the client is excluded and keeps its old residual (it was counted as included
    with an Inf residual, then excluded in every later round)."""
    x = np.zeros((1, 64), np.float32)
    x[0, :3] = [-3e38, 3e38, 0.5e38]  # 0.5e38 decodes to 3e38 or (p = 0.42) overflows -3e38
    comp = fk.compressor({"w": jnp.zeros(64)}, top_k_count=3, bits=1, error_feedback=True)
    excluded = 0
    for seed in range(12):
        result = comp.round({"w": jnp.asarray(x)}, jax.random.PRNGKey(seed),
                            residuals=jnp.zeros((1, 64)))
        assert bool(jnp.all(jnp.isfinite(result.residuals)))
        if bool(result.metrics.excluded[0]):
            excluded += 1
            np.testing.assert_array_equal(result.residuals, np.zeros((1, 64)))
    assert 0 < excluded < 12  # some draws overflow, others do not: the test can fail


def test_empty_and_all_excluded_cohorts_give_zeros():
    comp = fk.compressor(TEMPLATE, **EF8)
    empty = comp.round(make_updates(0), KEY, residuals=jnp.zeros((0, D_SPARSE)))
    assert float(jnp.abs(empty.mean["w"]).sum()) == 0.0
    assert empty.metrics.as_dict()["uploaded_bytes"] == 0
    bad = jax.tree_util.tree_map(lambda a: a.at[:].set(jnp.nan), make_updates(5))
    result = comp.round(bad, KEY, residuals=jnp.ones((5, D_SPARSE)))
    d = result.metrics.as_dict()
    assert d["num_excluded"] == 5 and d["uploaded_bytes"] == 0
    assert d["contributors_touched"] == 0 and d["contributors_mean"] == 0.0
    for leaf in ("w", "b"):
        np.testing.assert_array_equal(result.mean[leaf], np.zeros(result.mean[leaf].shape))
    np.testing.assert_array_equal(result.residuals, np.ones((5, D_SPARSE)))


# ------------------------------------------------------------------------------------------
# Chunking and sharding
# ------------------------------------------------------------------------------------------

def test_chunked_equals_unchunked(selection):
    c = 5  # not a multiple of the chunk: the last chunk is padded
    comp = fk.compressor(TEMPLATE, **selection, **EF8)
    updates = make_updates(c, seed=5)
    ids = jnp.asarray(np.random.default_rng(0).permutation(50)[:c])
    residuals = jnp.asarray(np.random.default_rng(6).normal(size=(c, D_SPARSE)), jnp.float32)
    whole = comp.round(updates, KEY, client_ids=ids, residuals=residuals)
    chunked = comp.round(updates, KEY, client_ids=ids, residuals=residuals, chunk_size=2)
    for leaf in ("w", "b"):
        np.testing.assert_allclose(chunked.mean[leaf], whole.mean[leaf], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(chunked.residuals, whole.residuals, rtol=1e-6, atol=1e-6)
    assert chunked.metrics.as_dict() == pytest.approx(whole.metrics.as_dict())

    # Updates produced chunk by chunk from the client ids: the [C, d] array never exists.
    table = updates

    def update_fn(chunk_ids):
        position = jnp.argmax(chunk_ids[:, None] == ids[None, :], axis=1)
        return jax.tree_util.tree_map(lambda a: a[position], table)

    generated = comp.round(update_fn, KEY, client_ids=ids, residuals=residuals, chunk_size=2)
    np.testing.assert_allclose(generated.mean["w"], whole.mean["w"], rtol=1e-5, atol=1e-6)


def _result(stdout: str) -> dict:
    """The JSON a test script printed on its last `RESULT` line."""
    line = [ln for ln in stdout.splitlines() if ln.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


SHARDED_SCRIPT = textwrap.dedent(
    """
    import json, jax, jax.numpy as jnp, numpy as np
    import fedkernels as fk
    from fedkernels._sharding import client_mesh
    assert len(jax.devices()) == 4, jax.devices()
    template = {"b": jnp.zeros((30,)), "w": jnp.zeros((40, 30))}
    # No quantization: sharding does not depend on it, and bit packing is slow to compile.
    comp = fk.compressor(template, top_k_count=25, error_feedback=True, dense_threshold=100)
    rng = np.random.default_rng(0)
    c = 10  # not a multiple of 4: padded with absent clients
    updates = {"b": jnp.asarray(rng.normal(size=(c, 30)), jnp.float32),
               "w": jnp.asarray(rng.normal(size=(c, 40, 30)), jnp.float32)}
    updates["w"] = updates["w"].at[2, 0, 0].set(jnp.nan)
    ids = jnp.asarray(rng.permutation(40)[:c])
    res = jnp.asarray(rng.normal(size=(c, 1200)), jnp.float32)
    key = jax.random.PRNGKey(3)
    plain = comp.round(updates, key, client_ids=ids, residuals=res)
    mesh = client_mesh()
    # Sharded and chunked on each device (chunked alone == unchunked is its own test).
    sharded = comp.round(updates, key, client_ids=ids, residuals=res, mesh=mesh, chunk_size=2)
    # Unchunked too: the excluded client's restore ran on wrong rows of every device but the
    # first on jax 0.4.30 (argsort inside shard_map), silently.
    unchunked = comp.round(updates, key, client_ids=ids, residuals=res, mesh=mesh)
    out = {}
    for name, r in (("sharded_chunked", sharded), ("sharded", unchunked)):
        out[name] = {
            "mean": max(float(jnp.max(jnp.abs(r.mean[k] - plain.mean[k]))) for k in ("w", "b")),
            "residuals": float(jnp.max(jnp.abs(r.residuals - plain.residuals))),
            "metrics": r.metrics.as_dict(),
            "plain_metrics": plain.metrics.as_dict(),
            "num_excluded": r.metrics.as_dict()["num_excluded"],
        }
    print("RESULT" + json.dumps(out))
    """
)


def test_sharded_on_four_cpu_devices_equals_unsharded():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4")
    env["JAX_PLATFORMS"] = "cpu"
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-c", SHARDED_SCRIPT], env=env, cwd=root, capture_output=True,
        text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = _result(proc.stdout)
    for name in ("sharded_chunked", "sharded"):
        assert out[name]["mean"] < 1e-5, out
        assert out[name]["residuals"] < 1e-6, out
        assert out[name]["num_excluded"] == 1, out
        assert out[name]["metrics"] == pytest.approx(out[name]["plain_metrics"], rel=1e-5), out


MULTIPROCESS_SCRIPT = textwrap.dedent(
    """
    import json, sys, jax
    process_id, port = int(sys.argv[1]), sys.argv[2]
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)
    import jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec
    import fedkernels as fk
    assert jax.process_count() == 2 and len(jax.devices()) == 2, jax.devices()
    template = {"b": jnp.zeros((30,)), "w": jnp.zeros((40, 30))}
    comp = fk.compressor(template, top_k_count=25, error_feedback=True, dense_threshold=100)
    rng = np.random.default_rng(0)  # the same cohort in both processes
    c = 8
    updates = {"b": rng.normal(size=(c, 30)).astype(np.float32),
               "w": rng.normal(size=(c, 40, 30)).astype(np.float32)}
    updates["w"][5, 0, 0] = np.nan  # a client of process 1, excluded
    ids = rng.permutation(40)[:c].astype(np.int32)
    res = rng.normal(size=(c, 1200)).astype(np.float32)
    key = jax.random.PRNGKey(3)
    # The reference: the whole cohort in this process alone, no mesh.
    plain = comp.round(jax.tree_util.tree_map(jnp.asarray, updates), key,
                       client_ids=jnp.asarray(ids), residuals=jnp.asarray(res))
    # Each process holds half of the cohort (what it would have loaded itself) and the
    # global arrays span the devices of both processes.
    mesh = fk.client_mesh()
    sharding = NamedSharding(mesh, PartitionSpec(mesh.axis_names[0]))
    mine = slice(process_id * c // 2, (process_id + 1) * c // 2)

    def global_array(a):
        return jax.make_array_from_process_local_data(sharding, a[mine])

    out = comp.round(jax.tree_util.tree_map(global_array, updates), key,
                     client_ids=global_array(ids), residuals=global_array(res), mesh=mesh,
                     chunk_size=1)
    shards = sorted(out.residuals.addressable_shards, key=lambda s: s.index[0].start)
    rows = np.concatenate([np.asarray(s.data) for s in shards])
    print("RESULT" + json.dumps({
        "mean": max(float(np.max(np.abs(np.asarray(out.mean[k]) - np.asarray(plain.mean[k]))))
                    for k in ("w", "b")),
        "residual_rows": float(np.max(np.abs(rows - np.asarray(plain.residuals)[mine]))),
        "rows_held": rows.shape[0],
        "metrics": out.metrics.as_dict(),
        "plain_metrics": plain.metrics.as_dict(),
    }))
    """
)


def test_two_processes_with_jax_distributed_equal_one_process():
    """The multi-host path: two processes (one CPU device each) joined by
    `jax.distributed.initialize`, the cohort split between them, one mesh over both devices.
    (With several CPU devices per process, jax 0.4.30's gloo set-up times out; jax 0.10 runs
    that too. Several devices in one process are the test above.)"""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=1")
    env["JAX_PLATFORMS"] = "cpu"
    root = Path(__file__).resolve().parents[1]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", MULTIPROCESS_SCRIPT, str(i), str(port)], env=env, cwd=root,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(2)
    ]
    outputs = []
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=300)
            assert proc.returncode == 0, stderr[-3000:]
            outputs.append(_result(stdout))
    finally:
        for proc in procs:
            proc.kill()
    for out in outputs:
        assert out["mean"] < 1e-5, out
        assert out["residual_rows"] < 1e-6 and out["rows_held"] == 4, out
        assert out["metrics"]["num_excluded"] == 1, out
        assert out["metrics"] == pytest.approx(out["plain_metrics"], rel=1e-5), out


# ------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, message",
    [
        ({"top_k_count": 0}, "top_k_count.*0"),
        ({"top_k_fraction": 1.5}, "top_k_fraction.*1.5"),
        ({"top_k_fraction": -0.1}, "top_k_fraction.*-0.1"),
        ({"top_k_fraction": 0.0}, r"top_k_fraction.*\(0, 1\].*0.0"),
        ({"top_k_count": 5000, "dense_threshold": 100}, "top_k_count.*5000"),
        ({"top_k_count": 5, "top_k_fraction": 0.1}, "at most one of top_k_fraction and"),
        ({"bits": 0}, "bits.*0"),
        ({"bits": 17}, "bits.*17"),
        ({"dense_threshold": -1}, "dense_threshold.*-1"),
        ({"random_k": True}, "random_k.*top_k_fraction or top_k_count"),
        ({"shared_range": (1.0, 1.0), "bits": 8}, r"shared_range.*\(1.0, 1.0\)"),
        ({"shared_range": (-1.0, 1.0)}, "shared_range.*bits=None"),
        ({"aggregation": "median"}, "aggregation.*median"),
        ({"on_nonfinite": "ignore"}, "on_nonfinite.*ignore"),
    ],
)
def test_bad_config_raises_value_error_naming_argument_and_value(options, message):
    with pytest.raises(ValueError, match=message):
        fk.compressor(TEMPLATE, **options)


def test_bad_call_arguments_raise():
    comp = fk.compressor(TEMPLATE, top_k_count=10, error_feedback=True,
                         dense_threshold=THRESHOLD)
    with pytest.raises(ValueError, match="residuals must be given"):
        comp.round(make_updates(2), KEY)
    with pytest.raises(ValueError, match=r"residuals must have shape \(2, 1200\)"):
        comp.round(make_updates(2), KEY, residuals=jnp.zeros((2, 1230)))
    with pytest.raises(ValueError, match="chunk_size must be >= 1, got 0"):
        comp.round(make_updates(2), KEY, residuals=jnp.zeros((2, 1200)), chunk_size=0)
    with pytest.raises(ValueError, match="weights must be >= 0"):
        comp.round(make_updates(2), KEY, residuals=jnp.zeros((2, 1200)),
                   weights=jnp.array([1.0, -1.0]))
    with pytest.raises(ValueError, match="template"):
        comp.round({"b": jnp.zeros((2, 30)), "w": jnp.zeros((2, 30, 40))}, KEY,
                   residuals=jnp.zeros((2, 1200)))
