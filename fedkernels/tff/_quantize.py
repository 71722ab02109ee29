"""Stochastic b-bit quantization of large leaves: `QuantizeAboveThresholdFactory` /
`quantize_above_threshold`, and the per-leaf codec the masked mean shares."""

from __future__ import annotations

import collections
from typing import Any

import jax.numpy as jnp
import numpy as np

import fedkernels as fk
from fedkernels.tff import _kernels as kernels
from fedkernels.tff._staging import (
    _check_value_type,
    _leaves,
    _pack,
    _server_constant,
    _specs,
    staged,
    tf,
    tff,
)

# Keyword arguments of TFF's `quantize_above_threshold(..., **kwargs)` (passed on to
# `UniformQuantizationEncodingStage`), with the values fedkernels implements.
_TFF_QUANTIZE_KWARGS = {"stochastic": True, "min_max": None}


def _check_tff_quantize_kwargs(kwargs: dict) -> None:
    for name, value in kwargs.items():
        if name not in _TFF_QUANTIZE_KWARGS:
            raise TypeError(
                f"quantize_above_threshold got an unexpected keyword argument {name!r} "
                f"(TFF's accepts {sorted(_TFF_QUANTIZE_KWARGS)}; fedkernels also takes seed)"
            )
        if value is not _TFF_QUANTIZE_KWARGS[name] and value != _TFF_QUANTIZE_KWARGS[name]:
            use = ("stochastic rounding (unbiased) is the only mode; for a deterministic "
                   "result fix `seed`" if name == "stochastic" else
                   "each client quantizes over its own [min, max]; clip before with "
                   "tff.aggregators.clipping_factory for a fixed range")
            raise ValueError(f"{name}={value!r} is not supported: {use}")


class _QuantizeCodec:
    """Client encoding and server decoding of `quantize_above_threshold`, per leaf.

    Leaves with more than `threshold` elements are quantized by the staged JAX kernels
    (`fedkernels.quantize` on the float32 values, bit-packed codes plus the float32 range) and
    decoded back to the leaf's dtype; the other leaves travel in their own dtype. With masks
    (the masked mean), each quantized leaf also carries a 1-bit mask of its contributing
    coordinates (`fedkernels.pack_bits(m, 1)`), so the server knows who contributed where.
    """

    def __init__(self, specs: list, factory: Any, masked: bool = False):
        self.specs, self.bits, self.seed, self.masked = specs, factory.bits, factory.seed, masked
        self.shapes = [tuple(s.shape.as_list()) for s in specs]
        self.dtypes = [s.dtype for s in specs]
        self.sizes = [int(np.prod(s, dtype=np.int64)) for s in self.shapes]
        self.flags = tuple(n > factory.threshold for n in self.sizes)
        seed = self.seed

        @tff.tensorflow.computation
        def init_tf():
            return collections.OrderedDict(
                seed=tf.constant(seed, tf.int32), round=tf.constant(0, tf.int32)
            )

        self.init_tf = init_tf
        self.state_type = init_tf.type_signature.result

        @tff.tensorflow.computation(self.state_type)
        def advance(state):
            return collections.OrderedDict(seed=state["seed"], round=state["round"] + 1)

        self.advance = advance

    def bytes_sent(self, weight_bytes: int = 0) -> int:
        total = weight_bytes
        for n, dtype, flag in zip(self.sizes, self.dtypes, self.flags, strict=True):
            if flag:
                total += fk._quantize.packed_words(n, self.bits) * 4 + 8
                if self.masked:
                    total += fk._quantize.packed_words(n, 1) * 4
            else:
                total += n * dtype.size
        return total

    def dense_bytes(self) -> int:
        return sum(n * t.size for n, t in zip(self.sizes, self.dtypes, strict=True))

    def measurements(self, weight_bytes: int = 0) -> Any:
        sent = self.bytes_sent(weight_bytes)
        return tff.federated_zip(collections.OrderedDict(
            bytes_sent=_server_constant(np.int64(sent)),
            compression_ratio=_server_constant(np.float32(self.dense_bytes() / sent)),
        ))

    def encode(self, leaves: list, masks: list | None, state: Any, raw: list | None = None
               ) -> list:
        """One entry per leaf: `(packed, minimum, maximum[, mask_bits])` for a quantized leaf
        of `leaves`, else the leaf of `raw` (default `leaves`) itself."""
        bits, flags, masked = self.bits, self.flags, self.masked

        def fn(values, seed, round_num, masks):
            encoded = kernels.client_quantize(values, seed, round_num, bits, flags)
            out = []
            for i, flag in enumerate(flags):
                if flag:
                    item = encoded[i]
                    if masked:
                        mask = masks[i].reshape(-1).astype(jnp.uint32)
                        item = (*item, fk._quantize.pack_bits(mask, 1))
                    out.append(tuple(item))
            return out

        as_f32 = [tf.cast(x, tf.float32) for x in leaves]
        staged_masks = [m if f else tf.zeros([], tf.bool)
                        for m, f in zip(masks, flags, strict=True)] if masked else []
        quantized = iter(staged(fn)(as_f32, state["seed"], state["round"], staged_masks))
        raw = leaves if raw is None else raw
        return [tuple(next(quantized)) if f else x for x, f in zip(raw, flags, strict=True)]

    def decode(self, encoded: list) -> tuple[list, list | None]:
        """Per leaf: the decoded values in the leaf dtype, and (masked) the contributing mask;
        `None` for a leaf sent as is."""
        bits = self.bits
        quantized = [list(e) for e, f in zip(encoded, self.flags, strict=True) if f]
        sizes = [n for n, f in zip(self.sizes, self.flags, strict=True) if f]
        masked = self.masked

        def fn(items):
            values, masks = [], []
            for item, n in zip(items, sizes, strict=True):
                q = fk.Quantized(item[0], item[1], item[2], bits, n)
                values.append(kernels.dequantize_staged(q))
                if masked:
                    masks.append(fk._quantize.unpack_bits(item[3], 1, n) > 0)
            return values, masks

        values, masks = staged(fn)(quantized) if quantized else ([], [])
        values, masks = iter(values), iter(masks)
        out_values, out_masks = [], []
        for e, f, shape, dtype in zip(encoded, self.flags, self.shapes, self.dtypes,
                                      strict=True):
            if f:
                out_values.append(tf.cast(tf.reshape(next(values), shape), dtype))
                out_masks.append(tf.reshape(next(masks), shape) if masked else None)
            else:
                out_values.append(e)
                out_masks.append(None)
        return out_values, out_masks


class QuantizeAboveThresholdFactory(tff.aggregators.UnweightedAggregationFactory):
    """Sum with stochastic b-bit quantization of the leaves with more than `threshold` elements.

    A drop-in for `tff.aggregators.EncodedSumFactory.quantize_above_threshold(bits,
    threshold)`: each client quantizes every leaf with more than `threshold` elements over its
    own [min, max] with unbiased stochastic rounding (`fedkernels.quantize`, the semantics of
    TFF's `UniformQuantizationEncodingStage`, Suresh et al. 2017) and sends the bit-packed
    codes; the aggregator dequantizes each client's codes (`fedkernels.dequantize`) while
    summing (`federated_aggregate`); other leaves are summed exactly. Every leaf keeps its
    dtype (quantization itself runs in float32: a float64 leaf above the threshold is
    quantized from its float32 rounding, far finer than the quantization step).

    Unlike TFF's (which seeds from the clock), the randomness is reproducible: state is
    `OrderedDict(seed=int32, round=int32)`; the server broadcasts it, client randomness is
    `fold_in(fold_in(fold_in(PRNGKey(seed), round), fingerprint(value)), leaf_index)`
    (`fingerprint` stands in for a client id, which TFF computations do not have), and `round`
    advances by 1 each `next`. Same seed, same round, same values: same result.
    Measurements: `bytes_sent` per client and `compression_ratio` (TFF's has none).

    TFF's keyword arguments (`**kwargs` of its classmethod, passed to
    `UniformQuantizationEncodingStage`): `stochastic=True` and `min_max=None` are accepted;
    other values raise a ValueError saying what to use instead.
    """

    def __init__(self, quantization_bits: int = 8, threshold: int = 20000, seed: int = 0,
                 **kwargs: Any):
        _check_tff_quantize_kwargs(kwargs)
        self.bits = fk._validate.static_int("quantization_bits", quantization_bits, 1, 16)
        self.threshold = fk._validate.static_int("threshold", threshold, 0)
        self.seed = fk._validate.static_int("seed", seed, -(2**31), 2**31 - 1)

    @classmethod
    def quantize_above_threshold(cls, quantization_bits: int = 8, threshold: int = 20000,
                                 **kwargs: Any) -> QuantizeAboveThresholdFactory:
        """As `tff.aggregators.EncodedSumFactory.quantize_above_threshold` (plus `seed=`)."""
        return cls(quantization_bits, threshold, **kwargs)

    def create(self, value_type: Any) -> Any:
        _check_value_type(value_type)
        structure = _specs(value_type)
        specs = _leaves(structure)
        codec = _QuantizeCodec(specs, self)

        @tff.federated_computation()
        def init_fn():
            return tff.federated_eval(codec.init_tf, tff.SERVER)

        @tff.tensorflow.computation(value_type, codec.state_type)
        def encode_fn(value, state):
            return codec.encode(_leaves(value), None, state)

        @tff.tensorflow.computation
        def zero_fn():
            return [tf.zeros(s.shape, s.dtype) for s in specs]

        accumulator_type = zero_fn.type_signature.result

        @tff.tensorflow.computation(accumulator_type, encode_fn.type_signature.result)
        def accumulate_fn(acc, encoded):
            decoded, _ = codec.decode(list(encoded))
            return [a + b for a, b in zip(acc, decoded, strict=True)]

        @tff.tensorflow.computation(accumulator_type, accumulator_type)
        def merge_fn(a, b):
            return [x + y for x, y in zip(a, b, strict=True)]

        @tff.tensorflow.computation(accumulator_type)
        def report_fn(acc):
            return _pack(structure, list(acc))

        @tff.federated_computation(
            tff.FederatedType(codec.state_type, tff.SERVER),
            tff.FederatedType(value_type, tff.CLIENTS),
        )
        def next_fn(state, value):
            encoded = tff.federated_map(encode_fn, (value, tff.federated_broadcast(state)))
            total = tff.federated_aggregate(encoded, zero_fn(), accumulate_fn, merge_fn,
                                            report_fn)
            return tff.templates.MeasuredProcessOutput(
                tff.federated_map(codec.advance, state), total, codec.measurements()
            )

        return tff.templates.AggregationProcess(init_fn, next_fn)

    def numpy_process(self) -> Any:
        from fedkernels.tff import _bridge

        return _bridge.QuantizeSumProcess(self.bits, self.threshold, self.seed)


def quantize_above_threshold(
    quantization_bits: int = 8, threshold: int = 20000, seed: int = 0, **kwargs: Any
) -> QuantizeAboveThresholdFactory:
    """A `QuantizeAboveThresholdFactory` (drop-in for
    `tff.aggregators.EncodedSumFactory.quantize_above_threshold`, with TFF's `**kwargs`),
    seeded by `seed`."""
    return QuantizeAboveThresholdFactory(quantization_bits, threshold, seed, **kwargs)


