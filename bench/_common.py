"""Shared benchmark machinery: timing, the copy-bandwidth bound, machine info, JSON, plots."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np


def block(value: Any) -> Any:
    """Waits for every jax array in `value` (numpy values pass through)."""
    return jax.block_until_ready(value)


def time_fn(
    fn: Callable[..., Any],
    *args: Any,
    repeats: int = 5,
    warmup: int = 1,
    compiles: bool = True,
    min_seconds: float = 0.0,
    max_repeats: int = 200,
) -> dict:
    """Times `fn(*args)`: the first call separately (compile + run), then `repeats` runs.

    Works for jitted JAX functions and plain NumPy functions alike. Returns seconds:
    `{"first": ..., "median": ..., "min": ..., "repeats": n, "compile": first - median}`.
    `compile` is an estimate of tracing + compilation (first call minus a warm call); None
    when `compiles` is False (NumPy: its first call only touches memory for the first time).
    `warmup` calls (the first included) are not timed. With `min_seconds`, timing goes on past
    `repeats` until the timed runs add up to that much (at most `max_repeats` runs): a
    millisecond kernel then gets dozens of runs, so that the median is the steady state of a
    loop, not a few calls in which the allocator still grows its heap (page faults on fresh
    output buffers, which a long-running caller pays only at its start). Warm-up calls past
    the first are untimed only while they are short (under `min_seconds / 10`): a long one
    counts as the first timed run and ends the warm-up, so a seconds-long implementation is
    called as often as with one warm-up call (each call of a memory-hungry one can grow a
    heap that `fedkernels.host.keep_host_memory()` never trims).
    """
    repeats = max(int(repeats), 5)
    start = time.perf_counter()
    block(fn(*args))
    first = time.perf_counter() - start
    times: list[float] = []
    for _ in range(max(warmup - 1, 0)):
        start = time.perf_counter()
        block(fn(*args))
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds / 10:  # a long call: the first timed run, no more warm-up
            times.append(elapsed)
            break
    while len(times) < repeats or (sum(times) < min_seconds and len(times) < max_repeats):
        start = time.perf_counter()
        block(fn(*args))
        times.append(time.perf_counter() - start)
    return _summary(first, times, compiles)


def compiles(fn: Callable[..., Any]) -> bool:
    """Whether `fn` is a jitted JAX function (it has `.lower`): NumPy code compiles nothing."""
    return hasattr(fn, "lower")


def _summary(first: float, times: list[float], compiles: bool = True) -> dict:
    """`time_fn`'s keys from the first call's seconds and the timed runs'."""
    median = statistics.median(times)
    return {
        "first": first,
        "median": median,
        "min": min(times),
        "repeats": len(times),
        "compile": max(first - median, 0.0) if compiles else None,
    }


def time_interleaved(
    progress: Callable[[str], None],
    case: str,
    impls: list[tuple[str, Callable[[], Any]]],
    repeats: int = 5,
    uncompiled: tuple[str, ...] = (),
) -> dict[str, dict]:
    """Times each implementation `repeats` times, alternating between them round by round.

    The machine is shared (2 cores, other jobs): alternating spreads any slowdown over all
    implementations instead of penalizing whichever ran during it, so their ratio is fairer
    than from back-to-back blocks. The first call of each (jit compiling, or building and
    shipping a TFF computation) is `first`; the implementations named in `uncompiled` (NumPy)
    get `compile` None. Returns, per name, `time_fn`'s keys and
    `"error": None`, or `{"error": message}` if its first call raised (not fatal).
    """
    timings: dict[str, dict] = {}
    times: dict[str, list[float]] = {}
    for impl, fn in impls:
        progress(f"  {case}: {impl}: first call")
        try:
            start = time.perf_counter()
            block(fn())
            timings[impl] = {"first": time.perf_counter() - start, "error": None}
            times[impl] = []
        except Exception as err:  # reported, not fatal
            timings[impl] = {"error": f"{type(err).__name__}: {err}"[:300]}
            progress(f"    failed: {timings[impl]['error']}")
    for round_index in range(repeats):
        progress(f"  {case}: round {round_index + 1}/{repeats}")
        for impl, fn in impls:
            if impl in times:
                start = time.perf_counter()
                block(fn())
                times[impl].append(time.perf_counter() - start)
    for impl, samples in times.items():
        timings[impl].update(_summary(timings[impl]["first"], samples, impl not in uncompiled))
    return timings


def attempt(progress: Callable[[str], None], timed: Callable[[], dict]) -> tuple[dict, str | None]:
    """`(timed(), None)`, or `({}, message)` if it raised: a failing implementation is
    reported in its row (and through `progress`), not fatal to the suite."""
    try:
        return timed(), None
    except Exception as err:
        error = f"{type(err).__name__}: {err}"[:300]
        progress(f"    failed: {error}")
        return {}, error


def aggregated_scalar_count(process: Any) -> int:
    """How many numbers one client sends through aggregation in one `process.next`, counted
    TFF's way (its `CompilerIntegrationTest` in `learning/model_update_aggregator_test.py`):
    the `tff.templates.AggregationProcess` `process` (weighted or not) is compiled to TFF's
    MapReduceForm and the scalars of its `work` result (what each client hands to the
    aggregation: sums, secure sums, and so on) are counted. The value's shape is what it was
    created with; the number of clients does not enter. Needs tensorflow-federated (imported
    here, lazily)."""
    from tensorflow_federated.python.core.backends.mapreduce import form_utils
    from tensorflow_federated.python.core.impl.federated_context import (
        federated_computation,
        intrinsics,
    )
    from tensorflow_federated.python.core.impl.types import (
        computation_types,
        placements,
        type_analysis,
    )
    from tensorflow_federated.python.core.templates import iterative_process

    # TFF's `_mrfify_aggregator`: MapReduceForm wants one CLIENTS argument and a
    # (state, SERVER result) output.
    if process.is_weighted:

        @federated_computation.federated_computation(
            process.next.type_signature.parameter[0],
            computation_types.FederatedType(
                (
                    process.next.type_signature.parameter[1].member,
                    process.next.type_signature.parameter[2].member,
                ),
                placements.CLIENTS,
            ),
        )
        def next_fn(state, value):
            output = process.next(state, value[0], value[1])
            return output.state, intrinsics.federated_zip((output.result, output.measurements))

    else:

        @federated_computation.federated_computation(process.next.type_signature.parameter)
        def next_fn(state, value):
            output = process.next(state, value)
            return output.state, intrinsics.federated_zip((output.result, output.measurements))

    form = form_utils.get_map_reduce_form_for_computation(
        iterative_process.IterativeProcess(process.initialize, next_fn).next
    )
    return type_analysis.count_tensors_in_type(form.work.type_signature.result)["parameters"]


def available_host_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), in bytes; None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            line = next(ln for ln in f if ln.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None
    return int(line.split()[1]) * 1024


def get_device(kind: str) -> jax.Device:
    """The first jax device of `kind` ("cpu" or "gpu"); a clear error if there is none."""
    try:
        devices = jax.devices(kind)
    except RuntimeError as err:
        raise SystemExit(f"--device {kind}: no such jax backend here ({err})") from None
    return devices[0]


def copy_bandwidth(device: jax.Device, nbytes: int = 256 * 2**20) -> dict:
    """Measured copy bandwidth on `device`: (bytes read + bytes written) / second.

    A jitted elementwise negation (one read, one write; a bare copy may be elided by XLA) of a
    float32 buffer of `nbytes` on `device`, and NumPy's allocating `np.copy` on the host (a
    kernel writes a fresh output too), each the best of 7 runs: the bound is what the machine
    does when nothing interferes. `bytes_per_s`, the figure every `% of bound` uses, is the
    device figure; on CPU the faster of the two, so the bound is never flattered by a slow
    copy. Medians are kept too (`*_median_bytes_per_s`) to show how noisy the machine was.
    """
    n = nbytes // 4
    host = np.random.default_rng(0).standard_normal(n, dtype=np.float32)
    x = jax.device_put(host, device)
    # x * 1 + 0 would be folded; negation is one read and one write, same as a copy.
    copy = jax.jit(lambda a: -a)
    t_dev = time_fn(copy, x, repeats=7, warmup=3, min_seconds=0.3, max_repeats=7)
    t_np = time_fn(np.copy, host, repeats=7, warmup=3, min_seconds=0.3, max_repeats=7,
                   compiles=False)
    moved = 2 * host.nbytes
    device_best, numpy_best = moved / t_dev["min"], moved / t_np["min"]
    return {
        "bytes": moved,
        "device_bytes_per_s": device_best,
        "numpy_bytes_per_s": numpy_best,
        "device_median_bytes_per_s": moved / t_dev["median"],
        "numpy_median_bytes_per_s": moved / t_np["median"],
        "bytes_per_s": max(device_best, numpy_best) if device.platform == "cpu" else device_best,
    }


def describe_bandwidth(info: dict) -> str:
    """One line for the copy bandwidth, every figure on the same footing (best of 7 runs)."""
    return (
        f"copy bandwidth, bytes read + written per second, best of 7 runs: jax on the device "
        f"{info['device_bytes_per_s'] / 1e9:.2f} GB/s, numpy {info['numpy_bytes_per_s'] / 1e9:.2f}"
        f" GB/s; every bound uses {info['bytes_per_s'] / 1e9:.2f} GB/s (medians of the 7: "
        f"{info['device_median_bytes_per_s'] / 1e9:.2f} and "
        f"{info['numpy_median_bytes_per_s'] / 1e9:.2f} GB/s)"
    )


def machine_info(device: jax.Device) -> dict:
    import jaxlib

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": sys.version.split()[0],
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "numpy": np.__version__,
        "device": str(device),
        "platform": device.platform,
        "device_kind": getattr(device, "device_kind", ""),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


@dataclasses.dataclass
class Context:
    """What every suite receives."""

    quick: bool
    device: jax.Device
    out_dir: Path
    bandwidth: float = 0.0  # measured copy bandwidth on `device`, bytes read+written per s
    bandwidth_info: dict = dataclasses.field(default_factory=dict)
    machine: dict = dataclasses.field(default_factory=dict)
    only: tuple[str, ...] = ()  # kernels suite: run only these ops (empty: all)
    _start: float = dataclasses.field(default_factory=time.perf_counter)

    def progress(self, msg: str) -> None:
        elapsed = time.perf_counter() - self._start
        print(f"[bench {elapsed:7.1f}s] {msg}", file=sys.stderr, flush=True)

    def put(self, value: Any) -> Any:
        """Moves a host array (or pytree) to the benchmark device."""
        return jax.device_put(value, self.device)

    def bound_seconds(self, nbytes: float) -> float:
        """Time to move `nbytes` (read + written) at the measured copy bandwidth."""
        return nbytes / self.bandwidth if self.bandwidth else float("nan")


def compressor_options(ctx: Context) -> dict:
    """Options every suite passes to `fk.compressor`: the benchmarked device's platform as
    `backend=`, where the library takes it, so its backend-dependent paths are chosen by
    configuration rather than by the process's default backend. The one place the bench
    chooses such a path; `{}` where the library has no such option."""
    import inspect

    import fedkernels as fk

    if "backend" in inspect.signature(fk.compressor).parameters:
        return {"backend": ctx.device.platform}
    return {}


def case_name(op: str, shape: tuple[int, ...] | str, dtype: Any) -> str:
    """`op_shape_dtype`, e.g. `top_k_1x10000000_float32`."""
    if not isinstance(shape, str):
        shape = "x".join(str(int(s)) for s in shape)
    return f"{op}_{shape}_{np.dtype(dtype).name}"


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path: Path | str, records: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(records), indent=1) + "\n")
    return path


def _pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend, or None (said once) when it is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[bench] matplotlib not installed: no plot, JSON only (pip install '.[sim]')",
              file=sys.stderr)
        return None
    return plt


def plot(path: Path | str, records: list[dict]) -> Path | None:
    """Time vs size, one line per implementation, one panel per op. Needs matplotlib.

    Records need `op`, `impl`, `size` (a number for the x axis) and `median` (seconds). An
    op measured at a single size gets a bar per implementation instead, labelled with its
    time (a log-log line through one point has no axis to read). Returns None when
    matplotlib is not installed.
    """
    rows = [r for r in records if r.get("median") is not None and r.get("size")]
    ops = sorted({r["op"] for r in rows})
    if not ops:
        return None
    plt = _pyplot()
    if plt is None:
        return None
    cols = min(3, len(ops))
    nrows = -(-len(ops) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.5 * cols, 4 * nrows), squeeze=False)
    for ax, op in zip(axes.flat, ops, strict=False):
        mine = [r for r in rows if r["op"] == op]
        sizes = sorted({r["size"] for r in mine})
        if len(sizes) == 1:
            bars = sorted(mine, key=lambda r: r["median"])
            labels = [textwrap.fill(r["impl"], 26) for r in bars]
            values = [1e3 * r["median"] for r in bars]
            ax.barh(range(len(bars)), values, color="tab:blue")
            for i, value in enumerate(values):  # the figure itself, not read off an axis
                text = f"{value:.0f}" if value >= 100 else f"{value:.3g}"
                ax.text(value, i, f" {text} ms", va="center", fontsize=7)
            ax.set_yticks(range(len(bars)), labels, fontsize=7)
            ax.invert_yaxis()
            ax.set_xlim(0, 1.3 * max(values))
            ax.set_xlabel("median time (ms)")
            ax.set_title(f"{op}, size {sizes[0]:.3g} elements", fontsize=9)
            ax.grid(True, axis="x", alpha=0.3)
            continue
        for impl in sorted({r["impl"] for r in mine}):
            pts = sorted((r["size"], r["median"]) for r in mine if r["impl"] == impl)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl[:40])
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(op, fontsize=9)
        ax.set_xlabel("size (elements, log scale)")
        ax.set_ylabel("median time (s, log scale)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(ops) :]:
        ax.set_visible(False)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def headline(ctx: Context) -> str:
    """The line above every table: versions, device, and the copy bandwidth of the run."""
    m = ctx.machine
    line = (
        f"jax {m.get('jax')} numpy {m.get('numpy')} on {m.get('device')} ({m.get('cpu')}, "
        f"{m.get('cores')} cores)"
    )
    if ctx.bandwidth_info:
        line += "\n" + describe_bandwidth(ctx.bandwidth_info)
    return line


def print_legend(lines: list[str]) -> None:
    """The legend printed under every table, so a reader needs no other document."""
    print("legend:")
    for line in lines:
        print(f"  {line}")


def format_table(rows: list[list[Any]], header: list[str]) -> str:
    cells = [header] + [[("" if c is None else str(c)) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
