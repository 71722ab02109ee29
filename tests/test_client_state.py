"""The residual store: residuals follow client ids; with the compressor, against NumPy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedkernels as fk
from tests import _reference as ref


def test_gather_scatter_follow_ids():
    store = fk.residual_store(10, 4)
    state = store.init()
    assert state.residuals.shape == (10, 4) and state.residuals.dtype == jnp.float32
    rows = jnp.arange(12.0).reshape(3, 4)
    state = store.scatter(state, jnp.array([7, 2, 5]), rows)
    got = store.gather(state, jnp.array([5, 0, 7, 2]))
    expected = np.stack([np.arange(8, 12), np.zeros(4), np.arange(0, 4), np.arange(4, 8)])
    np.testing.assert_array_equal(got, expected)
    # Also under jit, as the simulation's loop could call it.
    np.testing.assert_array_equal(jax.jit(store.gather)(state, jnp.array([5, 0, 7, 2])), got)


def test_memory_and_bfloat16():
    assert fk.residual_memory_bytes(1000, 10**6, "float32") == 4 * 10**9
    store = fk.residual_store(6, 5, dtype="bfloat16")
    assert store.nbytes == 6 * 5 * 2
    state = store.scatter(store.init(), jnp.array([1]), jnp.full((1, 5), 1.0 + 2.0**-10))
    assert state.residuals.dtype == jnp.bfloat16
    got = store.gather(state, jnp.array([1]))
    assert got.dtype == jnp.float32
    np.testing.assert_array_equal(got, np.ones((1, 5)))  # rounded to bfloat16's 8 bits


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: fk.residual_store(0, 3), "num_clients must be >= 1, got 0"),
        (lambda: fk.residual_store(3, -1), "d must be >= 0, got -1"),
        (lambda: fk.residual_store(3, 2, dtype="float16"), "dtype must be one of"),
    ],
)
def test_bad_store_arguments(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_scatter_updates_in_place_and_consumes_the_old_state():
    store = fk.residual_store(6, 4)
    state = store.scatter(store.init(), jnp.array([3]), jnp.full((1, 4), 2.0))
    pointer = state.residuals.unsafe_buffer_pointer()
    new = store.scatter(state, jnp.array([0, 5]), jnp.arange(8.0).reshape(2, 4))
    assert state.residuals.is_deleted()
    assert new.residuals.unsafe_buffer_pointer() == pointer  # the same buffer, written in place
    expected = np.zeros((6, 4))
    expected[3] = 2.0
    expected[[0, 5]] = np.arange(8.0).reshape(2, 4)
    np.testing.assert_array_equal(store.gather(new, jnp.arange(6)), expected)
    for call in (lambda: store.gather(state, jnp.array([0])),
                 lambda: store.scatter(state, jnp.array([0]), jnp.zeros((1, 4)))):
        with pytest.raises(ValueError, match="state was consumed by an earlier scatter"):
            call()


def test_scatter_without_donation_is_pure():
    store = fk.residual_store(6, 4, dtype="bfloat16", donate=False)
    state = store.scatter(store.init(), jnp.array([3]), jnp.full((1, 4), 2.0))
    new = store.scatter(state, jnp.array([3, 1]), jnp.ones((2, 4)))
    assert not state.residuals.is_deleted()
    np.testing.assert_array_equal(store.gather(state, jnp.array([3, 1])), [[2.0] * 4, [0.0] * 4])
    np.testing.assert_array_equal(store.gather(new, jnp.array([3, 1])), np.ones((2, 4)))


def test_scatter_under_outer_jit_and_bad_donate():
    store = fk.residual_store(4, 2)
    state = store.init()
    new = jax.jit(store.scatter)(state, jnp.array([2]), jnp.ones((1, 2)))
    assert not state.residuals.is_deleted()  # the outer jit decides donation, not the store
    np.testing.assert_array_equal(store.gather(new, jnp.arange(4))[:, 0], [0, 0, 1, 0])
    with pytest.raises(TypeError, match="donate must be a bool, got 'yes'"):
        fk.residual_store(4, 2, donate="yes")


def test_bad_ids_raise():
    store = fk.residual_store(4, 2)
    state = store.init()
    with pytest.raises(ValueError, match=r"client_ids must be in \[0, 3\], got 4"):
        store.gather(state, jnp.array([0, 4]))
    with pytest.raises(ValueError, match="client_ids must be distinct.*1 duplicate"):
        store.scatter(state, jnp.array([1, 1]), jnp.zeros((2, 2)))
    with pytest.raises(ValueError, match=r"residuals must have shape \(2, 2\)"):
        store.scatter(state, jnp.array([1, 2]), jnp.zeros((2, 3)))


def test_int64_ids_beyond_int32_raise_instead_of_wrapping():
    """JAX stores int64 in 32 bits unless x64 is on: 2**32 + 1 would have read client 1."""
    store = fk.residual_store(4, 3, donate=False)
    state = store.scatter(store.init(), jnp.array([1]), jnp.ones((1, 3)))
    for call in (lambda ids: store.gather(state, ids),
                 lambda ids: store.scatter(state, ids, jnp.full((1, 3), 7.0))):
        with pytest.raises(ValueError, match="client_ids holds 4294967297, beyond int32"):
            call(np.array([2**32 + 1], np.int64))
    np.testing.assert_array_equal(store.gather(state, np.array([1, 2], np.int64))[:, 0], [1, 0])


def test_a_state_not_of_this_store_raises():
    """Another store's state would have read NaN rows past its end and dropped writes."""
    store = fk.residual_store(6, 3)
    other = fk.residual_store(4, 3).init()
    with pytest.raises(ValueError, match=r"state must hold this store's residuals, "
                                         r"float32\[6, 3\] \(num_clients x d\), got "
                                         r"float32\[4, 3\]"):
        store.scatter(other, jnp.array([5]), jnp.ones((1, 3)))
    with pytest.raises(ValueError, match=r"got bfloat16\[6, 3\]"):
        store.gather(fk.residual_store(6, 3, "bfloat16").init(), jnp.array([0]))
    with pytest.raises(TypeError, match="state must be the ResidualState of this store"):
        store.gather(store.init().residuals, jnp.array([0]))
    with pytest.raises(TypeError, match="got NoneType"):
        store.scatter(None, jnp.array([0]), jnp.ones((1, 3)))


@pytest.mark.parametrize("ids_dtype", [jnp.int32, jnp.uint32])
def test_out_of_range_ids_under_jit_are_padding(ids_dtype):
    """Traced ids outside [0, N) (a cohort padded with -1, or uint32 2**32-1) never read or
    overwrite another client's row: gather gives zeros for them, scatter skips them."""
    n, d = 4, 3
    store = fk.residual_store(n, d, donate=False)
    before = np.arange(1.0, 1.0 + n * d, dtype=np.float32).reshape(n, d)
    state = store.scatter(store.init(), jnp.arange(n), before)
    pad = 2**32 - 1 if ids_dtype == jnp.uint32 else -1
    ids = jnp.array([pad, 1, n], ids_dtype)
    rows = -np.ones((3, d), np.float32)
    after = jax.jit(store.scatter)(state, ids, rows).residuals
    expected = before.copy()
    expected[1] = -1.0  # only the in-range id is written
    np.testing.assert_array_equal(np.asarray(after), expected)
    got = jax.jit(store.gather)(state, ids)
    np.testing.assert_array_equal(np.asarray(got), np.stack([np.zeros(d), before[1], np.zeros(d)]))
    with pytest.raises(ValueError, match=r"client_ids must be in \[0, 3\], got -1"):
        store.scatter(state, jnp.array([-1, 1]), rows[:2])  # eagerly: still an error


def test_residuals_follow_client_ids_across_shuffled_cohorts():
    """Rounds with shuffled cohorts of a 12-client population, top-k with error feedback,
    against a NumPy float64 per-client-id reference; the cohort order must not matter."""
    n, c, d, k = 12, 5, 64, 6
    template = {"w": jnp.zeros((d,))}
    comp = fk.compressor(template, top_k_count=k, error_feedback=True, dense_threshold=0)
    store = fk.residual_store(n, comp.layout.sparse_size)
    # Same store without donation, for the shuffled copy: the donating scatter below
    # consumes `state`, so the copy is written first from the still valid `state`.
    pure_store = fk.residual_store(n, comp.layout.sparse_size, donate=False)
    state = store.init()
    reference = {i: np.zeros(d) for i in range(n)}
    rng = np.random.default_rng(0)
    for r in range(6):
        ids = rng.choice(n, c, replace=False)
        updates = rng.normal(size=(n, d)).astype(np.float32)[ids]  # client i's update
        residuals = store.gather(state, ids)
        result = comp.round({"w": jnp.asarray(updates)}, jax.random.PRNGKey(r),
                            client_ids=jnp.asarray(ids), residuals=residuals)
        # The same cohort in another order gives the same mean and the same residual per id.
        perm = rng.permutation(c)
        shuffled = comp.round({"w": jnp.asarray(updates[perm])}, jax.random.PRNGKey(r),
                              client_ids=jnp.asarray(ids[perm]),
                              residuals=store.gather(state, ids[perm]))
        np.testing.assert_allclose(shuffled.mean["w"], result.mean["w"], rtol=1e-6, atol=1e-7)
        state_shuffled = pure_store.scatter(state, ids[perm], shuffled.residuals)
        state = store.scatter(state, ids, result.residuals)
        np.testing.assert_array_equal(state_shuffled.residuals, state.residuals)

        acc = updates + np.stack([reference[i] for i in ids])
        values, indices = ref.top_k(acc.astype(np.float32), k)
        expected_mean = np.zeros(d)
        for row, i in enumerate(ids):
            sent = np.zeros(d)
            sent[indices[row]] = values[row]
            expected_mean += sent / c
            reference[i] = acc[row] - sent
        np.testing.assert_allclose(result.mean["w"], expected_mean, rtol=1e-5, atol=1e-6)
    final = np.asarray(store.gather(state, np.arange(n)))
    np.testing.assert_allclose(final, np.stack([reference[i] for i in range(n)]), atol=1e-5)
    assert np.any(final != 0)  # the test can fail: residuals were really kept
