"""Scaling: how time and peak memory grow as the number of clients C and the length d grow.

For the pipeline suite's round (`compressor(...).round`, top-k 1% + error feedback + 8 bits)
and for each kernel, two sweeps: C grows at a fixed d, and d grows at a fixed C (kernels of
one vector, d only). At each point: fedkernels (jitted, compiled ahead; compile time
reported apart) beside the NumPy equivalent (for the round, the per-client NumPy loop of
the pipeline suite), their runs alternating, medians; the memory bound (bytes that must
move / the copy bandwidth measured at the start); and peak memory: for JAX, XLA's buffer
assignment for the compiled program (arguments + outputs + temporaries - aliased buffers),
for NumPy the inputs plus tracemalloc's peak during one call. In full runs the round's C
sweep also runs with `chunk_size` (clients in chunks, fewer temporaries).

Per curve (op, sweep, implementation) the suite reports the least-squares slope of
log(time) against log(size): 1 means time grows in proportion to the work, below 1 fixed
costs still weigh (small sizes), above 1 something grows faster than the data (caches,
memory). `slope_top` fits only the three largest sizes; `slope_best` fits each point's
fastest run instead of its median (steadier when other jobs load the machine).
"""

from __future__ import annotations

import dataclasses
import math
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import fedkernels as fk
from bench import _common
from bench.suite_pipeline import numpy_round, round_inputs, round_options


@dataclasses.dataclass
class Impl:
    name: str
    fn: Callable[..., Any]
    args: tuple
    jax: bool  # a jitted function: compiled ahead, peak memory from XLA


@dataclasses.dataclass
class Point:
    op: str
    num_clients: int
    d: int
    nbytes: float  # bytes that must move: inputs read once, outputs written once
    impls: list[Impl]


# ---------------------------------------------------------------- points


def _round_point(ctx: _common.Context, num_clients: int, d: int, chunks: tuple[int, ...]) -> Point:
    host_u, host_r = round_inputs(num_clients, d)
    u, r = ctx.put(host_u), ctx.put(host_r)
    ids = ctx.put(np.arange(num_clients, dtype=np.int32))
    key = jax.random.PRNGKey(0)
    options = round_options(d)
    comp = fk.compressor({"w": jax.ShapeDtypeStruct((d,), jnp.float32)}, **options,
                         **_common.compressor_options(ctx))

    def jitted(chunk_size):
        def round_(u, r):
            res = comp.round({"w": u}, key, client_ids=ids, residuals=r, chunk_size=chunk_size)
            return res.mean, res.residuals

        return jax.jit(round_)

    impls = [Impl("fedkernels", jitted(None), (u, r), True)]
    impls += [
        Impl(f"fedkernels chunk_size={chunk}", jitted(chunk), (u, r), True)
        for chunk in chunks
        if chunk < num_clients
    ]
    k = options["top_k_count"]
    impls.append(Impl("numpy per-client loop", lambda a, b: numpy_round(a, b, k, 8, 0),
                      (host_u, host_r), False))
    return Point("round", num_clients, d, 3 * 4 * num_clients * d, impls)


def _masked_mean_point(ctx: _common.Context, num_clients: int, d: int) -> Point:
    rng = np.random.default_rng(0)
    host = rng.standard_normal((num_clients, d), dtype=np.float32)
    host[rng.random((num_clients, d), dtype=np.float32) < 0.5] = 0.0

    def numpy_masked(a):
        count = np.count_nonzero(a, axis=0)
        return np.where(count > 0, a.sum(0) / np.maximum(count, 1), 0).astype(a.dtype)

    return Point("masked_mean", num_clients, d, 4 * num_clients * d + 4 * d, [
        Impl("fedkernels", jax.jit(fk.masked_mean), (ctx.put(host),), True),
        Impl("numpy masked mean", numpy_masked, (host,), False),
    ])


def _top_k_point(ctx: _common.Context, num_clients: int, d: int) -> Point:
    k = max(d // 100, 1)
    shape = (d,) if num_clients == 1 else (num_clients, d)
    host = np.random.default_rng(1).standard_normal(shape, dtype=np.float32)
    return Point("top_k", num_clients, d, 4 * num_clients * d + 8 * num_clients * k, [
        Impl("fedkernels", jax.jit(lambda a: fk.top_k(a, k)), (ctx.put(host),), True),
        Impl("numpy argpartition",
             lambda a: np.argpartition(np.abs(a), -k, axis=-1)[..., -k:], (host,), False),
    ])


def _quantize_point(ctx: _common.Context, num_clients: int, d: int) -> Point:
    host = np.random.default_rng(2).standard_normal(d, dtype=np.float32)
    rng = np.random.default_rng(3)
    key = jax.random.PRNGKey(0)

    def numpy_quantize(a):
        lo, hi = a.min(), a.max()
        codes = np.floor((a - lo) * (255.0 / (hi - lo)) + rng.random(a.shape, dtype=np.float32))
        return np.clip(codes, 0, 255).astype(np.uint8), lo, hi

    return Point("quantize", 1, d, 4 * d + d, [
        Impl("fedkernels", jax.jit(lambda a, key: fk.quantize(a, key, 8)), (ctx.put(host), key),
             True),
        Impl("numpy", numpy_quantize, (host,), False),
    ])


def _dequantize_point(ctx: _common.Context, num_clients: int, d: int) -> Point:
    x = ctx.put(np.random.default_rng(2).standard_normal(d, dtype=np.float32))
    q = jax.jit(lambda a: fk.quantize(a, jax.random.PRNGKey(0), 8))(x)
    codes = np.asarray(q.codes()).astype(np.uint8)  # NumPy's natural format, a byte each
    lo, hi = float(q.minimum), float(q.maximum)
    scale = np.float32((hi - lo) / 255)
    return Point("dequantize", 1, d, d + 4 * d, [
        Impl("fedkernels", jax.jit(fk.dequantize), (q,), True),
        Impl("numpy", lambda c: c.astype(np.float32) * scale + np.float32(lo), (codes,), False),
    ])


def _scatter_sum_point(ctx: _common.Context, num_clients: int, d: int) -> Point:
    k = max(d // 100, 1)
    rng = np.random.default_rng(4)
    idx = np.sort(rng.integers(0, d, (num_clients, k), dtype=np.int32), axis=1)
    val = rng.standard_normal((num_clients, k), dtype=np.float32)

    def numpy_bincount(v, i):
        flat = i.reshape(-1)
        return (np.bincount(flat, weights=v.reshape(-1), minlength=d),
                np.bincount(flat, minlength=d))

    return Point("scatter_sum", num_clients, d, 8 * num_clients * k + 8 * d, [
        Impl("fedkernels", jax.jit(lambda v, i: fk.scatter_sum(v, i, d)),
             (ctx.put(val), ctx.put(idx)), True),
        Impl("numpy bincount+count", numpy_bincount, (val, idx), False),
    ])


def _flatten_point(ctx: _common.Context, num_clients: int, d: int) -> Point:
    leaves = 10
    rng = np.random.default_rng(5)
    lengths = np.diff(np.linspace(0, d, leaves + 1).astype(int))
    tree = {f"layer{i}": rng.standard_normal((num_clients, int(n)), dtype=np.float32)
            for i, n in enumerate(lengths)}
    return Point("flatten", num_clients, d, 8 * num_clients * d, [
        Impl("fedkernels", jax.jit(lambda t: fk.flatten(t, batch_ndim=1)[0]),
             (ctx.put(tree),), True),
        Impl("numpy concatenate",
             lambda t: np.concatenate([t[name] for name in sorted(t)], axis=-1), (tree,), False),
    ])


BUILDERS: dict[str, Callable[..., Point]] = {
    "round": _round_point,
    "masked_mean": _masked_mean_point,
    "top_k": _top_k_point,
    "quantize": _quantize_point,
    "dequantize": _dequantize_point,
    "scatter_sum": _scatter_sum_point,
    "flatten": _flatten_point,
}


@dataclasses.dataclass(frozen=True)
class Sweep:
    op: str
    axis: str  # "C" or "d": what grows
    fixed: int  # the other one
    sizes: tuple[int, ...]

    def shape(self, size: int) -> tuple[int, int]:
        return (size, self.fixed) if self.axis == "C" else (self.fixed, size)


def sweeps(quick: bool, gpu: bool = False) -> list[Sweep]:
    """The curves: C from 10 to 1000 and d from 1e4 to 1e7.

    Quick: d to 1e6, and the round's d to 1e5 only (the round's compile, top-k's radix
    path from 2**16 on, grows with d and is by far the longest of the suite).
    """
    cs = (10, 100, 1000) if quick else (10, 30, 100, 300, 1000)
    ds = (10**4, 10**5, 10**6) if quick else (10**4, 10**5, 10**6, 10**7)
    d0 = 10**4 if quick else (10**6 if gpu else 10**5)
    out = []
    for op in ("round", "masked_mean", "scatter_sum", "top_k"):
        fixed_d = 10**6 if op == "scatter_sum" and not quick else d0
        out.append(Sweep(op, "C", fixed_d, cs))
        grow = ds[:2] if op == "round" and quick else ds
        out.append(Sweep(op, "d", 1 if op == "top_k" else 10, grow))
    for op in ("quantize", "dequantize"):
        out.append(Sweep(op, "d", 1, ds))
    out.append(Sweep("flatten", "d", 10, ds))
    return out


# ---------------------------------------------------------------- measuring


def _jax_peak_bytes(compiled: Any) -> int | None:
    """Arguments + outputs + temporaries - aliased, from XLA's buffer assignment."""
    try:
        m = compiled.memory_analysis()
        return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                   - m.alias_size_in_bytes)
    except Exception:  # not every backend reports it
        return None


def _nbytes(args: tuple) -> int:
    return sum(int(np.asarray(leaf).nbytes) for leaf in jax.tree_util.tree_leaves(args))


def _measure(ctx: _common.Context, point: Point, label: str, repeats: int) -> list[dict]:
    """Compiles the JAX rows ahead, calls each row once (NumPy under tracemalloc), then times
    all rows `repeats` times, alternating run by run."""
    rows = {}
    calls = {}
    for impl in point.impls:
        row = {"error": None}
        try:
            if impl.jax:
                start = time.perf_counter()
                compiled = impl.fn.lower(*impl.args).compile()
                row["compile"] = time.perf_counter() - start
                row["peak_bytes"] = _jax_peak_bytes(compiled)
                call = (lambda c=compiled, a=impl.args: c(*a))
                start = time.perf_counter()
                _common.block(call())
                row["first"] = time.perf_counter() - start
            else:
                call = (lambda f=impl.fn, a=impl.args: f(*a))
                tracemalloc.start()
                start = time.perf_counter()
                call()
                row["first"] = time.perf_counter() - start
                row["peak_bytes"] = _nbytes(impl.args) + tracemalloc.get_traced_memory()[1]
                tracemalloc.stop()
                row["compile"] = None
            calls[impl.name] = call
        except Exception as err:  # reported in its row, not fatal
            if tracemalloc.is_tracing():
                tracemalloc.stop()
            row["error"] = f"{type(err).__name__}: {err}"[:300]
            ctx.progress(f"    {label} {impl.name}: failed: {row['error']}")
        rows[impl.name] = row
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            _common.block(call())
            times[name].append(time.perf_counter() - start)
    bound = ctx.bound_seconds(point.nbytes)
    numpy_name = point.impls[-1].name
    numpy_median = float(np.median(times[numpy_name])) if times.get(numpy_name) else None
    records = []
    for impl in point.impls:
        row = rows[impl.name]
        samples = times.get(impl.name)
        median = float(np.median(samples)) if samples else None
        records.append({
            "kind": "point",
            "op": point.op,
            "impl": impl.name,
            "clients": point.num_clients,
            "d": point.d,
            "bytes": point.nbytes,
            "bound_s": bound,
            "median": median,
            "min": min(samples) if samples else None,
            "repeats": len(samples or ()),
            "ratio_vs_numpy": median / numpy_median if median and numpy_median else None,
            "pct_of_bound": 100 * bound / median if median and math.isfinite(bound) else None,
            **row,
        })
    return records


def _slope(points: list[tuple[float, float]]) -> float | None:
    points = [(x, y) for x, y in points if x and y]
    if len(points) < 2 or len({x for x, _ in points}) < 2:
        return None
    xs, ys = np.log10([p[0] for p in points]), np.log10([p[1] for p in points])
    return float(np.polyfit(xs, ys, 1)[0])


def slopes(records: list[dict]) -> list[dict]:
    """One record per curve (op, sweep, implementation, and the bound): fitted slopes."""
    out = []
    points = [r for r in records if r.get("kind") == "point"]
    curves: dict[tuple, list[dict]] = {}
    for r in points:
        curves.setdefault((r["op"], r["sweep"], r["fixed"], r["impl"]), []).append(r)
        curves.setdefault((r["op"], r["sweep"], r["fixed"], "bound"), [])
    for (op, sweep, fixed, impl), rows in curves.items():
        if impl == "bound":
            rows = [dict(r, median=r["bound_s"], min=r["bound_s"], peak_bytes=None) for r in points
                    if (r["op"], r["sweep"], r["fixed"]) == (op, sweep, fixed)
                    and r["impl"] == "fedkernels"]
        rows = sorted(rows, key=lambda r: r["size"])
        timed = [(r["size"], r["median"]) for r in rows if r.get("median")]
        best = [(r["size"], r.get("min") or r["median"]) for r in rows if r.get("median")]
        out.append({
            "kind": "slope",
            "op": op,
            "sweep": sweep,
            "fixed": fixed,
            "impl": impl,
            "sizes": [r["size"] for r in rows],
            "points": len(timed),
            "slope": _slope(timed),
            "slope_top": _slope(timed[-3:]) if len(timed) > 3 else None,
            "slope_best": _slope(best),
            "memory_slope": _slope([(r["size"], r.get("peak_bytes")) for r in rows]),
            "median_smallest": timed[0][1] if timed else None,
            "median_largest": timed[-1][1] if timed else None,
        })
    return out


def _point_records(ctx, sweep, num_clients, d, chunks, label, repeats) -> list[dict]:
    """Builds one point's data and measures it; [] when it does not fit on the device."""
    build = BUILDERS[sweep.op]
    try:
        if sweep.op == "round":
            point = build(ctx, num_clients, d, chunks if sweep.axis == "C" else ())
        else:
            point = build(ctx, num_clients, d)
        return _measure(ctx, point, label, repeats)
    except (MemoryError, RuntimeError) as err:  # too big for this device
        ctx.progress(f"{label}: skipped ({type(err).__name__}: {err})"[:300])
        return []


def run(ctx: _common.Context) -> list[dict]:
    repeats = 3 if ctx.quick else 5
    gpu = ctx.device.platform != "cpu"
    chunks = () if ctx.quick else (50,)
    records: list[dict] = []
    done: dict[tuple, list[dict]] = {}  # a point shared by two sweeps is measured once
    for sweep in sweeps(ctx.quick, gpu):
        for size in sweep.sizes:
            num_clients, d = sweep.shape(size)
            label = f"{sweep.op} C={num_clients} d={d}"
            key = (sweep.op, num_clients, d)
            if key not in done:
                ctx.progress(f"{label} (growing {sweep.axis})")
                done[key] = _point_records(ctx, sweep, num_clients, d, chunks, label, repeats)
            for r in done[key]:
                records.append(dict(r, sweep=sweep.axis, fixed=sweep.fixed, size=size,
                                    case=f"{sweep.op}_{num_clients}x{d}_float32"))
    records += slopes(records)
    _print(ctx, records)
    return records


# ---------------------------------------------------------------- output


def _label(op: str, sweep: str, fixed: int) -> str:
    return f"{op}, C grows (d={fixed:.0e})" if sweep == "C" else (
        f"{op}, d grows (C={fixed})")


def _fmt(value: float | None, scale: float = 1.0, digits: int = 2, unit: str = "") -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}{unit}"


LEGEND = [
    "one row per point: op, which size grows (C: clients, d: length; the other is fixed), "
    "C and d; fedkernels and NumPy on the same data, runs alternating, medians in ms",
    "vs numpy: fedkernels median / NumPy median (< 1 is faster); % of bound: bound / "
    "fedkernels median, bound = bytes that must move / the copy bandwidth above",
    "peak MiB: JAX from XLA's buffer assignment (arguments + outputs + temporaries); NumPy "
    "the inputs plus tracemalloc's peak during one call; compile s: jit lowering + compiling",
    "slope: least-squares slope of log(median time) against log(growing size), all points; "
    "1 = time proportional to the work, < 1 = fixed costs still weigh, > 1 = worse than "
    "linear; slope_top: the three largest sizes only; slope_best: from each point's fastest "
    "run; the bound's slope is about 1 by construction",
    "round: top-k 1% + error feedback + 8 bits (the pipeline suite's round); 'chunk_size=N' "
    "runs its clients N at a time (lower peak memory)",
]


def _print(ctx: _common.Context, records: list[dict]) -> None:
    points = [r for r in records if r.get("kind") == "point"]
    rows = []
    keyed: dict[tuple, dict[str, dict]] = {}
    for r in points:
        keyed.setdefault((r["op"], r["sweep"], r["fixed"], r["size"]), {})[r["impl"]] = r
    for (op, sweep, _, _), impls in keyed.items():
        for name, r in impls.items():
            if name.startswith("numpy"):
                continue
            numpy_row = next(v for k, v in impls.items() if k.startswith("numpy"))
            rows.append([
                op, sweep, r["clients"], r["d"], name.replace("fedkernels", "fk"),
                _fmt(r.get("median"), 1e3), _fmt(numpy_row.get("median"), 1e3),
                _fmt(r.get("ratio_vs_numpy"), 1, 2, "x"), _fmt(r.get("pct_of_bound"), 1, 0, "%"),
                _fmt(r.get("peak_bytes"), 2**-20, 1), _fmt(numpy_row.get("peak_bytes"), 2**-20, 1),
                _fmt(r.get("compile"), 1, 1),
            ])
    print()
    print(_common.headline(ctx))
    print(_common.format_table(rows, [
        "op", "grows", "C", "d", "impl", "ms", "numpy ms", "vs numpy", "% of bound",
        "peak MiB", "numpy peak MiB", "compile s",
    ]))
    print()
    slope_rows = [
        [_label(r["op"], r["sweep"], r["fixed"]), r["impl"], r["points"],
         _fmt(r["slope"]), _fmt(r["slope_top"]), _fmt(r.get("slope_best")),
         _fmt(r["memory_slope"]),
         _fmt(r["median_smallest"], 1e3, 3), _fmt(r["median_largest"], 1e3, 1)]
        for r in records if r.get("kind") == "slope"
    ]
    print(_common.format_table(slope_rows, [
        "curve", "impl", "points", "slope", "slope_top", "slope_best", "memory slope",
        "smallest ms",
        "largest ms",
    ]))
    _common.print_legend(LEGEND)
    print(flush=True)


def plot(path: Path | str, records: list[dict]) -> Path | None:
    """One panel per curve: time (solid) and the bound (dashed) against the growing size,
    log-log, with peak memory (dotted, right axis). Needs matplotlib."""
    points = [r for r in records if r.get("kind") == "point"]
    slope_of = {(r["op"], r["sweep"], r["fixed"], r["impl"]): r["slope"]
                for r in records if r.get("kind") == "slope"}
    curves = list(dict.fromkeys((r["op"], r["sweep"], r["fixed"]) for r in points))
    if not curves:
        return None
    plt = _common._pyplot()
    if plt is None:
        return None
    cols = min(4, len(curves))
    nrows = -(-len(curves) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 4.2 * nrows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, curve in zip(axes.flat, curves, strict=False):
        mine = [r for r in points if (r["op"], r["sweep"], r["fixed"]) == curve]
        mem_ax = ax.twinx()
        for i, impl in enumerate(dict.fromkeys(r["impl"] for r in mine)):
            rows = sorted((r for r in mine if r["impl"] == impl), key=lambda r: r["size"])
            color = colors[i % len(colors)]
            timed = [(r["size"], r["median"]) for r in rows if r.get("median")]
            slope = slope_of.get((*curve, impl))
            label = impl[:28] + ("" if slope is None else f" (slope {slope:.2f})")
            if timed:
                ax.plot(*zip(*timed, strict=True), marker="o", color=color, label=label)
            mem = [(r["size"], r["peak_bytes"] / 2**20) for r in rows if r.get("peak_bytes")]
            if mem:
                mem_ax.plot(*zip(*mem, strict=True), linestyle=":", marker=".", color=color)
        bound = sorted({(r["size"], r["bound_s"]) for r in mine if r.get("bound_s")})
        if bound:
            ax.plot(*zip(*bound, strict=True), linestyle="--", color="grey", label="memory bound")
        for a in (ax, mem_ax):
            a.set_xscale("log")
            a.set_yscale("log")
        ax.set_title(_label(*curve), fontsize=9)
        ax.set_xlabel(("clients C" if curve[1] == "C" else "length d") + " (log scale)")
        ax.set_ylabel("median time, s (solid; log)")
        mem_ax.set_ylabel("peak memory, MiB (dotted; log)", fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6, loc="upper left")
    for ax in list(axes.flat)[len(curves):]:
        ax.set_visible(False)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
