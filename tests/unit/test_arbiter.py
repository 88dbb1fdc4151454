"""The arbiter's compare-and-set (ps_server/arbiter.py): one change per epoch, by a member, persisted."""

from __future__ import annotations

import json

import pytest

from protos.asyncps.v1 import ps_pb2 as pb
from ps_server.arbiter import Arbiter


def acquire(arb: Arbiter, from_epoch: int, caller: str, members: list[str], shard: int = 0) -> pb.AcquireResponse:
    return arb.acquire(pb.AcquireRequest(shard_index=shard, from_epoch=from_epoch, caller=caller, members=members))


def test_one_change_per_epoch_wins_and_only_a_member_may_ask(tmp_path):
    state = tmp_path / "arbiter.json"
    arb = Arbiter(str(state))
    assert acquire(arb, 0, "a", ["a"]).acquired  # anyone starts the first chain
    assert acquire(arb, 1, "a", ["a", "b"]).config.epoch == 2
    # the head drops b and b promotes itself, both from epoch 2: only the first wins
    assert acquire(arb, 2, "b", ["b"]).acquired
    lost = acquire(arb, 2, "a", ["a"])
    assert not lost.acquired and (lost.config.epoch, list(lost.config.members)) == (3, ["b"])
    # a is no longer a member: it cannot change epoch 3, even with the right epoch
    assert not acquire(arb, 3, "a", ["a", "b"]).acquired
    assert acquire(arb, 0, "x", ["x"], shard=1).acquired  # shards are independent
    assert json.loads(state.read_text())["0"] == {"epoch": 3, "members": ["b"]}
    again = Arbiter(str(state))  # restarted: the configurations survive
    assert (again.config(0).epoch, list(again.config(0).members)) == (3, ["b"])


@pytest.mark.parametrize("members", [[], ["b", "b"], ["c"]], ids=["empty", "twice", "without-the-caller"])
def test_a_malformed_chain_is_refused_and_changes_nothing(members):
    arb = Arbiter()
    acquire(arb, 0, "b", ["b"])
    resp = acquire(arb, 1, "b", members)
    assert not resp.acquired and (resp.config.epoch, list(resp.config.members)) == (1, ["b"])


def test_an_unreadable_state_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "arbiter.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="unreadable"):
        Arbiter(str(bad))
