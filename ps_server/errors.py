"""How a shard refuses: the domain errors and their one mapping to gRPC status codes.

`rejection` is used by the gRPC handlers (`ps_server.servicer`) and the TCP data plane
(`ps_server.dataplane`) alike, so a refusal reads the same on both paths (codes as SPEC lists them).
"""

from __future__ import annotations

import grpc

from protos import service, wire
from ps_server.clock import DuplicatePush, UnknownWorker

Code = grpc.StatusCode


class _Reject(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


class ShardFailed(Exception):
    """An update failed part-way (weights maybe half-stepped, an averaged clock lost): not to serve or save."""


class NotHead(Exception):
    """A replica that is not its shard's head was asked a worker's RPC (answered UNAVAILABLE, `not-head`)."""


def rejection(exc: BaseException) -> tuple[grpc.StatusCode, str, str] | None:
    """(status code, message, asyncps-reason) for a domain error; None for anything else.

    The one mapping of refusals to status codes, for the gRPC handlers and the data plane.
    """
    if isinstance(exc, _Reject):
        return exc.code, exc.message, ""
    if isinstance(exc, ShardFailed):  # retried by workers until the restarted shard answers
        return Code.UNAVAILABLE, str(exc), ""
    if isinstance(exc, NotHead):  # the worker tries the shard's next replica
        return Code.UNAVAILABLE, str(exc), service.NOT_HEAD
    if isinstance(exc, UnknownWorker):
        return Code.FAILED_PRECONDITION, str(exc), service.UNKNOWN_WORKER
    if isinstance(exc, DuplicatePush):
        return Code.ALREADY_EXISTS, str(exc), ""
    if isinstance(exc, (wire.FrameError, ValueError)):
        return Code.INVALID_ARGUMENT, str(exc), ""
    return None
