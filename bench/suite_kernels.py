"""Kernel benchmarks: fedkernels (jitted, warm) beside NumPy, the obvious JAX, and the bound.

For each case, every implementation runs in the same process on the same data. The bound is
the bytes the kernel must move (inputs read once, outputs written once) divided by the copy
bandwidth measured at the start of the run (`ctx.bandwidth`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.flatten_util import ravel_pytree

import fedkernels as fk
from bench import _common
from fedkernels import _quantize, _radix, _topk

# op -> (baseline impl, target description, check(ratio_vs_numpy, pct_of_bound) -> bool)
TARGETS: dict[str, tuple[str, Callable[[float, float], bool]]] = {
    "masked_mean": ("fedkernels <= 1.0x numpy X.mean(0)", lambda r, b: r <= 1.0),
    "top_k": ("fedkernels <= 0.5x np.argpartition", lambda r, b: r <= 0.5),
    "quantize": ("fedkernels >= 50% of copy bound", lambda r, b: b >= 50),
    "dequantize": ("fedkernels >= 50% of copy bound", lambda r, b: b >= 50),
    "scatter_sum": ("fedkernels <= 1.0x numpy bincount+count", lambda r, b: r <= 1.0),
    "flatten": ("at most one copy (>= 50% of one-copy bound)", lambda r, b: b >= 50),
    "unflatten": ("at most one copy (>= 50% of one-copy bound)", lambda r, b: b >= 50),
}


class Case:
    """One op at one size: named implementations of the same computation."""

    def __init__(
        self,
        op: str,
        shape: tuple[int, ...],
        dtype: Any,
        size: int,
        nbytes: float,
        baseline: str,
        params: str = "",
    ):
        self.op = op
        self.name = _common.case_name(op, shape, dtype) + (f"_{params}" if params else "")
        self.shape = shape
        self.dtype = np.dtype(dtype).name
        self.size = size
        self.nbytes = nbytes
        self.baseline = baseline
        self.impls: list[tuple[str, Callable[..., Any], tuple, int]] = []
        self.checks: dict[str, Any] = {}

    def add(self, name: str, fn: Callable[..., Any], *args: Any, temp_bytes: int = 0) -> None:
        """An implementation; `temp_bytes` estimates the host memory its temporaries need
        beyond the inputs (checked against what is free before it runs, on CPU)."""
        self.impls.append((name, fn, args, temp_bytes))


# ---------------------------------------------------------------- cases


def _masked_mean_cases(ctx: _common.Context, size: tuple[int, int]) -> list[Case]:
    cases = []
    num_clients, d = size
    rng = np.random.default_rng(0)
    host = rng.standard_normal((num_clients, d), dtype=np.float32)
    for row in host:  # row by row: the same draws as one [C, d] call, without its float64 copy
        row[rng.random(d) < 0.5] = 0.0
    x = ctx.put(host)
    case = Case(
        "masked_mean",
        (num_clients, d),
        np.float32,
        num_clients * d,
        nbytes=4 * num_clients * d + 4 * d,
        baseline="numpy X.mean(0)",
    )

    def numpy_masked(a):
        total = a.sum(0)
        count = np.count_nonzero(a, axis=0)
        return np.where(count > 0, total / np.maximum(count, 1), 0).astype(a.dtype)

    def jax_obvious(a):
        count = (a != 0).sum(0)
        return jnp.where(count > 0, a.sum(0) / jnp.maximum(count, 1), 0)

    case.add("fedkernels", jax.jit(fk.masked_mean), x)
    case.add("numpy X.mean(0)", lambda a: a.mean(0), host)
    input_bytes = host.nbytes
    case.add("numpy masked", numpy_masked, host, temp_bytes=input_bytes // 2)
    # Measured on jax 0.10.2 with host memory kept ([1000, 1e6]): the obvious formulation
    # peaks at about 3.7 inputs' worth of temporaries and X.mean(0) at 2.8 (on jax 0.4.30
    # the former at 0.9); the guards (see `_run_case`) are 4 and 3.
    case.add("jax obvious", jax.jit(jax_obvious), x, temp_bytes=4 * input_bytes)
    case.add("jax X.mean(0)", jax.jit(lambda a: a.mean(0)), x, temp_bytes=3 * input_bytes)
    # Same result as NumPy's masked mean (float32 sums in another order: a tolerance). Called
    # eagerly, so the jitted function's first timed call still includes its compilation.
    case.checks["matches_numpy_masked"] = bool(
        np.allclose(np.asarray(fk.masked_mean(x)), numpy_masked(host), rtol=1e-5, atol=1e-6)
    )
    cases.append(case)
    return cases


def _top_k_cases(ctx: _common.Context, size: tuple[int, int]) -> list[Case]:
    cases = []
    hosts: dict[int, np.ndarray] = {}
    d, k = size
    if d not in hosts:
        hosts.clear()
        hosts[d] = np.random.default_rng(1).standard_normal(d, dtype=np.float32)
    host = hosts[d]
    x = ctx.put(host)
    case = Case(
        "top_k",
        (d,),
        np.float32,
        d,
        nbytes=4 * d + 8 * k,
        baseline="numpy argpartition",
        params=f"k{k}",
    )
    fast = jax.jit(lambda a, k=k: fk.top_k(a, k))
    case.add("fedkernels", fast, x)
    # fedkernels' method="lax" (lax.top_k on int32 keys) is left out: XLA:CPU's top_k on
    # integers is orders of magnitude slower than every other row at this size.
    case.add("numpy argpartition", lambda a, k=k: np.argpartition(np.abs(a), -k)[-k:], host)
    case.add("jax lax.top_k", jax.jit(lambda a, k=k: lax.top_k(jnp.abs(a), k)[1]), x)
    if d >= _topk.AUTO_RADIX_MIN_LENGTH:
        # Where fedkernels' time goes: its three steps timed apart. The selection as a packed
        # mask (sample, counting pass, candidates, bisection), the mask compacted to the k
        # ascending indices, and the gather of the k values.
        select = jax.jit(lambda a, k=k: _radix.top_k_words(a, _topk.magnitude_key, k))
        case.add("part 1/3: fedkernels selection mask", select, x)
        words = select(x)
        compact = jax.jit(lambda w, k=k: _radix._compact(w, k))
        case.add("part 2/3: fedkernels mask to k indices", compact, words)
        case.add("part 3/3: fedkernels gather of k values", jax.jit(lambda a, i: a[i]), x,
                 compact(words))
    # Same selected set as argpartition (random normal data: no ties at the k-th value).
    _, got = fast(x)
    want = np.argpartition(np.abs(host), -k)[-k:]
    case.checks["same_set_as_argpartition"] = bool(np.array_equal(np.asarray(got), np.sort(want)))
    cases.append(case)
    return cases


def _quantize_cases(ctx: _common.Context, size: int) -> list[Case]:
    cases = []
    bits = 8
    key = jax.random.PRNGKey(0)
    d = size
    host = np.random.default_rng(2).standard_normal(d, dtype=np.float32)
    x = ctx.put(host)
    rng = np.random.default_rng(3)
    case = Case(
        "quantize",
        (d,),
        np.float32,
        d,
        nbytes=4 * d + d * bits / 8,
        baseline="numpy",
        params=f"b{bits}",
    )

    def numpy_quantize(a):
        lo, hi = a.min(), a.max()
        scaled = (a - lo) * (255.0 / (hi - lo))
        codes = np.floor(scaled + rng.random(a.shape, dtype=np.float32))
        return np.clip(codes, 0, 255).astype(np.uint8).view(np.uint32), lo, hi

    def jax_obvious(a, key):
        lo, hi = a.min(), a.max()
        scaled = (a - lo) * (255.0 / (hi - lo))
        codes = jnp.floor(scaled + jax.random.uniform(key, a.shape))
        return jnp.clip(codes, 0, 255).astype(jnp.uint8), lo, hi

    quantize = jax.jit(lambda a, key: fk.quantize(a, key, bits))
    case.add("fedkernels", quantize, x, key)
    case.add(
        "fedkernels[prng=threefry]",
        jax.jit(lambda a, key: fk.quantize(a, key, bits, prng="threefry")),
        x,
        key,
    )
    case.add("numpy", numpy_quantize, host)
    case.add("jax obvious (uint8, threefry)", jax.jit(jax_obvious), x, key)
    # What bounds fedkernels: its two passes timed apart (the range must be known before the
    # first code, so x is read twice), and the bytes of the codes pass moved with no
    # arithmetic (float32 read, one byte per element written packed) as that pass's floor.
    case.add("part 1/2: fedkernels range pass (min, max)", jax.jit(_quantize._finite_range), x)
    lo, hi = _quantize._finite_range(x)
    case.add(
        "part 2/2: fedkernels codes pass, range given",
        jax.jit(lambda a, lo, hi, key: _quantize._packed_codes(a, lo, hi, key, bits, "hash")),
        x, lo, hi, key,
    )

    def no_arithmetic(a):  # four contiguous planes to one word each, as the planar layout
        b = a.reshape(4, -1).astype(jnp.int32).astype(jnp.uint32) & jnp.uint32(255)
        return b[0] | (b[1] << 8) | (b[2] << 16) | (b[3] << 24)

    if d % 4 == 0:
        case.add("floor of part 2: same bytes, no arithmetic", jax.jit(no_arithmetic), x)
    cases.append(case)

    q = quantize(x, key)
    # The baselines decode the same codes one byte each, NumPy's natural format.
    codes_host = np.asarray(q.codes()).astype(np.uint8)
    codes_u8 = ctx.put(codes_host)
    lo, hi = float(q.minimum), float(q.maximum)
    deq = Case(
        "dequantize",
        (d,),
        np.float32,
        d,
        nbytes=4 * d + d * bits / 8,
        baseline="numpy",
        params=f"b{bits}",
    )

    def numpy_dequantize(codes):
        return codes.astype(np.float32) * np.float32((hi - lo) / 255) + lo

    def jax_obvious_deq(codes, minimum, maximum):
        return codes.astype(jnp.float32) * ((maximum - minimum) / 255) + minimum

    deq.add("fedkernels", jax.jit(fk.dequantize), q)
    deq.add("numpy", numpy_dequantize, codes_host)
    deq.add("jax obvious (uint8 codes)", jax.jit(jax_obvious_deq), codes_u8, q.minimum, q.maximum)
    cases.append(deq)
    return cases


def _scatter_cases(ctx: _common.Context, size: tuple[int, int, int]) -> list[Case]:
    cases = []
    num_clients, k, d = size
    rng = np.random.default_rng(4)
    idx_host = np.stack([np.sort(rng.choice(d, k, replace=False)) for _ in range(num_clients)])
    idx_host = idx_host.astype(np.int32)
    val_host = rng.standard_normal((num_clients, k), dtype=np.float32)
    idx, val = ctx.put(idx_host), ctx.put(val_host)
    case = Case(
        "scatter_sum",
        (num_clients, k),
        np.float32,
        num_clients * k,
        nbytes=8 * num_clients * k + 8 * d,
        baseline="numpy bincount+count",
        params=f"d{d}",
    )

    def numpy_bincount(v, i):
        flat = i.reshape(-1)
        return (
            np.bincount(flat, weights=v.reshape(-1), minlength=d),
            np.bincount(flat, minlength=d),
        )

    def jax_obvious(v, i):
        flat = i.reshape(-1)
        total = jnp.zeros(d, v.dtype).at[flat].add(v.reshape(-1))
        count = jnp.zeros(d, jnp.int32).at[flat].add(1)
        return total, count

    case.add("fedkernels", jax.jit(lambda v, i: fk.scatter_sum(v, i, d)), val, idx)
    case.add("numpy bincount+count", numpy_bincount, val_host, idx_host)
    case.add("jax .at[].add", jax.jit(jax_obvious), val, idx)
    cases.append(case)
    return cases


def _flatten_cases(ctx: _common.Context, size: tuple[int, int]) -> list[Case]:
    cases = []
    num_clients, d = size
    leaves = 100
    rng = np.random.default_rng(5)
    # 100 leaves of uneven sizes summing to d, shaped [C, a, b] / [C, n].
    cuts = np.sort(rng.choice(np.arange(1, d), leaves - 1, replace=False))
    lengths = np.diff(np.concatenate([[0], cuts, [d]]))
    tree_host = {
        f"layer{i:03d}": rng.standard_normal((num_clients, int(n)), dtype=np.float32)
        for i, n in enumerate(lengths)
    }
    tree = ctx.put(tree_host)
    shape = (num_clients, d)
    case = Case(
        "flatten",
        shape,
        np.float32,
        num_clients * d,
        nbytes=8 * num_clients * d,
        baseline="numpy concatenate",
        params=f"{leaves}leaves",
    )
    flat_fn = jax.jit(lambda t: fk.flatten(t, batch_ndim=1)[0])
    case.add("fedkernels", flat_fn, tree)

    def numpy_concatenate(t):
        return np.concatenate([t[name] for name in sorted(t)], axis=-1)

    case.add("numpy concatenate", numpy_concatenate, tree_host)
    case.checks["equals_numpy_concatenate"] = bool(  # eager: flat_fn's compile stays timed
        np.array_equal(np.asarray(fk.flatten(tree, batch_ndim=1)[0]), numpy_concatenate(tree_host))
    )
    case.add(
        "jax ravel_pytree (vmap)",
        jax.jit(jax.vmap(lambda t: ravel_pytree(t)[0])),
        tree,
    )
    cases.append(case)

    flat, unflatten = fk.flatten(tree, batch_ndim=1)
    flat_host = np.asarray(flat)
    un = Case(
        "unflatten",
        shape,
        np.float32,
        num_clients * d,
        nbytes=8 * num_clients * d,
        baseline="numpy split+copy",
        params=f"{leaves}leaves",
    )
    offsets = np.cumsum(lengths)[:-1]
    un.add("fedkernels", jax.jit(unflatten), flat)
    un.add(
        "numpy split+copy", lambda f: [p.copy() for p in np.split(f, offsets, axis=-1)], flat_host
    )
    un.add("jax split", jax.jit(lambda f: jnp.split(f, offsets, axis=-1)), flat)
    cases.append(un)
    return cases


# ---------------------------------------------------------------- running


def _sizes(ctx: _common.Context) -> dict[str, list]:
    gpu = ctx.device.platform != "cpu"
    if ctx.quick:
        return {
            "masked_mean": [(100, 10**6)],
            "top_k": [(10**7, 10**4), (10**7, 10**5), (10**7, 10**6)],
            "quantize": [10**7],
            "scatter_sum": [(100, 10**4, 10**6)],
            "flatten": [(1, 10**7)],
        }
    big = 10**9 if gpu else 10**8
    return {
        "masked_mean": [(100, 10**5), (100, 10**6), (1000, 10**6), (100, 10**7)],
        "top_k": [
            (10**5, 10**3),  # above `RadixConfig.min_length`: radix select against lax.top_k
            (10**6, 10**3),
            (10**6, 10**4),
            (10**7, 10**4),
            (10**7, 10**5),
            (10**7, 10**6),
            (big, 10**5),
            (big, 10**6),
        ],
        "quantize": [10**6, 10**7, big],
        "scatter_sum": [
            (100, 10**3, 10**5),
            (100, 10**4, 10**6),
            (1000, 10**4, 10**6),
            (1000, 10**5, 10**7),
        ],
        "flatten": [(1, 10**6), (1, 10**7), (100, 10**6)],
    }


# Untimed calls before timing, and seconds the timed runs of each implementation add up to
# at least (see `_common.time_fn`).
_WARMUP = 3
_MIN_SECONDS = 0.3


def _run_case(ctx: _common.Context, case: Case, repeats: int) -> list[dict]:
    records = []
    for impl, fn, args, temp_bytes in case.impls:
        ctx.progress(f"  {case.name}: {impl}")
        checked = temp_bytes > 0 and ctx.device.platform == "cpu"
        free = _common.available_host_bytes() if checked else None

        def timed(fn=fn, args=args, temp_bytes=temp_bytes, free=free):
            if free is not None and temp_bytes > free - 2**30:
                # The kernel's OOM killer would end the whole run, not raise MemoryError.
                raise MemoryError(
                    f"skipped: needs about {temp_bytes / 2**30:.1f} GiB of temporaries, "
                    f"{free / 2**30:.1f} GiB available"
                )
            return _common.time_fn(
                fn, *args, repeats=repeats, warmup=_WARMUP, min_seconds=_MIN_SECONDS,
                compiles=_common.compiles(fn),
            )

        timing, error = _common.attempt(ctx.progress, timed)
        # With host memory kept the heap never shrinks: what one implementation's temporaries
        # took would otherwise be missing for the next ones (and for their guard above).
        fk.host.release_host_memory()
        records.append(
            {
                "case": case.name,
                "op": case.op,
                "shape": list(case.shape),
                "dtype": case.dtype,
                "size": case.size,
                "impl": impl,
                "bytes": case.nbytes,
                "error": error,
                **timing,
                **case.checks,
            }
        )
    base = next((r.get("median") for r in records if r["impl"] == case.baseline), None)
    base_min = next((r.get("min") for r in records if r["impl"] == case.baseline), None)
    bound = ctx.bound_seconds(case.nbytes)
    for r in records:
        median = r.get("median")
        r["baseline"] = case.baseline
        r["bound_s"] = bound
        r["ratio_vs_numpy"] = median / base if median and base else None
        # Best run against best run: steadier than medians when other jobs share the machine.
        r["ratio_vs_numpy_min"] = r["min"] / base_min if median and base_min else None
        r["pct_of_bound"] = 100 * bound / median if median and math.isfinite(bound) else None
    return records


def _fmt(value: float | None, scale: float = 1.0, digits: int = 1) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


LEGEND = [
    "case: op_shape_dtype[_params] (k: entries kept, b: bits, d: dense length); the rows under "
    "it are other implementations of the same computation on the same data, in this process",
    f"median ms: median wall time of the timed runs (at least 5 and at least {_MIN_SECONDS} s "
    f"in all, after {_WARMUP} untimed calls, block_until_ready); compile ms: first call minus "
    "median, for jitted JAX only ('-' for NumPy, which compiles nothing)",
    "vs numpy: this row's median / the baseline's median (the baseline is the case's first "
    "numpy row); < 1 is faster than NumPy, 1.00x is the baseline itself",
    "best vs best: the same ratio from each row's fastest run (steadier when other jobs "
    "share the machine)",
    "% of bound: bound ms / median ms; bound ms = bytes the op must move (inputs read once, "
    "outputs written once) / the copy bandwidth above; 100% is memory-bound at copy speed",
    "part n/m rows: one step of fedkernels' kernel timed alone, to show where its time goes",
]

_BUILDERS = {
    "masked_mean": _masked_mean_cases,
    "top_k": _top_k_cases,
    "quantize": _quantize_cases,  # and dequantize
    "scatter_sum": _scatter_cases,
    "flatten": _flatten_cases,  # and unflatten
}
OPS = tuple(_BUILDERS)  # what `--only` can pick


def run(ctx: _common.Context) -> list[dict]:
    repeats = 5 if ctx.quick else 7
    sizes = _sizes(ctx)
    records: list[dict] = []
    for key, build in _BUILDERS.items():
        if ctx.only and key not in ctx.only:
            continue
        for size in sizes[key]:
            try:
                cases = build(ctx, size)
            except (MemoryError, RuntimeError) as err:  # too big for this device
                ctx.progress(f"{key} {size}: skipped ({type(err).__name__}: {err})"[:200])
                continue
            for case in cases:
                ctx.progress(f"{case.name} ({len(case.impls)} implementations)")
                records.extend(_run_case(ctx, case, repeats))
            del cases
    _print(ctx, records)
    return records


def _print(ctx: _common.Context, records: list[dict]) -> None:
    rows = []
    for r in records:
        rows.append(
            [
                r["case"] if r["impl"] == "fedkernels" else "",
                r["impl"],
                _fmt(r.get("median"), 1e3, 2),
                _fmt(r.get("compile"), 1e3, 0),
                _fmt(r.get("ratio_vs_numpy"), 1, 2) + ("x" if r.get("ratio_vs_numpy") else ""),
                _fmt(r.get("ratio_vs_numpy_min"), 1, 2)
                + ("x" if r.get("ratio_vs_numpy_min") else ""),
                _fmt(r.get("pct_of_bound"), 1, 0) + ("%" if r.get("pct_of_bound") else ""),
                _fmt(r.get("bound_s"), 1e3, 2),
            ]
        )
    header = [
        "case",
        "implementation",
        "median ms",
        "compile ms",
        "vs numpy",
        "best vs best",
        "% of bound",
        "bound ms",
    ]
    print()
    print(_common.headline(ctx))
    print(_common.format_table(rows, header))
    _common.print_legend(LEGEND)
    print()
    print("targets: the project's own goals for fedkernels (from its issue tracker), this run:")
    for r in records:
        if r["impl"] != "fedkernels" or r.get("median") is None:
            continue
        text, check = TARGETS[r["op"]]
        ok = check(r["ratio_vs_numpy"] or math.inf, r["pct_of_bound"] or 0.0)
        extra = ""
        if "same_set_as_argpartition" in r:
            extra = f", same set as argpartition: {r['same_set_as_argpartition']}"
        print(
            f"  {'PASS' if ok else 'MISS'}  {r['case']}: {r['ratio_vs_numpy']:.2f}x numpy "
            f"(best vs best {r['ratio_vs_numpy_min']:.2f}x), {r['pct_of_bound']:.0f}% of bound"
            f"  [{text}]{extra}"
        )
    print(flush=True)
