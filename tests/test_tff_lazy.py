"""fedkernels.tff imports lazily: no TensorFlow for `import fedkernels` or the numpy bridge,
and a clear ImportError naming the `tff` extra when TFF is missing. Runs on both stacks."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap


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
    import pytest

    import fedkernels.tff

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        fedkernels.tff.nope  # noqa: B018


def test_a_worker_that_ignores_sigint_is_killed():
    """`stop_process`: SIGINT first; a process still running after the timeout is killed, so
    stopping TFF's workers never hangs (a busy worker_binary ignored SIGINT for minutes)."""
    from fedkernels.tff import _deps

    stubborn = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(
            """
            import signal, time
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            print("ready", flush=True)
            time.sleep(120)
            """
        )],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert stubborn.stdout.readline().strip() == "ready"  # SIGINT is ignored from here on
        _deps.stop_process(stubborn, timeout=1.0)
        assert stubborn.returncode == -9  # SIGKILL, after SIGINT did nothing
    finally:
        if stubborn.poll() is None:
            stubborn.kill()
        stubborn.stdout.close()

    # A child started from a background shell inherits SIGINT ignored (CI may run us so), so
    # this one sets Python's own handler explicitly.
    polite = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(
            """
            import signal, time
            signal.signal(signal.SIGINT, signal.default_int_handler)
            print("ready", flush=True)
            time.sleep(120)
            """
        )],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert polite.stdout.readline().strip() == "ready"
        _deps.stop_process(polite, timeout=30.0)
        # SIGINT was enough: an uncaught KeyboardInterrupt ends Python by SIGINT itself.
        assert polite.returncode == -signal.SIGINT
    finally:
        if polite.poll() is None:
            polite.kill()
        polite.stdout.close()
