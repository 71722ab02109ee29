"""Host (CPU) memory settings that decide how fast XLA:CPU kernels run on large arrays.

A process-wide glibc setting, not a kernel: it lives here, apart from the kernels in the
`fedkernels` namespace.

XLA:CPU allocates every output and temporary buffer with `malloc`, and glibc serves
allocations above its mmap threshold with a fresh `mmap`: every page of every large buffer is
faulted in again on every call and unmapped when it is freed, which can cost more than the
kernel itself (bench cases `masked_mean` and the pipeline suite's rounds, with and without
`--host-memory keep`).

`keep_host_memory()` tells glibc to serve large allocations from the heap and never to give
freed memory back to the kernel, so buffers are reused warm. The cost is that the
process's resident memory stays at its peak. It changes a process-wide setting, so it is
opt-in: the benchmarks call it, importing fedkernels never does.

Newer jaxlib versions run kernels on worker threads, and glibc gives each thread its own arena
(up to 8 per core). An arena other than the main one serves a block larger than its heaps
with a fresh `mmap` whatever `M_MMAP_MAX` says, so there the mmap setting alone does nothing.
`keep_host_memory()` therefore also sets `M_ARENA_MAX` to 1, which binds every thread that has
not allocated yet to the main arena (`tests/test_host.py` counts the page faults). Threads that
allocated before the call keep their arenas: call it before the first JAX computation. With
one arena, trimming the heap's top makes rounds that alternate different programs grow the
heap again and again, and many threads faulting freshly grown heap in at once are slow: so
nothing is trimmed. The costs: one arena means one lock for every thread's `malloc` (XLA
allocates a few buffers per kernel, not per element), and a call that needs a block bigger
than the heap's largest free one still grows it and faults the new part in.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import warnings

# mallopt parameters (glibc malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_DEFAULT_MMAP_MAX = 65536
_DEFAULT_TRIM_THRESHOLD = 128 * 1024
_NEVER_TRIM = -1  # mallopt's int -1 becomes SIZE_MAX: the heap's top is never trimmed
# glibc's default arena limit on 64-bit, 8 per core (mallopt ignores 0, so it is spelled out).
_DEFAULT_ARENAS_PER_CORE = 8

_state = {"enabled": False}


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt  # noqa: B018 (glibc only: musl has no mallopt)
    except (OSError, AttributeError):
        return None
    return libc


def keep_host_memory(enable: bool = True) -> bool:
    """Keeps freed host memory in the process so XLA:CPU reuses warm buffers (glibc only).

    Large arrays on CPU are otherwise mapped and faulted in afresh on every call, which can
    cost more than the kernel itself (see this module's docstring).
    Call it before the first JAX computation: it also limits glibc to one arena, and the
    threads JAX starts with its backend must not have allocated from their own arenas yet.
    `enable=False` restores glibc's defaults. Process-wide and opt-in.

    Returns:
      True if the setting was applied (Linux with glibc), False otherwise (nothing changed).

    Raises:
      TypeError: `enable` not a bool (`"False"` would otherwise turn it on).

    >>> keep_host_memory(False) in (True, False)
    True
    """
    if not isinstance(enable, bool):
        raise TypeError(f"enable must be a bool, got {enable!r}")
    libc = _libc()
    if libc is None:
        return False
    if enable:
        ok = (
            libc.mallopt(_M_ARENA_MAX, 1) == 1
            and libc.mallopt(_M_MMAP_MAX, 0) == 1
            and libc.mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM) == 1
        )
    else:
        ok = (
            libc.mallopt(_M_ARENA_MAX, _DEFAULT_ARENAS_PER_CORE * (os.cpu_count() or 1)) == 1
            and libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX) == 1
            and libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD) == 1
        )
    _state["enabled"] = bool(enable and ok)
    if enable and ok and _backend_started():
        warnings.warn(
            "keep_host_memory() was called after JAX's backend started: threads that already "
            "allocated keep their own glibc arenas, which map large buffers afresh on every "
            "call (jaxlib versions that run kernels on worker threads); call it before the "
            "first JAX computation",
            RuntimeWarning,
            stacklevel=2,
        )
    return bool(ok)


def _backend_started() -> bool:
    """Whether JAX has created a backend (and its threads) in this process."""
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge
    except ImportError:  # a jax without this module: nothing to tell
        return False
    started = getattr(xla_bridge, "backends_are_initialized", None)
    return bool(started()) if started is not None else False


def release_host_memory() -> bool:
    """Gives the free memory of the process's heap back to the system now (glibc only).

    With `keep_host_memory()` the heap never shrinks: after a phase that needed large
    temporaries, their memory stays resident (and, from one arena, a later phase cannot
    always reuse it). This returns every free page (`malloc_trim(0)`); buffers still in use
    are untouched, and the next large allocations are faulted in afresh once. The setting
    itself stays in effect.

    Returns:
      True if memory was returned, False if there was none to return or this is not glibc.

    >>> release_host_memory() in (True, False)
    True
    """
    libc = _libc()
    if libc is None or not hasattr(libc, "malloc_trim"):
        return False
    return bool(libc.malloc_trim(0))


def host_memory_kept() -> bool:
    """Whether `keep_host_memory()` is in effect in this process."""
    return _state["enabled"]
