"""`keep_host_memory`: applied on Linux/glibc, reversible, reported; results unchanged."""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedkernels as fk


def test_keep_host_memory_applies_and_restores():
    try:
        applied = fk.keep_host_memory()
        assert isinstance(applied, bool)
        if sys.platform.startswith("linux") and fk._host._libc() is not None:
            assert applied and fk.host_memory_kept()
        # Kernels give the same results with warm buffers (nothing but allocation changes).
        x = jax.random.normal(jax.random.PRNGKey(0), (3, 5000))
        got = jax.jit(lambda a: fk.top_k(a, 50))(x)
        want_idx = np.sort(np.argsort(-np.abs(np.asarray(x)), axis=1, kind="stable")[:, :50])
        np.testing.assert_array_equal(np.asarray(got[1]), want_idx)
        assert float(jnp.sum(jnp.abs(got[0]))) > 0
    finally:
        restored = fk.keep_host_memory(False)
    assert not fk.host_memory_kept()
    assert restored == applied


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_without_glibc_nothing_changes(monkeypatch):
    monkeypatch.setattr(fk._host, "_libc", lambda: None)
    assert fk.keep_host_memory() is False
    assert not fk.host_memory_kept()
