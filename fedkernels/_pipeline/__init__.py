"""The compression pipeline: a whole round (every client's encoding, the server's decoding)
jitted.

Client side, batched over a cohort `[C, ...]`: flatten, add the error-feedback residual,
select (top-k or random-k, global over the flattened large leaves), quantize the kept values,
bit-pack values and indices. Server side: unpack, dequantize, `scatter_sum`, mean, unflatten.

Modules, one responsibility each:
- `config`: `CompressorConfig`, every option declared and validated once.
- `layout`: `Layout` (which leaves are compressed, k, payload size), split/join of the flat
  vector.
- `encode`: the client side (selectors, quantizers, the shared exclusion and residual rules).
- `aggregate`: the server side (`AggregateSums`, which add across chunks and devices; the mean).
- `round`: a whole round in one jit (cohort checks, chunking, sharding, metrics).
- `builder`: `compressor(...)` and the `Compressor` it returns.
"""

from fedkernels._pipeline.aggregate import AggregateSums
from fedkernels._pipeline.builder import Compressor, compressor
from fedkernels._pipeline.config import CompressorConfig
from fedkernels._pipeline.encode import ClientReport, Payload
from fedkernels._pipeline.layout import Layout
from fedkernels._pipeline.round import RoundMetrics, RoundResult

__all__ = [
    "AggregateSums",
    "ClientReport",
    "Compressor",
    "CompressorConfig",
    "Layout",
    "Payload",
    "RoundMetrics",
    "RoundResult",
    "compressor",
]
