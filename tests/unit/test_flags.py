"""Unit tests for asyncps_common.flags and the `ps-server` command line (parsing only, no server)."""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from asyncps_common.flags import FlagParser, non_negative, parse_bool, positive
from ps_server import cli

ROOT = Path(__file__).resolve().parents[2]

# Flags a compose file or orchestrator relies on (more may exist; each must have its variable).
KNOWN_FLAGS = {
    "host",
    "port",
    "port-file",
    "shard-index",
    "num-shards",
    "staleness",
    "heartbeat-timeout",
    "checkpoint-dir",
    "checkpoint-interval",
    "chunk-bytes",
    "max-message-bytes",
    "max-shard-bytes",
    "grace",
    "log-level",
}


def env_var(flag: str) -> str:
    return "ASYNCPS_" + flag.upper().replace("-", "_")


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("ASYNCPS_")}


@pytest.fixture(autouse=True)
def no_asyncps_env(monkeypatch):
    for k in list(os.environ):
        if k.startswith("ASYNCPS_"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("COLUMNS", "300")


def parser_flags(parser: argparse.ArgumentParser) -> list[str]:
    return [
        opt[2:]
        for a in parser._actions
        for opt in a.option_strings
        if opt.startswith("--") and opt != "--help" and not opt.startswith("--no-")
    ]


# -- help --------------------------------------------------------------------------------


def test_help_names_every_flags_env_variable() -> None:
    parser = cli.build_parser()
    flags = parser_flags(parser)
    assert KNOWN_FLAGS <= set(flags)
    text = " ".join(parser.format_help().split())
    for flag in flags:
        assert f"--{flag}" in text
        assert f"[env {env_var(flag)}]" in text, flag


@pytest.mark.slow
def test_help_subprocess(subprocess_results) -> None:
    proc = subprocess_results["help"]
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    assert text.startswith("usage: ps-server")
    for flag in KNOWN_FLAGS:
        assert f"[env {env_var(flag)}]" in text, flag


def test_help_shows_the_value_in_force(monkeypatch) -> None:
    monkeypatch.setenv("ASYNCPS_GRACE", "7.25")
    text = " ".join(cli.build_parser().format_help().split())
    assert "[env ASYNCPS_GRACE] (default: 7.25)" in text


# -- environment defaults -------------------------------------------------------------------


@pytest.mark.parametrize(
    "var, raw, attr, value",
    [
        ("ASYNCPS_PORT", "123", "port", 123),
        ("ASYNCPS_HOST", "0.0.0.0", "host", "0.0.0.0"),
        ("ASYNCPS_STALENESS", "inf", "staleness", math.inf),
        ("ASYNCPS_STALENESS", "4", "staleness", 4.0),
        ("ASYNCPS_HEARTBEAT_TIMEOUT", "2.5", "heartbeat_timeout", 2.5),
        ("ASYNCPS_NUM_SHARDS", "8", "num_shards", 8),
        ("ASYNCPS_CHECKPOINT_DIR", "/data/ckpt", "checkpoint_dir", "/data/ckpt"),
        ("ASYNCPS_LOG_LEVEL", "DEBUG", "log_level", "DEBUG"),
        ("ASYNCPS_GRACE", "0", "grace", 0.0),
    ],
)
def test_env_sets_defaults(monkeypatch, var: str, raw: str, attr: str, value) -> None:
    baseline = getattr(cli.build_parser().parse_args([]), attr)
    assert baseline != value
    monkeypatch.setenv(var, raw)
    args = cli.build_parser().parse_args([])
    assert getattr(args, attr) == value
    assert type(getattr(args, attr)) is type(value)


def test_flag_beats_env(monkeypatch) -> None:
    monkeypatch.setenv("ASYNCPS_PORT", "123")
    monkeypatch.setenv("ASYNCPS_STALENESS", "inf")
    args = cli.build_parser().parse_args(["--port", "7", "--staleness", "0"])
    assert args.port == 7 and args.staleness == 0.0


def test_defaults_without_env() -> None:
    args = cli.build_parser().parse_args([])
    assert args.port == 50051 and args.num_shards == 1 and args.shard_index == 0
    assert args.staleness is None  # unset: the first worker's bound
    cfg = cli.config_from_args(
        cli.build_parser().parse_args(["--num-shards", "3", "--shard-index", "2", "--staleness", "1"])
    )
    assert (cfg.shard_index, cfg.num_shards, cfg.staleness) == (2, 3, 1.0)


# -- bad input: one line, exit 2 -------------------------------------------------------------

BAD = {
    "port-abc": (["--port", "abc"], {}, "--port"),
    "num-shards-0": (["--num-shards", "0"], {}, "--num-shards"),
    "shard-index-too-big": (["--shard-index", "2", "--num-shards", "2"], {}, "--shard-index 2"),
    "staleness-negative": (["--staleness", "-1"], {}, "--staleness"),
    "unknown-flag": (["--no-such-flag", "1"], {}, "--no-such-flag"),
    "env-log-level": ([], {"ASYNCPS_LOG_LEVEL": "bogus"}, "ASYNCPS_LOG_LEVEL"),
}
# Checked in-process too (cheap), with the ones above.
BAD_IN_PROCESS = {
    **BAD,
    "staleness-nan": (["--staleness", "nan"], {}, "--staleness"),
    "staleness-fraction": (["--staleness", "1.5"], {}, "--staleness"),
    "staleness-word": (["--staleness", "x"], {}, "--staleness"),
    "heartbeat-0": (["--heartbeat-timeout", "0"], {}, "--heartbeat-timeout"),
    "port-negative": (["--port", "-5"], {}, "--port"),
    "grace-negative": (["--grace", "-1"], {}, "--grace"),
    "log-level": (["--log-level", "LOUD"], {}, "--log-level"),
    "missing-value": (["--port"], {}, "--port"),
    "positional": (["extra"], {}, "extra"),
    "env-port": ([], {"ASYNCPS_PORT": "abc"}, "ASYNCPS_PORT"),
    "chunk-vs-message": (["--chunk-bytes", str(8 << 20)], {}, "--chunk-bytes"),
    "env-num-shards": ([], {"ASYNCPS_NUM_SHARDS": "0"}, "ASYNCPS_NUM_SHARDS"),
    "env-staleness": ([], {"ASYNCPS_STALENESS": "1.5"}, "ASYNCPS_STALENESS"),
    "env-heartbeat": ([], {"ASYNCPS_HEARTBEAT_TIMEOUT": "soon"}, "ASYNCPS_HEARTBEAT_TIMEOUT"),
    "env-shard-index": ([], {"ASYNCPS_SHARD_INDEX": "1"}, "--shard-index 1"),
}


def assert_one_line_error(err: str, mention: str) -> None:
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1, err
    assert lines[0].startswith("ps-server: error: "), err
    assert mention in lines[0], err
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def subprocess_results() -> dict[str, subprocess.CompletedProcess]:
    """`--help` and every BAD case run as `python -m ps_server.cli ...`, all at once (each imports torch)."""
    running = {
        "help": subprocess.Popen(
            [sys.executable, "-m", "ps_server.cli", "--help"],
            cwd=ROOT,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**clean_env(), "COLUMNS": "300"},
        )
    }
    for name, (argv, env, _) in BAD.items():
        safe = argv if "--port" in argv else argv + ["--port", "0"]  # never a fixed port, should one start
        running[name] = subprocess.Popen(
            [sys.executable, "-m", "ps_server.cli", *safe],
            cwd=ROOT,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**clean_env(), **env},
        )
    results = {}
    for name, proc in running.items():
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return results


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_subprocess(subprocess_results, name: str) -> None:
    result = subprocess_results[name]
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stdout == ""
    assert_one_line_error(result.stderr, BAD[name][2])


@pytest.mark.parametrize("name", list(BAD_IN_PROCESS))
def test_bad_input_in_process(monkeypatch, capsys, name: str) -> None:
    argv, env, mention = BAD_IN_PROCESS[name]
    for k, v in env.items():
        monkeypatch.setenv(k, v)

    def must_not_serve(coro) -> None:  # a regression fails here instead of serving forever
        coro.close()
        pytest.fail("ps-server accepted the input and would start serving")

    monkeypatch.setattr(cli.uvloop, "run", must_not_serve)
    safe = argv if "--port" in argv else argv + ["--port", "0"]
    with pytest.raises(SystemExit) as info:
        cli.main(safe)
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert_one_line_error(captured.err, mention)


# -- FlagParser building blocks ---------------------------------------------------------------


def test_env_switch(monkeypatch, capsys) -> None:
    def parse(argv=()):
        p = FlagParser(prog="t")
        p.env_switch("use-cuda", default=False, help="run on CUDA")
        return p.parse_args(list(argv)).use_cuda

    assert parse() is False
    assert parse(["--use-cuda"]) is True
    for raw, value in (("1", True), ("TRUE", True), ("yes", True), ("0", False), ("off", False), ("", False)):
        monkeypatch.setenv("ASYNCPS_USE_CUDA", raw)
        assert parse() is value
    monkeypatch.setenv("ASYNCPS_USE_CUDA", "1")
    assert parse(["--no-use-cuda"]) is False
    monkeypatch.setenv("ASYNCPS_USE_CUDA", "maybe")
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        parse()
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ASYNCPS_USE_CUDA='maybe'" in err


def test_env_flag_choices_checked_for_env_values(monkeypatch, capsys) -> None:
    monkeypatch.setenv("ASYNCPS_MODE", "c")
    p = FlagParser(prog="t")
    with pytest.raises(SystemExit):
        p.env_flag("mode", default="a", choices=["a", "b"])
    assert "ASYNCPS_MODE='c'" in capsys.readouterr().err
    monkeypatch.setenv("ASYNCPS_MODE", "b")
    p = FlagParser(prog="t")
    p.env_flag("mode", default="a", choices=["a", "b"])
    assert p.parse_args([]).mode == "b"


def test_parse_bool_rejects_junk() -> None:
    with pytest.raises(ValueError, match="boolean"):
        parse_bool("2")


def test_positive_and_non_negative() -> None:
    assert positive(int)("3") == 3 and positive(float)("0.5") == 0.5
    assert non_negative(int)("0") == 0
    for conv, text in ((positive(int), "0"), (positive(float), "-0.1"), (non_negative(int), "-1")):
        with pytest.raises(argparse.ArgumentTypeError):
            conv(text)
    with pytest.raises(ValueError):
        positive(int)("1.5")
    assert positive(int).__name__ == "int"  # so argparse says "invalid int value"
