"""The ParameterServer method table, derived from the `.proto` descriptor.

Methods whose request or response type is `Frame` carry tensor data: their messages
are passed as raw bytes (encoded and decoded by `protos.wire`), so protobuf never
copies a payload. Every other message uses protobuf's own (de)serializers; a request
that does not parse is answered INVALID_ARGUMENT (gRPC itself would say UNKNOWN and log
a traceback). Server handlers and client stubs are both built from this one table, so
they cannot drift from the `.proto` or from each other; the same table serves the
`Replica` and `Arbiter` services (`name`). A `Stub` given `metadata`
(e.g. the auth token) sends it with every call.
"""

from __future__ import annotations

import functools
from typing import Any

import grpc
from google.protobuf import message_factory

from protos.asyncps.v1 import ps_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["ParameterServer"]
SERVICE_NAME = SERVICE.full_name
REASON_KEY = "asyncps-reason"  # trailing metadata naming a rejection the client acts on
UNKNOWN_WORKER = "unknown-worker"  # its value when the server does not know the worker's session
NOT_HEAD = "not-head"  # a replica that does not take workers' calls now: try the shard's next replica
STALE_EPOCH = "stale-epoch"  # a replicated entry from an epoch older than the replica's


class Undecodable:
    """What the server's deserializer hands a handler for a request that does not parse."""

    def __init__(self, type_name: str, exc: Exception):
        self.message = f"request does not parse as {type_name}: {exc}"


def _tolerant(cls) -> Any:
    def deserialize(raw: bytes) -> Any:
        try:
            return cls.FromString(raw)
        except Exception as exc:  # protobuf's DecodeError and friends
            return Undecodable(cls.DESCRIPTOR.full_name, exc)

    return deserialize


def _checked(fn: Any, response_streaming: bool) -> Any:
    """`fn`, answering INVALID_ARGUMENT to an `Undecodable` request instead of calling it."""
    bad = grpc.StatusCode.INVALID_ARGUMENT
    if response_streaming:

        @functools.wraps(fn)
        async def stream(request, context):
            if isinstance(request, Undecodable):
                await context.abort(bad, request.message)
            inner = fn(request, context)
            try:
                async for item in inner:
                    yield item
            finally:
                await inner.aclose()

        return stream

    @functools.wraps(fn)
    async def unary(request, context):
        if isinstance(request, Undecodable):
            await context.abort(bad, request.message)
        return await fn(request, context)

    return unary


def _codec(desc) -> tuple[Any, Any]:
    """(serializer, deserializer) for a message type; None, None (raw bytes) for Frame."""
    if desc.full_name == pb.Frame.DESCRIPTOR.full_name:
        return None, None
    cls = message_factory.GetMessageClass(desc)
    return cls.SerializeToString, cls.FromString


def method_handlers(servicer: object, name: str = "ParameterServer") -> grpc.GenericRpcHandler:
    """Generic handler routing every method of service `name` to `servicer.<Method>`."""
    handlers = {}
    svc = pb.DESCRIPTOR.services_by_name[name]
    for m in svc.methods:
        _, req_de = _codec(m.input_type)
        resp_ser, _ = _codec(m.output_type)
        fn = getattr(servicer, m.name)
        if req_de is not None and not m.client_streaming:
            req_de = _tolerant(message_factory.GetMessageClass(m.input_type))
            fn = _checked(fn, m.server_streaming)
        kind = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[(m.client_streaming, m.server_streaming)]
        handlers[m.name] = kind(fn, request_deserializer=req_de, response_serializer=resp_ser)
    return grpc.method_handlers_generic_handler(svc.full_name, handlers)


class _WithMetadata:
    """A multicallable that adds fixed metadata (e.g. the auth token) to every call."""

    def __init__(self, fn: Any, metadata: tuple):
        self._fn, self._metadata = fn, metadata

    def _merged(self, kw: dict) -> dict:
        kw["metadata"] = self._metadata + tuple(kw.get("metadata") or ())
        return kw

    def __call__(self, request: Any, **kw: Any) -> Any:
        return self._fn(request, **self._merged(kw))

    def future(self, request: Any, **kw: Any) -> Any:
        return self._fn.future(request, **self._merged(kw))

    def with_call(self, request: Any, **kw: Any) -> Any:
        return self._fn.with_call(request, **self._merged(kw))


class Stub:
    """Client callables for every method, e.g. `stub.Pull(request, timeout=...)`.

    `metadata` ((key, value) pairs) is sent with every call.
    """

    # set per method of the service in __init__; declared so type checkers know them
    Register: Any
    Heartbeat: Any
    Leave: Any
    Init: Any
    Push: Any
    Pull: Any
    Status: Any
    Checkpoint: Any
    Apply: Any  # Replica (name="Replica")
    Join: Any
    Config: Any  # Arbiter (name="Arbiter")
    Acquire: Any

    def __init__(self, channel: grpc.aio.Channel | grpc.Channel, metadata: tuple = (), name: str = "ParameterServer"):
        svc = pb.DESCRIPTOR.services_by_name[name]
        for m in svc.methods:
            req_ser, _ = _codec(m.input_type)
            _, resp_de = _codec(m.output_type)
            factory = {
                (False, False): channel.unary_unary,
                (False, True): channel.unary_stream,
                (True, False): channel.stream_unary,
                (True, True): channel.stream_stream,
            }[(m.client_streaming, m.server_streaming)]
            fn = factory(f"/{svc.full_name}/{m.name}", request_serializer=req_ser, response_deserializer=resp_de)
            setattr(self, m.name, _WithMetadata(fn, tuple(metadata)) if metadata else fn)
