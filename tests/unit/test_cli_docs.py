"""docs/cli.md is what scripts/gen_cli_docs.py makes from the parsers: it fails when a flag changes
and the docs do not."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from ps_server import cli as server_cli

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def gen():
    spec = importlib.util.spec_from_file_location("gen_cli_docs", ROOT / "scripts" / "gen_cli_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_docs_are_current(gen) -> None:
    assert (ROOT / "docs" / "cli.md").read_text() == gen.render(), (
        "docs/cli.md is stale: run python scripts/gen_cli_docs.py and commit it"
    )


def test_every_flag_and_variable_is_documented(gen, monkeypatch) -> None:
    monkeypatch.setenv("ASYNCPS_PORT", "1234")  # the shell's variables do not leak into the docs' defaults
    text = gen.render()
    assert "| `--port` | `ASYNCPS_PORT` | `50051` |" in text
    for action in server_cli.build_parser()._actions:
        for option in action.option_strings:
            if option not in ("-h", "--help"):
                assert f"`{option}`" in text
    for command in gen.COMMANDS:
        assert f"## `{command}`" in text
    for sub in ("calibrate", "predict", "validate"):
        assert f"### `ps-cost {sub}`" in text


def test_check_fails_on_a_stale_file(gen, tmp_path, monkeypatch) -> None:
    stale = tmp_path / "cli.md"
    stale.write_text(gen.render().replace("--heartbeat-timeout", "--heartbeat-timout", 1))
    monkeypatch.setattr(gen, "OUT", stale)
    assert gen.main(["--check"]) == 1
    assert gen.main([]) == 0 and gen.main(["--check"]) == 0
