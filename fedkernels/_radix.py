"""Exact top-k selection by threshold search on integer magnitude keys, with bit-packed masks.

`top_k_indices_radix(keys, k)` returns the same indices as `lax.top_k` on the keys followed by
an ascending sort (ties at the k-th key go to the lower index), without a partial sort:

1. Find T, the k-th largest key of each row, by counting. A strided sample of the row gives a
   bracket `[lo, hi]` around T; one pass counts `key > hi` and `key >= lo`. If T is inside and
   at most `capacity` keys fall in the bracket, those candidates are compacted and T is found
   among them by bisection on their values. Otherwise the bracket is narrowed by bisection
   over the key range with one counting pass per step (radix select), which always ends:
   the result is exact whatever the data (ties, NaN, all-equal rows), only slower.
2. Select every key > T, plus the first `k - count(key > T)` keys equal to T in index order.
3. Compact the selection to indices in ascending order.

Why it is fast on CPU: every pass over the row is a comparison fused into a row reduction of
width 32 that packs the mask into uint32 words (one bit per entry). XLA:CPU runs that as fast
as a copy, while full reductions (`sum(key > t)`) and `cumsum` over 1e7 entries are 10 to 50
times slower there. Counts are popcounts of the words; compaction locates the j-th set bit
from the prefix sums of the popcounts of groups of four words (128x shorter than the row),
then its word from the group's running sums held as bytes, then the bit inside its word.

Uses only comparisons, shifts, gathers, small scatter-adds, cumsum and `lax.top_k` on a small
sample, sort-free.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

WORD = 32

ROW_MODES = ("map", "vmap")
CUMSUM_MODES = ("matmul", "scan")
# `top_k(method="auto")` uses radix select from this row length on, `lax.top_k` below it:
# the crossover on XLA:CPU for k = 0.1% of the row (from 1% of it, radix select is already
# the faster from 2**15; bench case `top_k_100000_float32_k1000` of `--suite kernels`).
DEFAULT_MIN_LENGTH = 1 << 16


@dataclasses.dataclass(frozen=True)
class RadixConfig:
    """How radix select runs: static choices, resolved once (`for_backend`) and passed down.

    Fields:
      rows: how batched rows run in `map_rows`: "map" (one at a time, `lax.map`: each row's
        branches really branch; the faster on CPU) or "vmap" (batched, which fills a GPU/TPU;
        a per-row branch then executes both sides, so `top_k_rows` branches once per batch).
      cumsum: how `_cumsum` runs: "matmul" (blocks of 32 summed by a triangular matmul, the
        faster on the CPU runtime of jaxlib < 0.4.32) or "scan" (`lax.associative_scan`, the
        faster elsewhere).
      min_length: row length from which method "auto" uses radix select instead of
        `lax.top_k` (both give the same result).
    """

    rows: str = "map"
    cumsum: str = "scan"
    min_length: int = DEFAULT_MIN_LENGTH

    def __post_init__(self) -> None:
        if self.rows not in ROW_MODES:
            raise ValueError(f"rows must be one of {ROW_MODES}, got {self.rows!r}")
        if self.cumsum not in CUMSUM_MODES:
            raise ValueError(f"cumsum must be one of {CUMSUM_MODES}, got {self.cumsum!r}")
        if isinstance(self.min_length, bool) or not isinstance(self.min_length, int) or (
            self.min_length < 1
        ):
            raise ValueError(f"min_length must be an int >= 1, got {self.min_length!r}")


def for_backend(backend: str | None = None) -> RadixConfig:
    """The defaults for a JAX backend ("cpu", "gpu", "tpu"; None: `jax.default_backend()`,
    read now): rows one at a time on CPU, batched elsewhere; the matmul prefix sum on the CPU
    runtime of jaxlib < 0.4.32, the scan elsewhere."""
    backend = jax.default_backend() if backend is None else backend
    version = tuple(int(p) for p in re.findall(r"\d+", jax.__version__)[:3])
    old_cpu_runtime = backend == "cpu" and version < (0, 4, 32)
    return RadixConfig(
        rows="map" if backend == "cpu" else "vmap",
        cumsum="matmul" if old_cpu_runtime else "scan",
    )


def map_rows(fn: Callable[..., Any], rows: tuple[jax.Array, ...], config: RadixConfig) -> Any:
    """`fn(*row)` for each row of the arrays in `rows` (same leading size), stacked, run as
    `config.rows` says. Passes over long rows are best kept out of `fn`: on CPU a pass
    inside the loop runs at about a third of the bandwidth of the same pass over the whole
    batch (`top_k_rows`).
    """
    if config.rows == "map":
        return lax.map(lambda r: fn(*r), rows)
    return jax.vmap(fn)(*rows)


def _pack(mask: jax.Array) -> jax.Array:
    """bool `[d]` -> uint32 `[ceil(d / 32)]`; bit i of word w is `mask[32 w + i]`."""
    d = mask.shape[-1]
    pad = -d % WORD
    if pad:
        mask = jnp.pad(mask, (0, pad))
    bits = mask.reshape(-1, WORD).astype(jnp.uint32) << jnp.arange(WORD, dtype=jnp.uint32)
    return jnp.sum(bits, axis=-1, dtype=jnp.uint32)


def _pack2(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`(_pack(a), _pack(b))` for two bool `[d]` masks, in one pass over their inputs.

    XLA:CPU emits two packing reductions as two loops, each recomputing the masks from the
    row; here one reduction of width 16 packs 16 bits of `a` in the low and 16 bits of `b`
    in the high half of each word, and the halves are regrouped on the 16x shorter words:
    about half the time of two packings (bench case `top_k` of `--suite kernels`).
    """
    d = a.shape[-1]
    pad = -d % WORD
    if pad:
        a, b = jnp.pad(a, (0, pad)), jnp.pad(b, (0, pad))
    half = WORD // 2
    shifts = jnp.arange(half, dtype=jnp.uint32)
    both = (a.reshape(-1, half).astype(jnp.uint32) << shifts) | (
        b.reshape(-1, half).astype(jnp.uint32) << (shifts + jnp.uint32(half))
    )
    words = jnp.sum(both, axis=-1, dtype=jnp.uint32).reshape(-1, 2)
    low = jnp.uint32(0xFFFF)
    first = (words[:, 0] & low) | ((words[:, 1] & low) << half)
    second = (words[:, 0] >> half) | ((words[:, 1] >> half) << half)
    return first, second


def _popcount(words: jax.Array) -> jax.Array:
    """Set bits per uint32 word, as int32 (SWAR bit tricks: shifts, ands, one multiply)."""
    w = words - ((words >> 1) & jnp.uint32(0x55555555))
    w = (w & jnp.uint32(0x33333333)) + ((w >> 2) & jnp.uint32(0x33333333))
    w = (w + (w >> 4)) & jnp.uint32(0x0F0F0F0F)
    return ((w * jnp.uint32(0x01010101)) >> 24).astype(jnp.int32)


def _count(words: jax.Array) -> jax.Array:
    return jnp.sum(_popcount(words))


def _select_bit(words: jax.Array, rank: jax.Array) -> jax.Array:
    """Position (0..31) of the set bit of rank `rank` (0-based, from bit 0 up) in each word."""
    position = jnp.zeros(words.shape, jnp.uint32)
    rank = rank.astype(jnp.int32)
    for width in (16, 8, 4, 2, 1):
        low = _popcount((words >> position) & jnp.uint32((1 << width) - 1))
        skip = rank >= low
        rank = jnp.where(skip, rank - low, rank)
        position = jnp.where(skip, position + jnp.uint32(width), position)
    return position.astype(jnp.int32)


def _cumsum(
    values: jax.Array, config: RadixConfig, max_value: int = WORD, total: int | None = None
) -> jax.Array:
    """Inclusive prefix sum of int32 `[n]` whose entries lie in `[0, max_value]` and, when
    `total` is given, sum to at most `total`.

    Blocks of 32 are summed by a matmul with an upper-triangular matrix of ones (exact in
    float32 while a block's sum stays below 2**24: a block sums to at most
    `min(32 * max_value, total)`), and the block offsets by the same scan, recursively; a
    level whose sums could pass 2**24 uses `lax.associative_scan` in int32. Which of the two
    runs is `config.cumsum`.
    """
    n = values.shape[0]
    block_bound = max_value * WORD if total is None else min(max_value * WORD, total)
    if config.cumsum == "scan" or n <= WORD or block_bound >= 1 << 24:
        return lax.associative_scan(jnp.add, values.astype(jnp.int32))
    blocks = jnp.pad(values, (0, -n % WORD)).reshape(-1, WORD).astype(jnp.float32)
    upper = jnp.triu(jnp.ones((WORD, WORD), jnp.float32))
    within = jnp.dot(blocks, upper, precision=lax.Precision.HIGHEST).astype(jnp.int32)
    totals = within[:, -1]
    offsets = _cumsum(totals, config, max_value * WORD, total) - totals
    return (within + offsets[:, None]).reshape(-1)[:n]


# Words per group in `_compact`: four popcounts (each <= 32) fit the four bytes of a uint32,
# and one multiply by 0x01010101 turns them into their running sums (each <= 128).
_GROUP = 4


def _compact(words: jax.Array, size: int, config: RadixConfig | None = None) -> jax.Array:
    """Indices of the first `size` set bits of `words` (uint32 `[n]`), ascending, int32.

    Slots beyond the number of set bits hold unspecified in-range indices. `config` None:
    `for_backend()`.

    The prefix sum (slow on XLA:CPU, about 3.5 ns per entry) runs over groups of `_GROUP`
    words, not over words: each group's four popcounts are packed as bytes and summed in place
    by one multiply (SWAR), so a slot finds its group from the group prefix sums, then its
    word from the group's bytes, then its bit: cheaper than a prefix sum over words.
    """
    config = for_backend() if config is None else config
    n = words.shape[0]
    grouped = jnp.pad(words, (0, -n % _GROUP)).reshape(-1, _GROUP)
    counts = _popcount(grouped).astype(jnp.uint32)
    byte_shifts = jnp.arange(0, 8 * _GROUP, 8, dtype=jnp.uint32)
    # Byte i of `running` is counts[0] + ... + counts[i] of its group (at most 128: no carry).
    running = jnp.sum(counts << byte_shifts, axis=1, dtype=jnp.uint32) * jnp.uint32(0x01010101)
    group_counts = (running >> 24).astype(jnp.int32)
    inclusive = _cumsum(group_counts, config, WORD * _GROUP)
    slots = jnp.arange(size, dtype=jnp.int32)
    num_groups = group_counts.shape[0]
    if size * max(num_groups.bit_length(), 1) <= 4 * num_groups:
        # Few slots: binary search of each slot's group in the prefix counts.
        group = jnp.searchsorted(inclusive, slots, side="right").astype(jnp.int32)
    else:
        # Many slots: group(j) = #{groups starting at or before slot j} - 1. Mark each group's
        # first slot (scatter-add, out-of-range starts dropped), then a prefix sum over slots.
        starts = jnp.minimum(inclusive - group_counts, size)
        marks = jnp.zeros(size + 1, jnp.int32).at[starts].add(1, mode="drop")
        group = _cumsum(marks[:size], config, num_groups, total=num_groups) - 1
    group = jnp.clip(group, 0, num_groups - 1)
    rank = (slots - (inclusive[group] - group_counts[group])).astype(jnp.uint32)
    sums = running[group]
    # The slot's word: how many of the group's first three running sums are <= its rank.
    below = [(sums >> jnp.uint32(8 * i)) & jnp.uint32(0xFF) for i in range(_GROUP - 1)]
    within = sum((b <= rank).astype(jnp.int32) for b in below)
    before = jnp.zeros_like(rank)
    for i, b in enumerate(below):
        before = jnp.where(within == i + 1, b, before)
    word = jnp.minimum(group * _GROUP + within, n - 1)  # in range beyond the set bits too
    return word * WORD + _select_bit(grouped.reshape(-1)[word], (rank - before).astype(jnp.int32))


def _first_bits(words: jax.Array, m: jax.Array, config: RadixConfig) -> jax.Array:
    """`words` with only its first `m` set bits (in index order) kept."""
    counts = _popcount(words)
    exclusive = _cumsum(counts, config) - counts
    keep = m - exclusive  # how many of this word's bits to keep
    last = _select_bit(words, jnp.clip(keep - 1, 0, WORD - 1)).astype(jnp.uint32)
    # Bits 0..last inclusive; (2 << 31) wraps to 0 in uint32, so the mask is then all ones.
    partial = words & ((jnp.uint32(2) << last) - jnp.uint32(1))
    return jnp.where(keep >= counts, words, jnp.where(keep <= 0, jnp.uint32(0), partial))


def _key_info(dtype: jnp.dtype) -> tuple[jnp.dtype, int, int, jnp.dtype]:
    """(key dtype, largest key, key of +Inf, float dtype of the same width)."""
    if dtype == jnp.int64:
        return jnp.int64, 2**63 - 1, 0x7FF0000000000000, jnp.float64
    return jnp.int32, 2**31 - 1, 0x7F800000, jnp.float32


SAMPLE_SIZE = 16384  # keys in the strided sample that brackets the k-th largest
SAMPLE_SIGMAS = 3.5  # bracket half-width in binomial standard deviations
CAPACITY_FACTOR = 1.5  # candidate slots per expected key in the bracket


def sample_plan(d: int, k: int) -> tuple[int, int, int, int]:
    """Static sampling plan: (sample stride, sample size, hi rank, lo rank), ranks descending.

    The number of sample keys above the k-th largest is about binomial(s, k/d); the bracket
    takes 3.5 standard deviations (plus 2) on each side, so for tie-free data it misses T with
    probability about 5e-4 per row, and a miss only costs extra counting passes (about 20,
    the result stays exact): cheaper on average than compacting a wider bracket every row.
    A 16384-key sample costs a sixth of a 65536-key one and leaves about 6000 candidates
    for k = 1e4 of d = 1e6.
    """
    stride = max(1, d // SAMPLE_SIZE)
    size = d // stride
    if stride == 1:
        return 1, d, k - 1, k - 1  # the sample is the row: its k-th key is T itself
    expected = k / stride
    spread = SAMPLE_SIGMAS * math.sqrt(expected * max(1.0 - k / d, 0.0)) + 2.0
    hi_rank = math.floor(expected - spread)
    lo_rank = math.ceil(expected + spread)
    return stride, size, hi_rank, lo_rank


def default_capacity(d: int, k: int) -> int:
    """Static bound on compacted candidates: 1.5x the expected bracket population (whose
    relative spread is about 10% for k = 1e4 of 1e6), at least 4096."""
    stride, _, hi_rank, lo_rank = sample_plan(d, k)
    expected = (max(lo_rank, 0) - max(hi_rank, -1) + 2) * stride
    return int(min(d, max(4096, CAPACITY_FACTOR * expected)))


def _sample_bounds(sample: jax.Array, d: int, k: int) -> tuple[jax.Array, jax.Array]:
    """`(lo, hi)`, a bracket around T (the k-th largest of a row's `d` keys) from the keys of
    the row's strided sample (`sample_plan`), by order statistics of the sample: `lo` the
    key of rank `lo_rank`, `hi` of rank `hi_rank` (key max / 0 beyond the sample)."""
    key_dtype, key_max, key_inf, float_dtype = _key_info(sample.dtype)
    _, size, hi_rank, lo_rank = sample_plan(d, k)
    # Order statistics via lax.top_k on the keys viewed as floats (clamped at +Inf so NaN
    # payloads do not compare unordered): exact and monotone.
    as_float = lax.bitcast_convert_type(
        jnp.minimum(sample, jnp.asarray(key_inf, key_dtype)), float_dtype
    )
    top = min(max(lo_rank, hi_rank) + 1, size)
    ordered = lax.bitcast_convert_type(lax.top_k(as_float, max(top, 1))[0], key_dtype)
    hi = ordered[..., hi_rank] if 0 <= hi_rank < size else jnp.full(
        sample.shape[:-1], key_max, key_dtype)
    lo = ordered[..., lo_rank] if 0 <= lo_rank < size else jnp.zeros(sample.shape[:-1], key_dtype)
    if size == d and lo_rank < size:
        hi = lo  # the exact T of an unsampled row; the key may still be a clamped NaN
    return lo, hi


def _sample(x: jax.Array, k: int) -> jax.Array:
    """The strided sample of `sample_plan` along the last axis of `x`."""
    stride, size, _, _ = sample_plan(x.shape[-1], k)
    return x[..., : size * stride : stride]


def _trial(keys: jax.Array, lo: jax.Array, hi: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The sample's trial, one pass over a row's keys: packed masks `key > hi`, `key >= lo`."""
    return _pack2(keys > hi, keys >= lo)


def _trial_ok(
    gt_hi: jax.Array, ge_lo: jax.Array, k: int, capacity: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(T bracketed by at most `capacity` keys, #(key > hi), #(key >= lo)) of a trial."""
    count_gt_hi, count_ge_lo = _count(gt_hi), _count(ge_lo)
    ok = (count_gt_hi < k) & (count_ge_lo >= k) & (count_ge_lo - count_gt_hi <= capacity)
    return ok, count_gt_hi, count_ge_lo


def _resolve(
    trial: tuple[jax.Array, jax.Array, jax.Array, jax.Array],
    row: Callable[[], jax.Array],
    key_fn: Callable[[jax.Array], jax.Array],
    k: int,
    capacity: int,
    d: int,
    fallback: bool = True,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Splits the row around T, the k-th largest key, from the sample's trial.

    `trial` is `(gt_hi, ge_lo, lo, hi)` (`_trial`); `row()` gives the row `x` and is only
    evaluated when the trial failed (a fallback that reads the row again). With
    `fallback=False` the caller has checked that the trial succeeded (`_trial_ok`).
    Returns `(above, bracket, count_above, a)`: bit-packed masks of the keys above a bound `b`
    and of the keys in `[a, b]`, with `a <= T <= b` and `count_above < k <= count_above +
    #bracket`. `#bracket <= capacity` unless `a == b` (then T = a, tied more than capacity
    times). The keys are recomputed from `x` inside every pass rather than stored: writing a
    key array the size of `x` costs more on CPU than the pass.
    """
    gt_hi, ge_lo, lo, hi = trial
    key_dtype = lo.dtype
    key_max = _key_info(key_dtype)[1]
    from_sample_ok, count_gt_hi, count_ge_lo = _trial_ok(gt_hi, ge_lo, k, capacity)

    def from_sample():
        return gt_hi, ge_lo & ~gt_hi, count_gt_hi, lo

    if not fallback:
        return from_sample()

    # Otherwise narrow [a, b] by bisection of the key range, one counting pass per step
    # (radix select), until T is bracketed by at most `capacity` keys. Always ends; exact.
    # Invariant: T in [a, b]; count_ge_a = #(keys >= a) >= k; count_gt_b = #(keys > b) < k.
    def by_bisection():
        x = row()

        def narrow(state):
            a, b, count_ge_a, count_gt_b, lo, hi, count_gt_hi, count_ge_lo = state
            above = count_gt_hi >= k  # T > hi
            below = count_ge_lo < k  # T < lo
            inside = ~above & ~below
            a = jnp.where(above, hi + 1, jnp.where(inside, lo, a))
            count_ge_a = jnp.where(
                above, count_gt_hi, jnp.where(inside, count_ge_lo, count_ge_a)
            )
            b = jnp.where(below, lo - 1, jnp.where(inside, hi, b))
            count_gt_b = jnp.where(
                below, count_ge_lo, jnp.where(inside, count_gt_hi, count_gt_b)
            )
            mid = a + (b - a) // 2  # next trial: plain bisection of the key range
            keys = key_fn(x)
            gt_mid, eq_mid = _pack2(keys > mid, keys == mid)
            count = _count(gt_mid)
            count_ge = count + _count(eq_mid)
            return a, b, count_ge_a, count_gt_b, mid, mid, count, count_ge

        def unfinished(state):
            a, b, count_ge_a, count_gt_b = state[:4]
            return (a < b) & (count_ge_a - count_gt_b > capacity)

        zero = jnp.asarray(0, key_dtype)
        state = (zero, jnp.asarray(key_max, key_dtype), jnp.int32(d), jnp.int32(0), lo, hi,
                 count_gt_hi, count_ge_lo)
        state = lax.while_loop(unfinished, narrow, narrow(state))
        a, b, _, count_gt_b = state[:4]
        keys = key_fn(x)
        return (*_pack2(keys > b, (keys >= a) & (keys <= b)), count_gt_b, a)

    return lax.cond(from_sample_ok, from_sample, by_bisection)


def _bracket(
    x: jax.Array, key_fn: Callable[[jax.Array], jax.Array], k: int, capacity: int
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """`_resolve` for one row `x` `[d]`: bracket from a strided sample, then one pass (the
    trial, usually the only pass needed), then the fallback if the trial failed."""
    d = x.shape[-1]
    lo, hi = _sample_bounds(key_fn(_sample(x, k)), d, k)
    gt_hi, ge_lo = _trial(key_fn(x), lo, hi)
    return _resolve((gt_hi, ge_lo, lo, hi), lambda: x, key_fn, k, capacity, d)


def _candidates_from(
    bracketed: tuple[jax.Array, jax.Array, jax.Array, jax.Array],
    take: Callable[[jax.Array], jax.Array],
    key_fn: Callable[[jax.Array], jax.Array],
    k: int,
    capacity: int,
    config: RadixConfig,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
    """(above, bracket, candidate positions, candidate keys (-1 in unused slots), T, rank of T
    among the bracket) from `_resolve`'s split; `take(positions)` gathers the row's entries.
    When the bracket overflows `capacity` it holds only keys equal to T."""
    above, bracket, count_above, a = bracketed
    key_dtype = a.dtype
    positions = _compact(bracket, capacity, config)
    valid = jnp.arange(capacity) < _count(bracket)
    keys = jnp.where(valid, key_fn(take(positions)), jnp.asarray(-1, key_dtype))
    rank = k - count_above  # T is the rank-th largest candidate, 1 <= rank <= #candidates

    # Bisection on the few candidates, from their own range; packed counts (module docstring).
    def bisect(bounds):
        low, high = bounds  # T in [low, high]
        gap = high - low  # no overflow: both in [0, key_max]
        mid = low + gap // 2 + (gap & 1)
        enough = _count(_pack(keys >= mid)) >= rank
        return jnp.where(enough, mid, low), jnp.where(enough, high, mid - 1)

    overflow = _count(bracket) > capacity  # then every bracket key equals a (= T)
    low = jnp.min(jnp.where(valid, keys, jnp.iinfo(key_dtype).max))
    high = jnp.where(overflow, low, jnp.max(keys))
    threshold, _ = lax.while_loop(lambda b: b[0] < b[1], bisect, (low, high))
    threshold = jnp.where(overflow, a, threshold)
    return above, bracket, positions, keys, threshold, rank


def _candidates(
    x: jax.Array, key_fn: Callable[[jax.Array], jax.Array], k: int, capacity: int | None,
    config: RadixConfig,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
    """`_candidates_from` for one row `x` `[d]`."""
    d = x.shape[-1]
    capacity = _capacity(d, k, capacity)
    return _candidates_from(
        _bracket(x, key_fn, k, capacity), lambda p: x[p], key_fn, k, capacity, config
    )


def _capacity(d: int, k: int, capacity: int | None) -> int:
    return default_capacity(d, k) if capacity is None else max(1, min(capacity, d))


def kth_largest(
    x: jax.Array, key_fn: Callable[[jax.Array], jax.Array], k: int, capacity: int | None = None,
    config: RadixConfig | None = None,
) -> jax.Array:
    """T, the k-th largest of the nonnegative integer keys `key_fn(x)` (`x: [d]`), exactly.
    `config` None: `for_backend()`."""
    config = for_backend() if config is None else config
    return _candidates(x, key_fn, k, capacity, config)[4]


def top_k_words(
    x: jax.Array, key_fn: Callable[[jax.Array], jax.Array], k: int, capacity: int | None = None,
    config: RadixConfig | None = None,
) -> jax.Array:
    """Bit-packed mask (uint32 `[ceil(d / 32)]`, exactly k bits set) of the k largest keys
    `key_fn(x)`, `x: [d]`, ties at the k-th key to the lower index.

    Every key above T is set by the counting passes; the candidates (keys in the bracket
    around T, ascending positions) that are above T, and the first `rank - #(above T)` of
    those equal to T, are added by a scatter of their bits, without another pass over `x`.
    `config` None: `for_backend()`.
    """
    config = for_backend() if config is None else config
    return _words_from(_candidates(x, key_fn, k, capacity, config), config)


def _words_from(
    candidates: tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array, jax.Array],
    config: RadixConfig,
) -> jax.Array:
    """`top_k_words`' mask from `_candidates_from`'s result."""
    above, bracket, positions, keys, threshold, rank = candidates

    def from_candidates():
        over = keys > threshold
        ties = keys == threshold
        room = rank - _count(_pack(over))
        chosen = over | (ties & (_cumsum(ties.astype(jnp.int32), config, 1) <= room))
        bit = jnp.uint32(1) << (positions % WORD).astype(jnp.uint32)
        bits = lax.bitcast_convert_type(jnp.where(chosen, bit, jnp.uint32(0)), jnp.int32)
        # Chosen candidates are outside `above` and distinct: adding their bits sets them.
        words = lax.bitcast_convert_type(above, jnp.int32).at[positions // WORD].add(bits)
        return lax.bitcast_convert_type(words, jnp.uint32)

    def many_ties():  # the bracket is all T and overflowed the candidates: first `rank` of it
        return above | _first_bits(bracket, rank, config)

    return lax.cond(_count(bracket) > keys.shape[0], many_ties, from_candidates)


def top_k_rows(
    rows: tuple[jax.Array, ...],
    combine: Callable[..., jax.Array],
    key_fn: Callable[[jax.Array], jax.Array],
    k: int,
    capacity: int | None = None,
    config: RadixConfig | None = None,
) -> tuple[jax.Array, jax.Array]:
    """`top_k_words` and its indices for each row of `x = combine(*rows)` (`rows`: arrays
    `[C, d]`, `combine` elementwise, e.g. `x + residual`), `x` never materialised:
    `(words uint32 [C, ceil(d / 32)], indices int32 [C, k] ascending)`.

    The passes over `[C, d]` (the sample and the trial's two masks) run over the whole
    batch at once; only the per-row work on the short words and candidates runs row by row
    (`map_rows`, as `config.rows` says), with the fallback bisection reading its row from
    `rows` only for a row whose trial failed. On CPU a pass over the whole batch runs on
    every core at full bandwidth, while the same pass inside a loop over rows runs at about a
    third of it. `config` None: `for_backend()`.
    """
    config = for_backend() if config is None else config
    c, d = rows[0].shape
    capacity = _capacity(d, k, capacity)
    with jax.named_scope("sample"):
        lo, hi = _sample_bounds(key_fn(combine(*(_sample(a, k) for a in rows))), d, k)
    with jax.named_scope("trial"):
        gt_hi, ge_lo = jax.vmap(_trial)(key_fn(combine(*rows)), lo, hi)

    def select(fallback):
        def one(gt, ge, lo_i, hi_i, i):
            def row():
                return combine(*(lax.dynamic_index_in_dim(a, i, keepdims=False) for a in rows))

            def take(positions):
                return combine(*(a[i, positions] for a in rows))

            bracketed = _resolve((gt, ge, lo_i, hi_i), row, key_fn, k, capacity, d, fallback)
            words = _words_from(
                _candidates_from(bracketed, take, key_fn, k, capacity, config), config
            )
            return words, _compact(words, k, config)

        return map_rows(one, (gt_hi, ge_lo, lo, hi, jnp.arange(c, dtype=jnp.int32)), config)

    # Branch once for the batch, on whether every row's trial succeeded: then no row needs the
    # fallback. Batched rows (vmap) would otherwise run both sides of a per-row `lax.cond` (a
    # gather of the whole rows, then bisection passes) every time; rows run one at a time
    # (`lax.map`) skip a per-row branch whose fallback closes over the whole rows, which
    # halves the per-row work. When some trial failed, each row branches on its own.
    ok = jax.vmap(lambda g, e: _trial_ok(g, e, k, capacity)[0])(gt_hi, ge_lo)
    with jax.named_scope("per_row"):
        return lax.cond(jnp.all(ok), lambda: select(False), lambda: select(True))


def unpack_mask(words: jax.Array, d: int) -> jax.Array:
    """bool `[d]`: bit i of the packed `words` (the inverse of `_pack`).

    Written as a broadcast of each word over its 32 bits, not a gather `words[i // 32]`:
    XLA:CPU fuses it into the consumer either way, and the broadcast runs faster.
    """
    return unpack_blocks(words).reshape(-1)[:d]


def unpack_blocks(words: jax.Array) -> jax.Array:
    """bool `[n, 32]`: row w holds the bits of word w; for rows `[d]` with `d % 32 == 0`
    viewed as `[d // 32, 32]` this is the fastest unpacked mask."""
    bits = (words[:, None] >> jnp.arange(WORD, dtype=jnp.uint32)) & jnp.uint32(1)
    return bits.astype(jnp.bool_)


def select_unset(words: jax.Array, x: jax.Array) -> jax.Array:
    """`x` `[d]` with the entries whose bit is set in `words` replaced by zeros."""
    d = x.shape[-1]
    if d % WORD == 0:
        blocks = x.reshape(-1, WORD)
        return jnp.where(unpack_blocks(words), jnp.zeros_like(blocks), blocks).reshape(d)
    return jnp.where(unpack_mask(words, d), jnp.zeros_like(x), x)


def top_k_indices_radix(
    x: jax.Array, key_fn: Callable[[jax.Array], jax.Array], k: int, capacity: int | None = None,
    config: RadixConfig | None = None,
) -> jax.Array:
    """Indices (int32, ascending) of the k largest keys `key_fn(x)`, `x: [d]`, ties to the
    lower index. `key_fn` is elementwise, giving nonnegative int32 or int64 keys. `config`
    None: `for_backend()`."""
    config = for_backend() if config is None else config
    return _compact(top_k_words(x, key_fn, k, capacity, config), k, config)
