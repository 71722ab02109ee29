"""Host (CPU) memory settings that decide how fast XLA:CPU kernels run on large arrays.

Measured here (jax 0.4.30, 2 cores, glibc): a jitted `a + b` on two float32 `[20, 1e6]`
arrays takes 40 to 45 ms, against 7 ms when its output goes to a donated buffer and 10 ms with
this setting. The difference is page faults. XLA:CPU allocates every output and temporary
buffer with `malloc`, and glibc serves allocations above its mmap threshold (at most 32 MB)
with a fresh `mmap`: every page of every large buffer is faulted in again on every call and
unmapped when it is freed.

`keep_host_memory()` tells glibc to serve large allocations from the heap and keep freed memory
instead of returning it to the kernel, so buffers are reused warm. The cost is that the
process's resident memory stays at its peak. It changes a process-wide setting, so it is
opt-in: the benchmarks and the simulation call it, importing fedkernels never does.

jax 0.10.2 does not go through glibc for large buffers: `strace` shows an `mmap` of every
400 MB output on every call whatever this setting, and each call takes 97,657 minor page
faults (a jitted negation of 1e8 float32: 5.6 GB/s read+write, against 24 GB/s on jax 0.4.30
with this setting; measured 2026-12-02). There, the setting only helps NumPy, and the bench's
copy bandwidth on the device comes out at about 5.5 GB/s.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

# mallopt parameters (glibc malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_DEFAULT_MMAP_MAX = 65536
_DEFAULT_TRIM_THRESHOLD = 128 * 1024

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
    cost more than the kernel itself (see this module's docstring for the measurement).
    `enable=False` restores glibc's defaults. Process-wide and opt-in.

    Returns:
      True if the setting was applied (Linux with glibc), False otherwise (nothing changed).

    >>> keep_host_memory(False) in (True, False)
    True
    """
    libc = _libc()
    if libc is None:
        return False
    if enable:
        ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 2**30) == 1
    else:
        ok = (
            libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX) == 1
            and libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD) == 1
        )
    _state["enabled"] = bool(enable and ok)
    return bool(ok)


def host_memory_kept() -> bool:
    """Whether `keep_host_memory()` is in effect in this process."""
    return _state["enabled"]
