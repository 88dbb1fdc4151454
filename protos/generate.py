"""Regenerate the Python code and `.pyi` stubs from `protos/asyncps/v1/ps.proto`.

Usage (from the repository root):

    python -m protos.generate            # rewrite the generated files
    python -m protos.generate --check    # exit 1 if the checked-in files are stale

The generated files are committed so that installing asyncps needs no protoc; the
test suite runs `--check` so that the `.proto` and the code can never disagree.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO = Path("protos/asyncps/v1/ps.proto")
OUTPUTS = ("ps_pb2.py", "ps_pb2.pyi", "ps_pb2_grpc.py")


def generate(out_root: Path) -> list[Path]:
    """Run protoc (from grpcio-tools) into `out_root`; returns the generated files."""
    from grpc_tools import protoc
    import grpc_tools

    include = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{ROOT}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        str(ROOT / PROTO),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTO}")
    return [out_root / PROTO.parent / name for name in OUTPUTS]


def stale_files() -> list[str]:
    """Names of generated files that differ from what protoc makes of the `.proto` now."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        return [
            str(PROTO.parent / f.name)
            for f in fresh
            if not (ROOT / PROTO.parent / f.name).exists()
            or not filecmp.cmp(f, ROOT / PROTO.parent / f.name, shallow=False)
        ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check, change nothing")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        if stale:
            sys.stderr.write(f"generated code is stale: {', '.join(stale)}; run python -m protos.generate\n")
            return 1
        return 0
    generate(ROOT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
