"""Starting replicated shards for the tests: one `ps-arbiter` and R `ps-server` replicas of a shard."""

from __future__ import annotations

import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

from protos.asyncps.v1 import ps_pb2 as pb

from .support import poll, stub


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def start_arbiter(procs, directory: Path) -> str:
    port_file = directory / "arbiter.port"
    with open(directory / "arbiter.log", "wb") as log:
        procs.popen(
            [sys.executable, "-m", "ps_server.arbiter", "--port", "0", "--port-file", str(port_file)],
            stdout=log,
            stderr=log,
        )
    poll(port_file.exists, 60, "the arbiter to listen")
    return f"127.0.0.1:{int(port_file.read_text())}"


def status(address: str) -> pb.StatusResponse:
    with stub(address) as s:
        return s.Status(pb.StatusRequest(include_checksum=True), timeout=10)


def try_status(address: str) -> pb.StatusResponse | None:
    try:
        return status(address)
    except Exception:
        return None


@dataclass
class Chain:
    """One shard's replicas (head first at the start) and how each was started."""

    addresses: list[str]
    arbiter: str
    flags: dict
    servers: list = field(default_factory=list)

    @property
    def servers_flag(self) -> str:
        return "|".join(self.addresses)

    def start(self, start_server, k: int):
        port = int(self.addresses[k].rsplit(":", 1)[1])
        return start_server.launch(
            port=port,
            replicas=self.servers_flag,
            replica_index=k,
            arbiter=self.arbiter,
            **self.flags,
        )

    def head(self) -> pb.StatusResponse | None:
        for a in self.addresses:
            st = try_status(a)
            if st is not None and st.role == "head":
                return st
        return None

    def wait_formed(self, timeout: float = 60) -> None:
        """Until a head has every replica in its chain."""

        def formed() -> bool:
            st = self.head()
            return st is not None and len(st.members) == len(self.addresses)

        poll(formed, timeout, "the chain to form")


def start_chain(start_server, procs, directory: Path, replicas: int = 2, **flags) -> Chain:
    chain = Chain([f"127.0.0.1:{p}" for p in free_ports(replicas)], start_arbiter(procs, directory), flags)
    pending = [chain.start(start_server, k) for k in range(replicas)]
    chain.servers = [p.ready() for p in pending]
    chain.wait_formed()
    return chain
