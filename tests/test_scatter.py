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


def _x64():
    """A context with 64-bit types on (the API moved between the two stacks)."""
    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(True)
    from jax.experimental import enable_x64

    return enable_x64(True)


def _scatter_dropping(values, indices, d):
    """NumPy reference of the traced policy: out-of-range entries change nothing."""
    values, indices = np.asarray(values), np.asarray(indices).astype(np.int64)
    dense = np.zeros((*values.shape[:-1], d), np.float64)
    for r in np.ndindex(values.shape[:-1]):
        keep = (indices[r] >= 0) & (indices[r] < d)
        np.add.at(dense[r], indices[r][keep], values[r][keep].astype(np.float64))
    return dense


TRACED = {"jit": lambda f: jax.jit(f), "vmap": lambda f: jax.vmap(jax.vmap(f))}


# Each case has an index that the int32 cast, the negative-index wrap or the row offset used to
# move onto a real coordinate: -1 (wrapped to d-1), d (spilled into the next row), 2**32-1
# (uint32, -1 after the cast), int8 -1 with d beyond int8's range.
OUT_OF_RANGE = {
    "negative": (np.array([[5.0, 1.0], [7.0, 2.0]], np.float32), np.array([[-1, 1], [0, -3]])),
    "at_d_spills": (np.array([[5.0, 1.0], [7.0, 2.0]], np.float32), np.array([[3, 1], [0, 9]])),
    "uint32_max": (
        np.array([[5.0, 1.0], [7.0, 2.0]], np.float32),
        np.array([[2**32 - 1, 1], [0, 2]], np.uint32),
    ),
    "int8": (np.array([[5.0, 1.0], [7.0, 2.0]], np.float32), np.array([[-1, 1], [0, 2]], np.int8)),
}


@pytest.mark.parametrize("trace", TRACED.values(), ids=TRACED.keys())
@pytest.mark.parametrize("case", OUT_OF_RANGE.values(), ids=OUT_OF_RANGE.keys())
@pytest.mark.parametrize("flat", [True, False], ids=["flat", "rows_by_d"])
def test_out_of_range_indices_are_dropped_when_traced(monkeypatch, trace, case, flat):
    from fedkernels import _scatter

    if not flat:  # the [rows, d] scatter that batches too long for one int32-indexed row use
        monkeypatch.setattr(_scatter, "_MAX_FLAT_LENGTH", 2)
    values, indices = case
    d = 300 if indices.dtype == np.int8 else 3
    if trace is TRACED["vmap"]:  # one row per vmapped call: [2, 1, 2] -> [2, 1, d]
        values, indices = values[:, None], indices[:, None]
    dense = trace(lambda v, i: fk.scatter(v, i, d))(values, indices)
    np.testing.assert_array_equal(np.asarray(dense), _scatter_dropping(values, indices, d))
    with pytest.raises(ValueError, match=r"indices must be in \[0, "):
        fk.scatter(values, indices, d)  # eagerly the same input raises


def test_out_of_range_int64_indices_are_dropped_when_traced():
    with _x64():
        values = jnp.array([[5.0, 1.0, 2.0]], jnp.float32)
        indices = jnp.array([[2**32 + 1, 1, -(2**32) + 2]], jnp.int64)  # int32 cast: 1 and 2
        dense = jax.jit(lambda v, i: fk.scatter(v, i, 3))(values, indices)
        np.testing.assert_array_equal(np.asarray(dense), [[0.0, 1.0, 0.0]])
        total, count = jax.jit(lambda v, i: fk.scatter_sum(v, i, 3))(values, indices)
        np.testing.assert_array_equal(np.asarray(total), [0.0, 1.0, 0.0])
        np.testing.assert_array_equal(np.asarray(count), [0, 1, 0])


@pytest.mark.parametrize("trace", TRACED.keys())
@pytest.mark.parametrize("weighted", [False, True])
def test_scatter_sum_drops_out_of_range_values_and_counts_when_traced(trace, weighted):
    values = np.array([[5.0, 1.0], [7.0, 2.0]], np.float32)
    indices = np.array([[-1, 1], [3, 2]])
    weights = np.array([2.0, 3.0], np.float32) if weighted else None
    f = lambda v, i, w: fk.scatter_sum(v, i, 3, w)
    if trace == "jit":
        total, count = jax.jit(f)(values, indices, weights)
    else:  # vmap over groups of clients: the same group twice
        total, count = jax.vmap(f)(*(None if a is None else np.stack([a, a]) for a in
                                     (values, indices, weights)))
        assert np.array_equal(total[0], total[1]) and np.array_equal(count[0], count[1])
        total, count = total[0], count[0]
    w = np.ones(2) if weights is None else weights
    np.testing.assert_array_equal(np.asarray(total), [0.0, 1.0 * w[0], 2.0 * w[1]])
    np.testing.assert_array_equal(np.asarray(count), [0.0, w[0], w[1]])


def test_checked_raises_for_negative_and_wrapped_indices():
    checked = checkify.checkify(jax.jit(lambda v, i: fk.scatter(v, i, 4, checked=True)))
    for bad in (jnp.array([[1, -1]]), jnp.array([[1, 2**32 - 1]], jnp.uint32)):
        err, _ = checked(jnp.array([[1.0, 2.0]]), bad)
        with pytest.raises(checkify.JaxRuntimeError, match=r"indices must be in \[0, 4\)"):
            err.throw()


def test_long_batch_scatters_by_rows_without_a_flat_operand(monkeypatch):
    """rows * d past int32 (the int8 [[1], [2]], d=1.1e9 case) takes the [rows, d] scatter;
    shown here with the threshold lowered, and the result equals the flat path's."""
    from fedkernels import _scatter

    rng = np.random.default_rng(3)
    values = rng.normal(size=(3, 2, 5)).astype(np.float32)
    indices = rng.integers(0, 7, size=(3, 2, 5))
    flat = np.asarray(fk.scatter(values, indices, 7))
    monkeypatch.setattr(_scatter, "_MAX_FLAT_LENGTH", 7)
    built = []
    original = jnp.zeros

    def zeros(shape, *args, **kwargs):
        built.append(tuple(np.atleast_1d(shape)))
        return original(shape, *args, **kwargs)

    monkeypatch.setattr(_scatter.jnp, "zeros", zeros)
    rows = np.asarray(fk.scatter(values, indices, 7))
    monkeypatch.undo()
    assert built == [(6, 7)]  # never a flat (42,) operand
    np.testing.assert_array_equal(rows, flat)
    np.testing.assert_allclose(rows, _scatter_dropping(values, indices, 7), rtol=1e-6)


def test_bool_values_and_empty_batches():
    with pytest.raises(TypeError, match="values must be numeric, got dtype bool"):
        fk.scatter(jnp.array([True, False]), jnp.array([0, 1]), 3)
    for run in RUNNERS.values():
        empty = run(fk.scatter, jnp.zeros((0, 1)), jnp.zeros((0, 1), jnp.int32), d=4)
        assert empty.shape == (0, 4) and empty.dtype == jnp.float32
        empty = run(fk.scatter, jnp.zeros((2, 0, 3), jnp.int8), jnp.zeros((2, 0, 3), int), d=5)
        assert empty.shape == (2, 0, 5) and empty.dtype == jnp.int8
