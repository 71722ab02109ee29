"""`python -m bench [--quick] [--device cpu|gpu]
[--suite kernels|pipeline|tff|tff_learning|all] [--out DIR] [--only OP,...]`."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from pathlib import Path

SUITES = ("kernels", "pipeline", "tff", "tff_learning")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, about 2 minutes")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--suite", choices=(*SUITES, "all"), default="kernels")
    parser.add_argument("--out", type=Path, default=Path("results/bench"))
    parser.add_argument(
        "--host-memory",
        choices=("keep", "default"),
        default="keep",
        help="keep: fedkernels.keep_host_memory() (glibc keeps freed buffers warm; applies to "
        "NumPy and JAX alike); default: glibc's defaults, large buffers mapped afresh per call",
    )
    parser.add_argument(
        "--only",
        default="",
        help="kernels suite: only these ops, comma-separated (masked_mean, top_k, quantize, "
        "scatter_sum, flatten; quantize includes dequantize, flatten unflatten)",
    )
    args = parser.parse_args(argv)
    only = tuple(op for op in args.only.split(",") if op)
    if only:
        from bench.suite_kernels import OPS

        unknown = sorted(set(only) - set(OPS))
        if unknown:
            parser.error(f"--only: unknown op(s) {unknown}; known: {', '.join(OPS)}")
        if args.suite != "kernels":
            parser.error(f"--only applies to --suite kernels, got --suite {args.suite}")

    import fedkernels

    kept = args.host_memory == "keep" and fedkernels.keep_host_memory()

    from bench import _common

    device = _common.get_device(args.device)
    ctx = _common.Context(quick=args.quick, device=device, out_dir=args.out, only=only)
    ctx.machine = _common.machine_info(device)
    ctx.machine["host_memory_kept"] = bool(kept)
    ctx.progress(f"machine: {ctx.machine}")
    ctx.progress("measuring copy bandwidth")
    ctx.bandwidth_info = _common.copy_bandwidth(device)
    ctx.bandwidth = ctx.bandwidth_info["bytes_per_s"]
    ctx.progress(
        f"copy bandwidth {ctx.bandwidth / 1e9:.2f} GB/s (read+write; device "
        f"{ctx.bandwidth_info['device_bytes_per_s'] / 1e9:.2f}, numpy "
        f"{ctx.bandwidth_info['numpy_bytes_per_s'] / 1e9:.2f})"
    )
    names = SUITES if args.suite == "all" else (args.suite,)
    status = 0
    for name in names:
        module_name = f"bench.suite_{name}"
        if importlib.util.find_spec(module_name) is None:
            print(f"[bench] suite {name!r}: missing (no bench/suite_{name}.py)", flush=True)
            if args.suite != "all":
                status = 2
            continue
        module = importlib.import_module(module_name)
        ctx.progress(f"suite {name}: start")
        records = module.run(ctx)
        payload = {
            "suite": name,
            "quick": args.quick,
            "machine": ctx.machine,
            "copy_bandwidth": ctx.bandwidth_info,
            "records": records,
        }
        out_json = _common.write_json(args.out / f"{name}.json", payload)
        out_png = _common.plot(args.out / f"{name}.png", records)
        ctx.progress(f"suite {name}: wrote {out_json}" + (f" and {out_png}" if out_png else ""))
    return status


if __name__ == "__main__":
    sys.exit(main())
