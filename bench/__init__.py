"""Benchmarks for fedkernels: `python -m bench --help`; method and tables in bench/README.md.

Each suite is a module `bench/suite_<name>.py` with `run(ctx) -> list[dict]` (and optionally
`plot(path, records)`); `ctx` is a `bench._common.Context`. Results go to
`<out>/<suite>.json` and, where matplotlib is installed, `<out>/<suite>.png`.
"""
