"""What every staged `tff.aggregators` factory of fedkernels.tff shares.

The kernels with real work (quantization, top-k, scatter) run as `staged(kernel)`:
`jax2tf.convert(..., native_serialization=False, enable_xla=False, with_gradient=False)`, the
form TFF 0.87's C++ worker can run (no PyFunc, no XLA ops; see `_kernels.py` for which
primitives convert). The per-coordinate steps of the masked mean (compare, select, add) and
concatenation are TensorFlow ops, so every leaf keeps its dtype whatever JAX's x64 flag says;
`fedkernels.masked_sum` / `fedkernels.flatten` are their references in the tests. The
federated plumbing (`federated_map`, `federated_aggregate`, inner processes) follows TFF's
own factories (`mean.py`, `concat.py`, `encoded.py`).

Here: the TensorFlow/TFF handles, `staged`, value-type checks and layouts, and the
per-client weight and contribution steps in TensorFlow ops. The factories live in `_mean.py`,
`_quantize.py`, `_top_k.py`, `_concat.py` and `_compression.py`.
"""

from __future__ import annotations

import collections
import math
from typing import Any

import jax
import numpy as np

import fedkernels as fk
from fedkernels.tff import _deps
from fedkernels.tff import _kernels as kernels

tf = _deps.tf()
tff = _deps.tff()
jax2tf = _deps.jax2tf()
_deps.stop_local_workers_at_exit()

_INDEX_BYTES = 4  # int32 indices


def staged(fn: Any, x64: bool = False) -> Any:
    """`fn` (a JAX function) as a TensorFlow function that TFF's worker can execute; with
    `x64`, traced in JAX's 64-bit mode (for float64 values, `_Layout.x64`)."""
    converted = jax2tf.convert(
        fn, native_serialization=False, enable_xla=False, with_gradient=False
    )
    if not x64:
        return converted

    def run(*args: Any) -> Any:
        with kernels.enable_x64():
            return converted(*args)

    return run


# ----------------------------------------------------------------------------------------------
# Types


def _specs(value_type: Any) -> Any:
    """The Python structure of `tf.TensorSpec`s for a TFF value type (as `concat.py` does)."""
    if isinstance(value_type, tff.TensorType):
        return tf.TensorSpec(value_type.shape, value_type.dtype)
    if isinstance(value_type, tff.StructWithPythonType) and tff.types.is_structure_of_tensors(
        value_type
    ):
        return tff.types.structure_from_tensor_type_tree(
            lambda t: tf.TensorSpec(t.shape, t.dtype), value_type
        )
    raise TypeError(
        "value_type must be a tff.TensorType or a tff.StructWithPythonType of tensors, "
        f"got {value_type!r}"
    )


def _check_floats(value_type: Any) -> None:
    if not tff.types.is_structure_of_floats(value_type):
        raise TypeError(f"all tensors in value_type must be floating, got {value_type}")


def _check_value_type(value_type: Any) -> None:
    """TFF's `MeanFactory` checks: a tensor or struct of tensors, all floating."""
    if not isinstance(value_type, tff.TensorType | tff.StructType) or not (
        tff.types.is_structure_of_tensors(value_type)
    ):
        raise TypeError(
            "value_type must be a tff.TensorType or a tff.StructType of tensors, "
            f"got {value_type!r}"
        )
    _check_floats(value_type)


def _check_weight_type(weight_type: Any) -> None:
    """A scalar integer or floating weight type, as TFF's weighted factories take."""
    if not isinstance(weight_type, tff.TensorType) or weight_type.shape not in ((), None):
        raise TypeError(f"weight_type must be a scalar tff.TensorType, got {weight_type!r}")
    dtype = np.dtype(weight_type.dtype)
    if not (np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.integer)):
        raise TypeError(f"weight_type must be integer or floating, got {weight_type!r}")


class _Layout:
    """Leaves of a value type in `jax.tree_util` order, and its `fedkernels.flatten` layout."""

    def __init__(self, value_type: Any):
        self.value_type = value_type
        self.specs = _specs(value_type)
        leaves, self.treedef = jax.tree_util.tree_flatten(self.specs)
        self.shapes = [tuple(int(n) for n in s.shape) for s in leaves]
        self.dtypes = [np.dtype(s.dtype.as_numpy_dtype) for s in leaves]
        self.sizes = [math.prod(s) for s in self.shapes]
        zeros = [np.zeros(s, t) for s, t in zip(self.shapes, self.dtypes, strict=True)]
        with kernels.x64_for(self.dtypes):
            _, self.unflatten = fk.flatten(jax.tree_util.tree_unflatten(self.treedef, zeros))
        self.d = self.unflatten.size
        self.flat_dtype = np.dtype(self.unflatten.flat_dtype)
        # A float64 leaf makes the flat vector float64: its JAX steps then run in 64-bit mode
        # (`staged(..., x64=True)`), whatever the user's x64 flag says.
        self.x64 = self.flat_dtype == np.float64
        self.flat_type = tff.TensorType(self.flat_dtype, [self.d])


def _server_constant(value: Any) -> Any:
    return tff.federated_value(value, tff.SERVER)


# ----------------------------------------------------------------------------------------------
# Client weights and contributions, in TensorFlow ops
#
# The per-client pieces of the masked mean are a compare, a select and an add per coordinate.
# They are written with TensorFlow ops (not a converted JAX graph) because they then run in
# every leaf's own dtype (float16/32/64, whatever JAX's x64 flag says) and as TF's native
# kernels in TFF's worker; `fedkernels.masked_sum` is the reference they are tested against.


def _compiled(fn: Any) -> Any:
    """`fn` as one XLA-compiled TensorFlow function (TFF's worker runs it: it carries
    `_XlaCompile`/`_XlaRun`), so a client's compare/select/add steps fuse into one pass."""
    return tf.function(fn, jit_compile=True, autograph=False)


def _leaves(structure: Any) -> list:
    """Leaves in `jax.tree_util` order (insertion order for an OrderedDict, unlike `tf.nest`),
    the order the JAX kernels and the numpy bridge see, so both draw the same random streams."""
    return jax.tree_util.tree_leaves(structure)


def _pack(structure: Any, leaves: list) -> Any:
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(structure), leaves)


def _valid_weight(weight: Any) -> tuple[Any, Any]:
    """`(ok, weight or 0)`: a weight counts when it is finite and >= 0.

    A negative, NaN or infinite weight is the client's own error: that client is left out (its
    value and weight count nowhere) and the `invalid_weights` measurement counts it, so it
    never changes another client's contribution (a negative weight would cancel a valid
    client's weight in the per-coordinate denominator).
    """
    ok = weight >= tf.zeros_like(weight)
    if weight.dtype.is_floating:
        ok = tf.logical_and(ok, tf.math.is_finite(weight))
    return ok, tf.where(ok, weight, tf.zeros_like(weight))


def _contributes(x: Any) -> Any:
    """bool mask of the coordinates a client contributes to: nonzero and finite."""
    return tf.logical_and(tf.not_equal(x, tf.zeros_like(x)), tf.math.is_finite(x))


def _denominator_dtype(weight_dtype: Any) -> Any:
    """Per-coordinate weight sums keep the weight's dtype (TFF's `MeanFactory` sums weights in
    their own dtype and casts the sum to the value dtype when dividing)."""
    return tf.as_dtype(weight_dtype)


def _divide(numerator: Any, denominator: Any, nan_fill: Any) -> Any:
    """`numerator / denominator` per coordinate; where the denominator is 0, `nan_fill`
    (NaN when the whole weight is 0 and `no_nan_division=False`, else 0)."""
    has = denominator > tf.zeros_like(denominator)
    safe = tf.where(has, denominator, tf.ones_like(denominator))
    fill = tf.cast(nan_fill, numerator.dtype)
    return tf.where(has, numerator / tf.cast(safe, numerator.dtype), fill)


def _contributor_summary(contributions: Any, denominators: list, counts: list | None) -> Any:
    d = sum(int(np.prod(x.shape.as_list())) for x in denominators)
    summary = collections.OrderedDict(
        mean=tf.cast(contributions, tf.float32) / np.float32(max(d, 1)),
        uncovered=tf.add_n(
            [tf.reduce_sum(tf.cast(tf.equal(x, tf.zeros_like(x)), tf.int32))
             for x in denominators] or [tf.constant(0, tf.int32)]
        ),
    )
    if counts is not None:
        flat = tf.concat([tf.reshape(c, [-1]) for c in counts], 0)
        has = tf.size(flat) > 0
        summary["min"] = tf.cond(has, lambda: tf.reduce_min(flat), lambda: tf.constant(0))
        summary["max"] = tf.cond(has, lambda: tf.reduce_max(flat), lambda: tf.constant(0))
    return summary
