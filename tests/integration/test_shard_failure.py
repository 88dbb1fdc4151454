"""A shard whose update fails part-way stops at once and keeps its last good checkpoint.

An optimizer step that raises (out of memory, a bug) may leave the weights half-stepped,
and in averaging mode the clock's summed gradient is gone with it: no state worth
serving or saving, and every worker would wait forever for that clock. So `serve` stops
the shard without a final checkpoint and raises ShardFailed (`ps-server` exits 1, and
ps-cluster or compose restart it from the checkpoint). Here `serve` runs in this
process's main thread (it installs signal handlers) with `ShardStore.apply` made to
fail, and a real PSClient trains against it from another thread.
"""

from __future__ import annotations

import asyncio
import logging
import threading

import pytest

from ps_server import checkpoint
from ps_server.server import serve
from ps_server.servicer import ServerConfig, Servicer, ShardFailed
from ps_server.store import ShardStore
from worker import PSClient

from .support import FAST_FAIL, batches, mlp, poll


@pytest.mark.parametrize("average", [False, True], ids=["ssp", "averaging"])
def test_a_failed_update_stops_the_shard_at_once_and_leaves_the_last_checkpoint(tmp_path, monkeypatch, caplog, average):
    def fail(self, *args, **kwargs):
        raise RuntimeError("injected: out of memory")

    monkeypatch.setattr(ShardStore, "apply", fail)
    servicer = Servicer(ServerConfig(staleness=0, checkpoint_dir=str(tmp_path / "ckpt")))
    port_file = tmp_path / "port"
    outcome: dict[str, BaseException] = {}

    def train() -> None:
        try:
            port = poll(lambda: port_file.exists() and int(port_file.read_text()), 30, "the port file")
            model = mlp()
            with PSClient(
                [f"127.0.0.1:{port}"],
                model,
                staleness=0,
                worker_id="w",
                options=FAST_FAIL,
                optimizer={"name": "sgd", "lr": 0.1, "average_gradients": average},
            ) as ps:
                x, y = batches(1)[0]
                ps.pull()
                torch_loss = ((model(x) - y) ** 2).mean()
                torch_loss.backward()
                ps.push()
                ps.pull()  # the shard is gone: retried, then refused
        except Exception as exc:  # what the worker sees is checked below
            outcome["error"] = exc

    worker = threading.Thread(target=train, daemon=True)
    worker.start()
    with caplog.at_level(logging.CRITICAL, logger="ps_server.servicer"):
        with pytest.raises(ShardFailed, match="injected: out of memory"):
            asyncio.run(serve(servicer, "127.0.0.1:0", grace=30, port_file=str(port_file), data_port=0))
    assert "shard 0 failed an update" in caplog.text
    saved = checkpoint.load(servicer.checkpoint_file)
    assert saved is not None and saved["store"]["version"] == 0  # Init's checkpoint, not the broken state
    worker.join(timeout=60)
    assert not worker.is_alive()
    assert "error" in outcome  # the worker was not left waiting for the lost update
