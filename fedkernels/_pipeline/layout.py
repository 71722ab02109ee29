"""The static layout of a model: which leaves are compressed, k, and the payload's size.

The flat vector (leaves concatenated in `jax.tree_util` order) splits into a *sparse*
segment (leaves with more than `dense_threshold` elements: selected, quantized, with a
residual) and a *dense* segment (the small leaves, sent as float32). `make_layout` builds
the whole `Layout` in one step, payload size included (`payload_bytes`, checked against the
arrays the encoder really produces by the tests).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedkernels._flatten import Unflatten
from fedkernels._pipeline.config import CompressorConfig
from fedkernels._quantize import packed_words

FLOAT32_BYTES = 4
WORD_BYTES = 4  # packed indices and codes travel in uint32 words
SELECTORS = ("none", "top_k", "random_k")


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
    segment (leaves with more than `dense_threshold` elements: selected, quantized, with
    residual) and a *dense* segment (the small leaves, sent as float32).
    """

    unflatten: Unflatten
    leaf_slices: tuple[tuple[int, int, bool], ...]  # (start, stop, is_sparse) per leaf
    size: int  # d, all parameters
    sparse_size: int  # d_s, parameters in large leaves (the residual's length)
    dense_size: int  # d_d = d - d_s
    k: int  # coordinates sent from the sparse segment (d_s when nothing is selected)
    index_bits: int  # bits per packed index (0 when no selection)
    selector: str  # "top_k", "random_k" or "none" (every coordinate of the segment sent)
    payload_bytes: int  # bytes one client uploads

    @property
    def dense_bytes(self) -> int:
        """Bytes of the uncompressed float32 update, the compression ratio's baseline."""
        return self.size * FLOAT32_BYTES

    @property
    def compression_ratio(self) -> float:
        return self.dense_bytes / self.payload_bytes if self.payload_bytes else float("inf")


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
    unflatten = Unflatten(treedef, tuple(shapes), tuple(dtypes), np.dtype(np.float32))
    slices, start, sparse_size = [], 0, 0
    for shape in shapes:
        n = math.prod(shape)
        is_sparse = n > config.dense_threshold
        slices.append((start, start + n, is_sparse))
        sparse_size += n if is_sparse else 0
        start += n
    size = start
    if config.top_k is None or sparse_size == 0:
        k, index_bits = sparse_size, 0
    else:
        if isinstance(config.top_k, int):
            if config.top_k > sparse_size:
                raise ValueError(
                    f"top_k must be in [1, {sparse_size}] (elements in leaves above "
                    f"dense_threshold={config.dense_threshold}), got {config.top_k}"
                )
            k = config.top_k
        else:
            k = max(1, int(round(config.top_k * sparse_size)))
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
