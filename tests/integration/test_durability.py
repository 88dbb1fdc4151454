"""SPEC 'Durability': a shard checkpoints weights, optimizer state, version and clocks, and resumes.

One real shard with --checkpoint-dir trains a few Adam steps, is told to checkpoint, then
trains on (so the live state differs from the file) and is SIGKILLed. Restarted on the
same directory (and port) it must come back exactly at the checkpoint: same version, the
very same weights bit for bit, and the same optimizer state - checked by behaviour: one
more identical gradient gives exactly what a local torch.optim.Adam restored to the
checkpointed state gives (and not what a fresh Adam would give). Finally SIGTERM stops it
gracefully and writes a last checkpoint holding the last applied version.
"""

from __future__ import annotations

import copy
import signal
import time

import pytest
import torch

from ps_server.checkpoint import checkpoint_path
from worker import PSClient

from .support import FAST_FAIL, batches, kill_group, mlp, rel_err, status, wait_exit

pytestmark = pytest.mark.slow  # real clusters or long runs: left out of the quick loop (-m "not slow")

ADAM = {"name": "adam", "lr": 1e-2}
BEFORE, AFTER = 5, 3  # steps before the checkpoint, steps after it that the crash loses


def flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def restart_on(start_server, port: int, **flags):
    """Restart on `port`; if it is not free again yet, retry a few times, then take a new port."""
    for _ in range(5):
        try:
            return start_server(port=port, **flags)
        except RuntimeError:  # the new process exited: port still held
            time.sleep(0.2)
    return start_server(port=0, **flags)


def test_restart_after_sigkill_resumes_at_the_checkpoint(start_server, tmp_path):
    ckpt_dir = tmp_path / "ckpt"
    flags = dict(checkpoint_dir=ckpt_dir, checkpoint_interval=3600, heartbeat_timeout=2, staleness=0, grace=3)
    server = start_server(**flags)
    data = batches(BEFORE + AFTER + 1, seed=7)

    model = mlp()
    ref = copy.deepcopy(model)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=ADAM["lr"])
    with PSClient([server.address], model, optimizer=ADAM, staleness=0, worker_id="w", options=FAST_FAIL) as ps:
        for x, y in data[:BEFORE]:
            ps.pull()
            torch.nn.functional.mse_loss(model(x), y).backward()
            ps.push()
            ref_opt.zero_grad()
            torch.nn.functional.mse_loss(ref(x), y).backward()
            ref_opt.step()
        ps.pull()
        (resp,) = ps.checkpoint()
        assert resp.version == BEFORE
        saved = status(server.address)
        assert saved.version == BEFORE and saved.checkpoint_version == BEFORE
        saved_weights = flat(model).clone()
        err = rel_err(saved_weights, flat(ref))
        assert err < 1e-5, f"server's Adam differs from torch.optim.Adam by {err:.2e} (relative)"
        saved_ref, saved_ref_opt = copy.deepcopy(ref), copy.deepcopy(ref_opt.state_dict())

        for x, y in data[BEFORE : BEFORE + AFTER]:  # updates the crash will lose
            ps.pull()
            torch.nn.functional.mse_loss(model(x), y).backward()
            ps.push()
        ps.wait()
        live = status(server.address)
        assert live.version == BEFORE + AFTER and live.weights_checksum != saved.weights_checksum

    path = checkpoint_path(ckpt_dir, 0, 1)
    assert resp.path == str(path) and path.exists()
    assert [p.name for p in ckpt_dir.iterdir()] == [path.name], "a temporary file was left behind"
    on_disk = torch.load(path, weights_only=True)
    assert on_disk["store"]["version"] == BEFORE
    assert torch.equal(on_disk["store"]["weights"], saved_weights)

    kill_group(server.proc, signal.SIGKILL)
    assert wait_exit(server.proc, 10) == -signal.SIGKILL
    server = restart_on(start_server, server.port, **flags)

    st = status(server.address)
    assert st.initialized and st.version == BEFORE and st.checkpoint_version == BEFORE
    assert st.weights_checksum == saved.weights_checksum
    assert st.plan_hash == saved.plan_hash and st.optimizer == saved.optimizer

    model = mlp(seed=123)  # different initial weights: everything must come from the server
    x, y = data[-1]
    with PSClient(
        [server.address], model, optimizer={"name": "sgd", "lr": 1.0}, staleness=0, worker_id="w", options=FAST_FAIL
    ) as ps:
        assert ps.clock == BEFORE  # the checkpointed clock, not 0 and not the lost BEFORE + AFTER
        ps.pull()
        assert torch.equal(flat(model), saved_weights), "restored weights differ from the checkpoint"
        torch.nn.functional.mse_loss(model(x), y).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        ps.push()
        ps.pull()
        resumed = flat(model).clone()
    assert status(server.address).optimizer.name == "adam"  # the restored settings, not this client's

    # The same gradient on a local Adam restored to the checkpointed state ...
    restored_opt = torch.optim.Adam(saved_ref.parameters(), lr=ADAM["lr"])
    restored_opt.load_state_dict(saved_ref_opt)
    # ... and on a fresh Adam with no state, to show the check can tell them apart.
    fresh = copy.deepcopy(saved_ref)
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=ADAM["lr"])
    for m, opt in ((saved_ref, restored_opt), (fresh, fresh_opt)):
        with torch.no_grad():
            for p, w in zip(m.parameters(), torch.split(saved_weights, [p.numel() for p in m.parameters()])):
                p.copy_(w.view_as(p))  # exactly the checkpointed weights
        for p, g in zip(m.parameters(), grads):
            p.grad = g.clone()
        opt.step()
    want, unwanted = flat(saved_ref), flat(fresh)
    assert rel_err(resumed, want) < 1e-6, "optimizer state was not restored"
    assert rel_err(resumed, unwanted) > 1e-4

    # Graceful stop: SIGTERM writes a final checkpoint at the last applied version.
    last = status(server.address)
    assert last.version == BEFORE + 1 and last.checkpoint_version == BEFORE
    t0 = time.monotonic()
    kill_group(server.proc, signal.SIGTERM)
    assert wait_exit(server.proc, 15, server.log) == 0, server.log.read_text()[-3000:]
    assert time.monotonic() - t0 < 3 + 3.0
    final = torch.load(path, weights_only=True)
    assert final["store"]["version"] == last.version
    assert torch.equal(final["store"]["weights"], resumed)
    assert float(final["store"]["weights"].double().abs().sum()) == last.weights_checksum
    assert int(final["store"]["optimizer"]["state"][0]["step"]) == BEFORE + 1
