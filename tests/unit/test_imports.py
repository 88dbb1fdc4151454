"""The import rule between the packages, read from the source with `ast` (nothing is imported).

`protos` imports none of the others; `asyncps_common` (what both sides use) imports only
`protos`; `ps_server` never imports `worker`; `worker` imports `ps_server` only where it
starts or embeds a server: the cluster launcher and the cost model's calibration.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("protos", "asyncps_common", "ps_server", "worker")
# package -> the first-party packages it may import
ALLOWED = {
    "protos": set(),
    "asyncps_common": {"protos"},
    "ps_server": {"protos", "asyncps_common"},
    "worker": {"protos", "asyncps_common"},
}
# worker modules that start or embed a server, and so may import ps_server too
SERVER_EMBEDDERS = {"worker/cluster.py", "worker/cost/servers.py"}


def first_party_imports(path: Path) -> set[str]:
    """Top-level first-party packages `path` imports, anywhere in the module (functions included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found |= {n.split(".")[0] for n in names if n.split(".")[0] in PACKAGES}
    return found


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", PACKAGES)
def test_packages_import_only_what_the_rule_allows(package: str) -> None:
    files = modules(package)
    assert files, f"no modules found under {package}/"
    wrong = []
    for path in files:
        rel = path.relative_to(ROOT).as_posix()
        allowed = ALLOWED[package] | {package} | ({"ps_server"} if rel in SERVER_EMBEDDERS else set())
        bad = first_party_imports(path) - allowed
        if bad:
            wrong.append(f"{rel} imports {', '.join(sorted(bad))}")
    assert not wrong, "import rule broken:\n" + "\n".join(wrong)


def test_the_rule_is_checked_on_real_imports(tmp_path: Path) -> None:
    """The checker sees imports inside functions and `import a.b` forms, not only top-level `from` lines."""
    src = tmp_path / "m.py"
    src.write_text(
        "import os\nimport ps_server.store as s\n\ndef f():\n    from worker import task\n    from . import x\n"
    )
    assert first_party_imports(src) == {"ps_server", "worker"}


def test_the_shared_package_is_what_both_sides_use() -> None:
    """Flags, security, the /metrics endpoint and the optimizer configuration live in asyncps_common only."""
    for name in ("flags", "security", "metrics_http", "optimizer"):
        assert (ROOT / "asyncps_common" / f"{name}.py").is_file()
        assert not (ROOT / "ps_server" / f"{name}.py").exists(), f"ps_server/{name}.py is back: use asyncps_common"
    users = {
        p.relative_to(ROOT).parts[0]
        for pkg in ("ps_server", "worker")
        for p in modules(pkg)
        if "asyncps_common" in first_party_imports(p)
    }
    assert users == {"ps_server", "worker"}
