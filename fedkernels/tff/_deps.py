"""Lazy access to TensorFlow and TensorFlow Federated, with one clear error when missing.

`import fedkernels` never imports TensorFlow; `import fedkernels.tff` does not either. The
first use of a TFF adapter imports `tensorflow`, `tensorflow_federated` and `jax2tf`.
"""

from __future__ import annotations

import atexit
import importlib
import importlib.util
import signal
import subprocess
from types import ModuleType

INSTALL_HINT = (
    "fedkernels.tff needs TensorFlow Federated (tensorflow-federated==0.87.0, Python 3.11). "
    "Install the extra: pip install fedkernels[tff]"
)


def _load(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise ImportError(f"{INSTALL_HINT} (import of {name!r} failed: {err})") from err


def tf() -> ModuleType:
    """The `tensorflow` module."""
    return _load("tensorflow")


def tff() -> ModuleType:
    """The `tensorflow_federated` module."""
    return _load("tensorflow_federated")


def jax2tf() -> ModuleType:
    """`jax.experimental.jax2tf` (needs TensorFlow)."""
    tf()
    return _load("jax.experimental.jax2tf")


def available() -> bool:
    """True when TensorFlow Federated can be imported (without importing it)."""
    return importlib.util.find_spec("tensorflow_federated") is not None


def stop_local_workers() -> int:
    """Stops the C++ worker processes that TFF's local execution context started.

    TFF 0.87 stops its worker in `ServiceManager.__del__`, which at interpreter exit runs after
    the `subprocess` module is torn down (`AttributeError: 'NoneType' object has no attribute
    'Popen'`), so the worker outlives the Python process. `fedkernels.tff` registers this with
    `atexit` (which runs before that teardown). Only workers this process started are touched,
    by their own process handles. Returns how many were stopped.
    """
    import gc

    stopped = 0
    for obj in gc.get_objects():
        if type(obj).__name__ != "ServiceManager" or not hasattr(obj, "_process"):
            continue
        process = obj._process
        if isinstance(process, subprocess.Popen) and process.poll() is None:
            stop_process(process)
            stopped += 1
        obj._process = None
    return stopped


_STOP_AT_EXIT: list[bool] = []


def stop_local_workers_at_exit() -> None:
    """Registers `stop_local_workers` with `atexit`, once per process (the modules that
    start TFF computations each call this)."""
    if not _STOP_AT_EXIT:
        atexit.register(stop_local_workers)
        _STOP_AT_EXIT.append(True)


def stop_process(process: subprocess.Popen, timeout: float = 2.0) -> None:
    """SIGINT (the worker's own shutdown, quick when it works), then SIGKILL if it has not
    exited after `timeout` seconds: a worker started from a background shell inherits SIGINT
    ignored and would otherwise keep its memory and a core, or hold up the exit of the
    process that waits for it."""
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=timeout)
