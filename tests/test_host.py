"""`fedkernels.host.keep_host_memory`: applied on Linux/glibc, reversible, reported; results
unchanged."""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedkernels as fk
from fedkernels import host


def test_keep_host_memory_applies_and_restores():
    jnp.zeros(1).block_until_ready()  # the backend has started
    try:
        if sys.platform.startswith("linux") and host._libc() is not None:
            with pytest.warns(RuntimeWarning, match="before the first JAX computation"):
                applied = host.keep_host_memory()
        else:
            applied = host.keep_host_memory()
        assert isinstance(applied, bool)
        if sys.platform.startswith("linux") and host._libc() is not None:
            assert applied and host.host_memory_kept()
        # Kernels give the same results with warm buffers (nothing but allocation changes).
        x = jax.random.normal(jax.random.PRNGKey(0), (3, 5000))
        got = jax.jit(lambda a: fk.top_k(a, 50))(x)
        want_idx = np.sort(np.argsort(-np.abs(np.asarray(x)), axis=1, kind="stable")[:, :50])
        np.testing.assert_array_equal(np.asarray(got[1]), want_idx)
        assert float(jnp.sum(jnp.abs(got[0]))) > 0
    finally:
        restored = host.keep_host_memory(False)
    assert not host.host_memory_kept()
    assert restored == applied


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_without_glibc_nothing_changes(monkeypatch):
    monkeypatch.setattr(host, "_libc", lambda: None)
    assert host.keep_host_memory() is False
    assert not host.host_memory_kept()


_FAULTS_SCRIPT = """
import resource, sys
import fedkernels as fk
from fedkernels import host
if sys.argv[1] == "keep":
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # called before any computation: no warning
        assert host.keep_host_memory()
import jax, jax.numpy as jnp
x = jnp.ones((25, 1_000_000), jnp.float32)  # 100 MB: far above glibc's mmap threshold
neg = jax.jit(lambda a: -a)
faults = []
for _ in range(16):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    y = neg(x)
    y.block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    del y
print(min(faults[8:]))
"""


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or host._libc() is None, reason="glibc only"
)
def test_kept_memory_reuses_large_buffers_on_every_stack():
    """With `keep_host_memory()` called first, a jitted op's 100 MB output reuses a warm buffer
    (no page faulted in), on jax 0.4.30 (main-thread allocations) and jax 0.10.2 (worker
    threads, which need the single arena). Without it, every call faults all ~24,400 pages in.
    The fewest faults of calls 9-16 are compared: the heap grows over the first calls (up to
    9 here: a freed block that is just too small for the next aligned request), and a call
    that grows it faults the new part in."""
    import subprocess

    def faults(mode: str) -> int:
        out = subprocess.run(
            [sys.executable, "-c", _FAULTS_SCRIPT, mode],
            capture_output=True, text=True, check=True,
        )
        return int(out.stdout.split()[-1])

    pages = 25_000_000 * 4 // 4096
    assert faults("default") > pages // 2
    assert faults("keep") < pages // 100


_RELEASE_SCRIPT = """
import sys
from fedkernels import host
assert host.keep_host_memory()
import numpy as np

def resident():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

base = resident()
big = np.ones(50_000_000, np.float32)  # 200 MB from the heap (mmap is off)
small = np.ones(10, np.float32)  # allocated above it: the heap's top is not free
del big
kept = resident() - base
released = host.release_host_memory()
print(kept, resident() - base, released)
"""


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or host._libc() is None, reason="glibc only"
)
def test_release_host_memory_returns_what_kept_memory_holds():
    """A freed 200 MB buffer stays resident with `keep_host_memory()` (the heap is never
    trimmed) until `release_host_memory()` gives it back, even below a live allocation."""
    import subprocess

    out = subprocess.run(
        [sys.executable, "-c", _RELEASE_SCRIPT], capture_output=True, text=True, check=True
    )
    kept, after, released = out.stdout.split()
    assert int(kept) > 150e6, out.stdout
    assert int(after) < 50e6, out.stdout
    assert released == "True"


def test_host_setting_lives_in_its_own_module():
    """The process-wide setting is `fedkernels.host`, not a kernel: no top-level names."""
    assert fk.host is host and callable(host.keep_host_memory)
    for name in ("keep_host_memory", "host_memory_kept", "release_host_memory"):
        assert not hasattr(fk, name), name
        assert name not in fk.__all__


def test_keep_host_memory_takes_a_bool():
    """`keep_host_memory("False")` turned the setting on (any truthy value did)."""
    with pytest.raises(TypeError, match="enable must be a bool, got 'False'"):
        host.keep_host_memory("False")
