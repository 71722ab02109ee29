#!/usr/bin/env python3
"""One entry point that sets itself up: `python3 dev.py run | test | bench | lint`.

`run` runs the experiment driver `python -m fedsim` (pass its flags after `run`; `run --help`).

Needs only Python >= 3.11 and pip. On first use it creates `.venv-bootstrap` holding a pinned
uv, then lets uv build the environments:
  .venv         the locked TFF stack (uv.lock: Python 3.11, TFF 0.87, jax 0.4.30), all extras;
  .venv-latest  the newest jax and numpy 2 on the registry, no TensorFlow (what GPU machines
                run), for the core tests.
`bench` runs `python -m bench` on the locked stack, or with `--stack latest` on the newest.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
UV_VERSION = "0.13.9"
BOOTSTRAP = ROOT / ".venv-bootstrap"
LOCKED = ROOT / ".venv"
LATEST = ROOT / ".venv-latest"


def log(message: str) -> None:
    print(f"[dev] {message}", flush=True)


def bin_path(env: Path, name: str) -> Path:
    return env / ("Scripts" if os.name == "nt" else "bin") / name


def call(cmd: list[str], env: dict[str, str] | None = None) -> None:
    log("$ " + " ".join(str(c) for c in cmd))
    subprocess.run([str(c) for c in cmd], check=True, cwd=ROOT, env=env)


def uv() -> list[str]:
    """A pinned uv in its own venv, installed with pip the first time."""
    uv_bin = bin_path(BOOTSTRAP, "uv")
    if not uv_bin.exists():
        log(f"bootstrapping uv {UV_VERSION} into {BOOTSTRAP.name}")
        venv.create(BOOTSTRAP, with_pip=True, clear=True)
        call([bin_path(BOOTSTRAP, "python"), "-m", "pip", "install", "-q", f"uv=={UV_VERSION}"])
    return [str(uv_bin)]


def base_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter
    env.pop("VIRTUAL_ENV", None)
    return env


def locked_python() -> Path:
    """The locked TFF stack, synced from uv.lock (exact versions, no re-resolution)."""
    start = time.perf_counter()
    call(uv() + ["sync", "--frozen", "--all-extras", "--python", "3.11"], env=base_env())
    log(f"locked stack ready in {time.perf_counter() - start:.0f} s")
    return bin_path(LOCKED, "python")


def latest_python() -> Path:
    """The newest jax/numpy the registry serves for this Python, without TensorFlow."""
    start = time.perf_counter()
    env = base_env()
    call(uv() + ["venv", "--clear", "-q", "--python", sys.executable, str(LATEST)], env=env)
    env["VIRTUAL_ENV"] = str(LATEST)
    # --no-config: ignore pyproject's [tool.uv] jax override, which belongs to the TFF stack.
    call(
        uv()
        + ["pip", "install", "--no-config", "-q", "-e", ".[test]", "jax", "numpy>=2",
           "matplotlib"],  # matplotlib: the bench's plots on this stack too
        env=env,
    )
    log(f"newest-jax stack ready in {time.perf_counter() - start:.0f} s")
    return bin_path(LATEST, "python")


def versions(python: Path) -> None:
    code = "import jax, numpy; print('jax', jax.__version__, 'numpy', numpy.__version__)"
    call([python, "-c", code])


def run(args: list[str]) -> None:
    """`python3 dev.py run [fedsim options]`: the experiment driver `python -m fedsim`."""
    python = locked_python()
    call([python, "-m", "fedsim", *args], env=base_env())  # from ROOT: fedsim/ is importable


def second_part() -> list[str]:
    """The test files each stack runs in a second pytest process, beside the first: the
    quantizer's and the TFF adapters' tests, about a third of the locked stack's work (two
    processes per stack keep both cores busy to the end). On the newest jax (0.10.2),
    XLA:CPU also segfaults while compiling one of tests/test_quantize.py's programs when that
    file runs after the rest of the suite in one process (the file passes alone and after
    test_host or test_fedsim)."""
    tff = sorted((ROOT / "tests").glob("test_tff*.py"))
    return ["tests/test_quantize.py"] + [str(path.relative_to(ROOT)) for path in tff]


# XLA:CPU flags that cut the tests' compile time on the newest jaxlib to about a third
# (its older loop emitters instead of the MLIR fusion emitters, one LLVM module per program
# instead of modules split for parallel codegen: the same HLO programs after XLA's own
# passes). A jaxlib that does not know a flag aborts on it, so each stack gets the flags its
# XLA accepts (`xla_flags`).
FAST_COMPILE_FLAGS = (
    "--xla_cpu_use_fusion_emitters=false",
    "--xla_cpu_parallel_codegen_split_count=1",
)


def xla_flags(python: Path) -> str:
    """The FAST_COMPILE_FLAGS this stack's XLA accepts (all or none), for its test runs."""
    if "XLA_FLAGS" in os.environ:
        return os.environ["XLA_FLAGS"]
    flags = " ".join(FAST_COMPILE_FLAGS)
    probe = "import jax; jax.jit(lambda x: x + 1)(1).block_until_ready()"
    env = base_env() | {"XLA_FLAGS": flags}
    result = subprocess.run([str(python), "-c", probe], cwd=ROOT, env=env,
                            capture_output=True)
    accepted = flags if result.returncode == 0 else ""
    log(f"XLA_FLAGS for its tests: {accepted or '(none: this XLA does not know them)'}")
    return accepted


def test_env(flags: str = "") -> dict[str, str]:
    """The tests' environment: XLA compiles without its LLVM backend optimizations and with
    `flags` (`xla_flags`): the same HLO programs, after XLA's own passes, compiled in a
    fraction of the CPU time; most of the suite's time is compilation. Plain `pytest`, the
    bench and the main job compile as users do; set JAX_DISABLE_MOST_OPTIMIZATIONS=0 and
    XLA_FLAGS= to test that way here."""
    env = base_env()
    env.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
    env.setdefault("FEDKERNELS_TEST_FAST_EXIT", "1")  # see conftest.py
    if flags:
        env["XLA_FLAGS"] = flags
    return env


def start_pytest(python: Path, args: list[str], log_file, flags: str) -> subprocess.Popen:
    """pytest in the background, its output into `log_file` (printed when it is done)."""
    cmd = [str(python), "-m", "pytest", *args]
    log("$ " + " ".join(cmd) + f"  (output: {log_file.name}, shown when done)")
    return subprocess.Popen(cmd, cwd=ROOT, env=test_env(flags), stdout=log_file,
                            stderr=subprocess.STDOUT)


def test(args: list[str]) -> None:
    """Lint, then pytest on both stacks at once, in processes of their own.

    The runs overlap (and the newest stack is set up while the locked one already runs): on
    a 2-core machine they finish sooner than one after the other, since much of each run is
    single-threaded XLA compilation. Each run's output is kept apart and printed in order; a
    failure of any fails the command.
    """
    import tempfile

    python = locked_python()
    call([python, "-m", "ruff", "check", "."])
    stack1 = "stack 1/2: locked TFF stack (Python 3.11, TFF 0.87, jax 0.4.30): all tests"
    stack2 = "stack 2/2: newest jax, numpy 2, no TensorFlow: core tests, TFF tests skipped"
    runs: list[tuple[str, subprocess.Popen, object, float]] = []

    def start(title: str, stack_python: Path) -> None:
        flags = xla_flags(stack_python)
        parts = [(title, args)]
        if all(a.startswith("-") for a in args):  # the whole suite, in two processes
            second = second_part()
            parts = [(f"{title} (part 1)", args + [f"--ignore={path}" for path in second]),
                     (f"{title} (part 2: {len(second)} files)", args + second)]
        for part_title, pytest_args in parts:
            log_file = tempfile.NamedTemporaryFile("w+b", prefix="fedkernels-pytest-",
                                                   suffix=".log")
            runs.append((part_title, start_pytest(stack_python, pytest_args, log_file, flags),
                         log_file, time.perf_counter()))

    try:
        log(stack1)
        versions(python)
        start(stack1, python)
        log(stack2)
        latest = latest_python()
        versions(latest)
        start(stack2, latest)
        failed = []
        for title, proc, log_file, started in runs:
            code = proc.wait()
            log(f"{title}: pytest exited {code} after {time.perf_counter() - started:.0f} s")
            log_file.seek(0)
            sys.stdout.flush()
            output = log_file.read()
            # A run stopped mid-line (killed, timed out) must not swallow the next line.
            sys.stdout.buffer.write(output if output.endswith(b"\n") else output + b"\n")
            sys.stdout.flush()
            if code != 0:
                failed.append((title.split(":")[0], code))
        if failed:
            for name, code in failed:
                log(f"failed: {name} (pytest exit code {code})")
            sys.exit(1)
    finally:
        for _, proc, log_file, _ in runs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log_file.close()


def bench(args: list[str]) -> None:
    """`python3 dev.py bench [--stack locked|latest] [bench options]`."""
    stack = "locked"
    if "--stack" in args:
        i = args.index("--stack")
        if i + 1 >= len(args) or args[i + 1] not in ("locked", "latest"):
            raise SystemExit("--stack must be followed by 'locked' or 'latest'")
        stack = args[i + 1]
        args = args[:i] + args[i + 2 :]
    python = latest_python() if stack == "latest" else locked_python()
    versions(python)
    call([python, "-m", "bench", *args], env=base_env())


def lint(args: list[str]) -> None:
    call([locked_python(), "-m", "ruff", "check", ".", *args])


COMMANDS = {"run": run, "test": test, "bench": bench, "lint": lint}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print(__doc__)
        print("usage: python3 dev.py {" + "|".join(COMMANDS) + "} [args...]")
        sys.exit(2)
    try:
        COMMANDS[sys.argv[1]](sys.argv[2:])
    except subprocess.CalledProcessError as err:
        log(f"failed ({err.returncode}): {' '.join(str(c) for c in err.cmd)}")
        sys.exit(err.returncode or 1)


if __name__ == "__main__":
    main()
