"""Test helper: the shaped multi-host network of bench/shaped.py, as a pytest fixture.

`shaped_net(hosts, rate_mbit=..., delay_ms=...)` builds a `ShapedNet` (each host in its own
network namespace, shaped links to a bridge in another) and tears it down when the test
ends, pass or fail; the test fails with a clear message where the network cannot be
built (needs root and iproute2; CI runs as root).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import shaped  # noqa: E402  (bench/ is put on sys.path just above)


@pytest.fixture
def shaped_net():
    made: list[shaped.ShapedNet] = []

    def build(hosts, **kw) -> shaped.ShapedNet:
        net = shaped.ShapedNet(hosts, **kw)
        made.append(net)
        try:
            net.build()
        except shaped.NetError as exc:
            pytest.fail(f"cannot build the shaped network (needs root and iproute2): {exc}")
        return net

    try:
        yield build
    finally:
        for net in made:
            net.close()
