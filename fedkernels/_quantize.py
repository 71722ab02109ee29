"""Stochastic-rounding quantization to b bits with dense bit packing (TFF's semantics)."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fedkernels import _validate
from fedkernels._loops import fold_rows

MAX_BITS = 16  # widest code `quantize` makes (x' is float32 and the codes come from it)
MAX_PACK_BITS = 32  # widest code `pack_bits` / `unpack_bits` handle (one uint32 word)


class _QuantizedFields(NamedTuple):
    packed: jax.Array  # shape=[..., words], dtype=uint32; words = ceil(length / 32) * bits
    minimum: jax.Array  # shape=[...], dtype=float32: the row minimum
    maximum: jax.Array  # shape=[...], dtype=float32: the row maximum
    bits: int  # static, in [1, 16]
    length: int  # static, n >= 0, the row length before packing


class Quantized(_QuantizedFields):
    """A quantized array: b-bit codes packed into uint32 words, with the per-row range.

    Fields: `packed` uint32 `[..., ceil(length / 32) * bits]`, `minimum` and `maximum` float32
    `[...]` (the row range), `bits` (static int in `[1, 16]`) and `length` (static int >= 0,
    the row length before packing). A pytree whose leaves are `packed`, `minimum` and
    `maximum`; `bits` and `length` are part of the tree structure, so it passes through `jit`,
    `vmap` and `lax.scan`. `q.codes()` unpacks the codes.

    Layout of a row of `packed` (`pack_codes`): for `bits` dividing 32 (1, 2, 4, 8, 16),
    planar: with `P = 32 / bits` codes per word, the row padded with code 0 to
    `n_pad = ceil(length / 32) * 32` entries is cut into P planes of `W = n_pad / P`
    consecutive entries, and word `w` holds entry `w` of each plane j (entry `j * W + w` of the
    row) in bits `[j * bits, (j + 1) * bits)`. Each word is formed from P contiguous slices,
    with no de-interleaving, which makes the codes faster to write under XLA than consecutive
    codes in a word. Other widths, whose codes straddle words: the dense stream of `pack_bits`.

    Raises:
      TypeError / ValueError: `bits` not an int in `[1, 16]`, `length` not an int >= 0.
    """

    __slots__ = ()

    def __new__(
        cls, packed: Any, minimum: Any, maximum: Any, bits: int, length: int
    ) -> Quantized:
        bits = _validate.static_int("bits", bits, 1, MAX_BITS)
        length = _validate.static_int("length", length, 0)
        return super().__new__(cls, packed, minimum, maximum, bits, length)

    def codes(self) -> jax.Array:
        """The codes, uint32 `[..., length]`, in `[0, 2**bits - 1]` (`unpack_codes`)."""
        return unpack_codes(self.packed, self.bits, self.length)

    @property
    def nbytes(self) -> int:
        """Bytes of payload: packed words plus min and max (what a client uploads)."""
        return int(self.packed.size * 4 + self.minimum.size * 4 + self.maximum.size * 4)


jax.tree_util.register_pytree_node(
    Quantized,
    lambda q: ((q.packed, q.minimum, q.maximum), (q.bits, q.length)),
    lambda aux, children: Quantized(*children, *aux),
)


def packed_words(length: int, bits: int) -> int:
    """uint32 words holding `length` codes of `bits` bits: 32 codes fill exactly `bits` words."""
    return math.ceil(length / 32) * bits


def pack_bits(codes: jax.Array, bits: int) -> jax.Array:
    """Packs unsigned codes along the last axis densely into uint32 words.

    Code i occupies bits `[i*bits, (i+1)*bits)` of the little-endian bit stream, so a code may
    straddle two words. Works group by group: 32 codes always fill exactly `bits` words. Uses
    only shifts and ors (convertible by jax2tf without XLA ops).

    Args:
      codes: integer (or bool) `[..., n]`; only the low `bits` bits of each code are kept
        (a code `>= 2**bits`, or a negative one, is taken modulo `2**bits`).
      bits: static int in `[1, 32]`.

    Returns:
      uint32 `[..., ceil(n / 32) * bits]`.

    Raises:
      TypeError: `codes` not integer, `bits` not an int.
      ValueError: `bits` outside `[1, 32]`, `codes` a scalar.

    >>> import jax.numpy as jnp
    >>> packed = pack_bits(jnp.array([1, 2, 3, 0, 5], jnp.uint32), 3)
    >>> packed.shape, unpack_bits(packed, 3, 5)
    ((3,), Array([1, 2, 3, 0, 5], dtype=uint32))
    """
    bits = _validate.static_int("bits", bits, 1, MAX_PACK_BITS)
    codes = _validate.as_array("codes", codes)
    if not (jnp.issubdtype(codes.dtype, jnp.integer) or codes.dtype == jnp.bool_):
        raise TypeError(f"codes must have an integer dtype, got {codes.dtype}")
    _validate.min_ndim("codes", codes, 1, "[..., n]")
    if bits < 32:
        codes = codes.astype(jnp.uint32) & jnp.uint32((1 << bits) - 1)
    codes = codes.astype(jnp.uint32)
    n = codes.shape[-1]
    groups = math.ceil(n / 32)
    pad = groups * 32 - n
    if pad:
        codes = jnp.pad(codes, [(0, 0)] * (codes.ndim - 1) + [(0, pad)])
    if 32 % bits == 0:
        # Codes never straddle words: word w holds codes w*per .. w*per+per-1, code j of the
        # word at offset j*bits. On XLA:CPU an or of strided slices is the faster form for
        # up to 4 codes per word, a shift-and-sum over a narrow row for 8 or more.
        per = 32 // bits
        lanes = codes.reshape(*codes.shape[:-1], groups * bits, per)
        if per <= 4:
            words = lanes[..., 0]
            for j in range(1, per):
                words = words | (lanes[..., j] << jnp.uint32(j * bits))
            return words
        shifts = jnp.arange(per, dtype=jnp.uint32) * jnp.uint32(bits)
        return jnp.sum(lanes << shifts, axis=-1, dtype=jnp.uint32)
    codes = codes.reshape(*codes.shape[:-1], groups, 32)
    words = [None] * bits
    for i in range(32):
        code = codes[..., i]
        word, offset = divmod(i * bits, 32)
        part = code << jnp.uint32(offset) if offset else code
        words[word] = part if words[word] is None else words[word] | part
        if offset + bits > 32:
            spill = code >> jnp.uint32(32 - offset)
            words[word + 1] = spill if words[word + 1] is None else words[word + 1] | spill
    packed = jnp.stack(words, axis=-1)
    return packed.reshape(*packed.shape[:-2], groups * bits)


def unpack_bits(packed: jax.Array, bits: int, length: int) -> jax.Array:
    """Inverse of `pack_bits`: uint32 `[..., words]` to uint32 codes `[..., length]`.

    Args:
      packed: uint32 (or another integer dtype, taken as its low 32 bits) `[..., words]` with
        `words == ceil(length / 32) * bits`, as `pack_bits` returns for `length` codes.
      bits: static int in `[1, 32]`.
      length: static int >= 0, the number of codes per row.

    Raises:
      TypeError: `packed` not integer, `bits` or `length` not an int.
      ValueError: `bits` outside `[1, 32]`, `length` negative, or `words` not
        `ceil(length / 32) * bits`.
    """
    bits = _validate.static_int("bits", bits, 1, MAX_PACK_BITS)
    length = _validate.static_int("length", length, 0)
    packed = _validate.integer("packed", packed)
    _validate.min_ndim("packed", packed, 1, "[..., words]")
    if packed.shape[-1] != packed_words(length, bits):
        raise ValueError(
            f"packed must be [..., ceil(length / 32) * bits] = [..., {packed_words(length, bits)}]"
            f" for length={length} and bits={bits}, got shape {tuple(packed.shape)}"
        )
    packed = packed.astype(jnp.uint32)
    groups = packed.shape[-1] // bits
    mask = jnp.uint32((1 << bits) - 1)
    if 32 % bits == 0:  # no straddling codes: one broadcast shift-and-mask (as in pack_bits)
        per = 32 // bits
        shifts = jnp.arange(per, dtype=jnp.uint32) * jnp.uint32(bits)
        codes = (packed[..., None] >> shifts) & mask
        return codes.reshape(*packed.shape[:-1], groups * 32)[..., :length]
    words = packed.reshape(*packed.shape[:-1], groups, bits)
    codes = []
    for i in range(32):
        word, offset = divmod(i * bits, 32)
        code = words[..., word] >> jnp.uint32(offset) if offset else words[..., word]
        if offset + bits > 32:
            code = code | (words[..., word + 1] << jnp.uint32(32 - offset))
        codes.append(code & mask)
    codes = jnp.stack(codes, axis=-1).reshape(*packed.shape[:-1], groups * 32)
    return codes[..., :length]


def _planar(bits: int) -> bool:
    """Whether `bits`-bit codes use the planar layout (see `Quantized`): no code straddles."""
    return 32 % bits == 0


def pack_codes(codes: jax.Array, bits: int) -> jax.Array:
    """Packs unsigned codes `[..., n]` in the layout of `Quantized.packed` (see `Quantized`):
    planar for `bits` dividing 32, else `pack_bits`' stream. Only the low `bits` bits of each
    code are kept; uint32 `[..., ceil(n / 32) * bits]`. Internal: no validation."""
    if not _planar(bits):
        return pack_bits(codes, bits)
    codes = codes.astype(jnp.uint32)
    if bits < 32:
        codes = codes & jnp.uint32((1 << bits) - 1)
    batch, n = codes.shape[:-1], codes.shape[-1]
    n_pad = _padded_length(n)
    if n_pad > n:
        codes = jnp.pad(codes, [(0, 0)] * len(batch) + [(0, n_pad - n)])
    per = 32 // bits
    planes = codes.reshape(*batch, per, n_pad // per)
    words = planes[..., 0, :]
    for j in range(1, per):
        words = words | (planes[..., j, :] << jnp.uint32(j * bits))
    return words


def _code_planes(packed: jax.Array, bits: int) -> jax.Array:
    """The codes of planar-packed words `[..., W]` as their planes, uint32 `[..., P, W]`."""
    shifts = (jnp.arange(32 // bits, dtype=jnp.uint32) * jnp.uint32(bits))[:, None]
    return (packed.astype(jnp.uint32)[..., None, :] >> shifts) & jnp.uint32((1 << bits) - 1)


def unpack_codes(packed: jax.Array, bits: int, length: int) -> jax.Array:
    """Inverse of `pack_codes`: uint32 words `[..., ceil(length / 32) * bits]` to uint32
    codes `[..., length]`. Internal: no validation (`dequantize` checks a `Quantized`)."""
    if not _planar(bits):
        return unpack_bits(packed, bits, length)
    codes = _code_planes(packed, bits)
    return codes.reshape(*packed.shape[:-1], codes.shape[-2] * codes.shape[-1])[..., :length]


def _slots_to_entries(a: jax.Array, bits: int) -> jax.Array:
    """Reorders `[..., n_pad]` from slot order (a code's position in the packed bit stream)
    to entry order: the identity for the dense stream; for the planar layout, slot `w * P + j`
    holds entry `j * W + w`."""
    if not _planar(bits):
        return a
    per = 32 // bits
    batch, n_pad = a.shape[:-1], a.shape[-1]
    return jnp.swapaxes(a.reshape(*batch, n_pad // per, per), -1, -2).reshape(*batch, n_pad)


def _check_key(key: Any) -> jax.Array:
    if isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.shape != ():
            raise ValueError(f"key must be a single PRNG key, got shape {tuple(key.shape)}")
        return key
    key = _validate.as_array("key", key)
    if key.dtype != jnp.uint32 or key.shape != (2,):
        raise TypeError(
            "key must be a PRNG key (jax.random.key or jax.random.PRNGKey), got "
            f"dtype {key.dtype} shape {tuple(key.shape)}"
        )
    return key


PRNGS = ("hash", "threefry")

# The "hash" stream. The code in slot s of a row (bits [s * bits, (s + 1) * bits) of the row's
# packed bit stream) takes a 15-bit field of the 32-bit word H[s // 2], bits [0, 15) for even s
# and [17, 32) for odd s (one instruction each), so one hash serves two codes. Numbering by
# slot rather than by entry lets the codes pass compute each word's hashes from its own index,
# in the same fusion as the rounding and packing.
_SEED_SALT = 0x48415348  # fold_in data that derives the hash seeds from the key
FIELD_BITS = 15  # random bits per code of the "hash" stream


def _lowbias32(h: jax.Array) -> jax.Array:
    """Wellons' 32-bit integer hash "lowbias32": a bijection of uint32 in which every input bit
    affects every output bit with near-ideal avalanche (two multiplies, three xor-shifts)."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x7FEB352D)
    h = h ^ (h >> 15)
    h = h * jnp.uint32(0x846CA68B)
    return h ^ (h >> 16)


def _hash_seeds(key: jax.Array) -> jax.Array:
    """Two uint32 seeds `(s0, s1)`: the key data of `fold_in(key, _SEED_SALT)`. Threefry's
    fold_in does not depend on `jax_threefry_partitionable` (unlike `jax.random.bits`, whose
    default changed in jax 0.5), so a key gives the same seeds, hence codes, on every jax."""
    folded = jax.random.fold_in(key, _SEED_SALT)
    if jnp.issubdtype(folded.dtype, jax.dtypes.prng_key):
        folded = jax.random.key_data(folded)
    return folded.reshape(-1)[:2]


def _hash_words(seeds: jax.Array, counter: jax.Array) -> jax.Array:
    """Counter-based 32-bit random words `H[t] = lowbias32((t ^ s0) + s1)`. For each t, H[t]
    is exactly uniform over the seed `s1` (adding it is a bijection, so is the hash): every
    field is an unbiased uniform for a random key, whatever the hash's own quality."""
    return _lowbias32((counter ^ seeds[0]) + seeds[1])


def _low_field(word: jax.Array) -> jax.Array:
    return word & jnp.uint32((1 << FIELD_BITS) - 1)


def _high_field(word: jax.Array) -> jax.Array:
    return word >> jnp.uint32(32 - FIELD_BITS)


def _padded_length(n: int) -> int:
    return math.ceil(n / 32) * 32


MAX_HASH_WORDS = 1 << 32  # the hash counter is uint32: at most 2**32 words


def _hash_layout(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(rows, n, words per row) of the "hash" stream for an `x` of `shape`: two codes per
    32-bit word, rows padded to a multiple of 32. The words are numbered by a uint32 counter,
    so past 2**32 of them it would wrap and repeat: that raises instead."""
    n = shape[-1] if shape else 1
    rows = math.prod(shape[:-1]) if len(shape) > 1 else 1
    row_words = _padded_length(n) // 2
    if rows * row_words > MAX_HASH_WORDS:
        raise ValueError(
            f"x of shape {tuple(shape)} needs {rows * row_words} hash words, more than the "
            f"2**32 that prng='hash' can number without repeating ({2 * MAX_HASH_WORDS} "
            "elements per call): quantize it in parts, or use prng='threefry'"
        )
    return rows, n, row_words


def hash_fields(key: jax.Array, shape: tuple[int, ...], bits: int = 8) -> jax.Array:
    """The random fields `r` of `quantize(..., bits, prng="hash")` for an `x` of `shape`, uint32.

    15 random bits per code, two per 32-bit word. For row j (rows are the leading dims,
    flattened) of rows of length n, with `(s0, s1) = key_data(fold_in(key, 0x48415348))`,
    `R = ceil(n / 32) * 16` words per row and `H[t] = lowbias32((t ^ s0) + s1)` (Wellons'
    32-bit hash, uint32 arithmetic): the code in slot s of the row's packed stream (see
    `Quantized`: entry `i = p * W + w` of plane p is in slot `w * P + p` for `bits` dividing 32,
    `P = 32 / bits` and `W = ceil(n / 32) * bits`; entry i in slot i otherwise) gets bits
    `[0, 15)` of `H[j * R + s // 2]` if s is even, bits `[17, 32)` if s is odd. Reproducible
    from the key alone, the same on every jax version, several times cheaper than threefry on
    CPU, and statistically adequate for stochastic rounding (tested for uniformity,
    unbiasedness and correlation); not a cryptographic generator and not the `jax.random`
    stream.
    """
    shape = tuple(shape)
    bits = _validate.static_int("bits", bits, 1, MAX_BITS)
    rows, n, row_words = _hash_layout(shape)
    counter = lax.iota(jnp.uint32, rows * row_words).reshape(rows, row_words)
    words = _hash_words(_hash_seeds(key), counter)
    slots = jnp.stack([_low_field(words), _high_field(words)], axis=-1)
    slots = slots.reshape(rows, 2 * row_words)
    return _slots_to_entries(slots, bits)[:, :n].reshape(shape)


def hash_uniform(key: jax.Array, shape: tuple[int, ...], bits: int = 8) -> jax.Array:
    """`(r + 1/2) / 2**15`, float32, for the fields `r = hash_fields(key, shape, bits)`: the
    stream as uniforms on a grid centred in [0, 1). `quantize` rounds x' up exactly when
    `U > 1 - f`, f being `x' - floor(x')` rounded to 15 bits: with probability f."""
    r = hash_fields(key, shape, bits).astype(jnp.int32).astype(jnp.float32)
    return r * jnp.float32(2.0**-FIELD_BITS) + jnp.float32(2.0 ** -(FIELD_BITS + 1))


# The range pass reads `x` in blocks of `_RANGE_FANIN` strided slices, each `_RANGE_LANES`
# entries wide, and keeps the minimum and the (flipped) maximum side by side per lane, so one
# elementwise loop computes both from the same loads (bench case "part 1/2: fedkernels range
# pass" of `quantize_10000000_float32_b8`; 16 lanes were several times slower).
_RANGE_FANIN = 16
_RANGE_LANES = 8
_RANGE_MIN_SIZE = 1 << 16  # entries in all rows, below which the range takes plain reductions
_KEY_INF = 0x7F800000  # _order_key(+Inf); _order_key(-Inf) is ~_KEY_INF


def _order_key(x: jax.Array) -> jax.Array:
    """int32 keys with the order of float32 `x` (-0.0 just below +0.0), NaN outside [-Inf, +Inf]
    (above `_KEY_INF` with the sign bit clear, below `~_KEY_INF` with it set). Its own
    inverse, up to the bitcast: `_from_order_key`."""
    bits = lax.bitcast_convert_type(x, jnp.int32)
    return bits ^ ((bits >> 31) & jnp.int32(0x7FFFFFFF))


def _from_order_key(key: jax.Array) -> jax.Array:
    return lax.bitcast_convert_type(key ^ ((key >> 31) & jnp.int32(0x7FFFFFFF)), jnp.float32)


def _finite_range(
    x: jax.Array, poison: bool = False, plain: bool = False
) -> tuple[jax.Array, jax.Array]:
    """Min and max over the finite entries of the last axis of float32 `x` (+Inf, -Inf if none).

    Integer min over order-preserving keys (`_order_key`): integer minima are one instruction
    with no NaN or signed-zero rules, where XLA's float `minimum` is several. The maximum is the
    minimum of the complemented keys (`~k` reverses the order), kept beside the minimum in an
    axis of size 2 so that both come from the same loads of `x`: a tree of elementwise minima
    over `_RANGE_FANIN` strided blocks, then a small reduction.

    Non-finite entries: the keys are rotated, as uint32, so that every finite key comes before
    the key of +Inf in both columns and every non-finite one at or after it; they never win a
    minimum, and a row with no finite entry gives (+Inf, -Inf).
    `poison=True`: a row with any NaN or Inf gives (-Inf, +Inf) instead, so the same pass also
    tells which rows are finite (`isfinite(min)`). There no entry is masked: a non-finite
    entry's key is at or beyond an infinity's in one of the two columns.
    `plain=True`: masked `min` and `max` reductions instead, the same values (short rows and
    small inputs take them anyway).
    """
    n = x.shape[-1]
    batch = x.shape[:-1]
    inf = jnp.float32(jnp.inf)
    m = n // (_RANGE_FANIN * _RANGE_LANES)
    # Small inputs take plain reductions: as fast there, and far less to compile.
    if m < 4 or x.size < _RANGE_MIN_SIZE or plain:
        finite = jnp.abs(x) < inf
        masked = -inf if poison else inf  # what a non-finite entry contributes
        return (
            jnp.min(jnp.where(finite, x, masked), axis=-1),
            jnp.max(jnp.where(finite, x, -masked), axis=-1),
        )
    key_inf = jnp.int32(_KEY_INF)
    flip = -lax.broadcasted_iota(jnp.int32, (2, 1), 0)  # 0: the key; -1: its complement

    def entry_keys(v: jax.Array) -> jax.Array:  # [..., L] -> [..., 2, L]
        key = _order_key(v)[..., None, :] ^ flip
        if poison:
            return key
        # Rotated by _KEY_INF so that the finite keys (~_KEY_INF, _KEY_INF) come first as
        # uint32, from 0, and every non-finite one at or after +Inf's (2 * _KEY_INF): an
        # unsigned minimum then ignores them without a mask.
        return (key + key_inf).astype(jnp.uint32)

    # Each block a slice of `x` of its own: a reshape of one prefix slice would copy the
    # rows first when there are several and n is not a multiple of the block.
    width = m * _RANGE_LANES
    acc = None
    for i in range(_RANGE_FANIN):
        block = x[..., i * width : (i + 1) * width].reshape(*batch, m, _RANGE_LANES)
        acc = entry_keys(block) if acc is None else jnp.minimum(acc, entry_keys(block))
    # Fold again while it pays: each level reads `acc` once.
    while acc.shape[-3] >= 4 * _RANGE_FANIN:
        k = acc.shape[-3] // _RANGE_FANIN
        rest = acc[..., k * _RANGE_FANIN :, :, :]
        blocks = acc[..., : k * _RANGE_FANIN, :, :]
        blocks = blocks.reshape(*batch, _RANGE_FANIN, k, 2, _RANGE_LANES)
        folded = blocks[..., 0, :, :, :]
        for i in range(1, _RANGE_FANIN):
            folded = jnp.minimum(folded, blocks[..., i, :, :, :])
        acc = jnp.concatenate([folded, rest], axis=-3)
    tail = x[..., m * _RANGE_FANIN * _RANGE_LANES :]
    pair = jnp.min(acc, axis=(-3, -1))  # [..., 2]
    if tail.shape[-1]:
        pair = jnp.minimum(pair, jnp.min(entry_keys(tail), axis=-1))
    if not poison:  # back from the rotation; none finite gives +Inf's key, in both columns
        end = jnp.uint32(2 * _KEY_INF)
        pair = jnp.where(pair < end, pair, end).astype(jnp.int32) - key_inf
    lo, hi = pair[..., 0], ~pair[..., 1]
    if poison:  # a non-finite key is at or beyond an infinity's in one of the columns
        finite_row = (lo > ~key_inf) & (hi < key_inf)
        return (
            jnp.where(finite_row, _from_order_key(lo), -inf),
            jnp.where(finite_row, _from_order_key(hi), inf),
        )
    return _from_order_key(lo), _from_order_key(hi)


def quantize(x: Any, key: Any, bits: int = 8, *, prng: str = "hash") -> Quantized:
    """Stochastic rounding of each row of `x` to `bits`-bit codes, bit-packed.

    The semantics of TFF's `UniformQuantizationEncodingStage` (tensorflow-model-optimization,
    used by `tff.aggregators.EncodedSumFactory.quantize_above_threshold`), and the unbiased
    stochastic rounding of Suresh et al. 2017 ("Distributed Mean Estimation with Limited
    Communication"): per row, with `M = 2**bits - 1`,
    `x' = (x - min) / (max - min) * M` (0 where max == min), `q` is `floor(x')` or
    `floor(x') + 1`, rounding up with probability `x' - floor(x')`, and `dequantize` returns
    `q / M * (max - min) + min`. With the default "hash" stream, `q = (round(x' * 2**F) + r)
    >> F` for a random field `r` of F = 15 bits (`hash_fields`; round half to even):
    `E[q] = round(x' * 2**F) / 2**F`, within 2**-(F+1) of the float32 x', a bias of at most
    2**-16 of a step. With "threefry", `q = floor(x') + [U < x' - floor(x')]` for
    `U = jax.random.uniform(key)`. Unbiased up to that and float32 rounding; error at most one
    step `(max - min) / M`; a constant row is exact. Every finite float32 row quantizes and
    decodes to finite values, also a range wider than float32 holds (`max - min`
    overflowing, e.g. [-2e38, 2e38]) or one whose entries are all tiny (`M / (max - min)`
    overflowing): such rows scale `x`, `min` and `max` by a power of two first, which is exact.

    Args:
      x: float `[..., n]`, n >= 1. Rows are quantized independently (leading dims are batch).
      key: a PRNG key; the same key gives the same codes. For per-client streams use
        `jax.random.fold_in(key, client_id)`.
      bits: static int in `[1, 16]`.
      prng: where the rounding's randomness comes from: "hash" (default; a counter-based
        hash seeded through `fold_in(key, ...)`, defined in `hash_fields` and computed in the
        same pass as the rounding and packing; the same key gives the same codes on every
        jax version) or "threefry" (`jax.random.uniform(key, x.shape)`, the `jax.random`
        stream, 23 bits per code and several times slower on CPU: see the bench case
        `quantize_10000000_float32_b8`; its values depend on `jax_threefry_partitionable`,
        whose default differs between jax 0.4 and newer versions). Same formula and
        guarantees; the two give different codes for the same key.

    Returns:
      A `Quantized` pytree: `packed` uint32 `[..., ceil(n/32) * bits]` (32 codes fill `bits`
      words exactly), `minimum` and `maximum` float32 `[...]`.

    Non-finite entries: the range is taken over the finite entries only; +Inf encodes as the
    maximum, -Inf and NaN as the minimum. Eagerly (concrete `x`) a non-finite entry raises
    instead, since the value cannot be represented. Wider float types (float64 with x64 on) are
    cast to float32 first: eagerly an entry beyond float32 range raises; under `jit` it becomes
    +-Inf in the cast and follows the non-finite rule.

    Raises:
      TypeError: `x` not floating, `bits` not an int, `key` not a PRNG key.
      ValueError: `bits` outside `[1, 16]`, `x` scalar or empty rows, non-finite concrete `x`
        or beyond float32 range, unknown `prng`, or (with "hash") more than about 8.6e9
        entries in one call.

    >>> import jax, jax.numpy as jnp
    >>> q = quantize(jnp.array([0.0, 0.5, 1.0]), jax.random.PRNGKey(0), bits=1)
    >>> q.packed.shape, q.minimum, q.maximum
    ((1,), Array(0., dtype=float32), Array(1., dtype=float32))
    >>> dequantize(q)[jnp.array([0, 2])]
    Array([0., 1.], dtype=float32)
    """
    return _quantize(x, key, bits, prng, tf_graph=False)


def _quantize(x: Any, key: Any, bits: int, prng: str, tf_graph: bool) -> Quantized:
    """`quantize`, with the same codes for `tf_graph=True`, in a formulation for TensorFlow
    graphs converted by jax2tf without XLA (TFF's worker), where every elementwise step is an
    op of its own: plain reductions for the range and no lanes axis in the codes pass, which
    in XLA's fused loops are slower."""
    x = _validate.floating("x", x)
    _validate.min_ndim("x", x, 1, "[..., n]")
    if x.shape[-1] < 1:
        raise ValueError(f"x must be [..., n] with n >= 1, got shape {tuple(x.shape)}")
    bits = _validate.static_int("bits", bits, 1, MAX_BITS)
    key = _check_key(key)
    if prng not in PRNGS:
        raise ValueError(f"prng must be one of {PRNGS}, got {prng!r}")
    if prng == "hash":
        _hash_layout(tuple(x.shape))
    if _validate.is_concrete(x) and x.size:
        host = np.asarray(x)
        if not np.all(np.isfinite(host)):
            raise ValueError(
                f"x must be finite to quantize, got {host[~np.isfinite(host)][0]} "
                f"({int(np.sum(~np.isfinite(host)))} non-finite entries)"
            )
        if host.dtype.itemsize > 4:
            with np.errstate(over="ignore"):  # the overflow is what is being looked for
                overflow = np.isinf(host.astype(np.float32))
            if np.any(overflow):
                raise ValueError(
                    "x must be within float32 range to quantize (|x| <= 3.4028235e+38: the "
                    f"codes and the range are float32), got {host[overflow][0]} "
                    f"({int(np.sum(overflow))} entries beyond)"
                )
    x = x.astype(jnp.float32)
    minimum, maximum = _finite_range(x, plain=tf_graph)
    # A row with no finite entry: range [0, 0].
    minimum = jnp.where(jnp.isfinite(minimum), minimum, 0.0)
    maximum = jnp.where(jnp.isfinite(maximum), maximum, 0.0)
    packed = _packed_codes(x, minimum, maximum, key, bits, prng, lanes=not tf_graph)
    return Quantized(packed, minimum, maximum, bits, x.shape[-1])


def _row_scaling(
    minimum: jax.Array, maximum: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per row of a finite range: `(factor, minimum * factor, maximum * factor - minimum *
    factor)`, with `factor` a power of two that keeps the span and `levels / span` finite.

    The factor is 1 unless a row needs another: a range wider than float32 holds (`max - min`
    overflows, e.g. [-2e38, 2e38]) takes 1/4; a row whose entries are all below 2**-60 in
    magnitude takes 2**100, so that its span, however small, is a normal float32 and
    `levels / span` stays finite. Scaling by a power of two is exact there, so `x'` and the
    decoded values are the same numbers as without it.
    """
    span = maximum - minimum
    tiny = jnp.maximum(jnp.abs(minimum), jnp.abs(maximum)) < _TINY_MAGNITUDE
    factor = jnp.where(tiny, jnp.float32(_TINY_FACTOR), jnp.float32(1.0))
    factor = jnp.where(jnp.isfinite(span), factor, jnp.float32(_WIDE_FACTOR))
    low = minimum * factor
    return factor, low, maximum * factor - low


_TINY_MAGNITUDE = 2.0**-60
_TINY_FACTOR = 2.0**100  # |x| * factor < 2**40 in such rows
_WIDE_FACTOR = 0.25  # span / 4 <= max / 2: room for the decode's rounding


def _packed_codes(
    x: jax.Array, minimum: jax.Array, maximum: jax.Array, key: jax.Array, bits: int, prng: str,
    lanes: bool = True,
) -> jax.Array:
    """The second of `quantize`'s two passes: float32 `x [..., n]` and its finite range
    (`[...]`, finite) to the packed codes (timed alone as the bench's codes pass). `lanes`:
    see `_hash_codes_packed`."""
    levels = jnp.float32((1 << bits) - 1)
    factor, low, span = (v[..., None] for v in _row_scaling(minimum, maximum))
    safe_span = jnp.where(span > 0, span, 1.0)
    if prng == "threefry":
        # One division per row, then a multiply per entry (x' may be an ulp or two off the
        # quotient, as when XLA:CPU rewrites a division by a loop-invariant divisor itself).
        scale = levels / safe_span
        scaled = (x * factor - low) * scale  # 0 where span == 0 (all finite entries are min)
        scaled = jnp.where(scaled > 0, scaled, 0.0)  # NaN and -Inf -> 0; clamps rounding
        scaled = jnp.where(scaled < levels, scaled, levels)  # +Inf -> levels
        lower = jnp.floor(scaled)
        uniform = jax.random.uniform(key, x.shape, jnp.float32)
        up = (uniform < scaled - lower).astype(jnp.int32)
        return pack_codes((lower.astype(jnp.int32) + up).astype(jnp.uint32), bits)

    # Fixed point with F = 15 fractional bits: t = round(x' * 2**F), and code = (t + r) >> F
    # for the F-bit random field r rounds x' up with probability (t mod 2**F) / 2**F, so
    # E[code] = t / 2**F. Scaling by 2**F is exact: s is x' * 2**F. t + r < 2**31 at 16 bits.
    top = levels * jnp.float32(1 << FIELD_BITS)
    scale = top / safe_span
    # Up to 8 bits, top < 2**23: adding 2**23 rounds s to an integer (half to even, the IEEE
    # default) and leaves it in the low mantissa bits, with none of the checks XLA wraps
    # around a float-to-int conversion.
    magic = ((1 << bits) - 1) << FIELD_BITS < 1 << 23

    def code_of(values: jax.Array, field: jax.Array) -> jax.Array:
        extra = (1,) * (values.ndim - factor.ndim)  # the planar pass's lanes axis, if any
        s = (values * factor.reshape(*factor.shape, *extra) - low.reshape(*low.shape, *extra))
        s = s * scale.reshape(*scale.shape, *extra)
        s = jnp.where(s > 0, s, 0.0)  # NaN and -Inf -> code 0
        s = jnp.where(s < top, s, top)  # +Inf -> code levels; also clamps rounding
        if magic:
            t = lax.bitcast_convert_type(s + jnp.float32(1 << 23), jnp.uint32)
            t = t & jnp.uint32((1 << 23) - 1)
        else:
            t = jnp.round(s).astype(jnp.int32).astype(jnp.uint32)  # half to even; s >= 0
        return (t + field) >> jnp.uint32(FIELD_BITS)

    return _hash_codes_packed(x, code_of, _hash_seeds(key), bits, lanes)


def _hash_codes_packed(
    x: jax.Array, code_of: Any, seeds: jax.Array, bits: int, lanes: bool = True
) -> jax.Array:
    """`pack_codes(code_of(x, hash_fields(key, x.shape, bits)), bits)`, computed for the planar
    layout word by word from P contiguous slices of `x`, each word's hashes from its index, so
    that the hashing, rounding and packing are one elementwise pass. `lanes=False` keeps the
    words in one axis (for TensorFlow graphs, where the lanes only add ops)."""
    batch, n = x.shape[:-1], x.shape[-1]
    n_pad = _padded_length(n)
    if n_pad > n:  # NaN encodes as code 0, the value `pack_codes` pads with
        x = jnp.pad(x, [(0, 0)] * len(batch) + [(0, n_pad - n)], constant_values=jnp.nan)
    rows = math.prod(batch)
    row_words = n_pad // 2
    row_start = (lax.iota(jnp.uint32, rows) * jnp.uint32(row_words)).reshape(*batch, 1)
    if not _planar(bits):
        counter = row_start + lax.iota(jnp.uint32, row_words)
        hashes = _hash_words(seeds, counter)
        fields = jnp.stack([_low_field(hashes), _high_field(hashes)], axis=-1)
        return pack_bits(code_of(x, fields.reshape(*batch, n_pad)), bits)
    # Word w holds entries p * W + w (plane p), in slots w * P + p: hash word w * P / 2 + p // 2.
    per = 32 // bits
    width = n_pad // per
    # Words in rows of 8 lanes where they divide evenly: newer XLA:CPU then builds the counter
    # vector with vector adds instead of lane-by-lane inserts (bench case "part 2/2: fedkernels
    # codes pass" of `quantize_10000000_float32_b8`).
    lanes = (width // 8, 8) if lanes and width % 8 == 0 else (width,)
    planes = x.reshape(*batch, per, *lanes)
    index = lax.broadcasted_iota(jnp.uint32, lanes, 0)
    if len(lanes) == 2:
        index = index * jnp.uint32(8) + lax.broadcasted_iota(jnp.uint32, lanes, 1)
    first = row_start.reshape(*batch, *(1,) * len(lanes)) + index * jnp.uint32(per // 2)
    words = None
    for p in range(per):
        if p % 2 == 0:
            hashes = _hash_words(seeds, first + jnp.uint32(p // 2) if p else first)
            field = _low_field(hashes)
        else:
            field = _high_field(hashes)
        plane = lax.index_in_dim(planes, p, axis=planes.ndim - 1 - len(lanes), keepdims=False)
        code = code_of(plane, field)
        code = code << jnp.uint32(p * bits) if p else code
        words = code if words is None else words | code
    return words.reshape(*batch, width)


def quantize_rows(x: jax.Array, keys: jax.Array, bits: int) -> tuple[Quantized, jax.Array]:
    """`quantize` of each row `x[c]` with its own key `keys[c]` ("hash" stream), for callers
    that drop rows holding NaN or Inf: returns `(q, finite)`, `finite` bool `[C]`.

    Rows where `finite` is True get exactly `quantize(x[c], keys[c], bits)`. The range pass
    that `quantize` makes anyway also flags the non-finite rows (`_finite_range(poison=True)`),
    so no separate `isfinite` pass over `x` is needed; such rows get range [0, 0] and codes
    that mean nothing. Internal: no validation (the pipeline checks its inputs).
    """
    x = x.astype(jnp.float32)
    minimum, maximum = _finite_range(x, poison=True)
    finite = jnp.isfinite(minimum) & jnp.isfinite(maximum)
    minimum = jnp.where(finite, minimum, 0.0)
    maximum = jnp.where(finite, maximum, 0.0)
    packed = jax.vmap(lambda r, lo, hi, k: _packed_codes(r, lo, hi, k, bits, "hash"))(
        x, minimum, maximum, keys
    )
    return Quantized(packed, minimum, maximum, bits, x.shape[-1]), finite


def decodes_finite(q: Quantized) -> jax.Array:
    """Per row of `q`, whether `weighted_code_sum` can decode it: its per-row coefficient
    `(max - min) / levels` is finite, i.e. the range is at most 3.4e38 wide. (`dequantize`
    decodes any finite range; `weighted_code_sum` scales codes by this coefficient.)"""
    span = q.maximum - q.minimum
    return jnp.isfinite(span) & jnp.isfinite(q.minimum)


def weighted_code_sum(q: Quantized, weights: jax.Array) -> jax.Array:
    """`sum_c weights[c] * dequantize(q)[c]` over the rows of a `Quantized` `[C, n]`, float32
    `[n]`, straight from the packed words: `sum_c a_c * code_c + sum_c weights[c] * min_c`
    with `a_c = weights[c] * (max_c - min_c) / (2**bits - 1)`. Rows with weight 0 add
    nothing, so their codes and range must be finite (zeros, as the pipeline's excluded rows).

    A loop over groups of rows that unpacks each row's words and adds them into one float32
    accumulator, so the `[C, n]` decoded array is never written (on XLA:CPU, C=100, n=1e6,
    8 bits: see the pipeline bench). For `bits` not dividing 32 (codes straddling words) it
    unpacks and adds row by row (`code_row_sum`).
    """
    weights = weights.astype(jnp.float32)
    levels = jnp.float32((1 << q.bits) - 1)
    coef = weights * ((q.maximum - q.minimum) / levels)
    return code_row_sum(q.packed, q.bits, q.length, coef) + jnp.sum(weights * q.minimum)


def code_row_sum(packed: jax.Array, bits: int, length: int, coef: jax.Array) -> jax.Array:
    """`sum_c coef[c] * codes[c]` for packed codes `[C, words]` (`pack_codes` layout), in the
    dtype of `coef` (`[C]`, float32 or int32), shape `[length]`. Integer `coef` gives the exact
    integer code sum (for the shared-range mode, what secure aggregation sums)."""
    c = packed.shape[0]
    dtype = coef.dtype
    if c == 0:
        return jnp.zeros((length,), dtype)
    if not _planar(bits):
        def add(i, acc):
            return acc + coef[i] * unpack_bits(packed[i], bits, length).astype(dtype)

        return lax.fori_loop(0, c, add, jnp.zeros((length,), dtype))
    def add_row(acc, i):
        row = lax.dynamic_index_in_dim(packed, i, keepdims=False)
        codes = _code_planes(row, bits).astype(jnp.int32).astype(dtype)
        return acc + coef[i] * codes  # plane p of the row in acc[p]

    acc = fold_rows(add_row, jnp.zeros((32 // bits, packed.shape[1]), dtype), c)
    return acc.reshape(-1)[:length]


def dequantize(q: Quantized) -> jax.Array:
    """Decodes a `Quantized`: `codes / (2**bits - 1) * (max - min) + min`, float32 `[..., n]`.

    Any finite range decodes to finite values in `[min, max]`, also a range wider than
    float32 holds (`max - min` overflowing, e.g. [-2e38, 2e38]): such rows compute the same
    formula scaled by a power of two. Code 0 decodes to `min` exactly, and a constant row
    (`max == min`) to its value.

    Raises:
      TypeError: `q` not a `Quantized`.
      ValueError: `q`'s fields disagree (packed not `[..., ceil(length / 32) * bits]`, or
        minimum / maximum not of packed's batch shape), as a hand-made `Quantized` may.

    >>> import jax, jax.numpy as jnp
    >>> x = jnp.array([[2.0, 2.0], [-1.0, 3.0]])
    >>> dequantize(quantize(x, jax.random.PRNGKey(1), bits=4))
    Array([[ 2.,  2.],
           [-1.,  3.]], dtype=float32)
    """
    if not isinstance(q, Quantized):
        raise TypeError(f"q must be a Quantized (from fedkernels.quantize), got {type(q).__name__}")
    words = packed_words(q.length, q.bits)
    packed, minimum, maximum = (tuple(np.shape(a)) for a in (q.packed, q.minimum, q.maximum))
    if packed[-1:] != (words,) or minimum != packed[:-1] or maximum != packed[:-1]:
        raise ValueError(
            f"q's fields must agree: packed [..., {words}] (length {q.length} at {q.bits} bits), "
            f"minimum and maximum of packed's batch shape; got packed {packed}, minimum "
            f"{minimum}, maximum {maximum}"
        )
    if not _planar(q.bits) or q.packed.size == 0:
        return _decode(q.codes().astype(jnp.float32), q)

    def planes(q: Quantized) -> jax.Array:  # plane p of each row in [..., p, :]
        codes = _code_planes(q.packed, q.bits)
        return _decode(codes.astype(jnp.int32).astype(jnp.float32), q)

    # The planes are decoded inside a conditional whose predicate is true at run time (any
    # word | 1 is nonzero): its result is a buffer of its own, so the reshape to [..., n]
    # stays a free bitcast. Without it XLA:CPU (jax 0.4.30) fuses the reshape into the
    # decode's loop as its root and indexes every entry by a division, several times slower
    # (bench case `dequantize_10000000_float32_b8`); under vmap the cond becomes a select of
    # the same values.
    always = (q.packed.reshape(-1)[0] | jnp.uint32(1)) != 0
    decoded = lax.cond(always, planes, lambda q: jnp.zeros(
        (*q.packed.shape[:-1], 32 // q.bits, q.packed.shape[-1]), jnp.float32), q)
    return decoded.reshape(*q.packed.shape[:-1], -1)[..., : q.length]


def _decode(codes: jax.Array, q: Quantized) -> jax.Array:
    """`dequantize`'s formula on the codes of `q`, already unpacked to float32 `[..., n]`
    (or to planes `[..., P, W]`: the row's range broadcasts over the trailing axes)."""
    levels = jnp.float32((1 << q.bits) - 1)
    extra = codes.ndim - q.minimum.ndim

    def rows(v: jax.Array) -> jax.Array:
        return v.reshape(v.shape + (1,) * extra)

    factor, low, span = (rows(v) for v in _row_scaling(q.minimum, q.maximum))
    # With factor 1 (every range up to 3.4e38 wide, down to 2**-90) this is the plain
    # `codes / levels * span + min`; the clip keeps rounding from leaving [min, max] (a
    # range that ends at the float32 maximum would otherwise round up to Inf).
    decoded = (codes / levels * span + low) * (1.0 / factor)
    return jnp.clip(decoded, rows(q.minimum), rows(q.maximum))
