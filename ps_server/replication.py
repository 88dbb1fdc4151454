"""Replicated shards: a shard served by a chain of R processes that apply the same log.

The head (the first member of the shard's configuration) is the only replica that takes
workers' calls. Every state-changing input — Init, Register (with the session the head
chose), Leave, the evictions the head decided, every push — becomes a `ReplicaEntry`
with the next sequence number, which the head sends to every other member (`Replica.Apply`)
under its apply lock; each follower runs the same servicer code on it, in the same order,
so weights, optimizer state, versions, clocks, sessions and averaging buckets stay
bit-identical. Only when every member has applied it does the head apply it itself and
answer the worker: an acknowledged update is on every replica.

Configurations (epoch, members) change only through the arbiter's compare-and-set
(ps_server/arbiter.py): a head drops a follower that failed an entry or a ping; a follower
that heard nothing from its head for the lease promotes itself; a replica that starts (or
lost a vote) joins by state transfer from the head (`Replica.Join`): the head snapshots its
whole state under the apply lock, then streams it to the joiner while workers go on; the
entries applied meanwhile queue for the joiner (at most CATCH_UP_ENTRIES, past which the
head waits for it) and follow the state; only the last few are sent under the lock, with
the arbiter's epoch + 1 that adds the joiner. Replicas refuse entries
of older epochs, and a write needs every member of its epoch, so at most one chain accepts
updates at any time; the rule is in docs/spec.md ("Replicated shards").

Runs on the server's event loop, with the servicer; not thread-safe.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc
import torch

from asyncps_common.security import Security
from protos import service, wire
from protos.asyncps.v1 import ps_pb2 as pb
from ps_server import streams
from ps_server.atomic import to_the_end
from ps_server.errors import NotHead, rejection
from ps_server.transfer import Refused, _receive_bytes, _serialize, load_snapshot, snapshot

if TYPE_CHECKING:
    from ps_server.servicer import Servicer

log = logging.getLogger(__name__)
HEAD, FOLLOWER, JOINING, DEPOSED = "head", "follower", "joining", "deposed"
CATCHING_UP = "catching-up"  # has the state, takes the entries since it, not yet in the chain
CATCH_UP_ENTRIES = 8  # entries (each a gradient copy) queued for a joiner at most; then forward waits
INIT_SECONDS = 30.0  # more time for an Init or a state transfer: a follower's first optimizer is slow to make
TRANSFER_BYTES_PER_SECOND = 50e6  # deadline of a state transfer or a large entry: at least this fast


class _CatchUp:
    """The entries a joining replica still needs, in order (the head's side of a state transfer)."""

    def __init__(self, address: str):
        self.address = address
        self.queue: list[tuple[pb.ReplicaEntry, torch.Tensor | None]] = []
        self.room = asyncio.Event()  # set whenever the queue shrinks (or the transfer ends)


class Replication:
    """One replica's view of its shard's chain, its `Replica` RPCs and its background duties."""

    def __init__(self, servicer: Servicer, me: str, first: bool, arbiter: str, lease: float, sec: Security):
        self.s, self.me, self.first, self.lease = servicer, me, first, lease
        self.shard = servicer.cfg.shard_index
        self.role, self.epoch, self.members, self.seq = JOINING, 0, [me], 0
        self.last_heard = self.acked = 0.0
        self.last_config = pb.ChainConfig()  # the arbiter's answer to a refused Acquire
        self.transfer_seconds: float | None = None  # the last state transfer this replica received or sent
        self.sec = Security(token=sec.token)  # replicas talk plaintext + token (the CLI refuses TLS)
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._catch_up: _CatchUp | None = None  # a joiner being brought up to date (head only)
        self.arbiter_address = arbiter
        servicer.replication = self

    # -- roles ------------------------------------------------------------------------
    @property
    def is_head(self) -> bool:
        return self.role == HEAD

    def check_head(self) -> None:
        """Raise NotHead unless this replica may answer a worker now (head, lease with followers held)."""
        if self.role != HEAD:
            raise NotHead(f"replica {self.me} of shard {self.shard} is {self.role}, not the head: try the next one")
        if len(self.members) > 1 and time.monotonic() > self.acked + 0.8 * self.lease:
            raise NotHead(f"replica {self.me} of shard {self.shard} lost touch with its followers: try the next one")

    def _step_down(self, why: str) -> None:
        if self.role != DEPOSED:
            log.warning("shard %d replica %s steps down (%s); it re-joins by state transfer", self.shard, self.me, why)
        self.role = DEPOSED

    def _channel(self, address: str) -> grpc.aio.Channel:
        ch = self._channels.get(address)
        if ch is None:
            limit = self.s.cfg.max_message_bytes
            opts = [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)]
            opts += [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 500)]
            ch = self._channels[address] = self.sec.aio_channel(address, options=opts)
        return ch

    @property
    def _arbiter(self) -> service.Stub:  # channels are made on the server's event loop, when first used
        return service.Stub(self._channel(self.arbiter_address), self.sec.metadata, name="Arbiter")

    def _replica(self, address: str) -> service.Stub:
        return service.Stub(self._channel(address), self.sec.metadata, name="Replica")

    async def _acquire(self, members: list[str]) -> bool:
        """Ask the arbiter for epoch + 1 with `members`; True if granted (adopted), False if refused."""
        req = pb.AcquireRequest(shard_index=self.shard, from_epoch=self.epoch, caller=self.me, members=members)
        resp = await self._arbiter.Acquire(req, timeout=2 * self.lease)
        if resp.acquired:
            self.epoch, self.members = resp.config.epoch, list(resp.config.members)
            log.warning("shard %d: epoch %d, chain %s", self.shard, self.epoch, ", ".join(self.members))
        else:
            self.last_config = resp.config
        return bool(resp.acquired)

    # -- the head's side --------------------------------------------------------------
    def _timeout(self, tensor: torch.Tensor | None) -> float:
        size = 0 if tensor is None else tensor.numel() * tensor.element_size()
        return 2 * self.lease + size / TRANSFER_BYTES_PER_SECOND

    async def _send(self, address: str, entry: pb.ReplicaEntry, tensor: torch.Tensor | None) -> pb.ApplyResponse:
        timeout = self._timeout(tensor) + (INIT_SECONDS if entry.WhichOneof("op") in ("init", "state") else 0)

        def frames():
            yield wire.encode_frame(pb.Frame(entry=entry))
            if tensor is not None:
                yield from wire.chunk_frames(tensor, self.s.cfg.chunk_bytes)

        return await self._replica(address).Apply(frames(), timeout=timeout)

    async def forward(self, tensor: torch.Tensor | None = None, **op) -> None:
        """Send one input to every follower before the head applies it. Head only, under the apply lock.

        A follower that fails it is dropped (epoch + 1 without it); if the arbiter refuses
        that, this replica was deposed: it steps down and raises NotHead, applying nothing.
        """
        if self.role != HEAD:
            raise NotHead(f"replica {self.me} of shard {self.shard} is no longer the head")
        followers = self.members[1:]
        catch = self._catch_up
        while catch is not None and len(catch.queue) >= CATCH_UP_ENTRIES and catch is self._catch_up:
            catch.room.clear()  # the joiner is that far behind: wait for it (the lock is not needed to drain)
            await catch.room.wait()
        self.seq += 1
        entry = pb.ReplicaEntry(epoch=self.epoch, seq=self.seq, **op)
        if catch is not None and catch is self._catch_up:
            catch.queue.append((entry, None if tensor is None else tensor.clone()))
        if not followers:
            return
        sent = time.monotonic()
        results = await asyncio.gather(*(self._send(a, entry, tensor) for a in followers), return_exceptions=True)
        failed = {a: r for a, r in zip(followers, results) if isinstance(r, BaseException)}
        if failed:
            await self._drop(failed)
        else:
            self.acked = sent

    async def _drop(self, failed: dict[str, BaseException]) -> None:
        for address, exc in failed.items():
            log.warning("shard %d: follower %s failed: %s", self.shard, address, exc)
        keep = [m for m in self.members if m not in failed]
        try:
            ok = await self._acquire(keep)
        except grpc.aio.AioRpcError as exc:
            self._step_down(f"the arbiter is unreachable ({exc.code().name}) to drop {', '.join(failed)}")
            raise NotHead(f"shard {self.shard}: replica {self.me} cannot reach its followers nor the arbiter") from None
        if not ok:
            self._step_down("the arbiter refused to drop a follower: a newer configuration exists")
            raise NotHead(f"replica {self.me} of shard {self.shard} was deposed")
        self.acked = time.monotonic()

    async def _ping(self) -> None:
        sent, epoch = time.monotonic(), self.epoch
        followers = self.members[1:]
        entry = pb.ReplicaEntry(epoch=epoch, seq=self.seq, ping=True)
        results = await asyncio.gather(*(self._send(a, entry, None) for a in followers), return_exceptions=True)
        failed = {a: r for a, r in zip(followers, results) if isinstance(r, BaseException)}
        if not failed:
            self.acked = max(self.acked, sent)
            return
        async with self.s._apply_lock:
            if self.role == HEAD and self.epoch == epoch:
                try:
                    await self._drop(failed)
                except NotHead:
                    pass

    async def Join(self, request: pb.JoinRequest, context) -> pb.JoinResponse:
        """A replica asks to enter the chain: state transfer, then epoch + 1 with it at the end."""
        try:
            if (request.shard_index, request.num_shards) != (self.shard, self.s.cfg.num_shards):
                return await context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"joiner holds shard {request.shard_index} of {request.num_shards}, "
                    f"this chain is shard {self.shard} of {self.s.cfg.num_shards}",
                )
            if not request.address or request.address == self.me:
                return await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad joiner address {request.address!r}")
            self.check_head()
            return await to_the_end(self._admit(request.address))
        except NotHead as exc:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, str(exc), trailing_metadata=((service.REASON_KEY, service.NOT_HEAD),)
            )
        except grpc.aio.AioRpcError as exc:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"state transfer to {request.address} broke off ({exc.code().name}: {exc.details()}); "
                "the chain is unchanged",
            )
        raise AssertionError("unreachable")  # context.abort raises

    async def _admit(self, address: str) -> pb.JoinResponse:
        t0 = time.monotonic()
        async with self.s._apply_lock:
            self.check_head()
            if self._catch_up is not None:
                raise NotHead(f"shard {self.shard}: {self._catch_up.address} is joining; one at a time")
            if address in self.members and not await self._acquire([m for m in self.members if m != address]):
                self._step_down("the arbiter refused to drop a re-joining member: a newer configuration exists")
                raise NotHead(f"replica {self.me} of shard {self.shard} was deposed")
            state = await asyncio.to_thread(snapshot, self.s)  # copies: the only part that holds workers
            catch = self._catch_up = _CatchUp(address)
            epoch, seq = self.epoch, self.seq
            joined = [m for m in self.members if m != address] + [address]
        try:
            blob = await asyncio.to_thread(_serialize, state)
            del state
            entry = pb.ReplicaEntry(epoch=epoch, seq=seq, state=pb.StateEntry(bytes=blob.numel(), members=joined))
            await self._send(address, entry, blob)
            await self._drain(catch, leave=2)  # workers go on meanwhile; their entries queue behind
            async with self.s._apply_lock:
                self.check_head()
                await self._drain(catch)  # the last few
                members = [m for m in self.members if m != address] + [address]
                if not await self._acquire(members):
                    self._step_down("the arbiter refused to admit a joiner: a newer configuration exists")
                    raise NotHead(f"replica {self.me} of shard {self.shard} was deposed")
                self.acked = time.monotonic()
                self._catch_up = None
                try:  # a ping is the joiner's sign it is in the chain (a missed one: the next ping or entry)
                    await self._send(address, pb.ReplicaEntry(epoch=self.epoch, seq=self.seq, ping=True), None)
                except grpc.aio.AioRpcError as exc:
                    log.warning("shard %d: first ping to %s failed: %s", self.shard, address, exc.code().name)
        finally:
            if self._catch_up is catch:
                self._catch_up = None
            catch.room.set()
        self.transfer_seconds = self.acked - t0
        log.warning(
            "shard %d: %s joined after a %.2fs state transfer of %d bytes",
            self.shard,
            address,
            self.transfer_seconds,
            blob.numel(),
        )
        return pb.JoinResponse(epoch=self.epoch, members=self.members, seconds=self.transfer_seconds)

    async def _drain(self, catch: _CatchUp, leave: int = 0) -> None:
        """Send the joiner the entries queued for it, oldest first, until `leave` are left (more
        may queue meanwhile: a joiner never catches a busy head up exactly without its lock)."""
        while len(catch.queue) > leave:
            entry, tensor = catch.queue[0]
            await self._send(catch.address, entry, tensor)
            catch.queue.pop(0)
            catch.room.set()

    # -- the followers' side ----------------------------------------------------------
    async def Apply(self, frames: AsyncIterator[bytes], context) -> pb.ApplyResponse:
        try:
            entry = await streams.first_head(frames, "entry")
            return await self._apply_entry(entry, frames)
        except Refused as exc:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                str(exc),
                trailing_metadata=((service.REASON_KEY, exc.reason),) if exc.reason else (),
            )
        except Exception as exc:
            status = rejection(exc)
            if status is None:
                raise
            await context.abort(status[0], status[1])
        raise AssertionError("unreachable")

    async def _apply_entry(self, entry: pb.ReplicaEntry, frames: AsyncIterator[bytes]) -> pb.ApplyResponse:
        op = entry.WhichOneof("op")
        if entry.epoch < self.epoch:
            raise Refused(f"entry of epoch {entry.epoch}; this replica is at epoch {self.epoch}", service.STALE_EPOCH)
        if op == "state":
            return await self._receive_state(entry, frames)
        if self.role == HEAD and entry.epoch > self.epoch:
            self._step_down(f"a head of epoch {entry.epoch} exists")
        if self.role not in (FOLLOWER, CATCHING_UP):
            raise Refused(f"replica {self.me} is {self.role}, not a follower: it must join first")
        if op == "ping":  # only members are pinged: a joiner that gets one is in the chain
            self.epoch, self.last_heard, self.role = entry.epoch, time.monotonic(), FOLLOWER
            return pb.ApplyResponse(epoch=self.epoch)
        if entry.seq != self.seq + 1:
            raise Refused(f"entry {entry.seq} does not follow {self.seq}: this replica must join again")
        self.epoch, self.last_heard = entry.epoch, time.monotonic()
        s = self.s
        tensor = None
        if op == "init":
            tensor = await streams.receive_flat(frames, entry.init.numel)
        elif op == "push":
            if s.store is None:
                raise Refused("push before Init")
            pool, numel = s._grad_buffers, s.store.numel
            buf = pool.pop() if pool and pool[-1].numel() == numel else torch.empty(numel)
            try:
                tensor = await streams.receive_flat(frames, numel, buf)
            except BaseException:
                s.release(buf)
                raise
        await to_the_end(self._execute(op, entry, tensor))
        self.seq = entry.seq
        return pb.ApplyResponse(epoch=self.epoch, version=s.store.version if s.store else 0)

    async def _execute(self, op: str | None, entry: pb.ReplicaEntry, tensor: torch.Tensor | None) -> None:
        s = self.s
        async with s._apply_lock:
            if op == "register":
                s.register_locked(entry.register.request, entry.register.session)
                await s._settle()
            elif op == "leave":
                s.leave_now(entry.leave)
                await s._settle()
            elif op == "split":
                s._balancer.adopt(entry.split.clock, dict(entry.split.batches))
            elif op == "evict":
                s.evicted(s.clocks.evict(list(entry.evict.worker_ids)))
                await s._settle()
            elif op == "init":
                if s.store is not None:
                    raise Refused("Init of an initialized replica: this replica must join again")
                s.init_store(entry.init, tensor, entry.init.staleness)  # type: ignore[arg-type]
            elif op == "push":
                adopted = False
                try:
                    s.clocks.check_push(entry.push.worker_id, entry.push.session, entry.push.clock)
                    _, adopted = await s.push_locked(s.store, entry.push, tensor)  # type: ignore[arg-type]
                finally:
                    if not adopted:
                        s.release(tensor)  # type: ignore[arg-type]
            else:
                raise Refused(f"unknown entry {op!r}")

    async def _receive_state(self, entry: pb.ReplicaEntry, frames: AsyncIterator[bytes]) -> pb.ApplyResponse:
        if self.role not in (JOINING, DEPOSED):
            raise Refused(f"replica {self.me} is {self.role}: it takes a state transfer only while joining")
        t0 = time.monotonic()
        blob = await _receive_bytes(frames, entry.state.bytes)
        try:
            state = await asyncio.to_thread(torch.load, io.BytesIO(blob), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise Refused(f"the state transfer does not load: {exc}") from None
        async with self.s._apply_lock:
            load_snapshot(self.s, state)
        self.epoch, self.members, self.seq = entry.epoch, list(entry.state.members), entry.seq
        self.role, self.last_heard = CATCHING_UP, time.monotonic()
        self.transfer_seconds = self.last_heard - t0
        return pb.ApplyResponse(epoch=self.epoch, version=self.s.store.version if self.s.store else 0)

    # -- background -------------------------------------------------------------------
    async def run(self) -> None:
        """Join, promote, ping: every quarter lease, until cancelled."""
        while True:
            try:
                if self.role in (JOINING, DEPOSED):
                    await self._try_join()
                elif self.role == FOLLOWER and time.monotonic() - self.last_heard > self._patience():
                    await self._promote()
                elif self.role == HEAD and len(self.members) > 1:
                    await self._ping()
            except grpc.aio.AioRpcError as exc:
                log.info(
                    "shard %d replica %s (%s): %s %s", self.shard, self.me, self.role, exc.code().name, exc.details()
                )
            await asyncio.sleep(self.lease / 4)

    async def _try_join(self) -> None:
        cfg = await self._arbiter.Config(pb.ConfigRequest(shard_index=self.shard), timeout=2 * self.lease)
        if cfg.epoch == 0 or list(cfg.members) == [self.me]:  # the first configuration, or the last one standing
            if cfg.epoch == 0 and not self.first:
                return
            async with self.s._apply_lock:
                self.epoch = cfg.epoch
                if await self._acquire([self.me]):
                    self.role, self.acked, self.seq = HEAD, time.monotonic(), 0
                    self.s.clocks.touch_all()
            return
        head = cfg.members[0]
        if head == self.me:
            return  # listed as head but restarted without its state: a follower promotes itself first
        req = pb.JoinRequest(address=self.me, shard_index=self.shard, num_shards=self.s.cfg.num_shards)
        try:
            resp = await self._replica(head).Join(req, timeout=60 + self._timeout(None))
        except grpc.aio.AioRpcError:
            if self.role in (FOLLOWER, CATCHING_UP):
                self.role = JOINING  # the state arrived but the chain did not take it: not serving
            raise
        self.epoch, self.members = max(self.epoch, resp.epoch), list(resp.members)
        if self.role == CATCHING_UP:
            self.role, self.last_heard = FOLLOWER, time.monotonic()
        log.warning(
            "shard %d: %s joined the chain %s (epoch %d)", self.shard, self.me, ", ".join(self.members), self.epoch
        )

    def _patience(self) -> float:
        """The lease, and half a lease more per place further down the chain: the first follower
        takes over first, so followers do not race each other for the next epoch (R >= 3)."""
        place = self.members.index(self.me) if self.me in self.members else len(self.members)
        return self.lease * (1 + 0.5 * max(0, place - 1))

    async def _promote(self) -> None:
        async with self.s._apply_lock:
            if self.role != FOLLOWER or time.monotonic() - self.last_heard <= self._patience():
                return
            # the chain in force (entries carry the epoch, not the members): keep every other follower
            cfg = await self._arbiter.Config(pb.ConfigRequest(shard_index=self.shard), timeout=2 * self.lease)
            if cfg.epoch >= self.epoch and self.me in cfg.members:
                self.epoch, self.members = cfg.epoch, list(cfg.members)
            members = [self.me] + [m for m in self.members[1:] if m != self.me]
            if await self._acquire(members):
                self.role, self.acked = HEAD, time.monotonic()
                self.s.clocks.touch_all()  # liveness was the old head's business
                log.warning(
                    "shard %d: %s took over as head (nothing from the head for %.1fs)", self.shard, self.me, self.lease
                )
                return
            cfg = self.last_config
            if self.me not in cfg.members:
                self._step_down(f"epoch {cfg.epoch} left it out")
            else:  # another member leads a newer epoch that keeps this replica: wait for its entries
                self.epoch, self.members, self.last_heard = cfg.epoch, list(cfg.members), time.monotonic()

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.close()
