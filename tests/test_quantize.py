import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedkernels as fk
from tests import _reference as ref
from tests._runners import RUNNERS


@pytest.mark.parametrize("bits", range(1, 33))
def test_pack_matches_bitstream_and_round_trips(bits):
    # Every width pack_bits supports, 1 to 32, under jit; dividing 32 or not, eagerly too.
    rng = np.random.default_rng(bits)
    n = 75  # not a multiple of 32
    codes = rng.integers(0, 2**bits, size=n, dtype=np.uint64).astype(np.uint32)
    codes[:2] = [0, 2**bits - 1]
    want = ref.bitstream_pack(codes, bits)
    runs = [(jax.jit(fk.pack_bits, static_argnums=1),
             jax.jit(fk.unpack_bits, static_argnums=(1, 2)))]
    if bits in (1, 7, 8, 13, 16, 31, 32):  # eagerly too, for widths of each kind
        runs.append((fk.pack_bits, fk.unpack_bits))
    for pack, unpack in runs:
        packed = pack(jnp.asarray(codes), bits)
        assert packed.dtype == jnp.uint32 and packed.shape == (3 * bits,)
        np.testing.assert_array_equal(np.asarray(packed), want)
        np.testing.assert_array_equal(np.asarray(unpack(packed, bits, n)), codes)


@pytest.mark.parametrize("bits", [1, 3, 8, 17, 31])
def test_pack_keeps_only_the_low_bits_of_each_code(bits):
    codes = np.random.default_rng(bits).integers(0, 2**bits, size=40).astype(np.uint32)
    high = codes | np.uint32(1 << bits)  # a bit above the code's width
    np.testing.assert_array_equal(
        np.asarray(fk.pack_bits(jnp.asarray(high), bits)),
        np.asarray(fk.pack_bits(jnp.asarray(codes), bits)),
    )
    negative = fk.pack_bits(jnp.array([-1, 0, 1], jnp.int32), bits)  # modulo 2**bits
    np.testing.assert_array_equal(
        np.asarray(fk.unpack_bits(negative, bits, 3)), [2**bits - 1, 0, 1]
    )


@pytest.mark.parametrize("bits", range(1, 17))
def test_quantized_layout_is_the_documented_one_and_round_trips(bits):
    # Quantized.packed: planar for widths dividing 32, the stream otherwise (see Quantized);
    # ref.pack_codes places each code at its slot of the stream, from the docstring alone.
    from fedkernels import _quantize

    rng = np.random.default_rng(100 + bits)
    codes = rng.integers(0, 2**bits, size=(2, 75), dtype=np.uint64).astype(np.uint32)
    codes[0, :2] = [0, 2**bits - 1]
    packed = jax.jit(_quantize.pack_codes, static_argnums=1)(jnp.asarray(codes), bits)
    assert packed.dtype == jnp.uint32 and packed.shape == (2, 3 * bits)
    np.testing.assert_array_equal(np.asarray(packed), ref.pack_codes(codes, bits))
    q = fk.Quantized(packed, jnp.zeros(2), jnp.ones(2), bits, 75)
    np.testing.assert_array_equal(np.asarray(jax.jit(fk.Quantized.codes)(q)), codes)
    if 32 % bits == 0:  # the planar layout is not the stream (it is for a single word)
        assert not np.array_equal(np.asarray(packed), ref.bitstream_pack(codes, bits))


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_pack_bits_and_quantized_reject_bad_widths(jit):
    codes = jnp.arange(5, dtype=jnp.uint32)
    pack = jax.jit(fk.pack_bits, static_argnums=1) if jit else fk.pack_bits
    unpack = jax.jit(fk.unpack_bits, static_argnums=(1, 2)) if jit else fk.unpack_bits
    for bits in (0, 33, -1):
        with pytest.raises(ValueError, match=rf"bits must be in \[1, 32\], got {bits}"):
            pack(codes, bits)
        with pytest.raises(ValueError, match=rf"bits must be in \[1, 32\], got {bits}"):
            unpack(jnp.zeros(3, jnp.uint32), bits, 5)
    with pytest.raises(TypeError, match="bits must be a static Python int, got 8.0"):
        fk.pack_bits(codes, 8.0)
    with pytest.raises(TypeError, match="codes must have an integer dtype, got float32"):
        pack(jnp.ones(3), 4)
    with pytest.raises(ValueError, match=r"packed must be \[\.\.\., ceil\(length / 32\) \* bits\]"):
        unpack(jnp.zeros(3, jnp.uint32), 3, 33)  # 33 codes of 3 bits need 6 words
    with pytest.raises(ValueError, match="length must be >= 0, got -1"):
        unpack(jnp.zeros(3, jnp.uint32), 3, -1)
    packed = jnp.zeros(8, jnp.uint32)
    for bits in (0, 17):
        with pytest.raises(ValueError, match=rf"bits must be in \[1, 16\], got {bits}"):
            fk.Quantized(packed, jnp.float32(0), jnp.float32(1), bits, 32)
    with pytest.raises(ValueError, match="length must be >= 0, got -3"):
        fk.Quantized(packed, jnp.float32(0), jnp.float32(1), 8, -3)
    q = fk.quantize(jnp.ones(32), jax.random.PRNGKey(0), bits=8)
    assert q._replace(packed=q.packed).bits == 8  # the pytree round trip keeps working
    leaves, tree = jax.tree_util.tree_flatten(q)
    assert jax.tree_util.tree_unflatten(tree, leaves).bits == 8


def test_pack_batched():
    codes = np.random.default_rng(0).integers(0, 8, size=(2, 3, 40)).astype(np.uint32)
    packed = fk.pack_bits(jnp.asarray(codes), 3)
    assert packed.shape == (2, 3, 6)
    np.testing.assert_array_equal(np.asarray(fk.unpack_bits(packed, 3, 40)), codes)


@pytest.mark.parametrize("run", RUNNERS.values(), ids=RUNNERS.keys())
@pytest.mark.parametrize("bits", [1, 2, 5, 8, 13, 16])
def test_codes_are_floor_or_ceil_and_error_within_one_step(run, bits):
    rng = np.random.default_rng(bits)
    x = (rng.normal(size=(3, 300)) * rng.uniform(0.1, 10, size=(3, 1))).astype(np.float32)
    q = run(fk.quantize, x, jax.random.PRNGKey(bits), bits=bits)
    lo, hi, scaled = ref.quantize_levels(x, bits)
    np.testing.assert_array_equal(np.asarray(q.minimum), lo[:, 0])
    np.testing.assert_array_equal(np.asarray(q.maximum), hi[:, 0])
    codes = np.asarray(q.codes()).astype(np.float64)
    # float32 scaling may differ from float64 by an ulp: allow floor/ceil of x' +- 1e-3.
    assert np.all(codes >= np.floor(scaled - 1e-3)) and np.all(codes <= np.ceil(scaled + 1e-3))
    decoded = np.asarray(fk.dequantize(q), np.float64)
    step = (hi - lo) / (2**bits - 1)
    assert np.all(np.abs(decoded - x) <= step * (1 + 1e-4) + 1e-6)
    assert q.packed.shape == (3, 10 * bits)


def test_unbiased_over_many_keys():
    rng = np.random.default_rng(42)
    x = rng.normal(size=64).astype(np.float32)
    trials = 4000
    keys = jax.random.split(jax.random.PRNGKey(0), trials)
    decoded = jax.jit(jax.vmap(lambda k: fk.dequantize(fk.quantize(x, k, bits=2))))(keys)
    decoded = np.asarray(decoded, np.float64)
    step = (x.max() - x.min()) / 3
    mean_error = decoded.mean(axis=0) - x
    # Each decode is x + e with |e| < step and E[e] = 0: std of the mean <= step / (2 sqrt(n)).
    z = np.abs(mean_error) / (step / (2 * np.sqrt(trials)))
    assert z.max() < 5.0, z.max()
    # And not trivially: individual decodes do differ from x.
    assert np.mean(decoded != x) > 0.5


def test_constant_rows_are_exact():
    x = np.array([[3.25] * 50, [-1.0] * 50], np.float32)
    q = fk.quantize(x, jax.random.PRNGKey(0), bits=8)
    np.testing.assert_array_equal(np.asarray(fk.dequantize(q)), x)


def test_same_key_same_codes_and_fold_in_streams_differ():
    x = np.random.default_rng(1).normal(size=(1000,)).astype(np.float32)
    key = jax.random.PRNGKey(7)
    a = fk.quantize(x, key, bits=4)
    b = fk.quantize(x, key, bits=4)
    np.testing.assert_array_equal(np.asarray(a.packed), np.asarray(b.packed))
    c = fk.quantize(x, jax.random.fold_in(key, 1), bits=4)
    assert np.any(np.asarray(a.packed) != np.asarray(c.packed))


def test_vmap_per_client_keys_and_pytree():
    x = np.random.default_rng(2).normal(size=(4, 100)).astype(np.float32)
    key = jax.random.PRNGKey(3)
    keys = jax.vmap(lambda c: jax.random.fold_in(key, c))(jnp.arange(4))
    q = jax.vmap(lambda row, k: fk.quantize(row, k, bits=6))(x, keys)
    assert isinstance(q, fk.Quantized) and q.bits == 6 and q.length == 100
    for c in range(4):
        single = fk.quantize(x[c], jax.random.fold_in(key, c), bits=6)
        np.testing.assert_array_equal(np.asarray(q.packed[c]), np.asarray(single.packed))
    decoded = jax.jit(fk.dequantize)(q)
    assert decoded.shape == (4, 100)
    assert q.nbytes == 4 * (4 * 4 * 6) + 4 * 4 * 2


def test_key_accepts_new_style_keys():
    x = jnp.linspace(-1, 1, 40)
    q = fk.quantize(x, jax.random.key(0), bits=3)
    assert q.packed.shape == (6,)


def test_no_retrace():
    @jax.jit
    @chex.assert_max_traces(n=1)
    def round_trip(x, key):
        return fk.dequantize(fk.quantize(x, key, bits=8))

    for r in range(3):
        round_trip(jnp.arange(10.0) * r, jax.random.PRNGKey(r))


def test_non_finite_policy_under_jit():
    x = jnp.array([0.0, 1.0, jnp.inf, -jnp.inf, jnp.nan, 2.0])
    q = jax.jit(lambda x: fk.quantize(x, jax.random.PRNGKey(0), bits=8))(x)
    assert float(q.minimum) == 0.0 and float(q.maximum) == 2.0
    decoded = np.asarray(fk.dequantize(q))
    assert np.all(np.isfinite(decoded))
    np.testing.assert_array_equal(decoded[[0, 2, 3, 4, 5]], [0.0, 2.0, 0.0, 0.0, 2.0])


def test_errors():
    key = jax.random.PRNGKey(0)
    x = jnp.ones(8)
    with pytest.raises(ValueError, match=r"bits must be in \[1, 16\], got 0"):
        fk.quantize(x, key, bits=0)
    with pytest.raises(ValueError, match=r"bits must be in \[1, 16\], got 17"):
        fk.quantize(x, key, bits=17)
    with pytest.raises(TypeError, match="bits must be a static Python int, got 8.0"):
        fk.quantize(x, key, bits=8.0)
    with pytest.raises(TypeError, match="key must be a PRNG key"):
        fk.quantize(x, jnp.array([1, 2, 3]), bits=8)
    with pytest.raises(TypeError, match="x must have a floating dtype, got int32"):
        fk.quantize(jnp.ones(8, jnp.int32), key)
    with pytest.raises(ValueError, match="x must be finite to quantize, got nan"):
        fk.quantize(jnp.array([1.0, jnp.nan]), key)
    with pytest.raises(ValueError, match=r"x must be \[\.\.\., n\] with n >= 1"):
        fk.quantize(jnp.ones((3, 0)), key)
    with pytest.raises(TypeError, match="q must be a Quantized"):
        fk.dequantize(jnp.ones(3))
    # A hand-made Quantized whose fields disagree (it failed with a broadcasting error).
    q = fk.quantize(jnp.ones((2, 40)), key)
    bad = fk.Quantized(q.packed, jnp.zeros(3), q.maximum, 8, 40)
    with pytest.raises(ValueError, match=r"packed \(2, 16\), minimum \(3,\), maximum \(2,\)"):
        fk.dequantize(bad)
    with pytest.raises(ValueError, match=r"packed \[\.\.\., 16\] \(length 40 at 8 bits\)"):
        jax.jit(fk.dequantize)(fk.Quantized(q.packed[:, :8], q.minimum, q.maximum, 8, 40))


def test_hash_stream_size_limit_is_checked_not_wrapped():
    # Abstract shapes only (nothing is allocated): past 2**32 counter words the stream would
    # repeat, so the call raises and names the way out.
    key = jax.random.PRNGKey(0)
    too_big = jax.ShapeDtypeStruct((3, 2**31), jnp.float32)  # 3 * 2**30 words: fine
    jax.eval_shape(lambda a: fk.quantize(a, key), too_big)
    too_big = jax.ShapeDtypeStruct((5, 2**31), jnp.float32)  # 5 * 2**30 words > 2**32
    with pytest.raises(ValueError, match=r"more than the 2\*\*32 .*prng='threefry'"):
        jax.eval_shape(lambda a: fk.quantize(a, key), too_big)
    with pytest.raises(ValueError, match="hash words"):
        fk._quantize.hash_uniform(key, (5, 2**31))
    shape = jax.eval_shape(lambda a: fk.quantize(a, key, prng="threefry"), too_big).packed.shape
    assert shape == (5, 2**31 // 32 * 8)


@pytest.mark.parametrize("n", [1, 7, 100, 1023, 1024, 1025, 16 * 64 + 15, 70_001, 300_007])
def test_finite_range_matches_numpy_with_non_finite_anywhere(n):
    from fedkernels import _quantize

    rng = np.random.default_rng(n)
    x = rng.normal(size=(3, n)).astype(np.float32) * 7
    # Row 0 clean; row 1 NaN/+-Inf sprinkled, including the last entries (the tree's tail) and
    # at the true extremes' neighbours; row 2 has no finite entry at all.
    k = max(1, n // 50)
    bad = rng.choice(n, size=min(n, 3 * k), replace=False)
    x[1, bad[:k]] = np.nan
    x[1, bad[k : 2 * k]] = np.inf
    x[1, bad[2 * k :]] = -np.inf
    x[1, -1] = -np.inf
    x[2] = np.where(rng.random(n) < 0.5, np.nan, np.inf)
    x[2, 0] = -np.inf
    lo, hi = jax.jit(_quantize._finite_range)(jnp.asarray(x))
    for row in range(3):
        finite = x[row][np.isfinite(x[row])]
        want_lo = finite.min() if finite.size else np.inf
        want_hi = finite.max() if finite.size else -np.inf
        assert float(lo[row]) == want_lo and float(hi[row]) == want_hi, (row, lo, hi)
    # poison=True: the clean row keeps its range, any NaN/Inf gives (-Inf, +Inf).
    x[1, bad[k:]] = 0.0
    x[1, -1] = 0.0
    x[1, bad[:k]] = np.nan  # only NaN in row 1 (NaN must not slip through a min)
    lo, hi = jax.jit(lambda a: _quantize._finite_range(a, poison=True))(jnp.asarray(x))
    assert (float(lo[0]), float(hi[0])) == (x[0].min(), x[0].max())
    assert float(lo[1]) == float(lo[2]) == -np.inf and float(hi[1]) == float(hi[2]) == np.inf


@pytest.mark.parametrize("poison", [False, True])
def test_finite_range_orders_every_float_and_skips_every_nan_pattern(poison):
    # The range pass compares integer keys of the float bits: every magnitude (subnormals,
    # +-0, the extremes of float32) must order as floats do, and every NaN bit pattern (either
    # sign, any payload) must be skipped, or flag the row with poison=True.
    from fedkernels import _quantize

    rng = np.random.default_rng(11)
    n = 50_003
    bits = rng.integers(0, 2**32, size=(6, n), dtype=np.uint64).astype(np.uint32)
    x = bits.view(np.float32).copy()
    finite = np.isfinite(x)
    x[0] = np.where(finite[0], x[0], 0.0)  # all finite, all magnitudes
    x[1] = np.where(finite[1], x[1], -0.0)
    x[1] *= np.float32(2.0**-126)  # subnormals, -0.0 and tiny normals
    x[2, :] = 0.0
    x[2, 7] = -0.0
    x[3] = np.where(np.arange(n) % 3 == 0, x[3], np.float32(1.5))  # some NaN and Inf
    x[4, ::2] = (bits[4, ::2] | np.uint32(0x7F800001)).view(np.float32)  # NaN, sign random
    x[5, :] = (bits[5] | np.uint32(0x7F800000)).view(np.float32)  # no finite entry
    assert np.isnan(x[4]).sum() >= n // 2 and not np.isfinite(x[5]).any()
    assert (np.signbit(x[4]) & np.isnan(x[4])).any() and (~np.signbit(x[4]) & np.isnan(x[4])).any()
    lo, hi = jax.jit(lambda a: _quantize._finite_range(a, poison=poison))(jnp.asarray(x))
    lo, hi = np.asarray(lo), np.asarray(hi)
    for row in range(6):
        ok = np.isfinite(x[row])
        if poison and not ok.all():
            assert (lo[row], hi[row]) == (-np.inf, np.inf), row
        elif ok.any():
            assert lo[row] == x[row][ok].min() and hi[row] == x[row][ok].max(), row
        else:
            assert (lo[row], hi[row]) == (np.inf, -np.inf), row


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("pos", [0, 5, 1024 * 16 - 1, 60_000 - 1])
def test_finite_range_poison_flags_one_bad_entry_anywhere(bad, pos):
    from fedkernels import _quantize

    x = np.random.default_rng(pos).normal(size=(2, 60_000)).astype(np.float32)
    x[1, pos] = bad
    lo, hi = jax.jit(lambda a: _quantize._finite_range(a, poison=True))(jnp.asarray(x))
    assert np.isfinite(float(lo[0])) and np.isfinite(float(hi[0]))
    assert (float(lo[1]), float(hi[1])) == (-np.inf, np.inf)


@pytest.mark.parametrize("bits", [1, 3, 8, 16])
def test_tf_graph_formulation_gives_the_same_quantization(bits):
    # TFF's worker runs quantize converted to TensorFlow in another formulation (plain range
    # reductions, no lanes axis); it must be the same function, non-finite entries included.
    from fedkernels import _quantize

    n = 70_001
    rng = np.random.default_rng(bits)
    x = rng.normal(size=(2, n)).astype(np.float32)
    x[1, rng.choice(n, size=3, replace=False)] = [np.nan, np.inf, -np.inf]
    key = jax.random.PRNGKey(bits)
    want = jax.jit(lambda a: fk.quantize(a, key, bits))(x)
    got = jax.jit(lambda a: _quantize._quantize(a, key, bits, "hash", tf_graph=True))(x)
    for a, b in zip(want[:3], got[:3], strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("n", [5, 1000, 70_001])
def test_quantize_rows_equals_quantize_per_row_and_flags_non_finite(n):
    from fedkernels import _quantize

    rng = np.random.default_rng(n)
    x = rng.normal(size=(4, n)).astype(np.float32)
    x[1, n // 2] = np.nan
    x[3, -1] = np.inf
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(3), i))(jnp.arange(4))
    q, finite = jax.jit(lambda a, k: _quantize.quantize_rows(a, k, 8))(jnp.asarray(x), keys)
    np.testing.assert_array_equal(np.asarray(finite), [True, False, True, False])
    for row in (0, 2):
        want = fk.quantize(jnp.asarray(x[row]), keys[row], bits=8)
        np.testing.assert_array_equal(np.asarray(q.packed[row]), np.asarray(want.packed))
        assert float(q.minimum[row]) == float(want.minimum)
        assert float(q.maximum[row]) == float(want.maximum)
    assert float(q.minimum[1]) == float(q.maximum[1]) == 0.0  # flagged rows: range [0, 0]


def test_decodes_finite_flags_the_rows_weighted_code_sum_cannot_decode():
    # weighted_code_sum scales codes by (max - min) / levels, which overflows for a range
    # wider than 3.4e38; dequantize decodes every finite range.
    from fedkernels import _quantize

    big = np.float32(3e38)
    x = jnp.array([[-1.0, 2.0], [-big, big], [big / 2, big], [-big, -big / 4]], jnp.float32)
    q = fk.quantize(x, jax.random.PRNGKey(0), bits=8)
    ok = np.asarray(_quantize.decodes_finite(q))
    np.testing.assert_array_equal(ok, [True, False, True, True])
    rows = [jax.tree_util.tree_map(lambda a, c=c: a[c : c + 1], q) for c in range(4)]
    sums = np.stack([np.asarray(_quantize.weighted_code_sum(r, jnp.ones(1))) for r in rows])
    np.testing.assert_array_equal(ok, np.all(np.isfinite(sums), axis=1))
    assert np.all(np.isfinite(np.asarray(fk.dequantize(q))))


# Every width with a few clients; the empty cohort once; many clients with widths of both
# packing paths (1 and 16 divide 32, 11 does not).
_CODE_SUM_CASES = [(8, 0)] + [(bits, 3) for bits in (1, 3, 4, 8, 11, 16)] + [
    (bits, 23) for bits in (1, 11, 16)
]


@pytest.mark.parametrize("bits,c", _CODE_SUM_CASES)
def test_weighted_code_sum_equals_float64_reference(bits, c):
    from fedkernels import _quantize

    rng = np.random.default_rng(bits * 100 + c)
    n = 1000 + bits  # not a multiple of 32
    x = (rng.normal(size=(c, n)) * rng.uniform(0.1, 10, size=(c, 1))).astype(np.float32)
    # Under jit: eagerly, each of quantize's ops would compile for each new shape.
    q = jax.jit(fk.quantize, static_argnums=2)(jnp.asarray(x), jax.random.PRNGKey(bits), bits)
    weights = rng.uniform(0.0, 2.0, size=c).astype(np.float32)
    if c:
        weights[0] = 0.0  # a zero weight adds nothing
    got = jax.jit(_quantize.weighted_code_sum)(q, jnp.asarray(weights))
    decoded = np.asarray(jax.jit(fk.dequantize)(q), np.float64)
    want = weights.astype(np.float64) @ decoded if c else np.zeros(n)
    assert got.shape == (n,) and got.dtype == jnp.float32
    scale = np.abs(decoded).max() * max(weights.sum(), 1) if c else 1.0
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=0, atol=1e-6 * scale)
    # Integer coefficients: the exact integer code sum (the shared-range server).
    include = (np.arange(c) % 3 != 1).astype(np.int32)
    codes = np.asarray(jax.jit(fk.Quantized.codes)(q), np.int64)
    got_int = jax.jit(_quantize.code_row_sum, static_argnums=(1, 2))(
        q.packed, bits, n, jnp.asarray(include))
    assert got_int.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got_int), include @ codes if c else np.zeros(n))


def test_finite_range_extremes_in_every_slice_position():
    from fedkernels import _quantize

    block = _quantize._RANGE_FANIN * _quantize._RANGE_LANES
    n = block * 600 + 5  # two tree levels plus a tail
    assert n >= _quantize._RANGE_MIN_SIZE
    base = np.zeros(n, np.float32)
    run = jax.jit(_quantize._finite_range)
    lanes = [_quantize._RANGE_LANES - 1, _quantize._RANGE_LANES, block - 1, block, block * 64]
    for pos in [0, 1, *lanes, n // 2, n - 6, n - 5, n - 1]:
        x = base.copy()
        x[pos], x[(pos + 1) % n] = -3.0, 5.0
        lo, hi = run(jnp.asarray(x))
        assert (float(lo), float(hi)) == (-3.0, 5.0), pos


@pytest.mark.parametrize("prng", ["threefry", "hash"])
def test_non_finite_policy_under_jit_large_rows(prng):
    # Long rows take the tree path of `_finite_range`; the policy must not change with length.
    rng = np.random.default_rng(5)
    x = rng.uniform(-2.0, 3.0, size=(2, 50_001)).astype(np.float32)
    x[:, 17], x[:, 40_000], x[:, -1], x[1, 3] = np.inf, -np.inf, np.nan, -np.inf
    q = jax.jit(lambda x: fk.quantize(x, jax.random.PRNGKey(0), bits=8, prng=prng))(x)
    finite = np.where(np.isfinite(x), x, np.nan)
    np.testing.assert_array_equal(np.asarray(q.minimum), np.nanmin(finite, axis=1))
    np.testing.assert_array_equal(np.asarray(q.maximum), np.nanmax(finite, axis=1))
    codes = np.asarray(q.codes())
    np.testing.assert_array_equal(codes[:, 17], [255, 255])
    np.testing.assert_array_equal(codes[:, [40_000, -1]], 0)
    assert codes[1, 3] == 0
    decoded = np.asarray(fk.dequantize(q), np.float64)
    ok = np.isfinite(x)
    step = (np.asarray(q.maximum) - np.asarray(q.minimum))[:, None] / 255
    assert np.all(np.abs(decoded - x)[ok] <= np.broadcast_to(step, x.shape)[ok] * (1 + 1e-4))


def _np_codes(x, u, bits):
    """Reference codes of the "threefry" stream (`floor(x') + [u < frac]`), and where the
    comparison is too close to call (XLA's x' may be an ulp or two off NumPy's)."""
    lo = x.min(-1, keepdims=True)
    hi = x.max(-1, keepdims=True)
    span = hi - lo
    scaled = (x - lo) / np.where(span > 0, span, np.float32(1)) * np.float32(2**bits - 1)
    lower = np.floor(scaled)
    frac = scaled - lower
    close = np.abs(u - frac) <= 4 * np.spacing(np.maximum(scaled, np.float32(1)))
    close |= frac < 4 * np.spacing(np.maximum(scaled, np.float32(1)))
    return (lower + (u < frac)).astype(np.uint32), close


def _np_hash_codes(x, key, bits):
    """Reference codes of the "hash" stream, and where XLA's float32 x' (which may be an ulp
    or two off NumPy's: XLA:CPU may divide through a reciprocal) could change the code."""
    fields = ref.hash_fields(np.asarray(jax.random.key_data(key)), x.shape, bits)
    field_bits = 15
    lo = x.min(-1, keepdims=True)
    hi = x.max(-1, keepdims=True)
    span = hi - lo
    top = np.float32((2**bits - 1) * 2**field_bits)
    scaled = np.clip((x - lo) * (top / np.where(span > 0, span, np.float32(1))), 0, top)
    want = ref.hash_codes(scaled, fields, bits)
    wiggle = 4 * np.spacing(np.maximum(scaled, np.float32(1)))
    close = ref.hash_codes(np.clip(scaled - wiggle, 0, top), fields, bits) != ref.hash_codes(
        np.clip(scaled + wiggle, 0, top), fields, bits
    )
    return want, close


def _assert_codes(packed, want, close, bits):
    got = np.asarray(fk._quantize.unpack_codes(jnp.asarray(packed), bits, want.shape[-1]))
    differ = got != want
    assert not np.any(differ & ~close), np.argwhere(differ & ~close)[:5]
    assert np.all(np.abs(got.astype(np.int64) - want)[differ] == 1)
    rows = close.size // close.shape[-1]
    assert np.sum(close) <= 2 * rows + 0.1 * close.size  # the rows' min and max, and few more
    if not np.any(differ):  # then the layout must be exactly the documented one
        np.testing.assert_array_equal(packed, ref.pack_codes(want, bits))


def _keys():
    return [jax.random.PRNGKey(5), jax.random.fold_in(jax.random.key(9), 3)]


@pytest.mark.parametrize("key", _keys(), ids=["raw", "typed"])
def test_numpy_threefry_fold_in_matches_jax(key):
    data = np.asarray(jax.random.key_data(key))
    for salt in (0, 1, 0x48415348, 2**32 - 1):
        np.testing.assert_array_equal(
            ref.fold_in(data, salt), np.asarray(jax.random.key_data(jax.random.fold_in(key, salt)))
        )


@pytest.mark.parametrize("bits", [1, 8, 13, 16])
@pytest.mark.parametrize("key", _keys(), ids=["raw", "typed"])
def test_hash_fields_equal_the_numpy_generator_bit_for_bit(bits, key):
    # The stream is defined from the key data by NumPy code alone (threefry fold_in, then
    # lowbias32 of a counter), so a key gives the same fields, hence codes, on every jax.
    for shape in [(1,), (75,), (3, 64), (2, 3, 33)]:
        want = ref.hash_fields(np.asarray(jax.random.key_data(key)), shape, bits)
        got = fk._quantize.hash_fields(key, shape, bits)
        np.testing.assert_array_equal(np.asarray(got), want)


# Every width on the batch-and-padding shape (2, 3, 33); every shape with widths of both
# paths (fused: 1, 8, 16 divide 32; generic: 3, 13). Each case is a compilation of its own.
_HASH_CASES = [(bits, (2, 3, 33)) for bits in range(1, 17)] + [
    (bits, shape)
    for bits in (1, 3, 8, 13, 16)
    for shape in [(1,), (75,), (3, 64), (1037,)]
]


@pytest.mark.parametrize("bits,shape", _HASH_CASES)
def test_hash_codes_match_numpy_reference_exactly(bits, shape):
    # The fused word-by-word path (bits dividing 32) and the generic path must both produce
    # exactly the documented stream and formula, including padding and batch rows.
    rng = np.random.default_rng(bits * 100 + len(shape))
    x = (rng.normal(size=shape) * 3).astype(np.float32)
    key = jax.random.fold_in(jax.random.PRNGKey(5), bits)
    want, close = _np_hash_codes(x, key, bits)
    runs = [jax.jit(fk.quantize, static_argnums=2)]
    if shape == (2, 3, 33):  # eagerly once per bits (batch rows and padding): eager compiles
        runs.append(fk.quantize)  # its own ops for every new shape, a second compilation
    for run in runs:
        q = run(jnp.asarray(x), key, bits)
        _assert_codes(np.asarray(q.packed), want, close, bits)


@pytest.mark.parametrize("bits", [2, 8, 16])
def test_hash_codes_on_an_exact_grid_equal_numpy_bit_for_bit(bits):
    # Range [0, 2**bits - 1] and entries on a 2**-6 grid: x' is exact in float32 on any
    # backend, so every packed word must equal the NumPy reference's.
    levels = 2**bits - 1
    rng = np.random.default_rng(bits)
    x = (rng.integers(0, levels * 64, size=(2, 200)) / 64).astype(np.float32)
    x[:, 0], x[:, 1] = 0.0, levels
    key = jax.random.PRNGKey(bits)
    want, _ = _np_hash_codes(x, key, bits)
    packed = np.asarray(jax.jit(fk.quantize, static_argnums=2)(jnp.asarray(x), key, bits).packed)
    np.testing.assert_array_equal(packed, ref.pack_codes(want, bits))


@pytest.mark.parametrize("bits", [3, 8])
def test_threefry_codes_match_numpy_reference_exactly(bits):
    x = np.random.default_rng(9).normal(size=(2, 70)).astype(np.float32)
    key = jax.random.PRNGKey(4)
    u = np.asarray(jax.random.uniform(key, x.shape, jnp.float32))
    q = fk.quantize(x, key, bits, prng="threefry")
    _assert_codes(np.asarray(q.packed), *_np_codes(x, u, bits), bits)


def test_hash_fields_of_zero_rows_are_empty():
    for shape, bits in [((0, 5), 8), ((2, 0, 40), 5)]:
        fields = fk._quantize.hash_fields(jax.random.PRNGKey(0), shape, bits)
        assert fields.shape == shape and fields.dtype == jnp.uint32


@pytest.mark.parametrize("bits", [3, 8, 16])
def test_hash_fields_are_uniform_in_every_field_position(bits):
    # Each field position of a word (low / high half) is uniform: chi-square over 64 bins of
    # its top 6 bits, 63 degrees of freedom (sd 11.2). Which half an entry gets follows its
    # slot in the packed layout (planar at 8 and 16 bits, the stream at 3).
    n = 1 << 18
    r = np.asarray(fk._quantize.hash_fields(jax.random.PRNGKey(8), (n,), bits))
    half = ref.code_slots(n, bits) % 2
    for k in range(2):
        counts = np.bincount(r[half == k] >> (fk._quantize.FIELD_BITS - 6), minlength=64)
        expected = counts.sum() / 64
        assert np.sum((counts - expected) ** 2 / expected) < 63 + 7 * 11.2, k


def _round_ups(bits, keys, n=1024):
    """Whether each code rounded up, for x' = j + 1/2 (P(up) = 1/2 exactly): [keys, n] +-1."""
    levels = 2**bits - 1
    x = (np.arange(n) % levels + 0.5).astype(np.float32)
    x[0], x[1] = 0.0, levels  # pin the range: x' = x
    codes = jax.jit(jax.vmap(lambda k: fk.quantize(x, k, bits).codes()))(
        keys
    )
    up = np.asarray(codes, np.float64) - np.floor(x)
    assert np.all((up[:, 2:] == 0) | (up[:, 2:] == 1))
    return 2 * up[:, 2:] - 1


@pytest.mark.parametrize("bits", [8, 16])
def test_no_correlation_between_neighbouring_codes_or_between_clients(bits):
    # 256 clients' keys fold_in(key, c) with consecutive ids, 1022 codes each: the round-up
    # signs (+-1, mean 0, variance 1) are uncorrelated at lags 1..4 (codes sharing a hash
    # word), 31, 32 and 33 (neighbouring words and packed words), and between consecutive
    # clients: each mean product lies within 5 standard errors (1 / sqrt(count)) of 0.
    key = jax.random.PRNGKey(17)
    keys = jax.vmap(lambda c: jax.random.fold_in(key, c))(jnp.arange(256))
    s = _round_ups(bits, keys)
    assert abs(s.mean()) < 5 / np.sqrt(s.size)
    for lag in (1, 2, 3, 4, 31, 32, 33):
        products = s[:, :-lag] * s[:, lag:]
        assert abs(products.mean()) < 5 / np.sqrt(products.size), lag
    between = s[:-1] * s[1:]
    assert abs(between.mean()) < 5 / np.sqrt(between.size)
    # Not vacuous: the same key gives identical signs (product 1).
    assert (_round_ups(bits, keys[:2]) == s[:2]).all()


@pytest.mark.parametrize("bits", [3, 8, 16])
def test_hash_rounding_is_unbiased_per_position_over_keys(bits):
    # x' = j + f with f on a fine grid: over 400 keys the mean code is x' within 5 standard
    # errors per position (sd of one code <= 1/2), and the mean over all positions of
    # (code - x') within 5 standard errors of the pooled mean. The documented bias bound
    # (2**-16 of a step) is far below what 400 keys resolve.
    levels = 2**bits - 1
    n = 512
    rng = np.random.default_rng(bits)
    x = (rng.integers(0, levels, size=n) + rng.random(n)).astype(np.float32)
    x[0], x[1] = 0.0, levels
    keys = jax.random.split(jax.random.PRNGKey(23), 400)
    codes = jax.jit(jax.vmap(lambda k: fk.quantize(x, k, bits).codes()))(
        keys
    )
    error = np.asarray(codes, np.float64) - x.astype(np.float64)
    assert np.all(np.abs(error) < 1)
    z = np.abs(error.mean(0)) / (0.5 / np.sqrt(len(keys)))
    assert z.max() < 5.0, z.max()
    assert abs(error.mean()) < 5 * 0.5 / np.sqrt(error.size)


_F32_MAX = float(np.finfo(np.float32).max)


def _check_one_step_and_floor_or_ceil(x, q, bits, decode=fk.dequantize):
    """Codes floor/ceil of x' and decodes within one step, all in float64 (no overflow)."""
    x64 = np.asarray(x, np.float64)
    lo = np.asarray(q.minimum, np.float64)[..., None]
    hi = np.asarray(q.maximum, np.float64)[..., None]
    np.testing.assert_array_equal(lo, x64.min(-1, keepdims=True))
    np.testing.assert_array_equal(hi, x64.max(-1, keepdims=True))
    levels = 2**bits - 1
    scaled = (x64 - lo) / np.where(hi > lo, hi - lo, 1.0) * levels
    codes = np.asarray(q.codes()).astype(np.float64)
    tol = 1e-3
    assert np.all(codes >= np.floor(scaled - tol)) and np.all(codes <= np.ceil(scaled + tol))
    decoded = np.asarray(decode(q), np.float64)
    assert np.all(np.isfinite(decoded))
    assert np.all((decoded >= lo) & (decoded <= hi))
    step = (hi - lo) / levels
    assert np.all(np.abs(decoded - x64) <= step * (1 + 1e-4) + 1e-45)
    return decoded


@pytest.mark.parametrize("run", RUNNERS.values(), ids=RUNNERS.keys())
@pytest.mark.parametrize("bits", [1, 5, 8, 16])
def test_ranges_wider_than_float32_and_tiny_ranges_stay_finite_and_within_one_step(run, bits):
    # max - min overflows float32 (rows 0 to 2), or levels / (max - min) does (rows 3, 4:
    # ranges near the smallest normal float32; XLA:CPU flushes subnormals to zero, so none
    # here): no NaN or Inf, codes still floor/ceil of x'.
    rows = np.array(
        [
            [-2e38, 2e38, 0.0, 1e38, -1.5e38, 3.0],
            [-_F32_MAX, _F32_MAX, _F32_MAX, -_F32_MAX, 0.5, -1e30],
            [-3e38, 1e38, 2e38, 3.3e38, -1e38, 0.0],
            [1e-37, 1.3e-37, 1.1e-37, 1.7e-37, 2e-37, 1.5e-37],
            [-2e-38, 3e-38, 0.0, 1.5e-38, -1.9e-38, 2.5e-38],
        ],
        np.float32,
    )
    q = run(fk.quantize, jnp.asarray(rows), jax.random.PRNGKey(bits), bits=bits)
    _check_one_step_and_floor_or_ceil(rows, q, bits)
    _check_one_step_and_floor_or_ceil(rows, q, bits, decode=jax.jit(fk.dequantize))


def test_issue_example_wide_range_round_trips_exactly():
    q = fk.quantize(jnp.array([-2e38, 2e38]), jax.random.PRNGKey(0))
    np.testing.assert_array_equal(np.asarray(fk.dequantize(q)), np.float32([-2e38, 2e38]))


def test_wide_range_vmap_and_unbiased_over_keys():
    # Over 400 keys the mean decode of a row spanning -3e38..3e38 is x within 5 standard errors
    # (the error of one decode is at most a step and has mean zero).
    x = np.array([-3e38, 3e38, 1.1e38, -2.05e38, 0.0, 7e37, 2.9e38, -1e36], np.float32)
    keys = jax.random.split(jax.random.PRNGKey(11), 400)
    q = jax.jit(jax.vmap(lambda k: fk.quantize(x, k, bits=2)))(keys)
    decoded = np.asarray(fk.dequantize(q), np.float64)
    assert np.all(np.isfinite(decoded))
    step = (3e38 - -3e38) / 3
    z = np.abs(decoded.mean(0) - x.astype(np.float64)) / (step / (2 * np.sqrt(len(keys))))
    assert z.max() < 5.0, z


def test_float64_beyond_float32_range_raises_eagerly_and_follows_inf_policy_under_jit():
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        key = jax.random.PRNGKey(0)
        x = jnp.array([1.0, 1e300, 2.0, -4e38], jnp.float64)
        with pytest.raises(ValueError, match=r"x must be within float32 range .*got 1e\+300 "
                           r"\(2 entries beyond\)"):
            fk.quantize(x, key)
        # Under jit the values are not known: the float32 cast makes them +-Inf, which follow
        # the documented non-finite rule (+Inf encodes as the maximum, -Inf as the minimum).
        q = jax.jit(lambda a: fk.quantize(a, key))(x)
        assert q.minimum.dtype == jnp.float32
        assert (float(q.minimum), float(q.maximum)) == (1.0, 2.0)
        np.testing.assert_array_equal(np.asarray(q.codes())[[1, 3]], [255, 0])
        # Within float32 range, float64 input quantizes as its float32 cast does.
        inside = np.random.default_rng(3).normal(size=(2, 70)) * 1e30
        got = fk.quantize(jnp.asarray(inside), key, bits=6)
        want = fk.quantize(jnp.asarray(inside.astype(np.float32)), key, bits=6)
        np.testing.assert_array_equal(np.asarray(got.packed), np.asarray(want.packed))
        assert got.minimum.dtype == jnp.float32
        decoded = fk.dequantize(got)
        assert decoded.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(decoded)))
    finally:
        jax.config.update("jax_enable_x64", previous)


def test_wide_and_tiny_ranges_convert_with_jax2tf_without_xla_ops():
    # fedkernels.tff stages this kernel with jax2tf (enable_xla=False): the row scaling must
    # convert and give the same codes there.
    tf = pytest.importorskip("tensorflow")
    from jax.experimental import jax2tf

    x = np.array(
        [[-2e38, 2e38, 0.0, 1e38] * 10, [0.0, 2e-38, 3e-38, 7e-38] * 10, [1.0, 2.0, 3.0, 4.5] * 10],
        np.float32,
    )

    def round_trip(a, seed):
        q = fk.quantize(a, jax.random.PRNGKey(seed), 8)
        return q.packed, fk.dequantize(q)

    converted = tf.function(
        jax2tf.convert(round_trip, native_serialization=False, enable_xla=False,
                       with_gradient=False),
        autograph=False,
    )
    got = converted(tf.constant(x), tf.constant(np.int32(3)))
    want = round_trip(jnp.asarray(x), np.int32(3))
    np.testing.assert_array_equal(got[0].numpy(), np.asarray(want[0]))  # the codes: exact
    decoded = got[1].numpy()
    assert np.all(np.isfinite(decoded))
    # TensorFlow may round the decode differently, by an ulp of the row's range.
    span = x.max(1, keepdims=True).astype(np.float64) - x.min(1, keepdims=True)
    error = np.abs(decoded.astype(np.float64) - np.asarray(want[1], np.float64))
    assert np.all(error <= 1e-6 * span)
