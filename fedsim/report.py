"""What a run reports: one JSON record per configuration, a Markdown table, two plots, progress.

Spread over seeds is the sample standard deviation (ddof=1), `None` with a single seed.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, TextIO

import numpy as np

FLOAT32_BYTES = 4
LAST_EVALS = 3  # the table's "late accuracy" averages the last this many evaluations


def mean_sd(values: np.ndarray) -> tuple[list[float], list[float] | None]:
    """Mean and sample sd over seeds (axis 0) of `values: [S, E]`; sd is None when S == 1."""
    values = np.asarray(values, np.float64)
    mean = values.mean(axis=0).tolist()
    sd = values.std(axis=0, ddof=1).tolist() if values.shape[0] > 1 else None
    return mean, sd


def _scalar_mean_sd(values: np.ndarray) -> dict[str, float | None]:
    values = np.asarray(values, np.float64)
    return {
        "mean": float(values.mean()),
        "sd": float(values.std(ddof=1)) if values.size > 1 else None,
    }


def configuration_record(
    name: str, label: str, options: dict[str, Any], settings: Any, record: Any, layout: Any
) -> dict[str, Any]:
    """The JSON record of one configuration (see the module docstring for mean and sd)."""
    accuracy_mean, accuracy_sd = mean_sd(record.accuracy)
    loss_mean, loss_sd = mean_sd(record.loss)
    last = min(LAST_EVALS, len(record.rounds))
    uploaded = record.uploaded_bytes[:, -1]
    per_client = FLOAT32_BYTES * layout.size  # the whole update as float32
    # What the clients that uploaded would have sent as float32: excluded clients send
    # nothing, so they count on neither side of the ratio.
    uploads = settings.rounds * settings.cohort - record.excluded_clients.astype(np.float64)
    uncompressed = float(np.mean(uploads)) * per_client
    return {
        "name": name,
        "label": label,
        "compressor_options": options,
        "layout": {
            "model_parameters": layout.size,
            "sparse_parameters": layout.sparse_size,
            "dense_parameters": layout.dense_size,
            "sent_sparse_coordinates_per_client": layout.k,
            "payload_bytes_per_client": layout.payload_bytes,
            "uncompressed_bytes_per_client": per_client,
        },
        "seeds": list(settings.seeds),
        "rounds": list(record.rounds),
        "per_seed": [
            {
                "seed": seed,
                "accuracy": record.accuracy[i].tolist(),
                "loss": record.loss[i].tolist(),
                "cumulative_uploaded_bytes": record.uploaded_bytes[i].tolist(),
                "excluded_clients": int(record.excluded_clients[i]),
            }
            for i, seed in enumerate(settings.seeds)
        ],
        "accuracy": {"mean": accuracy_mean, "sd": accuracy_sd},
        "loss": {"mean": loss_mean, "sd": loss_sd},
        "cumulative_uploaded_bytes_mean": record.uploaded_bytes.mean(axis=0).tolist(),
        "final": {
            "round": record.rounds[-1],
            "accuracy": _scalar_mean_sd(record.accuracy[:, -1]),
            "loss": _scalar_mean_sd(record.loss[:, -1]),
            f"accuracy_mean_of_last_{last}_evaluations": _scalar_mean_sd(
                record.accuracy[:, -last:].mean(axis=1)
            ),
            "late_accuracy_rounds": list(record.rounds[-last:]),
        },
        "uploaded_bytes": _scalar_mean_sd(uploaded),
        "uncompressed_bytes": uncompressed,
        "compression_ratio": uncompressed / float(uploaded.mean()) if uploaded.mean() else None,
        "excluded_clients_total": int(record.excluded_clients.sum()),
        "first_round_s": record.first_round_s,
        "wall_s": record.wall_s,
    }


def _pm(stat: dict[str, float | None], digits: int = 3) -> str:
    if stat["sd"] is None:
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} ± {stat['sd']:.{digits}f}"


def format_bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.3g} B"


def format_table(records: list[dict[str, Any]]) -> str:
    """A Markdown table, one row per configuration, and a legend naming what each column is."""
    first = records[0]
    late = first["final"]["late_accuracy_rounds"]
    late_title = (
        f"accuracy, mean at rounds {', '.join(map(str, late))}" if len(late) > 1 else "accuracy"
    )
    lines = [
        f"| configuration | final accuracy | {late_title} | final loss | uploaded | "
        "compression | wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    for rec in records:
        final = rec["final"]
        late_key = next(k for k in final if k.startswith("accuracy_mean_of_last_"))
        ratio = rec["compression_ratio"]
        ratio = "none uploaded" if ratio is None else f"{ratio:.1f}x"
        lines.append(
            f"| {rec['label']} | {_pm(final['accuracy'])} | {_pm(final[late_key])} | "
            f"{_pm(final['loss'])} | {format_bytes(rec['uploaded_bytes']['mean'])} | "
            f"{ratio} | {rec['wall_s']:.1f} |"
        )
    seeds = first["seeds"]
    lines.append("")
    lines.append(
        f"Mean ± sample sd over {len(seeds)} seeds ({', '.join(map(str, seeds))}); accuracy and "
        f"loss (cross-entropy) on the held-out test split after round {first['final']['round']}; "
        "uploaded: bytes all clients sent over the run (values, indices, scales); compression: "
        "the same uploads' float32 bytes / uploaded; wall s: all seeds, compilation included."
        if len(seeds) > 1 else
        "One seed, no spread; accuracy and loss (cross-entropy) on the held-out test split; "
        "uploaded: bytes all clients sent (values, indices, scales)."
    )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------


def write_plots(records: list[dict[str, Any]], out: Path, title: str) -> list[Path]:
    """`accuracy_vs_rounds.png` and `accuracy_vs_bytes.png`: mean over seeds, ± sd shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    paths = []
    for kind in ("rounds", "bytes"):
        fig, ax = plt.subplots(figsize=(7.5, 4.6))
        for rec in records:
            mean = np.asarray(rec["accuracy"]["mean"])
            sd = rec["accuracy"]["sd"]
            if kind == "rounds":
                x = np.asarray(rec["rounds"], np.float64)
                text = rec["label"]
            else:
                x = np.asarray(rec["cumulative_uploaded_bytes_mean"], np.float64)
                ratio = rec["compression_ratio"]
                text = rec["label"] + (" (none uploaded)" if ratio is None else f" ({ratio:.0f}x)")
            (line,) = ax.plot(x, mean, marker=".", label=text)
            if sd is not None:
                sd = np.asarray(sd)
                ax.fill_between(x, mean - sd, mean + sd, color=line.get_color(), alpha=0.2,
                                linewidth=0)
        if kind == "rounds":
            ax.set_xlabel("round")
        else:
            ax.set_xscale("log")
            # Labelled majors at 1, 2, 5 x 10^n only, so a range under a decade (--quick)
            # still gets a few labels and the minor ticks never print overlapping text.
            ax.xaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: format_bytes(v)))
            ax.xaxis.set_minor_formatter(ticker.NullFormatter())
            ax.set_xlabel("cumulative uploaded bytes, all clients (log scale)")
            for label in ax.get_xticklabels():
                label.set_rotation(0)
        ax.set_ylabel("test accuracy (mean ± sd over seeds)")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        path = out / f"accuracy_vs_{kind}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------------------------
# Progress
# --------------------------------------------------------------------------------------------


class Progress:
    """Progress over all rounds of all configurations.

    On a terminal: one bar redrawn in place. Elsewhere (a log file, a pipe): whole lines, at
    most `lines_per_configuration` per configuration, so a log stays readable.
    """

    def __init__(
        self, total_rounds: int, stream: TextIO | None = None, lines_per_configuration: int = 4
    ):
        self.stream = stream if stream is not None else sys.stdout
        self.total = max(total_rounds, 1)
        self.done = 0
        self.lines = lines_per_configuration
        self.interactive = bool(getattr(self.stream, "isatty", lambda: False)())
        self.start = time.perf_counter()
        self.name, self.rounds, self.config_done, self.printed = "", 1, 0, 0

    def begin(self, name: str, rounds: int) -> None:
        self.name, self.rounds, self.config_done, self.printed = name, max(rounds, 1), 0, 0

    def update(self, n: int, accuracy: np.ndarray, loss: np.ndarray) -> None:
        self.done += n
        self.config_done += n
        elapsed = time.perf_counter() - self.start
        note = (f"{self.name}: round {self.config_done}/{self.rounds}, accuracy "
                f"{np.mean(accuracy):.3f}, loss {np.mean(loss):.3f} (mean of {np.size(accuracy)}"
                f" seeds)")
        if self.interactive:
            frac = min(self.done / self.total, 1.0)
            bar = "#" * int(30 * frac) + "." * (30 - int(30 * frac))
            self.stream.write(f"\r[{bar}] {100 * frac:5.1f}% {elapsed:5.0f}s {note:<80}")
        else:
            # Print when this configuration passes the next of `lines` evenly spaced marks.
            passed = self.printed
            while passed < self.lines and (
                (passed + 1) * self.rounds <= self.config_done * self.lines
            ):
                passed += 1
            if passed == self.printed and self.config_done < self.rounds:
                return
            self.printed = passed
            self.stream.write(f"[{elapsed:6.1f} s] {note}\n")
        self.stream.flush()

    def close(self) -> None:
        if self.interactive:
            self.stream.write("\n")
            self.stream.flush()
