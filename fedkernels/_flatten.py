"""Whole-model flattening: a pytree of tensors to one vector and back, batched over clients."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fedkernels import _validate


@dataclasses.dataclass(frozen=True)
class Unflatten:
    """Inverse of `flatten`: `flat[*batch, d]` back to the original pytree.

    Hashable and comparable by value (treedef, shapes, dtypes), so it can be closed over or
    passed as a static argument to `jax.jit` without retracing across rounds. Any leading batch
    shape is accepted: the same object restores a client batch `[C, d]` or the server's `[d]`.
    """

    treedef: Any
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[np.dtype, ...]
    flat_dtype: np.dtype

    @property
    def size(self) -> int:
        """d, the length of the flat vector."""
        return sum(math.prod(s) for s in self.shapes)

    def __call__(self, flat: Any) -> Any:
        flat = _validate.as_array("flat", flat)
        d = self.size
        if flat.ndim < 1 or flat.shape[-1] != d:
            raise ValueError(f"flat must have shape [..., {d}], got {tuple(flat.shape)}")
        if flat.dtype != self.flat_dtype:
            raise TypeError(
                f"flat must have dtype {self.flat_dtype} (the dtype flatten returned), "
                f"got {flat.dtype}"
            )
        batch = flat.shape[:-1]
        leaves = []
        offset = 0
        for shape, dtype in zip(self.shapes, self.dtypes, strict=True):
            size = math.prod(shape)
            piece = flat[..., offset : offset + size].reshape(*batch, *shape)
            leaves.append(_cast_back(piece, dtype))
            offset += size
        return jax.tree_util.tree_unflatten(self.treedef, leaves)


def _cast_back(piece: jax.Array, dtype: np.dtype) -> jax.Array:
    if piece.dtype == dtype:
        return piece
    if jnp.issubdtype(dtype, jnp.integer) and jnp.issubdtype(piece.dtype, jnp.floating):
        # Round to nearest rather than truncate, so a float update that lands near an integer
        # (e.g. an averaged count) restores to it.
        return jnp.round(piece).astype(dtype)
    return piece.astype(dtype)


def flatten(tree: Any, batch_ndim: int = 0, dtype: Any = None) -> tuple[jax.Array, Unflatten]:
    """Flattens a pytree of arrays into one vector per batch element.

    Follows `jax.flatten_util.ravel_pytree`, with a leading batch (client) axis.

    Args:
      tree: a pytree whose leaves are arrays shaped `[*batch, *leaf_shape]`, every leaf with
        the same `batch_ndim` leading dimensions. Leaves may have different dtypes and may be
        zero-sized.
      batch_ndim: static int >= 0, how many leading dimensions are batch dimensions.
      dtype: dtype of the flat vector, as JAX stores it (float64 is float32 and int64 int32
        unless `jax_enable_x64` is on). Default: the JAX promotion of all leaf dtypes
        (`jnp.result_type`), widened to at least float32 when integer and floating leaves mix:
        a float32 tree gives float32, int32 + float32 or int32 + float16 gives float32,
        bfloat16 + float16 gives float32, float16 alone stays float16, and a tree of only
        integers stays integer. The empty tree gives float32.

    Returns:
      `(flat, unflatten)`: `flat` is `[*batch, d]` with `d` the total leaf size, leaves
      concatenated in `jax.tree_util` order, each raveled in C order. `unflatten(flat)`
      restores structure, shapes and dtypes; values round-trip bit for bit whenever the flat
      dtype holds them (always for a single-dtype tree; integers above 2**24 do not fit
      float32). Casts back to an integer leaf round to nearest. `unflatten` accepts any
      leading batch shape.

    Raises:
      ValueError: if `batch_ndim` is negative or leaves disagree on the batch shape.
      TypeError: if a leaf is not an array, or `unflatten` gets the wrong dtype.

    >>> import jax.numpy as jnp
    >>> flat, unflatten = flatten({"b": jnp.zeros((2, 3)), "w": jnp.ones((2, 2, 2))},
    ...                           batch_ndim=1)
    >>> flat.shape, flat.dtype
    ((2, 7), dtype('float32'))
    >>> unflatten(flat)["w"].shape
    (2, 2, 2)
    >>> unflatten(flat[0])["b"].shape
    (3,)
    """
    batch_ndim = _validate.static_int("batch_ndim", batch_ndim, 0)
    paths_and_leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    names = [f"tree{jax.tree_util.keystr(path)}" for path, _ in paths_and_leaves]
    arrays = []
    for name, (_, leaf) in zip(names, paths_and_leaves, strict=True):
        arr = _validate.as_array(name, leaf)
        if not (jnp.issubdtype(arr.dtype, jnp.number) or arr.dtype == jnp.bool_):
            raise TypeError(f"{name} must be numeric, got dtype {arr.dtype}")
        arrays.append(arr)
    batch = None
    for name, arr in zip(names, arrays, strict=True):
        if arr.ndim < batch_ndim:
            raise ValueError(
                f"{name} has shape {tuple(arr.shape)}, fewer than batch_ndim="
                f"{batch_ndim} dimensions"
            )
        leaf_batch = tuple(arr.shape[:batch_ndim])
        if batch is None:
            batch = leaf_batch
        elif leaf_batch != batch:
            raise ValueError(
                f"leaves of tree must share the batch shape: {names[0]} has {batch}, "
                f"{name} has {leaf_batch} (batch_ndim={batch_ndim})"
            )
    if dtype is None:
        flat_dtype = jnp.result_type(*arrays) if arrays else jnp.dtype(jnp.float32)
        has_integers = any(not jnp.issubdtype(a.dtype, jnp.floating) for a in arrays)
        if has_integers and jnp.issubdtype(flat_dtype, jnp.floating):
            # JAX promotes int32 + float16 to float16, which cannot hold most int32 values;
            # widen to at least float32 (exact for integers up to 2**24).
            flat_dtype = jnp.promote_types(flat_dtype, jnp.float32)
    else:
        # What JAX will store: float64 is float32 (int64 int32) unless x64 is on, and the
        # unflatten must expect the dtype the flat vector really has.
        flat_dtype = jax.dtypes.canonicalize_dtype(jnp.dtype(dtype))
    batch = batch or ()
    unflatten = Unflatten(
        treedef=treedef,
        shapes=tuple(tuple(a.shape[batch_ndim:]) for a in arrays),
        dtypes=tuple(np.dtype(a.dtype) for a in arrays),
        flat_dtype=np.dtype(flat_dtype),
    )
    if not arrays:
        return jnp.zeros((0,), flat_dtype), unflatten
    pieces = [
        a.reshape(*batch, math.prod(a.shape[batch_ndim:])).astype(flat_dtype) for a in arrays
    ]
    if len(pieces) == 1:
        return pieces[0], unflatten
    return _concatenate(pieces), unflatten


@jax.jit
def _concatenate(pieces: list[jax.Array]) -> jax.Array:
    """`jnp.concatenate(pieces, axis=-1)`, kept out of XLA:CPU's multithreaded loop emitter.

    On XLA:CPU a plain large concatenate can be split across threads and emitted as a
    per-element search over the operands (jaxlib versions differ), while an unsplit
    concatenate is a `memcpy` per piece; XLA:CPU does not split ops inside a conditional's
    branches (bench case `flatten`). So the concatenate runs as both branches of a `lax.cond`
    on a runtime predicate (XLA folds the branch away if the predicate is a constant). Under
    `vmap` the predicate is batched and both branches run: correct, slower.
    """
    first = next((p for p in pieces if p.size), None)
    if first is None:
        return jnp.concatenate(pieces, axis=-1)
    predicate = first.reshape(-1)[0] == 0  # any runtime value: both branches are the same

    def concatenate(pieces: list[jax.Array]) -> jax.Array:
        return jnp.concatenate(pieces, axis=-1)

    return lax.cond(predicate, concatenate, concatenate, pieces)
