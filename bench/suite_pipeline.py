"""Pipeline benchmarks: a whole compressed round, jitted, beside the per-client NumPy loop.

Cases:
- `round_topk1%_ef_8bit`: C clients x d parameters, top-k 1% (global), error feedback,
  8-bit stochastic quantization, server decode and mean. Implementations: fedkernels
  (`compressor(...).round`, one jit for encode + decode; radix select's passes over the
  whole cohort, its short per-client work client by client), the same with one client per
  scan step (`chunk_size=1`), and the per-client NumPy loop a Flower user writes
  (`np.argpartition`, stochastic rounding, `np.add.at`). Same data, same process; on CPU
  also the round on `fk.client_mesh()` over one host device per core
  (`--xla_force_host_platform_device_count`), timed in a subprocess since the device count
  is fixed when jax starts, with its mean checked against the one-device round's.
- `round_8bit_dense`: the work of TFF's stock round (every client's whole update quantized to
  8 bits, then the mean), per client-parameter, to set beside `--suite tff`.
- `residual_store_update_[N,d]`: one round's write of C=100 new residual rows into the
  store of N=2000 clients: `fk.residual_store` (in place, donated buffer) beside the same
  update without donation (a copy of the whole store) and NumPy's in-place assignment.
- `chunked_round_...`: C=1000 x d=1e6 (4 GB of float32 updates if materialised) aggregated
  in chunks of clients with updates generated inside the loop, in a fresh subprocess whose
  peak resident memory (VmHWM) is reported beside an idle process's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import fedkernels as fk
from bench import _common


def numpy_round(updates: np.ndarray, residuals: np.ndarray, k: int, bits: int, seed: int):
    """Top-k + error feedback + b-bit stochastic quantization, one client at a time."""
    num_clients, d = updates.shape
    levels = (1 << bits) - 1
    total = np.zeros(d, np.float32)
    new_residuals = np.empty_like(residuals)
    rng = np.random.default_rng(seed)
    for c in range(num_clients):
        acc = updates[c] + residuals[c]
        idx = np.argpartition(np.abs(acc), d - k)[d - k :]
        values = acc[idx]
        lo, hi = values.min(), values.max()
        span = hi - lo if hi > lo else 1.0
        scaled = (values - lo) / span * levels
        codes = np.floor(scaled + rng.random(k, dtype=np.float32)).astype(np.uint8)
        # --- upload: codes (uint8), idx (int32), lo, hi ---
        decoded = codes.astype(np.float32) / levels * span + lo
        residual = acc.copy()
        residual[idx] = values - decoded
        new_residuals[c] = residual
        np.add.at(total, idx, decoded)
    return total / num_clients, new_residuals


def round_inputs(num_clients: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    """The full round's host data, (updates, residuals) float32 [C, d]: also what the mesh
    case's subprocess builds, so both time the same numbers."""
    rng = np.random.default_rng(0)
    updates = rng.standard_normal((num_clients, d), dtype=np.float32)
    residuals = 0.1 * rng.standard_normal((num_clients, d), dtype=np.float32)
    return updates, residuals


def round_options(d: int) -> dict:
    """The full round's compressor: top-k 1% + error feedback + 8 bits, every leaf sparse."""
    return {"top_k_count": d // 100, "error_feedback": True, "bits": 8, "dense_threshold": 0}


def _full_round(ctx: _common.Context, num_clients: int, d: int, repeats: int) -> list[dict]:
    k = d // 100
    host_updates, host_residuals = round_inputs(num_clients, d)
    updates, residuals = ctx.put(host_updates), ctx.put(host_residuals)
    ids = ctx.put(np.arange(num_clients, dtype=np.int32))
    key = jax.random.PRNGKey(0)
    template = {"w": jax.ShapeDtypeStruct((d,), jnp.float32)}
    options = round_options(d)
    case = _common.case_name("round_topk1%_ef_8bit", (num_clients, d), np.float32)
    size = num_clients * d
    # Moved at least: updates and residuals read, new residuals written.
    nbytes = 3 * 4 * size
    comp = fk.compressor(template, **options, **_common.compressor_options(ctx))

    def fedkernels_round(u, r):
        res = comp.round({"w": u}, key, client_ids=ids, residuals=r)
        return res.mean, res.residuals

    def fedkernels_chunked(u, r):
        # One client per step of a lax.scan (every pass then runs one row at a time).
        res = comp.round({"w": u}, key, client_ids=ids, residuals=r, chunk_size=1)
        return res.mean, res.residuals

    # In-process implementations alternate round by round (a slowdown of the shared machine
    # then hits all of them); the mesh runs in its own subprocess afterwards.
    in_process = [
        ("fedkernels", lambda: fedkernels_round(updates, residuals)),
        ("fedkernels chunk_size=1", lambda: fedkernels_chunked(updates, residuals)),
        ("numpy per-client loop", lambda: numpy_round(host_updates, host_residuals, k, 8, 0)),
    ]
    timings = _common.time_interleaved(ctx.progress, case, in_process, repeats,
                                       uncompiled=("numpy per-client loop",))
    rows = []
    for impl, _ in in_process:
        timing = dict(timings[impl])
        rows.append((impl, timing, timing.pop("error")))
    mesh_mean = ctx.out_dir / "mesh_round_mean.npy"
    host_devices = _host_device_count(ctx)
    if host_devices > 1:
        impl = f"fedkernels client_mesh, {host_devices} host devices (subprocess)"
        ctx.progress(f"  {case}: {impl}")
        timing, error = _common.attempt(
            ctx.progress,
            lambda: _mesh_round(ctx, num_clients, d, repeats, host_devices, mesh_mean),
        )
        rows.append((impl, timing, error))

    records = []
    for impl, timing, error in rows:
        records.append(
            {
                "case": case,
                "op": "round",
                "impl": impl,
                "shape": [num_clients, d],
                "dtype": "float32",
                "size": size,
                "bytes": nbytes,
                "error": error,
                "k": k,
                **timing,
            }
        )

    # Same answer check (no timing): fedkernels vs NumPy differ only by quantization draws.
    mean_fk, res_fk = fedkernels_round(updates, residuals)
    mean_np, res_np = numpy_round(host_updates, host_residuals, k, 8, 0)
    sent_fk = np.count_nonzero(np.asarray(mean_fk["w"]))
    sent_np = np.count_nonzero(mean_np)
    check = {
        "max_abs_mean_diff": float(np.max(np.abs(np.asarray(mean_fk["w"]) - mean_np))),
        "coordinates_touched_fedkernels": int(sent_fk),
        "coordinates_touched_numpy": int(sent_np),
        "payload_bytes_per_client_fedkernels": comp.layout.payload_bytes,
        "payload_bytes_per_client_numpy": k * (4 + 1) + 8,
    }
    if mesh_mean.exists():  # the mesh round must give the same mean as the one-device round
        mesh_diff = float(np.max(np.abs(np.load(mesh_mean) - np.asarray(mean_fk["w"]))))
        mesh_mean.unlink()
        check["max_abs_mean_diff_mesh_vs_one_device"] = mesh_diff
    _compare(records, "numpy per-client loop", ctx.bound_seconds(nbytes))
    for r in records:
        r.update(check)
        median = r.get("median")
        r["per_client_parameter_ns"] = 1e9 * median / size if median else None
    return records


def _compare(records: list[dict], baseline: str, bound: float) -> None:
    """Adds to each record its baseline's name, the bound, the ratio and speedup against the
    baseline's median (None where either failed) and the % of bound."""
    base = next((r.get("median") for r in records if r["impl"] == baseline), None)
    for r in records:
        median = r.get("median")
        r["baseline"] = baseline
        r["bound_s"] = bound
        r["ratio_vs_numpy"] = median / base if median and base else None
        r["speedup_vs_numpy"] = base / median if median and base else None
        r["pct_of_bound"] = 100 * bound / median if median and bound == bound else None


def _dense_8bit_round(ctx: _common.Context, num_clients: int, d: int, repeats: int) -> dict:
    """The work of TFF's stock `MeanFactory(EncodedSumFactory.quantize_above_threshold(8,
    20000))` round, in fedkernels: every client's whole update quantized to 8 bits, then the
    mean. Compared per client-parameter with the `--suite tff` figure of the stock round."""
    rng = np.random.default_rng(0)
    updates = ctx.put(rng.standard_normal((num_clients, d), dtype=np.float32))
    ids = ctx.put(np.arange(num_clients, dtype=np.int32))
    key = jax.random.PRNGKey(0)
    template = {"w": jax.ShapeDtypeStruct((d,), jnp.float32)}
    comp = fk.compressor(template, bits=8, dense_threshold=20000,
                         **_common.compressor_options(ctx))
    case = _common.case_name("round_8bit_dense", (num_clients, d), np.float32)
    ctx.progress(f"  {case}: fedkernels")

    def dense_round(u):
        return comp.round({"w": u}, key, client_ids=ids).mean

    timing = _common.time_fn(dense_round, updates, repeats=repeats)
    size = num_clients * d
    return {
        "case": case,
        "op": "round_dense",
        "impl": "fedkernels (8 bits, no top-k)",
        "shape": [num_clients, d],
        "dtype": "float32",
        "size": size,
        "error": None,
        "baseline": None,
        "per_client_parameter_ns": 1e9 * timing["median"] / size,
        **timing,
    }


def _store_update(
    ctx: _common.Context, num_clients: int, d: int, cohort: int, repeats: int
) -> list[dict]:
    """One round's write into the error-feedback store: the cohort's C new residual rows into
    the [N, d] store of all clients. fedkernels' `residual_store` (donated buffer, in place),
    the same without donation (what the obvious `store.at[ids].set(rows)` does: a copy of the
    whole store each round), and NumPy's in-place `store[ids] = rows`."""
    rng = np.random.default_rng(0)
    ids_host = rng.permutation(num_clients)[:cohort].astype(np.int32)
    rows_host = rng.standard_normal((cohort, d), dtype=np.float32)
    ids, rows = ctx.put(ids_host), ctx.put(rows_host)
    case = _common.case_name("residual_store_update", (num_clients, d), np.float32)
    # Moved at least: the C rows read and written into the store.
    nbytes = 2 * 4 * cohort * d
    expected = np.zeros((num_clients, d), np.float32)
    expected[ids_host] = rows_host
    records = []
    for impl, donate in (("fedkernels residual_store (in place)", True),
                         ("jax .at[ids].set, no donation (copies the store)", False),
                         ("numpy store[ids] = rows", None)):
        ctx.progress(f"  {case}: {impl}")

        def timed(donate=donate):
            if donate is None:
                store = np.zeros((num_clients, d), np.float32)

                def update(i, r):
                    store[i] = r
                    return store

                timing = _common.time_fn(update, ids_host, rows_host, repeats=repeats)
                final = store
            else:
                fk_store = fk.residual_store(num_clients, d, donate=donate)
                cell = [jax.device_put(fk_store.init(), ctx.device)]

                def update(i, r):
                    cell[0] = fk_store.scatter(cell[0], i, r)
                    return cell[0].residuals

                timing = _common.time_fn(update, ids, rows, repeats=repeats)
                final = np.asarray(cell[0].residuals)
            if not np.array_equal(final, expected):
                raise ValueError("wrong store contents")
            return timing

        timing, error = _common.attempt(ctx.progress, timed)
        records.append(
            {
                "case": case,
                "op": "store_update",
                "impl": impl,
                "shape": [num_clients, d],
                "cohort": cohort,
                "dtype": "float32",
                "size": cohort * d,
                "bytes": nbytes,
                "store_bytes": 4 * num_clients * d,
                "error": error,
                **timing,
            }
        )
    _compare(records, records[-1]["impl"], ctx.bound_seconds(nbytes))
    return records


def _host_device_count(ctx: _common.Context) -> int:
    """Host devices for the mesh case: one per core, on CPU only (0: no mesh case)."""
    if ctx.device.platform != "cpu":
        return 0
    return min(int(ctx.machine.get("cores") or 1), 8)


MESH_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    num_clients, d, repeats, devices = (int(a) for a in sys.argv[1:5])
    out_npy, keep = sys.argv[5], sys.argv[6] == "1"
    # Before jax starts its backend: one CPU device per core.
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
    )
    import jax, jax.numpy as jnp, numpy as np
    import fedkernels as fk
    from bench import _common
    from bench.suite_pipeline import round_inputs, round_options

    if keep:
        fk.host.keep_host_memory()
    assert len(jax.devices("cpu")) == devices, jax.devices()
    updates, residuals = round_inputs(num_clients, d)  # the parent's data, bit for bit
    template = {"w": jax.ShapeDtypeStruct((d,), jnp.float32)}
    comp = fk.compressor(template, **round_options(d))
    mesh = fk.client_mesh()
    ids = jnp.arange(num_clients, dtype=jnp.int32)
    key = jax.random.PRNGKey(0)

    def mesh_round(u, r):
        res = comp.round({"w": u}, key, client_ids=ids, residuals=r, mesh=mesh)
        return res.mean, res.residuals

    # Inputs already spread over the devices, as the one-device case's are on its device.
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(mesh.axis_names[0]))
    u, r = jax.device_put(updates, sharding), jax.device_put(residuals, sharding)
    timing = _common.time_fn(mesh_round, u, r, repeats=repeats)
    np.save(out_npy, np.asarray(mesh_round(u, r)[0]["w"]))
    print("RESULT" + json.dumps(timing))
    """
)


def _mesh_round(
    ctx: _common.Context, num_clients: int, d: int, repeats: int, devices: int, out_npy: Path
) -> dict:
    """The round on a client mesh over `devices` CPU host devices, timed in a subprocess (the
    device count is fixed when jax starts). Same data, same timing rule as the other rows."""
    keep = "1" if ctx.machine.get("host_memory_kept") else "0"
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    out_npy.unlink(missing_ok=True)  # a failed run must not leave an old mean to compare
    args = [num_clients, d, repeats, devices, out_npy, keep]
    return _subprocess(args, MESH_SCRIPT)


CHUNKED_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    import jax, jax.numpy as jnp
    import fedkernels as fk

    def peak_kb():
        # VmHWM: this process's own peak RSS. (ru_maxrss would carry over the parent's RSS
        # at fork time through exec.)
        with open("/proc/self/status") as f:
            return int(next(ln for ln in f if ln.startswith("VmHWM")).split()[1])

    num_clients, d, chunk, idle = (int(a) for a in sys.argv[1:5])
    if idle:
        jax.block_until_ready(jnp.zeros(3) + 1)
        print("RESULT" + json.dumps({"maxrss_kb": peak_kb()}))
        raise SystemExit
    template = {"w": jax.ShapeDtypeStruct((d,), jnp.float32)}
    comp = fk.compressor(template, top_k_count=d // 100, bits=8, dense_threshold=0)
    data_key = jax.random.PRNGKey(1)

    def updates(ids):  # each client's update from its id, generated inside the chunk loop
        return {"w": jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(data_key, i),
                                                          (d,)))(ids)}

    ids = jnp.arange(num_clients, dtype=jnp.int32)
    key = jax.random.PRNGKey(0)
    out = {}
    for name in ("first", "warm"):
        t = time.perf_counter()
        result = comp.round(updates, key, client_ids=ids, chunk_size=chunk)
        jax.block_until_ready(result.mean)
        out[name + "_s"] = time.perf_counter() - t
    out["maxrss_kb"] = peak_kb()
    out["uploaded_bytes"] = int(result.metrics.uploaded_bytes)
    out["payload_bytes"] = comp.layout.payload_bytes
    out["contributors_touched"] = int(result.metrics.contributors_touched)
    print("RESULT" + json.dumps(out))
    """
)


def _subprocess(args: list[Any], script: str = CHUNKED_SCRIPT) -> dict:
    repo = str(Path(__file__).resolve().parent.parent)  # so the child imports `bench`
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [repo, os.environ.get(
        "PYTHONPATH")])))
    proc = subprocess.run(
        [sys.executable, "-c", script, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=1800,
        env=env,
    )
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-1500:])
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT") :])


def _chunked(ctx: _common.Context, num_clients: int, d: int, chunks: list[int]) -> list[dict]:
    idle = _subprocess([0, 0, 0, 1])["maxrss_kb"]
    records = []
    for chunk in chunks:
        case = _common.case_name("chunked_round_topk1%_8bit", (num_clients, d), np.float32)
        ctx.progress(f"  {case}: chunk {chunk} (subprocess)")
        try:
            out = _subprocess([num_clients, d, chunk, 0])
            error = None
        except (RuntimeError, subprocess.TimeoutExpired) as err:
            out, error = {}, str(err)[-300:]
            ctx.progress(f"    failed: {error}")
        rss = out.get("maxrss_kb")
        records.append(
            {
                "case": f"{case}_chunk{chunk}",
                "op": "chunked_round",
                "impl": f"chunk {chunk}",
                "shape": [num_clients, d],
                "dtype": "float32",
                "size": num_clients * d,
                "error": error,
                "chunk_size": chunk,
                "median": out.get("warm_s"),
                "first": out.get("first_s"),
                "peak_rss_bytes": None if rss is None else rss * 1024,
                "idle_process_rss_bytes": idle * 1024,
                "peak_rss_above_idle_bytes": None if rss is None else (rss - idle) * 1024,
                "materialised_updates_bytes": 4 * num_clients * d,
                **{k: v for k, v in out.items() if k not in ("maxrss_kb", "warm_s", "first_s")},
            }
        )
    return records


def run(ctx: _common.Context) -> list[dict]:
    repeats = 5
    if ctx.quick:
        full = [(20, 10**5)]
        chunked = (100, 10**5, [20])
        store = (500, 10**4, 20)
    else:
        full = [(100, 10**6)]
        chunked = (1000, 10**6, [50, 200])
        store = (2000, 10**5, 100)
    records = []
    for num_clients, d in full:
        ctx.progress(f"full round C={num_clients} d={d}")
        records.extend(_full_round(ctx, num_clients, d, repeats))
        records.append(_dense_8bit_round(ctx, num_clients, d, repeats))
    ctx.progress(f"residual store update N={store[0]} d={store[1]} C={store[2]}")
    records.extend(_store_update(ctx, *store, repeats))
    ctx.progress(f"chunked round C={chunked[0]} d={chunked[1]}")
    records.extend(_chunked(ctx, *chunked))
    _print(ctx, records)
    return records


def _fmt(value: float | None, scale: float = 1.0, digits: int = 1) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


LEGEND = [
    "round_topk1%_ef_8bit_CxD: one round of C clients x D parameters, top-k 1% + error "
    "feedback + 8-bit quantization, server decode and mean; round_8bit_dense: every client's "
    "whole update in 8 bits (the work of TFF's stock round); residual_store_update: C new rows "
    "written into the store of N clients; chunked_round: a large cohort in chunks of clients, "
    "updates generated inside the loop (peak memory)",
    "median ms: median wall time of 5 timed runs after the first call (block_until_ready); "
    "the in-process rows of a case alternate run by run; first call s: the first call, "
    "which for JAX includes tracing and compiling (NumPy compiles nothing)",
    "vs numpy: this row's median / the NumPy row's median (the per-client loop, or NumPy's "
    "in-place assignment for the store); < 1 is faster than NumPy",
    "% of bound: bound / median; bound = bytes that must move (round: updates and residuals "
    "read, new residuals written; store: the C rows read and written) / the copy bandwidth "
    "above",
    "ns/client-param: median / (clients x parameters), comparable across sizes and with "
    "--suite tff",
    "peak RSS: the chunked round's own process peak resident memory (VmHWM), in MiB, beside "
    "an idle process's",
]


def _print(ctx: _common.Context, records: list[dict]) -> None:
    rows = []
    for r in records:
        chunked = r["op"] not in ("round", "round_dense", "store_update")
        ratio = r.get("ratio_vs_numpy")
        rows.append(
            [
                r["case"],
                r["impl"],
                _fmt(r.get("median"), 1e3, 1),
                _fmt(r.get("first"), 1, 1),
                "-" if ratio is None else _fmt(ratio, 1, 2) + "x",
                _fmt(r.get("pct_of_bound"), 1, 0) + ("%" if r.get("pct_of_bound") else ""),
                "-" if chunked else _fmt(r.get("per_client_parameter_ns"), 1, 2),
                "-"
                if not chunked
                else _fmt(r.get("peak_rss_bytes"), 2**-20, 0)
                + " MiB (idle "
                + _fmt(r.get("idle_process_rss_bytes"), 2**-20, 0)
                + ")",
            ]
        )
    header = [
        "case", "implementation", "median ms", "first call s", "vs numpy", "% of bound",
        "ns/client-param", "peak RSS",
    ]
    print()
    print(_common.headline(ctx))
    print(_common.format_table(rows, header))
    _common.print_legend(LEGEND)
    print()
