import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

import fedkernels as fk
from tests import _reference as ref
from tests._runners import RUNNERS


@pytest.mark.parametrize("run", RUNNERS.values(), ids=RUNNERS.keys())
def test_scatter_matches_numpy_with_duplicates_summed(run):
    rng = np.random.default_rng(0)
    values = rng.normal(size=(3, 2, 40)).astype(np.float32)
    indices = rng.integers(0, 50, size=(3, 2, 40)).astype(np.int32)
    dense = run(fk.scatter, values, indices, d=50)
    expected = np.zeros((3, 2, 50))
    for r in np.ndindex(3, 2):
        np.add.at(expected[r], indices[r], values[r].astype(np.float64))
    assert dense.shape == (3, 2, 50) and dense.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(dense), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("run", RUNNERS.values(), ids=RUNNERS.keys())
@pytest.mark.parametrize("weighted", [False, True])
def test_scatter_sum_matches_reference(run, weighted):
    rng = np.random.default_rng(1)
    num_clients, k, d = 7, 30, 100
    values = rng.normal(size=(num_clients, k)).astype(np.float32)
    indices = np.stack([rng.choice(d, k, replace=False) for _ in range(num_clients)])
    weights = rng.uniform(0, 3, size=num_clients).astype(np.float32) if weighted else None
    def scatter_sum(values, indices, weights, d):
        return fk.scatter_sum(values, indices, d, weights)

    total, count = run(scatter_sum, values, indices, weights, d=d)
    ref_total, ref_count = ref.scatter_sum(values, indices, d, weights)
    np.testing.assert_allclose(np.asarray(total), ref_total, rtol=1e-5, atol=1e-5)
    if weighted:
        assert count.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(count), ref_count, rtol=1e-5)
    else:
        assert count.dtype == jnp.int32
        np.testing.assert_array_equal(np.asarray(count), ref_count.astype(np.int32))


def test_scatter_sum_skips_non_finite_values():
    values = np.array([[1.0, np.nan], [np.inf, 2.0]], np.float32)
    indices = np.array([[0, 1], [1, 2]])
    total, count = fk.scatter_sum(values, indices, 3)
    np.testing.assert_array_equal(np.asarray(total), [1.0, 0.0, 2.0])
    np.testing.assert_array_equal(np.asarray(count), [1, 0, 1])


def test_round_trip_with_top_k():
    x = np.random.default_rng(2).normal(size=(5, 300)).astype(np.float32)
    values, indices = fk.top_k(x, 30)
    dense = np.asarray(fk.scatter(values, indices, 300))
    expected = np.zeros_like(x)
    np.put_along_axis(expected, ref.top_k(x, 30)[1], ref.top_k(x, 30)[0], -1)
    np.testing.assert_array_equal(dense, expected)


def test_zero_clients_and_zero_k():
    total, count = fk.scatter_sum(jnp.zeros((0, 5)), jnp.zeros((0, 5), jnp.int32), 10)
    np.testing.assert_array_equal(np.asarray(total), np.zeros(10))
    np.testing.assert_array_equal(np.asarray(count), np.zeros(10))
    dense = fk.scatter(jnp.zeros((2, 0)), jnp.zeros((2, 0), jnp.int32), 4)
    np.testing.assert_array_equal(np.asarray(dense), np.zeros((2, 4)))


def test_errors():
    v = jnp.ones((2, 3))
    i = jnp.zeros((2, 3), jnp.int32)
    with pytest.raises(ValueError, match=r"indices must be in \[0, 9\] for d=10, got 10"):
        fk.scatter(v, i.at[1, 2].set(10), 10)
    with pytest.raises(ValueError, match=r"indices must be in \[0, 9\] for d=10, got -1"):
        fk.scatter_sum(v, i.at[0, 0].set(-1), 10)
    with pytest.raises(TypeError, match="indices must have an integer dtype, got float32"):
        fk.scatter(v, jnp.zeros((2, 3), jnp.float32), 10)
    with pytest.raises(ValueError, match="values and indices must have the same shape"):
        fk.scatter(v, jnp.zeros((2, 4), jnp.int32), 10)
    with pytest.raises(ValueError, match=r"d must be in \[0, 2147483647\], got -3"):
        fk.scatter(v, i, -3)
    with pytest.raises(ValueError, match=r"values must be \[C, k\]"):
        fk.scatter_sum(jnp.ones(3), jnp.zeros(3, jnp.int32), 10)
    with pytest.raises(ValueError, match=r"weights must have shape \(2,\), one weight per client"):
        fk.scatter_sum(v, i, 10, weights=jnp.ones(3))
    with pytest.raises(ValueError, match="weights must be >= 0, got -1.0"):
        fk.scatter_sum(v, i, 10, weights=jnp.array([1.0, -1.0]))
    with pytest.raises(ValueError, match="weights must be finite, got nan"):
        fk.scatter_sum(v, i, 10, weights=jnp.array([1.0, jnp.nan]))


def test_out_of_range_under_jit_is_dropped_or_checked():
    v = jnp.array([[1.0, 2.0]])
    i = jnp.array([[1, 7]])
    # Documented policy without checking: the out-of-range update is dropped.
    dense = jax.jit(lambda v, i: fk.scatter(v, i, 4))(v, i)
    np.testing.assert_array_equal(np.asarray(dense), [[0.0, 1.0, 0.0, 0.0]])
    checked = checkify.checkify(jax.jit(lambda v, i: fk.scatter(v, i, 4, checked=True)))
    err, _ = checked(v, i)
    with pytest.raises(checkify.JaxRuntimeError, match=r"indices must be in \[0, 4\), got min 1"):
        err.throw()
    err, out = checked(v, jnp.array([[1, 3]]))
    err.throw()  # in range: no error
    np.testing.assert_array_equal(np.asarray(out), [[0.0, 1.0, 0.0, 2.0]])
