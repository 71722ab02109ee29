"""Data: a stratified train/test split, and the training part split non-IID over clients.

`digits` is scikit-learn's 8x8 handwritten digits (1,797 images, shipped with scikit-learn, no
download); `synthetic` is 10 Gaussian classes in 64 dimensions drawn with NumPy, for machines
without scikit-learn and for tests. The non-IID split follows Hsu et al. 2019: each class is
divided over the clients in Dirichlet(alpha) proportions.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

NUM_CLASSES = 10
MIN_EXAMPLES_PER_CLIENT = 2
TEST_FRACTION = 0.2


class ClientData(NamedTuple):
    x: np.ndarray  # shape=[S, N, M, 64], dtype=float32: each client's examples, zero-padded
    y: np.ndarray  # shape=[S, N, M], dtype=int32
    count: np.ndarray  # shape=[S, N], dtype=int32: real examples per client (>= 2)
    x_test: np.ndarray  # shape=[S, T, 64], dtype=float32
    y_test: np.ndarray  # shape=[S, T], dtype=int32


def load_examples(name: str) -> tuple[np.ndarray, np.ndarray]:
    """All examples of a data set: x float32 [n, 64] in [0, 1] (digits), y int32 [n]."""
    if name == "digits":
        try:
            from sklearn.datasets import load_digits
        except ImportError as err:
            raise RuntimeError(
                "--data digits needs scikit-learn (the `sim` extra); "
                "--data synthetic runs without it"
            ) from err
        x, y = load_digits(return_X_y=True)
        return (x / 16.0).astype(np.float32), y.astype(np.int32)
    if name == "synthetic":
        rng = np.random.default_rng(12345)  # one fixed data set; seeds vary the split only
        means = rng.normal(0.0, 0.35, (NUM_CLASSES, 64))
        y = np.repeat(np.arange(NUM_CLASSES), 180)
        x = means[y] + rng.normal(0.0, 1.0, (y.size, 64))
        return x.astype(np.float32), y.astype(np.int32)
    raise ValueError(f"data must be 'digits' or 'synthetic', got {name!r}")


def stratified_split(
    y: np.ndarray, rng: np.random.Generator, test_fraction: float = TEST_FRACTION
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, test): `round(test_fraction * n_c)` examples of each class c to test."""
    train, test = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_test = int(round(test_fraction * idx.size))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def dirichlet_split(
    y: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """Example indices per client: class c goes to clients in Dirichlet(alpha) proportions.

    With many clients and few examples, some clients draw fewer than two; they then take
    examples from the largest clients, one at a time, so every client can form a minibatch
    and the split stays as skewed as the draw made it elsewhere.
    """
    if num_clients * MIN_EXAMPLES_PER_CLIENT > y.size:
        raise ValueError(
            f"num_clients must be at most {y.size // MIN_EXAMPLES_PER_CLIENT} for "
            f"{y.size} training examples ({MIN_EXAMPLES_PER_CLIENT} each), got {num_clients}"
        )
    owners: list[list[int]] = [[] for _ in range(num_clients)]
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        shares = rng.dirichlet(np.full(num_clients, alpha))
        cuts = (np.cumsum(shares)[:-1] * idx.size).astype(int)
        for client, part in enumerate(np.split(idx, cuts)):
            owners[client].extend(part.tolist())
    sizes = np.array([len(o) for o in owners])
    for client in np.flatnonzero(sizes < MIN_EXAMPLES_PER_CLIENT):
        while len(owners[client]) < MIN_EXAMPLES_PER_CLIENT:
            donor = int(np.argmax([len(o) for o in owners]))
            owners[client].append(owners[donor].pop())
    return [np.asarray(o, np.int64) for o in owners]


def federated_data(
    name: str, num_clients: int, alpha: float, seeds: tuple[int, ...]
) -> ClientData:
    """One split per seed (its own test split and client split), stacked on a leading axis."""
    x, y = load_examples(name)
    per_seed = []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        train, test = stratified_split(y, rng)
        owners = dirichlet_split(y[train], num_clients, alpha, rng)
        per_seed.append((train, test, owners))
    width = max(len(o) for _, _, owners in per_seed for o in owners)
    s, t = len(seeds), per_seed[0][1].size
    cx = np.zeros((s, num_clients, width, x.shape[1]), np.float32)
    cy = np.zeros((s, num_clients, width), np.int32)
    count = np.zeros((s, num_clients), np.int32)
    x_test = np.zeros((s, t, x.shape[1]), np.float32)
    y_test = np.zeros((s, t), np.int32)
    for i, (train, test, owners) in enumerate(per_seed):
        for client, own in enumerate(owners):
            cx[i, client, : own.size] = x[train[own]]
            cy[i, client, : own.size] = y[train[own]]
            count[i, client] = own.size
        x_test[i], y_test[i] = x[test], y[test]
    return ClientData(cx, cy, count, x_test, y_test)
