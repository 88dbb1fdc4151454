"""Property-based fuzzing (hypothesis) of the TCP data plane of the live server of test_fuzz.py.

Hostile hellos (no magic, random bytes, a request before the hello: INVALID_ARGUMENT)
and, after a good hello, random bytes, random headers, pulls and pushes with wrong sizes
(up to 2^40 bytes announced), truncated payloads, NaN/Inf, stale clocks, wrong sessions
or plans: every answer is a refusal with a reason (or a pull's weights), the server hangs
up or stays in step, never waits for bytes that will not come, and the shard (version,
checksum, clocks) does not change.
"""

from __future__ import annotations

import math
import socket
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protos import wire
from protos.asyncps.v1 import ps_pb2 as pb
from protos.datasock import DataConn, DataError

from .test_fuzz import EXAMPLES, FUZZ, PLAN, TIMEOUT, Code, Live, N, gradient, live  # noqa: F401 (a fixture)

pytestmark = pytest.mark.slow  # real clusters or long runs: left out of the quick loop (-m "not slow")


def data_messages(draw, t: Live) -> bytes:
    """What a hostile client sends after a good hello: random bytes, random headers, pushes and
    pulls with random sizes, payloads, sessions and clocks (a real push never: never "w"'s clock
    with the right session and size and a finite payload all at once)."""
    kind = draw(st.sampled_from(["bytes", "header", "push", "pull"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "header":
        body = draw(st.binary(max_size=100))
        return len(body).to_bytes(4, "little") + body
    if kind == "pull":
        req = pb.PullRequest(
            worker_id=draw(st.sampled_from(["w", "x", ""])),
            session=draw(st.sampled_from([t.session, t.session + 1, 0])),
            plan_hash=draw(st.sampled_from([PLAN, "g" * 64])),
            clock=draw(st.integers(0, 3)),
        )
        return wire.pack_header(pb.DataRequest(pull=req, payload_bytes=draw(st.sampled_from([0, 0, 4]))))
    size = draw(st.sampled_from([N * 4, N * 4, N * 4 - 4, N * 4 + 4, 0, 1 << 40]))
    defect = draw(st.sampled_from(["session", "plan", "clock", "nan"] if size == N * 4 else ["size"]))
    head = pb.PushHeader(
        worker_id="w",
        session=t.session + (defect == "session"),
        plan_hash="g" * 64 if defect == "plan" else PLAN,
        clock=t.clock - 1 if defect == "clock" else t.clock,
        read_version=t.version,
    )
    g = gradient()
    if defect == "nan":
        g[draw(st.integers(0, N - 1))] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    payload = bytes(wire.tensor_bytes(g))[: draw(st.sampled_from([size, size // 2, 0]))]
    return wire.pack_header(pb.DataRequest(push=head, payload_bytes=size)) + payload


@settings(max_examples=EXAMPLES["data"], **FUZZ)
@given(hello=st.sampled_from(["good", "good", "not-hello", "no-magic", "random"]), data=st.data())
def test_data_plane_hostile_input(live, hello, data):
    """Whatever arrives on the data port, answers are refusals (or a pull's weights), the server
    hangs up or stays in step, never crashes, and the shard does not change."""
    live.cases += 1
    port = live.status().data_port
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sent = b"" if hello == "no-magic" else wire.DATA_MAGIC
        if hello == "random":
            sent += data.draw(st.binary(max_size=100))
        elif hello == "good":
            sent += wire.pack_header(pb.DataRequest(hello=pb.DataHello()))
        messages = [data_messages(data.draw, live) for _ in range(data.draw(st.integers(1, 4)))]
        try:
            sock.sendall(sent + b"".join(messages))
            sock.shutdown(socket.SHUT_WR)  # the server sees the end of what we say, then answers
        except OSError:
            pass  # it may hang up before reading everything
        conn, answers = DataConn(sock, "fuzz"), []
        try:
            while (resp := conn.recv_header(pb.DataResponse, time.monotonic() + TIMEOUT)) is not None:
                answers.append(resp)
                if resp.payload_bytes:
                    conn.drain(resp.payload_bytes, time.monotonic() + TIMEOUT)
        except DataError as exc:
            assert exc.code() == Code.UNAVAILABLE, exc  # a hang-up, never a timeout: nothing waits
    if hello == "good":
        assert answers and answers[0].code == 0, answers[:1]
    elif hello == "not-hello" and answers:  # it may hang up at once on a header it cannot read
        assert answers[0].code == Code.INVALID_ARGUMENT.value[0] and len(answers) == 1
    for resp in answers[1:]:
        assert resp.code != 0 or resp.HasField("pull"), f"accepted: {resp}"
        assert resp.code == 0 or resp.message, "a rejection must say why"
    live.check()
