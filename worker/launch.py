"""`ps-cluster [flags] -- CMD ARGS`: S servers and P copies of any training script.

What `torchrun` does for DDP, for asyncps: the launcher starts S `ps-server` shards on
loopback (free ports, readiness by the gRPC health check) and then P copies of CMD,
each told through its environment where the servers are and who it is:

    ASYNCPS_SERVERS     host:port of every shard, in shard order
    ASYNCPS_RANK        0..P-1            ASYNCPS_WORLD      P
    ASYNCPS_WORKER_ID   worker-RANK       ASYNCPS_RESTART    times this copy was restarted
    ASYNCPS_RUN_DIR     --out (for the script's own outputs)
    ASYNCPS_METRICS_PORT/_HOST/_PORT_FILE  a free loopback port for /metrics (--no-metrics: none)
    ASYNCPS_TOKEN, ASYNCPS_TLS_CA/_CERT/_KEY  the security flags' token and files (never argv)
    OMP_NUM_THREADS     cores / P (unless already set)

`PSClient(model, optimizer=..., staleness=...)` given no servers reads all of it
(worker/environment.py), so the script names no address. Everything `ps-cluster` does
for the built-in task holds: one log per process in OUT/logs, each process's metrics
port announced, the restart policy (--max-restarts; a script comes back with the same
rank and id, a server on the same port and checkpoints), every child stopped on
success, on a failure (whose log tail is shown, exit 1) and on Ctrl-C (exit 130), and a
summary (OUT/summary.json and a few lines on stdout).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from asyncps_common import security
from asyncps_common.flags import FlagParser, non_negative, positive, staleness_flag
from protos import service
from protos.asyncps.v1 import ps_pb2 as pb
from worker.cluster import Cluster, ClusterFailed
from worker.report import write_summary

log = logging.getLogger("ps-cluster")


def build_parser() -> FlagParser:
    p = FlagParser(
        prog="ps-cluster",
        usage="ps-cluster [flags] -- CMD [ARGS...]",
        description="Run S asyncps servers and P copies of your own training script (CMD), "
        "each told the servers, its rank and the world size through ASYNCPS_* variables.",
    )
    p.env_flag("servers", type=positive(int), default=2, help="parameter-server shards (S)")
    p.env_flag("workers", type=positive(int), default=2, help="copies of CMD (P)")
    p.env_flag("out", default=None, help="output folder: logs, checkpoints, summary.json (default: runs/<date-time>)")
    p.env_flag("threads", type=non_negative(int), default=0, help="OMP_NUM_THREADS per copy (0: cores / workers)")
    p.env_flag(
        "staleness",
        type=staleness_flag,
        default=None,
        help="the servers' staleness bound s (default: what the first PSClient asks for)",
    )
    p.env_flag(
        "heartbeat-timeout", type=positive(float), default=10.0, help="seconds before a silent worker is evicted"
    )
    p.env_flag("checkpoint-interval", type=positive(float), default=30.0, help="seconds between server checkpoints")
    p.env_flag(
        "max-restarts",
        type=non_negative(int),
        default=3,
        help="restarts allowed per failed server or script copy (0: a failure stops the cluster)",
    )
    p.env_switch("resume", default=False, help="continue from the checkpoints already in --out")
    p.env_switch("metrics", default=True, help="give every server and script copy a Prometheus /metrics port")
    p.env_flag("log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="launcher logging")
    security.add_security_flags(p, "cluster")
    return p


class ScriptCluster(Cluster):
    """Servers as for the built-in task; P copies of `command` as the workers."""

    def __init__(self, args: argparse.Namespace, out: Path, command: list[str], secured):
        super().__init__(args, out, secured)
        self.command = command
        self.workers: list = []

    def _staleness_argv(self) -> list[str]:
        # none given: the first PSClient's request decides, as with a lone ps-server
        return [] if self.args.staleness is None else ["--staleness", str(self.args.staleness)]

    def _worker_env(self, rank: int) -> dict[str, str]:
        a = self.args
        name = f"worker-{rank}"
        env = {
            "ASYNCPS_SERVERS": ",".join(self.addresses),
            "ASYNCPS_RANK": str(rank),
            "ASYNCPS_WORLD": str(a.workers),
            "ASYNCPS_WORKER_ID": name,
            "ASYNCPS_RESTART": "0",
            "ASYNCPS_RUN_DIR": str(self.out),
        }
        if "OMP_NUM_THREADS" not in os.environ:
            env["OMP_NUM_THREADS"] = str(a.threads or max(1, (os.cpu_count() or 1) // a.workers))
        if a.metrics:
            port_file = self.out / "logs" / f"{name}.metrics-port"
            port_file.unlink(missing_ok=True)
            env.update(
                {
                    "ASYNCPS_METRICS_PORT": "0",
                    "ASYNCPS_METRICS_HOST": "127.0.0.1",
                    "ASYNCPS_METRICS_PORT_FILE": str(port_file),
                    "ASYNCPS_METRICS_TLS_CERT": "",
                    "ASYNCPS_METRICS_TLS_KEY": "",
                    "ASYNCPS_METRICS_TLS_CLIENT_CA": "",
                }
            )
        else:
            env["ASYNCPS_METRICS_PORT"] = ""
        tls = dict(zip(self._worker_tls_argv[::2], self._worker_tls_argv[1::2]))  # paths, never the token
        for flag, var in (
            ("--tls-ca", "ASYNCPS_TLS_CA"),
            ("--tls-cert", "ASYNCPS_TLS_CERT"),
            ("--tls-key", "ASYNCPS_TLS_KEY"),
        ):
            if flag in tls:
                env[var] = tls[flag]
        return env

    def _start_workers(self) -> list:
        self.workers = [
            self.children.start_command(f"worker-{r}", self.command, self._worker_env(r))
            for r in range(self.args.workers)
        ]
        return self.workers

    def _restart_args(self, child) -> list[str]:
        if not child.command:
            return super()._restart_args(child)
        child.env["ASYNCPS_RESTART"] = str(self.restarts.get(child.name, 0))
        return child.args

    def _poll_metrics(self) -> None:
        """Announce each copy's /metrics once its PSClient has bound the port."""
        if not self.args.metrics:
            return
        for child in self.children.items:
            port_file = self.out / "logs" / f"{child.name}.metrics-port"
            if child.name not in self.metrics and port_file.exists():
                self.metrics[child.name] = f"http://127.0.0.1:{int(port_file.read_text())}/metrics"
                sys.stdout.write(f"metrics  {child.name:<10} {self.metrics[child.name]}\n")
                sys.stdout.flush()

    def run(self) -> dict:
        start = time.monotonic()
        self._start_servers()
        sys.stdout.write(f"servers  {','.join(self.addresses)}\nlogs     {self.out / 'logs'}\n")
        self._poll_metrics()
        self._start_workers()
        while True:
            for c in self.children.items:
                self._supervise(c)
            self._poll_metrics()
            if all(w.exited() == 0 for w in self.workers):
                break
            time.sleep(0.1)
        self._servers_serving()
        statuses = []
        for address in self.addresses:
            with self.security.channel(address) as channel:
                stub = service.Stub(channel, metadata=self.security.metadata)
                statuses.append(stub.Status(pb.StatusRequest(), timeout=10))
        self.stop(grace=30)  # servers write their final checkpoint on SIGTERM
        summary = {
            "command": self.command,
            "servers": self.args.servers,
            "workers": self.args.workers,
            "addresses": self.addresses,
            "wall_seconds": time.monotonic() - start,
            "versions": {f"server-{st.shard_index}": st.version for st in statuses},
            "staleness": statuses[0].staleness,
            "max_clock_gap": max(st.max_read_gap for st in statuses),
            "lost_updates": sum(st.lost_updates for st in statuses),
            "restarts": {c.name: self.restarts.get(c.name, 0) for c in self.children.items},
            "logs": {c.name: str(c.log) for c in self.children.items},
            "metrics": self.metrics,
        }
        write_summary(self.out, summary)
        return summary


def summary_text(s: dict) -> str:
    restarted = {k: v for k, v in s["restarts"].items() if v}
    return (
        f"\nasyncps: {s['workers']} copies of {' '.join(s['command'])} finished on {s['servers']} servers "
        f"in {s['wall_seconds']:.1f}s\n"
        f"  updates per shard {', '.join(str(v) for v in s['versions'].values())}   "
        f"largest clock gap {s['max_clock_gap']}   restarts {restarted or 'none'}\n"
        f"  logs    {Path(s['logs']['worker-0']).parent}\n  summary {s['summary_path']}\n"
    )


def main(argv: list[str], command: list[str]) -> int:
    """`argv`: the flags before `--`; `command`: what follows it."""
    p = build_parser()
    args = p.parse_args(argv)
    if not command:
        p.error("nothing to run after --: give the training command, e.g. -- python train.py")
    secured = security.cluster_children(p, args)
    out = Path(args.out or Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    ckpts = out / "checkpoints"
    if ckpts.is_dir() and any(ckpts.iterdir()) and not args.resume:
        p.error(f"{out} holds checkpoints of an earlier run: pass --resume to continue it, or choose another --out")
    logging.basicConfig(level=args.log_level, format="%(asctime)s ps-cluster %(levelname)s %(message)s")
    security.export_token(secured[0].token)
    cluster = ScriptCluster(args, out, command, secured)
    try:
        summary = cluster.run()
    except KeyboardInterrupt:
        sys.stderr.write("\nps-cluster: interrupted; stopping every process\n")
        return 130
    except ClusterFailed as exc:
        sys.stderr.write(f"\nps-cluster: {exc}\n")
        return 1
    finally:
        cluster.stop()
    sys.stdout.write(summary_text(summary))
    return 0
