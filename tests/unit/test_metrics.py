"""Metric registries per process object, the scrape-time shard state, and the staleness bound."""

from __future__ import annotations

import argparse
import math

import pytest
from prometheus_client import generate_latest

from asyncps_common.metrics_http import metrics_port
from ps_server.metrics import update_staleness_bound
from ps_server.servicer import ServerConfig, Servicer
from worker.metrics import WorkerMetrics


def test_two_shards_in_one_process_keep_separate_registries():
    a, b = Servicer(ServerConfig(shard_index=0, num_shards=2)), Servicer(ServerConfig(shard_index=1, num_shards=2))
    a.clocks.register("w0")
    a.metrics.pushes.inc()
    text_a, text_b = generate_latest(a.metrics.registry).decode(), generate_latest(b.metrics.registry).decode()
    assert 'asyncps_server_worker_clock{shard="0",worker="w0"} 0.0' in text_a
    assert 'asyncps_server_live_workers{shard="0"} 1.0' in text_a
    assert 'asyncps_server_pushes_total{shard="0"} 1.0' in text_a
    assert 'worker="w0"' not in text_b and 'asyncps_server_pushes_total{shard="1"} 0.0' in text_b
    assert "asyncps_server_checkpoint_interval_seconds" not in text_a  # no --checkpoint-dir: not checkpointing


def test_two_workers_in_one_process_do_not_collide():
    a, b = WorkerMetrics("a", 2), WorkerMetrics("b", 1)
    a.step(0.1, 0.08, 0.02, 2.5, 16, 1)
    text = generate_latest(a.registry).decode()
    assert 'asyncps_worker_samples_total{worker="a"} 16.0' in text and 'asyncps_worker_loss{worker="a"} 2.5' in text
    assert 'asyncps_worker_pulls_total{shard="1",worker="a"} 0.0' in text
    assert 'shard="1"' not in generate_latest(b.registry).decode()


def test_a_worker_says_it_finished_and_knows_when_a_scrape_has_read_it():
    m = WorkerMetrics("w", 1)
    assert 'asyncps_worker_finished{worker="w"} 0.0' in generate_latest(m.registry).decode()
    assert not m.wait_scraped(0.01)  # scraped while training: not the final state
    m.finish()
    assert not m.wait_scraped(0.01)  # finished, but nobody has read it yet
    assert 'asyncps_worker_finished{worker="w"} 1.0' in generate_latest(m.registry).decode()
    assert not m.wait_scraped(0.01)  # that answer may not have reached the scraper before an exit
    generate_latest(m.registry)  # the scraper's next request: the one before was whole
    assert m.wait_scraped(0.01)


@pytest.mark.parametrize(
    "s, live, averaging, bound",
    [
        (0, 2, False, 1),
        (2, 2, False, 6),
        (1, 3, False, 7),
        (0, 1, False, 0),
        (2, 3, True, 2),
        (math.inf, 2, False, math.inf),
    ],
)
def test_update_staleness_bound(s, live, averaging, bound):
    assert update_staleness_bound(s, live, averaging) == bound


def test_metrics_port_flag():
    assert metrics_port("-1") == -1 and metrics_port("0") == 0 and metrics_port("9100") == 9100
    for bad in ("-2", "70000", "x"):
        with pytest.raises((ValueError, argparse.ArgumentTypeError)):  # "x": int() fails
            metrics_port(bad)
