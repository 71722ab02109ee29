import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedkernels as fk
from tests import _reference as ref
from tests._runners import RUNNERS


def _sparse_updates(rng, shape, density=0.3):
    x = rng.normal(size=shape).astype(np.float32)
    return np.where(rng.uniform(size=shape) < density, x, 0).astype(np.float32)


@pytest.mark.parametrize("run", RUNNERS.values(), ids=RUNNERS.keys())
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("shape", [(9, 200), (4, 3, 50), (1, 7)])
def test_matches_float64_reference(run, weighted, shape):
    rng = np.random.default_rng(len(shape) + weighted)
    x = _sparse_updates(rng, shape)
    weights = rng.uniform(0, 2, size=shape[0]).astype(np.float32) if weighted else None
    mean = run(fk.masked_mean, x, weights)
    expected, num, den = ref.masked_mean(x, weights)
    assert mean.shape == shape[1:] and mean.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(mean), expected, rtol=2e-6, atol=1e-6)
    numerator, denominator = run(fk.masked_sum, x, weights)
    np.testing.assert_allclose(np.asarray(numerator), num, rtol=2e-6, atol=1e-6)
    if weighted:
        np.testing.assert_allclose(np.asarray(denominator), den, rtol=2e-6)
    else:
        assert denominator.dtype == jnp.int32
        np.testing.assert_array_equal(np.asarray(denominator), den)


def test_dense_updates_equal_plain_weighted_mean():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(6, 100)).astype(np.float32)
    w = rng.uniform(0.5, 2, size=6)
    expected = (w[:, None] * x.astype(np.float64)).sum(0) / w.sum()
    np.testing.assert_allclose(np.asarray(fk.masked_mean(x, w)), expected, rtol=1e-5, atol=1e-6)


def test_explicit_mask_counts_zero_values():
    x = np.array([[0.0, 1.0], [2.0, 3.0]], np.float32)
    mask = np.array([[True, False], [True, True]])
    np.testing.assert_allclose(np.asarray(fk.masked_mean(x, mask=mask)), [1.0, 3.0])


def test_non_finite_entries_never_contribute():
    x = np.array([[np.nan, 1.0, np.inf], [2.0, -np.inf, np.nan]], np.float32)
    mean = fk.masked_mean(x, weights=np.array([1.0, 3.0]))
    np.testing.assert_array_equal(np.asarray(mean), [2.0, 1.0, 0.0])
    assert np.all(np.isfinite(np.asarray(mean)))


def test_no_contributors_zero_weights_and_empty_cohort():
    x = np.zeros((3, 4), np.float32)
    np.testing.assert_array_equal(np.asarray(fk.masked_mean(x)), np.zeros(4))
    x = np.ones((2, 4), np.float32)
    np.testing.assert_array_equal(np.asarray(fk.masked_mean(x, weights=[0.0, 0.0])), np.zeros(4))
    empty = fk.masked_mean(jnp.zeros((0, 5)))
    np.testing.assert_array_equal(np.asarray(empty), np.zeros(5))
    numerator, denominator = fk.masked_sum(jnp.zeros((0, 5)))
    assert denominator.dtype == jnp.int32 and not np.any(np.asarray(denominator))


def test_low_precision_input_keeps_dtype():
    x = np.random.default_rng(4).normal(size=(5, 10)).astype(jnp.bfloat16)
    mean = fk.masked_mean(x)
    assert mean.dtype == jnp.bfloat16
    expected, _, _ = ref.masked_mean(np.asarray(x, np.float32))
    np.testing.assert_allclose(np.asarray(mean, np.float32), expected, rtol=1e-2)


def test_vmap_over_groups_and_no_retrace():
    x = _sparse_updates(np.random.default_rng(5), (3, 8, 20))
    out = jax.vmap(fk.masked_mean)(x)
    for g in range(3):
        np.testing.assert_allclose(np.asarray(out[g]), ref.masked_mean(x[g])[0], rtol=1e-6)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def aggregate(x, w):
        return fk.masked_mean(x, w)

    for r in range(3):
        aggregate(x[r], jnp.ones(8))


def test_errors():
    x = jnp.ones((3, 4))
    with pytest.raises(TypeError, match="x must have a floating dtype, got int32"):
        fk.masked_mean(jnp.ones((3, 4), jnp.int32))
    with pytest.raises(ValueError, match=r"weights must have shape \(3,\).*got \(4,\)"):
        fk.masked_mean(x, weights=jnp.ones(4))
    with pytest.raises(ValueError, match="weights must be >= 0, got -2.0"):
        fk.masked_mean(x, weights=jnp.array([1.0, -2.0, 1.0]))
    with pytest.raises(ValueError, match="weights must be finite, got inf"):
        fk.masked_mean(x, weights=jnp.array([1.0, jnp.inf, 1.0]))
    with pytest.raises(TypeError, match="mask must be boolean, got dtype float32"):
        fk.masked_mean(x, mask=jnp.ones((3, 4), jnp.float32))
    with pytest.raises(ValueError, match=r"mask must have shape \(3, 4\)"):
        fk.masked_mean(x, mask=jnp.ones((3, 5), bool))
    with pytest.raises(ValueError, match=r"x must be \[C, \.\.\.\]"):
        fk.masked_mean(jnp.float32(1.0))


def _sequential_float32_reference(x, weights=None, mask=None):
    """masked_sum as float32 row-by-row accumulation in client order (the kernel's order)."""
    x = np.asarray(x, np.float32)
    contributes = np.isfinite(x) & ((x != 0) if mask is None else np.asarray(mask))
    numerator = np.zeros(x.shape[1:], np.float32)
    denominator = np.zeros(x.shape[1:], np.int32 if weights is None else np.float32)
    for c in range(x.shape[0]):
        row = np.where(contributes[c], x[c], np.float32(0))
        if weights is None:
            numerator = numerator + row
            denominator = denominator + contributes[c]
        else:
            w = np.float32(weights[c])
            numerator = numerator + w * row
            denominator = denominator + np.where(contributes[c], w, np.float32(0))
    return numerator, denominator


def _with_non_finite(rng, shape):
    x = _sparse_updates(rng, shape, density=0.5)
    flat = x.reshape(-1)
    spots = rng.choice(flat.size, size=min(flat.size, 40), replace=False)
    flat[spots[0::3]] = np.nan
    flat[spots[1::3]] = np.inf
    flat[spots[2::3]] = -np.inf
    return x


# C around the rows-per-step (1, 9, 10, 23), d below, at and above the block, with and without a
# divisor of d near the block (8193 and 8209 leave a tail block; 15000 splits into 2 x 7500).
# Under jit for every shape; eagerly (op by op, a compilation per shape) for one shape per
# path: a tail block, short rows, a single client.
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize(
    "shape, run",
    [
        pytest.param(shape, RUNNERS[mode], id=f"{mode}-{'x'.join(map(str, shape))}")
        for shape in [(1, 8193), (9, 8209), (10, 15000), (23, 8192), (23, 3, 5), (2, 1), (11,)]
        for mode in (["jit", "eager"] if shape in [(9, 8209), (23, 3, 5), (11,)] else ["jit"])
    ],
)
def test_blocked_sums_equal_client_order_float32_accumulation(run, weighted, shape):
    rng = np.random.default_rng(sum(shape) + weighted)
    x = _with_non_finite(rng, shape)
    weights = rng.uniform(0, 2, size=shape[0]).astype(np.float32) if weighted else None
    if weighted:
        weights[0] = 0.0
    numerator, denominator = run(fk.masked_sum, x, weights)
    want_numerator, want_denominator = _sequential_float32_reference(x, weights)
    assert denominator.dtype == (jnp.float32 if weighted else jnp.int32)
    np.testing.assert_array_equal(np.asarray(denominator), want_denominator)
    if weighted:  # w * x + acc may compile to a fused multiply-add: allow one rounding
        np.testing.assert_allclose(np.asarray(numerator), want_numerator, rtol=1e-6, atol=1e-6)
    else:
        np.testing.assert_array_equal(np.asarray(numerator), want_numerator)
    mean = run(fk.masked_mean, x, weights)
    expected, _, _ = ref.masked_mean(np.where(np.isfinite(x), x, 0), weights)
    np.testing.assert_allclose(np.asarray(mean), expected, rtol=2e-6, atol=1e-6)
    assert np.all(np.isfinite(np.asarray(mean)))


def test_explicit_mask_across_blocks_and_tail():
    rng = np.random.default_rng(7)
    x = _with_non_finite(rng, (13, 8209))
    mask = rng.uniform(size=x.shape) < 0.7
    numerator, denominator = fk.masked_sum(x, mask=mask)
    want_numerator, want_denominator = _sequential_float32_reference(x, mask=mask)
    np.testing.assert_array_equal(np.asarray(numerator), want_numerator)
    np.testing.assert_array_equal(np.asarray(denominator), want_denominator)


def test_float64_stays_float64_and_exact():
    rng = np.random.default_rng(8)
    x = _with_non_finite(rng, (12, 8209)).astype(np.float64)
    x[3, :5] = 1e-300  # representable in float64 only
    numerator, denominator = fk.masked_sum(jnp.asarray(x))
    mean = fk.masked_mean(jnp.asarray(x))
    if not jax.config.jax_enable_x64:
        assert mean.dtype == jnp.float32  # x was converted to float32 on the way in
        return
    assert numerator.dtype == mean.dtype == jnp.float64 and denominator.dtype == jnp.int32
    finite = np.where(np.isfinite(x), x, 0.0)
    want = np.zeros(x.shape[1], np.float64)
    for row in finite:
        want = want + row
    np.testing.assert_array_equal(np.asarray(numerator), want)


def test_small_blocks_and_steps_agree_with_scan_fallback(monkeypatch):
    from fedkernels import _masked

    rng = np.random.default_rng(9)
    x = _with_non_finite(rng, (13, 4, 25))
    weights = rng.uniform(0, 2, size=13).astype(np.float32)
    fallback = {}
    monkeypatch.setattr(_masked, "_MAX_EXACT_FLOAT32_COUNT", 4)  # 13 clients > 4: scan path
    for w in (None, weights):
        fallback[w is None] = [np.asarray(v) for v in fk.masked_sum(x, w)]
    monkeypatch.setattr(_masked, "_MAX_EXACT_FLOAT32_COUNT", 2**24)
    monkeypatch.setattr(_masked, "_BLOCK", 16)  # d = 100: blocks of 16 (no divisor > 8) + tail 4
    monkeypatch.setattr(_masked, "_ROWS_PER_STEP", 3)  # 4 loop steps and one remainder row
    for w in (None, weights):
        numerator, denominator = fk.masked_sum(x, w)
        want_numerator, want_denominator = fallback[w is None]
        assert denominator.dtype == want_denominator.dtype
        np.testing.assert_array_equal(np.asarray(denominator), want_denominator)
        np.testing.assert_allclose(np.asarray(numerator), want_numerator, rtol=1e-6, atol=1e-7)
        got, _ = _sequential_float32_reference(x, w)
        if w is None:
            np.testing.assert_array_equal(np.asarray(numerator), got)


def _vmapped(f, *args):
    """`f` under `vmap` over a group axis of size 1 (the group's result)."""
    batched = [None if a is None else np.asarray(a)[None] for a in args]
    return jax.tree_util.tree_map(lambda r: r[0], jax.vmap(f)(*batched))


OVERFLOW_RUNNERS = {**RUNNERS, "vmap": _vmapped}
# The rescue's own cases: compiled whole (jit), and under vmap where both branches run.
RESCUE_RUNNERS = {"jit": RUNNERS["jit"], "vmap": _vmapped}


def _float64_sums(x, weights=None):
    x = np.asarray(x, np.float64)
    w = np.ones(x.shape[0]) if weights is None else np.asarray(weights, np.float64)
    contributes = np.isfinite(x) & (x != 0)
    w_c = np.where(contributes, w.reshape(-1, *([1] * (x.ndim - 1))), 0.0)
    return (w_c * np.where(contributes, x, 0)).sum(0), w_c.sum(0)


@pytest.mark.parametrize("run", OVERFLOW_RUNNERS.values(), ids=OVERFLOW_RUNNERS.keys())
def test_overflowing_sums_give_the_mean_and_saturate(run):
    big = np.finfo(np.float32).max
    # Column 0 overflows at the end, column 1 in the middle of client order, column 2 not.
    x = np.array([[3e38, 3e38, 1.5], [3e38, 3e38, 2.5], [3e38, -3e38, 0.0]], np.float32)
    mean = np.asarray(run(fk.masked_mean, x, None))
    np.testing.assert_allclose(mean, [3e38, 1e38, 2.0], rtol=1e-6)
    numerator, count = run(fk.masked_sum, x, None)
    np.testing.assert_allclose(np.asarray(numerator), [big, 3e38, 4.0], rtol=1e-6)
    assert np.asarray(numerator)[0] == big  # saturated, not inf
    np.testing.assert_array_equal(np.asarray(count), [3, 3, 2])
    numerator, _ = run(fk.masked_sum, -x[:2], None)
    assert np.asarray(numerator)[0] == -big
    # Weights whose sum overflows: only their ratios matter for the mean.
    w = np.array([2e38, 2e38, 1e38], np.float32)
    mean = np.asarray(run(fk.masked_mean, x, w))
    want = _float64_sums(x, w)
    np.testing.assert_allclose(mean, want[0] / want[1], rtol=1e-6)
    numerator, denominator = run(fk.masked_sum, x, w)
    np.testing.assert_array_equal(np.asarray(numerator), [big, big, big])
    np.testing.assert_array_equal(np.asarray(denominator), [big, big, big])
    mean = np.asarray(run(fk.masked_mean, np.ones((2, 1), np.float32), np.array([2e38, 2e38])))
    np.testing.assert_array_equal(mean, [1.0])


@pytest.mark.parametrize("run", RESCUE_RUNNERS.values(), ids=RESCUE_RUNNERS.keys())
def test_a_mean_of_the_largest_float_is_not_inf(run):
    """Three clients sending float32's largest value with weight 0.7: the rescued ratio
    rounded to 4 * 2**126 = Inf; it is the largest float (clipped: a mean lies within its
    terms' range)."""
    big = np.finfo(np.float32).max
    for c, w in ((3, 0.7), (7, 0.3), (2, 1.0)):
        x = np.full((c, 2), big, np.float32)
        x[:, 1] *= -1
        mean = np.asarray(run(fk.masked_mean, x, np.full((c,), w, np.float32)))
        np.testing.assert_array_equal(mean, [big, -big])


@pytest.mark.parametrize("run", RESCUE_RUNNERS.values(), ids=RESCUE_RUNNERS.keys())
def test_a_light_client_alone_in_an_overflowing_column_keeps_its_weight(run):
    """The rescue pass scaled every weight by the largest one: weight 3 beside 2e38 became
    3 * 2**-132, flushed to 0, and the column's mean came out 0. Weights are now scaled per
    column by the largest weight contributing there."""
    x = np.array([[2.8e38, 1.0], [0.0, 2.0]], np.float32)  # client 1 sends nothing in col 0
    w = np.array([3.0, 2e38], np.float32)
    mean = np.asarray(run(fk.masked_mean, x, w))
    want = _float64_sums(x, w)
    np.testing.assert_allclose(mean, want[0] / want[1], rtol=1e-6)
    numerator, denominator = run(fk.masked_sum, x, w)
    big = np.finfo(np.float32).max  # both sums are beyond float32: saturated
    np.testing.assert_array_equal(np.asarray(numerator), [big, big])
    np.testing.assert_allclose(np.asarray(denominator), [3.0, 2e38], rtol=1e-6)


@pytest.mark.parametrize("run", RESCUE_RUNNERS.values(), ids=RESCUE_RUNNERS.keys())
def test_the_largest_product_survives_the_overflow_rescue(run):
    """Weight 2e38 on 1e-30 beside weight 3 on -3e38: scaling weights and values apart
    flushed 3 * 2**-135 to 0 and the mean came out 0; the terms are now scaled by the
    column's largest product. Plus random columns mixing huge and tiny weights and values."""
    x = np.array([[1e-30], [-3e38]], np.float32)
    w = np.array([2e38, 3.0], np.float32)
    want = _float64_sums(x, w)
    np.testing.assert_allclose(np.asarray(run(fk.masked_mean, x, w)), want[0] / want[1],
                               rtol=1e-6)
    numerator, _ = run(fk.masked_sum, x, w)
    np.testing.assert_array_equal(np.asarray(numerator), [-np.finfo(np.float32).max])
    rng = np.random.default_rng(14)
    x = (rng.uniform(-1, 1, (9, 64)) * rng.choice([3.4e38, 1e38, 1.0, 1e-30], (9, 64)))
    x = x.astype(np.float32)
    w = rng.choice([0.1, 3.0, 1e30, 1e-30, 2e38], 9).astype(np.float32)
    numerator, denominator = _float64_sums(x, w)
    mean = np.asarray(run(fk.masked_mean, x, w), np.float64)
    bound = _float64_sums(np.abs(x), w)[0]  # float32 rounding is relative to this
    np.testing.assert_array_less(np.abs(mean - numerator / denominator),
                                 1e-5 * bound / denominator)


def test_overflow_leaves_other_coordinates_bit_for_bit():
    rng = np.random.default_rng(12)
    x = _with_non_finite(rng, (23, 8209))
    w = rng.uniform(0, 2, size=23).astype(np.float32)
    plain = [np.asarray(a) for a in (fk.masked_mean(x, w), *fk.masked_sum(x, w))]
    x[:, 17] = 3e38  # one coordinate overflows: the scaled pass runs, for it alone
    mixed = [np.asarray(a) for a in (fk.masked_mean(x, w), *fk.masked_sum(x, w))]
    others = np.arange(x.shape[1]) != 17
    for got, want in zip(mixed, plain, strict=True):
        np.testing.assert_array_equal(got[others], want[others])
    np.testing.assert_allclose(mixed[0][17], 3e38, rtol=1e-6)


@pytest.mark.parametrize("weighted", [False, True])
def test_finite_inputs_near_the_range_match_float64(weighted):
    rng = np.random.default_rng(13 + weighted)
    x = (rng.uniform(-1, 1, size=(37, 300)) * 3.4e38).astype(np.float32)
    x[:, :100] = rng.normal(size=(37, 100))  # ordinary columns beside
    x[rng.uniform(size=x.shape) < 0.2] = 0.0
    w = (rng.uniform(0, 1, size=37) * 3e38).astype(np.float32) if weighted else None
    mean = np.asarray(fk.masked_mean(x, w), np.float64)
    numerator = np.asarray(fk.masked_sum(x, w)[0], np.float64)
    assert np.all(np.isfinite(mean)) and np.all(np.isfinite(numerator))
    want_num, want_den = _float64_sums(x, w)
    assert np.all(want_den > 0)
    # float32 sums of 37 terms: the error is relative to the sum of the terms' magnitudes.
    bound = _float64_sums(np.abs(x), w)[0]
    np.testing.assert_array_less(np.abs(mean - want_num / want_den), 1e-5 * bound / want_den)
    big = np.finfo(np.float32).max
    np.testing.assert_array_less(
        np.abs(numerator - np.clip(want_num, -big, big)), 1e-5 * bound + 1e-30
    )


def test_bfloat16_near_its_range_gives_the_mean():
    x = jnp.array([[3e38], [3e38]], jnp.bfloat16)
    mean = fk.masked_mean(x)
    assert mean.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(mean, np.float32), np.asarray(x[0], np.float32))


def test_tiny_weights_give_the_mean():
    """Weights matter only relative to each other: tiny normal weights (whose products with x
    are subnormal, which XLA:CPU flushes to 0) give the same mean as weights of 1."""
    x = jnp.array([[0.5, 4.0, 1e-10], [0.5, 0.0, 3e-10]])
    for w in (2e-38, 1e-30):
        got = fk.masked_mean(x, weights=jnp.array([w, w]))
        np.testing.assert_allclose(got, fk.masked_mean(x), rtol=1e-6)
    got = fk.masked_mean(x, weights=jnp.array([1e-30, 3e-30]))
    np.testing.assert_allclose(got, [0.5, 4.0, 2.5e-10], rtol=1e-6)


@pytest.mark.parametrize("run", RESCUE_RUNNERS.values(), ids=RESCUE_RUNNERS.keys())
def test_subnormal_weights_weigh_as_their_ratio(run):
    """XLA on CPU reads subnormal inputs as 0: weights [1e-40, 1e-40] gave a mean of 0."""
    x = np.array([[1.0, 0.0], [3.0, 5.0]], np.float32)
    for w in ([1e-40, 1e-40], [1e-40, 3e-40], [1e-41, 2e-39]):
        w = np.asarray(w, np.float32)
        want = _float64_sums(x, w)
        np.testing.assert_allclose(np.asarray(run(fk.masked_mean, x, w)), want[0] / want[1],
                                   rtol=1e-4)


def test_float64_beyond_float32_is_refused_not_dropped():
    """Without x64, a NumPy float64 1e39 became Inf in the cast and was then dropped as
    non-finite (the mean of [1e39, 1] was 1)."""
    if jax.config.jax_enable_x64:
        pytest.skip("x64 on: float64 holds 1e39")
    with pytest.raises(ValueError, match=r"x holds 1e\+39, beyond float32"):
        fk.masked_mean(np.array([[1e39], [1.0]]))
    with pytest.raises(ValueError, match=r"values holds -1e\+39, beyond float32"):
        fk.scatter_sum(np.array([[-1e39, 2.0]]), np.array([[0, 1]]), 2)
    np.testing.assert_array_equal(fk.masked_mean(np.array([[np.inf], [1.0]])), [1.0])


def test_weights_as_a_list_of_tracers_and_float64_at_the_float32_limit():
    """Review of the narrowing check: a list of traced weights under jit crashed (NumPy was
    asked for its values), and float64 3.4028235e38 (NumPy's print of float32's max, which
    the cast rounds to that max) was refused."""
    x = jnp.array([[1.0, 2.0], [3.0, 4.0]])
    mean = jax.jit(lambda a, b: fk.masked_mean(x, weights=[a, b]))(1.0, 3.0)
    np.testing.assert_allclose(mean, [2.5, 3.5])
    mean = fk.masked_mean(np.array([[3.4028235e38], [0.0]]))
    np.testing.assert_array_equal(mean, [np.finfo(np.float32).max])
    with pytest.raises(TypeError, match="weights must be an array, got list"):
        fk.masked_mean(x, weights=[[1.0], [2.0, 3.0]])


def test_float64_weights_with_x64_keep_their_ratio():
    """float32 x with float64 weights (x64 on): the cast to float32 made 1e300 Inf (mean NaN)
    and 1e-300 zero (mean 0); only the ratio matters."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        x = np.array([[1e38, 1.0], [3e38, 2.0]], np.float32)
        for scale in (1e300, 1e-300):
            mean = fk.masked_mean(x, weights=np.array([1.0, 3.0]) * scale)
            np.testing.assert_allclose(np.asarray(mean), [2.5e38, 1.75], rtol=1e-6)
    finally:
        jax.config.update("jax_enable_x64", previous)


def test_invalid_weights_under_jit_count_as_zero():
    """Under jit weights are not checked (not concrete): a negative, NaN or Inf weight counts as
    0 in masked_mean, masked_sum and scatter_sum, so the other clients' result is unchanged."""
    x = jnp.array([[1.0, 2.0], [3.0, 4.0], [5.0, 0.0]])
    indices = jnp.array([[0, 1], [1, 2], [2, 0]])
    zero = jnp.array([1.0, 0.0, 2.0])
    for fn in (
        lambda w: fk.masked_mean(x, weights=w),
        lambda w: fk.masked_sum(x, weights=w),
        lambda w: fk.scatter_sum(x, indices, 3, weights=w),
    ):
        jitted, want = jax.jit(fn), jax.tree_util.tree_leaves(fn(zero))
        for bad in (jnp.nan, jnp.inf, -jnp.inf, -1.0):
            got = jax.tree_util.tree_leaves(jitted(jnp.array([1.0, bad, 2.0])))
            for a, b in zip(got, want, strict=True):
                np.testing.assert_array_equal(a, b)
