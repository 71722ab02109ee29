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


def test(args: list[str]) -> None:
    python = locked_python()
    call([python, "-m", "ruff", "check", "."])
    log("stack 1/2: locked TFF stack (Python 3.11, TFF 0.87, jax 0.4.30): all tests")
    versions(python)
    call([python, "-m", "pytest", *args], env=base_env())
    log("stack 2/2: newest jax, numpy 2, no TensorFlow: core tests, TFF tests skipped")
    python = latest_python()
    versions(python)
    call([python, "-m", "pytest", *args], env=base_env())


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
