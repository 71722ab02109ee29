"""Per-client error-feedback residuals for N clients, gathered and scattered by client id.

A round samples a cohort of C << N clients; each brings the residual it left last time it was
sampled, whatever its position in the cohort ("stateful clients").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedkernels import _validate

RESIDUAL_DTYPES = ("float32", "bfloat16")


class ResidualState(NamedTuple):
    residuals: jax.Array  # shape=[N, d], dtype=float32 or bfloat16: one row per client id


class ResidualStore(NamedTuple):
    """What `residual_store` returns: functions over a `ResidualState` (`scatter` consumes
    the state it is given unless the store was made with `donate=False`)."""

    init: Callable[[], ResidualState]
    gather: Callable[[ResidualState, Any], jax.Array]
    scatter: Callable[[ResidualState, Any, Any], ResidualState]
    nbytes: int  # memory of the state: N * d * itemsize


def residual_memory_bytes(num_clients: int, d: int, dtype: Any = jnp.float32) -> int:
    """Bytes the store holds: `num_clients * d * itemsize` (4 for float32, 2 for bfloat16).

    >>> residual_memory_bytes(10_000, 100_000, "bfloat16") / 2**30  # doctest: +ELLIPSIS
    1.86...
    """
    return int(num_clients) * int(d) * jnp.dtype(dtype).itemsize


def _check_ids(client_ids: Any, num_clients: int) -> jax.Array:
    """int32 ids: checked when concrete; when traced, every id outside `[0, num_clients)`
    (tested in its own dtype, before the cast) becomes -1, which gather and scatter skip."""
    ids = _validate.integer("client_ids", client_ids)
    if ids.ndim != 1:
        raise ValueError(f"client_ids must be [C], got shape {tuple(ids.shape)}")
    if not _validate.is_concrete(ids):
        return jnp.where(_validate.in_range(ids, num_clients), ids.astype(jnp.int32), -1)
    if ids.size:
        host = np.asarray(ids)
        if host.min() < 0 or host.max() >= num_clients:
            bad = host.min() if host.min() < 0 else host.max()
            raise ValueError(f"client_ids must be in [0, {num_clients - 1}], got {bad}")
        duplicates = host.size - np.unique(host).size
        if duplicates:
            raise ValueError(
                f"client_ids must be distinct within a cohort, got {duplicates} duplicate(s)"
            )
    return ids.astype(jnp.int32)


def residual_store(
    num_clients: int, d: int, dtype: Any = "float32", *, donate: bool = True
) -> ResidualStore:
    """Error-feedback residuals for `num_clients` clients, each a vector of length `d`.

    Stich et al. 2018 keep one memory vector per worker; in federated learning a client's
    memory must follow its id across rounds in which it is not sampled.

    By default `scatter` updates the store in place: it donates the `[N, d]` buffer of the
    state it is given to the state it returns, so a round writes only the cohort's C rows.
    Without donation every round copies the whole store and holds it twice at the peak
    (bench case `residual_store_update` in `python -m bench --suite pipeline`).
    The state passed to a donating `scatter` is consumed: use the returned one, as in
    `state = store.scatter(state, ...)`; using the old one raises `ValueError`. Pass
    `donate=False` to keep every state valid (pure, at the cost of that copy).

    Args:
      num_clients: static int >= 1, N (all clients, not the cohort).
      d: static int >= 0, the residual length (`Compressor.layout.sparse_size`).
      dtype: "float32" (exact) or "bfloat16" (half the memory; each store rounds to nearest
        bfloat16, about 3 significant digits, so error-feedback conservation then holds only to
        that precision).
      donate: keyword, whether `scatter` reuses (and so invalidates) the buffer of the state
        it is given (default True; see above). Under an outer `jax.jit` nothing is donated:
        the outer function's own `donate_argnums` decide.

    Returns:
      `ResidualStore(init, gather, scatter, nbytes)`:
      `init() -> ResidualState` of zeros, `[N, d]`, `nbytes = N * d * itemsize`;
      `gather(state, client_ids[C]) -> float32 [C, d]`, row c is client `client_ids[c]`'s;
      `scatter(state, client_ids[C], residuals[C, d]) -> ResidualState` with those rows
      replaced. Both are jitted; `gather` is pure, and so is `scatter` with `donate=False`.

    Client ids out of `[0, N)`: with concrete ids, `gather` and `scatter` raise. Under `jit`
    (traced ids, e.g. a cohort padded with -1) such an id is a padding slot: `gather` returns
    a row of zeros for it and `scatter` skips its row, so no other client's residual is read
    or overwritten.

    Raises:
      ValueError: `num_clients` < 1, `d` < 0, unknown dtype; at call time (concrete ids)
        ids out of `[0, N)` or repeated within a cohort (under `jit` duplicates keep one of
        the rows, unspecified which); a state already consumed by a donating `scatter`, or
        one not of this store's shape and dtype.
      TypeError: a state that is not a `ResidualState`.

    >>> import jax.numpy as jnp
    >>> store = residual_store(5, 3)
    >>> state = store.scatter(store.init(), jnp.array([4, 1]), jnp.ones((2, 3)))
    >>> store.gather(state, jnp.array([1, 0, 4]))[:, 0]
    Array([1., 0., 1.], dtype=float32)
    """
    num_clients = _validate.static_int("num_clients", num_clients, 1)
    d = _validate.static_int("d", d, 0)
    if not isinstance(donate, bool):
        raise TypeError(f"donate must be a bool, got {donate!r}")
    if not _is_dtype(dtype) or str(jnp.dtype(dtype)) not in RESIDUAL_DTYPES:
        raise ValueError(f"dtype must be one of {RESIDUAL_DTYPES}, got {dtype!r}")
    dtype = jnp.dtype(dtype)

    def init() -> ResidualState:
        return ResidualState(jnp.zeros((num_clients, d), dtype))

    # `ids` come from `_check_ids`: each in [0, N), or -1 for a padding slot under jit. Both
    # functions map -1 explicitly, since JAX indexing would wrap it to row N - 1.
    @jax.jit
    def _gather(residuals, ids):
        present = ids >= 0
        rows = jnp.take(residuals, jnp.where(present, ids, 0), axis=0)
        return jnp.where(present[:, None], rows.astype(jnp.float32), 0)

    def _scatter_rows(residuals, ids, rows):
        ids = jnp.where(ids >= 0, ids, num_clients)  # past the last row: dropped
        return residuals.at[ids].set(rows.astype(dtype), mode="drop")

    _scatter = jax.jit(_scatter_rows, donate_argnums=(0,) if donate else ())

    def gather(state: ResidualState, client_ids: Any) -> jax.Array:
        _check_state(state, num_clients, d, dtype)
        return _gather(state.residuals, _check_ids(client_ids, num_clients))

    def scatter(state: ResidualState, client_ids: Any, residuals: Any) -> ResidualState:
        _check_state(state, num_clients, d, dtype)
        ids = _check_ids(client_ids, num_clients)
        rows = _validate.floating("residuals", residuals)
        _validate.same_shape("residuals", rows, (ids.shape[0], d), "[C, d]")
        return ResidualState(_scatter(state.residuals, ids, rows))

    return ResidualStore(init, gather, scatter, residual_memory_bytes(num_clients, d, dtype))


def _check_state(state: Any, num_clients: int, d: int, dtype: jnp.dtype) -> None:
    """`state` is a live `ResidualState` of this store: `[N, d]` in its dtype (another
    store's state would read NaN rows past its end and drop writes to them)."""
    if not isinstance(state, ResidualState):
        raise TypeError(
            f"state must be the ResidualState of this store (store.init() or what scatter "
            f"returned), got {type(state).__name__}"
        )
    residuals = state.residuals
    shape, got_dtype = tuple(getattr(residuals, "shape", ())), getattr(residuals, "dtype", None)
    if shape != (num_clients, d) or got_dtype != dtype:
        raise ValueError(
            f"state must hold this store's residuals, {dtype}[{num_clients}, {d}] "
            f"(num_clients x d), got {got_dtype}{list(shape)}"
        )
    _check_live(state)


def _check_live(state: ResidualState) -> None:
    residuals = state.residuals
    if isinstance(residuals, jax.Array) and _validate.is_concrete(residuals):
        if residuals.is_deleted():
            raise ValueError(
                "state was consumed by an earlier scatter, which updates the store in place: "
                "use the state that scatter returned (state = store.scatter(state, ...)), or "
                "make the store with donate=False to keep old states"
            )


def _is_dtype(dtype: Any) -> bool:
    try:
        jnp.dtype(dtype)
    except TypeError:
        return False
    return True
