"""The ParameterServer method table, derived from the `.proto` descriptor.

Methods whose request or response type is `Frame` carry tensor data: their messages
are passed as raw bytes (encoded and decoded by `protos.wire`), so protobuf never
copies a payload. Every other message uses protobuf's own (de)serializers. Server
handlers and client stubs are both built from this one table, so they cannot drift
from the `.proto` or from each other.
"""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import message_factory

from protos.asyncps.v1 import ps_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["ParameterServer"]
SERVICE_NAME = SERVICE.full_name
REASON_KEY = "asyncps-reason"  # trailing metadata naming a rejection the client acts on
UNKNOWN_WORKER = "unknown-worker"  # its value when the server does not know the worker's session


def _codec(desc) -> tuple[Any, Any]:
    """(serializer, deserializer) for a message type; None, None (raw bytes) for Frame."""
    if desc.full_name == pb.Frame.DESCRIPTOR.full_name:
        return None, None
    cls = message_factory.GetMessageClass(desc)
    return cls.SerializeToString, cls.FromString


def method_handlers(servicer: object) -> grpc.GenericRpcHandler:
    """Generic handler routing every method of the service to `servicer.<Method>`."""
    handlers = {}
    for m in SERVICE.methods:
        _, req_de = _codec(m.input_type)
        resp_ser, _ = _codec(m.output_type)
        kind = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[(m.client_streaming, m.server_streaming)]
        handlers[m.name] = kind(getattr(servicer, m.name), request_deserializer=req_de, response_serializer=resp_ser)
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)


class Stub:
    """Client callables for every method, e.g. `stub.Pull(request, timeout=...)`."""

    def __init__(self, channel: grpc.aio.Channel):
        for m in SERVICE.methods:
            req_ser, _ = _codec(m.input_type)
            _, resp_de = _codec(m.output_type)
            factory = {
                (False, False): channel.unary_unary,
                (False, True): channel.unary_stream,
                (True, False): channel.stream_unary,
                (True, True): channel.stream_stream,
            }[(m.client_streaming, m.server_streaming)]
            setattr(self, m.name, factory(f"/{SERVICE_NAME}/{m.name}", request_serializer=req_ser,
                                          response_deserializer=resp_de))
