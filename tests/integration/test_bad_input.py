"""SPEC 'Errors and bad input': every rejection has its status code and changes nothing.

Requests are crafted by hand (`protos.service.Stub` over a plain gRPC channel, frames from
`protos.wire.encode_frame`) against two real servers sharing this module:

* "ready": initialized (shard 0 of 1, 30000 elements, SGD with momentum), worker "w"
  registered and one update applied, so there is optimizer state to corrupt;
* "blank": never initialized.

Both run with --max-message-bytes 64 KiB and --max-shard-bytes 128 KiB. Each case compares
the server's Status (version, weights checksum, clocks, ...) before and after: a rejected
request must leave it exactly as it was. A final test sends the same kinds of requests
well-formed and sees them accepted, so the cases fail for the reason they name.

The `ps-server` command line's bad flags and files are in test_bad_input_cli.py.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import grpc
import pytest
import torch

from asyncps_common.optimizer import default_config
from protos import service, wire
from protos.asyncps.v1 import ps_pb2 as pb

from .support import RPC_TIMEOUT, call, clock_of, status, stub

N = 30_000  # elements in the shard: 120 KB, more than one 64 KiB message
CHUNK = 4096  # elements per well-formed chunk frame (16 KB)
PLAN, BAD_PLAN = "a" * 64, "b" * 64
LIMITS = dict(
    max_message_bytes=64 * 1024, chunk_bytes=32 * 1024, max_shard_bytes=128 * 1024, heartbeat_timeout=3600, staleness=0
)
OPTIMIZER = default_config("sgd", lr=0.1, momentum=0.9)
Code = grpc.StatusCode


@dataclass
class Target:
    address: str
    port: int
    session: int = 0  # worker "w"'s session (ready server)


def chunks(flat: torch.Tensor, step: int = CHUNK) -> list[bytes]:
    return [wire.encode_frame(tensor=flat[lo : lo + step], offset=lo) for lo in range(0, flat.numel(), step)]


def init_frames(
    plan: str = PLAN,
    shard_index: int = 0,
    num_shards: int = 1,
    numel: int = N,
    weights: torch.Tensor | None = None,
    optimizer: pb.OptimizerConfig = OPTIMIZER,
) -> list[bytes]:
    head = pb.InitHeader(
        plan_hash=plan, shard_index=shard_index, num_shards=num_shards, numel=numel, optimizer=optimizer, worker_id="w"
    )
    w = torch.randn(numel, generator=torch.Generator().manual_seed(0)) if weights is None else weights
    return [wire.encode_frame(pb.Frame(init=head))] + chunks(w)


def grad(seed: int = 1) -> torch.Tensor:
    return torch.randn(N, generator=torch.Generator().manual_seed(seed)) * 0.01


def push_head(t: Target, st: pb.StatusResponse, **override) -> bytes:
    fields = dict(
        worker_id="w", session=t.session, plan_hash=PLAN, clock=clock_of(st, "w") or 0, read_version=st.version
    )
    fields.update(override)
    return wire.encode_frame(pb.Frame(push=pb.PushHeader(**fields)))


def pull_request(t: Target, st: pb.StatusResponse, **override) -> pb.PullRequest:
    fields = dict(worker_id="w", session=t.session, plan_hash=PLAN, clock=clock_of(st, "w") or 0)
    fields.update(override)
    return pb.PullRequest(**fields)


def snapshot(address: str) -> dict:
    """Everything a rejected request must leave alone."""
    st = status(address)
    return dict(
        initialized=st.initialized,
        version=st.version,
        checksum=st.weights_checksum,
        numel=st.numel,
        plan_hash=st.plan_hash,
        pushes_applied=st.pushes_applied,
        live=st.live_workers,
        min_clock=st.min_clock,
        clocks=[(c.worker_id, c.clock) for c in st.clocks],
        optimizer=st.optimizer.SerializeToString(),
        staleness=st.staleness,
    )


@pytest.fixture(scope="module")
def servers(start_module_server) -> dict[str, Target]:
    pending = [start_module_server.launch(**LIMITS), start_module_server.launch(**LIMITS)]
    ready, blank = (p.ready() for p in pending)
    t = Target(ready.address, ready.port)
    with stub(t.address) as s:
        resp = s.Init(iter(init_frames()), timeout=RPC_TIMEOUT)
        assert resp.accepted
        t.session = s.Register(pb.RegisterRequest(worker_id="w", plan_hash=PLAN), timeout=RPC_TIMEOUT).session
    st = status(t.address)
    code, details, _ = call(t.address, "Push", [push_head(t, st)] + chunks(grad()))
    assert code == Code.OK, details
    st = status(t.address)
    assert st.version == 1 and clock_of(st, "w") == 1
    return {"ready": t, "blank": Target(blank.address, blank.port)}


def _mixed(lo_hi: list[tuple[int, int]], g: torch.Tensor) -> list[bytes]:
    """Frames covering exactly the ranges [lo, hi) given, in that order (each cut into CHUNK-sized frames)."""
    return [
        wire.encode_frame(tensor=g[a : min(a + CHUNK, hi)], offset=a) for lo, hi in lo_hi for a in range(lo, hi, CHUNK)
    ]


def _truncated_second_chunk(g: torch.Tensor) -> list[bytes]:
    frames = chunks(g)
    frames[1] = frames[1][: len(frames[1]) // 2]  # cut mid-payload
    return frames


def _with_value(value: float) -> torch.Tensor:
    g = grad()
    g[N // 2] = value
    return g


RANDOM = random.Random(0).randbytes(300)

# (id, server, expected code, build(target, status) -> (method, request), expected asyncps-reason or None)
CASES = [
    # -- unknown worker / stale session: FAILED_PRECONDITION, tagged so the client re-registers
    (
        "push-unknown-worker",
        "ready",
        Code.FAILED_PRECONDITION,
        lambda t, st: ("Push", [push_head(t, st, worker_id="ghost")] + chunks(grad())),
        service.UNKNOWN_WORKER,
    ),
    (
        "push-stale-session",
        "ready",
        Code.FAILED_PRECONDITION,
        lambda t, st: ("Push", [push_head(t, st, session=t.session + 1)] + chunks(grad())),
        service.UNKNOWN_WORKER,
    ),
    (
        "pull-unknown-worker",
        "ready",
        Code.FAILED_PRECONDITION,
        lambda t, st: ("Pull", pull_request(t, st, worker_id="ghost")),
        service.UNKNOWN_WORKER,
    ),
    (
        "heartbeat-unknown-worker",
        "ready",
        Code.FAILED_PRECONDITION,
        lambda t, st: ("Heartbeat", pb.HeartbeatRequest(worker_id="ghost", session=1)),
        service.UNKNOWN_WORKER,
    ),
    (
        "leave-stale-session",
        "ready",
        Code.FAILED_PRECONDITION,
        lambda t, st: ("Leave", pb.LeaveRequest(worker_id="w", session=t.session + 1)),
        service.UNKNOWN_WORKER,
    ),
    # -- wrong plan: FAILED_PRECONDITION
    (
        "register-wrong-plan",
        "ready",
        Code.FAILED_PRECONDITION,
        lambda t, st: ("Register", pb.RegisterRequest(worker_id="intruder", plan_hash=BAD_PLAN)),
        None,
    ),
    ("init-wrong-plan", "ready", Code.FAILED_PRECONDITION, lambda t, st: ("Init", init_frames(plan=BAD_PLAN)), None),
    (
        "push-wrong-plan",
        "ready",
        Code.FAILED_PRECONDITION,
        lambda t, st: ("Push", [push_head(t, st, plan_hash=BAD_PLAN)] + chunks(grad())),
        None,
    ),
    (
        "pull-wrong-plan",
        "ready",
        Code.FAILED_PRECONDITION,
        lambda t, st: ("Pull", pull_request(t, st, plan_hash=BAD_PLAN)),
        None,
    ),
    (
        "init-wrong-shard-index",
        "ready",
        Code.FAILED_PRECONDITION,
        lambda t, st: ("Init", init_frames(shard_index=1, num_shards=2)),
        None,
    ),
    (
        "init-wrong-shard-index-blank",
        "blank",
        Code.FAILED_PRECONDITION,
        lambda t, st: ("Init", init_frames(shard_index=1, num_shards=2)),
        None,
    ),
    # -- before Init: FAILED_PRECONDITION
    (
        "pull-before-init",
        "blank",
        Code.FAILED_PRECONDITION,
        lambda t, st: ("Pull", pull_request(t, st, session=1)),
        None,
    ),
    (
        "push-before-init",
        "blank",
        Code.FAILED_PRECONDITION,
        lambda t, st: ("Push", [push_head(t, st, session=1)] + chunks(grad())),
        None,
    ),
    # -- malformed gradients: INVALID_ARGUMENT, not applied
    (
        "push-float64-chunk",
        "ready",
        Code.INVALID_ARGUMENT,
        lambda t, st: ("Push", [push_head(t, st)] + chunks(grad().double())),
        None,
    ),
    (
        "push-2d-chunk",
        "ready",
        Code.INVALID_ARGUMENT,
        lambda t, st: (
            "Push",
            [push_head(t, st), wire.encode_frame(tensor=grad()[:10000].view(100, 100))] + _mixed([(10000, N)], grad()),
        ),
        None,
    ),
    (
        "push-chunk-past-end",
        "ready",
        Code.INVALID_ARGUMENT,
        lambda t, st: (
            "Push",
            [push_head(t, st)]
            + _mixed([(0, N - 10)], grad())
            + [wire.encode_frame(tensor=torch.zeros(20), offset=N - 10)],
        ),
        None,
    ),
    (
        "push-overlapping-chunks",
        "ready",
        Code.INVALID_ARGUMENT,
        lambda t, st: ("Push", [push_head(t, st)] + _mixed([(0, 20000), (19000, N)], grad())),
        None,
    ),
    (
        "push-duplicate-chunk",
        "ready",
        Code.INVALID_ARGUMENT,
        lambda t, st: ("Push", [push_head(t, st)] + _mixed([(0, 10000), (0, 10000), (10000, N)], grad())),
        None,
    ),
    (
        "push-missing-chunk",
        "ready",
        Code.INVALID_ARGUMENT,
        lambda t, st: ("Push", [push_head(t, st)] + _mixed([(0, 10000), (12000, N)], grad())),
        None,
    ),
    (
        "push-short",
        "ready",
        Code.INVALID_ARGUMENT,
        lambda t, st: ("Push", [push_head(t, st)] + _mixed([(0, N - 1)], grad())),
        None,
    ),
    (
        "push-nan",
        "ready",
        Code.INVALID_ARGUMENT,
        lambda t, st: ("Push", [push_head(t, st)] + chunks(_with_value(float("nan")))),
        None,
    ),
    (
        "push-inf",
        "ready",
        Code.INVALID_ARGUMENT,
        lambda t, st: ("Push", [push_head(t, st)] + chunks(_with_value(float("inf")))),
        None,
    ),
    (
        "push-minus-inf",
        "ready",
        Code.INVALID_ARGUMENT,
        lambda t, st: ("Push", [push_head(t, st)] + chunks(_with_value(float("-inf")))),
        None,
    ),
    (
        "push-busy-seconds-nan",
        "ready",
        Code.INVALID_ARGUMENT,
        lambda t, st: ("Push", [push_head(t, st, busy_seconds=float("nan"))] + chunks(grad())),
        None,
    ),
    (
        "push-busy-seconds-negative",
        "ready",
        Code.INVALID_ARGUMENT,
        lambda t, st: ("Push", [push_head(t, st, busy_seconds=-1.0)] + chunks(grad())),
        None,
    ),
    (
        "push-samples-absurd",
        "ready",
        Code.INVALID_ARGUMENT,
        lambda t, st: ("Push", [push_head(t, st, samples=(1 << 20) + 1)] + chunks(grad())),
        None,
    ),
    (
        "init-balance-without-averaging-blank",
        "blank",
        Code.INVALID_ARGUMENT,
        lambda t, st: ("Init", init_frames(optimizer=default_config("sgd", lr=0.1, balance_batches=True))),
        None,
    ),
    (
        "init-nan-weights-blank",
        "blank",
        Code.INVALID_ARGUMENT,
        lambda t, st: ("Init", init_frames(weights=_with_value(float("nan")))),
        None,
    ),
    # -- malformed streams and frames: INVALID_ARGUMENT
    (
        "push-corrupt-header-frame",
        "ready",
        Code.INVALID_ARGUMENT,
        lambda t, st: ("Push", [RANDOM] + chunks(grad())),
        None,
    ),
    (
        "push-corrupt-chunk-frame",
        "ready",
        Code.INVALID_ARGUMENT,
        lambda t, st: ("Push", [push_head(t, st), RANDOM] + chunks(grad())),
        None,
    ),
    (
        "push-truncated-chunk-frame",
        "ready",
        Code.INVALID_ARGUMENT,
        lambda t, st: ("Push", [push_head(t, st)] + _truncated_second_chunk(grad())),
        None,
    ),
    (
        "push-truncated-header-frame",
        "ready",
        Code.INVALID_ARGUMENT,
        lambda t, st: ("Push", [push_head(t, st)[:-3]] + chunks(grad())),
        None,
    ),
    ("push-empty-stream", "ready", Code.INVALID_ARGUMENT, lambda t, st: ("Push", []), None),
    (
        "push-second-header",
        "ready",
        Code.INVALID_ARGUMENT,
        lambda t, st: ("Push", [push_head(t, st), push_head(t, st)] + chunks(grad())),
        None,
    ),
    ("init-corrupt-frame-blank", "blank", Code.INVALID_ARGUMENT, lambda t, st: ("Init", [RANDOM]), None),
    (
        "register-empty-worker-id",
        "ready",
        Code.INVALID_ARGUMENT,
        lambda t, st: ("Register", pb.RegisterRequest(worker_id="", plan_hash=PLAN)),
        None,
    ),
    (
        "pull-own-lag-beyond-bound",
        "ready",
        Code.INVALID_ARGUMENT,
        lambda t, st: ("Pull", pull_request(t, st, own_lag=1)),
        None,
    ),
    # -- too large: RESOURCE_EXHAUSTED
    (
        "push-frame-over-max-message",
        "ready",
        Code.RESOURCE_EXHAUSTED,
        lambda t, st: ("Push", [push_head(t, st), wire.encode_frame(tensor=grad())]),
        None,
    ),  # one 120 KB frame
    (
        "init-shard-over-max-shard-bytes",
        "blank",
        Code.RESOURCE_EXHAUSTED,
        lambda t, st: ("Init", init_frames(numel=40_000)),
        None,
    ),  # 160 KB > 128 KiB
    # -- an update already applied: ALREADY_EXISTS, not applied twice
    (
        "push-duplicate-clock",
        "ready",
        Code.ALREADY_EXISTS,
        lambda t, st: ("Push", [push_head(t, st, clock=clock_of(st, "w") - 1)] + chunks(grad())),
        None,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_rejected_request_has_its_code_and_changes_nothing(servers, case):
    _, which, want, build, reason = case
    t = servers[which]
    before = snapshot(t.address)
    method, request = build(t, status(t.address))
    code, details, trailers = call(t.address, method, request)
    assert code == want, f"{method}: got {code.name}: {details!r}"
    assert details, "a rejection must say why"
    if reason is not None:
        assert trailers.get(service.REASON_KEY) == reason
    assert snapshot(t.address) == before
    assert before["initialized"] == (which == "ready")


def test_well_formed_requests_are_accepted(servers):
    """The controls: the same requests, well formed, are accepted - so each case above is
    rejected for the one thing it gets wrong."""
    t = servers["ready"]
    st = status(t.address)
    with stub(t.address) as s:
        w2 = s.Register(pb.RegisterRequest(worker_id="w2", plan_hash=PLAN), timeout=RPC_TIMEOUT)
        assert w2.clock == 1  # the slowest live clock
        s.Leave(pb.LeaveRequest(worker_id="w2", session=w2.session), timeout=RPC_TIMEOUT)
        assert not s.Init(iter(init_frames()), timeout=RPC_TIMEOUT).accepted  # already initialized: no change
        s.Heartbeat(pb.HeartbeatRequest(worker_id="w", session=t.session), timeout=RPC_TIMEOUT)
    for frames in (chunks(grad()), _mixed([(0, 10000), (20000, N), (10000, 20000)], grad(2))):  # any order
        code, details, _ = call(t.address, "Push", [push_head(t, st)] + frames)
        assert code == Code.OK, details
        st = status(t.address)
    assert st.version == 3 and clock_of(st, "w") == 3
    assert call(t.address, "Pull", pull_request(t, st))[0] == Code.OK
    assert st.live_workers == 1
