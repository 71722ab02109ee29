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


def hash_fields(key: np.ndarray, shape: tuple[int, ...], bits: int) -> np.ndarray:
    """The random fields of `quantize(..., prng="hash")`, as its docstring defines them, from
    the key data alone (uint32[2]): NumPy only, so they are the same on every jax version."""
    field_bits = 16 if bits <= 15 else 8
    per_word = 32 // field_bits
    s0, s1 = fold_in(key, 0x48415348)
    n = shape[-1]
    rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    row_words = -(-n // 32) * 32 // per_word
    t = np.arange(rows * row_words, dtype=np.uint32).reshape(rows, row_words)
    with np.errstate(over="ignore"):
        words = lowbias32((t ^ s0) + s1)
    k = np.arange(per_word, dtype=np.uint32) * np.uint32(field_bits)
    fields = (words[..., None] >> k) & np.uint32((1 << field_bits) - 1)
    return fields.reshape(rows, -1)[:, :n].reshape(shape)


def hash_codes(scaled: np.ndarray, fields: np.ndarray, bits: int) -> np.ndarray:
    """Codes of the "hash" stream from float32 `x' * 2**F` (already clamped to
    `[0, (2**bits - 1) * 2**F]`): `(round_half_even(x' * 2**F) + r) >> F`."""
    field_bits = 16 if bits <= 15 else 8
    t = np.round(np.asarray(scaled, np.float32)).astype(np.int64)
    return ((t + fields.astype(np.int64)) >> field_bits).astype(np.uint32)
