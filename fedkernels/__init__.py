"""fedkernels: JIT-compiled JAX kernels for federated aggregation.

A whole round of update compression, batched over a cohort of clients and jitted:
`compressor(template, top_k_fraction=..., bits=..., error_feedback=...)` returns a
`Compressor` whose `round(updates, key, ...)` encodes every client (global top-k, stochastic
quantization, error feedback) and gives the server's mean; `residual_store(N, d)` keeps the
error-feedback residuals of N clients across rounds. The kernels it is built from are public
too: `top_k`, `top_k_with_feedback`, `quantize`/`dequantize`, `pack_bits`, `scatter`,
`scatter_sum`, `masked_mean`, `flatten`.

The core imports only jax and numpy. The TensorFlow Federated adapters live in
`fedkernels.tff` and import TensorFlow lazily. `fedkernels.host.keep_host_memory()`, an
opt-in process-wide setting of the host's memory allocator, is not a kernel and lives apart.
"""

from fedkernels import host as host
from fedkernels._client_state import (
    ResidualState,
    ResidualStore,
    residual_memory_bytes,
    residual_store,
)
from fedkernels._flatten import Unflatten, flatten
from fedkernels._masked import masked_mean, masked_sum
from fedkernels._pipeline import (
    AggregateSums,
    ClientReport,
    Compressor,
    CompressorConfig,
    Layout,
    Payload,
    RoundMetrics,
    RoundResult,
    compressor,
)
from fedkernels._quantize import Quantized, dequantize, pack_bits, quantize, unpack_bits
from fedkernels._radix import RadixConfig
from fedkernels._scatter import scatter, scatter_sum
from fedkernels._sharding import client_mesh
from fedkernels._topk import magnitude_key, top_k, top_k_with_feedback

__version__ = "0.1.0"

__all__ = [
    "AggregateSums",
    "ClientReport",
    "Compressor",
    "CompressorConfig",
    "Layout",
    "Payload",
    "Quantized",
    "RadixConfig",
    "ResidualState",
    "ResidualStore",
    "RoundMetrics",
    "RoundResult",
    "Unflatten",
    "client_mesh",
    "compressor",
    "dequantize",
    "flatten",
    "magnitude_key",
    "masked_mean",
    "masked_sum",
    "pack_bits",
    "quantize",
    "residual_memory_bytes",
    "residual_store",
    "scatter",
    "scatter_sum",
    "top_k",
    "top_k_with_feedback",
    "unpack_bits",
]
