"""Compressor settings: one declaration, explicit top-k intent, defaults that compress, and
documentation where users look (help, metrics names and units)."""

from __future__ import annotations

import dataclasses
import inspect
import math
import pydoc
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedkernels as fk
from fedkernels._pipeline.config import check_top_k_arguments
from fedkernels._pipeline.layout import payload_bytes, top_k_size

# A 784-64-10 MLP: leaves of 50176, 64, 640 and 10 parameters (50,890 in all).
MLP = {
    "dense1": {"w": jax.ShapeDtypeStruct((784, 64), jnp.float32),
               "b": jax.ShapeDtypeStruct((64,), jnp.float32)},
    "dense2": {"w": jax.ShapeDtypeStruct((64, 10), jnp.float32),
               "b": jax.ShapeDtypeStruct((10,), jnp.float32)},
}


def test_top_k_is_refused_with_the_names_to_use():
    with pytest.raises(TypeError, match="top_k_fraction or top_k_count, not top_k"):
        fk.compressor(MLP, top_k=0.01)
    with pytest.raises(TypeError, match="unknown option.*'topk'"):
        fk.compressor(MLP, topk=0.01)


def test_options_are_declared_once_in_the_config():
    fields = [f.name for f in dataclasses.fields(fk.CompressorConfig)]
    params = list(inspect.signature(fk.compressor).parameters)
    assert params == ["template", *fields]
    assert "top_k_fraction" in fields and "top_k_count" in fields and "top_k" not in fields


@pytest.mark.parametrize(
    "d, fraction, want",
    [(1200, 0.05, 60), (50176, 0.01, 502), (50890, 0.01, 509), (10, 1e-9, 1), (7, 1.0, 7),
     (3, 0.5, 2), (1000, 0.001, 1), (1000, 0.0011, 2), (100, 0.07, 7)],
)
def test_top_k_size_is_ceil_of_the_fraction_as_written(d, fraction, want):
    assert top_k_size(d, fraction=fraction) == want
    # The float64 reference: the smallest k with k >= fraction * d, as the decimal says.
    assert want == max(1, min(d, math.ceil(round(fraction * d, 9))))


def test_top_k_size_errors():
    with pytest.raises(ValueError, match="exactly one of fraction and count"):
        top_k_size(10)
    with pytest.raises(ValueError, match="exactly one of fraction and count"):
        top_k_size(10, fraction=0.5, count=2)
    with pytest.raises(ValueError, match=r"count must be in \[1, 10\], got 11"):
        top_k_size(10, count=11)
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\], got 1.5"):
        top_k_size(10, fraction=1.5)


def test_top_k_arguments_are_checked_before_d_with_the_callers_names():
    names = ("fraction", "k")
    with pytest.raises(ValueError, match="exactly one of fraction and k, got fraction=None"):
        check_top_k_arguments(None, None, names=names)
    with pytest.raises(ValueError, match=r"k must be >= 1, got 0"):
        check_top_k_arguments(None, 0, names=names)
    with pytest.raises(TypeError, match="k must be a static Python int"):
        check_top_k_arguments(None, 2.5, names=names)
    with pytest.raises(TypeError, match=r"fraction must be a float in \(0, 1\], got '0.1'"):
        check_top_k_arguments("0.1", None, names=names)
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\], got 0.0"):
        check_top_k_arguments(0.0, None, names=names)
    check_top_k_arguments(np.float32(0.5), None, names=names)  # valid: returns None
    # The compressor's form: no top-k at all is fine, both is not.
    check_top_k_arguments(None, None, names=names, required=False)
    with pytest.raises(ValueError, match="at most one of fraction and k, got fraction=0.5 and k=3"):
        check_top_k_arguments(0.5, 3, names=names, required=False)
    with pytest.raises(ValueError, match=r"k must be in \[1, 10\], got 11"):
        top_k_size(10, count=11, names=names)


def test_count_and_fraction_mean_what_they_say():
    one = fk.compressor(MLP, top_k_count=1)
    whole = fk.compressor(MLP, top_k_fraction=1.0)
    assert one.layout.k == 1
    assert whole.layout.k == whole.layout.sparse_size == 50890


@pytest.mark.parametrize("bits", [8, None])
def test_mlp_top_k_one_percent_compresses_most_of_the_model_by_default(bits):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no coverage warning by default
        comp = fk.compressor(MLP, top_k_fraction=0.01, bits=bits)
    lay = comp.layout
    assert lay.sparse_size == 50890 and lay.dense_size == 0 and lay.k == 509
    # 509 indices of 16 bits in 16 groups of 32; 8-bit codes and [min, max], or float32.
    words = math.ceil(509 / 32)
    want = words * 16 * 4 + (words * 8 * 4 + 8 if bits else 509 * 4)
    assert lay.payload_bytes == want
    assert lay.compression_ratio == pytest.approx(50890 * 4 / want)
    assert (100 if bits else 50) <= lay.compression_ratio <= 140
    assert "ratio=" in repr(lay) and "compressed=50890 (100.0%)" in repr(lay)


def test_quantization_alone_keeps_small_leaves_exact_by_default():
    comp = fk.compressor(MLP, bits=8)
    assert comp.config.dense_threshold == 1000
    assert comp.layout.sparse_size == 50176 and comp.layout.dense_size == 714


def test_small_leaf_model_warns_naming_dense_threshold_and_share():
    small = {"w": jnp.zeros((100, 30)), "b": jnp.zeros((30,)), "v": jnp.zeros((500,))}
    with pytest.warns(UserWarning, match=r"dense_threshold=1000 leaves 530 of 3530 parameters "
                                         r"uncompressed: top_k_fraction=0.01 applies to 85.0%"):
        comp = fk.compressor(small, top_k_fraction=0.01, dense_threshold=1000)
    assert comp.layout.compressed_fraction == pytest.approx(3000 / 3530)
    with warnings.catch_warnings():  # the MLP at 1000: 90.9% compressed, no warning
        warnings.simplefilter("error")
        fk.compressor(MLP, top_k_fraction=0.01, dense_threshold=1000)


def test_payload_bytes_formula_equals_the_encoded_arrays():
    template = {"b": jnp.zeros((30,)), "w": jnp.zeros((40, 30))}
    cases = [
        {"top_k_fraction": 0.05, "bits": 8}, {"top_k_count": 7}, {"bits": 3},
        {"top_k_count": 40, "random_k": True, "bits": 5},
        {"top_k_fraction": 0.05, "bits": 4, "shared_range": (-1.0, 1.0)}, {},
    ]
    for options in cases:
        comp = fk.compressor(template, dense_threshold=100, **options)
        payload = jax.eval_shape(
            lambda u, c=comp: c.encode(u, None, None, jax.random.PRNGKey(0))[0],
            {"b": jnp.zeros((2, 30)), "w": jnp.zeros((2, 40, 30))},
        )
        real = sum(math.prod(a.shape[1:]) * a.dtype.itemsize for a in payload)
        assert comp.layout.payload_bytes == real, options
        lay = comp.layout
        assert real == payload_bytes(
            dense_size=lay.dense_size, k=lay.k, index_bits=lay.index_bits,
            bits=comp.config.bits, shared_range=comp.config.shared_range is not None,
        )


def test_help_shows_the_documentation_of_every_compressor_function():
    comp = fk.compressor({"w": jnp.zeros((64,))}, top_k_count=4)
    for name in ("encode", "aggregate", "finalize", "decode", "round"):
        text = pydoc.render_doc(getattr(comp, name), renderer=pydoc.plaintext)
        assert "Alias for field" not in text
        assert getattr(fk.Compressor, name).__doc__.strip().splitlines()[0] in text
    round_doc = pydoc.render_doc(comp.round, renderer=pydoc.plaintext)
    for word in ("chunk_size", "mesh", "RoundResult", "client_ids"):
        assert word in round_doc
    assert "top_k_fraction" in pydoc.render_doc(fk.compressor, renderer=pydoc.plaintext)


def test_metrics_fields_are_documented_and_as_dict_keys_are_field_names():
    comp = fk.compressor({"w": jnp.zeros((64,))}, top_k_count=4)
    metrics = comp.round({"w": jnp.ones((3, 64))}, jax.random.PRNGKey(0)).metrics
    as_dict = metrics.as_dict()
    scalar = [f for f in metrics._fields
              if f not in ("bytes_per_client", "excluded", "residual_norm")]
    assert list(as_dict) == [*scalar, "uploaded_bytes", "compression_ratio"]
    for field in metrics._fields:
        assert f"{field}:" in fk.RoundMetrics.__doc__
    assert "uploaded_bytes" in pydoc.render_doc(fk.RoundMetrics, renderer=pydoc.plaintext)
    assert as_dict["uncompressed_bytes_per_client"] == 64 * 4 == comp.layout.uncompressed_bytes
    assert as_dict["payload_bytes_per_client"] == comp.layout.payload_bytes
    assert as_dict["uploaded_bytes"] == 3 * comp.layout.payload_bytes
    assert as_dict["compression_ratio"] == pytest.approx(256 / comp.layout.payload_bytes)
    assert not hasattr(comp.layout, "dense_bytes")
    np.testing.assert_array_equal(metrics.bytes_per_client, [comp.layout.payload_bytes] * 3)


def test_compiled_rounds_are_kept_in_a_bounded_cache():
    from fedkernels._pipeline import builder
    from fedkernels._pipeline import round as rnd

    cache = rnd.BoundedCache(2)
    made = []
    for key in ("a", "b", "a", "c", "d"):
        cache.get(key, lambda key=key: made.append(key) or key.upper())
    assert made == ["a", "b", "c", "d"] and len(cache) == 2  # "a" reused, then evicted
    assert builder._compiled.cache_info().maxsize is not None
    comp = fk.compressor({"w": jnp.zeros((8,))})
    x = {"w": jnp.ones((2, 8))}
    for _ in range(builder.ROUND_CACHE_SIZE + 2):  # a new function object every round
        comp.round(lambda ids, x=x: x, jax.random.PRNGKey(0), client_ids=jnp.arange(2))
    assert len(comp._compiled.rounds) == builder.ROUND_CACHE_SIZE


def test_backend_and_radix_are_static_parts_of_the_config():
    cpu = fk.compressor({"w": jnp.zeros((8,))}, backend="cpu")
    gpu = fk.compressor({"w": jnp.zeros((8,))}, backend="gpu")
    assert cpu.config.radix == fk.RadixConfig(rows="map", cumsum=cpu.config.radix.cumsum)
    assert gpu.config.radix.rows == "vmap" and gpu.config.radix.cumsum == "scan"
    assert cpu.config != gpu.config and hash(cpu.config) != hash(gpu.config)
    assert fk.compressor({"w": jnp.zeros((8,))}).config.backend == jax.default_backend()
    with pytest.raises(TypeError, match="radix must be a RadixConfig"):
        fk.compressor({"w": jnp.zeros((8,))}, radix="vmap")
