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


def generate(out_root: Path, root: Path = ROOT) -> list[Path]:
    """Run protoc (from grpcio-tools) on `root`'s `.proto` into `out_root`; returns the generated files."""
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{root}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        str(root / PROTO),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTO}")
    return [out_root / PROTO.parent / name for name in OUTPUTS]


def stale_files(root: Path = ROOT) -> list[str]:
    """Names of `root`'s generated files that differ from what protoc makes of its `.proto` now."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp), root)
        return [
            str(PROTO.parent / f.name)
            for f in fresh
            if not (root / PROTO.parent / f.name).exists()
            or not filecmp.cmp(f, root / PROTO.parent / f.name, shallow=False)
        ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check, change nothing")
    parser.add_argument(
        "--root", type=Path, default=ROOT, help="repository root holding protos/ (default: this checkout)"
    )
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files(args.root)
        if stale:
            sys.stderr.write(f"generated code is stale: {', '.join(stale)}; run python -m protos.generate\n")
            return 1
        return 0
    generate(args.root, args.root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
