"""Load-balanced batches through real processes: a straggler gets a smaller batch, the clock keeps its size.

Two `ps-worker` processes train the built-in model against two real `ps-server` shards
with `--average-gradients --balance-batches`; one is made 4x slower (`--slowdown 4`).
The shards split the combined batch (2 x 8) by the speeds the workers report with
their pushes, and every clock's update is the sample-weighted mean of both gradients.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import pytest

from tests.integration.support import status, wait_exit

pytestmark = pytest.mark.slow  # real clusters or long runs: left out of the quick loop (-m "not slow")

BATCH = 8
STEPS = 40
MODEL = ["--d-model", "64", "--n-layer", "2", "--n-head", "2", "--context", "64"]


def worker(procs, servers: list[str], tmp_path: Path, corpus: Path, rank: int, slowdown: float) -> tuple:
    report = tmp_path / f"w{rank}.jsonl"
    log = tmp_path / f"w{rank}.log"
    args = [
        sys.executable,
        "-m",
        "worker.cli",
        "--servers",
        ",".join(servers),
        "--rank",
        str(rank),
        "--world",
        "2",
        "--worker-id",
        f"w{rank}",
        "--steps",
        str(STEPS),
        "--batch-size",
        str(BATCH),
        *MODEL,
        "--data",
        str(corpus),
        "--device",
        "cpu",
        "--threads",
        "1",
        "--staleness",
        "0",
        "--average-gradients",
        "--balance-batches",
        "--slowdown",
        str(slowdown),
        "--report",
        str(report),
        "--report-every",
        "0",
        "--retry-seconds",
        "20",
    ]
    with open(log, "wb") as out:
        proc = procs.popen(args, stdout=out, stderr=out)
    return proc, report, log


def batches_by_clock(report: Path) -> dict[int, int]:
    """clock -> batch of that clock (a progress line's clock is the one after its push)."""
    lines = [json.loads(x) for x in report.read_text().splitlines()]
    return {r["clock"] - 1: r["batch"] for r in lines if r["event"] == "progress"}


def test_a_straggler_gets_a_smaller_batch_and_each_clock_keeps_the_combined_batch(start_server, procs, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(Path(m.__file__).read_text() for m in (json, statistics)))
    shards = start_server.shards(2)
    servers = [s.address for s in shards]
    fast = worker(procs, servers, tmp_path, corpus, 0, 1.0)
    slow = worker(procs, servers, tmp_path, corpus, 1, 4.0)
    for proc, _, log in (fast, slow):
        assert wait_exit(proc, 240, log) == 0, log.read_text()[-3000:]
    a, b = batches_by_clock(fast[1]), batches_by_clock(slow[1])
    both = sorted(a.keys() & b.keys())
    assert len(both) >= STEPS // 2, (a, b)
    assert a[min(a)] == b[min(b)] == BATCH  # its speed not measured yet: a worker starts with its own batch
    for clock in both:  # every clock both served: the split of one combined batch
        assert a[clock] + b[clock] == 2 * BATCH, (clock, a, b)
    late = both[len(both) // 2 :]
    fast_mean = statistics.mean(a[c] for c in late)
    slow_mean = statistics.mean(b[c] for c in late)
    assert slow_mean < 0.6 * fast_mean, (fast_mean, slow_mean, a, b)
    samples = {json.loads(r.read_text().splitlines()[-1])["samples"] for r in (fast[1], slow[1])}
    assert sum(samples) >= 2 * BATCH * len(both)  # the reports count the samples actually used
    for shard in shards:  # one averaged update per clock, every push counted
        st = status(shard.address)
        assert st.optimizer.balance_batches and st.optimizer.average_gradients
        assert st.pushes_applied == 2 * STEPS and st.version == len(a.keys() | b.keys())
