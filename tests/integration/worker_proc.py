"""A minimal training worker run as its own OS process by the integration tests.

    python tests/integration/worker_proc.py --servers A,B --worker-id fast --steps 30
        [--sleep 0.05] [--staleness 2] [--ready FILE --go FILE] [--done FILE --hold FILE]

It builds a small MLP, joins the servers with `PSClient`, and trains for `--steps`
iterations (pull, forward/backward, optional sleep to slow it down on purpose, push).

Coordination with the test is by files, polled with a deadline (never a fixed sleep):
after registering it writes `--ready` and waits for `--go` to exist, so every worker is
registered before any of them trains; after its last step it writes `--done` (holding
its clock) and, if `--hold` is given, stays registered (heartbeating, not pushing)
until that file exists. Exits 0 on success, 3 if a wait runs out.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import zlib
from pathlib import Path

import torch

from worker import CallOptions, PSClient

DEADLINE = 120.0


def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2))


def wait_for(path: Path, what: str) -> None:
    end = time.monotonic() + DEADLINE
    while not path.exists():
        if time.monotonic() > end:
            sys.stderr.write(f"worker: gave up waiting for {what} ({path})\n")
            sys.exit(3)
        time.sleep(0.01)


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--servers", required=True)
    ap.add_argument("--worker-id", required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--sleep", type=float, default=0.0)
    ap.add_argument("--staleness", type=float, default=math.inf)
    ap.add_argument("--ready", type=Path)
    ap.add_argument("--go", type=Path)
    ap.add_argument("--done", type=Path)
    ap.add_argument("--hold", type=Path)
    ap.add_argument("--average", action="store_true", help="gradient averaging across workers")
    ap.add_argument("--stats", type=Path, help="write push counts here (JSON) at the end")
    ap.add_argument("--retry-seconds", type=float, default=10.0, help="how long to retry an unavailable server")
    args = ap.parse_args()

    model = small_model()
    gen = torch.Generator().manual_seed(zlib.crc32(args.worker_id.encode()))
    opts = CallOptions(timeout=10.0, push_timeout=30.0, pull_timeout=60.0, retry_seconds=args.retry_seconds)
    ps = PSClient(
        args.servers.split(","),
        model,
        optimizer={"name": "sgd", "lr": 0.01, "average_gradients": args.average},
        staleness=args.staleness,
        worker_id=args.worker_id,
        options=opts,
    )
    ps.start()
    try:
        if args.ready:
            write_atomically(args.ready, str(ps.clock))
        if args.go:
            wait_for(args.go, "the go signal")
        tickets = []
        for _ in range(args.steps):
            ps.pull()
            x = torch.randn(16, 8, generator=gen)
            y = torch.randn(16, 2, generator=gen)
            torch.nn.functional.mse_loss(model(x), y).backward()
            if args.sleep:
                time.sleep(args.sleep)  # slowed on purpose: this worker is the straggler
            tickets.append(ps.push())
        ps.wait()
        if args.stats:  # a push a shard refused (evicted session) or had already applied answers None
            answers = [r for t in tickets for r in t.wait()]
            write_atomically(
                args.stats,
                json.dumps(
                    {
                        "pushes": len(tickets),
                        "accepted": sum(r is not None for r in answers),
                        "refused": ps.stats.pushes_dropped,
                        "reregistrations": ps.stats.reregistrations,
                        "clock": ps.clock,
                    }
                ),
            )
        if args.done:
            write_atomically(args.done, str(ps.clock))
        if args.hold:
            wait_for(args.hold, "the release signal")
    finally:
        ps.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
