"""`ps-cluster`: a whole asyncps cluster on this machine with one command.

Starts S `ps-server` and P `ps-worker` processes on loopback (free ports, readiness by
the gRPC health check), runs M iterations in total, shows one live progress bar for
the cluster (global step, loss, samples/s, largest clock gap), then exports the
trained model, measures the held-out loss and writes `summary.json` and
`model.safetensors` into --out. Each server and worker serves Prometheus metrics on
a free port of its own (`--no-metrics`: none); their addresses are printed at start and
listed in summary.json's `metrics`. The token and TLS flags (asyncps_common/security.py)
go to every child: certificates by flag, the token as ASYNCPS_TOKEN in the children's
environment (never on a command line); the launcher's own health and Status calls use
them too. Every process it started is stopped on success, on
any process's failure (whose log tail is shown) and on Ctrl-C; children also die
with the launcher if it is killed outright.

Restart policy (like compose's `restart: on-failure`): a server or worker that exits
with a non-zero status or is killed is started again, up to --max-restarts times each
(0: the first failure stops the whole cluster). A server comes back on the same port
and checkpoint folder, so it restores its latest checkpoint; a worker comes back with
the same rank and id and `--first-step` set to the steps its report says it finished,
so the cluster still does --steps in all. summary.json counts `restarts` per process
and the servers' `lost_updates`.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

from asyncps_common import security
from asyncps_common.flags import FlagParser, non_negative, positive
from protos import service
from protos.asyncps.v1 import ps_pb2 as pb
from worker.cli import add_training_flags, add_transport_flag, check_training_args, task_config, training_argv
from worker.procs import Child, Children
from worker.report import Monitor, final_report, write_summary
from worker.rpc import wait_serving

log = logging.getLogger("ps-cluster")


class ClusterFailed(Exception):
    """A child process failed; the message names it and quotes its log."""


def build_parser() -> FlagParser:
    p = FlagParser(
        prog="ps-cluster",
        description="Train the built-in byte-level LM on a local asyncps cluster. "
        "Your own script instead: ps-cluster [flags] -- python train.py ARGS (flags: ps-cluster --help --).",
    )
    p.env_flag("servers", type=positive(int), default=2, help="parameter-server shards (S)")
    p.env_flag("workers", type=positive(int), default=2, help="worker processes (P)")
    p.env_flag("steps", type=positive(int), default=3000, help="total iterations, all workers together (M)")
    p.env_flag("out", default=None, help="output folder (default: runs/<date-time>)")
    p.env_flag("threads", type=non_negative(int), default=0, help="torch threads per worker (0: cores / workers)")
    p.env_flag(
        "heartbeat-timeout", type=positive(float), default=10.0, help="seconds before a silent worker is evicted"
    )
    p.env_flag("checkpoint-interval", type=positive(float), default=30.0, help="seconds between server checkpoints")
    p.env_flag("eval-windows", type=positive(int), default=64, help="held-out windows for the final loss")
    p.env_flag(
        "max-restarts",
        type=non_negative(int),
        default=3,
        help="restarts allowed per failed server or worker (0: a failure stops the cluster)",
    )
    p.env_flag(
        "replicas",
        type=positive(int),
        default=1,
        help="processes per shard (R); above 1 each shard is a chain of replicas and one ps-arbiter runs too",
    )
    p.env_flag(
        "lease", type=positive(float), default=1.0, help="replicated shards: seconds before a follower takes over"
    )
    add_transport_flag(p)
    p.env_switch("resume", default=False, help="continue from the checkpoints already in --out")
    p.env_switch("progress", default=True, help="show the live progress bar")
    p.env_switch("metrics", default=True, help="give every server and worker a Prometheus /metrics port")
    p.env_flag("log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="launcher logging")
    security.add_security_flags(p, "cluster")
    add_training_flags(p)
    return p


class Cluster:
    """One run: servers, workers, monitor. `run()` blocks until done; `stop()` cleans up."""

    def __init__(
        self,
        args: argparse.Namespace,
        out: Path,
        secured: tuple[security.Security, list[str], list[str]] = (security.NONE, [], []),
    ):
        self.args, self.out = args, out
        self.security, self._server_tls_argv, self._worker_tls_argv = secured  # see security.cluster_children
        (out / "logs").mkdir(parents=True, exist_ok=True)
        self.children = Children(out / "logs")
        self.addresses: list[str] = []  # per shard; a replicated one: its replicas joined by "|"
        self.servers: list = []  # the server children, shard by shard (replica by replica)
        self.arbiter: Child | None = None
        self.replicas = getattr(args, "replicas", 1)  # the launcher (ps-cluster -- CMD) has no --replicas
        self.arbiter_address = ""
        self.metrics: dict[str, str] = {}  # process name -> its /metrics URL
        self.restarts: dict[str, int] = {}  # process name -> times restarted

    def stop(self, grace: float = 10.0) -> None:
        """Stop every child: workers and servers first, the arbiter last. A replicated shard's head
        whose follower exits first during the stop can then still have the arbiter drop it, rather
        than step down for want of an arbiter. Blocks up to 2 x `grace` (SIGKILL after each)."""
        self.children.stop([c for c in self.children.items if c is not self.arbiter], grace)
        if self.arbiter is not None:
            self.children.stop([self.arbiter], grace)

    def _metrics_argv(self, name: str) -> list[str]:
        if not self.args.metrics:
            return []
        port_file = self.out / "logs" / f"{name}.metrics-port"
        port_file.unlink(missing_ok=True)
        # plain HTTP on loopback, as announced, whatever ASYNCPS_METRICS_TLS_* the environment holds
        return [
            "--metrics-port",
            "0",
            "--metrics-host",
            "127.0.0.1",
            "--metrics-port-file",
            str(port_file),
            "--metrics-tls-cert=",
            "--metrics-tls-key=",
            "--metrics-tls-client-ca=",
        ]

    def _wait_port_file(self, child, port_file: Path, timeout: float = 120) -> int:
        end = time.monotonic() + timeout
        while not port_file.exists():
            self._check(child)
            if child.exited() is not None:
                raise ClusterFailed(f"{child.name} exited before writing {port_file.name}:\n{child.log_tail()}")
            if time.monotonic() > end:
                raise ClusterFailed(f"{child.name} did not start within {timeout:.0f} s:\n{child.log_tail()}")
            time.sleep(0.05)
        return int(port_file.read_text())

    def _collect_metrics(self, children: list) -> None:
        """Wait for each child's metrics port and announce where it is."""
        if not self.args.metrics:
            return
        for child in children:
            port = self._wait_port_file(child, self.out / "logs" / f"{child.name}.metrics-port")
            self.metrics[child.name] = f"http://127.0.0.1:{port}/metrics"
            sys.stdout.write(f"metrics  {child.name:<10} {self.metrics[child.name]}\n")
        sys.stdout.flush()

    def _staleness_argv(self) -> list[str]:
        return ["--staleness", str(self.args.staleness)]

    def _server_argv(self, name: str, i: int, port: int, chain: list[str], k: int) -> list[str]:
        a = self.args
        port_file = self.out / "logs" / f"{name}.port"
        port_file.unlink(missing_ok=True)
        replicated = ["--replicas", "|".join(chain), "--replica-index", str(k)] if chain else []
        if chain:
            replicated += ["--arbiter", self.arbiter_address, "--lease", str(a.lease)]
        return [
            *self._metrics_argv(name),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--port-file",
            str(port_file),
            "--shard-index",
            str(i),
            "--num-shards",
            str(a.servers),
            *self._staleness_argv(),
            "--checkpoint-dir",
            str(self.out / "checkpoints" / (f"replica-{k}" if chain else "")),
            "--checkpoint-interval",
            str(a.checkpoint_interval),
            "--heartbeat-timeout",
            str(a.heartbeat_timeout),
            *replicated,
            *self._server_tls_argv,
        ]

    def _start_arbiter(self) -> None:
        port_file = self.out / "logs" / "arbiter.port"
        port_file.unlink(missing_ok=True)
        argv = ["--host", "127.0.0.1", "--port", "0", "--port-file", str(port_file)]
        argv += ["--state-file", str(self.out / "arbiter.json")]
        self.arbiter = self.children.start("arbiter", "ps_server.arbiter", argv)
        self.arbiter_address = f"127.0.0.1:{self._wait_port_file(self.arbiter, port_file)}"

    def _start_servers(self) -> None:
        a = self.args
        if self.replicas > 1:
            self._start_arbiter()
        for i in range(a.servers):
            if self.replicas == 1:
                self.servers.append(
                    self.children.start(f"server-{i}", "ps_server.cli", self._server_argv(f"server-{i}", i, 0, [], 0))
                )
                continue
            chain = [f"127.0.0.1:{p}" for p in free_ports(self.replicas)]
            for k, address in enumerate(chain):
                name = f"server-{i}-{k}"
                port = int(address.rsplit(":", 1)[1])
                self.servers.append(
                    self.children.start(name, "ps_server.cli", self._server_argv(name, i, port, chain, k))
                )
            self.addresses.append("|".join(chain))
        for child in self.servers:
            port = self._wait_port_file(child, self.out / "logs" / f"{child.name}.port")
            try:
                alive = functools.partial(_alive, child)
                wait_serving(f"127.0.0.1:{port}", timeout=120, is_alive=alive, security=self.security)
            except RuntimeError:
                self._check(child)
            if self.replicas == 1:
                self.addresses.append(f"127.0.0.1:{port}")
        if self.replicas > 1:
            for i in range(a.servers):
                self._wait_chain(i)

    def _wait_chain(self, shard: int, timeout: float = 120) -> None:
        """Until shard `shard`'s head has every replica in its chain (they joined by state transfer)."""
        chain = self.addresses[shard].split("|")
        end = time.monotonic() + timeout
        while True:
            for address in chain:
                try:
                    with self.security.channel(address) as ch:
                        st = service.Stub(ch, metadata=self.security.metadata).Status(pb.StatusRequest(), timeout=5)
                except Exception:  # a replica between lives: ask the next
                    continue
                if st.role == "head" and len(st.members) == len(chain):
                    return
            for child in self.servers:
                self._supervise(child)
            if time.monotonic() > end:
                raise ClusterFailed(f"shard {shard}'s replicas did not form a chain within {timeout:.0f} s")
            time.sleep(0.05)

    def _head_status(self, shard: int) -> pb.StatusResponse:
        """Status of shard `shard` from its head (from its only server, unreplicated)."""
        chain = self.addresses[shard].split("|")
        for address in chain:
            with self.security.channel(address) as ch:
                try:
                    st = service.Stub(ch, metadata=self.security.metadata).Status(pb.StatusRequest(), timeout=10)
                except Exception:
                    continue
            if len(chain) == 1 or st.role == "head":
                return st
        raise ClusterFailed(f"no replica of shard {shard} answers as its head")

    def _start_workers(self) -> list:
        a = self.args
        threads = a.threads or max(1, (os.cpu_count() or 1) // a.workers)
        workers = []
        for r in range(a.workers):
            steps = a.steps // a.workers + (1 if r < a.steps % a.workers else 0)
            report = self.out / "logs" / f"worker-{r}.jsonl"
            report.unlink(missing_ok=True)
            workers.append(
                self.children.start(
                    f"worker-{r}",
                    "worker.cli",
                    [
                        "--servers",
                        ",".join(self.addresses),
                        "--rank",
                        str(r),
                        "--world",
                        str(a.workers),
                        "--worker-id",
                        f"worker-{r}",
                        "--steps",
                        str(max(1, steps)),
                        "--threads",
                        str(threads),
                        "--report",
                        str(report),
                        "--report-every",
                        "0",
                        "--transport",
                        a.transport,
                        "--data-streams",
                        str(a.data_streams),
                        *self._metrics_argv(f"worker-{r}"),
                        *self._worker_tls_argv,
                        *training_argv(a),
                    ],
                )
            )
        return workers

    @staticmethod
    def _check(child) -> None:
        code = child.exited()
        if code not in (None, 0):
            raise ClusterFailed(f"{child.name} failed with exit code {code}; its log ends:\n{child.log_tail()}")

    def _supervise(self, child) -> None:
        """Restart `child` if it failed and has restarts left; raise ClusterFailed if none are left."""
        code = child.exited()
        if code in (None, 0):
            return
        n = self.restarts.get(child.name, 0)
        if n >= self.args.max_restarts:
            if n:
                raise ClusterFailed(
                    f"{child.name} failed with exit code {code} after {n} restarts "
                    f"(--max-restarts {self.args.max_restarts}); its log ends:\n{child.log_tail()}"
                )
            self._check(child)
        self.restarts[child.name] = n + 1
        log.warning("%s exited with code %s: restart %d of %d", child.name, code, n + 1, self.args.max_restarts)
        self.children.restart(child, self._restart_args(child))

    def _servers_serving(self) -> None:
        """Before the final report: every server up (restarted if it just failed) and serving."""
        if self.replicas > 1:  # a head answers for each shard (a restarted replica may still be joining)
            for i in range(self.args.servers):
                self._head_status(i)
            return
        for child, address in zip(self.servers, self.addresses):
            self._supervise(child)
            try:
                wait_serving(address, timeout=120, is_alive=lambda c=child: c.exited() is None, security=self.security)  # type: ignore[misc]
            except RuntimeError:
                self._check(child)

    def _restart_args(self, child) -> list[str]:
        """The child's command line for its next life: same port (server), remaining steps (worker)."""
        args = list(child.args)

        def put(flag: str, value: str) -> None:
            if flag in args:
                args[args.index(flag) + 1] = value
            else:
                args.extend([flag, value])

        if child.name.startswith("server-") and self.replicas == 1:
            i = int(child.name.split("-")[1])
            put("--port", self.addresses[i].rsplit(":", 1)[1])
        elif child.name.startswith("server-") or child.name == "arbiter":
            pass  # same port (and a replica re-joins its chain by state transfer)
        else:
            steps = int(args[args.index("--steps") + 1])  # one step redone if it died after its last one
            put("--first-step", str(min(steps - 1, _steps_reported(self.out / "logs" / f"{child.name}.jsonl"))))
        if child.name in self.metrics:  # keep the scrape target where Prometheus looks
            put("--metrics-port", self.metrics[child.name].rsplit(":", 1)[1].split("/")[0])
        return args

    def run(self) -> dict:
        start = time.monotonic()
        self._start_servers()
        channels = [self.security.channel(a.split("|")[0]) for a in self.addresses]
        try:
            stubs = [service.Stub(c, metadata=self.security.metadata) for c in channels]
            workers = self._start_workers()
            self._collect_metrics([c for c in self.children.items if c is not self.arbiter])
            monitor = Monitor(self.args, self.out, stubs, workers)
            while True:
                for c in self.children.items:
                    self._supervise(c)
                monitor.poll(time.monotonic() - start)
                if all(w.exited() == 0 for w in workers):
                    break
                time.sleep(0.5)
            monitor.close()
            self._servers_serving()
            summary = final_report(self.args, self.out, self.addresses, monitor, task_config(self.args), self.security)
            statuses = [self._head_status(i) for i in range(self.args.servers)]
            summary["max_clock_gap"] = max(st.max_read_gap for st in statuses)
            summary["lost_updates"] = sum(st.lost_updates for st in statuses)
            summary["lost_updates_by_server"] = {f"server-{st.shard_index}": st.lost_updates for st in statuses}
            summary["restarts"] = {c.name: self.restarts.get(c.name, 0) for c in self.children.items}
        finally:
            for c in channels:
                c.close()
        self.stop(grace=30)  # servers write their final checkpoint on SIGTERM
        summary["wall_seconds"] = time.monotonic() - start
        summary["metrics"] = self.metrics
        write_summary(self.out, summary)
        return summary


def _alive(child: Child) -> bool:
    return child.exited() is None


def free_ports(n: int) -> list[int]:
    """`n` distinct free TCP ports on loopback (bound and released: a replica's address must be known
    before it starts, since its chain names it)."""
    import socket

    socks = []
    try:
        for _ in range(n):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [s.getsockname()[1] for s in socks]
    finally:
        for sock in socks:
            sock.close()


def _steps_reported(report: Path) -> int:
    """The last step a worker's JSON-lines report says it finished (0: none)."""
    step = 0
    try:
        lines = report.read_text().splitlines()
    except OSError:
        return 0
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # the last line may be torn by the kill
        if rec.get("event") == "progress":
            step = max(step, int(rec["step"]))
    return step


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--" in argv:  # ps-cluster [flags] -- CMD: the user's own script as the workers (worker/launch.py)
        from worker import launch

        cut = argv.index("--")
        return launch.main(argv[:cut], argv[cut + 1 :])
    p = build_parser()
    args = p.parse_args(argv)
    check_training_args(p, args)
    secured = security.cluster_children(p, args)
    if args.workers > args.steps:
        p.error(f"--steps {args.steps} is fewer than one iteration per worker ({args.workers} workers)")
    out = Path(args.out or Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    ckpts = out / "checkpoints"
    if ckpts.is_dir() and any(ckpts.iterdir()) and not args.resume:
        p.error(f"{out} holds checkpoints of an earlier run: pass --resume to continue it, or choose another --out")
    try:
        from worker.data import Corpus, default_corpus_path

        Corpus.load(args.data or default_corpus_path(), context=args.context)
    except (ValueError, FileNotFoundError, OSError) as exc:
        p.error(str(exc))
    logging.basicConfig(level=args.log_level, format="%(asctime)s ps-cluster %(levelname)s %(message)s")
    security.export_token(secured[0].token)
    cluster = Cluster(args, out, secured)
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


def summary_text(s: dict) -> str:
    gap = "inf" if math.isinf(s["staleness"]) else f"{s['staleness']:g}"
    return (
        f"\nasyncps: {s['iterations']} iterations by {s['workers']} workers on {s['servers']} servers "
        f"(s={gap}) in {s['wall_seconds']:.1f}s\n"
        f"  train loss {s['final_train_loss']:.3f}   held-out loss {s['heldout_loss']:.3f} nats/byte\n"
        f"  T_task {s['t_task_seconds'] * 1000:.1f} ms   T_comm {s['t_comm_seconds'] * 1000:.1f} ms per iteration   "
        f"{s['samples_per_second']:.0f} samples/s   largest clock gap {s['max_clock_gap']}\n"
        f"  model  {s['model_path']}\n  summary {s['summary_path']}\n"
    )


if __name__ == "__main__":
    sys.exit(main())
