"""Property-based fuzzing (hypothesis) of ONE live `ps-server`: hostile requests never
crash it, each gets the status code SPEC lists for its kind, and nothing changes.

The server (module-scoped) holds a known 1000-element shard (plain SGD), worker "w" is
registered and one update was applied, so there are weights, a clock and a checksum.
Requests go over one raw channel with identity serializers, so any bytes at all can be
sent. After every case the test asks Status (weights checksum included): version,
checksum, clocks and counters must be exactly as before, and the health check must
still say SERVING. The generated kinds:

* random bytes as the body of every unary method and as the frames of Init/Push
  streams (the expected code comes from decoding the same bytes with the project's own
  codec: undecodable -> INVALID_ARGUMENT, decodable but naming an unknown worker or
  plan -> FAILED_PRECONDITION);
* pushes built from a valid gradient cut into random chunks sent in random order, with
  one defect: wrong dtype, wrong shape, declared size disagreeing with the payload,
  huge declared sizes, offsets past the end, missing / duplicate / overlapping chunks,
  NaN/Inf, a second header, a truncated or random frame (INVALID_ARGUMENT); unknown
  worker, stale session, wrong plan (FAILED_PRECONDITION); an already applied clock
  (ALREADY_EXISTS); a frame over --max-message-bytes (RESOURCE_EXHAUSTED). Controls:
  the same pushes without a defect, in random order, are accepted (the baseline moves
  on by exactly one update);
* streams cut mid-way: a push or a pull the client cancels after a random number of
  frames (CANCELLED), a pull held by read-my-writes cut by its deadline
  (DEADLINE_EXCEEDED);
The control requests and pulls are fuzzed against the same kind of server in
test_fuzz_control.py, the TCP data plane in test_fuzz_dataplane.py.

EXAMPLES sets how many cases each property runs (3,350 in all, with theirs).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from asyncps_common.optimizer import default_config
from protos import service, wire
from protos.asyncps.v1 import ps_pb2 as pb

from .support import invoke

pytestmark = pytest.mark.slow  # real clusters or long runs: left out of the quick loop (-m "not slow")

N = 1000
PLAN = "f" * 64
MAX_MESSAGE = 64 * 1024
LIMITS = dict(max_message_bytes=MAX_MESSAGE, chunk_bytes=32 * 1024, heartbeat_timeout=3600)
TIMEOUT = 10.0
Code = grpc.StatusCode
EXAMPLES = {"random_bytes": 1000, "push": 1200, "control": 700, "cut": 150, "data": 300}
FUZZ = dict(
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)
UNARY = {
    "Register": pb.RegisterRequest,
    "Heartbeat": pb.HeartbeatRequest,
    "Leave": pb.LeaveRequest,
    "Pull": pb.PullRequest,
    "Status": pb.StatusRequest,
    "Checkpoint": pb.CheckpointRequest,
}


@dataclass
class Live:
    """The live server, raw callables for every method, and what its state must be."""

    address: str
    channel: grpc.Channel
    session: int = 0
    baseline: tuple = ()
    cases: int = 0

    def method(self, name: str):
        path = f"/{service.SERVICE_NAME}/{name}"
        if name in ("Init", "Push"):
            return self.channel.stream_unary(path)
        if name == "Pull":
            return self.channel.unary_stream(path)
        return self.channel.unary_unary(path)

    def status(self) -> pb.StatusResponse:
        raw = self.method("Status")(pb.StatusRequest(include_checksum=True).SerializeToString(), timeout=TIMEOUT)
        return pb.StatusResponse.FromString(raw)

    def snapshot(self) -> tuple:
        s = self.status()
        return (
            s.initialized,
            s.plan_hash,
            s.version,
            s.weights_checksum,
            s.pushes_applied,
            s.live_workers,
            tuple((c.worker_id, c.clock) for c in s.clocks),
            s.optimizer.SerializeToString(),
        )

    @property
    def clock(self) -> int:
        return self.clock_of(self.baseline)

    @property
    def version(self) -> int:
        return self.baseline[2]

    def send(self, name: str, body, timeout: float = TIMEOUT) -> tuple[Code, str]:
        """One raw call: `body` is bytes (unary request) or a list of frames (Init/Push)."""
        code, details, _ = invoke(self.method(name), name, body, timeout)
        return code, details

    def expect(self, name: str, body, want: Code, timeout: float = TIMEOUT, changes: bool = False) -> None:
        """Send; the code must be `want`; the server must still serve, its state unchanged
        (or, with `changes`, moved on by exactly one update of worker "w")."""
        self.cases += 1
        code, details = self.send(name, body, timeout)
        try:
            assert code == want, f"{name}: expected {want.name}, got {code.name}: {details!r}"
            assert code == Code.OK or details, "a rejection must say why"
        except AssertionError:
            self.check(None)
            raise
        self.check(changes)

    def check(self, changes: bool | None = False) -> bool:
        """Still SERVING, and the state unchanged (`changes` False), moved on by exactly one whole
        update of "w" (True), or either (None). Returns whether it moved on."""
        health = health_pb2_grpc.HealthStub(self.channel)
        assert (
            health.Check(health_pb2.HealthCheckRequest(service=service.SERVICE_NAME), timeout=TIMEOUT).status
            == health_pb2.HealthCheckResponse.SERVING
        )
        now, before = self.snapshot(), self.baseline
        self.baseline = now  # a failing case fails alone: the next ones compare with what is there now
        one_update = (
            now[2] == before[2] + 1
            and now[4] == before[4] + 1
            and now[6] == (("w", self.clock_of(before) + 1),)
            and now[:2] == before[:2]
            and now[5] == before[5]
            and now[7] == before[7]
        )
        if changes is None and now != before:
            assert one_update, f"expected no change or one whole update:\n{before}\n{now}"
        elif changes:
            assert one_update, f"expected exactly one update:\n{before}\n{now}"
        elif changes is False:
            assert now == before, f"a rejected request changed the shard:\n{before}\n{now}"
        return now != before

    @staticmethod
    def clock_of(snapshot: tuple) -> int:
        return snapshot[6][0][1]


@pytest.fixture(scope="module")
def live(start_module_server):
    server = start_module_server(**LIMITS)
    channel = grpc.insecure_channel(server.address, options=[("grpc.max_send_message_length", 1 << 24)])
    t = Live(server.address, channel)
    head = pb.InitHeader(
        plan_hash=PLAN, shard_index=0, num_shards=1, numel=N, worker_id="w", optimizer=default_config("sgd", lr=1e-3)
    )
    weights = torch.randn(N, generator=torch.Generator().manual_seed(0))
    assert t.send("Init", [wire.encode_frame(pb.Frame(init=head))] + chunk_frames(weights, [0, N]))[0] == Code.OK
    resp = t.method("Register")(pb.RegisterRequest(worker_id="w", plan_hash=PLAN).SerializeToString(), timeout=TIMEOUT)
    t.session = pb.RegisterResponse.FromString(resp).session
    t.baseline = t.snapshot()
    t.expect("Push", [push_head(t)] + chunk_frames(gradient(), [0, N]), Code.OK, changes=True)
    assert t.version == 1 and t.clock == 1
    yield t
    channel.close()
    total = t.cases
    print(f"\nfuzz: {total} cases against one live server; it served them all")


# -- building requests --------------------------------------------------------------------------


def gradient(seed: int = 1) -> torch.Tensor:
    return torch.randn(N, generator=torch.Generator().manual_seed(seed)) * 0.01


def push_head(t: Live, **override) -> bytes:
    fields = dict(worker_id="w", session=t.session, plan_hash=PLAN, clock=t.clock, read_version=t.version)
    fields.update(override)
    return wire.encode_frame(pb.Frame(push=pb.PushHeader(**fields)))


def chunk_frames(g: torch.Tensor, cuts: list[int]) -> list[bytes]:
    """Frames for g[cuts[i]:cuts[i+1]], in order."""
    return [wire.encode_frame(tensor=g[lo:hi], offset=lo) for lo, hi in zip(cuts, cuts[1:])]


def raw_frame(offset: int, dtype: int, shape: list[int], payload: bytes) -> bytes:
    """A protobuf-valid frame whose declared header need not agree with its payload."""
    return pb.Frame(tensor=pb.TensorHeader(offset=offset, dtype=dtype, shape=shape), data=payload).SerializeToString()


@st.composite
def layouts(draw) -> tuple[list[int], list[int]]:
    """Random chunk boundaries over [0, N) and a random sending order of the chunks."""
    inner = sorted(draw(st.sets(st.integers(1, N - 1), max_size=12)))
    cuts = [0, *inner, N]
    order = draw(st.permutations(range(len(cuts) - 1)))
    return cuts, list(order)


def expected_for_random(name: str, body) -> Code:
    """What the server must answer random bytes with, decided by the project's own codec."""
    if name in UNARY:
        try:
            req = UNARY[name].FromString(body)
        except Exception:
            return Code.INVALID_ARGUMENT
        if name == "Register":
            return Code.INVALID_ARGUMENT if not req.worker_id else Code.FAILED_PRECONDITION
        if name in ("Heartbeat", "Leave"):
            assume(req.worker_id != "w")  # a real worker's heartbeat is a valid request
            return Code.FAILED_PRECONDITION
        if name == "Pull":
            assume(req.plan_hash != PLAN)
            return Code.FAILED_PRECONDITION
        return Code.FAILED_PRECONDITION if name == "Checkpoint" else Code.OK  # no --checkpoint-dir; Status
    if not body:
        return Code.INVALID_ARGUMENT
    kind = "init" if name == "Init" else "push"
    try:
        frame, payload = wire.decode_frame(body[0])
    except wire.FrameError:
        return Code.INVALID_ARGUMENT
    if frame.WhichOneof("head") != kind or payload is not None:
        return Code.INVALID_ARGUMENT
    head = getattr(frame, kind)
    assume(head.plan_hash != PLAN)
    return Code.FAILED_PRECONDITION  # (an Init's wrong shard is FAILED_PRECONDITION too)


VALID_HEADS = [
    wire.encode_frame(pb.Frame(push=pb.PushHeader(worker_id="w", session=1, plan_hash="x" * 64, clock=1))),
    wire.encode_frame(pb.Frame(init=pb.InitHeader(plan_hash="x" * 64, shard_index=0, num_shards=1, numel=N))),
]


@st.composite
def random_frame(draw) -> bytes:
    """Random bytes, or a real header / chunk frame with a few bytes changed, cut or added."""
    base = draw(st.sampled_from(["random", *range(len(VALID_HEADS)), "chunk"]))
    if base == "random":
        return draw(st.binary(max_size=300))
    data = bytearray(VALID_HEADS[base] if base != "chunk" else wire.encode_frame(tensor=gradient()[:16], offset=5))
    for _ in range(draw(st.integers(1, 4))):
        op, pos = draw(st.sampled_from(["set", "cut", "insert"])), draw(st.integers(0, len(data)))
        if op == "set" and pos < len(data):
            data[pos] = draw(st.integers(0, 255))
        elif op == "cut":
            del data[pos:]
        else:
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
    return bytes(data)


# -- properties -------------------------------------------------------------------------------


@settings(max_examples=EXAMPLES["random_bytes"], **FUZZ)
@given(
    name=st.sampled_from([*UNARY, "Init", "Push"]),
    unary=st.binary(max_size=300),
    frames=st.lists(random_frame(), max_size=4),
)
def test_random_bytes(live, name, unary, frames):
    body = frames if name in ("Init", "Push") else unary
    live.expect(name, body, expected_for_random(name, body))


PUSH_DEFECTS = [
    "control",
    "dtype",
    "shape",
    "declared-size",
    "huge-size",
    "offset-past-end",
    "gap",
    "duplicate",
    "overlap",
    "nan-inf",
    "second-header",
    "truncated",
    "random-chunk",
    "unknown-worker",
    "stale-session",
    "wrong-plan",
    "old-clock",
    "oversized-frame",
    "empty",
]


@settings(max_examples=EXAMPLES["push"], **FUZZ)
@given(defect=st.sampled_from(PUSH_DEFECTS), layout=layouts(), data=st.data())
def test_malformed_push(live, defect, layout, data):
    cuts, order = layout
    g = gradient(data.draw(st.integers(0, 2**16), label="seed"))
    chunks = [(cuts[i], cuts[i + 1]) for i in order]  # (lo, hi) in sending order
    frames = [wire.encode_frame(tensor=g[lo:hi], offset=lo) for lo, hi in chunks]
    victim = data.draw(st.integers(0, len(frames) - 1), label="victim")
    lo, hi = chunks[victim]
    head = push_head(live)
    want, applied = Code.INVALID_ARGUMENT, False
    if defect == "control":
        want, applied = Code.OK, True
    elif defect == "dtype":
        dtype = data.draw(st.sampled_from([d for d in wire.TORCH_TO_WIRE if d != torch.float32]), label="dtype")
        frames[victim] = wire.encode_frame(tensor=g[lo:hi].to(dtype), offset=lo)
    elif defect == "shape":
        piece = g[lo:hi]
        shaped = piece.view(1, -1) if data.draw(st.booleans()) or piece.numel() != 1 else piece.view(())
        frames[victim] = wire.encode_frame(tensor=shaped, offset=lo)
    elif defect == "declared-size":
        declared = data.draw(st.integers(0, 4 * N).filter(lambda n: n != hi - lo), label="declared")
        frames[victim] = raw_frame(lo, pb.FLOAT32, [declared], g[lo:hi].numpy().tobytes())
    elif defect == "huge-size":
        shape = data.draw(st.lists(st.integers(2**31, 2**64 - 1), min_size=1, max_size=3), label="shape")
        frames[victim] = raw_frame(lo, pb.FLOAT32, shape, g[lo:hi].numpy().tobytes())
    elif defect == "offset-past-end":
        off = data.draw(st.integers(N - (hi - lo) + 1, 2**64 - 1), label="offset")
        frames[victim] = wire.encode_frame(tensor=g[lo:hi], offset=off)
    elif defect == "gap":
        del frames[victim]
    elif defect == "duplicate":
        frames.insert(data.draw(st.integers(0, len(frames)), label="at"), frames[victim])
    elif defect == "overlap":
        a = data.draw(st.integers(0, N - 2), label="a")
        b = data.draw(st.integers(a + 1, N), label="b")
        frames.insert(data.draw(st.integers(0, len(frames)), label="at"), wire.encode_frame(tensor=g[a:b], offset=a))
    elif defect == "nan-inf":
        bad = g.clone()
        bad[data.draw(st.integers(lo, hi - 1), label="where")] = data.draw(
            st.sampled_from([math.nan, math.inf, -math.inf]), label="value"
        )
        frames[victim] = wire.encode_frame(tensor=bad[lo:hi], offset=lo)
    elif defect == "second-header":
        frames.insert(data.draw(st.integers(0, len(frames)), label="at"), push_head(live))
    elif defect == "truncated":
        frames[victim] = frames[victim][: data.draw(st.integers(0, len(frames[victim]) - 1), label="cut")]
    elif defect == "random-chunk":
        junk = data.draw(random_frame(), label="junk")
        try:
            frame, payload = wire.decode_frame(junk)
            chunk = wire.payload_tensor(frame, payload)
            assume(not (frame.tensor.offset == lo and chunk.dtype == torch.float32 and chunk.shape == (hi - lo,)))
        except wire.FrameError:
            pass
        frames[victim] = junk
    elif defect == "unknown-worker":
        head = push_head(live, worker_id=data.draw(st.text(max_size=20).filter(lambda w: w != "w"), label="who"))
        want = Code.FAILED_PRECONDITION
    elif defect == "stale-session":
        session = data.draw(st.integers(0, 2**64 - 2), label="session")
        head = push_head(live, session=session if session != live.session else session + 1)
        want = Code.FAILED_PRECONDITION
    elif defect == "wrong-plan":
        head = push_head(live, plan_hash=data.draw(st.text(max_size=70).filter(lambda p: p != PLAN), label="plan"))
        want = Code.FAILED_PRECONDITION
    elif defect == "old-clock":
        head = push_head(live, clock=data.draw(st.integers(0, 2**20), label="clock") % live.clock)
        want = Code.ALREADY_EXISTS
    elif defect == "oversized-frame":
        at = data.draw(st.integers(0, len(frames)), label="at")
        frames.insert(at, bytes(data.draw(st.integers(MAX_MESSAGE + 1, 2 * MAX_MESSAGE), label="size")))
        # After a whole gradient, gRPC ends the stream for the handler as if it were complete, then
        # fails the call: the push is applied once, its clock advanced (a retry: ALREADY_EXISTS).
        want, applied = Code.RESOURCE_EXHAUSTED, at == len(frames) - 1
    elif defect == "empty":
        head, frames = None, []
    live.expect("Push", ([head] if head is not None else []) + frames, want, changes=applied)


@settings(max_examples=EXAMPLES["cut"], **FUZZ)
@given(what=st.sampled_from(["push", "pull", "held-pull"]), keep=st.integers(0, 20), layout=layouts())
def test_streams_cut_midway(live, what, keep, layout):
    live.cases += 1
    if what == "held-pull":  # read-my-writes holds clock + 1 until w pushes it: the deadline cuts it
        req = pb.PullRequest(worker_id="w", session=live.session, plan_hash=PLAN, clock=live.clock + 1)
        code, _ = live.send("Pull", req.SerializeToString(), timeout=0.02 + keep / 1000)
        assert code == Code.DEADLINE_EXCEEDED
    elif what == "pull":
        req = pb.PullRequest(worker_id="w", session=live.session, plan_hash=PLAN, clock=live.clock, chunk_bytes=16)
        call = live.method("Pull")(req.SerializeToString(), timeout=TIMEOUT)
        for i, _ in enumerate(call):
            if i >= keep:
                break
        call.cancel()
        assert call.code() == Code.CANCELLED
    else:
        cuts, order = layout
        frames = [push_head(live)] + [
            wire.encode_frame(tensor=gradient()[cuts[i] : cuts[i + 1]], offset=cuts[i]) for i in order
        ]
        frames = frames[: keep + 1]  # maybe every chunk, but the stream is never closed: cancelled, not ended
        whole = len(frames) == len(order) + 1
        sent, stop = threading.Event(), threading.Event()

        def stream():
            yield from frames
            sent.set()
            stop.wait(TIMEOUT)  # the stream stays open until the client cancels it

        future = live.method("Push").future(stream(), timeout=TIMEOUT)
        assert sent.wait(TIMEOUT)
        future.cancel()
        stop.set()
        assert future.cancelled() or future.code() == Code.CANCELLED
        if whole:
            # gRPC ends a cancelled stream for the handler like a complete one: a gradient that
            # arrived whole may be applied (maybe a moment later). Sending it again, properly, must
            # then be refused as a repeat, or else be applied: either way exactly one update, never two.
            code, details = live.send("Push", frames)
            assert code in (Code.OK, Code.ALREADY_EXISTS), f"{code.name}: {details}"
            live.check(True)
            return
    live.check()
