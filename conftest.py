"""Root pytest configuration: doctest collection of fedkernels/ must not import optional stacks."""

import importlib.util

collect_ignore_glob = []
if importlib.util.find_spec("tensorflow_federated") is None:
    # fedkernels.tff needs the `tff` extra; its tests skip with a reason (tests/test_tff*.py).
    collect_ignore_glob.append("fedkernels/tff/*")
