"""FedAvg for `tff.learning` users with the aggregation in JAX: the client work runs in TFF.

`build_weighted_fed_avg` takes the arguments of
`tff.learning.algorithms.build_weighted_fed_avg` and builds the same learning process from
TFF's own building blocks (the broadcast distributor, `build_model_delta_client_work`, the
server optimizer of `build_apply_optimizer_finalizer`), except that the clients' model deltas
leave TFF's worker and are aggregated by JAX in the Python driver, where the fedkernels
kernels run at full speed (TFF 0.87's worker runs only TensorFlow). That is also where
per-client state can live: top-k with error feedback keeps each client's residual under its
client id across rounds, whichever clients are sampled (`next(state, data, client_ids=ids)`).

One round (`next`):
  1. one TFF computation: broadcast the model, run the client work (local training), return
     the client metrics and every client's update and weight to the driver (`update_transport`);
  2. the aggregate delta of the stacked updates: `compressor.round` (weights, residuals by
     client id, keys) with compression options, a weighted mean (`_weighted_mean`) without;
  3. the server optimizer step (`server_optimizer_fn.next`, rejecting a non-finite update as
     TFF's finalizer does) as a `tf.function` in the driver.
"""

from __future__ import annotations

import atexit
import collections
import os
import shutil
import tempfile
import time
from collections.abc import Hashable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import fedkernels as fk
from fedkernels.tff import _deps
from fedkernels.tff import _kernels as kernels

tf = _deps.tf()
tff = _deps.tff()
_deps.stop_local_workers_at_exit()

UPDATE_TRANSPORTS = ("files", "tff")


class _Leaf(NamedTuple):
    shape: tuple[int, ...]
    dtype: np.dtype
    size: int


def _leaves_of(update_type: Any) -> list[_Leaf]:
    leaves = []
    for tensor_type in _flatten_type(update_type):
        shape = tuple(int(s) for s in tensor_type.shape)
        dtype = np.dtype(tensor_type.dtype.type)
        leaves.append(_Leaf(shape, dtype, int(np.prod(shape, dtype=np.int64))))
    return leaves


def _flatten_type(type_spec: Any) -> list[Any]:
    """The TensorTypes of a (nested) StructType in `tf.nest.flatten` order."""
    if isinstance(type_spec, tff.TensorType):
        return [type_spec]
    return [t for element in type_spec for t in _flatten_type(element)]


class _ResidualTable(collections.abc.Mapping):
    """Error-feedback residuals by client id: an immutable mapping id -> float32[d_s].

    Each round builds a new table (the untouched rows are shared, not copied), so every state
    a `next` returned stays valid, as TFF states are values.
    """

    def __init__(self, d: int, rows: dict | None = None):
        self.d = int(d)
        self._rows = dict(rows or {})

    def __getitem__(self, client_id: Hashable) -> np.ndarray:
        return self._rows[client_id]

    def __iter__(self):
        return iter(self._rows)

    def __len__(self) -> int:
        return len(self._rows)

    def gather(self, client_ids: Sequence[Hashable]) -> np.ndarray:
        """float32[C, d]: the clients' residuals, zeros for a client not seen yet."""
        out = np.zeros((len(client_ids), self.d), np.float32)
        for row, client_id in enumerate(client_ids):
            if client_id in self._rows:
                out[row] = self._rows[client_id]
        return out

    def replace(self, client_ids: Sequence[Hashable], residuals: np.ndarray) -> _ResidualTable:
        rows = dict(self._rows)
        for row, client_id in enumerate(client_ids):
            # A copy per row: a view would keep the whole cohort's [C, d] buffer alive for as
            # long as any one of its clients is not sampled again.
            rows[client_id] = np.array(residuals[row], np.float32)
        return _ResidualTable(self.d, rows)

    def __repr__(self) -> str:
        return f"_ResidualTable(d={self.d}, clients={len(self)})"


def _check_client_ids(client_ids: Any, num_clients: int, required: bool) -> list | None:
    if client_ids is None:
        if required:
            raise ValueError(
                "client_ids must be given when error_feedback=True (one id per client in "
                "client_data, so that each client's residual follows it across rounds), got None"
            )
        return None
    if isinstance(client_ids, str | bytes) or not isinstance(client_ids, Sequence | np.ndarray):
        raise TypeError(f"client_ids must be a sequence of hashable ids, got {client_ids!r}")
    ids = [i.item() if isinstance(i, np.generic) else i for i in client_ids]
    if len(ids) != num_clients:
        raise ValueError(
            f"client_ids must have one id per client in client_data ({num_clients}), "
            f"got {len(ids)}"
        )
    for i in ids:
        if not isinstance(i, Hashable):
            raise TypeError(f"client_ids must be hashable, got {i!r}")
    if len(set(ids)) != len(ids):
        seen, repeated = set(), []
        for i in ids:
            if i in seen:
                repeated.append(i)
            seen.add(i)
        raise ValueError(f"client_ids must be distinct within a round, got repeats {repeated[:5]}")
    return ids


@jax.jit
def _weighted_mean(leaves: list[jax.Array], weights: jax.Array
                   ) -> tuple[list[jax.Array], jax.Array]:
    """The uncompressed round: `sum_c w_c x_c / sum_c w_c` per leaf, `[C, *shape]` to `shape`,
    in each leaf's float type (float64 when traced in 64-bit mode), and the weight summed.

    The compressor's rule for NaN/Inf (a client with any non-finite entry is left out), at the
    cost of one pass: a matrix-vector product per leaf; only when a sum comes out non-finite
    is the mean taken again without the offending clients (`fedkernels.masked_sum`). No
    client weight (all zero, or all clients left out) gives a zero mean and a zero total.
    """
    c = weights.shape[0]
    rows = [x.reshape(c, -1).astype(jnp.promote_types(x.dtype, jnp.float32)) for x in leaves]
    wide = jnp.result_type(*rows) if rows else jnp.float32
    weights = weights.astype(wide)
    sums = [weights.astype(r.dtype) @ r for r in rows]
    all_finite = jnp.all(jnp.array([jnp.all(jnp.isfinite(s)) for s in sums]))

    def without_nonfinite_clients(_):
        finite = jnp.ones((c,), jnp.bool_)
        for r in rows:
            finite &= jnp.all(jnp.isfinite(r), axis=1)
        w = jnp.where(finite, weights, 0.0)
        return [fk.masked_sum(r, w.astype(r.dtype), jnp.ones(r.shape, jnp.bool_))[0]
                for r in rows], jnp.sum(w)

    sums, total = jax.lax.cond(
        all_finite, lambda _: (sums, jnp.sum(weights)), without_nonfinite_clients, None
    )
    has = total > 0
    means = [
        jnp.where(has, s / jnp.where(has, total, 1.0).astype(s.dtype), 0.0)
        .astype(x.dtype).reshape(x.shape[1:])
        for s, x in zip(sums, leaves, strict=True)
    ]
    return means, total


def _random_ids(ids: list | None, num_clients: int) -> np.ndarray:
    """int32 ids for the compressor's per-client randomness: the client ids when they are all
    integers in int32 range, else the positions in the cohort."""
    if ids is not None and all(
        isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 2**31 for i in ids
    ):
        return np.asarray(ids, np.int32)
    return np.arange(num_clients, dtype=np.int32)


class BridgedFedAvgProcess:
    """A FedAvg learning process whose aggregation runs in JAX in the Python driver.

    Built by `build_weighted_fed_avg` (see there). It has the methods of a
    `tff.learning.templates.LearningProcess`, as plain Python calls on Python values:

    - `initialize() -> tff.learning.templates.LearningAlgorithmState`
    - `next(state, client_data, client_ids=None) -> LearningProcessOutput(state, metrics)`,
      `metrics` an OrderedDict with `distributor`, `client_work`, `aggregator`, `finalizer`
      as the stock process's; `client_ids` one hashable id per entry of `client_data`,
      needed with error feedback.
    - `get_model_weights(state) -> tff.learning.models.ModelWeights`
    - `set_model_weights(state, model_weights) -> state`

    Attributes: `compressor` (the `fedkernels.Compressor` of the aggregation),
    `update_transport`, and `last_round_seconds`, an OrderedDict of the wall time the last
    `next` spent in each phase: `tff_computation` (broadcast, client work and the updates'
    way out of TFF's worker), `read_updates` (reading or stacking them in the driver),
    `aggregation` (the JAX round, including moving the updates to the device) and
    `server_update`.
    """

    def __init__(
        self,
        *,
        initialize_fn: Any,
        client_fn: Any,
        leaves: list[_Leaf],
        compressor: fk.Compressor,
        server_optimizer: Any,
        update_transport: str,
        seed: int,
        chunk_size: int | None,
    ):
        self._initialize_fn = initialize_fn
        self._client_fn = client_fn
        self._leaves = leaves
        self.compressor = compressor
        self._server_optimizer = server_optimizer
        self.update_transport = update_transport
        self._key = jax.random.PRNGKey(seed)
        self._chunk_size = chunk_size
        config = compressor.config
        # Without compression the round is a plain weighted mean: `_weighted_mean`, one pass.
        self._compresses = (
            config.selects or config.bits is not None or config.error_feedback
            or config.aggregation != "mean"
        )
        self._directory: str | None = None
        self._buffers: dict[int, list[np.ndarray]] = {}
        self.last_round_seconds: collections.OrderedDict = collections.OrderedDict()

        @tf.function
        def server_step(optimizer_state, trainable, update):
            # As TFF's `build_apply_optimizer_finalizer`: one optimizer step, rejected (state
            # and weights kept) when the update holds NaN/Inf.
            new_state, new_weights = server_optimizer.next(optimizer_state, trainable, update)
            should_reject, measurements = tff.learning.templates.reject_non_finite_update(
                new_state, update
            )
            if should_reject:
                return optimizer_state, trainable, measurements
            return new_state, new_weights, measurements

        self._server_step = server_step

    # -- the LearningProcess methods -----------------------------------------------------------

    def initialize(self) -> Any:
        """The initial state: TFF's initial model weights and component states."""
        weights, distributor, client_work, finalizer = self._initialize_fn()
        aggregator = collections.OrderedDict(round_num=np.int32(0))
        if self.compressor.config.error_feedback:
            aggregator["residuals"] = _ResidualTable(self.compressor.layout.sparse_size)
        return tff.learning.templates.LearningAlgorithmState(
            global_model_weights=weights,
            distributor=distributor,
            client_work=client_work,
            aggregator=aggregator,
            finalizer=finalizer,
        )

    def get_model_weights(self, state: Any) -> Any:
        """The global model weights of `state` (a `tff.learning.models.ModelWeights`)."""
        return state.global_model_weights

    def set_model_weights(self, state: Any, model_weights: Any) -> Any:
        """`state` with its global model weights replaced by `model_weights`."""
        return state._replace(global_model_weights=model_weights)

    def next(self, state: Any, client_data: Sequence[Any], client_ids: Any = None) -> Any:
        """One FedAvg round over the clients in `client_data` (one dataset per client)."""
        if isinstance(client_data, str | bytes) or not isinstance(client_data, Sequence):
            raise TypeError(
                f"client_data must be a list with one dataset per client, got "
                f"{type(client_data).__name__}"
            )
        num_clients = len(client_data)
        if num_clients == 0:
            raise ValueError("client_data must hold at least one client's dataset, got none")
        error_feedback = self.compressor.config.error_feedback
        ids = _check_client_ids(client_ids, num_clients, required=error_feedback)
        seconds = collections.OrderedDict()

        start = time.perf_counter()
        if self.update_transport == "files":
            paths = self._paths(num_clients)
            (distributor_state, distributor_metrics, client_work_state, client_work_metrics,
             weights) = self._client_fn(
                state.distributor, state.global_model_weights, state.client_work,
                list(client_data), paths,
            )
            seconds["tff_computation"] = time.perf_counter() - start
            start = time.perf_counter()
            updates = self._read_updates(paths)
        else:
            (distributor_state, distributor_metrics, client_work_state, client_work_metrics,
             client_updates, weights) = self._client_fn(
                state.distributor, state.global_model_weights, state.client_work,
                list(client_data),
            )
            seconds["tff_computation"] = time.perf_counter() - start
            start = time.perf_counter()
            updates = [
                np.stack([np.asarray(leaf) for leaf in leaves])
                for leaves in zip(*(tf.nest.flatten(u) for u in client_updates), strict=True)
            ]
        seconds["read_updates"] = time.perf_counter() - start

        start = time.perf_counter()
        round_num = int(state.aggregator["round_num"])
        weights = np.asarray(weights, np.float32).reshape(num_clients)
        if self._compresses:
            residuals = state.aggregator["residuals"].gather(ids) if error_feedback else None
            result = self.compressor.round(
                updates,
                jax.random.fold_in(self._key, round_num),
                client_ids=_random_ids(ids, num_clients),
                residuals=residuals,
                weights=weights,
                chunk_size=self._chunk_size,
            )
            mean = list(result.mean)
            included = ~np.asarray(result.metrics.excluded)
            total = float(np.sum(weights[included], dtype=np.float64))
        else:
            result = None
            with kernels.x64_for(leaf.dtype for leaf in self._leaves):
                mean, total = _weighted_mean(updates, weights)
            total = float(total)
        # Each leaf in its own dtype (the compressor computes in float32). No client weight:
        # NaN, which the server step rejects, as TFF's mean of a zero total weight.
        mean = [np.asarray(x).astype(leaf.dtype) if total > 0 else np.full(leaf.shape, np.nan,
                                                                            leaf.dtype)
                for x, leaf in zip(mean, self._leaves, strict=True)]
        aggregator_state = collections.OrderedDict(round_num=np.int32(round_num + 1))
        if error_feedback:
            aggregator_state["residuals"] = state.aggregator["residuals"].replace(
                ids, np.asarray(result.residuals)
            )
        seconds["aggregation"] = time.perf_counter() - start

        start = time.perf_counter()
        model_weights = state.global_model_weights
        update = tf.nest.pack_sequence_as(model_weights.trainable, mean)
        finalizer_state, trainable, finalizer_metrics = self._server_step(
            state.finalizer, model_weights.trainable, update
        )
        to_numpy = lambda tree: tf.nest.map_structure(lambda t: t.numpy(), tree)
        new_weights = tff.learning.models.ModelWeights(
            trainable=to_numpy(trainable), non_trainable=model_weights.non_trainable
        )
        seconds["server_update"] = time.perf_counter() - start

        new_state = tff.learning.templates.LearningAlgorithmState(
            global_model_weights=new_weights,
            distributor=distributor_state,
            client_work=client_work_state,
            aggregator=aggregator_state,
            finalizer=to_numpy(finalizer_state),
        )
        metrics = collections.OrderedDict(
            distributor=distributor_metrics,
            client_work=client_work_metrics,
            aggregator=self._aggregator_metrics(result),
            finalizer=to_numpy(finalizer_metrics),
        )
        self.last_round_seconds = seconds
        return tff.learning.templates.LearningProcessOutput(new_state, metrics)

    # -- helpers -------------------------------------------------------------------------------

    def _aggregator_metrics(self, result: fk.RoundResult | None) -> collections.OrderedDict:
        # `tff.aggregators.MeanFactory()`'s measurements (empty inner sums), then, when the
        # round compresses, the compressor's.
        metrics = collections.OrderedDict(mean_value=(), mean_weight=())
        if result is not None:
            metrics.update(result.metrics.as_dict())
        return metrics

    def _paths(self, num_clients: int) -> list[str]:
        if self._directory is None or not os.path.isdir(self._directory):
            shm = "/dev/shm"
            base = shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None
            self._directory = tempfile.mkdtemp(prefix="fedkernels-updates-", dir=base)
            atexit.register(shutil.rmtree, self._directory, True)
        return [os.path.join(self._directory, f"client{c}") for c in range(num_clients)]

    def _read_updates(self, paths: list[str]) -> list[np.ndarray]:
        """Each leaf stacked over the clients, `[C, *shape]`, read from the files the clients
        wrote (a serialized TensorProto whose raw content is the file's tail)."""
        # Reused across rounds of the same cohort size: fresh buffers would be page-faulted in
        # again every round. JAX reads them within the round and keeps no reference.
        updates = self._buffers.get(len(paths))
        if updates is None:
            updates = [np.empty((len(paths), *leaf.shape), leaf.dtype) for leaf in self._leaves]
            self._buffers = {len(paths): updates}
        for c, path in enumerate(paths):
            for j, leaf in enumerate(self._leaves):
                name = f"{path}.{j}"
                nbytes = leaf.size * leaf.dtype.itemsize
                try:
                    size = os.path.getsize(name)
                except FileNotFoundError:
                    raise RuntimeError(
                        f"update file {name!r} was not written: update_transport='files' needs "
                        "TFF's worker on this machine (the default local context); use "
                        "update_transport='tff' with a remote executor"
                    ) from None
                if size < nbytes:
                    raise RuntimeError(f"update file {name!r} holds {size} bytes, < {nbytes}")
                with open(name, "rb", buffering=0) as f:
                    f.seek(size - nbytes)
                    # A row of the [C, n] view, never `updates[j][c]`: for a 0-d leaf that
                    # is a NumPy scalar, a copy that the read would fill instead.
                    row = updates[j].reshape(len(paths), -1)[c]
                    view = memoryview(row.view(np.uint8))
                    if nbytes and f.readinto(view) != nbytes:
                        raise RuntimeError(f"short read of update file {name!r}")
                os.unlink(name)
        return updates


def build_weighted_fed_avg(
    model_fn: Any,
    client_optimizer_fn: Any,
    server_optimizer_fn: Any = None,
    *,
    client_weighting: Any = None,
    model_distributor: Any = None,
    model_aggregator: Any = None,
    metrics_aggregator: Any = None,
    loop_implementation: Any = None,
    top_k_fraction: float | None = None,
    top_k_count: int | None = None,
    error_feedback: bool = False,
    bits: int | None = None,
    dense_threshold: int | None = None,
    aggregation: str = "mean",
    seed: int = 0,
    chunk_size: int | None = None,
    update_transport: str = "files",
) -> BridgedFedAvgProcess:
    """`tff.learning.algorithms.build_weighted_fed_avg`, aggregated by fedkernels in JAX.

    The arguments up to `loop_implementation` are TFF's, with TFF's meaning and defaults
    (`client_weighting` NUM_EXAMPLES, server optimizer SGD with learning rate 1.0, metrics
    `sum_then_finalize`). The client work (local training, client weights, metrics) is TFF's
    own and runs in TFF's worker; the clients' updates (model deltas, initial minus trained
    trainable weights) are aggregated in the Python driver by JAX, weighted by the client
    weights: with the compression options by `fedkernels.compressor(template,
    top_k_fraction=..., top_k_count=..., error_feedback=..., bits=..., dense_threshold=...,
    aggregation=...).round`, without them
    by a weighted mean (one matrix-vector product per leaf, the compressor's rules for
    NaN/Inf). The server optimizer step runs as a `tf.function` in the driver. With the
    defaults (no compression) the round computes what the stock process with `MeanFactory()`
    computes, up to summation order, each leaf in its dtype (float64 in float64); the
    compressor computes in float32 and returns each leaf in its dtype. A round whose client
    weights sum to 0 gives a NaN update, which the server step rejects (`update_non_finite`),
    as in the stock process. With error feedback a client of weight 0 keeps its residual.

    Differences from the stock process: `model_aggregator` is refused (the compression options
    replace it); a client whose update holds NaN/Inf is left out of the mean (counted in the
    aggregator metrics when compressing), where TFF's mean would turn the whole update
    non-finite and the finalizer would reject it.

    Args:
      model_fn, client_optimizer_fn, server_optimizer_fn, client_weighting,
        model_distributor, metrics_aggregator, loop_implementation: as TFF's.
      model_aggregator: must be None (see above).
      top_k_fraction, top_k_count, error_feedback, bits, dense_threshold, aggregation:
        `fedkernels.compressor`'s, with its defaults (global top-k over the leaves with more
        than `dense_threshold` elements, as a fraction of them or a count; residuals per
        client id; stochastic quantization).
      seed: int, the root of the quantization / random-k keys (round r uses
        `fold_in(PRNGKey(seed), r)`, then each client's id).
      chunk_size: clients per chunk of the JAX round (None: the whole cohort at once).
      update_transport: how the updates leave TFF's worker. "files": each client writes its
        update leaves (`tf.io.write_file`) into a temporary directory (under /dev/shm when
        there is one) that the driver reads and deletes; needs the worker on this machine,
        as TFF's default local context has it. "tff": as CLIENTS-placed values of the
        computation's result, through TFF's runtime (works with any executor; slower).

    Returns:
      A `BridgedFedAvgProcess`: `initialize()`, `next(state, client_data, client_ids=None)`,
      `get_model_weights(state)`, `set_model_weights(state, weights)`.

    Raises:
      ValueError: `model_aggregator` given; `update_transport` unknown; a compression option
        out of range (from `fedkernels.compressor`, naming it).
      TypeError: as TFF's builder, for arguments of the wrong kind.
    """
    if model_aggregator is not None:
        raise ValueError(
            "model_aggregator must be None: the aggregation runs in fedkernels' JAX round; "
            "choose it with top_k_fraction=, error_feedback=, bits=, aggregation= (or use "
            "tff.learning.algorithms.build_weighted_fed_avg with a fedkernels.tff factory), "
            f"got {model_aggregator!r}"
        )
    if update_transport not in UPDATE_TRANSPORTS:
        raise ValueError(
            f"update_transport must be one of {UPDATE_TRANSPORTS}, got {update_transport!r}"
        )
    seed = fk._validate.static_int("seed", seed, -(2**31), 2**31 - 1)
    if chunk_size is not None:
        chunk_size = fk._validate.static_int("chunk_size", chunk_size, 1)
    # The compression options are checked here, before the (slow) TFF computations are built;
    # `fk.compressor` below checks them again with the model's layout.
    options = dict(
        top_k_fraction=top_k_fraction, top_k_count=top_k_count, error_feedback=error_feedback,
        bits=bits, dense_threshold=dense_threshold, aggregation=aggregation,
    )
    fk.CompressorConfig(**options)
    learning = tff.learning
    if client_weighting is None:
        client_weighting = learning.ClientWeighting.NUM_EXAMPLES
    if loop_implementation is None:
        loop_implementation = learning.LoopImplementation.DATASET_REDUCE
    if metrics_aggregator is None:
        metrics_aggregator = learning.metrics.sum_then_finalize
    if server_optimizer_fn is None:
        server_optimizer_fn = learning.optimizers.build_sgdm(learning_rate=1.0)
    if not isinstance(server_optimizer_fn, learning.optimizers.Optimizer):
        raise TypeError(
            "server_optimizer_fn must be a tff.learning.optimizers.Optimizer, got "
            f"{type(server_optimizer_fn).__name__}"
        )

    functional = not callable(model_fn)
    if functional:
        if not isinstance(model_fn, learning.models.FunctionalModel):
            raise TypeError(
                "model_fn must be a no-arg callable returning a tff.learning.models."
                f"VariableModel, or a FunctionalModel, got {type(model_fn).__name__}"
            )

        @tff.tensorflow.computation()
        def initial_weights_fn():
            trainable, non_trainable = model_fn.initial_weights
            return learning.models.ModelWeights(
                tuple(tf.convert_to_tensor(w) for w in trainable),
                tuple(tf.convert_to_tensor(w) for w in non_trainable),
            )

        client_work = learning.templates.build_functional_model_delta_client_work(
            model=model_fn, optimizer=client_optimizer_fn, client_weighting=client_weighting,
            metrics_aggregator=metrics_aggregator, loop_implementation=loop_implementation,
        )
    else:

        @tff.tensorflow.computation()
        def initial_weights_fn():
            return learning.models.ModelWeights.from_model(model_fn())

        client_work = learning.templates.build_model_delta_client_work(
            model_fn=model_fn, optimizer=client_optimizer_fn, client_weighting=client_weighting,
            metrics_aggregator=metrics_aggregator, loop_implementation=loop_implementation,
        )
    weights_type = initial_weights_fn.type_signature.result
    if model_distributor is None:
        model_distributor = learning.templates.build_broadcast_process(weights_type)
    # Built for its `initialize` (the optimizer state, in TFF's own structure); its `next` is
    # replaced by the driver-side step.
    finalizer = learning.templates.build_apply_optimizer_finalizer(
        server_optimizer_fn, weights_type
    )

    @tff.federated_computation()
    def initialize_fn():
        return (
            tff.federated_eval(initial_weights_fn, tff.SERVER),
            model_distributor.initialize(),
            client_work.initialize(),
            finalizer.initialize(),
        )

    result_type = client_work.next.type_signature.result.result.member
    update_type, weight_type = result_type.update, result_type.update_weight
    leaves = _leaves_of(update_type)
    data_type = client_work.next.type_signature.parameter[2]
    server = lambda t: tff.FederatedType(t, tff.SERVER)
    parameter_types = (
        model_distributor.initialize.type_signature.result,
        server(weights_type),
        client_work.initialize.type_signature.result,
        data_type,
    )

    def train(distributor_state, weights, client_work_state, client_data):
        distributed = model_distributor.next(distributor_state, weights)
        output = client_work.next(client_work_state, distributed.result, client_data)
        return distributed, output

    if update_transport == "files":

        @tff.tensorflow.computation(update_type, weight_type, tff.TensorType(np.str_))
        def write_update(update, weight, path):
            writes = [
                tf.io.write_file(tf.strings.join([path, f".{j}"]), tf.io.serialize_tensor(x))
                for j, x in enumerate(tf.nest.flatten(update))
            ]
            with tf.control_dependencies(writes):  # the weight comes back after the writes
                return tf.identity(weight)

        @tff.federated_computation(*parameter_types, tff.FederatedType(np.str_, tff.CLIENTS))
        def client_fn(distributor_state, weights, client_work_state, client_data, paths):
            distributed, output = train(distributor_state, weights, client_work_state,
                                        client_data)
            written = tff.federated_map(
                write_update, (output.result.update, output.result.update_weight, paths)
            )
            return (distributed.state, distributed.measurements, output.state,
                    output.measurements, written)

    else:

        @tff.federated_computation(*parameter_types)
        def client_fn(distributor_state, weights, client_work_state, client_data):
            distributed, output = train(distributor_state, weights, client_work_state,
                                        client_data)
            return (distributed.state, distributed.measurements, output.state,
                    output.measurements, output.result.update, output.result.update_weight)

    template = [jax.ShapeDtypeStruct(leaf.shape, jnp.dtype(leaf.dtype)) for leaf in leaves]
    compressor = fk.compressor(template, **options)
    return BridgedFedAvgProcess(
        initialize_fn=initialize_fn,
        client_fn=client_fn,
        leaves=leaves,
        compressor=compressor,
        server_optimizer=server_optimizer_fn,
        update_transport=update_transport,
        seed=seed,
        chunk_size=chunk_size,
    )
