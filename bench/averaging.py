"""Step time of synchronous training with gradient averaging on the servers (s = 0, the default mode).

    python bench/averaging.py --mb 64 --workers 2 --steps 14

Starts `--servers` real `ps-server` processes and `--workers` worker processes, each a
real `PSClient` on a model of `--mb` MB of fp32 parameters (no compute: the gradient is
a constant), SGD with momentum, averaging on, staleness 0: every step a worker pulls,
pushes, and waits for the others' gradients to be averaged and applied. Prints each
worker's median step time (ms) over the steps after the first three; `--json PATH`
writes every step. Compare two versions of the code by running it on each, alternately.
Loopback only, free ports only.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/averaging.py` from anywhere
    sys.path.insert(0, str(ROOT))

WARMUP_STEPS = 3


def _worker(addrs: list[str], worker_id: str, out, nbytes: int, steps: int) -> None:
    """Child: `steps` pull-push steps of one worker; puts its step times (s) on `out`."""
    import torch

    from worker import PSClient
    from worker.cost.servers import FlatModel

    torch.manual_seed(0)  # every worker builds the same initial model
    model = FlatModel(nbytes)
    optimizer = {"name": "sgd", "lr": 1e-3, "momentum": 0.9, "average_gradients": True}
    with PSClient(addrs, model, optimizer=optimizer, staleness=0, worker_id=worker_id) as ps:
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            ps.pull()
            for p in model.parameters():
                p.grad = torch.full_like(p, 1e-3)
            ps.push(samples=16)
            times.append(time.perf_counter() - t0)
        ps.wait()
    out.put((worker_id, times))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--mb", type=int, default=64, help="model size in MB (2^20 bytes) of fp32 parameters")
    p.add_argument("--servers", type=int, default=1, help="ps-server processes (shards)")
    p.add_argument("--workers", type=int, default=2, help="worker processes")
    p.add_argument("--steps", type=int, default=14, help=f"steps per worker (the first {WARMUP_STEPS} not counted)")
    p.add_argument("--json", help="write every step time here")
    args = p.parse_args(argv)
    if args.mb <= 0 or args.servers <= 0 or args.workers <= 0 or args.steps <= WARMUP_STEPS:
        p.error(f"--mb, --servers and --workers must be positive, --steps more than {WARMUP_STEPS}")
    from worker.cost.servers import start_servers, stop_servers

    with tempfile.TemporaryDirectory(prefix="asyncps-avg-") as tmp:
        procs, addrs = start_servers(args.servers, Path(tmp))
        try:
            ctx = mp.get_context("spawn")
            out = ctx.Queue()
            workers = [
                ctx.Process(target=_worker, args=(addrs, f"w{i}", out, args.mb << 20, args.steps))
                for i in range(args.workers)
            ]
            for w in workers:
                w.start()
            times = dict(out.get(timeout=600) for _ in workers)
            for w in workers:
                w.join(timeout=60)
        finally:
            stop_servers(procs)
    res = {
        "mb": args.mb,
        "servers": args.servers,
        "workers": args.workers,
        "steps": args.steps,
        "step_ms": {w: [t * 1e3 for t in ts] for w, ts in sorted(times.items())},
    }
    res["median_step_ms"] = {w: statistics.median(ts[WARMUP_STEPS:]) for w, ts in res["step_ms"].items()}
    print(
        f"{args.mb} MB model, {args.servers} server(s), {args.workers} workers, averaging, s = 0: "
        f"median step (ms) over steps {WARMUP_STEPS + 1}-{args.steps}"
    )
    for w, ms in res["median_step_ms"].items():
        print(f"  {w}  {ms:7.1f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
