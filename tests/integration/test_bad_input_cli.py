"""SPEC 'Errors and bad input', the command line: `ps-server` answers a bad flag, environment
variable or file (a port in use, a corrupt checkpoint) with one line on stderr and exit 2.

The port in use is a live `ps-server`'s: the "ready" one of test_bad_input.py's `servers` fixture.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ps_server.checkpoint import checkpoint_path

from .test_bad_input import servers  # noqa: F401 (a fixture)


def _cli_cases(tmp_path, busy_port: int) -> dict[str, tuple[list[str], dict]]:
    bad_ckpt = tmp_path / "ckpt"
    bad_ckpt.mkdir(exist_ok=True)
    checkpoint_path(bad_ckpt, 0, 1).write_bytes(b"this is not a checkpoint")
    return {
        "port-not-a-number": (["--port", "abc"], {}),
        "shard-index-out-of-range": (["--shard-index", "3", "--num-shards", "2"], {}),
        "unknown-flag": (["--no-such-flag"], {}),
        "negative-staleness": (["--staleness", "-1"], {}),
        "zero-heartbeat-timeout": (["--heartbeat-timeout", "0"], {}),
        "bad-env-var": ([], {"ASYNCPS_NUM_SHARDS": "many"}),
        "port-in-use": (["--port", str(busy_port)], {}),
        "corrupt-checkpoint-file": (["--port", "0", "--checkpoint-dir", str(bad_ckpt)], {}),
    }


CLI_CASES = [
    "port-not-a-number",
    "shard-index-out-of-range",
    "unknown-flag",
    "negative-staleness",
    "zero-heartbeat-timeout",
    "bad-env-var",
    "port-in-use",
    "corrupt-checkpoint-file",
]


@pytest.mark.slow
@pytest.mark.parametrize("name", CLI_CASES)
def test_cli_bad_flag_prints_one_line_and_exits_2(servers, tmp_path, name):  # noqa: F811 (the fixture imported above)
    args, env = _cli_cases(tmp_path, servers["ready"].port)[name]
    proc = subprocess.run(
        [sys.executable, "-m", "ps_server.cli", *args],
        capture_output=True,
        timeout=60,
        env={**os.environ, **env},
        stdin=subprocess.DEVNULL,
    )
    err = proc.stderr.decode()
    assert proc.returncode == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("ps-server: error: ")
    assert proc.stdout == b""
