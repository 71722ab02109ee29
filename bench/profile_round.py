"""Where a compressed round's time goes, op by op: `python -m bench.profile_round`.

Runs the pipeline suite's round (top-k 1% + error feedback + 8 bits, same inputs) under
`jax.profiler`, reads the trace back and prints the compiled program's top-level ops (XLA's
names: `while.N` is a loop, e.g. the per-client work or a scatter; `call.N` a parallel fusion,
e.g. a pass over `[C, d]`; `custom-call` the sample's `lax.top_k`) by time per round, with
the round's total, and beside each op the JAX operation it comes from (the `op_name` of its
HLO metadata, read from the optimized program XLA dumps into a temporary directory: a loop
or call is named by the most frequent source among the ops inside it). Writes the table as
JSON too.

On jaxlib < 0.4.32 (the old XLA:CPU runtime) ops are only traced with
`--xla_cpu_enable_xprof_traceme=true`, which this module adds to `XLA_FLAGS` before jax
starts; newer jaxlibs trace their thunks anyway. Timings under the profiler are a little
slower than without; compare ops with each other, and rounds with `--suite pipeline`.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

_DUMP = tempfile.mkdtemp(prefix="fedkernels-profile-hlo-")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + f" --xla_cpu_enable_xprof_traceme=true --xla_dump_to={_DUMP} --xla_dump_hlo_as_text"
).strip()

import jax  # noqa: E402 (XLA_FLAGS first)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import fedkernels as fk  # noqa: E402
from bench.suite_pipeline import round_inputs, round_options  # noqa: E402

# Trace events that are not ops of the compiled program (runtime, Python, profiler).
_NOT_OPS = ("Execute", "PjitFunction", "$")


_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.-]+) = .*$")
_CALLS = re.compile(r"(?:calls|body|to_apply|branch_computations|true_computation|"
                    r"false_computation)=\{?([%\w.\-, ]+)\}?")
_OP_NAME = re.compile(r'op_name="([^"]+)"(?:[^}]*?source_file="([^"]+)" source_line=(\d+))?')


def _sources(hlo: str) -> dict[str, str]:
    """Instruction name -> the JAX operation it comes from, for the optimized HLO text `hlo`:
    its own `op_name`, or for a loop, call or fusion without one, the most frequent `op_name`
    of the computations it runs (transitively)."""
    computations: dict[str, list[str]] = {}
    current = None
    for line in hlo.splitlines():
        header = re.match(r"^(?:ENTRY )?%?([\w.-]+) .*\{\s*$", line)
        if header and "=" not in line.split("{")[0]:
            current = header.group(1)
            computations[current] = []
        elif current is not None and _INSTRUCTION.match(line):
            computations[current].append(line)

    def names(computation: str, seen: set) -> collections.Counter:
        counts: collections.Counter = collections.Counter()
        if computation in seen:
            return counts
        seen.add(computation)
        for line in computations.get(computation, []):
            found = _OP_NAME.search(line)
            if found:
                counts[_short(*found.groups())] += 1
            for callee in _called(line):
                counts += names(callee, seen)
        return counts

    sources = {}
    for lines in computations.values():
        for line in lines:
            name = _INSTRUCTION.match(line).group(1)
            found = _OP_NAME.search(line)
            if found:
                sources[name] = _short(*found.groups())
                continue
            counts = collections.Counter()
            for callee in _called(line):
                counts += names(callee, set())
            if counts:
                sources[name] = counts.most_common(1)[0][0]
    return sources


def _called(line: str) -> list[str]:
    """The computations an HLO instruction runs (a fusion's, a loop's body and condition, a
    conditional's branches, a reduction's combiner)."""
    return [name.strip() for group in _CALLS.findall(line)
            for name in group.replace("%", "").split(",")]


def _short(op_name: str, source_file: str | None = None, line: str | None = None) -> str:
    """The stage (fedkernels' named scopes, e.g. `select/trial`) and primitive, without jit
    wrappers, loop plumbing or parameters, and the fedkernels source line when XLA kept it:
    `select/trial/reduce_sum fedkernels/_radix.py:128`."""
    parts = [
        p.split("[")[0] for p in op_name.split("/")
        if not p.startswith(("jit(", "vmap(", "checkpoint")) and p not in _PLUMBING
    ]
    where = "/".join(parts[-4:])
    if source_file:
        path = Path(source_file).parts
        path = path[path.index("fedkernels"):] if "fedkernels" in path else path[-2:]
        where += f" {'/'.join(path)}:{line}"
    return where


# Parts of an op_name that say how it was traced, not what it computes.
_PLUMBING = {"while", "body", "cond", "branch_0_fun", "branch_1_fun", "remat", "closed_call"}


def _program_sources() -> dict[str, str]:
    """`_sources` of the largest optimized program XLA dumped (the round's)."""
    files = sorted(Path(_DUMP).glob("*after_optimizations.txt"), key=lambda p: p.stat().st_size)
    return _sources(files[-1].read_text()) if files else {}


def profile(num_clients: int, d: int, rounds: int) -> dict:
    """Per-op milliseconds per round of the pipeline suite's round, from a profiler trace."""
    updates, residuals = map(jnp.asarray, round_inputs(num_clients, d))
    ids = jnp.arange(num_clients, dtype=jnp.int32)
    key = jax.random.PRNGKey(0)
    comp = fk.compressor({"w": jax.ShapeDtypeStruct((d,), jnp.float32)}, **round_options(d))

    def run():
        res = comp.round({"w": updates}, key, client_ids=ids, residuals=residuals)
        jax.block_until_ready((res.mean, res.residuals))

    run()  # compile
    run()  # warm buffers
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            walls = []
            for i in range(rounds):
                print(f"[profile] round {i + 1}/{rounds}", file=sys.stderr, flush=True)
                start = time.perf_counter()
                run()
                walls.append((time.perf_counter() - start) * 1e3)
        (path,) = Path(tmp).glob("**/*.trace.json.gz")
        trace = json.load(gzip.open(path))
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    ops = [
        e for e in events
        if e.get("ph") == "X" and not any(s in e.get("name", "") for s in _NOT_OPS)
    ]
    # Top-level ops only: newer runtimes also trace the ops inside a loop's body, which the
    # loop's own time already holds (nesting is told per thread; ops on different threads
    # may overlap, so their sum can exceed the wall time).
    ops.sort(key=lambda e: (e.get("pid"), e.get("tid"), e["ts"], -e["dur"]))
    total = collections.Counter()
    calls = collections.Counter()
    outer_end: dict = {}
    for event in ops:
        thread = (event.get("pid"), event.get("tid"))
        if event["ts"] < outer_end.get(thread, float("-inf")):
            continue  # inside an op already counted
        outer_end[thread] = event["ts"] + event["dur"]
        total[event["name"]] += event["dur"] / 1e3 / rounds
        calls[event["name"]] += 1
    sources = _program_sources()
    ops = [
        {"op": name, "ms_per_round": round(ms, 3), "calls_per_round": calls[name] / rounds,
         "source": sources.get(name, "")}
        for name, ms in total.most_common()
    ]
    stages: collections.Counter = collections.Counter()
    for row in ops:
        stages[_stage(row)] += row["ms_per_round"]
    return {
        "jax": jax.__version__,
        "numpy": np.__version__,
        "clients": num_clients,
        "d": d,
        "rounds": rounds,
        "options": round_options(d),
        "wall_ms_per_round": round(float(np.median(walls)), 3),
        "ops_ms_per_round": round(sum(total.values()), 3),
        "stages_ms_per_round": {k: round(v, 3) for k, v in stages.most_common()},
        "ops": ops,
    }


def _stage(row: dict) -> str:
    """The round's stage an op belongs to: the first named scope of its source, the sample's
    `lax.top_k` for the unnamed custom call of jaxlib < 0.4.32, else "other"."""
    source = row["source"]
    if not source and row["op"].startswith("custom-call"):
        return "select"  # lax.top_k of the sample: XLA dropped its metadata
    stage = source.split(" ")[0].split("/")[0]
    return stage if stage in STAGES else "other"


# The named scopes of a compressed round (fedkernels/_pipeline/encode.py, round.py).
STAGES = ("acc", "select", "gather_values", "quantize", "residual_scatter", "residual_norms",
          "server_sums")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_round", description=__doc__)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--dim", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--top", type=int, default=15, help="ops printed")
    parser.add_argument("--out", type=Path, default=Path("results/bench/profile_round.json"))
    args = parser.parse_args(argv)
    fk.host.keep_host_memory()
    try:
        result = profile(args.clients, args.dim, args.rounds)
    finally:
        shutil.rmtree(_DUMP, ignore_errors=True)
    print(f"jax {result['jax']}, C={args.clients}, d={args.dim}: round "
          f"{result['wall_ms_per_round']:.1f} ms under the profiler (median), "
          f"{result['ops_ms_per_round']:.1f} ms of traced ops per round")
    print("by stage: " + ", ".join(f"{k} {v:.1f} ms"
                                  for k, v in result["stages_ms_per_round"].items()))
    for row in result["ops"][: args.top]:
        print(f"{row['ms_per_round']:9.1f} ms  x{row['calls_per_round']:<6g} "
              f"{row['op'][:28]:28s} {row['source'][:90]}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
