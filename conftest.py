"""Root pytest configuration: doctest collection of fedkernels/ must not import optional stacks."""

import importlib.util

import pytest

collect_ignore_glob = []
if importlib.util.find_spec("tensorflow_federated") is None:
    # fedkernels.tff needs the `tff` extra; its tests skip with a reason (tests/test_tff*.py).
    collect_ignore_glob.append("fedkernels/tff/*")


# `python3 dev.py test` sets FEDKERNELS_TEST_FAST_EXIT=1: once pytest has reported, the
# process runs its exit handlers (TFF workers stopped, temporary directories removed) and
# ends without the interpreter's teardown and jax's backend clean-up, which only free the
# thousands of programs the suite compiled (tens of seconds at the end of a full run).
_EXIT_STATUS: list[int] = []


def pytest_sessionfinish(session, exitstatus):
    _EXIT_STATUS.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    import os

    if os.environ.get("FEDKERNELS_TEST_FAST_EXIT") != "1" or not _EXIT_STATUS:
        return
    import atexit
    import sys

    jax_api = sys.modules.get("jax._src.api")
    if jax_api is not None and hasattr(jax_api, "clean_up"):
        atexit.unregister(jax_api.clean_up)
    sys.stdout.flush()
    sys.stderr.flush()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_EXIT_STATUS[-1])
