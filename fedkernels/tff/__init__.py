"""fedkernels.tff: TensorFlow Federated adapters for the fedkernels kernels.

Importing this package imports neither TensorFlow nor TFF; the first use of a name below does
(and raises an ImportError naming the `tff` extra, `pip install fedkernels[tff]`, when TFF is
missing). The numpy bridge (`MaskedMeanProcess`, `TopKProcess`, `QuantizeSumProcess`,
`ConcatProcess`) needs only jax and numpy.

Staged factories (the JAX kernels converted by jax2tf run in TFF's worker):
  MaskedMeanFactory, concat_factory, quantize_above_threshold, top_k_factory,
  compression_aggregator, sparse_masked_mean_process.
Error feedback with stateful clients:
  error_feedback_encoder, build_error_feedback_round, ClientResiduals.
Numpy bridge: numpy_process(factory), and the process classes above.
tff.learning FedAvg with TFF's client work and the aggregation in JAX in the driver:
  build_weighted_fed_avg, BridgedFedAvgProcess.
In-process TensorFlow: numpy_function, masked_mean_tf, top_k_tf (refuse inside TFF).
"""

from __future__ import annotations

import importlib
from typing import Any

_NAMES = {
    # staged factories
    "MaskedMeanFactory": "_mean",
    "TopKFactory": "_top_k",
    "QuantizeAboveThresholdFactory": "_quantize",
    "concat_factory": "_concat",
    "quantize_above_threshold": "_quantize",
    "top_k_factory": "_top_k",
    "compression_aggregator": "_compression",
    "sparse_masked_mean_process": "_top_k",
    "numpy_process": "_bridge",
    "staged": "_staging",
    # error feedback
    "error_feedback_encoder": "_feedback",
    "ErrorFeedbackRound": "_feedback",
    "build_error_feedback_round": "_feedback",
    "ClientResiduals": "_feedback",
    # numpy bridge (jax and numpy only)
    "MeasuredOutput": "_bridge",
    "MaskedMeanProcess": "_bridge",
    "TopKProcess": "_bridge",
    "QuantizeSumProcess": "_bridge",
    "ConcatProcess": "_bridge",
    # tff.learning FedAvg with the aggregation in JAX (numpy bridge)
    "build_weighted_fed_avg": "_learning",
    "BridgedFedAvgProcess": "_learning",
    # tf.numpy_function wrappers
    "numpy_function": "_numpy_function",
    "NumpyFunctionInTFFError": "_numpy_function",
    "inside_tff_computation": "_numpy_function",
}
_RENAMED = {"masked_mean_tf": ("_numpy_function", "masked_mean"),
            "top_k_tf": ("_numpy_function", "top_k")}

__all__ = sorted([*_NAMES, *_RENAMED])


def __getattr__(name: str) -> Any:
    if name in _NAMES:
        module, attr = _NAMES[name], name
    elif name in _RENAMED:
        module, attr = _RENAMED[name]
    else:
        raise AttributeError(f"module 'fedkernels.tff' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"fedkernels.tff.{module}"), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
