"""Roofline predictions: the bytes each kernel and the round must move, over memory bandwidth.

`python -m bench --roofline` prints this table for H100 (HBM3, 3.35 TB/s) and H200 (HBM3e,
4.8 TB/s) and writes it to `<out>/roofline.json`; every suite run writes it too, with a
column for the copy bandwidth measured on the benchmark's own device. Plain Python: no jax.

Two figures per case:
- `min_bytes`: what must move at least (each input read once, each output written once).
  `min_bytes / bandwidth` is the floor no implementation beats; the suites' `% of bound`
  uses the same bytes over the copy bandwidth measured in the run.
- `impl_bytes`: what fedkernels' implementation moves, counted from its passes over the
  large arrays (`passes` says which). Small traffic (samples, packed masks, k-sized arrays)
  is left out; it is a few % of the total at these sizes. Where `impl_bytes / bandwidth`
  is far below a measured time, the kernel is bound by something other than bandwidth
  (random access, arithmetic, launch overheads).
"""

from __future__ import annotations

import dataclasses

GPUS = {"H100 (HBM3, 3.35 TB/s)": 3.35e12, "H200 (HBM3e, 4.8 TB/s)": 4.8e12}
F32 = 4  # bytes per float32 or int32


@dataclasses.dataclass(frozen=True)
class Case:
    op: str
    name: str  # op_shape, as the suites name their cases
    min_bytes: float
    impl_bytes: float
    passes: str  # the implementation's passes over the large arrays, in short
    detail: str  # how `impl_bytes` is counted


def masked_mean(num_clients: int, d: int) -> Case:
    x = F32 * num_clients * d
    return Case("masked_mean", f"masked_mean_{num_clients}x{d}", x + F32 * d, x + F32 * d,
                "1",
                "1 read of X [C, d] (sum and count in the same pass), mean [d] written")


def top_k(d: int, k: int) -> Case:
    return Case("top_k", f"top_k_{d}_k{k}", F32 * d + 2 * F32 * k, F32 * d + 2 * F32 * k,
                "1",
                "1 read of x [d] (the trial's counting pass; a failed trial adds passes), "
                "k values and indices written")


def quantize(d: int, bits: int = 8) -> Case:
    x, codes = F32 * d, d * bits / 8
    return Case("quantize", f"quantize_{d}_b{bits}", x + codes, 2 * x + codes,
                "2",
                "2 reads of x [d] (range, then codes), packed codes written")


def dequantize(d: int, bits: int = 8) -> Case:
    x, codes = F32 * d, d * bits / 8
    return Case("dequantize", f"dequantize_{d}_b{bits}", x + codes, x + codes,
                "1",
                "1 read of the codes, x [d] written")


def scatter_sum(num_clients: int, k: int, d: int) -> Case:
    sent, out = 2 * F32 * num_clients * k, 2 * F32 * d
    return Case("scatter_sum", f"scatter_sum_{num_clients}x{k}_d{d}", sent + out, sent + out,
                "1 (scatter)",
                "1 read of values and indices [C, k], total and count [d] written "
                "(random access: atomics, not bandwidth, may bound it)")


def flatten(num_clients: int, d: int) -> Case:
    x = F32 * num_clients * d
    return Case("flatten", f"flatten_{num_clients}x{d}", 2 * x, 2 * x, "1 copy",
                "1 copy: leaves read, [C, d] written")


def round_topk_ef_8bit(num_clients: int, d: int) -> Case:
    """The pipeline suite's round: top-k 1% + error feedback + 8 bits."""
    x = F32 * num_clients * d
    return Case("round", f"round_topk1%_ef_8bit_{num_clients}x{d}", 3 * x, 5 * x,
                "5 of [C, d] (min 3)",
                "5 transfers of [C, d]: updates and residuals read, acc = x + r written "
                "(the new residuals), acc read by the counting pass, the new residuals read "
                "by the residual norm; the minimum is the first 3")


def round_8bit_dense(num_clients: int, d: int) -> Case:
    """The pipeline suite's `round_8bit_dense`: every client's whole update in 8 bits."""
    x, codes = F32 * num_clients * d, num_clients * d
    return Case("round_dense", f"round_8bit_dense_{num_clients}x{d}", x + F32 * d,
                2 * x + 2 * codes,
                "2 + codes",
                "2 reads of updates [C, d] (range, codes), codes written and read back by "
                "the server's sum; the minimum is one read of the updates")


def cases() -> list[Case]:
    """The table's rows: the kernels suite's main sizes, its GPU sizes, and the round."""
    return [
        masked_mean(100, 10**6),
        masked_mean(100, 10**7),
        top_k(10**7, 10**5),
        top_k(10**9, 10**6),
        quantize(10**7),
        quantize(10**9),
        dequantize(10**7),
        dequantize(10**9),
        scatter_sum(100, 10**4, 10**6),
        scatter_sum(1000, 10**5, 10**7),
        flatten(100, 10**6),
        round_topk_ef_8bit(100, 10**6),
        round_topk_ef_8bit(1000, 10**6),
        round_8bit_dense(100, 10**6),
    ]


def table(measured_bytes_per_s: float | None = None, device: str = "") -> dict:
    """The table as JSON-ready data: per case, bytes and predicted milliseconds per device."""
    devices = dict(GPUS)
    if measured_bytes_per_s:
        devices[f"this run's device ({device}, measured copy)"] = measured_bytes_per_s
    rows = []
    for case in cases():
        row = dataclasses.asdict(case)
        row["min_ms"] = {name: 1e3 * case.min_bytes / bw for name, bw in devices.items()}
        row["impl_ms"] = {name: 1e3 * case.impl_bytes / bw for name, bw in devices.items()}
        rows.append(row)
    return {"bandwidth_bytes_per_s": devices, "rows": rows}


def _ms(value: float) -> str:
    return f"{value:.3f}" if value < 1 else f"{value:.2f}" if value < 10 else f"{value:.1f}"


def format_table(data: dict) -> str:
    """Markdown: case, bytes (minimum / implementation), then min and impl ms per device."""
    names = list(data["bandwidth_bytes_per_s"])
    header = ["case", "passes", "min bytes", "impl bytes"] + [
        f"{n.split(' (')[0]} ms (min / impl)" for n in names
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in data["rows"]:
        cells = [row["name"], row["passes"], f"{row['min_bytes'] / 1e9:.3g} GB",
                 f"{row['impl_bytes'] / 1e9:.3g} GB"]
        cells += [f"{_ms(row['min_ms'][n])} / {_ms(row['impl_ms'][n])}" for n in names]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


LEGEND = """\
Roofline: time = bytes / memory bandwidth, the floor set by memory traffic alone.
  min bytes:  each input read once, each output written once (what any implementation moves)
  impl bytes: what fedkernels moves, from its passes over the large arrays (`passes`; the
              notes below say how they are counted); impl / min is the price of extra passes
  GPU columns use the vendors' peak HBM bandwidth (H100 SXM 3.35 TB/s, H200 4.8 TB/s); a
  copy reaches less than peak, so judge a GPU run by `% of bound` (its own measured copy)."""


def print_table(data: dict) -> None:
    print(LEGEND)
    for name, bandwidth in data["bandwidth_bytes_per_s"].items():
        print(f"  {name}: {bandwidth / 1e9:.1f} GB/s")
    print(format_table(data))
    print("passes counted:")
    seen = set()
    for row in data["rows"]:
        if row["op"] not in seen:
            seen.add(row["op"])
            print(f"  {row['op']}: {row['detail']}")
    print(flush=True)
