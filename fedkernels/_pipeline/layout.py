"""The static layout of a model: which leaves are compressed, k, and the payload's size.

The flat vector (leaves concatenated in `jax.tree_util` order) splits into a *sparse*
segment (leaves with more than `dense_threshold` elements: selected, quantized, with a
residual) and a *dense* segment (the small leaves, sent as float32). `make_layout` builds
the whole `Layout` in one step, payload size included (`payload_bytes`, checked against the
arrays the encoder really produces by the tests).
"""

from __future__ import annotations

import dataclasses
import fractions
import math
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedkernels import _validate
from fedkernels._flatten import Unflatten
from fedkernels._pipeline.config import (
    MIN_COMPRESSED_FRACTION,
    CompressorConfig,
    check_top_k_arguments,
)
from fedkernels._quantize import packed_words

FLOAT32_BYTES = 4
WORD_BYTES = 4  # packed indices and codes travel in uint32 words
SELECTORS = ("none", "top_k", "random_k")


def top_k_size(
    d: int,
    *,
    fraction: float | None = None,
    count: int | None = None,
    names: tuple[str, str] = ("fraction", "count"),
) -> int:
    """k, the coordinates a top-k (or random-k) selection keeps out of `d`: the one rule of
    fedkernels (core compressor and TFF adapters alike).

    Exactly one of `fraction` (in (0, 1]: k = ceil(fraction * d) clipped to [1, d], with
    the fraction taken as written in decimal, so 0.07 of 100 is 7, where the float product
    7.000000000000001 would round up to 8) or `count` (in [1, d]: k = count). `d >= 1`.
    `names` are the caller's names of `fraction` and `count`, for the messages.

    Raises:
      ValueError: both or neither given, `fraction` outside (0, 1], `count` outside [1, d].
      TypeError: `count` not an int, `fraction` not a real number.

    >>> top_k_size(100, fraction=0.07), top_k_size(50176, fraction=0.01), top_k_size(10, count=3)
    (7, 502, 3)
    """
    d = _validate.static_int("d", d, 1)
    check_top_k_arguments(fraction, count, names=names)
    if count is not None:
        return _validate.static_int(names[1], count, 1, d)
    exact = fractions.Fraction(repr(float(fraction))) * d
    return max(1, min(d, math.ceil(exact)))


def payload_bytes(
    *, dense_size: int, k: int, index_bits: int, bits: int | None, shared_range: bool
) -> int:
    """Bytes one client uploads: the row of each `Payload` field.

    Bit-packed indices (`index_bits` each, 0 when every coordinate is sent), the k values as
    float32 (`bits=None`) or bit-packed `bits`-bit codes plus the client's float32 [min, max]
    (not in shared-range mode), and the dense segment as float32.
    """
    size = packed_words(k, index_bits) * WORD_BYTES if index_bits else 0
    if bits is None:
        size += k * FLOAT32_BYTES
    else:
        size += packed_words(k, bits) * WORD_BYTES
        size += 0 if shared_range else 2 * FLOAT32_BYTES
    return size + dense_size * FLOAT32_BYTES


@dataclasses.dataclass(frozen=True)
class Layout:
    """Static sizes of the flattened model and of one client's payload.

    The flat vector (leaves concatenated in `jax.tree_util` order) splits into a *sparse*
    segment (leaves with more than `dense_threshold` elements: selected, quantized, with a
    residual) and a *dense* segment (the small leaves, sent whole as float32). "Dense" means
    that segment only; the whole model as float32 is `uncompressed_bytes`.

    Attributes:
      unflatten: rebuilds a pytree from a flat `[d]` vector.
      leaf_slices: `(start, stop, is_sparse)` of each leaf in the flat vector.
      size: d, the model's parameters.
      sparse_size: d_s, parameters in leaves above `dense_threshold` (compressed; the length
        of a client's residual).
      dense_size: d - d_s, parameters in the small leaves, sent as float32.
      k: coordinates each client sends from the sparse segment (d_s when none is selected).
      index_bits: bits per packed index (0 when every coordinate is sent).
      selector: "top_k", "random_k" or "none" (every coordinate of the sparse segment sent).
      payload_bytes: bytes one client uploads.
    """

    unflatten: Unflatten
    leaf_slices: tuple[tuple[int, int, bool], ...]
    size: int
    sparse_size: int
    dense_size: int
    k: int
    index_bits: int
    selector: str
    payload_bytes: int

    @property
    def uncompressed_bytes(self) -> int:
        """Bytes of one client's whole update as float32 (d * 4), the ratio's baseline."""
        return self.size * FLOAT32_BYTES

    @property
    def compression_ratio(self) -> float:
        """uncompressed_bytes / payload_bytes (inf for an empty payload)."""
        return self.uncompressed_bytes / self.payload_bytes if self.payload_bytes else float("inf")

    @property
    def compressed_fraction(self) -> float:
        """d_s / d: the share of the model's parameters in compressed leaves (1.0 for an
        empty model)."""
        return self.sparse_size / self.size if self.size else 1.0

    def __repr__(self) -> str:
        return (
            f"Layout(d={self.size}, compressed={self.sparse_size} "
            f"({self.compressed_fraction:.1%}), dense={self.dense_size}, "
            f"selector={self.selector}, k={self.k}, index_bits={self.index_bits}, "
            f"payload_bytes={self.payload_bytes}, ratio={self.compression_ratio:.1f}x)"
        )


def _leaf_specs(template: Any) -> tuple[Any, list[tuple[int, ...]], list[np.dtype]]:
    leaves, treedef = jax.tree_util.tree_flatten(template)
    shapes, dtypes = [], []
    for i, leaf in enumerate(leaves):
        if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
            raise TypeError(
                f"leaf {i} of template must be an array or jax.ShapeDtypeStruct, "
                f"got {type(leaf).__name__}"
            )
        shapes.append(tuple(int(n) for n in leaf.shape))
        dtypes.append(np.dtype(leaf.dtype))
    return treedef, shapes, dtypes


def make_layout(template: Any, config: CompressorConfig) -> Layout:
    """The layout of `template` (one client's update) under `config`."""
    treedef, shapes, dtypes = _leaf_specs(template)
    # The mean keeps a floating leaf's dtype; an integer leaf's mean is float32 (rounding
    # it back to an integer would lose it silently: clients sending 0 and 1 would give 0).
    dtypes = [t if np.issubdtype(t, np.floating) else np.dtype(np.float32) for t in dtypes]
    unflatten = Unflatten(treedef, tuple(shapes), tuple(dtypes), np.dtype(np.float32))
    slices, start, sparse_size = [], 0, 0
    for shape in shapes:
        n = math.prod(shape)
        is_sparse = n > config.dense_threshold
        slices.append((start, start + n, is_sparse))
        sparse_size += n if is_sparse else 0
        start += n
    size = start
    _check_coverage(config, size, sparse_size, len(shapes))
    if not config.selects:
        k, index_bits = sparse_size, 0
    else:
        if config.top_k_count is not None and config.top_k_count > sparse_size:
            raise ValueError(
                f"top_k_count must be in [1, {sparse_size}] (elements in leaves above "
                f"dense_threshold={config.dense_threshold}), got {config.top_k_count}"
            )
        k = top_k_size(sparse_size, fraction=config.top_k_fraction, count=config.top_k_count)
        index_bits = max(1, math.ceil(math.log2(sparse_size))) if k < sparse_size else 0
    if index_bits == 0:
        selector = "none"
    else:
        selector = "random_k" if config.random_k else "top_k"
    dense_size = size - sparse_size
    return Layout(
        unflatten=unflatten,
        leaf_slices=tuple(slices),
        size=size,
        sparse_size=sparse_size,
        dense_size=dense_size,
        k=k,
        index_bits=index_bits,
        selector=selector,
        payload_bytes=payload_bytes(
            dense_size=dense_size, k=k, index_bits=index_bits, bits=config.bits,
            shared_range=config.shared_range is not None,
        ),
    )


def _check_coverage(config: CompressorConfig, size: int, sparse_size: int, leaves: int) -> None:
    """Refuses settings that would compress nothing; warns when most of the model would go
    uncompressed (leaves at most `dense_threshold` are sent whole)."""
    if not config.compresses or size == 0:
        return
    asked = ", ".join(
        f"{name}={getattr(config, name)!r}"
        for name in ("top_k_fraction", "top_k_count", "bits")
        if getattr(config, name) is not None
    )
    if sparse_size == 0:
        raise ValueError(
            f"dense_threshold={config.dense_threshold} leaves no leaf to compress: each of the "
            f"{leaves} leaves has at most {config.dense_threshold} elements and is sent whole "
            f"as float32, so {asked} would apply to nothing; lower dense_threshold (0 "
            "compresses every leaf, None chooses by the settings)"
        )
    share = sparse_size / size
    if share < MIN_COMPRESSED_FRACTION:
        warnings.warn(
            f"dense_threshold={config.dense_threshold} leaves {size - sparse_size} of {size} "
            f"parameters uncompressed: {asked} applies to {share:.1%} of the model only "
            "(leaves at most dense_threshold are sent whole as float32); lower "
            "dense_threshold (0 compresses every leaf) to compress more",
            UserWarning,
            stacklevel=4,
        )


def split(layout: Layout, flat: jax.Array) -> tuple[jax.Array, jax.Array]:
    """flat [C, d] -> (sparse [C, d_s], dense [C, d_d]) by static slices."""
    sparse = [flat[:, a:b] for a, b, s in layout.leaf_slices if s and b > a]
    dense = [flat[:, a:b] for a, b, s in layout.leaf_slices if not s and b > a]
    c = flat.shape[0]

    def cat(parts):
        if not parts:
            return jnp.zeros((c, 0), jnp.float32)
        return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)

    return cat(sparse), cat(dense)


def join(layout: Layout, sparse: jax.Array, dense: jax.Array) -> jax.Array:
    """Inverse of `split` for one row: ([d_s], [d_d]) -> [d] in leaf order."""
    parts, s_off, d_off = [], 0, 0
    for a, b, is_sparse in layout.leaf_slices:
        n = b - a
        if is_sparse:
            parts.append(sparse[s_off : s_off + n])
            s_off += n
        else:
            parts.append(dense[d_off : d_off + n])
            d_off += n
    if not parts:
        return jnp.zeros((0,), jnp.float32)
    return jnp.concatenate(parts)
