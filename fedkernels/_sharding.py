"""Clients sharded over devices: a mesh axis over the cohort, partial sums reduced across it.

Each device encodes and aggregates its own clients (optionally in chunks), then the
`AggregateSums` are `psum`-ed over the client axis; the mean is computed once from the total.
The same code runs on several CPU host devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=4`), several GPUs, or several hosts after
`jax.distributed.initialize()`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, PartitionSpec

CLIENT_AXIS = "clients"


def client_mesh(devices: Iterable[Any] | None = None, axis_name: str = CLIENT_AXIS) -> Mesh:
    """A 1-D mesh over `devices` (default: all of `jax.devices()`) whose axis holds clients.

    Raises:
      TypeError: `devices` not an iterable (a list, a generator) of `jax.Device`s.
      ValueError: `devices` empty or naming a device twice.
    """
    if devices is not None and (isinstance(devices, str | bytes) or not isinstance(
            devices, Iterable)):
        raise TypeError(f"devices must be a list of jax devices, got {devices!r}")
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("devices must be non-empty, got []")
    for device in devices:
        if not isinstance(device, jax.Device):
            raise TypeError(
                f"devices must be jax devices (from jax.devices()), got {device!r} of type "
                f"{type(device).__name__}"
            )
    if len(set(devices)) != len(devices):
        raise ValueError(f"devices must be distinct, got {devices}")
    return Mesh(np.array(devices), (axis_name,))


def _shard_map(f: Callable, mesh: Mesh, in_specs: Any, out_specs: Any) -> Callable:
    # jax >= 0.6 exposes jax.shard_map (check_vma); older versions jax.experimental.shard_map
    # (check_rep). The replication check is off: outputs are psum-ed explicitly.
    if hasattr(jax, "shard_map"):
        return jax.shard_map(
            f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False
        )
    from jax.experimental.shard_map import shard_map

    return shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


def _axis(mesh: Mesh) -> str:
    if len(mesh.axis_names) != 1:
        raise ValueError(f"mesh must have one axis (the clients), got axes {mesh.axis_names}")
    return mesh.axis_names[0]


def pad_to_devices(
    mesh: Mesh,
    client_ids: jax.Array,
    residuals: jax.Array | None,
    weights: jax.Array,
    present: jax.Array,
    updates: Any,
) -> tuple[jax.Array, jax.Array | None, jax.Array, jax.Array, Any]:
    """Pads the cohort to a multiple of the device count with absent, zero-weight clients."""
    n = mesh.devices.size
    c = client_ids.shape[0]
    pad = (-c) % n
    if pad == 0:
        return client_ids, residuals, weights, present, updates

    def padded(a):
        return jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1))

    updates = None if updates is None else jax.tree_util.tree_map(padded, updates)
    residuals = None if residuals is None else padded(residuals)
    return padded(client_ids), residuals, padded(weights), padded(present), updates


def sharded_round(
    round_fn: Callable, mesh: Mesh, updates: Any, residuals: Any, client_ids: jax.Array,
    weights: jax.Array, present: jax.Array,
) -> tuple[Any, Any, Any]:
    """Runs `round_fn(updates, residuals, ids, weights, present) -> (sums, residuals, report)`
    on each device's slice of the cohort and sums `sums` over the client axis.

    `updates` is a pytree `[C, ...]` (sharded along C) or a function of the client ids
    (evaluated on each device for its own clients). C must divide by the device count
    (see `pad_to_devices`).
    """
    axis = _axis(mesh)
    clients = PartitionSpec(axis)
    inputs = {"ids": client_ids, "w": weights, "present": present}
    if not callable(updates):
        inputs["updates"] = updates
    if residuals is not None:
        inputs["residuals"] = residuals
    in_specs = (jax.tree_util.tree_map(lambda _: clients, inputs),)

    def local(x):
        upd = updates if callable(updates) else x["updates"]
        sums, new_res, report = round_fn(
            upd, x.get("residuals"), x["ids"], x["w"], x["present"]
        )
        sums = jax.tree_util.tree_map(lambda s: lax.psum(s, axis), sums)
        return sums, new_res, report

    out_specs = (PartitionSpec(), clients, clients)
    return _shard_map(local, mesh, in_specs, out_specs)(inputs)
