"""fedsim, the experiment driver (`python -m fedsim`): flags, labels, outputs, progress, data.

Runs use tiny settings and the NumPy-only synthetic data, so they run on both stacks; the
digits data needs scikit-learn and skips without it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import fedkernels as fk
from fedsim import cli, report
from fedsim.data import dirichlet_split, federated_data, load_examples, stratified_split
from fedsim.settings import (
    CONFIGURATIONS,
    FLAGS,
    FULL,
    QUICK,
    Settings,
    _show,
    build_parser,
    compressor_options,
    label,
    parse_settings,
)

pytest.importorskip("matplotlib", reason="fedsim plots with matplotlib (the `sim` extra)")

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--quick", "--data", "synthetic", "--clients", "40", "--cohort", "6", "--rounds", "4",
    "--eval-every", "2", "--hidden", "24", "--local-steps", "1", "--seeds", "0,1",
    "--dense-threshold", "100",  # the 24-wide model's leaves are small
]


# --------------------------------------------------------------------------------------------
# Flags
# --------------------------------------------------------------------------------------------


def test_help_names_every_setting_with_its_defaults():
    text = " ".join(build_parser().format_help().split())  # undo argparse's line wrapping
    packed = "".join(text.split())  # argparse may also break a line after a hyphen
    fields = {f.name for f in dataclasses.fields(Settings)}
    assert {field for field, *_ in FLAGS} == fields  # every setting has a flag
    for field, flag, _, meaning in FLAGS:
        assert flag in text
        assert " ".join(meaning.split()[:4]) in text
        shown = f"default: {_show(getattr(FULL, field))}"
        if getattr(QUICK, field) != getattr(FULL, field):
            shown += f"; quick: {_show(getattr(QUICK, field))}"
        assert "".join(shown.split()) in packed, (flag, shown)
    for name in CONFIGURATIONS:
        assert name in text


def test_flags_override_the_quick_or_full_defaults():
    _, settings = parse_settings(
        ["--quick", "--top-k", "0.05", "--bits", "4", "--seeds", "3,4", "--cohort", "7",
         "--configs", "topk,quant-ef", "--hidden", "32,16", "--chunk-size", "3",
         "--server-momentum", "0", "--dirichlet-alpha", "0.1"]
    )
    assert settings == dataclasses.replace(
        QUICK, top_k_fraction=0.05, bits=4, seeds=(3, 4), cohort=7, configs=("topk", "quant-ef"),
        hidden=(32, 16), chunk_size=3, server_momentum=0.0, dirichlet_alpha=0.1,
    )
    assert parse_settings([])[1] == FULL
    assert parse_settings(["--rounds", "7"])[1] == dataclasses.replace(FULL, rounds=7)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--configs", "uncompressed,topk-1pct"], "unknown configuration 'topk-1pct'; choose from: "
         + ", ".join(CONFIGURATIONS)),
        (["--configs", "0"], "unknown configuration '0'"),
        (["--top-k", "1.5"], r"--top-k: must be in \(0, 1\], got 1.5"),
        (["--bits", "17"], r"--bits: must be in \[1, 16\], got 17"),
        (["--seeds", "1,1"], "seeds must be distinct"),
        (["--clients", "10", "--cohort", "11"], r"--cohort must be at most --clients \(10\)"),
        (["--data", "mnist"], "invalid choice: 'mnist'"),
        (["--rounds", "zero"], "expected an integer, got 'zero'"),
        # A JAX key keeps a seed's low 32 bits: 2**32 would repeat seed 0's keys.
        (["--seeds", "0,4294967296"], r"seeds must be distinct and in \[0, 4294967295\]"),
        (["--client-lr", "inf"], r"--client-lr: must be in \(0, inf\), got inf"),
        (["--server-lr", "1e309"], r"--server-lr: must be in \(0, inf\)"),
        (["--dirichlet-alpha", "inf"], r"--dirichlet-alpha: must be in \[0.001, 1000000.0\]"),
        (["--dirichlet-alpha", "1e-12"], r"--dirichlet-alpha: must be in \[0.001"),
    ],
)
def test_bad_settings_exit_with_a_clear_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_settings(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and "Traceback" not in err
    assert re.search(message, err), err


# --------------------------------------------------------------------------------------------
# Labels and compressor options come from the settings
# --------------------------------------------------------------------------------------------


def test_labels_follow_the_settings():
    settings = dataclasses.replace(FULL, top_k_fraction=0.05, bits=4)
    assert label("topk-ef-quant", settings) == "top-k 5% + EF + 4 bits"
    assert label("topk-quant", settings) == "top-k 5% + 4 bits, no EF"
    assert label("quant", settings) == "4 bits"
    assert label("randk-ef-quant", settings) == "random-k 5% + EF + 4 bits"
    assert label("uncompressed", settings) == "uncompressed"
    assert label("topk", dataclasses.replace(settings, top_k_fraction=0.0025)) == (
        "top-k 0.25%, no EF"
    )


@pytest.mark.parametrize("name", list(CONFIGURATIONS))
def test_compressor_options_build_what_the_name_says(name):
    settings = dataclasses.replace(FULL, top_k_fraction=0.05, bits=4, dense_threshold=100)
    options = compressor_options(name, settings)
    accepted = inspect.signature(fk.compressor).parameters
    assert set(options) <= set(accepted)  # the spelling the installed fedkernels has
    template = {"w": jax.ShapeDtypeStruct((40, 50), np.float32),
                "b": jax.ShapeDtypeStruct((50,), np.float32)}
    comp = fk.compressor(template, **options)
    stages = CONFIGURATIONS[name][1]
    assert comp.layout.sparse_size == 2000 and comp.layout.dense_size == 50
    expected_k = 100 if stages & {"topk", "randk"} else 2000  # 5% of the 2,000 sparse entries
    assert comp.layout.k == expected_k
    assert bool(comp.config.error_feedback) == ("ef" in stages)
    assert comp.config.bits == (4 if "q" in stages else None)


# --------------------------------------------------------------------------------------------
# A tiny run: JSON, table, plots, progress
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fedsim")
    stream = io.StringIO()  # not a terminal
    argv = [*TINY, "--configs", "uncompressed,topk-ef-quant", "--top-k", "0.05", "--out",
            str(out)]
    assert cli.main(argv, stdout=stream) == 0
    return out, stream.getvalue(), parse_settings(argv)[1]


def test_json_holds_settings_per_seed_and_mean_sd_accuracy_loss_and_bytes(tiny_run):
    out, _, settings = tiny_run
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["top_k_fraction"] == 0.05
    assert results["settings"]["seeds"] == [0, 1]
    uncompressed, compressed = results["configurations"]
    assert [c["label"] for c in results["configurations"]] == [
        "uncompressed", "top-k 5% + EF + 8 bits"
    ]
    d = uncompressed["layout"]["model_parameters"]
    assert d == 64 * 24 + 24 + 24 * 10 + 10
    for rec in results["configurations"]:
        assert rec["rounds"] == [2, 4]
        assert [s["seed"] for s in rec["per_seed"]] == [0, 1]
        for metric in ("accuracy", "loss"):
            per_seed = np.array([s[metric] for s in rec["per_seed"]])
            assert per_seed.shape == (2, 2) and np.isfinite(per_seed).all()
            np.testing.assert_allclose(rec[metric]["mean"], per_seed.mean(0), rtol=1e-12)
            np.testing.assert_allclose(rec[metric]["sd"], per_seed.std(0, ddof=1), rtol=1e-12)
        assert all(0.0 <= a <= 1.0 for s in rec["per_seed"] for a in s["accuracy"])
        final = rec["final"]
        np.testing.assert_allclose(final["accuracy"]["mean"], rec["accuracy"]["mean"][-1])
        # Every client of every round uploads payload_bytes (no client was excluded).
        payload = rec["layout"]["payload_bytes_per_client"]
        for s in rec["per_seed"]:
            assert s["cumulative_uploaded_bytes"] == [2 * 6 * payload, 4 * 6 * payload]
            assert s["excluded_clients"] == 0
        assert rec["uncompressed_bytes"] == 4 * 6 * 4 * d
    assert uncompressed["layout"]["payload_bytes_per_client"] == 4 * d
    assert uncompressed["compression_ratio"] == pytest.approx(1.0)
    # The payload the JSON counts is the one fedkernels reports for these options.
    template = jax.tree_util.tree_map(
        lambda s: jax.ShapeDtypeStruct(s, np.float32),
        {"w0": (64, 24), "b0": (24,), "w1": (24, 10), "b1": (10,)},
        is_leaf=lambda x: isinstance(x, tuple),
    )
    comp = fk.compressor(template, **compressed["compressor_options"])
    assert compressed["layout"]["payload_bytes_per_client"] == comp.layout.payload_bytes
    assert compressed["uploaded_bytes"]["mean"] * 5 < uncompressed["uploaded_bytes"]["mean"]


def test_excluded_clients_count_on_neither_side_of_the_compression_ratio(tmp_path):
    """A client excluded for non-finite updates uploads nothing; the float32 baseline of the
    ratio counts only the uploads made, so "uncompressed" stays 1.0x."""
    argv = [*TINY, "--seeds", "0", "--configs", "uncompressed,topk-ef-quant",
            "--client-lr", "1e30", "--out", str(tmp_path)]  # updates overflow to Inf
    assert cli.main(argv, stdout=io.StringIO()) == 0
    uncompressed, compressed = json.loads((tmp_path / "results.json").read_text())[
        "configurations"]
    assert uncompressed["excluded_clients_total"] > 0  # the test can fail: clients excluded
    assert uncompressed["compression_ratio"] == pytest.approx(1.0)
    layout = compressed["layout"]
    assert compressed["compression_ratio"] == pytest.approx(
        layout["uncompressed_bytes_per_client"] / layout["payload_bytes_per_client"])


def test_a_configuration_with_no_upload_is_reported_not_a_crash(tiny_run, tmp_path):
    """Every client excluded: no ratio (None in the JSON), "none uploaded" in the table and
    the plot's legend."""
    out, _, _ = tiny_run
    records = json.loads((out / "results.json").read_text())["configurations"]
    records[1] = {**records[1], "compression_ratio": None}
    assert "| none uploaded |" in report.format_table(records)
    assert len(report.write_plots(records, tmp_path, "none uploaded")) == 2


def test_table_and_both_plots_are_written(tiny_run):
    out, printed, _ = tiny_run
    assert "| top-k 5% + EF + 8 bits |" in printed
    assert "accuracy, mean at rounds 2, 4" in printed  # says what the late column averages
    assert "Mean ± sample sd over 2 seeds (0, 1)" in printed
    for name in ("accuracy_vs_rounds.png", "accuracy_vs_bytes.png"):
        png = (out / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_progress_is_line_based_when_stdout_is_not_a_terminal(tiny_run):
    _, printed, _ = tiny_run
    assert "\r" not in printed
    progress = [line for line in printed.splitlines() if "round " in line and "/4" in line]
    # At most 4 lines per configuration; the last of each reports the final round.
    assert len(progress) <= 8
    assert sum("round 4/4" in line for line in progress) == 2


def test_progress_lines_are_capped_per_configuration():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    log, tty = io.StringIO(), Terminal()
    for stream in (log, tty):
        bar = report.Progress(100, stream=stream, lines_per_configuration=4)
        bar.begin("topk", 100)
        for _ in range(50):
            bar.update(2, np.array([0.5, 0.6]), np.array([1.0, 1.2]))
        bar.close()
    lines = log.getvalue().splitlines()
    assert len(lines) == 4 and "\r" not in log.getvalue()
    assert [line.split("round ")[1].split("/")[0] for line in lines] == ["26", "50", "76", "100"]
    assert "accuracy 0.550, loss 1.100 (mean of 2 seeds)" in lines[-1]
    assert tty.getvalue().count("\r") == 50  # a bar redrawn in place on a terminal


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def test_dirichlet_split_uses_every_example_once_and_is_skewed():
    _, y = load_examples("synthetic")
    rng = np.random.default_rng(0)
    train, test = stratified_split(y, rng)
    assert np.intersect1d(train, test).size == 0 and train.size + test.size == y.size
    assert np.bincount(y[test]).tolist() == [36] * 10  # 20% of each class
    for num_clients in (20, 300):
        owners = dirichlet_split(y[train], num_clients, 0.5, rng)
        flat = np.concatenate(owners)
        assert np.sort(flat).tolist() == list(range(train.size))
        assert min(o.size for o in owners) >= 2
    # Skewed: each client's most common class holds a larger share of its examples than in
    # an IID split into the same client sizes.
    owners = dirichlet_split(y[train], 20, 0.5, rng)
    iid = np.split(rng.permutation(train.size), np.cumsum([o.size for o in owners])[:-1])

    def top_share(split):
        hist = np.stack([np.bincount(y[train][o], minlength=10) for o in split])
        return np.median(hist.max(1) / hist.sum(1))

    assert top_share(owners) > top_share(iid) + 0.1
    with pytest.raises(ValueError, match="num_clients must be at most 720"):
        dirichlet_split(y[train], 721, 0.5, rng)


def test_federated_data_stacks_one_split_per_seed():
    data = federated_data("synthetic", 50, 0.5, (0, 1, 2))
    assert data.x.shape[:2] == (3, 50) and data.x_test.shape == (3, 360, 64)
    assert (data.count.sum(1) == 1440).all()
    assert not np.array_equal(data.count[0], data.count[1])  # seeds draw different splits
    # Padding beyond a client's count is zero.
    for s in range(3):
        for c in range(50):
            assert not data.x[s, c, data.count[s, c]:].any()


@pytest.mark.skipif(importlib.util.find_spec("sklearn") is None,
                    reason="the digits data ships with scikit-learn (the `sim` extra)")
def test_digits_split_over_the_default_500_clients():
    data = federated_data("digits", FULL.num_clients, FULL.dirichlet_alpha, (0,))
    assert int(data.count.sum()) + data.y_test.shape[1] == 1797  # every digit used once
    assert data.count.min() >= 2


def test_importing_fedkernels_loads_no_driver_dependency():
    code = ("import sys, fedkernels; print(sorted(m for m in ('argparse', 'sklearn', "
            "'matplotlib', 'fedsim') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=ROOT, check=True)
    assert result.stdout.strip() == "[]"
