"""Prometheus metrics of one parameter-server shard, and the `/metrics` endpoint of any process.

`ServerMetrics` owns a `CollectorRegistry` per servicer (no module-level metrics, so
several shards in one process and the tests never collide). The hot paths only add to
pre-labelled counters and histograms once per RPC, never per chunk; everything that
is state rather than an event (version, clocks, live workers, bounds, checkpoint
version) is read from the servicer when Prometheus scrapes, by `_ShardState`.

Names follow Prometheus conventions: `asyncps_server_*`, counters end in `_total`,
times are in seconds, sizes in bytes; every series carries `shard`, per-worker clocks
also `worker`. The bucket choices are explained at their definitions; they fit the
ranges measured on a default `ps-cluster` run (docs/deploy.md, "Metrics").

The `/metrics` endpoint itself, shared with `ps-worker` (plain HTTP or TLS), is
`asyncps_common/metrics_http.py`.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

from asyncps_common.buckets import LATENCY_BUCKETS

log = logging.getLogger(__name__)

# Update staleness in versions: measured 0 under the default (s=0, averaging) and 1 (p50) .. 2 (max)
# with s=2, 2 workers, no averaging (bound 6). Every whole number to 8, so a quantile never
# overshoots a small bound (the alert compares it with one), then wider.
STALENESS_BUCKETS = (0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 16, 24, 32, 64, 128)
# Delay compensation relative to the gradient (asyncps_common/delay.py): 0 when fresh; the correction
# is a few percent of the gradient at the delays SSP allows, more only when staleness runs away. With
# the elastic rule it is the other pushes' drift against the push's own change: about 1/P per push missed.
COMPENSATION_BUCKETS = (0.0, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
# A checkpoint write (torch.save + fsync): milliseconds for the built-in model, seconds for GBs.
CHECKPOINT_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0)


def update_staleness_bound(staleness: float, live_workers: int, averaging: bool) -> float:
    """The largest update staleness (in versions) the SSP rule allows on one shard.

    With averaging, one update per clock: a gradient read at clock c is applied after the
    buckets of clocks c-s .. c-1 at most, so s. Without it, between a worker's read at
    clock c and the apply of its push, each other worker can apply its pushes for clocks
    c-s .. c+s (2s+1 each), plus the reader's own previous push when pipelining (s >= 1).
    """
    if math.isinf(staleness):
        return math.inf
    s = int(staleness)
    if averaging:
        return float(s)
    return float((2 * s + 1) * max(0, live_workers - 1) + (1 if s >= 1 else 0))


class ServerMetrics:
    """Counters and histograms of one shard; `bind(servicer)` adds its scrape-time state."""

    def __init__(self, shard: int, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        self.shard = str(shard)
        r, lbl = self.registry, ["shard"]

        def counter(name: str, doc: str) -> Any:
            return Counter(name, doc, lbl, registry=r).labels(self.shard)

        def histogram(name: str, doc: str, buckets: tuple) -> Any:
            return Histogram(name, doc, lbl, registry=r, buckets=buckets).labels(self.shard)

        self.pushes = counter(
            "asyncps_server_pushes_total", "Pushes accepted (applied, or added to an averaging bucket)."
        )
        self.pushes_rejected = counter("asyncps_server_pushes_rejected_total", "Pushes refused with an error status.")
        self.push_bytes = counter("asyncps_server_push_bytes_total", "Gradient payload bytes of accepted pushes.")
        self.push_seconds = histogram(
            "asyncps_server_push_duration_seconds",
            "Push RPC time on the server: receive, validate, apply.",
            LATENCY_BUCKETS,
        )
        self.pulls = counter("asyncps_server_pulls_total", "Pulls answered.")
        self.pull_bytes = counter("asyncps_server_pull_bytes_total", "Weight payload bytes sent by pulls.")
        self.pull_seconds = histogram(
            "asyncps_server_pull_duration_seconds",
            "Pull RPC time on the server, waiting under the staleness bound included.",
            LATENCY_BUCKETS,
        )
        self.bound_waits = counter("asyncps_server_bound_waits_total", "Pulls the staleness bound held back.")
        self.bound_wait_seconds = counter(
            "asyncps_server_bound_wait_seconds_total",
            "Seconds pulls were held back by the staleness bound (all pulls together).",
        )
        self.updates = counter("asyncps_server_updates_total", "Optimizer updates applied (version increments).")
        self.update_staleness = histogram(
            "asyncps_server_update_staleness",
            "Update staleness of each pushed gradient: shard version when applied "
            "minus the version it was computed from.",
            STALENESS_BUCKETS,
        )
        self.compensation = histogram(
            "asyncps_server_compensation_ratio",
            "Size of each update's delay compensation (update rule dc: ||correction|| / ||gradient||; "
            "elastic: ||w_now - w_read|| / ||pseudo-gradient||); 0 for a push read at the current version.",
            COMPENSATION_BUCKETS,
        )
        self.evictions = counter("asyncps_server_evictions_total", "Workers evicted after the heartbeat timeout.")
        self.lost_updates = counter(
            "asyncps_server_lost_updates_total",
            "Updates this shard applied, then lost in a restart (missing from the restored "
            "checkpoint), as reported by the workers that saw them.",
        )
        self.checkpoints = counter("asyncps_server_checkpoints_total", "Checkpoints written.")
        self.checkpoint_failures = counter("asyncps_server_checkpoint_failures_total", "Checkpoint writes that failed.")
        self.checkpoint_seconds = histogram(
            "asyncps_server_checkpoint_duration_seconds", "Time to write one checkpoint.", CHECKPOINT_BUCKETS
        )
        self.last_checkpoint = Gauge(
            "asyncps_server_last_checkpoint_timestamp_seconds",
            "Unix time of the last checkpoint written, or of the server's start or restore "
            "(when nothing was unsaved yet).",
            lbl,
            registry=r,
        ).labels(self.shard)
        self.last_checkpoint.set(time.time())

    def bind(self, servicer: Any) -> None:
        """Export `servicer`'s state (version, clocks, bounds) at every scrape."""
        self.registry.register(_ShardState(servicer, self.shard))


class _ShardState:
    """Scrape-time gauges read from a servicer (plain attribute reads; the table is copied first)."""

    def __init__(self, servicer: Any, shard: str):
        self.servicer, self.shard = servicer, shard

    def describe(self) -> list:
        return []  # collected lazily: registering must not read the servicer

    def collect(self):
        sv, shard = self.servicer, [self.shard]
        clocks = sv.clocks
        for _ in range(3):  # the event loop may change the table while this thread copies it
            try:
                entries = dict(clocks._entries)
                break
            except RuntimeError:
                continue
        else:
            entries = {}
        store = sv.store

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=["shard"])
            g.add_metric(shard, value)
            return g

        yield gauge(
            "asyncps_server_initialized", "1 once a worker has initialized the shard.", float(store is not None)
        )
        yield gauge("asyncps_server_version", "Updates applied to this shard so far.", store.version if store else 0)
        yield gauge(
            "asyncps_server_checkpoint_version",
            "Shard version in the last checkpoint written or restored.",
            sv.checkpoint_version,
        )
        if sv.cfg.checkpoint_dir:
            yield gauge(
                "asyncps_server_checkpoint_interval_seconds",
                "Seconds between periodic checkpoints.",
                sv.cfg.checkpoint_interval,
            )
        live = len(entries)
        floor = clocks._floor
        yield gauge("asyncps_server_live_workers", "Registered workers not evicted.", live)
        yield gauge(
            "asyncps_server_min_clock",
            "Clock of the slowest live worker.",
            min((e.clock for e in entries.values()), default=floor),
        )
        yield gauge(
            "asyncps_server_staleness_bound", "Staleness bound s in clocks (+Inf: asynchronous).", clocks.staleness
        )
        averaging = bool(store is not None and store.config.average_gradients)
        yield gauge(
            "asyncps_server_update_staleness_bound",
            "Largest update staleness (versions) the bound allows with the live workers now.",
            update_staleness_bound(clocks.staleness, live, averaging),
        )
        yield gauge(
            "asyncps_server_outer_lr_factor",
            "The latest update's lr factor: with dynamic local steps (lr_follows_split) the spread of its "
            "clock's split, largest H / mean H; 1 otherwise.",
            store.last_lr_factor if store else 1.0,
        )
        yield gauge(
            "asyncps_server_compensation_history_misses",
            "Pushes (update rule dc) older than every kept version of the weights, compensated against the oldest one.",
            store.history_missed if store else 0,
        )
        per_worker = GaugeMetricFamily(
            "asyncps_server_worker_clock", "Each live worker's clock on this shard.", labels=["shard", "worker"]
        )
        for worker, entry in sorted(entries.items()):
            per_worker.add_metric([self.shard, worker], entry.clock)
        yield per_worker
