"""The fast kernel paths equal their exact references (NumPy, and the `lax` methods).

No timing here: speed is measured by `python -m bench`. Each test can fail: the fast paths
are compared element for element (indices) or bit for bit (values), ties included.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedkernels as fk
from fedkernels import _radix, _topk
from tests import _reference as ref
from tests import _variants as variants

RNG = np.random.default_rng(20261122)


def _rows(kind: str, shape: tuple[int, ...]) -> np.ndarray:
    """Test data with the awkward cases top-k must order exactly."""
    x = RNG.standard_normal(shape).astype(np.float32)
    if kind == "ties":  # many equal magnitudes, both signs
        x = np.round(x * 2) / 2
    elif kind == "few_values":  # nearly everything tied
        x = RNG.choice(np.float32([-1.0, 1.0, 0.5, -0.0, 0.0]), size=shape)
    elif kind == "all_equal":
        x = np.full(shape, -2.5, np.float32)
    elif kind == "zeros":  # +0.0 and -0.0 tie
        x = np.where(RNG.random(shape) < 0.5, np.float32(-0.0), np.float32(0.0))
    elif kind == "nonfinite":  # NaN ranks above +Inf, Inf ties with -Inf
        x[RNG.random(shape) < 0.02] = np.nan
        x[RNG.random(shape) < 0.02] = np.inf
        x[RNG.random(shape) < 0.02] = -np.inf
    elif kind == "sorted":  # a strided sample sees a biased picture
        x = np.sort(np.abs(x), axis=-1)
    elif kind == "subnormal":
        x = x * np.float32(1e-40)
    return x.astype(np.float32)


CPU = _radix.for_backend("cpu")  # rows mapped one at a time
VMAP = dataclasses.replace(CPU, rows="vmap")  # rows batched, as on GPU/TPU
ROWS = {"map": CPU, "vmap": VMAP}
SCAN = dataclasses.replace(CPU, cumsum="scan")
MATMUL = dataclasses.replace(CPU, cumsum="matmul")
CUMSUM = {"scan": SCAN, "matmul": MATMUL}


def _top_k_with(x, k: int, method: str, config: _radix.RadixConfig):
    """`fk.top_k` with an explicit radix configuration."""
    indices = _topk._top_k_indices(x, k, method, config).astype(jnp.int32)
    return jnp.take_along_axis(x, indices, axis=-1), indices


KINDS = ["normal", "ties", "few_values", "all_equal", "zeros", "nonfinite", "sorted", "subnormal"]


@functools.cache
def _jitted_top_k(k: int, method: str, config: _radix.RadixConfig | None = None):
    if config is None:
        return jax.jit(functools.partial(fk.top_k, k=k, method=method))
    return jax.jit(lambda a: _top_k_with(a, k, method, config))


@functools.cache
def _jitted_kth_largest(k: int, capacity: int):
    return jax.jit(lambda a: _radix.kth_largest(a, fk.magnitude_key, k, capacity))


@functools.cache
def _jitted_radix_indices(k: int, capacity: int):
    return jax.jit(lambda a: _radix.top_k_indices_radix(a, fk.magnitude_key, k, capacity))


def _check_top_k(
    x: np.ndarray, k: int, method: str = "radix", jit: bool = True,
    config: _radix.RadixConfig | None = None,
) -> None:
    if jit:
        fn = _jitted_top_k(k, method, config)
    elif config is None:
        def fn(a):
            return fk.top_k(a, k, method=method)
    else:
        def fn(a):
            return _top_k_with(a, k, method, config)
    values, indices = fn(jnp.asarray(x))
    want_values, want_indices = ref.top_k(x, k)
    np.testing.assert_array_equal(np.asarray(indices), want_indices)
    assert indices.dtype == jnp.int32
    # Values bit for bit (NaN payloads and -0.0 included).
    np.testing.assert_array_equal(
        np.asarray(values).view(np.int32), want_values.astype(np.float32).view(np.int32)
    )


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("d,k", [(1, 1), (33, 33), (100, 1), (1000, 999)])
def test_radix_top_k_small_rows_equal_reference(kind, d, k):
    _check_top_k(_rows(kind, (d,)), k)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [1, 3000, 199_999])
def test_radix_top_k_sampled_rows_equal_reference(kind, k):
    # d > 65536, so the threshold bracket comes from a strided sample.
    _check_top_k(_rows(kind, (200_003,)), k)


@pytest.mark.parametrize("rows", variants.variants("map", "vmap"))
@pytest.mark.parametrize("kind", ["normal", "ties", "nonfinite", "all_equal"])
def test_radix_top_k_batched_rows_equal_reference(kind, rows):
    _check_top_k(_rows(kind, (3, 2, 70_001)), 500, config=ROWS[rows])
    _check_top_k(_rows(kind, (4, 50)), 10, jit=kind != "normal", config=ROWS[rows])


@pytest.mark.parametrize("rows", variants.variants("map", "vmap"))
def test_radix_batch_mixing_trial_and_fallback_rows(rows):
    # Rows whose sample trial succeeds beside rows that need the fallback bisection (heavy
    # ties): batched, the fallback is taken for the whole batch or per row, never skipped.
    config = ROWS[rows]
    kinds = ["normal", "few_values", "sorted", "all_equal", "normal"]
    x = np.stack([_rows(kind, (70_001,)) for kind in kinds])
    k = 700
    # Row 4: the k largest sit between the strided sample's positions, so the sample's
    # bracket lies below T and only the fallback finds it.
    stride = _radix.sample_plan(70_001, k)[0]
    x[4, 1 : 1 + stride * k : stride] = 100 + np.arange(k, dtype=np.float32)
    lo, hi = _radix._sample_bounds(fk.magnitude_key(_radix._sample(jnp.asarray(x), k)), 70_001, k)
    gt, ge = jax.vmap(_radix._trial)(fk.magnitude_key(jnp.asarray(x)), lo, hi)
    capacity = _radix.default_capacity(70_001, k)
    ok = [bool(_radix._trial_ok(g, e, k, capacity)[0]) for g, e in zip(gt, ge, strict=True)]
    assert ok[0] and not ok[4]  # the batch really mixes both kinds of row
    _check_top_k(x, k, jit=False, config=config)
    residual = _rows("normal", x.shape)
    values, indices, new_residual = jax.jit(
        lambda a, r: _topk.top_k_rows_feedback((a, r), jnp.add, k, config, radix=True)
    )(jnp.asarray(x), jnp.asarray(residual))
    acc = x + residual
    want_values, want_indices = ref.top_k(acc, k)
    np.testing.assert_array_equal(np.asarray(indices), want_indices)
    np.testing.assert_array_equal(np.asarray(values), want_values)
    rebuilt = np.asarray(new_residual).copy()
    np.put_along_axis(rebuilt, want_indices, want_values, axis=-1)
    np.testing.assert_array_equal(rebuilt, acc)


@pytest.mark.parametrize("kind", ["normal", "ties", "nonfinite"])
def test_radix_equals_lax_method(kind):
    x = jnp.asarray(_rows(kind, (2, 5000)))
    for k in (1, 100, 5000):  # jitted: compiled once per k, not per call (eager recompiles)
        fast = _jitted_top_k(k, "radix")(x)
        slow = _jitted_top_k(k, "lax")(x)
        np.testing.assert_array_equal(np.asarray(fast[1]), np.asarray(slow[1]))
        np.testing.assert_array_equal(
            np.asarray(fast[0]).view(np.int32), np.asarray(slow[0]).view(np.int32)
        )
    assert "auto" in fk._topk.METHODS and "radix" in fk._topk.METHODS


@pytest.mark.parametrize("rows", variants.variants("map", "vmap"))
@pytest.mark.parametrize("kind", ["normal", "ties", "nonfinite", "few_values"])
def test_radix_feedback_matches_lax_and_conserves(kind, rows):
    # CPU default: map; GPU/TPU default: vmap. The radix path zeroes the selection through
    # its bit-packed mask.
    x = jnp.asarray(_rows(kind, (2, 3, 3001)))
    residual = jnp.asarray(_rows("normal", (2, 3, 3001)))
    fast = _topk.top_k_rows_feedback(
        (x.reshape(6, -1), residual.reshape(6, -1)), jnp.add, 300, ROWS[rows], radix=True
    )
    fast = tuple(a.reshape(2, 3, -1) for a in fast)
    slow = fk.top_k_with_feedback(x, residual, 300, method="lax")
    for a, b in zip(fast, slow, strict=True):
        np.testing.assert_array_equal(np.asarray(a).view(np.int32), np.asarray(b).view(np.int32))
    if kind != "nonfinite":  # scatter(values) + new_residual == acc, bit for bit
        values, indices, new_residual = fast
        acc = np.asarray(x) + np.asarray(residual)
        rebuilt = np.asarray(new_residual).copy()
        np.put_along_axis(rebuilt, np.asarray(indices), np.asarray(values), axis=-1)
        np.testing.assert_array_equal(rebuilt, acc)


@pytest.mark.parametrize("kind", ["normal", "ties", "few_values", "all_equal", "nonfinite"])
@pytest.mark.parametrize("d,k", [(5000, 1), (5000, 700), (1 << 18, 2621)])
def test_top_k_row_words_mask_equals_indices_and_reference(kind, d, k):
    # Both branches: lax.top_k below AUTO_RADIX_MIN_LENGTH, radix select from there on.
    x = _rows(kind, (d,))
    words, indices = jax.jit(_topk.top_k_row_words, static_argnums=(1, 2))(
        jnp.asarray(x), k, CPU
    )
    np.testing.assert_array_equal(np.asarray(indices), ref.top_k(x, k)[1])
    assert words.shape == (-(-d // 32),) and words.dtype == jnp.uint32
    mask = np.asarray(_radix.unpack_mask(words, d))
    np.testing.assert_array_equal(np.flatnonzero(mask), np.asarray(indices))
    # select_unset zeroes exactly the selected entries (blocked path when d % 32 == 0).
    kept = np.asarray(jax.jit(_radix.select_unset)(words, jnp.asarray(x)))
    want = np.where(mask, 0.0, x).astype(np.float32)
    np.testing.assert_array_equal(kept.view(np.int32), want.view(np.int32))


@pytest.mark.parametrize("capacity", [1, 40])
@pytest.mark.parametrize("kind", ["normal", "ties", "few_values", "nonfinite", "sorted"])
def test_kth_largest_bisection_fallback_is_exact(kind, capacity):
    # A tiny candidate capacity forces the bisection (radix select) path after the sample.
    x = _rows(kind, (70_000,))
    keys = ref.magnitude_bits(x).astype(np.int64)
    for k in (1, 1234, 69_999):
        got = _jitted_kth_largest(k, capacity)(x)
        assert int(got) == np.sort(keys)[::-1][k - 1], (kind, capacity, k)
        idx = _jitted_radix_indices(k, capacity)(jnp.asarray(x))
        np.testing.assert_array_equal(np.asarray(idx), ref.top_k(x, k)[1])


def _jitted_cumsum(config, max_value, total=None):
    return jax.jit(lambda v: _radix._cumsum(v, config, max_value, total))


@pytest.mark.parametrize("mode", variants.variants("matmul", "scan"))
def test_cumsum_modes_equal_numpy_including_total_bound(mode):
    config = CUMSUM[mode]
    for n, max_value in [(1, 32), (31, 32), (33, 1), (70_001, 32), (300_000, 1)]:
        v = RNG.integers(0, max_value + 1, n).astype(np.int32)
        got = _jitted_cumsum(config, max_value)(jnp.asarray(v))
        np.testing.assert_array_equal(np.asarray(got), np.cumsum(v))
    # Large entries with a small total (the slot marks of `_compact`): the matmul levels must
    # stay exact, since every partial sum is below 2**24.
    n = 1_000_000
    v = np.zeros(n, np.int32)
    v[RNG.choice(n, 5000, replace=False)] = RNG.integers(1, 3000, 5000)
    v[-1] = 2**24 - 1 - int(v[:-1].sum())  # partial sums up to 2**24 - 1
    got = _jitted_cumsum(config, 2**24, 2**24 - 1)(jnp.asarray(v))
    np.testing.assert_array_equal(np.asarray(got), np.cumsum(v))


@pytest.mark.parametrize("backend", ["cpu", "gpu", "tpu"])
def test_radix_config_for_backend_is_explicit_and_validated(backend):
    config = _radix.for_backend(backend)
    assert config.rows == ("map" if backend == "cpu" else "vmap")
    assert config.cumsum in _radix.CUMSUM_MODES
    if backend != "cpu":
        assert config.cumsum == "scan"
    with pytest.raises(ValueError, match="rows.*'loop'"):
        _radix.RadixConfig(rows="loop")
    with pytest.raises(ValueError, match="cumsum.*'fft'"):
        _radix.RadixConfig(cumsum="fft")
    with pytest.raises(ValueError, match="min_length.*0"):
        _radix.RadixConfig(min_length=0)


@functools.cache
def _jitted_compact(size, config):
    return jax.jit(lambda words: _radix._compact(words, size, config))


@functools.cache
def _jitted_first_bits(config):
    return jax.jit(lambda words, m: _radix._first_bits(words, m, config))


@pytest.mark.parametrize("mode", variants.variants("matmul", "scan"))
@pytest.mark.parametrize("density", [0.0, 0.001, 0.3, 1.0])
@pytest.mark.parametrize("n", [1, 33, 70_000])
def test_pack_compact_first_bits_match_numpy(n, density, mode):
    config = CUMSUM[mode]
    mask = RNG.random(n) < density
    words = _radix._pack(jnp.asarray(mask))
    assert words.shape == (-(-n // 32),) and words.dtype == jnp.uint32
    unpacked = (np.asarray(words)[:, None] >> np.arange(32, dtype=np.uint32)) & 1
    np.testing.assert_array_equal(unpacked.reshape(-1)[:n].astype(bool), mask)
    np.testing.assert_array_equal(np.asarray(_radix._popcount(words)), unpacked.sum(axis=1))
    other = RNG.random(n) < 0.5
    first, second = _radix._pack2(jnp.asarray(mask), jnp.asarray(other))
    np.testing.assert_array_equal(np.asarray(first), np.asarray(words))
    np.testing.assert_array_equal(np.asarray(second), np.asarray(_radix._pack(jnp.asarray(other))))
    where = np.flatnonzero(mask)
    # Sizes fixed per n (not per density), so each (n, size) compiles once for all densities:
    # 1 and n // 100 + 1 below and n // 3 + 1 and n above or below the count of set bits, by
    # density; both of `_compact`'s slot searches (binary search, marks) are taken.
    for size in sorted({1, n // 100 + 1, n // 3 + 1, n}):
        got = np.asarray(_jitted_compact(size, config)(words))
        take = min(size, len(where))
        np.testing.assert_array_equal(got[:take], where[:take])
        assert np.all((got >= 0) & (got < len(words) * 32))
    for m in {0, 1, len(where) // 2, len(where)}:
        kept = _jitted_first_bits(config)(words, jnp.int32(m))
        bits = (np.asarray(kept)[:, None] >> np.arange(32, dtype=np.uint32)) & 1
        np.testing.assert_array_equal(np.flatnonzero(bits.reshape(-1)), where[:m])


@pytest.mark.parametrize("mode", variants.variants("matmul", "scan"))
def test_compact_runs_of_full_and_empty_words(mode):
    # `_compact` counts bits per group of 4 words (bytes of one uint32): runs of set bits
    # give groups of 128 (the largest byte value), empty groups, and partial words between.
    config = CUMSUM[mode]
    n = 40_000 + 13
    mask = (np.arange(n) // 97) % 3 == 0
    mask[-5:] = True  # set bits in the padded last group
    where = np.flatnonzero(mask)
    words = _radix._pack(jnp.asarray(mask))
    for size in (1, 100, len(where) - 1, len(where)):
        got = _jitted_compact(size, config)(words)
        np.testing.assert_array_equal(np.asarray(got), where[:size])


def test_select_bit_every_rank():
    words = RNG.integers(0, 2**32, 500, dtype=np.uint64).astype(np.uint32)
    words[0], words[1] = 0xFFFFFFFF, 0x80000001
    bits = (words[:, None] >> np.arange(32, dtype=np.uint32)) & 1
    # One entry per set bit of every word: (the word, the bit's rank in it, its position).
    word_of, position = np.nonzero(bits)
    rank = np.cumsum(bits, axis=1)[word_of, position] - 1
    got = _radix._select_bit(jnp.asarray(words[word_of]), jnp.asarray(rank))
    np.testing.assert_array_equal(np.asarray(got), position)


# ---------------------------------------------------------------- masked_mean (scan over rows)


@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("with_weights", [False, True])
def test_masked_sum_row_scan_matches_float64_reference(with_mask, with_weights):
    x = _rows("nonfinite", (7, 3, 50))
    x[RNG.random(x.shape) < 0.4] = 0.0
    mask = RNG.random(x.shape) < 0.7 if with_mask else None
    weights = RNG.random(7) * 3 if with_weights else None
    weights_arr = None if weights is None else jnp.asarray(weights, jnp.float32)
    mask_arr = None if mask is None else jnp.asarray(mask)
    for fn in (fk.masked_sum, jax.jit(fk.masked_sum)):
        numerator, denominator = fn(jnp.asarray(x), weights_arr, mask_arr)
        contributes = np.isfinite(x) & ((x != 0) if mask is None else mask)
        w = np.ones(7) if weights is None else np.float32(weights).astype(np.float64)
        w = w.reshape(7, 1, 1)
        want_num = np.sum(np.where(contributes, x.astype(np.float64), 0) * w, axis=0)
        want_den = np.sum(contributes * w, axis=0)
        np.testing.assert_allclose(np.asarray(numerator), want_num, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(denominator), want_den, rtol=1e-6)
        assert denominator.dtype == (jnp.int32 if weights is None else jnp.float32)
        mean = fk.masked_mean(jnp.asarray(x), weights_arr, mask_arr)
        want_mean = np.where(want_den > 0, want_num / np.where(want_den > 0, want_den, 1), 0)
        np.testing.assert_allclose(np.asarray(mean), want_mean, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- quantize fast paths


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8, 16])
def test_pack_bits_fast_layout_equals_bit_stream(bits):
    for n in (1, 31, 33, 100):
        codes = RNG.integers(0, 2**bits, (2, n)).astype(np.uint32)
        packed = np.asarray(fk.pack_bits(jnp.asarray(codes), bits))
        # Reference: code i at bits [i*bits, (i+1)*bits) of a little-endian bit stream.
        stream = ((codes[..., None] >> np.arange(bits, dtype=np.uint32)) & 1).reshape(2, -1)
        stream = np.pad(stream, ((0, 0), (0, packed.shape[-1] * 32 - stream.shape[-1])))
        weights = np.uint64(1) << np.arange(32, dtype=np.uint64)
        want = (stream.reshape(2, -1, 32).astype(np.uint64) * weights).sum(-1)
        np.testing.assert_array_equal(packed, want.astype(np.uint32))
        np.testing.assert_array_equal(np.asarray(fk.unpack_bits(packed, bits, n)), codes)


def test_hash_uniform_is_uniform_reproducible_and_key_dependent():
    from fedkernels import _quantize

    key = jax.random.PRNGKey(3)
    u = np.asarray(_quantize.hash_uniform(key, (200_000,)))
    assert u.dtype == np.float32 and u.min() >= 0.0 and u.max() < 1.0
    # Chi-square over 100 bins: 99 dof, mean 99, sd 14; 200 is beyond 7 sd.
    counts = np.bincount((u * 100).astype(int), minlength=100)
    expected = len(u) / 100
    assert np.sum((counts - expected) ** 2 / expected) < 200
    # Neighbouring counters are not correlated.
    assert abs(np.corrcoef(u[:-1], u[1:])[0, 1]) < 0.01
    np.testing.assert_array_equal(u, np.asarray(_quantize.hash_uniform(key, (200_000,))))
    other = np.asarray(_quantize.hash_uniform(jax.random.fold_in(key, 1), (200_000,)))
    assert np.mean(u == other) < 0.001
    typed = np.asarray(_quantize.hash_uniform(jax.random.key(3), (1000,)))
    np.testing.assert_array_equal(typed, np.asarray(_quantize.hash_uniform(key, (1000,))))


@pytest.mark.parametrize("prng", ["threefry", "hash"])
def test_quantize_unbiased_over_keys(prng):
    inner = np.clip(RNG.standard_normal(998), -3.9, 3.9)  # the range is exactly [-4, 4]
    x = jnp.asarray(np.concatenate([inner, [-4.0, 4.0]]).astype(np.float32))
    run = jax.jit(jax.vmap(lambda key: fk.dequantize(fk.quantize(x, key, bits=2, prng=prng))))
    keys = jax.random.split(jax.random.PRNGKey(11), 4000)
    samples = np.asarray(run(keys), np.float64)
    step = 8.0 / 3
    # Each estimate is x + noise with |noise| <= step; sd of a 4000-key mean <= step / 2 / 63.
    np.testing.assert_allclose(samples.mean(axis=0), np.asarray(x), atol=6 * step / 2 / 63)
    assert np.all(np.abs(samples - np.asarray(x)) <= step * (1 + 1e-5))


def test_quantize_rejects_unknown_prng():
    with pytest.raises(ValueError, match="prng"):
        fk.quantize(jnp.ones(4), jax.random.PRNGKey(0), prng="mt19937")
