"""fedkernels.tff imports lazily: no TensorFlow for `import fedkernels` or the numpy bridge,
and a clear ImportError naming the `tff` extra when TFF is missing. Runs on both stacks."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
        timeout=300,
    )


def test_import_does_not_import_tensorflow():
    result = _run(
        """
        import sys
        import fedkernels, fedkernels.tff
        bridge = fedkernels.tff.MaskedMeanProcess()
        assert "tensorflow" not in sys.modules, "tensorflow imported"
        assert "tensorflow_federated" not in sys.modules, "tensorflow_federated imported"
        print("ok")
        """
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_missing_tff_names_the_extra():
    # Block the imports, as on a machine without TFF (the newest-jax stack is one).
    result = _run(
        """
        import sys
        sys.modules["tensorflow_federated"] = None
        sys.modules["tensorflow"] = None
        import fedkernels.tff
        try:
            from fedkernels.tff import MaskedMeanFactory
        except ImportError as err:
            print(err)
        else:
            raise SystemExit("no ImportError")
        """
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "pip install fedkernels[tff]" in result.stdout


def test_unknown_name_is_attribute_error():
    import fedkernels.tff

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        fedkernels.tff.nope  # noqa: B018


# A child started from a background shell inherits SIGINT ignored (CI may run us so), so each
# child sets its SIGINT handler itself: ignored, or Python's own KeyboardInterrupt.
@pytest.mark.parametrize(
    "handler, timeout, returncode",
    [
        ("SIG_IGN", 1.0, -signal.SIGKILL),  # SIGINT did nothing: killed after the timeout
        # SIGINT was enough: an uncaught KeyboardInterrupt ends Python by SIGINT itself.
        ("default_int_handler", 30.0, -signal.SIGINT),
    ],
)
def test_stop_process_kills_a_worker_that_ignores_sigint(handler, timeout, returncode):
    """`stop_process`: SIGINT first; a process still running after the timeout is killed, so
    stopping TFF's workers never hangs (a worker_binary ignored SIGINT for minutes)."""
    from fedkernels.tff import _deps

    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(
            f"""
            import signal, time
            signal.signal(signal.SIGINT, signal.{handler})
            print("ready", flush=True)
            time.sleep(120)
            """
        )],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert child.stdout.readline().strip() == "ready"  # the handler is set from here on
        _deps.stop_process(child, timeout=timeout)
        assert child.returncode == returncode
    finally:
        if child.poll() is None:
            child.kill()
        child.stdout.close()


def test_stopping_workers_at_exit_is_registered_once():
    """Every module that starts TFF computations asks for it; one exit handler results (each
    run scans the heap for TFF's worker handles)."""
    import atexit

    from fedkernels.tff import _deps

    _deps.stop_local_workers_at_exit()
    registered = atexit._ncallbacks()
    _deps.stop_local_workers_at_exit()
    assert atexit._ncallbacks() == registered
    assert _deps._STOP_AT_EXIT == [True]
