"""Error feedback with TFF: the client encoder, and a FedAvg round with per-client residuals.

TFF aggregators keep state on the server only, but error feedback (Stich et al. 2018; Lin et
al. 2018, DGC) keeps a residual per client: what top-k did not send this round is added to the
client's next update. With TFF's stateless clients, the Python driver holds the residuals,
keyed by client id, and passes the sampled clients' residuals in as a CLIENTS-placed value;
the round returns the new ones, also CLIENTS-placed ("stateful clients" pattern).

Example (a least-squares model; the test runs this code)::

    import numpy as np, tensorflow as tf, tensorflow_federated as tff
    from fedkernels.tff import build_error_feedback_round, ClientResiduals

    model_type = tff.TensorType(np.float32, [8])
    data_type = tff.types.to_type(
        (tff.TensorType(np.float32, [16, 8]), tff.TensorType(np.float32, [16])))

    @tff.tensorflow.computation(model_type, data_type)
    def client_update(weights, data):          # one local gradient step; update = delta
        features, labels = data
        error = tf.linalg.matvec(features, weights) - labels
        gradient = tf.linalg.matvec(features, error, transpose_a=True) / 16.0
        return -0.1 * gradient, tf.constant(16.0)

    round_fn = build_error_feedback_round(client_update, model_type, data_type, k=2)
    residuals = ClientResiduals(round_fn.d)
    for ids in [[0, 1, 2], [1, 2, 3]]:       # sampled client ids per round
        model, new_residuals, metrics = round_fn(
            model, [data[i] for i in ids], residuals.get(ids))
        residuals.put(ids, new_residuals)
"""

from __future__ import annotations

import collections
from typing import Any

import numpy as np

import fedkernels as fk
from fedkernels.tff import _kernels as kernels
from fedkernels.tff import _staging
from fedkernels.tff._staging import staged, tff
from fedkernels.tff._top_k import sparse_masked_mean_process


def error_feedback_encoder(value_type: Any, *, k: int | None = None,
                           fraction: float | None = None) -> Any:
    """The client side of top-k with error feedback, as a `tff.tensorflow.computation`.

    `(update: value_type, residual: float[d]) -> (values: float[k], indices: int32[k],
    new_residual: float[d])`, where the update is flattened with `fedkernels.flatten` (d is its
    total size, float the promoted dtype) and the result equals
    `fedkernels.top_k_with_feedback(flat, residual, k)` bit for bit (ascending indices),
    computed by the convertible variant in `_kernels.top_k_with_feedback` (no sort).
    Invariant: `scatter(values, indices, d) + new_residual == flat + residual`.
    The computation has attributes `d` and `k`. Pass exactly one of `k` and `fraction`.
    """
    kernels.check_k(k, fraction)
    layout = _staging._Layout(value_type)
    k = kernels.resolve_k(layout.d, k, fraction)

    @tff.tensorflow.computation(value_type, layout.flat_type)
    def encode(update, residual):
        def fn(update, residual):
            flat, _ = fk.flatten(update, dtype=layout.flat_dtype)
            return kernels.top_k_with_feedback(flat, residual, k)

        return staged(fn, layout.x64)(update, residual)

    encode.d, encode.k = layout.d, k
    return encode


class ErrorFeedbackRound:
    """A FedAvg round with top-k error feedback; call it from the Python driver.

    `round_fn(model, client_data, residuals) -> (new_model, new_residuals, measurements)`:
    `model` the server model (a value of `model_type`), `client_data` a list (one entry per
    sampled client) of `data_type` values, `residuals` a list of `float[d]` (the same clients'
    residuals, zeros for a newcomer; see `ClientResiduals`). Each client runs `client_update`
    (a `tff.tensorflow.computation (model, data) -> (update, weight)`, the update being the
    model delta), encodes `update + residual` with `error_feedback_encoder`, and sends top-k;
    the server takes the masked weighted mean (`sparse_masked_mean_process`) and applies
    `model + server_learning_rate * mean`. Attributes: `d`, `k`, `computation` (the
    federated computation).
    """

    def __init__(self, client_update: Any, model_type: Any, data_type: Any, *,
                 k: int | None = None, fraction: float | None = None,
                 server_learning_rate: float = 1.0):
        layout = _staging._Layout(model_type)
        encoder = error_feedback_encoder(model_type, k=k, fraction=fraction)
        self.d, self.k, self.dtype = layout.d, encoder.k, layout.flat_dtype
        weight_type = client_update.type_signature.result[1]
        mean_process = sparse_masked_mean_process(
            self.d, self.k, layout.flat_dtype, weight_type
        )
        rate = float(server_learning_rate)

        @tff.tensorflow.computation(model_type, data_type, layout.flat_type)
        def client_fn(model, data, residual):
            update, weight = client_update(model, data)
            values, indices, new_residual = encoder(update, residual)
            return (values, indices), weight, new_residual

        @tff.tensorflow.computation(model_type, layout.flat_type)
        def apply_fn(model, mean):
            def fn(model, mean):
                flat, _ = fk.flatten(model, dtype=layout.flat_dtype)
                return layout.unflatten(flat + (rate * mean).astype(flat.dtype))

            return staged(fn, layout.x64)(model, mean)

        @tff.federated_computation(
            tff.FederatedType(model_type, tff.SERVER),
            tff.FederatedType(data_type, tff.CLIENTS),
            tff.FederatedType(layout.flat_type, tff.CLIENTS),
        )
        def round_comp(model, data, residual):
            sparse, weight, new_residual = tff.federated_map(
                client_fn, (tff.federated_broadcast(model), data, residual)
            )
            output = mean_process.next(mean_process.initialize(), sparse, weight)
            new_model = tff.federated_map(apply_fn, (model, output.result))
            return new_model, new_residual, output.measurements

        self.computation = round_comp

    def __call__(self, model: Any, client_data: list, residuals: list) -> tuple[Any, list, Any]:
        if len(client_data) != len(residuals):
            raise ValueError(
                f"client_data and residuals must have one entry per client, got "
                f"{len(client_data)} and {len(residuals)}"
            )
        return self.computation(model, client_data, residuals)


def build_error_feedback_round(client_update: Any, model_type: Any, data_type: Any, *,
                               k: int | None = None, fraction: float | None = None,
                               server_learning_rate: float = 1.0) -> ErrorFeedbackRound:
    """An `ErrorFeedbackRound` (see there)."""
    return ErrorFeedbackRound(client_update, model_type, data_type, k=k, fraction=fraction,
                              server_learning_rate=server_learning_rate)


class ClientResiduals:
    """The driver-side store of error-feedback residuals, keyed by client id.

    `get(ids)` returns one `float[d]` per id (zeros for an id not seen yet), each a copy, so
    changing it leaves the store unchanged; `put(ids, residuals)` stores the round's new
    residuals (copies). Repeated ids in one call raise a ValueError, in both (as
    `fedkernels.residual_store` does): a client takes part at most once per round. Plain
    numpy, in the driver's memory.
    """

    def __init__(self, d: int, dtype: Any = np.float32):
        self.d, self.dtype = int(d), np.dtype(dtype)
        self._store: dict[Any, np.ndarray] = collections.OrderedDict()

    def get(self, client_ids: list) -> list[np.ndarray]:
        _check_unique(client_ids)
        return [
            self._store[i].copy() if i in self._store else np.zeros(self.d, self.dtype)
            for i in client_ids
        ]

    def put(self, client_ids: list, residuals: list) -> None:
        _check_unique(client_ids)
        if len(client_ids) != len(residuals):
            raise ValueError(
                f"one residual per client id: got {len(client_ids)} ids, {len(residuals)} residuals"
            )
        for i, r in zip(client_ids, residuals, strict=True):
            r = np.array(r, self.dtype)  # a copy: the caller's array stays the caller's
            if r.shape != (self.d,):
                raise ValueError(
                    f"residual for client {i!r} must have shape ({self.d},), got {r.shape}"
                )
            self._store[i] = r

    def __len__(self) -> int:
        return len(self._store)

    def __contains__(self, client_id: Any) -> bool:
        return client_id in self._store


def _check_unique(client_ids: list) -> None:
    seen, repeated = set(), []
    for i in client_ids:
        if i in seen and i not in repeated:
            repeated.append(i)
        seen.add(i)
    if repeated:
        raise ValueError(
            f"client_ids must be distinct (a client takes part once per round), got "
            f"{repeated} more than once"
        )
