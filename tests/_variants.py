"""Radix select's backend variants, each tested on the stack whose jax makes it a default.

`fedkernels._radix.for_backend` picks rows="map" on CPU and rows="vmap" on GPU/TPU, and
cumsum="matmul" on the CPU runtime of jaxlib < 0.4.32 (the locked TFF stack), cumsum="scan"
elsewhere. GPU/TPU machines run the newest jax (the second stack of `python3 dev.py test`),
so the batched rows and the scan prefix sum are tested there, the matmul prefix sum on the
locked stack, and rows="map" (every CPU's default) on both. A test parametrized with
`variants(...)` shows the skipped variant with the reason on the other stack.
"""

from __future__ import annotations

import pytest

from fedkernels import _radix

# The library's own rule decides which stack this is (its CPU default on this jax).
OLD_CPU_RUNTIME = _radix.for_backend("cpu").cumsum == "matmul"

_SKIPS = {
    "vmap": (OLD_CPU_RUNTIME, "rows='vmap' (the GPU/TPU default) is tested on the newest-jax "
                              "stack, which GPU/TPU machines run"),
    "scan": (OLD_CPU_RUNTIME, "cumsum='scan' (the default from jaxlib 0.4.32) is tested on the "
                              "newest-jax stack"),
    "matmul": (not OLD_CPU_RUNTIME, "cumsum='matmul' (the default of the CPU runtime of "
                                    "jaxlib < 0.4.32) is tested on the locked stack"),
}


def marks(name: str) -> object:
    """The skip mark of variant `name` ("vmap", "scan", "matmul"; any other runs everywhere)."""
    skip, reason = _SKIPS.get(name, (False, ""))
    return pytest.mark.skipif(skip, reason=reason)


def variant(name: str, *values: object, id: str | None = None) -> object:
    """`pytest.param(*values or name)` skipped on the stack that does not default to `name`."""
    return pytest.param(*(values or (name,)), id=id, marks=marks(name))


def variants(*names: str) -> list:
    """Parameters for a `rows` ("map", "vmap") or cumsum `mode` ("matmul", "scan") argument."""
    return [variant(name) for name in names]
