"""Unit tests for protos.wire: byte-exact round trips, chunking, protobuf interop, bad frames."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protos import wire
from protos.asyncps.v1 import ps_pb2 as pb

# gRPC hands frames over as read-only `bytes`; wire.py silences this warning, pytest re-enables it.
pytestmark = pytest.mark.filterwarnings("ignore:The given buffer is not writable")

DTYPES = list(wire.TORCH_TO_WIRE)
ODD_SHAPES = [(), (0,), (1,), (7,), (1023,), (3, 0, 2), (2, 3, 5), (1, 1, 1, 1), (17, 3)]


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], gen: np.random.Generator) -> torch.Tensor:
    """A tensor of arbitrary bit patterns (NaNs with payloads, infs, denormals for floats)."""
    numel = math.prod(shape)
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    if dtype == torch.bool:
        raw = gen.integers(0, 2, size=numel, dtype=np.uint8)
    else:
        raw = gen.integers(0, 256, size=numel * dtype.itemsize, dtype=np.uint8)
    return torch.from_numpy(raw.copy()).view(dtype).reshape(shape)


def raw_bytes(t: torch.Tensor) -> bytes:
    if t.numel() == 0:
        return b""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype
    assert tuple(a.shape) == tuple(b.shape)
    assert raw_bytes(a) == raw_bytes(b)


def buffer_address(buf: bytes) -> int:
    """Address of the first byte of a bytes object's buffer (numpy views it without copying)."""
    return np.frombuffer(buf, dtype=np.uint8).ctypes.data if buf else 0


# -- round trips ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ODD_SHAPES, ids=str)
def test_round_trip_every_dtype_and_odd_shape(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    gen = np.random.default_rng(hash((str(dtype), shape)) & 0xFFFF)
    t = random_tensor(dtype, shape, gen)
    buf = wire.encode_frame(tensor=t, offset=12345)
    frame, payload = wire.decode_frame(buf)
    assert frame.tensor.offset == 12345
    assert frame.tensor.dtype == wire.TORCH_TO_WIRE[dtype]
    assert list(frame.tensor.shape) == list(shape)
    out = wire.payload_tensor(frame, payload)
    assert_bitwise_equal(out, t)
    if dtype.is_floating_point:
        # NaN payload bits survive (torch.equal would say NaN != NaN; bytes do not lie).
        assert torch.equal(out.isnan(), t.isnan())


def test_nan_payload_bits_survive() -> None:
    bits = torch.tensor([0x7FC00001, 0x7F800001, 0xFFC12345 - (1 << 32), 0x00000001, 0x7F800000], dtype=torch.int32)
    t = bits.view(torch.float32)
    out = wire.payload_tensor(*wire.decode_frame(wire.encode_frame(tensor=t)))
    assert torch.equal(out.view(torch.int32), bits)


@st.composite
def tensors(draw) -> torch.Tensor:
    dtype = draw(st.sampled_from(DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, 9), max_size=4)))
    seed = draw(st.integers(0, 2**32 - 1))
    return random_tensor(dtype, shape, np.random.default_rng(seed))


@settings(max_examples=150, deadline=None)
@given(tensors(), st.integers(0, 2**64 - 1), st.booleans())
def test_round_trip_hypothesis(t: torch.Tensor, offset: int, with_head: bool) -> None:
    head = (
        pb.Frame(push=pb.PushHeader(worker_id="w-1", session=2**40 + 3, plan_hash="ab" * 32, clock=9, read_version=7))
        if with_head
        else None
    )
    frame, payload = wire.decode_frame(wire.encode_frame(head, t, offset))
    assert frame.tensor.offset == offset
    if with_head:
        assert frame.WhichOneof("head") == "push" and frame.push == head.push
    else:
        assert frame.WhichOneof("head") is None
    assert_bitwise_equal(wire.payload_tensor(frame, payload), t)


def test_head_only_frame() -> None:
    head = pb.Frame(pull=pb.PullHeader(version=5, numel=10, min_clock=3, waited_seconds=0.25))
    frame, payload = wire.decode_frame(wire.encode_frame(head))
    assert payload is None
    assert frame == head
    with pytest.raises(wire.FrameError, match="no tensor header"):
        wire.payload_tensor(frame, payload)


def test_tensor_bytes_rejects_what_it_cannot_view() -> None:
    with pytest.raises(ValueError, match="contiguous"):
        wire.tensor_bytes(torch.zeros(4, 4).t())
    with pytest.raises(ValueError, match="not supported"):
        wire.tensor_bytes(torch.zeros(3, dtype=torch.complex64))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tensor_bytes_is_a_zero_copy_view(dtype: torch.dtype) -> None:
    t = random_tensor(dtype, (5, 3), np.random.default_rng(0))
    view = wire.tensor_bytes(t)
    assert view.nbytes == t.numel() * t.element_size()
    assert np.frombuffer(view, dtype=np.uint8).ctypes.data == t.data_ptr()


# -- chunking ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.int8, torch.bool], ids=str)
@pytest.mark.parametrize("chunk_bytes", [1, 3, 7, 1000, 4097, 1 << 20])
def test_chunk_frames_reassemble_exactly(dtype: torch.dtype, chunk_bytes: int) -> None:
    n, start = 3001, 777
    flat = random_tensor(dtype, (n,), np.random.default_rng(chunk_bytes))
    out = torch.zeros(n, dtype=dtype)
    seen = torch.zeros(n, dtype=torch.int32)
    frames = list(wire.chunk_frames(flat, chunk_bytes, start=start))
    step = max(1, chunk_bytes // dtype.itemsize)
    assert len(frames) == math.ceil(n / step)
    for buf in frames:
        frame, payload = wire.decode_frame(buf)
        chunk = wire.payload_tensor(frame, payload)
        assert chunk.dim() == 1 and chunk.dtype == dtype
        assert chunk.numel() * dtype.itemsize <= max(chunk_bytes, dtype.itemsize)
        lo = frame.tensor.offset - start
        out[lo : lo + chunk.numel()] = chunk
        seen[lo : lo + chunk.numel()] += 1
    assert torch.equal(seen, torch.ones(n, dtype=torch.int32))
    assert_bitwise_equal(out, flat)


def test_chunk_frames_of_empty_tensor_is_no_frames() -> None:
    assert list(wire.chunk_frames(torch.zeros(0))) == []


# -- protobuf interoperability -----------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_frames_made_by_protobuf_decode(dtype: torch.dtype) -> None:
    t = random_tensor(dtype, (4, 5), np.random.default_rng(1))
    th = pb.TensorHeader(offset=99, dtype=wire.TORCH_TO_WIRE[dtype], shape=[4, 5])
    init = pb.InitHeader(
        plan_hash="h",
        shard_index=1,
        num_shards=2,
        numel=20,
        worker_id="w",
        staleness=math.inf,
        optimizer=pb.OptimizerConfig(name="adam", lr=1e-3),
    )
    buf = pb.Frame(init=init, tensor=th, data=raw_bytes(t)).SerializeToString()
    frame, payload = wire.decode_frame(buf)
    assert frame.init == init and frame.tensor == th
    assert_bitwise_equal(wire.payload_tensor(frame, payload), t)


@settings(max_examples=60, deadline=None)
@given(tensors(), st.integers(0, 2**64 - 1))
def test_our_frames_parse_with_protobuf(t: torch.Tensor, offset: int) -> None:
    head = pb.Frame(push=pb.PushHeader(worker_id="wörker", session=1, plan_hash="p", clock=2**63, read_version=0))
    ours = wire.encode_frame(head, t, offset)
    parsed = pb.Frame.FromString(ours)
    assert parsed.push == head.push
    assert parsed.tensor.offset == offset
    assert parsed.tensor.dtype == wire.TORCH_TO_WIRE[t.dtype]
    assert list(parsed.tensor.shape) == list(t.shape)
    assert parsed.data == raw_bytes(t)
    if t.numel():
        # Field order and encodings are protobuf's own: the bytes are what protobuf would write.
        assert ours == parsed.SerializeToString()


# -- bad frames -------------------------------------------------------------------------


def decode_all(buf: bytes) -> torch.Tensor:
    return wire.payload_tensor(*wire.decode_frame(buf))


def small_frame() -> bytes:
    head = pb.Frame(push=pb.PushHeader(worker_id="w", session=3, plan_hash="abc", clock=1, read_version=0))
    return wire.encode_frame(head, torch.arange(5, dtype=torch.float32), offset=300)


def test_every_truncation_is_a_frame_error() -> None:
    buf = small_frame()
    assert torch.equal(decode_all(buf), torch.arange(5, dtype=torch.float32))
    for cut in range(len(buf)):
        with pytest.raises(wire.FrameError):
            decode_all(buf[:cut])


def test_payload_length_mismatch() -> None:
    th = pb.TensorHeader(dtype=pb.FLOAT32, shape=[3])
    for n in (0, 4, 11, 13, 16):
        buf = pb.Frame(tensor=th, data=b"\x01" * n).SerializeToString()
        with pytest.raises(wire.FrameError, match="payload has"):
            decode_all(buf)
    assert decode_all(pb.Frame(tensor=th, data=b"\0" * 12).SerializeToString()).shape == (3,)


@pytest.mark.parametrize("dtype", [0, 11, 99, 2**31 - 1])
def test_unknown_dtype(dtype: int) -> None:
    buf = pb.Frame(tensor=pb.TensorHeader(dtype=dtype, shape=[1]), data=b"\0" * 4).SerializeToString()
    with pytest.raises(wire.FrameError, match="unknown dtype"):
        decode_all(buf)


def test_repeated_data_field() -> None:
    buf = small_frame()
    for extra in (wire._DATA_TAG + bytes([0]), wire._DATA_TAG + bytes([2]) + b"ab"):
        with pytest.raises(wire.FrameError, match="repeated data"):
            decode_all(buf + extra)
    # Protobuf itself would keep the last `data`; we refuse the ambiguity.
    with pytest.raises(wire.FrameError):
        decode_all(pb.Frame(data=b"x").SerializeToString() + buf)


def test_data_field_with_wrong_wire_type() -> None:
    with pytest.raises(wire.FrameError, match="data field"):
        decode_all(bytes([(15 << 3) | 0, 5]))


@pytest.mark.parametrize(
    "buf",
    [
        bytes([(4 << 3) | 3]),  # start-group wire type
        bytes([(4 << 3) | 4]),  # end-group wire type
        bytes([(4 << 3) | 6]),  # wire type 6 does not exist
        b"\xff" * 11,  # overlong varint key
        bytes([(12 << 3) | 0]) + b"\xff" * 10 + b"\x01",  # overlong varint value
        bytes([(2 << 3) | 2, 3]) + b"\xff\xff\xff",  # push header that protobuf rejects
        bytes([(4 << 3) | 2, 0xFF, 0xFF, 0xFF, 0xFF, 0x0F]),  # length past the end
        bytes([(12 << 3) | 1]) + b"\0" * 7,  # fixed64 cut short
        bytes([(12 << 3) | 5]) + b"\0" * 3,  # fixed32 cut short
        bytes([0, 0]),  # field number 0
    ],
)
def test_malformed_frames(buf: bytes) -> None:
    with pytest.raises(wire.FrameError):
        decode_all(buf)


def test_zero_size_shape_with_a_huge_dimension() -> None:
    # Empty by arithmetic (a 0 dimension) yet naming a size torch cannot hold.
    buf = pb.Frame(tensor=pb.TensorHeader(dtype=pb.FLOAT32, shape=[0, 2**64 - 1])).SerializeToString()
    with pytest.raises(wire.FrameError):
        decode_all(buf)
    ok = decode_all(pb.Frame(tensor=pb.TensorHeader(dtype=pb.INT8, shape=[0, 5])).SerializeToString())
    assert ok.shape == (0, 5) and ok.dtype == torch.int8


def test_unknown_fields_are_tolerated() -> None:
    """Forward compatibility: a field this version does not know is skipped, like protobuf does."""
    t = torch.arange(3, dtype=torch.int16)
    buf = (
        wire._varint((30 << 3) | 0) + bytes([7]) + wire.encode_frame(tensor=t) + wire._varint((31 << 3) | 2) + b"\x02zz"
    )
    assert torch.equal(decode_all(buf), t)


def _must_be_frame_error_or_valid(buf: bytes) -> None:
    try:
        frame, payload = wire.decode_frame(buf)
        out = wire.payload_tensor(frame, payload)
    except wire.FrameError:
        return
    # Accepted: then it is a consistent tensor over exactly the payload's bytes.
    assert out.numel() * out.element_size() == (0 if payload is None else payload.nbytes)
    assert isinstance(wire.FrameError("x"), ValueError)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=64))
def test_random_bytes_raise_only_frame_error(buf: bytes) -> None:
    _must_be_frame_error_or_valid(buf)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=4), st.integers(0, 10_000))
def test_mutated_frames_raise_only_frame_error(edits, cut: int) -> None:
    buf = bytearray(small_frame())
    for pos, byte in edits:
        buf[pos % len(buf)] = byte
    _must_be_frame_error_or_valid(bytes(buf[: len(buf) - cut % 4]))


# -- zero copy ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_payload_tensor_shares_memory_with_the_received_bytes(dtype: torch.dtype) -> None:
    t = random_tensor(dtype, (64, 3), np.random.default_rng(2))
    buf = wire.encode_frame(pb.Frame(pull=pb.PullHeader(version=1)), t)
    assert isinstance(buf, bytes)
    frame, payload = wire.decode_frame(buf)
    assert payload.obj is buf  # a view of the received message, not a copy
    out = wire.payload_tensor(frame, payload)
    nbytes = t.numel() * t.element_size()
    # The data field is last: the tensor must point at the last `nbytes` bytes of `buf` itself.
    assert out.data_ptr() == buffer_address(buf) + len(buf) - nbytes
    assert_bitwise_equal(out, t)


def test_payload_tensor_sees_writes_to_its_buffer() -> None:
    """With a writable buffer the aliasing is observable: the tensor is the buffer."""
    t = torch.arange(4, dtype=torch.int32)
    buf = bytearray(wire.encode_frame(tensor=t))
    out = wire.payload_tensor(*wire.decode_frame(buf))
    buf[-4:] = (1234).to_bytes(4, "little")
    assert out.tolist() == [0, 1, 2, 1234]
