"""`PSClient`: train any `nn.Module` against asyncps servers in a few lines.

    with PSClient(["127.0.0.1:50051", "127.0.0.1:50052"], model, optimizer={"name": "adamw", "lr": 1e-3},
                  staleness=2) as ps:
        for x, y in batches:
            ps.pull()                           # weights for this clock, within the bound
            loss_fn(model(x), y).backward()
            ps.push()                           # gradients go out in the background

Under `ps-cluster -- CMD` or Kubernetes, give no servers: `PSClient(model, optimizer=...,
staleness=...)` reads the servers, worker id, token and TLS files from the environment
(worker/environment.py), and serves /metrics if ASYNCPS_METRICS_PORT asks. Instead of
a model, parameter groups as torch.optim takes them give groups their own lr, weight
decay, momentum or betas (worker/groups.py).

The client maps the model's parameters to shards with the plan, talks to all shards
concurrently from one I/O thread running an asyncio (uvloop) event loop, and keeps
communication in flight while the caller computes: `push()` returns a `PushTicket`
at once (at most `max_inflight` pushes in flight; it blocks beyond that) and
immediately asks for the next clock's weights, which the servers send as soon as the
push is applied and the staleness bound allows. With `pipeline=True` (needs s >= 1)
the next pull is asked for before the push, so it overlaps the whole computation; the
weights then miss at most the worker's own latest gradient. `prefetch=k` (needs s >= k)
keeps the pulls of the next k clocks in flight, each into its own buffer, so a link
never idles between one pull's last bytes and the next pull's first (the weights then
miss at most the worker's own k latest gradients).

Thread-safety: `pull`, `push`, `wait` and `close` must be called from one thread (the
training loop); they block that thread, never the I/O thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Coroutine, Sequence
from typing import Any

import torch
import uvloop

from asyncps_common.optimizer import default_config
from asyncps_common.security import NONE, Security
from protos import compress, wire
from protos.asyncps.v1 import ps_pb2 as pb
from worker import environment
from worker import groups as param_groups
from worker.exchange import ShardExchange
from worker.metrics import WorkerMetrics
from worker.plan import Plan, make_plan, param_specs
from worker.rpc import CallOptions, RpcFailed, ShardClient
from worker.tickets import ClientStats, PushTicket

log = logging.getLogger(__name__)


class PSClient(ShardExchange):
    """A worker's connection to all shards of one model. See the module docstring."""

    def __init__(
        self,
        servers: Sequence[str] | Any = None,
        model: Any = None,
        optimizer: dict | pb.OptimizerConfig | None = None,
        staleness: float = math.inf,
        worker_id: str | None = None,
        pipeline: bool = False,
        max_inflight: int = 2,
        prefetch: int = 1,
        options: CallOptions = CallOptions(),
        heartbeat_interval: float | None = None,
        initialize: bool = True,
        metrics: WorkerMetrics | None = None,
        security: Security | None = None,
        batch_size: int = 0,
        compression: str = "none",
    ):
        """`servers` may be left out (`PSClient(model, ...)`): then they, the worker id, the token and
        TLS come from the environment. `model`: an nn.Module, or torch.optim-style parameter groups."""
        if model is None and servers is not None and not _is_addresses(servers):
            servers, model = None, servers  # PSClient(model_or_groups, ...)
        if model is None:
            raise ValueError("PSClient needs a model or parameter groups")
        if isinstance(servers, str):
            servers = environment.split_servers(servers)
        from_env = not servers
        self.rank, self.world = 0, 1  # from the environment when launched (ps-cluster -- CMD, Kubernetes)
        if from_env:
            where = environment.placement(None, worker_id)
            servers, worker_id = where.servers, where.worker_id
            self.rank, self.world = where.rank, where.world
            security = security if security is not None else environment.security_from_env()
        if pipeline and staleness < 1:
            raise ValueError("pipeline=True needs a staleness bound of at least 1")
        if prefetch < 1 or (pipeline and prefetch > staleness):
            raise ValueError(f"prefetch={prefetch} needs 1 <= prefetch <= the staleness bound ({staleness:g})")
        if isinstance(optimizer, dict):
            optimizer = default_config(**optimizer)
        self.optimizer = optimizer or default_config()
        groups = param_groups.parse(model, self.optimizer)
        self.model = model if isinstance(model, torch.nn.Module) else None
        self.params = [t for _, t in groups.named]
        self.group_configs = groups.configs  # each parameter group's settings, in group order
        self.plan: Plan = make_plan(param_specs(groups.named, groups.group_of), len(servers))
        self.staleness = staleness
        self.worker_id = (
            worker_id or os.environ.get("ASYNCPS_WORKER_ID", "").strip() or f"{socket.gethostname()}-{os.getpid()}"
        )
        self.pipeline = pipeline
        self.prefetch = prefetch if pipeline else 1
        self.max_inflight = max(1, max_inflight)
        self.options = options
        self._hb_interval = heartbeat_interval
        self.device = self.params[0].device if self.params else torch.device("cpu")
        ends = [0]
        for p in self.params:
            ends.append(ends[-1] + p.numel())
        self._offsets = list(zip(ends[:-1], ends[1:]))  # each parameter's range in the flat vector
        self.clock = 0
        self.own_batch_size = batch_size  # told to the shards at Register: what balancing splits
        self.batch_size = batch_size  # the batch for the current clock: the shards' choice when they balance
        self.stats = ClientStats()
        self.metrics = metrics if metrics is not None else WorkerMetrics(self.worker_id, len(servers))
        if from_env and metrics is None:
            environment.serve_metrics_from_env(self.metrics.registry)
        pin = self.device.type == "cuda"
        # pulls land here; clock c's in buffer c % prefetch (a pipelined worker has `prefetch` in flight)
        self._pull_bufs = [
            torch.empty(self.plan.numel, dtype=torch.float32, pin_memory=pin) for _ in range(self.prefetch)
        ]
        self._free_grads = [
            torch.empty(self.plan.numel, dtype=torch.float32, pin_memory=pin) for _ in range(self.max_inflight)
        ]
        self._sessions: list[int] = []
        self._read_versions: list[int] = [0] * len(servers)
        self._incarnations: list[int] = [0] * len(servers)  # each shard's server process, from Register
        self._seen_versions: list[int] = [0] * len(servers)  # highest version seen from that process
        self._servers = list(servers)
        self._shards: list[ShardClient] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._inflight: list[PushTicket] = []
        self._pending_pulls: dict[int, concurrent.futures.Future] = {}  # clock -> its pull in flight
        self._push_order: list[asyncio.Lock] = []
        self._failure: BaseException | None = None
        self._evicted = False
        self._heartbeat: concurrent.futures.Future | None = None
        self.initialize = initialize
        self.security = security or NONE  # TLS and token for every shard's channel (asyncps_common/security.py)
        # bytes on the wire (protos/compress.py); onebit keeps its error-feedback residual here
        self.compression = compress.check(compression)
        self._feedback = compress.ErrorFeedback(self.plan.numel) if self.compression == "onebit" else None

    # -- lifecycle --------------------------------------------------------------------
    def __enter__(self) -> PSClient:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close(wait=exc[0] is None)

    def start(self) -> None:
        """Start the I/O thread, initialize every shard (first worker's weights win) and register."""
        ready = threading.Event()

        def run() -> None:
            self._loop = uvloop.new_event_loop()
            asyncio.set_event_loop(self._loop)
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name=f"asyncps-io-{self.worker_id}", daemon=True)
        self._thread.start()
        ready.wait()
        try:
            self._run(self._start())
        except BaseException:
            self.close(wait=False)
            raise
        self._heartbeat = asyncio.run_coroutine_threadsafe(self._heartbeat_loop(), self._loop)  # type: ignore[arg-type]

    async def _start(self) -> None:
        # data_streams counts connections for the whole model: S shards already make S streams
        per_shard = dataclasses.replace(self.options, data_streams=-(-self.options.data_streams // len(self._servers)))
        self._shards = [ShardClient(a, i, per_shard, self.security) for i, a in enumerate(self._servers)]
        self._push_order = [asyncio.Lock() for _ in self._shards]  # a shard takes this worker's pushes in clock order
        flat = self._flatten([p.detach() for p in self.params])
        statuses = await asyncio.gather(*(s.status() for s in self._shards))

        async def init(shard: ShardClient, st: pb.StatusResponse) -> None:
            spec = self.plan.shards[shard.index]
            if st.initialized and st.plan_hash == self.plan.hash:
                return
            if not self.initialize:
                raise RuntimeError(f"shard {shard.index} at {shard.address} holds no model with this plan")
            head = pb.InitHeader(
                plan_hash=self.plan.hash,
                shard_index=shard.index,
                num_shards=len(self._shards),
                numel=spec.numel,
                optimizer=self.optimizer,
                worker_id=self.worker_id,
                staleness=self.staleness,
                groups=param_groups.segments(self.plan, shard.index, self.group_configs),
            )
            resp = await shard.init(head, flat[spec.lo : spec.hi])
            if not resp.accepted and resp.optimizer != self.optimizer:
                log.warning(
                    "shard %d keeps the optimizer settings of the first worker: %s", shard.index, resp.optimizer
                )

        await asyncio.gather(*(init(s, st) for s, st in zip(self._shards, statuses)))
        await self._register()

    async def _register(self) -> None:
        """Register with every shard at one common clock: the latest of their slowest clocks and our own.

        Each shard is told the highest version this worker saw from it (and from which
        server process): a shard restarted from an older checkpoint counts the gap as lost.
        """
        start = self.clock
        while True:
            resps = await asyncio.gather(
                *(
                    s.register(
                        self.worker_id,
                        self.plan.hash,
                        start,
                        self._seen_versions[s.index],
                        self._incarnations[s.index],
                        self.own_batch_size,
                        self.compression,
                    )
                    for s in self._shards
                )
            )
            if any(r.compression != self.compression for r in resps):  # a server that predates compression
                raise RuntimeError(f"the servers do not accept compression {self.compression!r}")
            clocks = {r.clock for r in resps}
            if len(clocks) == 1:
                break
            start = max(clocks)
        for r, s in zip(resps, self._shards):
            if r.incarnation != self._incarnations[s.index]:
                self._incarnations[s.index], self._seen_versions[s.index] = r.incarnation, 0
        self._sessions = [r.session for r in resps]
        self.clock = resps[0].clock
        self.staleness = resps[0].staleness
        self._hb_interval = self._hb_interval or max(0.05, resps[0].heartbeat_timeout_seconds / 4)
        self._evicted = False
        log.info(
            "worker %s registered with %d shards at clock %d (s=%s)",
            self.worker_id,
            len(self._shards),
            self.clock,
            self.staleness,
        )

    def close(self, wait: bool = True) -> None:
        """Wait for pushes in flight (if `wait`), leave, and stop the I/O thread. Idempotent."""
        if self._loop is None:
            return
        try:
            if wait and self._failure is None:
                self.wait()
            if self._heartbeat:
                self._heartbeat.cancel()
            if self._sessions:
                self._run(self._leave())
        except Exception as exc:  # closing must not hide the caller's own error
            log.warning("while closing: %s", exc)
        finally:
            if self._shards:
                self._run(_gather((s.close() for s in self._shards), return_exceptions=True))
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)  # type: ignore[union-attr]
            self._loop = None

    async def _leave(self) -> None:
        await asyncio.gather(
            *(s.leave(self.worker_id, sess) for s, sess in zip(self._shards, self._sessions)), return_exceptions=True
        )

    # -- the training loop's calls ------------------------------------------------------
    def pull(self) -> None:
        """Block until the weights for the current clock are in the model."""
        t0 = time.perf_counter()
        self._raise_failure()
        if self._evicted:
            self._rejoin()
        fut = self._take_pull(self.clock)
        try:
            heads = fut.result()
        except concurrent.futures.CancelledError:
            self._raise_failure()
            raise
        except RpcFailed as exc:
            if not exc.evicted:
                raise
            for attempt in range(3):  # another shard may refuse the session too (it restarted as well)
                self._rejoin()
                try:
                    heads = self._take_pull(self.clock).result()
                    break
                except RpcFailed as again:
                    if not again.evicted or attempt == 2:
                        raise
        self._read_versions = [h.version for h in heads]
        self.batch_size = heads[0].batch_size or self.own_batch_size  # shard 0 decides for all
        self._seen_versions = [max(a, b) for a, b in zip(self._seen_versions, self._read_versions)]
        waited = max(h.waited_seconds for h in heads)
        self.stats.bound_wait_seconds += waited
        self.metrics.bound_wait_seconds.inc(waited)
        self.stats.versions = self._read_versions
        with torch.no_grad():
            weights = self.pull_buffer(self.clock).to(self.device, non_blocking=True)
            for p, (lo, hi) in zip(self.params, self._offsets):
                p.copy_(weights[lo:hi].view_as(p))
            if self.device.type == "cuda":  # the buffer is written again by a later pull: the copy must be done
                torch.cuda.current_stream(self.device).synchronize()
        if self.pipeline:
            for ahead in range(1, self.prefetch + 1):
                if self.clock + ahead not in self._pending_pulls:
                    self._start_pull(self.clock + ahead, own_lag=ahead)
        self.stats.pulls += 1
        self.stats.pull_wait_seconds += time.perf_counter() - t0

    def push(
        self, samples: int = 0, busy_seconds: float = 0.0, read_versions: Sequence[int] | None = None
    ) -> PushTicket:
        """Send the model's gradients for the current clock, advance the clock, and return at once.

        `samples`: examples the gradients are the mean over (averaging weights them by it);
        `busy_seconds`: the compute time they took (balancing measures speed by it);
        `read_versions`: each shard's version the gradients were computed on (default: the
        last pull's; an older pull's when computing on older weights, e.g. to inject delays).
        Gradients are copied out and zeroed (set to None) before returning. Raises
        ValueError (sending nothing) if any gradient is NaN or Inf.
        """
        t0 = time.perf_counter()
        self._raise_failure()
        while len(self._inflight) >= self.max_inflight:
            self._inflight.pop(0).wait()
        self._inflight = [t for t in self._inflight if not t.done()]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        buf = self._free_grads.pop()
        try:
            if all(g.device.type == "cpu" and g.dtype == torch.float32 for g in grads):
                torch.cat([g.reshape(-1) for g in grads], out=buf)  # one copy, straight into the send buffer
            else:
                buf.copy_(self._flatten(grads))
            if not wire.all_finite(buf):
                raise ValueError(f"gradient at clock {self.clock} contains NaN or Inf; not pushed")
            payloads = self._compress(buf)
        except BaseException:
            self._free_grads.append(buf)
            raise
        for p in self.params:
            p.grad = None
        clock, self.clock = self.clock, self.clock + 1
        versions = list(self._read_versions if read_versions is None else read_versions)
        fut = self._submit(self._push_all(clock, buf, samples, busy_seconds, versions, payloads))
        ticket = PushTicket(clock, fut)
        self._inflight.append(ticket)
        if not self.pipeline:
            self._start_pull(self.clock, own_lag=0)
        self.stats.pushes += 1
        self.stats.push_wait_seconds += time.perf_counter() - t0
        return ticket

    def wait(self) -> None:
        """Block until every push in flight has been answered; raises the first failure."""
        for t in self._inflight:
            try:
                t.wait()
            except Exception:
                pass
        self._inflight.clear()
        self._raise_failure()

    def status(self) -> list[pb.StatusResponse]:
        return self._run(_gather(s.status() for s in self._shards))

    def checkpoint(self) -> list[pb.CheckpointResponse]:
        return self._run(_gather(s.checkpoint() for s in self._shards))

    @property
    def retries(self) -> int:
        return sum(s.retries for s in self._shards)

    # -- internals --------------------------------------------------------------------
    def _compress(self, buf: torch.Tensor) -> list[torch.Tensor] | None:
        """Each shard's push payload under this client's compression (None: float32), and `buf`
        overwritten with exactly the values they decode to (what a gRPC push then sends)."""
        ranges = [(s.lo, s.hi) for s in self.plan.shards]
        if self.compression == "none":
            return None
        if self._feedback is not None:
            return self._feedback.compress(buf, ranges)
        payloads = [compress.encode(self.compression, buf[lo:hi]) for lo, hi in ranges]
        if not all(wire.all_finite(p) for p in payloads):
            raise ValueError(f"gradient at clock {self.clock} overflows {self.compression}; not pushed")
        for p, (lo, hi) in zip(payloads, ranges):
            buf[lo:hi].copy_(p)
        return payloads

    def _flatten(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        if not tensors:
            return torch.empty(0)
        return torch.cat([t.reshape(-1).float() for t in tensors]).cpu()

    def _run(self, coro: Coroutine) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()  # type: ignore[arg-type]

    def _submit(self, coro: Coroutine) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)  # type: ignore[arg-type]

    def _take_pull(self, clock: int) -> concurrent.futures.Future:
        """The pull for `clock`: the one in flight, or a new one; pulls of earlier clocks are cancelled."""
        if clock not in self._pending_pulls:
            self._start_pull(clock, own_lag=0)
        for c in [c for c in self._pending_pulls if c < clock]:
            self._pending_pulls.pop(c).cancel()
        return self._pending_pulls.pop(clock)

    def _start_pull(self, clock: int, own_lag: int) -> None:
        """Put the pull for `clock` in flight. An older pull still in flight into the same buffer
        (`pull_buffer`: pushes without a pull between them) is cancelled first: both writing one
        buffer, the older one's late chunks would overwrite the newer weights. Its cancellation
        reaches the I/O loop before the new pull starts (both go through the loop's FIFO), and
        a cancelled data-plane pull waits for its thread (ShardClient._on_data)."""
        same = self.pull_buffer(clock)
        for c in [c for c in self._pending_pulls if c < clock and self.pull_buffer(c) is same]:
            self._pending_pulls.pop(c).cancel()
        self._pending_pulls[clock] = self._submit(self._pull_all(clock, own_lag=own_lag))

    def _cancel_pulls(self) -> None:
        """Cancel every pull in flight (safe from any thread: Future.cancel is)."""
        pending, self._pending_pulls = self._pending_pulls, {}
        for fut in pending.values():
            fut.cancel()

    def _rejoin(self) -> None:
        self._cancel_pulls()
        self._run(self._register())
        if self._feedback is not None:  # what was owed to the forgotten session is not pushed later
            self._feedback.reset()
        self.stats.reregistrations += 1
        self.metrics.reregistrations.inc()
        log.warning("worker %s was evicted; rejoined at clock %d", self.worker_id, self.clock)

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure


def _is_addresses(value: Any) -> bool:
    """True for a list of "host:port" strings (or one comma-separated string)."""
    if isinstance(value, str):
        return True
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(v, str) for v in value)


async def _gather(coros, return_exceptions: bool = False) -> list:
    """asyncio.gather as a coroutine, so it can be handed to the I/O thread's loop."""
    return list(await asyncio.gather(*coros, return_exceptions=return_exceptions))
