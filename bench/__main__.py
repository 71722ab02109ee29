"""Benchmarks of fedkernels beside NumPy and the memory bound, one suite at a time or all.

Suites: kernels (each kernel at a few sizes), pipeline (a whole compressed round, the
error-feedback store, a chunked round's memory), scaling (time and peak memory as clients C
and length d grow, with log-log slopes), tff (TensorFlow Federated factories in TFF's
runtime), tff_learning (a whole tff.learning FedAvg round, stock against
fedkernels.tff.build_weighted_fed_avg); both tff suites are skipped where TFF is not
installed. "jax" runs the pure-JAX suites (kernels, pipeline, scaling), "all" every suite.
Each suite prints its table with a legend and writes <out>/<suite>.json (and
<out>/<suite>.png where matplotlib is installed); every run writes <out>/roofline.json too.
The method: bench/README.md.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from pathlib import Path

SUITES = ("kernels", "pipeline", "scaling", "tff", "tff_learning")
GROUPS = {"jax": ("kernels", "pipeline", "scaling"), "all": SUITES}


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows each option's default and keeps the description's line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False, ""):  # flags, and defaults the help text states
            return action.help
        return super()._get_help_string(action)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=_Formatter
    )
    parser.add_argument(
        "--quick", action="store_true",
        help="small sizes: about a minute or two per suite instead of several",
    )
    parser.add_argument(
        "--device", choices=("cpu", "gpu"), default="cpu",
        help="where the JAX side runs (NumPy always runs on the host); jax is started with "
        "this platform only, so every backend-dependent choice in fedkernels resolves for it",
    )
    parser.add_argument(
        "--suite", choices=(*SUITES, *GROUPS), default=None,
        help="which suite(s) to run (default: all, or kernels when --only is given)",
    )
    parser.add_argument("--out", type=Path, default=Path("results/bench"),
                        help="directory for the JSON and PNG files")
    parser.add_argument(
        "--host-memory",
        choices=("keep", "default"),
        default="keep",
        help="keep: fedkernels.host.keep_host_memory() (glibc keeps freed buffers warm; applies to "
        "NumPy and JAX alike); default: glibc's defaults, large buffers mapped afresh per call",
    )
    parser.add_argument(
        "--only",
        default="",
        help="kernels suite: only these ops, comma-separated (masked_mean, top_k, quantize, "
        "scatter_sum, flatten; quantize includes dequantize, flatten unflatten; default: "
        "all)",
    )
    parser.add_argument(
        "--roofline", action="store_true",
        help="print the roofline table (bytes each kernel and the round must move, over H100 "
        "and H200 memory bandwidth), write <out>/roofline.json, and run nothing else",
    )
    return parser


def _start_jax(device: str) -> None:
    """Starts jax on `device`'s platform only, before anything imports it.

    fedkernels picks some code paths by backend; with one platform loaded that choice always
    matches the benchmarked device (a GPU machine run with --device cpu runs CPU paths). The
    environment variable also reaches the suites' subprocesses.
    """
    if "jax" in sys.modules:  # already started (e.g. called from a test): leave it as it is
        return
    if device == "cpu":
        os.environ["JAX_PLATFORMS"] = "cpu"


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.roofline:
        from bench import _common, roofline

        data = roofline.table()
        roofline.print_table(data)
        print(f"wrote {_common.write_json(args.out / 'roofline.json', data)}")
        return 0
    _start_jax(args.device)
    only = tuple(op for op in args.only.split(",") if op)
    if args.suite is None:
        args.suite = "kernels" if only else "all"
    if only:
        from bench.suite_kernels import OPS

        unknown = sorted(set(only) - set(OPS))
        if unknown:
            parser.error(f"--only: unknown op(s) {unknown}; known: {', '.join(OPS)}")
        if args.suite != "kernels":
            parser.error(f"--only applies to --suite kernels, got --suite {args.suite}")

    import fedkernels

    kept = args.host_memory == "keep" and fedkernels.host.keep_host_memory()

    from bench import _common, roofline

    device = _common.get_device(args.device)
    ctx = _common.Context(quick=args.quick, device=device, out_dir=args.out, only=only)
    ctx.machine = _common.machine_info(device)
    ctx.machine["host_memory_kept"] = bool(kept)
    ctx.progress(f"machine: {ctx.machine}")
    ctx.progress("measuring copy bandwidth")
    ctx.bandwidth_info = _common.copy_bandwidth(device)
    ctx.bandwidth = ctx.bandwidth_info["bytes_per_s"]
    ctx.progress(_common.describe_bandwidth(ctx.bandwidth_info))
    _common.write_json(
        args.out / "roofline.json", roofline.table(ctx.bandwidth, ctx.machine["device"])
    )
    names = GROUPS.get(args.suite, (args.suite,))
    status = 0
    for name in names:
        module_name = f"bench.suite_{name}"
        if importlib.util.find_spec(module_name) is None:
            print(f"[bench] suite {name!r}: missing (no bench/suite_{name}.py)", flush=True)
            if args.suite not in GROUPS:
                status = 2
            continue
        module = importlib.import_module(module_name)
        ctx.progress(f"suite {name}: start")
        records = module.run(ctx)
        if not records:  # skipped (tff without TensorFlow Federated): nothing to write
            continue
        payload = {
            "suite": name,
            "quick": args.quick,
            "machine": ctx.machine,
            "copy_bandwidth": ctx.bandwidth_info,
            "records": records,
        }
        out_json = _common.write_json(args.out / f"{name}.json", payload)
        plot = getattr(module, "plot", _common.plot)
        out_png = plot(args.out / f"{name}.png", records)
        ctx.progress(f"suite {name}: wrote {out_json}" + (f" and {out_png}" if out_png else ""))
    return status


if __name__ == "__main__":
    sys.exit(main())
