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
