import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedkernels as fk
from tests import _reference as ref
from tests._runners import RUNNERS


@pytest.mark.parametrize("run", RUNNERS.values(), ids=RUNNERS.keys())
@pytest.mark.parametrize(
    "shape,k", [((1000,), 1), ((1000,), 37), ((1000,), 1000), ((3, 4, 257), 20)]
)
def test_matches_reference(run, shape, k):
    x = np.random.default_rng(k).normal(size=shape).astype(np.float32)
    values, indices = run(fk.top_k, x, k=k)
    ref_values, ref_indices = ref.top_k(x, k)
    assert indices.dtype == jnp.int32 and indices.shape == (*shape[:-1], k)
    np.testing.assert_array_equal(np.asarray(indices), ref_indices)
    np.testing.assert_array_equal(np.asarray(values), ref_values)


@pytest.mark.parametrize("run", RUNNERS.values(), ids=RUNNERS.keys())
def test_ties_go_to_the_lower_index(run):
    # Magnitudes drawn from 3 levels with random signs: most selections cut through a tie.
    rng = np.random.default_rng(7)
    x = (rng.integers(1, 4, size=(5, 200)) * rng.choice([-1, 1], size=(5, 200))).astype(np.float32)
    x[0] = 2.0  # all equal: the first k indices
    x[1, ::2] = -0.0
    x[1, 1::2] = 0.0
    for k in (1, 13, 100, 199):
        values, indices = run(fk.top_k, x, k=k)
        ref_values, ref_indices = ref.top_k(x, k)
        np.testing.assert_array_equal(np.asarray(indices), ref_indices)
        np.testing.assert_array_equal(np.asarray(indices[0]), np.arange(k))
        np.testing.assert_array_equal(np.asarray(values), ref_values)


@pytest.mark.parametrize("method", ["auto", "lax"])
def test_non_finite_rank_first(method):
    x = np.array([1.0, np.nan, -np.inf, 5.0, np.inf, -7.0], np.float32)
    _, indices = fk.top_k(x, 3, method=method)
    np.testing.assert_array_equal(np.asarray(indices), [1, 2, 4])  # NaN > Inf, then ascending


def test_low_precision_inputs_rank_by_value():
    x = np.random.default_rng(2).normal(size=300).astype(jnp.bfloat16)
    values, indices = fk.top_k(x, 10)
    assert values.dtype == jnp.bfloat16
    _, ref_indices = ref.top_k(np.asarray(x, np.float32), 10)
    np.testing.assert_array_equal(np.asarray(indices), ref_indices)


def test_vmap_equals_batched():
    x = np.random.default_rng(3).normal(size=(6, 500)).astype(np.float32)
    batched = fk.top_k(x, 25)
    vmapped = jax.vmap(lambda row: fk.top_k(row, 25))(x)
    for a, b in zip(batched, vmapped, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("run", RUNNERS.values(), ids=RUNNERS.keys())
def test_feedback_conservation_is_exact(run):
    rng = np.random.default_rng(11)
    x = rng.normal(size=(4, 777)).astype(np.float32)
    residual = (rng.normal(size=(4, 777)) * 0.1).astype(np.float32)
    values, indices, new_residual = run(fk.top_k_with_feedback, x, residual, k=50)
    acc = x + residual
    sent = fk.scatter(values, indices, 777)
    np.testing.assert_array_equal(np.asarray(sent + new_residual), acc)
    np.testing.assert_array_equal(np.asarray(indices), ref.top_k(acc, 50)[1])
    np.testing.assert_array_equal(
        np.take_along_axis(np.asarray(new_residual), np.asarray(indices), -1), 0
    )
    # Unsent coordinates keep exactly their accumulated value.
    unsent = np.ones_like(acc, bool)
    np.put_along_axis(unsent, np.asarray(indices), False, -1)
    np.testing.assert_array_equal(np.asarray(new_residual)[unsent], acc[unsent])


def test_feedback_over_rounds_sends_everything_eventually():
    # With a constant update, error feedback makes the time-average of what is sent converge to
    # the update (the defining property of EF); without it, small coordinates are never sent.
    rng = np.random.default_rng(5)
    d, k, rounds = 64, 8, 400
    x = rng.normal(size=d).astype(np.float32)
    step = jax.jit(lambda x, r: fk.top_k_with_feedback(x, r, k))
    residual = jnp.zeros(d)
    sent_total = np.zeros(d)
    for _ in range(rounds):
        values, indices, residual = step(x, residual)
        sent_total += np.asarray(fk.scatter(values, indices, d))
    np.testing.assert_allclose(
        sent_total + np.asarray(residual), rounds * x.astype(np.float64), rtol=1e-4
    )
    np.testing.assert_allclose(sent_total / rounds, x, atol=np.abs(x).max() * d / k / rounds * 2)


def test_no_retrace_across_rounds():
    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(x, residual):
        return fk.top_k_with_feedback(x, residual, 10)

    residual = jnp.zeros(100)
    for r in range(4):
        x = jax.random.normal(jax.random.PRNGKey(r), (100,))
        _, _, residual = step(x, residual)


def test_errors():
    x = jnp.ones((2, 10))
    with pytest.raises(ValueError, match=r"k must be in \[1, 10\], got 0"):
        fk.top_k(x, 0)
    with pytest.raises(ValueError, match=r"k must be in \[1, 10\], got 11"):
        fk.top_k(x, 11)
    with pytest.raises(TypeError, match="k must be a static Python int, got 2.5"):
        fk.top_k(x, 2.5)
    with pytest.raises(TypeError, match="x must have a floating dtype, got int32"):
        fk.top_k(jnp.ones(10, jnp.int32), 2)
    with pytest.raises(ValueError, match=r"x must be \[\.\.\., d\] with d >= 1, got shape \(\)"):
        fk.top_k(jnp.float32(1.0), 1)
    with pytest.raises(ValueError, match="method must be one of"):
        fk.top_k(x, 2, method="bogus")
    with pytest.raises(ValueError, match=r"residual must have shape \(2, 10\).*got \(10,\)"):
        fk.top_k_with_feedback(x, jnp.zeros(10), 2)
    with pytest.raises(TypeError, match="residual must have the dtype of x"):
        fk.top_k_with_feedback(x, jnp.zeros((2, 10), jnp.bfloat16), 2)
    with pytest.raises(TypeError, match="k must be a static Python int"):
        jax.jit(lambda x, k: fk.top_k(x, k))(x, 3)


def test_index_width_boundary():
    # Abstract evaluation: no memory is allocated for these lengths.
    limit = 2**31 - 1
    out = jax.eval_shape(lambda x: fk.top_k(x, 3), jax.ShapeDtypeStruct((limit,), jnp.float32))
    assert out[1].shape == (3,) and out[1].dtype == jnp.int32
    with pytest.raises(ValueError, match=r"x has length d=2147483648, more than int32 indices"):
        jax.eval_shape(lambda x: fk.top_k(x, 3), jax.ShapeDtypeStruct((limit + 1,), jnp.float32))
    with pytest.raises(ValueError, match=r"d must be in \[0, 2147483647\], got 2147483648"):
        fk.scatter(jnp.ones(2), jnp.zeros(2, jnp.int32), limit + 1)


@pytest.mark.parametrize("method", ["auto", "lax"])
def test_methods_agree_with_reference_on_ties_and_signed_zeros(method):
    rng = np.random.default_rng(9)
    x = rng.choice([0.0, -0.0, 1.0, -1.0, np.inf, -np.inf, np.nan, 3.0], size=(4, 64))
    x = x.astype(np.float32)
    for k in (1, 5, 32, 64):
        values, indices = fk.top_k(x, k, method=method)
        ref_values, ref_indices = ref.top_k(x, k)
        np.testing.assert_array_equal(np.asarray(indices), ref_indices)
        np.testing.assert_array_equal(np.asarray(values), ref_values)


@pytest.mark.parametrize("run", RUNNERS.values(), ids=RUNNERS.keys())
@pytest.mark.parametrize("method", ["auto", "lax", "radix"])
def test_zero_rows_give_empty_results(run, method):
    x = jnp.zeros((0, 4))
    values, indices = run(fk.top_k, x, k=1, method=method)
    assert values.shape == indices.shape == (0, 1)
    assert values.dtype == jnp.float32 and indices.dtype == jnp.int32
    values, indices, residual = run(fk.top_k_with_feedback, x, x, k=2, method=method)
    assert values.shape == indices.shape == (0, 2) and indices.dtype == jnp.int32
    assert residual.shape == (0, 4) and residual.dtype == jnp.float32
    values, _ = run(fk.top_k, jnp.zeros((3, 0, 5), jnp.bfloat16), k=5, method=method)
    assert values.shape == (3, 0, 5) and values.dtype == jnp.bfloat16


@pytest.mark.parametrize("run", RUNNERS.values(), ids=RUNNERS.keys())
@pytest.mark.parametrize("method", ["lax", "radix"])
def test_feedback_rule_for_non_finite_entries(run, method):
    """The docstring's rule: at most k non-finite entries are all sent; with more, k of them
    are sent (NaN before +-Inf, ties to the lower index) and the rest stay in the residual."""
    inf, nan = np.inf, np.nan
    x = np.array(
        [
            [1.0, -inf, 3.0, nan, 5.0, inf],  # 3 non-finite, k=2: NaN and -Inf (lower index) sent
            [1.0, inf, 3.0, -2.0, 5.0, 0.5],  # 1 non-finite: sent, with the largest finite one
        ],
        np.float32,
    )
    values, indices, residual = run(
        fk.top_k_with_feedback, x, np.zeros_like(x), k=2, method=method
    )
    np.testing.assert_array_equal(np.asarray(indices), [[1, 3], [1, 4]])
    np.testing.assert_array_equal(np.asarray(values), [[-inf, nan], [inf, 5.0]])
    residual = np.asarray(residual)
    np.testing.assert_array_equal(residual[0], [1.0, 0.0, 3.0, 0.0, 5.0, inf])
    assert np.all(np.isfinite(residual[1]))
    sent = np.asarray(fk.scatter(values, indices, 6))
    np.testing.assert_array_equal(np.where(sent != 0, sent, residual), x)  # nothing lost
