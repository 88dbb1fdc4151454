"""Unit tests for the data plane's framing (protos.wire headers) and connection (protos.datasock).

Over a real socketpair: tensors of every dtype and odd size arrive byte-exact straight
in a preallocated buffer, a 9 MB message whole and in order; a peer hanging up
mid-message is `Truncated`; an expired deadline is DEADLINE_EXCEEDED; a header that is
oversized or does not parse is INVALID_ARGUMENT; `abort` wakes a blocked receive.
"""

from __future__ import annotations

import socket
import threading
import time

import grpc
import numpy as np
import pytest
import torch
from test_wire import DTYPES, ODD_SHAPES, random_tensor

from protos import wire
from protos.asyncps.v1 import ps_pb2 as pb
from protos.datasock import DataConn, DataError, Truncated, split_host, status_code

Code = grpc.StatusCode


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    left, right = DataConn(a, "left"), DataConn(b, "right")
    try:
        yield left, right
    finally:
        left.close()
        right.close()


def soon(seconds: float = 10.0) -> float:
    return time.monotonic() + seconds


def send_in_thread(fn) -> threading.Thread:
    """Run `fn` (a send) in a thread; the receiver may close the pair before it ends."""

    def run() -> None:
        try:
            fn()
        except (OSError, DataError):
            pass

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ODD_SHAPES + [(1 << 20) // 3 + 1])
def test_tensor_bytes_arrive_exactly_in_a_preallocated_buffer(pair, dtype, shape):
    left, right = pair
    shape = shape if isinstance(shape, tuple) else (shape,)
    t = random_tensor(dtype, shape, np.random.default_rng(len(shape)))
    payload = wire.tensor_bytes(t.reshape(-1))
    head = pb.DataRequest(push=pb.PushHeader(worker_id="w", clock=3), payload_bytes=payload.nbytes)
    sender = send_in_thread(lambda: left.send(head, payload, soon()))
    got = right.recv_header(pb.DataRequest, soon())
    out = torch.empty(shape, dtype=dtype)
    right.recv_into(wire.tensor_bytes(out.reshape(-1)), soon())
    sender.join(10)
    assert got == head
    assert wire.tensor_bytes(out.reshape(-1)).tobytes() == payload.tobytes()


def test_a_large_message_arrives_whole_and_in_order(pair):
    left, right = pair
    data = bytes(range(256)) * ((9 << 20) // 256 + 7)
    sender = send_in_thread(lambda: left.sock.sendall(data))
    buf = bytearray(len(data))
    right.recv_into(memoryview(buf), soon())
    sender.join(10)
    assert bytes(buf) == data


def test_hanging_up_mid_message_is_truncated(pair):
    left, right = pair
    left.sock.sendall(b"abc")
    left.sock.shutdown(socket.SHUT_WR)
    with pytest.raises(Truncated) as err:
        right.recv_into(memoryview(bytearray(10)), soon())
    assert err.value.code() == Code.UNAVAILABLE and "3 of 10" in err.value.details()
    assert right.broken


def test_clean_eof_before_a_header_is_none_and_mid_header_truncated(pair):
    left, right = pair
    left.sock.shutdown(socket.SHUT_WR)
    assert right.recv_header(pb.DataRequest, soon()) is None
    a, b = socket.socketpair()
    with a, b:
        a.sendall(wire.pack_header(pb.DataRequest(pull=pb.PullRequest(worker_id="w")))[:5])
        a.shutdown(socket.SHUT_WR)
        with pytest.raises(Truncated):
            DataConn(b, "b").recv_header(pb.DataRequest, soon())


def test_deadline_exceeded(pair):
    _, right = pair
    with pytest.raises(DataError) as err:
        right.recv_into(memoryview(bytearray(4)), soon(0.2))
    assert err.value.code() == Code.DEADLINE_EXCEEDED
    with pytest.raises(DataError) as err:
        right.recv_into(memoryview(bytearray(4)), time.monotonic() - 1)
    assert err.value.code() == Code.DEADLINE_EXCEEDED


@pytest.mark.parametrize(
    "raw, what",
    [
        ((wire.HEADER_LIMIT + 1).to_bytes(4, "little"), "limit"),
        ((5).to_bytes(4, "little") + b"\xff\xff\xff\xff\xff", "does not parse"),
    ],
)
def test_bad_headers_are_invalid_argument(pair, raw, what):
    left, right = pair
    left.sock.sendall(raw)
    with pytest.raises(DataError) as err:
        right.recv_header(pb.DataRequest, soon())
    assert err.value.code() == Code.INVALID_ARGUMENT and what in err.value.details()


def test_pack_header_refuses_an_oversized_message():
    with pytest.raises(ValueError):
        wire.pack_header(pb.DataResponse(message="x" * (wire.HEADER_LIMIT + 1)))
    body = wire.pack_header(pb.DataResponse(code=5, message="m"))
    assert wire.header_length(body[:4]) == len(body) - 4
    assert wire.unpack_header(body[4:], pb.DataResponse) == pb.DataResponse(code=5, message="m")


def test_abort_wakes_a_blocked_receive(pair):
    _, right = pair
    errors: list[BaseException] = []

    def wait() -> None:
        try:
            right.recv_into(memoryview(bytearray(4)), soon(30))
        except DataError as exc:
            errors.append(exc)

    t = send_in_thread(wait)
    time.sleep(0.1)  # let it block (if it has not yet, abort makes its first recv fail at once)
    right.abort()
    t.join(5)
    assert not t.is_alive() and errors and errors[0].code() == Code.UNAVAILABLE


def test_drain_discards_exactly_n_bytes(pair):
    left, right = pair
    send_in_thread(
        lambda: left.sock.sendall(b"\0" * ((3 << 20) + 5) + wire.pack_header(pb.DataRequest(payload_bytes=9)))
    )
    right.drain((3 << 20) + 5, soon())
    assert right.recv_header(pb.DataRequest, soon()).payload_bytes == 9


def test_status_codes_and_hosts():
    assert status_code(3) == Code.INVALID_ARGUMENT and status_code(0) == Code.OK and status_code(999) == Code.UNKNOWN
    assert split_host("127.0.0.1:5") == "127.0.0.1" and split_host("[::1]:5") == "::1" and split_host("h:1") == "h"
