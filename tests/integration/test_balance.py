"""Load-balanced batches through real processes: a straggler gets a smaller batch, the clock keeps its size.

Two `ps-worker` processes train the built-in model against two real `ps-server` shards
with `--average-gradients --balance-batches`; one is made 4x slower (`--slowdown 4`).
The shards split the combined batch (2 x 8) by the speeds the workers report with
their pushes, and every clock's update is the sample-weighted mean of both gradients.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import sys
import time
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


def started(report: Path) -> bool:
    """Whether the worker wrote its "start" line: registered with every shard, its first step next."""
    return report.exists() and any(
        line.endswith("}") and json.loads(line)["event"] == "start" for line in report.read_text().splitlines()
    )


def start_together(workers: list[tuple], timeout: float = 120) -> None:
    """Hold each worker that has started (SIGSTOP) until every one has, then let them all go.

    Nothing in asyncps waits for the other workers before the first clock: a worker that
    registers first trains alone meanwhile (a clock waits only for the live workers). Process
    start-up varies by a second or more on a loaded 2-core machine, dozens of this test's
    clocks, and the test needs both workers in the same clocks."""
    held: set[int] = set()
    end = time.monotonic() + timeout
    try:
        while len(held) < len(workers):
            for i, (proc, report, log) in enumerate(workers):
                assert proc.poll() is None, log.read_text()[-3000:]
                if i not in held and started(report):
                    os.kill(proc.pid, signal.SIGSTOP)
                    held.add(i)
            assert time.monotonic() < end, "the workers did not all start"
            time.sleep(0.005)
    finally:
        for i in held:
            os.kill(workers[i][0].pid, signal.SIGCONT)


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
    start_together([fast, slow])
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
