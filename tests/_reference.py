"""NumPy float64 references for the core kernels, written for clarity, not speed."""

from __future__ import annotations

import numpy as np


def magnitude_bits(x: np.ndarray) -> np.ndarray:
    """|x| as ordered integers (float32 bits, sign cleared), as the kernels rank them."""
    return np.asarray(x, np.float32).view(np.int32) & np.int32(0x7FFFFFFF)


def top_k(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the k largest |x|, ties to the lower index, indices ascending."""
    x = np.asarray(x)
    rows = x.reshape(-1, x.shape[-1])
    out_idx = np.empty((rows.shape[0], k), np.int32)
    for r, row in enumerate(rows):
        keys = magnitude_bits(row).astype(np.int64)
        # Stable sort of descending key: equal keys keep index order, so lower index first.
        order = np.argsort(-keys, kind="stable")[:k]
        out_idx[r] = np.sort(order)
    out_idx = out_idx.reshape(*x.shape[:-1], k)
    return np.take_along_axis(x, out_idx, axis=-1), out_idx


def scatter_sum(values, indices, d, weights=None):
    values = np.asarray(values, np.float64)
    indices = np.asarray(indices)
    total = np.zeros(d)
    count = np.zeros(d)
    for c in range(values.shape[0]):
        w = 1.0 if weights is None else float(weights[c])
        for v, j in zip(values[c], indices[c], strict=True):
            if np.isfinite(v):
                total[j] += w * v
                count[j] += w
    return total, count


def masked_mean(x, weights=None, mask=None):
    x = np.asarray(x, np.float64)
    mask = (x != 0) if mask is None else np.asarray(mask)
    mask = mask & np.isfinite(x)
    w = np.ones(x.shape[0]) if weights is None else np.asarray(weights, np.float64)
    w = w.reshape((-1,) + (1,) * (x.ndim - 1))
    num = np.sum(np.where(mask, w * np.where(mask, x, 0), 0), axis=0)
    den = np.sum(np.where(mask, w, 0), axis=0)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0), num, den


def quantize_levels(x, bits):
    """Per-row (min, max, scaled x') in float64, as TFF's uniform quantization defines them."""
    x = np.asarray(x, np.float64)
    lo = x.min(axis=-1, keepdims=True)
    hi = x.max(axis=-1, keepdims=True)
    span = hi - lo
    scaled = np.where(span > 0, (x - lo) / np.where(span > 0, span, 1) * (2**bits - 1), 0)
    return lo, hi, scaled


def _rotl32(v: np.ndarray, r: int) -> np.ndarray:
    return (v << np.uint32(r)) | (v >> np.uint32(32 - r))


def threefry2x32(key: np.ndarray, x0: np.ndarray, x1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Threefry-2x32 with 20 rounds (Salmon et al. 2011), as `jax.random`'s default PRNG."""
    k0, k1 = (np.uint32(v) for v in np.asarray(key, np.uint32).reshape(2))
    ks = [k0, k1, k0 ^ k1 ^ np.uint32(0x1BD11BDA)]
    rotations = [(13, 15, 26, 6), (17, 29, 16, 24)]
    with np.errstate(over="ignore"):
        x0 = np.asarray(x0, np.uint32) + ks[0]
        x1 = np.asarray(x1, np.uint32) + ks[1]
        for i in range(5):
            for r in rotations[i % 2]:
                x0 = x0 + x1
                x1 = _rotl32(x1, r) ^ x0
            x0 = x0 + ks[(i + 1) % 3]
            x1 = x1 + ks[(i + 2) % 3] + np.uint32(i + 1)
    return x0, x1


def fold_in(key: np.ndarray, data: int) -> np.ndarray:
    """`jax.random.fold_in` of a threefry key (uint32[2]) with a 32-bit `data`."""
    y0, y1 = threefry2x32(key, np.zeros(1, np.uint32), np.full(1, data, np.uint32))
    return np.concatenate([y0, y1])


def lowbias32(h: np.ndarray) -> np.ndarray:
    """Wellons' 32-bit integer hash."""
    h = np.asarray(h, np.uint32)
    with np.errstate(over="ignore"):
        h = h ^ (h >> np.uint32(16))
        h = h * np.uint32(0x7FEB352D)
        h = h ^ (h >> np.uint32(15))
        h = h * np.uint32(0x846CA68B)
    return h ^ (h >> np.uint32(16))


def code_slots(n: int, bits: int) -> np.ndarray:
    """Slot (position in the packed bit stream) of each entry of a row of n codes, as
    `fedkernels.Quantized` defines the layout: planar for bits dividing 32 (entry p * W + w in
    slot w * P + p, P = 32 / bits, W = n_pad / P, n_pad = ceil(n / 32) * 32), else slot = entry."""
    n_pad = -(-n // 32) * 32
    entry = np.arange(n_pad)
    if 32 % bits:
        return entry[:n]
    per = 32 // bits
    w, p = entry % (n_pad // per), entry // (n_pad // per)
    return (w * per + p)[:n]


def bitstream_pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Code i of each row at bits [i * bits, (i + 1) * bits) of a little-endian uint32 stream."""
    codes = np.asarray(codes, np.uint64)
    n = codes.shape[-1]
    n_pad = -(-n // 32) * 32
    padded = np.zeros((*codes.shape[:-1], n_pad), np.uint64)
    padded[..., :n] = codes
    stream = (padded[..., None] >> np.arange(bits, dtype=np.uint64)) & np.uint64(1)
    stream = stream.reshape(*codes.shape[:-1], -1, 32)
    return np.sum(stream << np.arange(32, dtype=np.uint64), axis=-1).astype(np.uint32)


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """`Quantized.packed` of codes `[..., n]`: each code moved to its slot, then the stream."""
    codes = np.asarray(codes, np.uint64) & np.uint64((1 << bits) - 1)
    n = codes.shape[-1]
    stream = np.zeros((*codes.shape[:-1], -(-n // 32) * 32), np.uint64)
    stream[..., code_slots(n, bits)] = codes
    return bitstream_pack(stream, bits)


def hash_fields(key: np.ndarray, shape: tuple[int, ...], bits: int) -> np.ndarray:
    """The random fields of `quantize(..., prng="hash")`, as its docstring defines them, from
    the key data alone (uint32[2]): NumPy only, so they are the same on every jax version."""
    s0, s1 = fold_in(key, 0x48415348)
    n = shape[-1]
    rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    row_words = -(-n // 32) * 16
    t = np.arange(rows * row_words, dtype=np.uint32).reshape(rows, row_words)
    with np.errstate(over="ignore"):
        words = lowbias32((t ^ s0) + s1)
    slot = code_slots(n, bits)
    odd = (slot % 2).astype(np.uint32)
    fields = (words[:, slot // 2] >> (np.uint32(17) * odd)) & np.uint32(0x7FFF)
    return fields.reshape(shape)


def hash_codes(scaled: np.ndarray, fields: np.ndarray, bits: int) -> np.ndarray:
    """Codes of the "hash" stream from float32 `x' * 2**F` (already clamped to
    `[0, (2**bits - 1) * 2**F]`): `(round_half_even(x' * 2**F) + r) >> F`."""
    t = np.round(np.asarray(scaled, np.float32)).astype(np.int64)
    return ((t + fields.astype(np.int64)) >> 15).astype(np.uint32)
