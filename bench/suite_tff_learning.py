"""tff.learning suite: one FedAvg round, stock TFF against fedkernels.tff.build_weighted_fed_avg.

A Keras Dense(n -> n) model (n=1000: 1,001,000 parameters), C=100 clients, each with one
batch of 2 examples (so the round is bound by moving and aggregating updates, not by
training), client SGD. Interleaved round by round in this process, each process advancing
its own state:
  stock                tff.learning.algorithms.build_weighted_fed_avg (MeanFactory), all in
                       TFF's worker
  stock + staged ...   the same stock process with model_aggregator= a fedkernels.tff staged
                       factory, against stock with the TFF factory it replaces:
                       MaskedMeanFactory() vs the default MeanFactory(), compression_aggregator()
                       vs tff.learning.compression_aggregator() (target <= 1.0x each)
  bridge, files        fedkernels.tff.build_weighted_fed_avg(): client work in TFF, updates
                       written by the worker to /dev/shm files, mean in JAX, server step in TF
  bridge, tff values   the same with update_transport="tff" (updates as CLIENTS-placed
                       results through TFF's runtime)
  bridge, top-k 1% EF  files transport, top_k_fraction=0.01, error_feedback=True, ids sampled
                       from 2C each round
  client work only     TFF's broadcast + client work, returning only the metrics and the
                       summed client weight: what any TFF round spends before aggregation
The stock-process rows also report the numbers one client sends through the model aggregator
for the model's trainable weights, counted TFF's way (`_common.aggregated_scalar_count`),
against the replaced factory's. The bridge rows also report where their time went
(`BridgedFedAvgProcess.last_round_seconds`, medians over the timed rounds). --quick: n=300, C=10.
"""

from __future__ import annotations

import statistics
import sys

import numpy as np

from bench import _common

TARGET_SPEEDUP = 2.0  # bridge round vs stock round (issue 22 item 4)
TARGET_RATIO = 1.0  # stock round with a staged fedkernels factory vs with TFF's (issue 22 item 3)
STOCK = "stock (MeanFactory)"


def _model_fn(n: int):
    import tensorflow as tf
    import tensorflow_federated as tff

    def model_fn():
        keras_model = tf.keras.Sequential(
            [tf.keras.layers.Dense(n, input_shape=(n,), kernel_initializer="zeros")]
        )
        return tff.learning.models.from_keras_model(
            keras_model,
            input_spec=(tf.TensorSpec([None, n], tf.float32), tf.TensorSpec([None, n], tf.float32)),
            loss=tf.keras.losses.MeanSquaredError(),
        )

    return model_fn


def _client_data(n: int, clients: int) -> list:
    import tensorflow as tf

    rng = np.random.default_rng(0)
    return [
        tf.data.Dataset.from_tensor_slices(
            (rng.standard_normal((2, n), dtype=np.float32),
             rng.standard_normal((2, n), dtype=np.float32))
        ).batch(2)
        for _ in range(clients)
    ]


def _client_work_only(model_fn, optimizer):
    """Broadcast + TFF's client work, returning only metrics and the summed weight."""
    import tensorflow_federated as tff

    @tff.tensorflow.computation()
    def initial_weights():
        return tff.learning.models.ModelWeights.from_model(model_fn())

    weights_type = initial_weights.type_signature.result
    client_work = tff.learning.templates.build_model_delta_client_work(
        model_fn, optimizer, tff.learning.ClientWeighting.NUM_EXAMPLES
    )

    @tff.federated_computation(
        client_work.initialize.type_signature.result,
        tff.FederatedType(weights_type, tff.SERVER),
        client_work.next.type_signature.parameter[2],
    )
    def run(state, weights, data):
        output = client_work.next(state, tff.federated_broadcast(weights), data)
        return output.measurements, tff.federated_sum(output.result.update_weight)

    return client_work.initialize(), run, weights_type


def _model_aggregators():
    """(row name, model_aggregator, baseline row name) of the stock-process rows."""
    import tensorflow_federated as tff

    import fedkernels.tff as ft

    tff_compression = "stock + tff.learning.compression_aggregator()"
    return [
        (STOCK, tff.aggregators.MeanFactory(), STOCK),
        ("stock + staged fedkernels.tff.MaskedMeanFactory()", ft.MaskedMeanFactory(), STOCK),
        (tff_compression, tff.learning.compression_aggregator(), tff_compression),
        ("stock + staged fedkernels.tff.compression_aggregator()", ft.compression_aggregator(),
         tff_compression),
    ]


def run(ctx: _common.Context) -> list[dict]:
    from fedkernels.tff import _deps

    if not _deps.available():
        print("[bench] suite tff_learning: skipped, tensorflow-federated is not installed",
              flush=True)
        return []
    import tensorflow_federated as tff

    import fedkernels.tff as ft

    n, clients = (300, 10) if ctx.quick else (1000, 100)
    d = n * n + n
    repeats = 5
    model_fn = _model_fn(n)
    data = _client_data(n, clients)
    sgd = lambda: tff.learning.optimizers.build_sgdm(learning_rate=0.01)  # noqa: E731
    case = _common.case_name("fed_avg_round", (clients, d), np.float32)
    ctx.progress(f"{case}: building processes")

    work_state, work_only, weights_type = _client_work_only(model_fn, sgd())
    stocks, baselines, sent = {}, {}, {}
    for name, aggregator, baseline in _model_aggregators():
        stocks[name] = tff.learning.algorithms.build_weighted_fed_avg(
            model_fn, client_optimizer_fn=sgd(), model_aggregator=aggregator
        )
        baselines[name] = baseline
        try:
            sent[name] = _common.aggregated_scalar_count(
                aggregator.create(weights_type.trainable, tff.TensorType(np.float32))
            )
        except Exception as err:  # reported, not fatal
            ctx.progress(f"    {name}: numbers sent not counted: {type(err).__name__}: {err}"[:300])
    bridges = {
        "bridge, files": ft.build_weighted_fed_avg(model_fn, client_optimizer_fn=sgd()),
        "bridge, tff values": ft.build_weighted_fed_avg(
            model_fn, client_optimizer_fn=sgd(), update_transport="tff"
        ),
        "bridge, top-k 1% + EF, files": ft.build_weighted_fed_avg(
            model_fn, client_optimizer_fn=sgd(), top_k_fraction=0.01, error_feedback=True
        ),
    }
    states = {name: process.initialize() for name, process in stocks.items()}
    for name, process in bridges.items():
        states[name] = process.initialize()
    work_weights = stocks[STOCK].get_model_weights(states[STOCK])
    rng = np.random.default_rng(3)
    phases: dict[str, list[dict]] = {name: [] for name in bridges}

    def stock_round(name):
        states[name] = stocks[name].next(states[name], data).state

    def bridge_round(name):
        process = bridges[name]
        ids = None
        if process.compressor.config.error_feedback:
            ids = [int(i) for i in rng.choice(2 * clients, clients, replace=False)]
        states[name] = process.next(states[name], data, client_ids=ids).state
        phases[name].append(dict(process.last_round_seconds))

    impls = [(name, lambda name=name: stock_round(name)) for name in stocks]
    impls += [(name, lambda name=name: bridge_round(name)) for name in bridges]
    impls.append(("client work only", lambda: work_only(work_state, work_weights, data)))
    try:
        timings = _common.time_interleaved(ctx.progress, case, impls, repeats)
    finally:
        _deps.stop_local_workers()
    records = []
    for impl, timing in timings.items():
        baseline = baselines.get(impl, STOCK)
        record = {
            "case": case, "op": "fed_avg_round", "impl": impl, "baseline": baseline,
            "clients": clients, "d": d, "size": clients * d, "dtype": "float32", **timing,
            "numbers_sent": sent.get(impl),
        }
        median, base = timing.get("median"), timings[baseline].get("median")
        record["ratio_vs_baseline"] = median / base if median and base else None
        base_sent = sent.get(baseline)
        record["numbers_sent_vs_baseline"] = (
            sent[impl] / base_sent if sent.get(impl) and base_sent else None
        )
        if impl in phases and phases[impl]:
            timed = phases[impl][1:]  # the first entry is the first (compiling) call
            record["phases"] = {
                key: statistics.median(p[key] for p in timed) for key in timed[0]
            }
        records.append(record)
    _print(records)
    return records


def _print(records: list[dict]) -> None:
    rows = []
    for r in records:
        ratio = r.get("ratio_vs_baseline")
        phases = r.get("phases") or {}
        sent, sent_ratio = r.get("numbers_sent"), r.get("numbers_sent_vs_baseline")
        target = ""
        if r["impl"].startswith("bridge") and ratio:
            target = f"{1 / ratio:.2f}x faster, >= {TARGET_SPEEDUP}x: " + (
                "met" if 1 / ratio >= TARGET_SPEEDUP else "MISSED"
            )
        if r["impl"] != r["baseline"] and "staged" in r["impl"] and ratio:
            fewer = "compression" in r["impl"]  # compressing: fewer; a mean: no more
            sent_ok = sent_ratio is not None and (sent_ratio < 1 if fewer else sent_ratio <= 1)
            target = (f"time <= {TARGET_RATIO}x: " + ("met" if ratio <= TARGET_RATIO else "MISSED")
                      + f"; sent {'<' if fewer else '<='} tff: " + ("met" if sent_ok else "MISSED"))
        rows.append([
            r["impl"],
            r["baseline"] if r["impl"] != r["baseline"] else "",
            "-" if r.get("median") is None else f"{1e3 * r['median']:.0f}",
            "-" if ratio is None else f"{ratio:.2f}",
            "-" if sent is None else f"{sent:,}",
            "-" if sent_ratio is None else f"{sent_ratio:.3f}",
            *(f"{1e3 * phases[k]:.0f}" if k in phases else "-" for k in (
                "tff_computation", "read_updates", "aggregation", "server_update")),
            target or (r.get("error") or "")[:40],
        ])
    header = ["impl", "baseline", "median ms", "x baseline", "sent/client", "x sent",
              "tff comp ms", "read ms", "aggregate ms", "server ms", "target"]
    print(f"case {records[0]['case']} (median of {records[0].get('repeats')} interleaved rounds)")
    print(_common.format_table(rows, header), flush=True)
    sys.stdout.flush()
