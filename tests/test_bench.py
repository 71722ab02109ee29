"""The bench harness itself (no timing is asserted: speed is what `python -m bench` reports)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from bench import _common, suite_kernels, suite_pipeline
from bench.__main__ import main


def _ctx(tmp_path):
    ctx = _common.Context(quick=True, device=jax.devices()[0], out_dir=tmp_path)
    ctx.bandwidth = 1e10
    return ctx


def test_available_host_bytes_reads_meminfo():
    free = _common.available_host_bytes()
    assert free is None or free > 0


def test_run_case_skips_an_implementation_that_would_not_fit(tmp_path, monkeypatch):
    # Free memory is pinned at 3 GiB: the 8 GiB implementation is skipped with a message that
    # says why, instead of being started and OOM-killed; the others still run and compare.
    monkeypatch.setattr(_common, "available_host_bytes", lambda: 3 * 2**30)
    x = np.arange(1000, dtype=np.float32)
    case = suite_kernels.Case("masked_mean", (1000,), np.float32, 1000, 4000.0, "numpy sum")
    case.add("numpy sum", np.sum, x)
    case.add("too big", np.sum, x, temp_bytes=8 * 2**30)
    case.add("fits", np.sum, x, temp_bytes=2**30)
    records = {r["impl"]: r for r in suite_kernels._run_case(_ctx(tmp_path), case, repeats=5)}
    assert records["too big"]["error"] == (
        "MemoryError: skipped: needs about 8.0 GiB of temporaries, 3.0 GiB available"
    )
    assert "median" not in records["too big"] and records["too big"]["ratio_vs_numpy"] is None
    assert records["fits"]["error"] is None and records["fits"]["median"] > 0
    assert records["numpy sum"]["ratio_vs_numpy"] == 1.0


def test_run_case_does_not_skip_what_declares_no_temporaries(tmp_path, monkeypatch):
    # Even with almost nothing free, an implementation without declared temporaries runs.
    monkeypatch.setattr(_common, "available_host_bytes", lambda: 2**20)
    x = np.arange(1000, dtype=np.float32)
    case = suite_kernels.Case("masked_mean", (1000,), np.float32, 1000, 4000.0, "numpy sum")
    case.add("numpy sum", np.sum, x)
    (record,) = suite_kernels._run_case(_ctx(tmp_path), case, repeats=5)
    assert record["error"] is None and record["median"] > 0


def test_masked_mean_case_data_is_half_zeros_and_checked(tmp_path):
    (case,) = suite_kernels._masked_mean_cases(_ctx(tmp_path), (4, 5000))
    host = next(args[0] for name, _, args, _ in case.impls if name == "numpy X.mean(0)")
    assert 0.45 < np.mean(host == 0) < 0.55
    assert case.checks["matches_numpy_masked"] is True


def test_store_update_rows_check_the_store_contents(tmp_path, monkeypatch):
    records = suite_pipeline._store_update(_ctx(tmp_path), 50, 30, 8, repeats=5)
    assert [r["impl"].split()[0] for r in records] == ["fedkernels", "jax", "numpy"]
    for r in records:  # each left the same rows at the same ids as NumPy's assignment
        assert r["error"] is None and r["median"] > 0 and r["store_bytes"] == 50 * 30 * 4
    assert records[-1]["speedup_vs_numpy"] == 1.0
    # A store that does not keep the rows exactly (bfloat16 rounds them) is reported, not
    # timed as if it were right.
    real = suite_pipeline.fk.residual_store
    monkeypatch.setattr(suite_pipeline.fk, "residual_store",
                        lambda n, d, donate: real(n, d, "bfloat16", donate=donate))
    rows = suite_pipeline._store_update(_ctx(tmp_path), 50, 30, 8, repeats=5)
    assert rows[0]["error"] == "ValueError: wrong store contents"


def test_quantize_parts_are_the_kernel_split_in_two(tmp_path):
    # The bench times quantize's two passes apart; together they must be quantize itself.
    quantize, _ = suite_kernels._quantize_cases(_ctx(tmp_path), 4096)
    impls = {name: (fn, args) for name, fn, args, _ in quantize.impls}
    fn, args = impls["fedkernels"]
    whole = fn(*args)
    lo, hi = impls["part 1/2: fedkernels range pass (min, max)"][0](args[0])
    np.testing.assert_array_equal([lo, hi], [whole.minimum, whole.maximum])
    fn, args = impls["part 2/2: fedkernels codes pass, range given"]
    np.testing.assert_array_equal(fn(*args), whole.packed)
    fn, args = impls["floor of part 2: same bytes, no arithmetic"]
    assert fn(*args).nbytes == whole.packed.nbytes  # the same bytes written


def test_only_runs_the_named_ops(tmp_path, monkeypatch):
    ctx = _ctx(tmp_path)
    ctx.only = ("flatten",)
    monkeypatch.setattr(suite_kernels, "_sizes", lambda ctx: {op: [(1, 320)] for op in
                                                              suite_kernels.OPS})
    ops = {r["op"] for r in suite_kernels.run(ctx)}
    assert ops == {"flatten", "unflatten"}


def test_only_rejects_unknown_ops(capsys):
    with pytest.raises(SystemExit):
        main(["--only", "quantise"])
    assert "unknown op(s) ['quantise']" in capsys.readouterr().err


def test_top_k_parts_are_the_kernel_split_in_three(tmp_path):
    d, k = 1 << 18, 300
    (case,) = suite_kernels._top_k_cases(_ctx(tmp_path), (d, k))
    impls = {name: (fn, args) for name, fn, args, _ in case.impls}
    values, indices = impls["fedkernels"][0](*impls["fedkernels"][1])
    fn, args = impls["part 1/3: fedkernels selection mask"]
    words = fn(*args)
    fn, args = impls["part 2/3: fedkernels mask to k indices"]
    np.testing.assert_array_equal(fn(words), indices)
    fn, args = impls["part 3/3: fedkernels gather of k values"]
    np.testing.assert_array_equal(fn(*args), values)
    assert case.checks["same_set_as_argpartition"]


def test_profile_round_reports_the_programs_ops(tmp_path):
    # In a subprocess: the old XLA:CPU runtime traces ops only with a flag set before jax
    # starts. The ops' times must add up to something, and runtime/Python events are left out.
    import json
    import subprocess
    import sys

    out = tmp_path / "profile.json"
    args = ["--clients", "3", "--dim", "5000", "--rounds", "2", "--out", str(out)]
    done = subprocess.run(
        [sys.executable, "-m", "bench.profile_round", *args],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["clients"] == 3 and result["d"] == 5000 and result["rounds"] == 2
    assert result["ops"] and result["ops_ms_per_round"] > 0
    names = [row["op"] for row in result["ops"]]
    assert not any("Execute" in n or n.startswith("$") for n in names), names[:10]
    assert abs(sum(row["ms_per_round"] for row in result["ops"]) - result["ops_ms_per_round"]) < 0.1
    assert result["wall_ms_per_round"] > 0 and "traced ops per round" in done.stdout
    # Each op is named by the round's stage it comes from (fedkernels' named scopes).
    stages = {row["source"].split("/")[0] for row in result["ops"]}
    assert {"acc", "select", "residual_norms", "server_sums"} <= stages, stages
    assert set(result["stages_ms_per_round"]) >= {"acc", "select"}
    assert abs(sum(result["stages_ms_per_round"].values()) - result["ops_ms_per_round"]) < 0.1


# ---------------------------------------------------------------- output a reader understands


def _kernel_record(impl, median, compile_s, ratio, pct):
    return {"case": "quantize_1000_float32_b8", "op": "quantize", "impl": impl,
            "median": median, "compile": compile_s, "ratio_vs_numpy": ratio,
            "ratio_vs_numpy_min": ratio, "pct_of_bound": pct, "bound_s": 1e-4}


def _printing_ctx(tmp_path):
    ctx = _ctx(tmp_path)
    ctx.machine = {"jax": jax.__version__, "numpy": np.__version__, "device": "cpu:0",
                   "cpu": "test cpu", "cores": 2}
    ctx.bandwidth_info = {"bytes": 2.0, "device_bytes_per_s": 8e9, "numpy_bytes_per_s": 10e9,
                          "device_median_bytes_per_s": 7e9, "numpy_median_bytes_per_s": 9e9,
                          "bytes_per_s": 10e9}
    ctx.bandwidth = 10e9
    return ctx


def test_kernels_table_prints_its_legend_units_and_no_numpy_compile_time(tmp_path, capsys):
    records = [_kernel_record("fedkernels", 2e-3, 0.5, 0.5, 5.0),
               _kernel_record("numpy", 4e-3, None, 1.0, 2.5)]
    suite_kernels._print(_printing_ctx(tmp_path), records)
    out = capsys.readouterr().out
    assert "legend:" in out
    assert "this row's median / the baseline's median" in out and "< 1 is faster" in out
    assert "best vs best" in out and "% of bound: bound ms / median ms" in out
    assert "the project's own goals" in out
    assert "median ms" in out and "compile ms" in out and "GB/s" in out
    numpy_row = next(line for line in out.splitlines() if line.split()[:2] == ["numpy", "4.00"])
    assert numpy_row.split()[2] == "-"  # no compile time for NumPy
    # The headline's bandwidth figures agree: the bound's figure is one of the two measured.
    assert "every bound uses 10.00 GB/s" in out and "numpy 10.00 GB/s" in out


def test_run_case_gives_numpy_rows_no_compile_time(tmp_path):
    x = np.arange(4000, dtype=np.float32)
    case = suite_kernels.Case("masked_mean", (4000,), np.float32, 4000, 16000.0, "numpy sum")
    case.add("numpy sum", np.sum, x)
    case.add("fedkernels", jax.jit(jax.numpy.sum), jax.numpy.asarray(x))
    records = {r["impl"]: r for r in suite_kernels._run_case(_ctx(tmp_path), case, repeats=5)}
    assert records["numpy sum"]["compile"] is None
    assert records["fedkernels"]["compile"] >= 0.0


def test_time_fn_warms_up_untimed_and_times_until_min_seconds(monkeypatch):
    # A fake clock: each call of fn takes exactly 2 ms, whatever the machine is doing.
    clock = [0.0]
    calls = []

    def fn():
        calls.append(None)
        clock[0] += 0.002

    monkeypatch.setattr(_common.time, "perf_counter", lambda: clock[0])
    timing = _common.time_fn(fn, repeats=5, warmup=3, compiles=False, min_seconds=0.05)
    # 3 untimed calls (the first one included), then runs until 0.05 s are timed: 25 of 2 ms.
    assert len(calls) - 3 == timing["repeats"] == 25
    assert timing["median"] == pytest.approx(0.002)
    few = _common.time_fn(fn, repeats=5, compiles=False, min_seconds=10.0, max_repeats=8)
    assert few["repeats"] == 8
    # A call longer than min_seconds / 10 ends the warm-up and is the first timed run.
    calls.clear()
    slow = _common.time_fn(fn, repeats=5, warmup=3, compiles=False, min_seconds=0.001)
    assert slow["repeats"] == len(calls) - 1 == 5


def test_time_interleaved_gives_uncompiled_rows_no_compile_time():
    timings = _common.time_interleaved(
        lambda msg: None, "case", [("numpy loop", lambda: 1), ("jitted", lambda: 2)],
        repeats=2, uncompiled=("numpy loop",))
    assert timings["numpy loop"]["compile"] is None and timings["numpy loop"]["median"] >= 0
    assert timings["jitted"]["compile"] >= 0.0 and timings["jitted"]["repeats"] == 2


def test_pipeline_and_tff_tables_print_their_legends(tmp_path, capsys):
    from bench import suite_tff

    row = {"case": "round_topk1%_ef_8bit_4x1000_float32", "op": "round", "impl": "fedkernels",
           "median": 0.01, "first": 2.0, "ratio_vs_numpy": 0.2, "pct_of_bound": 30.0,
           "per_client_parameter_ns": 2.5}
    suite_pipeline._print(_printing_ctx(tmp_path), [row])
    out = capsys.readouterr().out
    assert "legend:" in out and "< 1 is faster than NumPy" in out and "% of bound" in out
    assert "0.20x" in out and "30%" in out and "ns/client-param" in out and "GB/s" in out
    suite_tff._print([{"case": "masked_mean_5x100_float32", "op": "masked_mean",
                       "impl": "fedkernels.tff", "baseline": "tff.MeanFactory", "median": 0.1,
                       "first": 1.0, "ns_per_client_parameter": 2.0, "ratio_vs_baseline": 1.1}])
    out = capsys.readouterr().out
    assert "legend:" in out and "x baseline" in out and "project's own goals" in out


def test_tff_tables_say_which_time_and_numbers_sent_targets_are_met(capsys):
    from bench import suite_tff, suite_tff_learning

    def row(op, impl, ratio, sent, sent_ratio):
        return {"case": f"{op}_5x100_float32", "op": op, "impl": impl, "baseline": "tff.X",
                "median": 0.1, "first": 1.0, "ns_per_client_parameter": 2.0,
                "ratio_vs_baseline": ratio, "numbers_sent": sent,
                "numbers_sent_vs_baseline": sent_ratio}

    # A compressing factory must send fewer numbers than TFF's, a mean no more.
    assert suite_tff._target(row("quantize", "fedkernels.tff", 1.1, 25002, 0.875)) == (
        "time <= 1.0x: MISSED; sent < tff: met")
    assert suite_tff._target(row("compression", "fedkernels.tff", 0.9, 28581, 1.0)) == (
        "time <= 1.0x: met; sent < tff: MISSED")
    assert suite_tff._target(row("masked_mean", "fedkernels.tff", 1.0, 101, 1.0)) == (
        "time <= 1.0x: met; sent <= tff: met")
    assert suite_tff._target(row("masked_mean", "tff.X", 1.0, 101, 1.0)) == ""
    suite_tff._print([row("quantize", "tff.X", 1.0, 28574, 1.0),
                      row("quantize", "fedkernels.tff", 1.1, 25002, 0.875)])
    out = capsys.readouterr().out
    assert "sent/client" in out and "28,574" in out and "0.875" in out
    stock, staged = "stock (MeanFactory)", "stock + staged fedkernels.tff.compression_aggregator()"
    suite_tff_learning._print([
        {"case": "fed_avg_round_4x20_float32", "impl": stock, "baseline": stock,
         "median": 1.0, "ratio_vs_baseline": 1.0, "numbers_sent": 21,
         "numbers_sent_vs_baseline": 1.0},
        {"case": "fed_avg_round_4x20_float32", "impl": staged, "baseline": stock,
         "median": 1.2, "ratio_vs_baseline": 1.2, "numbers_sent": 7,
         "numbers_sent_vs_baseline": 0.333},
    ])
    out = capsys.readouterr().out
    assert "time <= 1.0x: MISSED; sent < tff: met" in out and "0.333" in out


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "(default: cpu)" in out and "(default: results/bench)" in out
    assert "scaling" in out and "--roofline" in out


def test_single_size_plot_draws_bars(tmp_path):
    pytest.importorskip("matplotlib")
    records = [{"op": "masked_mean", "impl": name, "size": 1000, "median": t}
               for name, t in (("fedkernels", 1e-3), ("numpy X.mean(0)", 2e-3))]
    path = _common.plot(tmp_path / "one.png", records)
    assert path is not None and path.stat().st_size > 0


# ---------------------------------------------------------------- scaling suite


def test_scaling_slopes_recover_known_exponents():
    from bench import suite_scaling

    records = []
    for size in (10, 100, 1000, 10000):
        for impl, exponent in (("fedkernels", 1.0), ("numpy loop", 1.5)):
            records.append({"kind": "point", "op": "round", "sweep": "C", "fixed": 50,
                            "impl": impl, "size": size, "median": 1e-6 * size**exponent,
                            "min": 0.5e-6 * size**exponent,
                            "bound_s": 2e-7 * size, "peak_bytes": 4 * size})
    slopes = {r["impl"]: r for r in suite_scaling.slopes(records)}
    assert slopes["fedkernels"]["slope"] == pytest.approx(1.0)
    assert slopes["numpy loop"]["slope"] == pytest.approx(1.5)
    assert slopes["numpy loop"]["slope_top"] == pytest.approx(1.5)
    assert slopes["numpy loop"]["slope_best"] == pytest.approx(1.5)
    assert slopes["bound"]["slope"] == pytest.approx(1.0)
    assert slopes["bound"]["slope_best"] == pytest.approx(1.0)
    assert slopes["fedkernels"]["memory_slope"] == pytest.approx(1.0)


def test_scaling_sweeps_span_the_asked_ranges():
    from bench import suite_scaling

    full = suite_scaling.sweeps(quick=False)
    c_sizes = {s for sw in full if sw.axis == "C" for s in sw.sizes}
    d_sizes = {s for sw in full if sw.axis == "d" for s in sw.sizes}
    assert min(c_sizes) == 10 and max(c_sizes) == 1000
    assert min(d_sizes) == 10**4 and max(d_sizes) == 10**7
    ops = {sw.op for sw in full}
    assert ops == set(suite_scaling.BUILDERS)


def test_scaling_round_point_measures_time_memory_and_bound(tmp_path):
    from bench import suite_scaling

    ctx = _ctx(tmp_path)
    point = suite_scaling._round_point(ctx, 4, 2000, (2,))
    assert [i.name for i in point.impls] == [
        "fedkernels", "fedkernels chunk_size=2", "numpy per-client loop"]
    del point.impls[1]  # measured like the first; one compile less keeps the test short
    rows = suite_scaling._measure(ctx, point, "test", repeats=1)
    for r in rows:
        assert r["error"] is None and r["median"] > 0 and r["peak_bytes"] > 0
        # Inputs alone are two [4, 2000] float32 arrays: any peak includes them.
        assert r["peak_bytes"] >= 2 * 4 * 4 * 2000
        assert r["bound_s"] == pytest.approx(3 * 4 * 4 * 2000 / 1e10)
    assert rows[0]["compile"] > 0 and rows[-1]["compile"] is None
    assert rows[-1]["ratio_vs_numpy"] == 1.0


# ---------------------------------------------------------------- roofline


def test_roofline_is_bytes_over_bandwidth(tmp_path, capsys):
    from bench import roofline

    data = roofline.table(measured_bytes_per_s=1e10, device="cpu")
    row = next(r for r in data["rows"] if r["name"] == "round_topk1%_ef_8bit_100x1000000")
    assert row["min_bytes"] == 3 * 4 * 100 * 10**6 and row["impl_bytes"] == 5 * 4 * 100 * 10**6
    assert row["min_ms"]["H100 (HBM3, 3.35 TB/s)"] == pytest.approx(1.2e9 / 3.35e12 * 1e3)
    assert row["impl_ms"]["H200 (HBM3e, 4.8 TB/s)"] == pytest.approx(2e9 / 4.8e12 * 1e3)
    assert any("this run's device" in name for name in row["min_ms"])
    assert main(["--roofline", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "H100" in out and "H200" in out and "min bytes" in out and "GB" in out
    assert (tmp_path / "roofline.json").exists()


# ---------------------------------------------------------------- plain checkout, no extras

_BLOCKER = '''
import importlib.abc, os, sys

BLOCKED = {"matplotlib", "chex", "hypothesis", "tensorflow", "tensorflow_federated",
           "sklearn", "pytest"}


class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            with open(os.environ["BLOCKED_LOG"], "a") as log:
                log.write(name + "\\n")
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)")
        return None


sys.meta_path.insert(0, Blocker())
'''

_TINY_RUN = '''
import functools, sys
from bench import _common, suite_kernels, suite_scaling
from bench.__main__ import main

# Tiny sizes: this checks that the entry point runs and writes its JSON, not speed.
_common.copy_bandwidth = functools.partial(_common.copy_bandwidth, nbytes=2**20)
suite_kernels._sizes = lambda ctx: {"scatter_sum": [(4, 10, 1000)]}
suite_scaling.sweeps = lambda quick, gpu=False: [
    suite_scaling.Sweep("masked_mean", "C", 1000, (2, 4))]
out = sys.argv[1]
assert main(["--device", "cpu", "--quick", "--only", "scatter_sum", "--out", out]) == 0
assert main(["--device", "cpu", "--quick", "--suite", "scaling", "--out", out]) == 0
import bench.suite_pipeline, bench.suite_tff  # importable too
'''


def test_bench_runs_without_matplotlib_or_test_extras(tmp_path):
    # What a GPU machine has: jax and numpy, no matplotlib, TensorFlow or test packages.
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_BLOCKER)
    repo = Path(__file__).resolve().parent.parent
    log = tmp_path / "blocked.log"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(repo)]),
               BLOCKED_LOG=str(log), JAX_PLATFORMS="cpu")
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-c", _TINY_RUN, str(out)], capture_output=True,
                          text=True, timeout=120, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    for suite in ("kernels", "scaling"):
        payload = json.loads((out / f"{suite}.json").read_text())
        assert payload["suite"] == suite and payload["records"]
        assert not (out / f"{suite}.png").exists()
    assert (out / "roofline.json").exists()
    assert "matplotlib not installed" in done.stderr
    attempted = set(log.read_text().split()) if log.exists() else set()
    # Only the plots tried matplotlib; nothing reached for TensorFlow or test-only packages.
    assert {name.split(".")[0] for name in attempted} <= {"matplotlib"}, attempted
    assert "legend:" in done.stdout
