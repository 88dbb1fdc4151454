"""Time what a SIGKILL costs a `ps-cluster` run: a server killed, then a worker killed.

    python bench/faults.py [--steps 800] [--heartbeat-timeout 2] [--checkpoint-interval 5] [--out runs/faults]

For each case it starts `ps-cluster` (2 servers, 2 workers, the tests' small model, a
corpus of a dozen standard-library modules), waits until worker-0 has done 60 steps,
kills the process with SIGKILL and reports: how long until the restarted server serves
again (health check), how long until worker-0 makes progress again, the lost updates,
restarts and iterations from summary.json. Prints one line per case.

    python bench/faults.py --replication [--repeats 3] [--steps 300] [--transfer-only]

Replicated shards instead (docs/replication.md), all in the same run, median and range of
`--repeats`: the stall of worker-0 after shard 0's server is killed at step 60 with
`--replicas 1` (restart from its checkpoint) and with `--replicas 2` (the head killed: a
follower takes over); samples/s of unkilled runs, R = 2 against R = 1, of README's main job
(`ps-cluster --servers 2 --workers 2`, the built-in model, `--steps` long) and of the small
model (where the extra round trip per push weighs most); and the state
transfer of a 64 MB shard to a replica that joins (ps-server processes, SGD with momentum:
64 MB of weights and 64 MB of momentum). Writes bench/results/faults-replication.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from worker.rpc import wait_serving  # noqa: E402

MODULES = [
    "argparse.py",
    "dataclasses.py",
    "functools.py",
    "textwrap.py",
    "json/decoder.py",
    "shutil.py",
    "string.py",
    "typing.py",
    "enum.py",
    "ast.py",
    "random.py",
    "heapq.py",
]


def step(out: Path, name: str) -> int:
    path, best = out / "logs" / f"{name}.jsonl", 0
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("event") == "progress":
                best = max(best, rec["step"])
    return best


def pid_of(out: Path, token: str) -> int:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if str(out) in cmd and token in cmd and "worker.cluster" not in cmd:
                return int(entry.name)
    raise LookupError(token)


def wait(predicate, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise TimeoutError("gave up waiting")
        time.sleep(0.02)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--heartbeat-timeout", type=float, default=2.0)
    ap.add_argument("--checkpoint-interval", type=float, default=5.0)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "faults")
    ap.add_argument("--replication", action="store_true", help="the replicated-shard figures instead")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--transfer-only", action="store_true", help="with --replication: re-measure only the state transfer"
    )
    a = ap.parse_args()
    if a.replication and a.transfer_only:
        from replication_figures import transfer_only

        return transfer_only(a)
    if a.replication:
        from replication_figures import replication

        return replication(a, _corpus(a.out), lambda out, *extra: _cluster_cmd(a, _corpus(a.out), out, *extra))
    corpus = a.out / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in MODULES:
        shutil.copy(stdlib / name, corpus / name.replace("/", "_"))
    for kind in ["server", "worker"]:
        out = a.out / f"kill-{kind}"
        shutil.rmtree(out, ignore_errors=True)
        cmd = [
            sys.executable,
            "-m",
            "worker.cluster",
            "--servers",
            "2",
            "--workers",
            "2",
            "--steps",
            str(a.steps),
            "--data",
            str(corpus),
            "--out",
            str(out),
            "--d-model",
            "32",
            "--n-layer",
            "1",
            "--n-head",
            "2",
            "--context",
            "32",
            "--batch-size",
            "8",
            "--lr",
            "1e-2",
            "--warmup",
            "10",
            "--no-progress",
            "--no-metrics",
            "--heartbeat-timeout",
            str(a.heartbeat_timeout),
            "--checkpoint-interval",
            str(a.checkpoint_interval),
        ]
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait(lambda out=out: step(out, "worker-0") >= 60)
        serving = None
        if kind == "server":
            address = f"127.0.0.1:{int((out / 'logs' / 'server-0.port').read_text())}"
            os.kill(pid_of(out, "server-0.port"), signal.SIGKILL)
            killed = time.monotonic()
            wait(lambda address=address: not _listening(address), 10)  # the killed process's port is closed
            wait_serving(address, timeout=120)
            serving = time.monotonic() - killed
        else:
            os.kill(pid_of(out, "--worker-id worker-1 "), signal.SIGKILL)
            killed = time.monotonic()
        before = step(out, "worker-0")
        wait(lambda out=out, before=before: step(out, "worker-0") >= before + 3)
        resumed = time.monotonic() - killed
        _, err = proc.communicate(timeout=600)
        if proc.returncode != 0:
            sys.stderr.write(err.decode()[-3000:])
            return 1
        s = json.loads((out / "summary.json").read_text())
        print(
            f"kill {kind}: serving again after {'-' if serving is None else f'{serving:.1f}s'}, "
            f"worker-0 progressing again after {resumed:.1f}s, lost updates {s['lost_updates']}, "
            f"restarts {s['restarts']}, iterations {s['iterations']}/{a.steps}, wall {s['wall_seconds']:.1f}s"
        )
    return 0


def _corpus(root: Path) -> Path:
    corpus = root / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in MODULES:
        shutil.copy(stdlib / name, corpus / name.replace("/", "_"))
    return corpus


def _cluster_cmd(a: argparse.Namespace, corpus: Path, out: Path, *extra: str) -> list[str]:
    return [
        *[sys.executable, "-m", "worker.cluster", "--servers", "2", "--workers", "2", "--steps", str(a.steps)],
        *["--data", str(corpus), "--out", str(out), "--d-model", "32", "--n-layer", "1", "--n-head", "2"],
        *["--context", "32", "--batch-size", "8", "--lr", "1e-2", "--warmup", "10", "--no-progress", "--no-metrics"],
        *["--heartbeat-timeout", str(a.heartbeat_timeout), "--checkpoint-interval", str(a.checkpoint_interval)],
        *extra,
    ]


def _listening(address: str) -> bool:
    """True while something still accepts connections at `address` (the killed server's port)."""
    import socket

    host, port = address.rsplit(":", 1)
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, int(port))) == 0


if __name__ == "__main__":
    sys.exit(main())
