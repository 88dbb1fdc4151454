"""Typed command-line flags whose defaults come from environment variables.

Every flag `--some-flag` of a role can also be set as `ASYNCPS_SOME_FLAG` (so compose
files and orchestrators configure processes through the environment); `--help` shows
the variable and the value in force. A bad flag or value prints one line and exits
with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

ENV_PREFIX = "ASYNCPS_"


class FlagParser(argparse.ArgumentParser):
    """ArgumentParser with env-var defaults and one-line errors."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def env_flag(
        self, name: str, *, type: Callable[[str], Any] = str, default: Any = None, help: str = "", **kwargs: Any
    ) -> argparse.Action:
        """Add `--name`, defaulting to $ASYNCPS_NAME (converted by `type`) or `default`."""
        var = ENV_PREFIX + name.upper().replace("-", "_")
        raw = os.environ.get(var)
        if raw is not None:
            try:
                default = type(raw)
            except (ValueError, argparse.ArgumentTypeError) as exc:
                self.error(f"environment variable {var}={raw!r}: {exc}")
            choices = kwargs.get("choices")
            if choices is not None and default not in choices:  # argparse checks choices only on the command line
                self.error(f"environment variable {var}={raw!r}: choose from {', '.join(map(str, choices))}")
        return self.add_argument(f"--{name}", type=type, default=default, help=f"{help} [env {var}]", **kwargs)

    def env_switch(self, name: str, *, default: bool = False, help: str = "") -> argparse.Action:
        """A boolean --name / --no-name, defaulting to $ASYNCPS_NAME (1/0, true/false)."""
        var = ENV_PREFIX + name.upper().replace("-", "_")
        raw = os.environ.get(var)
        if raw is not None:
            try:
                default = parse_bool(raw)
            except ValueError as exc:
                self.error(f"environment variable {var}={raw!r}: {exc}")
        return self.add_argument(
            f"--{name}", action=argparse.BooleanOptionalAction, default=default, help=f"{help} [env {var}]"
        )

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected a boolean (1/0, true/false), got {text!r}")


def positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    """A type converter accepting only values > 0."""

    def convert(text: str) -> Any:
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    convert.__name__ = kind.__name__
    return convert


def non_negative(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    """A type converter accepting only values >= 0."""

    def convert(text: str) -> Any:
        value = kind(text)
        if value < 0:
            raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
        return value

    convert.__name__ = kind.__name__
    return convert


def int_range(lo: int, hi: int) -> Callable[[str], int]:
    """A type converter accepting only integers from `lo` to `hi`."""

    def convert(text: str) -> int:
        value = int(text)
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"must be {lo} to {hi}, got {text}")
        return value

    convert.__name__ = "int"
    return convert


def parse_staleness(text: str) -> float:
    """'3' -> 3.0, 'inf' -> math.inf; ValueError otherwise."""
    value = float(text)
    if value < 0 or math.isnan(value) or (value != math.inf and value != int(value)):
        raise ValueError(f"staleness must be a whole number >= 0 or 'inf', got {text!r}")
    return value


def staleness_flag(text: str) -> float:
    """argparse type for a staleness bound s (ps-server, ps-worker, ps-cost)."""
    try:
        return parse_staleness(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
