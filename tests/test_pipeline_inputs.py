"""Bad input to a compressor's functions: clear errors naming the argument, empty results of
the right shape, no NaN/Inf from finite input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedkernels as fk

TEMPLATE = {"b": jnp.zeros((3,)), "w": jnp.zeros((4, 8))}  # d = 35
KEY = jax.random.PRNGKey(0)


def _updates(c: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"b": jnp.asarray(rng.normal(size=(c, 3)), jnp.float32),
            "w": jnp.asarray(rng.normal(size=(c, 4, 8)), jnp.float32)}


@pytest.fixture(scope="module")
def comp():
    return fk.compressor(TEMPLATE, top_k_count=5, bits=8, error_feedback=True,
                         dense_threshold=3)


@pytest.fixture(scope="module")
def encoded(comp):
    return comp.encode(_updates(2), jnp.zeros((2, 32)), jnp.arange(2), KEY)


@pytest.mark.parametrize("method", ["decode", "aggregate"])
@pytest.mark.parametrize(
    "weights, message",
    [
        ([1.0, -1.0], "weights must be >= 0, got -1"),
        ([1.0, np.nan], "weights must be finite, got nan"),
        ([np.inf, 1.0], "weights must be finite, got inf"),
        ([1.0, 1.0, 1.0], r"weights must have shape \(2,\)"),
    ],
)
def test_decode_and_aggregate_validate_weights(comp, encoded, method, weights, message):
    payload, _, report = encoded
    with pytest.raises(ValueError, match=message):
        getattr(comp, method)(payload, report.included, jnp.asarray(weights, jnp.float32))


@pytest.mark.parametrize("method", ["decode", "aggregate", "finalize"])
def test_server_methods_name_a_wrong_kind_of_payload(comp, encoded, method):
    """A tuple where the Payload (or AggregateSums) belongs raised an AttributeError."""
    args = ((1, 2),) if method == "finalize" else ((1, 2), jnp.ones(2, bool))
    name, kind = ("sums", "AggregateSums") if method == "finalize" else ("payload", "Payload")
    with pytest.raises(TypeError, match=rf"{name} must be the {kind} that Compressor\.\w+ "
                                        r"returns, got tuple"):
        getattr(comp, method)(*args)
    payload, _, report = encoded
    assert np.all(np.isfinite(np.asarray(comp.decode(payload, report.included)["w"])))


@pytest.mark.parametrize("method", ["decode", "aggregate"])
def test_decode_and_aggregate_validate_included_shape(comp, encoded, method):
    payload, _, _ = encoded
    with pytest.raises(ValueError, match=r"included must have shape \(2,\).*got \(1,\)"):
        getattr(comp, method)(payload, [True])


@pytest.mark.parametrize(
    "key, error, message",
    [
        (0, TypeError, "key must be a jax.random key.*int 0"),
        (jnp.int32(3), TypeError, "key must be a jax.random key.*int32"),
        (jax.random.split(KEY, 3), ValueError, r"single jax.random key.*\(3, 2\)"),
        (jax.random.split(jax.random.key(0), 3), ValueError, r"single jax.random key.*\(3,\)"),
    ],
    ids=["int", "int-array", "raw-batch", "typed-batch"],
)
@pytest.mark.parametrize("bits", [8, None])
def test_round_and_encode_reject_a_key_that_is_not_one_key(key, error, message, bits):
    comp = fk.compressor(TEMPLATE, bits=bits, dense_threshold=3)
    with pytest.raises(error, match=message):
        comp.round(_updates(2), key)
    with pytest.raises(error, match=message):
        comp.encode(_updates(2), None, None, key)


def test_round_accepts_typed_and_raw_keys():
    comp = fk.compressor(TEMPLATE, bits=8, dense_threshold=3)
    raw = comp.round(_updates(2), jax.random.PRNGKey(1)).mean["w"]
    typed = comp.round(_updates(2), jax.random.key(1)).mean["w"]
    np.testing.assert_array_equal(raw, typed)


def test_encode_of_zero_clients_returns_empty_results(comp, encoded):
    payload, new_res, report = comp.encode(_updates(0), jnp.zeros((0, 32)), None, KEY)
    for empty, full in zip(payload, encoded[0], strict=True):
        assert empty.shape == (0, *full.shape[1:]) and empty.dtype == full.dtype
    assert new_res.shape == (0, 32) and new_res.dtype == jnp.float32
    assert report.included.shape == (0,) and report.residual_norm.shape == (0,)


@pytest.mark.parametrize(
    "options", [{"bits": 8}, {"top_k_fraction": 0.01}, {"top_k_count": 1, "bits": 4}]
)
def test_model_of_small_leaves_only_is_refused_naming_dense_threshold(options):
    with pytest.raises(ValueError, match="dense_threshold=100.*no leaf"):
        fk.compressor(TEMPLATE, dense_threshold=100, **options)


def test_on_nonfinite_raise_under_jit_says_it_cannot():
    comp = fk.compressor(TEMPLATE, bits=8, dense_threshold=3, on_nonfinite="raise")
    with pytest.raises(ValueError, match="on_nonfinite='raise' cannot be used under jax.jit"):
        jax.jit(lambda u: comp.round(u, KEY).mean)(_updates(2))


def test_update_function_returning_another_client_count_is_named():
    comp = fk.compressor(TEMPLATE, dense_threshold=3)
    table = _updates(3)
    with pytest.raises(ValueError, match=r"updates\(client_ids\) must give one row per client "
                                         r"id: 2 ids, got 3 rows"):
        comp.round(lambda ids: table, KEY, client_ids=jnp.arange(2))


def test_updates_without_client_axis_blame_updates_not_residuals(comp):
    with pytest.raises(ValueError, match=r"updates must hold the template's leaves with a "
                                         r"leading client axis.*leaf 0.*got \(3,\)"):
        comp.round(TEMPLATE, KEY, residuals=jnp.zeros((3, 32)))


def test_list_against_dict_template_prints_the_tree_structures(comp):
    with pytest.raises(ValueError, match=r"tree structure of the template.*PyTreeDef\(\{.*"
                                         r"got PyTreeDef\(\["):
        comp.round([jnp.zeros((2, 3)), jnp.zeros((2, 4, 8))], KEY,
                   residuals=jnp.zeros((2, 32)))


def test_int64_weights_beyond_int32_are_weights_and_ids_beyond_it_raise():
    """Example counts as int64 are taken as they are (2**32 was read as 0), and an int64
    client id beyond int32 raises instead of wrapping."""
    comp = fk.compressor({"w": jnp.zeros(100)}, top_k_count=5)
    updates = {"w": jnp.arange(1.0, 201.0).reshape(2, 100)}
    weights = np.array([2**32, 1], np.int64)
    mean = np.asarray(comp.round(updates, KEY, weights=weights).mean["w"], np.float64)
    sent = np.where(np.arange(100) >= 95, np.asarray(updates["w"], np.float64), 0.0)
    want = (weights[:, None].astype(np.float64) * sent).sum(0) / weights.sum()
    np.testing.assert_allclose(mean, want, rtol=1e-6)
    mean = comp.round(updates, KEY, weights=np.array([2**31, 2**31], np.int64)).mean["w"]
    np.testing.assert_allclose(np.asarray(mean)[95:], np.arange(146.0, 151.0), rtol=1e-6)
    with pytest.raises(ValueError, match="client_ids holds 4294967296, beyond int32"):
        comp.round(updates, KEY, client_ids=np.array([0, 2**32], np.int64))


def test_subnormal_weights_weigh_as_their_ratio():
    """XLA on CPU reads subnormal inputs as 0: weights of 1e-40 gave a zero mean while the
    metrics counted both clients; they are the mean of weights [1, 1] (and 1:3 stays 1:3)."""
    comp = fk.compressor(TEMPLATE, dense_threshold=3)  # no compression: the exact mean
    updates = _updates(2, seed=5)
    for weights in ([1e-40, 1e-40], [1e-41, 3e-41], [1e-40, 3e-30]):
        w = np.asarray(weights, np.float64)
        for run in (comp.round, jax.jit(comp.round)):
            mean = run(updates, KEY, weights=jnp.asarray(w, jnp.float32)).mean
            for leaf in ("b", "w"):
                x = np.asarray(updates[leaf], np.float64)
                want = np.tensordot(w / w.sum(), x, axes=1)
                np.testing.assert_allclose(np.asarray(mean[leaf]), want, rtol=2e-3, atol=1e-7)


@pytest.mark.parametrize("method", ["round", "decode"])
def test_huge_finite_weights_give_a_finite_mean(method):
    comp = fk.compressor(TEMPLATE, dense_threshold=3)  # no compression: the exact mean
    updates = _updates(2, seed=4)
    weights = jnp.array([2e38, 2e38], jnp.float32)
    if method == "round":
        mean = comp.round(updates, KEY, weights=weights).mean
    else:
        payload, _, report = comp.encode(updates, None, None, KEY)
        mean = comp.decode(payload, report.included, weights)
    for leaf in ("b", "w"):
        want = np.asarray(updates[leaf], np.float64).mean(0)
        np.testing.assert_allclose(np.asarray(mean[leaf]), want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "devices, error, message",
    [
        ("cpu", TypeError, "devices must be a list of jax devices, got 'cpu'"),
        ([0, 1], TypeError, r"devices must be jax devices \(from jax.devices\(\)\), got 0 of "
         "type int"),
        ([], ValueError, r"devices must be non-empty, got \[\]"),
        ("twice", ValueError, "devices must be distinct"),
    ],
)
def test_client_mesh_names_bad_devices(devices, error, message):
    """Such meshes were built, then the round failed with an AttributeError."""
    if devices == "twice":
        devices = [jax.devices()[0]] * 2
    with pytest.raises(error, match=message):
        fk.client_mesh(devices)


def test_client_mesh_takes_any_iterable_of_devices():
    mesh = fk.client_mesh(d for d in jax.devices() if d.platform == "cpu")
    assert list(mesh.devices.flat) == [d for d in jax.devices() if d.platform == "cpu"]


def test_update_function_needs_a_vector_of_client_ids(comp):
    with pytest.raises(ValueError, match=r"client_ids must be \[C\], one id per client, when "
                                         r"updates is a function, got shape \(\)"):
        comp.round(lambda ids: _updates(2), KEY, client_ids=5)
