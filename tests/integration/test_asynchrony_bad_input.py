"""Incompatible asynchrony choices: one line and exit 2 on the CLI, INVALID_ARGUMENT at Init.

Local steps with a rule that needs plain gradients (dc), elastic or an outer optimizer without local
steps, a dc history below s + 1, a worker look-ahead without local steps or with averaging:
`ps-worker` and `ps-cluster` refuse them before starting anything; a hand-made Init carrying
them is refused by a real server, which stays uninitialized; the same Init made compatible is
accepted, so the cases fail for the reason they name.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import torch

from asyncps_common.optimizer import default_config
from protos import wire
from protos.asyncps.v1 import ps_pb2 as pb
from worker import cli as worker_cli

from .support import call, status

ROOT = Path(__file__).resolve().parents[2]
N = 1000

CLI_BAD = {
    "local-steps-with-dc": (["--local-steps", "4", "--update-rule", "dc"], "--update-rule dc"),
    "outer-lr-without-local-steps": (["--outer-lr", "0.5"], "--outer-lr"),
    "outer-optimizer-without-local-steps": (["--outer-optimizer", "nesterov"], "--outer-optimizer"),
    "dynamic-without-local-steps": (["--dynamic-local-steps"], "--dynamic-local-steps"),
    "dc-history-below-bound": (["--update-rule", "dc", "--dc-history", "2", "--staleness", "2"], "s + 1"),
    "unknown-rule": (["--update-rule", "brake"], "--update-rule"),
    "elastic-without-local-steps": (["--update-rule", "elastic"], "--update-rule elastic"),
    "elastic-with-delayed-nesterov": (
        ["--local-steps", "2", "--update-rule", "elastic", "--outer-optimizer", "delayed-nesterov"],
        "delayed-nesterov",
    ),
    "dc-history-without-its-rule": (["--local-steps", "2", "--dc-history", "3"], "--dc-history"),
    "elastic-history-below-bound": (
        ["--local-steps", "2", "--update-rule", "elastic", "--dc-history", "2", "--staleness", "2"],
        "s + 1",
    ),
    "unknown-outer": (["--local-steps", "2", "--outer-optimizer", "adam"], "--outer-optimizer"),
    "period-without-delayed": (["--local-steps", "2", "--outer-period", "2"], "--outer-period"),
    "prefetch-beyond-bound": (["--pipeline", "--staleness", "1", "--prefetch", "2"], "--prefetch 2"),
    "prefetch-without-pipeline": (["--staleness", "2", "--prefetch", "2"], "--prefetch"),
    "lookahead-without-local-steps": (["--no-average-gradients", "--lookahead", "0.5"], "--lookahead"),
    "lookahead-with-averaging": (["--local-steps", "4", "--lookahead", "0.5"], "--no-average-gradients"),
    "negative-lookahead": (["--local-steps", "4", "--no-average-gradients", "--lookahead", "-1"], "--lookahead"),
}


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("ASYNCPS_")}


@pytest.mark.parametrize("name", list(CLI_BAD))
def test_worker_cli_refuses_in_process(monkeypatch, capsys, name):
    for k in list(os.environ):
        if k.startswith("ASYNCPS_"):
            monkeypatch.delenv(k)
    argv, mention = CLI_BAD[name]
    monkeypatch.setattr(worker_cli, "train", lambda cfg: pytest.fail("ps-worker accepted the input"))
    with pytest.raises(SystemExit) as info:
        worker_cli.main(["--servers", "127.0.0.1:1", *argv])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ps-worker: error: ") and mention in err[0], err


@pytest.mark.parametrize("prog", ["worker.cli", "worker.cluster"])
def test_cli_subprocess_one_line_exit_2(prog, tmp_path):
    extra = ["--servers", "127.0.0.1:1"] if prog == "worker.cli" else ["--out", str(tmp_path / "run")]
    r = subprocess.run(
        [sys.executable, "-m", prog, *extra, "--local-steps", "4", "--update-rule", "dc"],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        env=clean_env(),
    )
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "--update-rule dc" in r.stderr
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def init_frames(optimizer: pb.OptimizerConfig, staleness: float | None = None) -> list[bytes]:
    head = pb.InitHeader(plan_hash="a" * 64, shard_index=0, num_shards=1, numel=N, optimizer=optimizer, worker_id="w")
    if staleness is not None:
        head.staleness = staleness
    return [wire.encode_frame(pb.Frame(init=head)), wire.encode_frame(tensor=torch.zeros(N), offset=0)]


INIT_BAD = {
    "local-steps-with-dc": (default_config("sgd", lr=0.5, local_steps=4, update_rule="dc"), None, "plain gradients"),
    "outer-without-local-steps": (
        default_config("sgd", lr=0.5, momentum=0.9, update_rule="delayed-nesterov"),
        None,
        "needs local steps",
    ),
    "history-below-bound": (default_config("adamw", lr=1e-3, update_rule="dc", history_versions=2), 3.0, "s + 1"),
    "local-steps-adam-outer": (default_config("adamw", lr=1e-3, local_steps=2), None, "must be sgd"),
    "unknown-rule": (default_config("sgd", lr=0.1, update_rule="brake"), None, "unknown update rule"),
    "elastic-without-local-steps": (default_config("adamw", lr=1e-3, update_rule="elastic"), None, "needs local steps"),
    "lr-follows-split-without-dynamic-steps": (
        default_config("sgd", lr=0.5, local_steps=4, lr_follows_split=True),
        None,
        "dynamic local steps",
    ),
}


def test_init_refuses_incompatible_choices_and_changes_nothing(start_server):
    server = start_server()
    for name, (cfg, bound, mention) in INIT_BAD.items():
        code, details, _ = call(server.address, "Init", init_frames(cfg, bound))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (name, code, details)
        assert mention in details, (name, details)
        st = status(server.address)
        assert not st.initialized and st.version == 0, name
    ok = default_config("adamw", lr=1e-3, update_rule="dc", history_versions=4)
    code, details, _ = call(server.address, "Init", init_frames(ok, 3.0))
    assert code == grpc.StatusCode.OK, details
    st = status(server.address)
    assert st.initialized and st.optimizer.update_rule == "dc" and st.optimizer.history_versions == 4
