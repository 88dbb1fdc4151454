"""Property-based fuzzing (hypothesis) of the control requests and pulls of the live server
of test_fuzz.py (its `live` fixture: the same checks after every case, see there).

Pulls, registrations, heartbeats, leaves and Inits naming unknown workers, stale sessions,
wrong plans or shards (FAILED_PRECONDITION), empty worker ids (INVALID_ARGUMENT); a
Checkpoint with no --checkpoint-dir (FAILED_PRECONDITION); a repeated Init is answered
with what is in force; pulls with any chunk size and lag are answered in full.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncps_common.optimizer import default_config
from protos import wire
from protos.asyncps.v1 import ps_pb2 as pb

from .test_fuzz import EXAMPLES, FUZZ, PLAN, Code, live  # noqa: F401 (a fixture)

pytestmark = pytest.mark.slow  # real clusters or long runs: left out of the quick loop (-m "not slow")


CONTROL_KINDS = [
    "pull-ok",
    "pull-wrong-plan",
    "pull-unknown-worker",
    "pull-stale-session",
    "register-empty-id",
    "register-wrong-plan",
    "heartbeat-unknown",
    "leave-stale-session",
    "init-wrong-plan",
    "init-wrong-shard",
    "init-repeat",
    "checkpoint-without-dir",
]


@settings(max_examples=EXAMPLES["control"], **FUZZ)
@given(
    kind=st.sampled_from(CONTROL_KINDS),
    text=st.text(max_size=30),
    number=st.integers(0, 2**64 - 1),
    small=st.integers(0, 2**32 - 1),
)
def test_control_and_pull_requests(live, kind, text, number, small):  # noqa: F811 (the fixture imported above)
    def pull(**override) -> bytes:
        fields = dict(
            worker_id="w", session=live.session, plan_hash=PLAN, clock=live.clock, own_lag=small % 5, chunk_bytes=small
        )
        fields.update(override)
        return pb.PullRequest(**fields).SerializeToString()

    def init(**override) -> list[bytes]:
        fields = dict(
            plan_hash=PLAN,
            shard_index=0,
            num_shards=1,
            numel=number,
            worker_id=text,
            optimizer=default_config("adam", lr=1.0),
        )
        fields.update(override)
        bad = torch.full((16,), math.nan)
        return [wire.encode_frame(pb.Frame(init=pb.InitHeader(**fields))), wire.encode_frame(tensor=bad)]

    other = f"ghost-{text}"
    session = number if number != live.session else number + 1
    plan = text if text != PLAN else "x"
    FP, IA = Code.FAILED_PRECONDITION, Code.INVALID_ARGUMENT
    cases = {
        "pull-ok": ("Pull", pull(clock=number % (live.clock + 1)), Code.OK),  # any chunk size and lag, in full
        "pull-wrong-plan": ("Pull", pull(plan_hash=plan), FP),
        "pull-unknown-worker": ("Pull", pull(worker_id=other), FP),
        "pull-stale-session": ("Pull", pull(session=session), FP),
        "register-empty-id": ("Register", pb.RegisterRequest(worker_id="", plan_hash=PLAN).SerializeToString(), IA),
        "register-wrong-plan": (
            "Register",
            pb.RegisterRequest(worker_id=other, plan_hash=plan).SerializeToString(),
            FP,
        ),
        "heartbeat-unknown": (
            "Heartbeat",
            pb.HeartbeatRequest(worker_id=other, session=number).SerializeToString(),
            FP,
        ),
        "leave-stale-session": ("Leave", pb.LeaveRequest(worker_id="w", session=session).SerializeToString(), FP),
        "init-wrong-plan": ("Init", init(plan_hash=plan), FP),
        "init-wrong-shard": ("Init", init(shard_index=small % 7 + 1, num_shards=small % 7 + 2), FP),
        "init-repeat": ("Init", init(), Code.OK),  # already initialized: answered with what is in force
        "checkpoint-without-dir": ("Checkpoint", b"", FP),
    }
    name, body, want = cases[kind]
    if kind == "pull-ok" and small < 1024:
        body = pull(clock=number % (live.clock + 1), chunk_bytes=1024 + small)  # >= 256 elements a frame
    live.expect(name, body, want)
