"""Loop helpers shared by the kernels that accumulate client rows in order."""

from __future__ import annotations

from typing import Any

from jax import lax

# Client rows added per loop step. One fusion per step reads these rows together with the
# accumulator: a few rows per step keep the accumulator block in cache between rows, while one
# row per step, or many more, run slower on XLA:CPU (bench case `masked_mean`).
ROWS_PER_STEP = 10


def fold_rows(add_row: Any, init: Any, num_rows: int, rows_per_step: int = ROWS_PER_STEP) -> Any:
    """`add_row(... add_row(add_row(init, 0), 1) ..., num_rows - 1)`, rows in order: a
    `fori_loop` whose steps add `rows_per_step` rows each (unrolled, so that one fusion per
    step reads those rows together with the accumulator), then the leftover rows."""

    def step(index, acc):
        for i in range(rows_per_step):
            acc = add_row(acc, index * rows_per_step + i)
        return acc

    num_steps = num_rows // rows_per_step
    acc = lax.fori_loop(0, num_steps, step, init) if num_steps else init
    for row in range(num_steps * rows_per_step, num_rows):
        acc = add_row(acc, row)
    return acc
