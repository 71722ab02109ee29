"""FedAvg with server momentum, every upload through `fedkernels.compressor`, several seeds.

A round, per seed: sample a cohort of C of the N clients without replacement; each runs local
SGD from the server model (all clients at once, `vmap`); their model deltas go through
`comp.round` (with error feedback, each client's residual follows its id in a
`fedkernels.residual_store`); the server applies the weighted mean delta with momentum
(FedAvgM, Hsu et al. 2019). The seeds run in lockstep, one jitted call per step and seed:
sampling and local training, and the server step, compile once for every seed and
configuration; the uploads go through `comp.round`, compiled once per configuration.
Uses only fedkernels' public API.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import fedkernels as fk
from fedsim.data import NUM_CLASSES, ClientData
from fedsim.settings import Settings, compressor_options


def init_mlp(key: jax.Array, sizes: tuple[int, ...]) -> dict[str, jax.Array]:
    """He-initialised weights `w{i}: [sizes[i], sizes[i+1]]`, zero biases `b{i}`."""
    params = {}
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        key, sub = jax.random.split(key)
        scale = jnp.sqrt(2.0 / fan_in)
        params[f"w{i}"] = jax.random.normal(sub, (fan_in, fan_out), jnp.float32) * scale
        params[f"b{i}"] = jnp.zeros((fan_out,), jnp.float32)
    return params


def mlp(params: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    layers = len(params) // 2
    for i in range(layers):
        x = x @ params[f"w{i}"] + params[f"b{i}"]
        if i < layers - 1:
            x = jax.nn.relu(x)
    return x


def cross_entropy(params: dict[str, jax.Array], x: jax.Array, y: jax.Array) -> jax.Array:
    logits = mlp(params, x)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))


def evaluate(params: dict[str, jax.Array], x: jax.Array, y: jax.Array) -> jax.Array:
    """float32[2]: (test accuracy, test cross-entropy loss)."""
    logits = mlp(params, x)
    accuracy = jnp.mean(jnp.argmax(logits, axis=1) == y)
    loss = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))
    return jnp.stack([accuracy, loss])


def model_sizes(settings: Settings, features: int) -> tuple[int, ...]:
    return (features, *settings.hidden, NUM_CLASSES)


def local_training(settings: Settings) -> Callable[..., Any]:
    """`train(params, x[C,M,F], y[C,M], count[C], ids[C], key) -> deltas, leaves [C, ...]`.

    Client c runs `local_steps` SGD steps on minibatches of `batch_size` examples drawn with
    replacement from its own `count[c]` examples, with the key `fold_in(key, ids[c])`. All
    minibatch indices are drawn before the steps: one random draw per client instead of one per
    step keeps XLA's compile time of the PRNG small.
    """
    grad = jax.grad(cross_entropy)

    def one_client(params, x, y, count, client_id, key):
        key = jax.random.fold_in(key, client_id)
        shape = (settings.local_steps, settings.batch_size)
        idx = jnp.minimum(
            (jax.random.uniform(key, shape) * count).astype(jnp.int32), count - 1
        )

        def step(p, batch):
            g = grad(p, x[batch], y[batch])
            return jax.tree_util.tree_map(lambda a, b: a - settings.client_lr * b, p, g), None

        local, _ = jax.lax.scan(step, params, idx)
        return jax.tree_util.tree_map(lambda a, b: a - b, local, params)

    return jax.vmap(one_client, in_axes=(None, 0, 0, 0, 0, None))


def sample_cohort(key: jax.Array, num_clients: int, cohort: int) -> jax.Array:
    """int32[cohort]: distinct client ids, uniformly without replacement (random-sort order)."""
    return jnp.argsort(jax.random.uniform(key, (num_clients,)))[:cohort].astype(jnp.int32)


class SeedKeys(NamedTuple):
    sample: jax.Array  # cohorts: the same sequence in every configuration of a seed
    train: jax.Array  # local minibatches
    compress: jax.Array  # stochastic rounding, random-k


class SeedRecord(NamedTuple):
    rounds: list[int]  # evaluated rounds (1-based)
    accuracy: np.ndarray  # shape=[S, E]: test accuracy per seed and evaluation
    loss: np.ndarray  # shape=[S, E]: test cross-entropy per seed and evaluation
    uploaded_bytes: np.ndarray  # shape=[S, E], int64: cumulative upload at each evaluation
    excluded_clients: np.ndarray  # shape=[S], int64: clients left out (non-finite updates)
    first_round_s: float  # the first round of all seeds, compilation included
    wall_s: float  # every round and evaluation, all seeds, compilation included


@functools.lru_cache(maxsize=8)
def _client_step(settings: Settings) -> Callable[..., Any]:
    """Jitted, one seed: sample the round's cohort and train it (all clients at once, `vmap`).

    `(params, x[N,M,F], y[N,M], count[N], keys: SeedKeys, r) -> (ids[C], deltas[C,...],
    weights[C])`. Shared by every seed and configuration of the same settings: compiles once.
    (A `vmap` over seeds as well made XLA's CPU code far slower than one call per seed.)
    """
    train = local_training(settings)

    def step(params, x, y, count, keys, r):
        ids = sample_cohort(jax.random.fold_in(keys.sample, r), settings.num_clients,
                            settings.cohort)
        deltas = train(params, x[ids], y[ids], count[ids], ids, jax.random.fold_in(keys.train, r))
        return ids, deltas, count[ids].astype(jnp.float32)

    return jax.jit(step)


@functools.lru_cache(maxsize=8)
def _server_step(settings: Settings) -> Callable[..., Any]:
    """Jitted: FedAvgM, `momentum = beta * momentum + mean_delta; params += lr * momentum`."""

    def step(params, momentum, mean_delta):
        momentum = jax.tree_util.tree_map(
            lambda m, g: settings.server_momentum * m + g, momentum, mean_delta
        )
        params = jax.tree_util.tree_map(lambda p, m: p + settings.server_lr * m, params, momentum)
        return params, momentum

    return jax.jit(step, donate_argnums=(0, 1))


_evaluate = jax.jit(evaluate)


def run_configuration(
    name: str,
    settings: Settings,
    data: ClientData,
    on_progress: Callable[[int, np.ndarray], None] | None = None,
) -> tuple[SeedRecord, fk.Compressor]:
    """Runs one configuration for every seed, rounds in lockstep; returns per-seed histories."""
    seeds = settings.seeds
    num_seeds = len(seeds)
    sizes = model_sizes(settings, data.x.shape[-1])
    keys = []
    for seed in seeds:
        init, sample, train, compress = jax.random.split(jax.random.PRNGKey(seed), 4)
        keys.append((init, SeedKeys(sample, train, compress)))
    params = [init_mlp(init, sizes) for init, _ in keys]
    momentum = [jax.tree_util.tree_map(jnp.zeros_like, p) for p in params]
    template = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params[0])
    comp = fk.compressor(template, **compressor_options(name, settings))
    error_feedback = bool(comp.config.error_feedback)
    store = fk.residual_store(settings.num_clients, comp.layout.sparse_size)
    stores = [store.init() if error_feedback else None for _ in seeds]
    client_step, server_step = _client_step(settings), _server_step(settings)
    per_seed_data = [
        tuple(jnp.asarray(a[i]) for a in (data.x, data.y, data.count, data.x_test, data.y_test))
        for i in range(num_seeds)
    ]

    rounds, evals, uploaded_at_eval = [], [], []
    uploaded_total = np.zeros(num_seeds, np.int64)
    excluded_total = np.zeros(num_seeds, np.int64)
    # [S, 2] per round: included clients, excluded; summed (as int64) at evaluations
    pending: list[jax.Array] = []
    since_eval = 0
    start = time.perf_counter()
    first_round_s = 0.0
    for r in range(settings.rounds):
        sent = []
        for s, (_, seed_keys) in enumerate(keys):
            x, y, count, _, _ = per_seed_data[s]
            ids, deltas, weights = client_step(params[s], x, y, count, seed_keys, r)
            residuals = store.gather(stores[s], ids) if error_feedback else None
            result = comp.round(
                deltas, jax.random.fold_in(seed_keys.compress, r), client_ids=ids,
                residuals=residuals, weights=weights, chunk_size=settings.chunk_size,
            )
            if error_feedback:
                stores[s] = store.scatter(stores[s], ids, result.residuals)
            params[s], momentum[s] = server_step(params[s], momentum[s], result.mean)
            sent.append(jnp.stack([result.metrics.num_included, result.metrics.num_excluded]))
        pending.append(jnp.stack(sent))
        since_eval += 1
        if r == 0:
            jax.block_until_ready(params)
            first_round_s = time.perf_counter() - start
        if since_eval == settings.eval_every or r + 1 == settings.rounds:
            metrics = np.stack([
                np.asarray(_evaluate(params[s], *per_seed_data[s][3:])) for s in range(num_seeds)
            ])  # [S, 2]: accuracy, loss
            counts = np.stack([np.asarray(p) for p in pending]).astype(np.int64).sum(0)
            uploaded_total += counts[:, 0] * comp.layout.payload_bytes
            excluded_total += counts[:, 1]
            pending = []
            rounds.append(r + 1)
            evals.append(metrics)
            uploaded_at_eval.append(uploaded_total.copy())
            if on_progress is not None:
                on_progress(since_eval, metrics)
            since_eval = 0
    wall_s = time.perf_counter() - start

    evals_arr = np.stack(evals, axis=1)  # [S, E, 2]
    record = SeedRecord(rounds, evals_arr[..., 0], evals_arr[..., 1],
                        np.stack(uploaded_at_eval, axis=1), excluded_total, first_round_s, wall_s)
    return record, comp
