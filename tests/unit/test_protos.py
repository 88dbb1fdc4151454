"""Unit tests for protos.generate (generated code is fresh) and protos.service (method table)."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
import torch
from google.protobuf.descriptor import FieldDescriptor

from protos import generate, service, wire
from protos.asyncps.v1 import ps_pb2 as pb

# gRPC hands frames over as read-only `bytes`; wire.py silences this warning, pytest re-enables it.
pytestmark = pytest.mark.filterwarnings("ignore:The given buffer is not writable")

ROOT = Path(__file__).resolve().parents[2]
GEN_DIR = Path("protos/asyncps/v1")
PROTO_TEXT = (ROOT / generate.PROTO).read_text()


# rpc Name(stream? Req) returns (stream? Resp);  read from the .proto text itself, per service
def _rpcs(service_name: str) -> dict[str, tuple]:
    block = re.search(r"service\s+" + service_name + r"\s*\{(.*?)\}", PROTO_TEXT, re.S)
    assert block, service_name
    return {
        m[0]: (bool(m[1]), m[2], bool(m[3]), m[4])
        for m in re.findall(
            r"rpc\s+(\w+)\s*\(\s*(stream\s+)?(\w+)\s*\)\s*returns\s*\(\s*(stream\s+)?(\w+)\s*\)", block.group(1)
        )
    }


RPCS = _rpcs("ParameterServer")


# -- generated code is fresh -------------------------------------------------------------


def test_check_passes_on_the_committed_code() -> None:
    before = {name: (ROOT / GEN_DIR / name).read_bytes() for name in generate.OUTPUTS}
    proc = subprocess.run(
        [sys.executable, "-m", "protos.generate", "--check"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert {name: (ROOT / GEN_DIR / name).read_bytes() for name in generate.OUTPUTS} == before  # --check wrote nothing


@pytest.fixture
def proto_copy(tmp_path) -> Path:
    shutil.copytree(ROOT / "protos", tmp_path / "protos", ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def test_stale_check_on_a_copy(proto_copy: Path, capsys) -> None:
    assert generate.stale_files(proto_copy) == []
    proto = proto_copy / generate.PROTO
    text = proto.read_text()
    edited = text.replace("  uint64 start_clock = 3;", "  uint64 start_clock = 3;\n  uint32 added_in_test = 99;")
    assert edited != text
    proto.write_text(edited)

    stale = generate.stale_files(proto_copy)
    assert str(GEN_DIR / "ps_pb2.py") in stale
    assert str(GEN_DIR / "ps_pb2.pyi") in stale
    assert generate.main(["--check", "--root", str(proto_copy)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(GEN_DIR / "ps_pb2.py") in err

    # The command line says the same, and exits non-zero.
    proc = subprocess.run(
        [sys.executable, "-m", "protos.generate", "--check", "--root", str(proto_copy)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert str(GEN_DIR / "ps_pb2.py") in proc.stderr and "stale" in proc.stderr

    # Regenerating the copy makes it fresh again, with the new field; the repo is untouched.
    assert generate.main(["--root", str(proto_copy)]) == 0
    assert generate.stale_files(proto_copy) == []
    assert "added_in_test" in (proto_copy / GEN_DIR / "ps_pb2.pyi").read_text()
    assert "added_in_test" not in (ROOT / GEN_DIR / "ps_pb2.pyi").read_text()
    assert generate.stale_files() == []


def test_stale_check_names_missing_and_edited_files(proto_copy: Path) -> None:
    (proto_copy / GEN_DIR / "ps_pb2_grpc.py").unlink()
    with open(proto_copy / GEN_DIR / "ps_pb2.pyi", "a") as f:
        f.write("# hand edit\n")
    assert sorted(generate.stale_files(proto_copy)) == sorted(
        [str(GEN_DIR / "ps_pb2_grpc.py"), str(GEN_DIR / "ps_pb2.pyi")]
    )


# -- the method table ----------------------------------------------------------------------


def test_descriptor_matches_the_proto_text() -> None:
    assert RPCS, "no rpc found in the .proto"
    methods = {m.name: m for m in service.SERVICE.methods}
    assert set(methods) == set(RPCS)
    for name, (cstream, req, sstream, resp) in RPCS.items():
        m = methods[name]
        assert (m.client_streaming, m.input_type.name, m.server_streaming, m.output_type.name) == (
            cstream,
            req,
            sstream,
            resp,
        )
    assert service.SERVICE_NAME == "asyncps.v1.ParameterServer"
    # The tensor-carrying methods this product depends on.
    assert RPCS["Push"][:2] == (True, "Frame") and RPCS["Init"][:2] == (True, "Frame")
    assert RPCS["Pull"][2:] == (True, "Frame")


_SCALARS = {
    FieldDescriptor.TYPE_STRING: "x",
    FieldDescriptor.TYPE_UINT64: 7,
    FieldDescriptor.TYPE_UINT32: 3,
    FieldDescriptor.TYPE_DOUBLE: 0.5,
    FieldDescriptor.TYPE_BOOL: True,
}


def _sample(type_name: str):
    """A non-default message of the type (where it has scalar fields), to round-trip through (de)serializers."""
    cls = getattr(pb, type_name)
    msg = cls()
    for f in cls.DESCRIPTOR.fields:
        if f.type in _SCALARS and f.containing_oneof is None:
            try:
                setattr(msg, f.name, _SCALARS[f.type])
            except AttributeError:  # a repeated field
                continue
    if any(f.type in _SCALARS for f in cls.DESCRIPTOR.fields):
        assert msg.ByteSize() > 0
    return msg


class Servicer:
    def __init__(self) -> None:
        for name in RPCS:
            setattr(self, name, (lambda n: lambda *a: n)(name))


def test_method_handlers_cover_every_method() -> None:
    servicer = Servicer()
    generic = service.method_handlers(servicer)
    for name, (cstream, req, sstream, resp) in RPCS.items():
        h = generic.service(SimpleNamespace(method=f"/{service.SERVICE_NAME}/{name}", invocation_metadata=()))
        assert h is not None, name
        assert (h.request_streaming, h.response_streaming) == (cstream, sstream)
        behaviour = {
            (False, False): h.unary_unary,
            (False, True): h.unary_stream,
            (True, False): h.stream_unary,
            (True, True): h.stream_stream,
        }[(cstream, sstream)]
        # unary requests pass through a wrapper answering an undecodable one INVALID_ARGUMENT
        assert getattr(behaviour, "__wrapped__", behaviour) is getattr(servicer, name)
        if req == "Frame":
            assert h.request_deserializer is None  # raw bytes reach the servicer
        else:
            msg = _sample(req)
            assert h.request_deserializer(msg.SerializeToString()) == msg
            assert isinstance(h.request_deserializer(b"\xff\xff\xff"), service.Undecodable)
        if resp == "Frame":
            assert h.response_serializer is None  # the servicer yields bytes from wire.encode_frame
        else:
            msg = _sample(resp)
            assert h.response_serializer(msg) == msg.SerializeToString()
    assert generic.service(SimpleNamespace(method=f"/{service.SERVICE_NAME}/Nope", invocation_metadata=())) is None


class FakeChannel:
    def __init__(self) -> None:
        self.made: dict[str, tuple] = {}

    def _factory(kind):
        def make(self, path, request_serializer=None, response_deserializer=None):
            self.made[path] = (kind, request_serializer, response_deserializer)
            return (kind, path)

        return make

    unary_unary = _factory("unary_unary")
    unary_stream = _factory("unary_stream")
    stream_unary = _factory("stream_unary")
    stream_stream = _factory("stream_stream")


def test_stub_covers_every_method() -> None:
    channel = FakeChannel()
    stub = service.Stub(channel)
    assert len(channel.made) == len(RPCS)
    for name, (cstream, req, sstream, resp) in RPCS.items():
        path = f"/{service.SERVICE_NAME}/{name}"
        kind = ("stream" if cstream else "unary") + "_" + ("stream" if sstream else "unary")
        assert getattr(stub, name) == (kind, path)
        _, ser, de = channel.made[path]
        if req == "Frame":
            assert ser is None
        else:
            msg = _sample(req)
            assert ser(msg) == msg.SerializeToString()
        if resp == "Frame":
            assert de is None
        else:
            msg = _sample(resp)
            assert de(msg.SerializeToString()) == msg


def test_frames_travel_as_raw_bytes_over_grpc() -> None:
    """An in-process aio server and a Stub: Frame methods see and yield plain bytes."""
    received: list[bytes] = []

    class Echo:
        async def Push(self, request_iterator, context):
            async for raw in request_iterator:
                received.append(raw)
            return pb.PushResponse(version=len(received), staleness=3)

        async def Pull(self, request, context):
            yield wire.encode_frame(pb.Frame(pull=pb.PullHeader(version=9, numel=4, min_clock=request.clock)))
            for chunk in wire.chunk_frames(torch.arange(4, dtype=torch.float32), chunk_bytes=8):
                yield chunk

    for name in RPCS:
        if not hasattr(Echo, name):
            setattr(Echo, name, lambda self, *a: None)

    async def main() -> None:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((service.method_handlers(Echo()),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = service.Stub(channel)
                frames = [
                    wire.encode_frame(pb.Frame(push=pb.PushHeader(worker_id="w", clock=1))),
                    wire.encode_frame(tensor=torch.tensor([1.5, -2.0]), offset=2),
                ]

                async def gen():
                    for f in frames:
                        yield f

                resp = await stub.Push(gen(), timeout=10)
                assert isinstance(resp, pb.PushResponse) and (resp.version, resp.staleness) == (2, 3)
                assert received == frames and all(type(r) is bytes for r in received)

                got = [raw async for raw in stub.Pull(pb.PullRequest(worker_id="w", clock=5), timeout=10)]
                assert all(type(r) is bytes for r in got)
                head, _ = wire.decode_frame(got[0])
                assert (head.pull.version, head.pull.min_clock) == (9, 5)
                out = torch.zeros(4)
                for raw in got[1:]:
                    frame, payload = wire.decode_frame(raw)
                    chunk = wire.payload_tensor(frame, payload)
                    out[frame.tensor.offset : frame.tensor.offset + chunk.numel()] = chunk
                assert torch.equal(out, torch.arange(4, dtype=torch.float32))
        finally:
            await server.stop(None)

    asyncio.run(main())


@pytest.mark.parametrize("name", ["Replica", "Arbiter"])
def test_the_replica_and_arbiter_tables_follow_the_proto_too(name) -> None:
    """ps_server/replication.py and ps_server/arbiter.py are served and called from the same table."""
    rpcs = _rpcs(name)
    assert rpcs
    full = f"asyncps.v1.{name}"
    generic = service.method_handlers(SimpleNamespace(**{m: object() for m in rpcs}), name)
    channel = FakeChannel()
    stub = service.Stub(channel, name=name)
    for method, (cstream, req, sstream, _resp) in rpcs.items():
        h = generic.service(SimpleNamespace(method=f"/{full}/{method}", invocation_metadata=()))
        assert h is not None and (h.request_streaming, h.response_streaming) == (cstream, sstream), method
        kind = ("stream" if cstream else "unary") + "_" + ("stream" if sstream else "unary")
        assert getattr(stub, method) == (kind, f"/{full}/{method}")
        assert (h.request_deserializer is None) == (req == "Frame")
