"""The experiment's settings, its named configurations and the command line that sets them.

Every setting is one field of `Settings` and one flag; `--help` shows each flag's meaning and
its default (for the full run and for `--quick`). A configuration name says which compression
stages run; their parameters (top-k fraction, bits, dense threshold) come from the settings,
and so do the labels printed in the table, the JSON and the plots.
"""

from __future__ import annotations

import argparse
import dataclasses
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DEFAULT_OUT = Path("results/simulation")
DATASETS = ("digits", "synthetic")


@dataclasses.dataclass(frozen=True)
class Settings:
    """One experiment: data, federation, model, optimisation, compression and evaluation."""

    data: str = "digits"
    num_clients: int = 500
    cohort: int = 50
    rounds: int = 40
    local_steps: int = 5
    batch_size: int = 4
    client_lr: float = 0.1
    server_lr: float = 1.0
    server_momentum: float = 0.5
    hidden: tuple[int, ...] = (320, 256)
    dirichlet_alpha: float = 0.5
    top_k_fraction: float = 0.01
    bits: int = 8
    dense_threshold: int = 1000
    chunk_size: int | None = None
    seeds: tuple[int, ...] = (0, 1, 2)
    eval_every: int = 4
    configs: tuple[str, ...] = ("uncompressed", "topk-ef-quant", "topk-quant", "quant")


FULL = Settings()
QUICK = dataclasses.replace(
    FULL, num_clients=100, cohort=10, rounds=12, local_steps=2, hidden=(128,), seeds=(0, 1),
    eval_every=3,
)

# name -> (description, compression stages). The stages' parameters come from the settings.
CONFIGURATIONS: dict[str, tuple[str, frozenset[str]]] = {
    "uncompressed": ("every update sent whole as float32", frozenset()),
    "topk-ef-quant": ("top-k + error feedback + quantization", frozenset({"topk", "ef", "q"})),
    "topk-quant": ("top-k + quantization, no error feedback", frozenset({"topk", "q"})),
    "quant": ("quantization only", frozenset({"q"})),
    "topk-ef": ("top-k + error feedback, float32 values", frozenset({"topk", "ef"})),
    "topk": ("top-k alone", frozenset({"topk"})),
    "randk-ef-quant": ("random-k + error feedback + quantization",
                       frozenset({"randk", "ef", "q"})),
    "quant-ef": ("quantization with error feedback", frozenset({"q", "ef"})),
}


def label(name: str, settings: Settings) -> str:
    """A configuration's label built from the settings, e.g. 'top-k 5% + EF + 4 bits'."""
    stages = CONFIGURATIONS[name][1]
    if not stages:
        return "uncompressed"
    parts = []
    fraction = f"{100 * settings.top_k_fraction:.3g}%"
    if "topk" in stages:
        parts.append(f"top-k {fraction}")
    if "randk" in stages:
        parts.append(f"random-k {fraction}")
    if "ef" in stages:
        parts.append("EF")
    if "q" in stages:
        parts.append(f"{settings.bits} bits")
    text = " + ".join(parts)
    if ("topk" in stages or "randk" in stages) and "ef" not in stages:
        text += ", no EF"
    return text


def compressor_options(name: str, settings: Settings) -> dict[str, Any]:
    """The `fedkernels.compressor` keywords of a configuration, in the library's spelling."""
    stages = CONFIGURATIONS[name][1]
    options: dict[str, Any] = {"dense_threshold": settings.dense_threshold}
    if "topk" in stages or "randk" in stages:
        options["top_k_fraction"] = settings.top_k_fraction
        if "randk" in stages:
            options["random_k"] = True
    if "ef" in stages:
        options["error_feedback"] = True
    if "q" in stages:
        options["bits"] = settings.bits
    return options


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def _int_in(low: int, high: int):
    def parse(text: str) -> int:
        value = _int_at_least(low)(text)
        if value > high:
            raise argparse.ArgumentTypeError(f"must be in [{low}, {high}], got {value}")
        return value

    parse.__name__ = f"integer in [{low}, {high}]"
    return parse


MAX_SEED = 2**32 - 1
# numpy 1.25's Dirichlet sampler does not return for alpha around 1e-10 with hundreds of
# clients; at 1e-3 one client already holds nearly all of a class. Above 1e6 the split is
# uniform to within sampling noise.
MIN_ALPHA, MAX_ALPHA = 1e-3, 1e6


def _float_in(low: float, high: float, *, low_open: bool = False, high_open: bool = False):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        too_low = value <= low if low_open else value < low
        too_high = value >= high if high_open else value > high
        if not value == value or too_low or too_high:  # NaN fails both comparisons
            left, right = "(" if low_open else "[", ")" if high_open else "]"
            raise argparse.ArgumentTypeError(f"must be in {left}{low}, {high}{right}, got {text}")
        return value

    parse.__name__ = "number"
    return parse


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected at least one integer, got {text!r}")
    return values


def _hidden(text: str) -> tuple[int, ...]:
    values = _int_list(text)
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"layer widths must be >= 1, got {text!r}")
    return values


def _seeds(text: str) -> tuple[int, ...]:
    values = _int_list(text)
    # A JAX key (jax.random.PRNGKey) keeps a seed's low 32 bits: seeds 0 and 2**32 would
    # share every key.
    if min(values) < 0 or max(values) > MAX_SEED or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(
            f"seeds must be distinct and in [0, {MAX_SEED}], got {text!r}"
        )
    return values


def _configs(text: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [n for n in names if n not in CONFIGURATIONS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown configuration {', '.join(map(repr, unknown)) or repr(text)}; "
            f"choose from: {', '.join(CONFIGURATIONS)}"
        )
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"configurations must be distinct, got {text!r}")
    return names


def _optional_chunk(text: str) -> int | None:
    if text.lower() in ("none", "0"):
        return None
    return _int_at_least(1)(text)


def _show(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)


# (field, flag, parser, meaning). One row per setting; `--help` appends both defaults.
FLAGS: tuple[tuple[str, str, Any, str], ...] = (
    ("data", "--data", str,
     "data set: 'digits' (scikit-learn's 8x8 digits, shipped with it, no download) or "
     "'synthetic' (10 Gaussian classes in 64 dimensions, NumPy only)"),
    ("num_clients", "--clients", _int_at_least(2), "clients N the training set is split over"),
    ("cohort", "--cohort", _int_at_least(1), "clients sampled per round (without replacement)"),
    ("rounds", "--rounds", _int_at_least(1), "federated rounds"),
    ("local_steps", "--local-steps", _int_at_least(1), "local SGD steps per sampled client"),
    ("batch_size", "--batch-size", _int_at_least(1),
     "examples per local step, drawn with replacement from the client's own data"),
    ("client_lr", "--client-lr", _float_in(0, float("inf"), low_open=True, high_open=True),
     "client (local SGD) learning rate"),
    ("server_lr", "--server-lr", _float_in(0, float("inf"), low_open=True, high_open=True),
     "server learning rate applied to the mean update"),
    ("server_momentum", "--server-momentum", _float_in(0, 1, high_open=True),
     "server momentum beta (FedAvgM; 0 is plain FedAvg)"),
    ("hidden", "--hidden", _hidden, "hidden layer widths of the MLP, comma-separated"),
    ("dirichlet_alpha", "--dirichlet-alpha", _float_in(MIN_ALPHA, MAX_ALPHA),
     "non-IID split: each class is shared over clients in Dirichlet(alpha) proportions "
     "(smaller is more skewed)"),
    ("top_k_fraction", "--top-k", _float_in(0, 1, low_open=True),
     "fraction of the sparse coordinates each client sends (top-k, random-k configurations)"),
    ("bits", "--bits", _int_in(1, 16), "bits per quantized value (quantizing configurations)"),
    ("dense_threshold", "--dense-threshold", _int_at_least(0),
     "leaves with at most this many entries are sent whole as float32"),
    ("chunk_size", "--chunk-size", _optional_chunk,
     "clients compressed at once within a round ('none': the whole cohort)"),
    ("seeds", "--seeds", _seeds,
     "seeds, comma-separated; each seed draws its own split, initial model, client sampling "
     "and keys, shared by every configuration; results are mean +- sd over them"),
    ("eval_every", "--eval-every", _int_at_least(1),
     "evaluate test accuracy and loss every this many rounds (and after the last)"),
    ("configs", "--configs", _configs,
     "configurations to run, comma-separated (names listed below)"),
)


METAVARS = {
    "num_clients": "N", "cohort": "C", "rounds": "R", "local_steps": "STEPS", "batch_size": "B",
    "client_lr": "LR", "server_lr": "LR", "server_momentum": "BETA", "hidden": "W1,W2,...",
    "dirichlet_alpha": "ALPHA", "top_k_fraction": "FRACTION", "bits": "BITS",
    "dense_threshold": "ENTRIES", "chunk_size": "CLIENTS", "seeds": "S1,S2,...",
    "eval_every": "ROUNDS", "configs": "NAME,...",
}


def build_parser(prog: str = "python -m fedsim", description: str = "") -> argparse.ArgumentParser:
    width = max(len(n) for n in CONFIGURATIONS) + 2
    epilog = "configurations (--configs; parameters from --top-k, --bits, --dense-threshold):\n"
    epilog += "\n".join(f"  {n:<{width}}{d}" for n, (d, _) in CONFIGURATIONS.items())
    parser = argparse.ArgumentParser(
        prog=prog, description=textwrap.fill(description, 79), epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--quick", action="store_true",
        help="small run in seconds (smoke tests); changes the defaults shown as 'quick: ...'",
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT,
        help=f"output directory for results.json and the plots (default: {DEFAULT_OUT})",
    )
    for field, flag, parse, meaning in FLAGS:
        full, quick = getattr(FULL, field), getattr(QUICK, field)
        default = f"default: {_show(full)}"
        if quick != full:
            default += f"; quick: {_show(quick)}"
        kwargs: dict[str, Any] = {"type": parse, "default": None, "dest": field,
                                  "metavar": METAVARS.get(field), "help": f"{meaning} ({default})"}
        if field == "data":
            kwargs["choices"] = DATASETS
        parser.add_argument(flag, **kwargs)
    return parser


def parse_settings(
    argv: Sequence[str] | None, parser: argparse.ArgumentParser | None = None
) -> tuple[argparse.Namespace, Settings]:
    """Parses the command line: `--quick` picks the base settings, every flag overrides one."""
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    base = QUICK if args.quick else FULL
    given = {f: getattr(args, f) for f, *_ in FLAGS if getattr(args, f) is not None}
    settings = dataclasses.replace(base, **given)
    if settings.cohort > settings.num_clients:
        parser.error(
            f"--cohort must be at most --clients ({settings.num_clients}), got {settings.cohort}"
        )
    if settings.chunk_size is not None and settings.chunk_size > settings.cohort:
        settings = dataclasses.replace(settings, chunk_size=None)
    return args, settings
