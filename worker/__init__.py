"""asyncps workers: the plan, the client (`PSClient`), the built-in task and its CLIs."""

from worker.client import PSClient, PushTicket
from worker.rpc import CallOptions, RpcFailed

__all__ = ["PSClient", "PushTicket", "CallOptions", "RpcFailed"]
