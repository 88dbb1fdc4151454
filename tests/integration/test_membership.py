"""SPEC 'Consistency': live membership. A silent worker is evicted and stops holding others back;
one that comes back (or a new one) starts at the slowest live clock.

Two worker processes train against two shards with s = 2 and a 1.5 s heartbeat timeout.
The straggler is SIGKILLed mid-run. Until the servers evict it the fast worker stays
within s + 1 clocks of the dead one (the bound holds); within about the heartbeat
timeout it is evicted and the fast worker runs past it. Then a re-registering worker
(same id as the dead one) and a brand-new worker each start at the servers' slowest
live clock, which is > 0.
"""

from __future__ import annotations

import time

import pytest
import torch

from worker import PSClient

from .support import FAST_FAIL, clock_of, kill_group, poll, start_worker, status, stub, wait_exit
from .worker_proc import small_model

pytestmark = pytest.mark.slow  # real clusters or long runs: left out of the quick loop (-m "not slow")

S = 2
HEARTBEAT_TIMEOUT = 1.5
FAST_STEPS = 40
KILL_AT = 4  # SIGKILL the straggler once both shards have its clock at this value


def test_killed_worker_is_evicted_and_a_returning_worker_starts_at_the_slowest_clock(start_server, procs, tmp_path):
    servers = start_server.shards(2, staleness=S, heartbeat_timeout=HEARTBEAT_TIMEOUT)
    addresses = [s.address for s in servers]
    gate = tmp_path / "go"
    slow, slow_files = start_worker(procs, addresses, "slow", 100000, tmp_path, sleep=0.1, staleness=S, gate=gate)
    fast, fast_files = start_worker(procs, addresses, "fast", FAST_STEPS, tmp_path, staleness=S, gate=gate, hold=True)

    def registered() -> bool:
        for p, f in ((slow, slow_files), (fast, fast_files)):
            assert p.poll() is None, f"worker exited early: {f['log'].read_text()[-3000:]}"
        return slow_files["ready"].exists() and fast_files["ready"].exists()

    poll(registered, 90, "both workers to register")
    gate.touch()
    poll(
        lambda: all((clock_of(status(a), "slow") or 0) >= KILL_AT for a in addresses),
        60,
        f"the straggler to reach clock {KILL_AT}",
    )

    kill_group(slow)
    t_kill = time.monotonic()
    assert wait_exit(slow, 10) != 0

    # Watch every shard until the fast worker has finished its steps. `slow_last` is the
    # dead worker's final clock (its entry stays, frozen, until it is evicted).
    samples: list[tuple[float, int, int | None]] = []  # (seconds since kill, min fast clock, max slow clock)
    end = t_kill + 60
    while not fast_files["done"].exists():
        assert fast.poll() is None, f"fast worker died: {fast_files['log'].read_text()[-3000:]}"
        assert time.monotonic() < end, "fast worker made no progress after the straggler was killed"
        sts = [status(a) for a in addresses]
        t = time.monotonic() - t_kill
        fast_clock = min(clock_of(st, "fast") or 0 for st in sts)
        slow_clocks = [c for c in (clock_of(st, "slow") for st in sts) if c is not None]
        samples.append((t, fast_clock, max(slow_clocks) if slow_clocks else None))
        time.sleep(0.01)

    slow_last = max(s for _, _, s in samples if s is not None)
    assert slow_last >= KILL_AT
    # Before eviction the dead straggler still held the fast worker within the bound ...
    held = [f for _, f, s in samples if s is not None]
    assert held and max(held) <= slow_last + S + 1, f"fast ran to {max(held)} past a live straggler at {slow_last}"
    # ... and within about the heartbeat timeout it ran past it.
    passed = [t for t, f, _ in samples if f > slow_last + S + 1]
    assert passed, "the fast worker never got past the evicted worker's clock + s"
    assert passed[0] < HEARTBEAT_TIMEOUT + 3.0, f"fast worker blocked {passed[0]:.2f}s after the kill"

    for a in addresses:
        st = status(a)
        assert st.live_workers == 1 and st.evictions >= 1
        assert [c.worker_id for c in st.clocks] == ["fast"]
        assert st.min_clock == FAST_STEPS  # the fast worker holds, registered, at its last clock

    # The dead worker comes back under its own id, then a brand-new worker joins:
    # each starts at the slowest live clock, not at 0 and not at its old clock.
    for worker_id in ("slow", "newcomer"):
        model = small_model()
        with PSClient(
            addresses, model, optimizer={"name": "sgd", "lr": 0.01}, staleness=S, worker_id=worker_id, options=FAST_FAIL
        ) as ps:
            sts = [status(a) for a in addresses]
            for st in sts:
                assert clock_of(st, worker_id) == ps.clock == st.min_clock
            assert ps.clock == FAST_STEPS > slow_last
            assert all(st.live_workers == 2 for st in sts)
            # It can train from there.
            ps.pull()
            model(torch.randn(4, 8)).sum().backward()
            ps.push()
            ps.wait()
            assert all(clock_of(status(a), worker_id) == FAST_STEPS + 1 for a in addresses)

    fast_files["hold"].touch()
    assert wait_exit(fast, 30, fast_files["log"]) == 0, fast_files["log"].read_text()[-3000:]
    for a in addresses:
        st = status(a)
        assert st.live_workers == 0  # everyone left cleanly
        assert st.version == st.pushes_applied


def test_averaging_shard_stops_waiting_for_a_killed_worker(start_server, procs, tmp_path):
    """With gradient averaging a clock's update waits for every live worker's gradient;
    a SIGKILLed worker must stop holding it back once evicted, and the survivor finishes."""
    servers = start_server.shards(2, staleness=0, heartbeat_timeout=HEARTBEAT_TIMEOUT)
    addresses = [s.address for s in servers]
    gate = tmp_path / "go"
    victim, victim_files = start_worker(
        procs, addresses, "victim", 100000, tmp_path, staleness=0, gate=gate, average=True
    )
    survivor, survivor_files = start_worker(
        procs, addresses, "survivor", 30, tmp_path, staleness=0, gate=gate, average=True
    )
    poll(lambda: victim_files["ready"].exists() and survivor_files["ready"].exists(), 90, "both workers to register")
    gate.touch()
    poll(lambda: all((clock_of(status(a), "victim") or 0) >= 5 for a in addresses), 60, "a few averaged clocks")
    for a in addresses:  # lockstep, one update per clock: a shard's version is the slowest clock
        st = status(a)  # (+1 while an averaged update is applied and the clocks not yet advanced)
        assert st.version - st.min_clock in (0, 1) and st.live_workers == 2

    kill_group(victim)
    t_kill = time.monotonic()
    assert wait_exit(survivor, 60, survivor_files["log"]) == 0
    assert time.monotonic() - t_kill < HEARTBEAT_TIMEOUT + 30
    for a in addresses:
        st = status(a)
        assert st.evictions >= 1 and [c.worker_id for c in st.clocks] == []  # survivor left, victim evicted
        assert st.version == 30  # each of the survivor's 30 clocks applied exactly once (alone after the eviction)


def test_averaged_update_advances_a_worker_that_re_registered_while_its_gradient_waited(start_server):
    """A worker's push of clock c waits in the bucket; the worker re-registers (new session)
    and repeats clock c, which is refused as already received (never counted twice). When
    the bucket is finally applied - here because the other worker is evicted - the worker's
    CURRENT session must stand at c + 1, so its next pull is answered (it used to hang)."""
    import torch

    from protos import wire
    from protos.asyncps.v1 import ps_pb2 as pb

    from .support import call

    (server,) = start_server.shards(1, staleness=0, heartbeat_timeout=HEARTBEAT_TIMEOUT)
    a = server.address
    n, plan = 8, "p" * 64
    cfg = pb.OptimizerConfig(name="sgd", lr=0.5, average_gradients=True)
    init = [
        wire.encode_frame(
            pb.Frame(
                init=pb.InitHeader(plan_hash=plan, shard_index=0, num_shards=1, numel=n, optimizer=cfg, staleness=0)
            )
        ),
        wire.encode_frame(tensor=torch.zeros(n), offset=0),
    ]
    assert call(a, "Init", init)[0].name == "OK"

    def register(worker: str) -> pb.RegisterResponse:
        with stub(a) as s:
            return s.Register(pb.RegisterRequest(worker_id=worker, plan_hash=plan), timeout=10)

    def push(worker: str, session: int, clock: int):
        return call(
            a,
            "Push",
            [
                wire.encode_frame(
                    pb.Frame(push=pb.PushHeader(worker_id=worker, session=session, plan_hash=plan, clock=clock))
                ),
                wire.encode_frame(tensor=torch.ones(n)),
            ],
        )

    quiet = register("quiet")  # will push nothing and be evicted
    first = register("w")
    assert push("w", first.session, 0)[0].name == "OK"  # waits in the bucket for "quiet"
    again = register("w")  # the same worker comes back with a new session, still at clock 0
    assert again.clock == 0 and again.session != first.session
    assert push("w", again.session, 0)[0].name == "ALREADY_EXISTS"  # its gradient for clock 0 is in already

    def heartbeat_w() -> bool:  # keep "w" alive while "quiet" falls silent
        with stub(a) as s:
            s.Heartbeat(pb.HeartbeatRequest(worker_id="w", session=again.session), timeout=10)
        return status(a).evictions >= 1

    poll(heartbeat_w, 30, "the silent worker to be evicted", interval=0.2)
    st = status(a)
    assert st.version == 1 and clock_of(st, "w") == 1 and clock_of(st, "quiet") is None
    assert st.weights_checksum == pytest.approx(n * 0.5)  # one update of mean gradient 1 at lr 0.5, not two
    code, details, _ = call(
        a, "Pull", pb.PullRequest(worker_id="w", session=again.session, plan_hash=plan, clock=1), timeout=10
    )
    assert code.name == "OK", details
    del quiet


@pytest.mark.parametrize("replicated", [False, True], ids=["one-process", "replicated"])
def test_a_worker_registering_again_at_a_later_clock_releases_the_clock_it_jumped_past(
    start_server, procs, tmp_path, replicated
):
    """Averaging: "a" pushes clock 1, which waits for "b" (live at clock 1). "b" registers again
    at clock 2, as a worker does when another shard of its is already there; it will never push
    clock 1, so clock 1's update is applied at once and "a" moves on (it used to wait for ever:
    the bench's replicated run hung this way when a worker joined while the other ran). The
    update is applied before Register answers, not at the next eviction sweep."""
    from protos import wire
    from protos.asyncps.v1 import ps_pb2 as pb

    from .chains import start_chain
    from .support import call

    if replicated:
        addresses = start_chain(start_server, procs, tmp_path, staleness=0, heartbeat_timeout=60).addresses
    else:
        addresses = [start_server.shards(1, staleness=0, heartbeat_timeout=60)[0].address]
    a, n, plan = addresses[0], 8, "p" * 64
    cfg = pb.OptimizerConfig(name="sgd", lr=0.5, average_gradients=True)
    head = pb.InitHeader(plan_hash=plan, shard_index=0, num_shards=1, numel=n, optimizer=cfg, staleness=0)
    assert (
        call(a, "Init", [wire.encode_frame(pb.Frame(init=head)), wire.encode_frame(tensor=torch.zeros(n))])[0].name
        == "OK"
    )

    def register(worker: str, start_clock: int = 0) -> pb.RegisterResponse:
        with stub(a) as s:
            return s.Register(pb.RegisterRequest(worker_id=worker, plan_hash=plan, start_clock=start_clock), timeout=10)

    def push(worker: str, session: int, clock: int) -> str:
        header = pb.PushHeader(worker_id=worker, session=session, plan_hash=plan, clock=clock)
        frames = [wire.encode_frame(pb.Frame(push=header)), wire.encode_frame(tensor=torch.ones(n))]
        return call(a, "Push", frames)[0].name

    first = register("a")
    assert push("a", first.session, 0) == "OK"  # alone: applied at once
    assert register("b").clock == 1  # starts at the slowest live clock
    assert push("a", first.session, 1) == "OK"  # waits in clock 1's bucket for "b"
    assert status(a).version == 1
    assert register("b", start_clock=2).clock == 2
    for address in addresses:  # before Register answered, the head applied it, and so did its follower
        st = status(address)
        assert clock_of(st, "a") == clock_of(st, "b") == 2
        assert st.weights_checksum == pytest.approx(
            n * 0.5 * 2
        )  # two updates of mean gradient 1 at lr 0.5 (sum of |w|)
