"""worker.procs: a child runs its module as __main__ with its argv, and only while its launcher lives."""

from __future__ import annotations

import subprocess
import sys

import pytest

from worker.procs import Children


@pytest.mark.skipif(sys.platform != "linux", reason="the parent-death guard is Linux's prctl")
def test_child_refuses_to_start_when_its_launcher_is_gone():
    r = subprocess.run(
        [sys.executable, "-m", "worker.procs", "1", "ps_server.cli", "--help"], capture_output=True, timeout=60
    )
    assert r.returncode == 1
    assert b"the launcher (pid 1) is gone" in r.stderr and b"usage" not in r.stdout


def test_child_runs_its_module_as_main_with_its_arguments(tmp_path):
    children = Children(tmp_path)
    try:
        ok = children.start("help", "ps_server.cli", ["--help"])
        bad = children.start("bad", "ps_server.cli", ["--port", "nope"])
        assert ok.proc.wait(timeout=60) == 0
        assert bad.proc.wait(timeout=60) == 2
    finally:
        children.stop_all(grace=5)
    assert "usage: ps-server" in ok.log.read_text()
    assert "--port" in bad.log.read_text() and "Traceback" not in bad.log.read_text()
