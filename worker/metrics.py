"""Prometheus metrics of one worker: its RPCs per shard, its steps, loss and throughput.

`WorkerMetrics` owns a `CollectorRegistry` per `PSClient` (no module-level metrics).
`PSClient` records each pull and push RPC per shard (count, payload bytes, latency as
the worker sees it, waiting under the staleness bound included) and the seconds the
bound held its pulls back; the built-in trainer records each step with `step()`. All
of it is a handful of pre-labelled counter adds per RPC or step, never per chunk.

Names: `asyncps_worker_*`, labelled `worker` (and `shard` for RPCs). Serve them with
`asyncps_common.metrics_http.serve_metrics(metrics.registry, host, port)`; `ps-worker` does so
when given `--metrics-port`.

`asyncps_worker_finished` is 0 while the worker trains and 1 once it has run all its
steps (`finish()`); `wait_scraped(seconds)` then blocks until a scrape has surely
received that 1, so Prometheus knows a worker that is gone finished rather than died
(the AsyncpsWorkerDown alert in deploy/alerts.yml tells the two apart by it).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from asyncps_common.buckets import LATENCY_BUCKETS

# One iteration's times, fitted to the same measured default run (2-core VM, CPU): compute 80 ms
# (p10) .. 80-100 ms (p50) .. 0.2 s (p99) .. 0.3 s (max); blocked communication 17 .. 21 .. 100 ..
# 200 ms; whole steps 0.1 .. 0.13 .. 0.3 .. 0.39 s. Dense over 10 ms .. 0.5 s; a GPU step is
# ~1-10 ms, a large model's seconds.
STEP_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.125, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0)


class _Finished(Collector):
    """`asyncps_worker_finished{worker}`; `scraped` is set once a scrape is known to have received 1.

    A collect happens before its answer is written, and a process that exits then cuts the
    answer off; so the proof is the second collect that reads 1: a scraper asks a target
    one request at a time, hence the first such answer was whole. Thread-safe.
    """

    def __init__(self, worker_id: str):
        self.worker = worker_id
        self.done = False
        self.reads = 0  # collects that served 1 (from the metrics server's threads, under _lock)
        self._lock = threading.Lock()
        self.scraped = threading.Event()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        done = self.done  # read once: the value served and the count agree
        family = GaugeMetricFamily(
            "asyncps_worker_finished",
            "1 once this worker has run all its steps (it exits soon after), 0 while it trains.",
            labels=["worker"],
        )
        family.add_metric([self.worker], 1.0 if done else 0.0)
        if done:
            with self._lock:
                self.reads += 1
                if self.reads >= 2:
                    self.scraped.set()
        yield family


class WorkerMetrics:
    """The metrics of worker `worker_id` talking to `num_shards` shards."""

    def __init__(self, worker_id: str, num_shards: int, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        self.worker = worker_id
        r, w = self.registry, worker_id
        per_shard = ["worker", "shard"]

        def shards(metric: Any) -> list:
            return [metric.labels(w, str(i)) for i in range(num_shards)]

        self.pulls = shards(
            Counter("asyncps_worker_pulls_total", "Pull RPCs completed, per shard.", per_shard, registry=r)
        )
        self.pull_bytes = shards(
            Counter("asyncps_worker_pull_bytes_total", "Weight bytes pulled, per shard.", per_shard, registry=r)
        )
        self.pull_seconds = shards(
            Histogram(
                "asyncps_worker_pull_duration_seconds",
                "Pull RPC latency seen by the worker, waiting under the staleness bound included.",
                per_shard,
                registry=r,
                buckets=LATENCY_BUCKETS,
            )
        )
        self.pushes = shards(
            Counter("asyncps_worker_pushes_total", "Push RPCs completed, per shard.", per_shard, registry=r)
        )
        self.push_bytes = shards(
            Counter("asyncps_worker_push_bytes_total", "Gradient bytes pushed, per shard.", per_shard, registry=r)
        )
        self.push_seconds = shards(
            Histogram(
                "asyncps_worker_push_duration_seconds",
                "Push RPC latency seen by the worker (until the shard answered).",
                per_shard,
                registry=r,
                buckets=LATENCY_BUCKETS,
            )
        )
        self.data_plane = shards(
            Gauge(
                "asyncps_worker_data_plane",
                "1 while pulls and pushes to this shard travel over its TCP data plane, 0 over gRPC.",
                per_shard,
                registry=r,
            )
        )

        def one(kind: type, name: str, doc: str, **kw: Any) -> Any:
            return kind(name, doc, ["worker"], registry=r, **kw).labels(w)

        self.bound_wait_seconds = one(
            Counter,
            "asyncps_worker_bound_wait_seconds_total",
            "Seconds this worker's pulls were held back by the staleness bound (the slowest shard's wait, per pull).",
        )
        self.reregistrations = one(
            Counter, "asyncps_worker_reregistrations_total", "Times this worker was evicted and rejoined."
        )
        self.pushes_dropped = one(
            Counter, "asyncps_worker_pushes_dropped_total", "Pushes refused because the worker had been evicted."
        )
        self.clock = one(Gauge, "asyncps_worker_clock", "This worker's clock (iterations it has pushed).")
        self.steps = one(Counter, "asyncps_worker_steps_total", "Training iterations completed.")
        self.target_steps = one(
            Gauge, "asyncps_worker_target_steps", "Iterations this worker was asked to run (0: unknown)."
        )
        self.samples = one(
            Counter, "asyncps_worker_samples_total", "Training samples (sequences) processed; rate() is samples/s."
        )
        self.batch_size = one(
            Gauge,
            "asyncps_worker_batch_size",
            "Samples in the latest iteration's batch (the shards' choice when they balance batches by speed).",
        )
        self.local_steps = one(
            Gauge,
            "asyncps_worker_local_steps",
            "Inner-optimizer steps in this worker's latest "
            "push (--local-steps; the servers' choice with dynamic local steps; 0: gradients).",
        )
        self.lookahead_ratio = one(
            Gauge,
            "asyncps_worker_lookahead_ratio",
            "With --lookahead: how far the latest push's inner steps started ahead of its pull, "
            "relative to the push (|w_start - w_pull| / |pseudo-gradient|; 0: off or the first push).",
        )
        self.loss = one(
            Gauge, "asyncps_worker_loss", "Training loss of the latest iteration (nats per byte for the built-in task)."
        )
        self.step_seconds = one(
            Histogram, "asyncps_worker_step_duration_seconds", "Wall time of one iteration.", buckets=STEP_BUCKETS
        )
        self.compute_seconds = one(
            Histogram,
            "asyncps_worker_compute_duration_seconds",
            "Compute time of one iteration: forward and backward (T_task).",
            buckets=STEP_BUCKETS,
        )
        self.communication_seconds = one(
            Histogram,
            "asyncps_worker_communication_duration_seconds",
            "Time one iteration was blocked on pull and push (exposed T_comm).",
            buckets=STEP_BUCKETS,
        )
        self._finished = _Finished(worker_id)
        r.register(self._finished)

    def finish(self) -> None:
        """Mark every step done: `asyncps_worker_finished` reads 1 from now on."""
        self._finished.done = True

    def wait_scraped(self, timeout: float) -> bool:
        """Block until a scrape has received `asyncps_worker_finished` 1 (after `finish`; that takes
        a second scrape, see `_Finished`), at most `timeout` seconds; True if one did."""
        return self._finished.scraped.wait(timeout)

    def step(
        self,
        step_seconds: float,
        compute_seconds: float,
        communication_seconds: float,
        loss: float,
        samples: int,
        clock: int,
    ) -> None:
        """Record one finished iteration."""
        self.steps.inc()
        self.samples.inc(samples)
        self.batch_size.set(samples)
        self.loss.set(loss)
        self.clock.set(clock)
        self.step_seconds.observe(step_seconds)
        self.compute_seconds.observe(compute_seconds)
        self.communication_seconds.observe(communication_seconds)
