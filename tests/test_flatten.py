import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedkernels as fk


def _tree(rng, batch=()):
    return {
        "dense": {
            "kernel": rng.normal(size=(*batch, 5, 3)).astype(np.float32),
            "bias": rng.normal(size=(*batch, 3)).astype(np.float32),
        },
        "empty": np.zeros((*batch, 0, 4), np.float32),
        "scale": rng.normal(size=batch).astype(np.float32),
        "layers": [rng.normal(size=(*batch, 2, 2, 2)).astype(np.float32)],
    }


def _assert_tree_equal_bitwise(a, b):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb
    for x, y in zip(la, lb, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.shape == y.shape and x.dtype == y.dtype
        np.testing.assert_array_equal(x.reshape(-1).view(np.uint8), y.reshape(-1).view(np.uint8))


@pytest.mark.parametrize("batch", [(), (4,), (2, 3)])
def test_round_trip_bit_for_bit(batch):
    tree = _tree(np.random.default_rng(0), batch)
    flat, unflatten = fk.flatten(tree, batch_ndim=len(batch))
    assert flat.shape == (*batch, 15 + 3 + 0 + 1 + 8)
    assert flat.dtype == jnp.float32
    _assert_tree_equal_bitwise(unflatten(flat), tree)


def test_flat_layout_matches_numpy_concatenation():
    tree = _tree(np.random.default_rng(1), (3,))
    flat, _ = fk.flatten(tree, batch_ndim=1)
    leaves = jax.tree_util.tree_leaves(tree)
    expected = np.concatenate([np.asarray(v).reshape(3, -1) for v in leaves], axis=1)
    np.testing.assert_array_equal(np.asarray(flat), expected)


def test_unflatten_accepts_other_batch_shapes():
    tree = _tree(np.random.default_rng(2), (4,))
    flat, unflatten = fk.flatten(tree, batch_ndim=1)
    server = unflatten(flat[1])
    _assert_tree_equal_bitwise(server, jax.tree_util.tree_map(lambda v: v[1], tree))


def test_mixed_dtypes_promote_and_restore():
    tree = {
        "w": np.arange(6, dtype=np.float32).reshape(2, 3) / 7,
        "step": np.array([3, -5], np.int32),
        "h": np.array([[0.5, 1.5]], dtype=jnp.bfloat16),
    }
    flat, unflatten = fk.flatten(tree)
    assert flat.dtype == jnp.float32  # promotion: bfloat16, int32, float32 -> float32
    _assert_tree_equal_bitwise(unflatten(flat), tree)
    flat16, _ = fk.flatten({"a": np.ones(2, np.float16), "b": np.ones(2, jnp.bfloat16)})
    assert flat16.dtype == jnp.float32
    flat_int, unflatten_int = fk.flatten({"a": np.arange(3, dtype=np.int32)})
    assert flat_int.dtype == jnp.int32
    mixed = {"a": np.ones(2, np.float16), "n": np.array([2049, -(2**24)], np.int32)}
    flat_mixed, unflatten_mixed = fk.flatten(mixed)
    assert flat_mixed.dtype == jnp.float32  # not float16, which cannot hold 2049
    _assert_tree_equal_bitwise(unflatten_mixed(flat_mixed), mixed)


def test_explicit_dtype():
    flat, unflatten = fk.flatten({"a": np.ones(3, np.float16)}, dtype=jnp.float32)
    assert flat.dtype == jnp.float32
    assert unflatten(flat)["a"].dtype == np.float16


def test_empty_tree_and_zero_size_leaves():
    flat, unflatten = fk.flatten({})
    assert flat.shape == (0,) and flat.dtype == jnp.float32
    assert unflatten(flat) == {}
    flat, unflatten = fk.flatten({"a": np.zeros((0, 3), np.float32)})
    assert flat.shape == (0,)
    assert unflatten(flat)["a"].shape == (0, 3)
    flat, unflatten = fk.flatten([np.zeros((0, 2), np.float32)], batch_ndim=1)
    assert flat.shape == (0, 2)
    flat, unflatten = fk.flatten([np.zeros((3, 0), np.float32)], batch_ndim=1)
    assert flat.shape == (3, 0)


def test_unflatten_is_hashable_and_does_not_retrace():
    rng = np.random.default_rng(3)
    _, unflatten = fk.flatten(_tree(rng, (2,)), batch_ndim=1)
    _, again = fk.flatten(_tree(rng, (2,)), batch_ndim=1)
    assert hash(unflatten) == hash(again) and unflatten == again

    @jax.jit
    @chex.assert_max_traces(n=1)
    def restore(flat, unflatten):
        return unflatten(flat)

    restore_static = jax.jit(restore.__wrapped__, static_argnums=1)
    for round_ in range(3):
        flat, unflatten = fk.flatten(_tree(np.random.default_rng(round_), (2,)), batch_ndim=1)
        out = restore_static(flat, unflatten)
        assert out["dense"]["kernel"].shape == (2, 5, 3)


def test_flatten_under_jit_and_vmap():
    tree = _tree(np.random.default_rng(4), (3,))
    eager, _ = fk.flatten(tree, batch_ndim=1)
    jitted = jax.jit(lambda t: fk.flatten(t, batch_ndim=1)[0])(tree)
    vmapped = jax.vmap(lambda t: fk.flatten(t)[0])(tree)
    np.testing.assert_array_equal(np.asarray(eager), np.asarray(jitted))
    np.testing.assert_array_equal(np.asarray(eager), np.asarray(vmapped))


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"batch_ndim must be >= 0, got -1"):
        fk.flatten({"a": np.ones(2)}, batch_ndim=-1)
    with pytest.raises(ValueError, match="share the batch shape"):
        fk.flatten({"a": np.ones((2, 3)), "b": np.ones((3, 3))}, batch_ndim=1)
    with pytest.raises(ValueError, match="fewer than batch_ndim=2"):
        fk.flatten({"a": np.ones(3)}, batch_ndim=2)
    with pytest.raises(TypeError, match=r"tree\[1\] must be an array, got str"):
        fk.flatten([np.ones(2), "text"])
    with pytest.raises(ValueError, match=r"tree\['a'\] has \(2,\), tree\['b'\] has \(3,\)"):
        fk.flatten({"a": np.ones((2, 3)), "b": np.ones((3, 3))}, batch_ndim=1)
    flat, unflatten = fk.flatten({"a": np.ones(3, np.float32)})
    with pytest.raises(ValueError, match=r"flat must have shape \[\.\.\., 3\], got \(4,\)"):
        unflatten(jnp.ones(4))
    with pytest.raises(TypeError, match="flat must have dtype float32.*got int32"):
        unflatten(jnp.ones(3, jnp.int32))


@pytest.mark.parametrize("batch", [(), (1,), (3,), (2, 3), (0,)])
def test_many_leaves_equal_numpy_concatenate_bitwise(batch):
    # Many leaves of odd sizes, zero-size leaves first, in the middle and last, mixed dtypes:
    # the flat vector is assembled by in-place updates of one buffer, so every offset counts.
    rng = np.random.default_rng(len(batch))
    sizes = [0, 1, 7, 0, 130, 3, 64, 1, 0, 999, 5, 2, 0]
    leaves = []
    for i, n in enumerate(sizes * 3):
        shape = (*batch, n) if i % 3 else (*batch, 1, n)
        if i % 4 == 1:
            leaves.append(rng.integers(-(2**20), 2**20, size=shape).astype(np.int32))
        elif i % 4 == 2:
            leaves.append(rng.normal(size=shape).astype(np.float16))
        else:
            leaves.append(rng.normal(size=shape).astype(np.float32))
    flat_size = 3 * sum(sizes)
    expected = np.concatenate(
        [
            np.asarray(v, np.float32).reshape(*batch, int(np.prod(v.shape[len(batch) :])))
            for v in leaves
        ],
        axis=-1,
    )
    eager, unflatten = fk.flatten(leaves, batch_ndim=len(batch))
    jitted = jax.jit(lambda t: fk.flatten(t, batch_ndim=len(batch))[0])(leaves)
    for flat in (eager, jitted):
        assert flat.shape == (*batch, flat_size) and flat.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(flat).view(np.uint32), expected.view(np.uint32))
    _assert_tree_equal_bitwise(unflatten(eager), leaves)
    if batch and batch[0]:
        vmapped = jax.vmap(lambda t: fk.flatten(t, batch_ndim=len(batch) - 1)[0])(leaves)
        np.testing.assert_array_equal(np.asarray(vmapped), expected)


def test_special_values_survive_bitwise():
    values = np.array([np.nan, -0.0, np.inf, -np.inf, 1e-45, -3.4e38], np.float32)
    nan_payload = np.array([0x7FC00001, 0xFF800001], np.uint32).view(np.float32)
    tree = [values[:2], nan_payload, values[2:]]
    flat, unflatten = fk.flatten(tree)
    expected = np.concatenate([values[:2], nan_payload, values[2:]])
    np.testing.assert_array_equal(np.asarray(flat).view(np.uint32), expected.view(np.uint32))
    _assert_tree_equal_bitwise(unflatten(flat), tree)


def test_integer_and_bool_trees_concatenate_exactly():
    tree = {
        "a": np.array([2**31 - 1, -(2**31), 0], np.int32),
        "b": np.arange(4, dtype=np.int32).reshape(2, 2),
        "c": np.array([True, False]),
    }
    flat, unflatten = fk.flatten(tree)
    jitted = jax.jit(lambda t: fk.flatten(t)[0])(tree)
    expected = np.concatenate([tree["a"], tree["b"].reshape(-1), tree["c"].astype(np.int32)])
    for got in (flat, jitted):
        assert got.dtype == jnp.int32
        np.testing.assert_array_equal(np.asarray(got), expected)
    _assert_tree_equal_bitwise(unflatten(flat), tree)


def test_a_64_bit_dtype_without_x64_is_the_dtype_jax_stores():
    """`flatten(tree, dtype=float64)` returns float32 without x64; its unflatten expected
    float64 and refused flatten's own output."""
    if jax.config.jax_enable_x64:
        pytest.skip("x64 on: float64 is stored as float64")
    for dtype, leaf, stored in ((jnp.float64, jnp.ones(3), jnp.float32),
                                (np.int64, jnp.arange(3, dtype=jnp.int32), jnp.int32)):
        flat, unflatten = fk.flatten({"a": leaf}, dtype=dtype)
        assert flat.dtype == stored and unflatten.flat_dtype == stored
        np.testing.assert_array_equal(unflatten(flat)["a"], leaf)
