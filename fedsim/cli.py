"""The command line: run the chosen configurations, print the table, write JSON and plots."""

from __future__ import annotations

import dataclasses
import json
import platform
import sys
import time
from collections.abc import Sequence
from typing import TextIO

import jax
import numpy as np

import fedkernels
from fedsim import federated, report
from fedsim.data import federated_data
from fedsim.settings import build_parser, compressor_options, label, parse_settings

DESCRIPTION = (
    "FedAvg with server momentum on non-IID clients; every upload goes through "
    "fedkernels.compressor. Runs each configuration for every seed (each cohort's local "
    "training at once with vmap), "
    "prints a Markdown table (mean ± sd over seeds) and writes results.json, "
    "accuracy_vs_rounds.png and accuracy_vs_bytes.png to --out."
)


def main(argv: Sequence[str] | None = None, stdout: TextIO | None = None) -> int:
    out_stream = stdout if stdout is not None else sys.stdout
    parser = build_parser(description=DESCRIPTION)
    args, settings = parse_settings(argv, parser)
    try:
        import matplotlib  # noqa: F401
    except ImportError as err:
        print(f"fedsim plots with matplotlib (the `sim` extra): {err}", file=sys.stderr)
        return 1
    try:
        data = federated_data(
            settings.data, settings.num_clients, settings.dirichlet_alpha, settings.seeds
        )
    except (RuntimeError, ValueError) as err:
        parser.error(str(err))

    def say(text: str) -> None:
        out_stream.write(text + "\n")
        out_stream.flush()

    counts = data.count
    sizes = federated.model_sizes(settings, data.x.shape[-1])
    say(
        f"{settings.data}: {int(counts[0].sum())} training examples over {settings.num_clients} "
        f"clients (Dirichlet alpha={settings.dirichlet_alpha}; {counts.min()}-{counts.max()} "
        f"each), {data.y_test.shape[1]} test; cohort {settings.cohort}, {settings.rounds} rounds, "
        f"{len(settings.seeds)} seed(s); MLP {'-'.join(map(str, sizes))}; "
        f"jax {jax.__version__} on {jax.devices()[0].platform}"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    progress = report.Progress(settings.rounds * len(settings.configs), stream=out_stream)
    records = []
    start, start_cpu = time.perf_counter(), time.process_time()
    for name in settings.configs:
        progress.begin(name, settings.rounds)
        try:
            record, comp = federated.run_configuration(
                name, settings, data,
                on_progress=lambda n, m: progress.update(n, m[:, 0], m[:, 1]),
            )
        except ValueError as err:  # a setting fedkernels rejects, e.g. a top-k giving k = 0
            progress.close()
            parser.error(f"configuration {name!r}: {err}")
        options = compressor_options(name, settings)
        records.append(report.configuration_record(
            name, label(name, settings), options, settings, record, comp.layout
        ))
    progress.close()
    total_s = time.perf_counter() - start
    total_cpu_s = time.process_time() - start_cpu  # all threads: the work, apart from load

    results = {
        "settings": dataclasses.asdict(settings),
        "environment": {
            "jax": jax.__version__,
            "numpy": np.__version__,
            "fedkernels": fedkernels.__version__,
            "python": platform.python_version(),
            "platform": jax.devices()[0].platform,
        },
        "model_parameters": records[0]["layout"]["model_parameters"],
        "total_s": total_s,
        "total_cpu_s": total_cpu_s,
        "configurations": records,
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    title = (
        f"FedAvgM on {settings.data}, {settings.num_clients} clients (Dirichlet "
        f"{settings.dirichlet_alpha}), {settings.cohort} per round, "
        f"{len(settings.seeds)} seed(s)"
    )
    plots = report.write_plots(records, args.out, title)
    say(report.format_table(records))
    say(
        f"model: MLP with {results['model_parameters']:,} parameters; all configurations took "
        f"{total_s:.1f} s ({total_cpu_s:.1f} s of CPU); wrote {args.out / 'results.json'}, "
        + " and ".join(str(p) for p in plots)
    )
    return 0
