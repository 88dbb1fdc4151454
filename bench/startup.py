"""Start-up time of a short `ps-cluster` run, alternating between source trees.

    git worktree add /tmp/before <rev>
    python bench/startup.py --trees /tmp/before,. --rounds 5 --json bench/results/startup.json

A run of `--steps` iterations (2 by default: the run is nearly all start-up: launcher,
servers and workers starting, the held-out evaluation, export, the final checkpoints) is
timed from launch to exit, once per round, mode and tree, the trees taking turns so that
the machine's drift hits them alike. Each tree runs its own code: `python -m
worker.cluster` in that folder, so its children import that tree's packages. Modes:
`default`, and `local` (`--local-steps 4`). Prints each tree's median, range and ratio to
the first tree's median, per mode; `--json` writes every run. Blocks; loopback only.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = {"default": [], "local": ["--local-steps", "4"]}


def run_once(tree: Path, mode: str, args: argparse.Namespace, out: Path) -> float:
    """Seconds from launch to exit of one ps-cluster run in `tree`; raises if it fails."""
    argv = [sys.executable, "-m", "worker.cluster", "--steps", str(args.steps), "--workers", str(args.workers)]
    argv += ["--servers", str(args.servers), "--out", str(out), *MODES[mode]]
    t0 = time.perf_counter()
    done = subprocess.run(argv, cwd=tree, capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        tail = " | ".join((done.stdout + done.stderr).strip().splitlines()[-5:])
        raise RuntimeError(f"ps-cluster in {tree} ({mode}) exited {done.returncode}: {tail}")
    return wall


def summarize(runs: list[dict], trees: list[str], modes: list[str]) -> list[dict]:
    """Per mode and tree: median, min, max seconds, and the median's ratio to the first tree's."""
    rows = []
    for mode in modes:
        base = None
        for tree in trees:
            times = [r["seconds"] for r in runs if r["tree"] == tree and r["mode"] == mode]
            med = statistics.median(times)
            base = med if base is None else base
            rows.append(
                {
                    "mode": mode,
                    "tree": tree,
                    "median": round(med, 3),
                    "min": round(min(times), 3),
                    "max": round(max(times), 3),
                    "ratio": round(med / base, 3),
                }
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--trees", default=".", help="comma-separated source trees; the first is the baseline")
    p.add_argument("--modes", default="default,local", help=f"comma-separated, of: {', '.join(MODES)}")
    p.add_argument("--rounds", type=int, default=5, help="runs per tree and mode")
    p.add_argument("--steps", type=int, default=2, help="ps-cluster --steps")
    p.add_argument("--workers", type=int, default=2, help="ps-cluster --workers")
    p.add_argument("--servers", type=int, default=2, help="ps-cluster --servers")
    p.add_argument("--json", help="write every run and the summary here")
    args = p.parse_args(argv)
    trees = [t for t in args.trees.split(",") if t]
    modes = [m for m in args.modes.split(",") if m]
    missing = [t for t in trees if not (Path(t) / "worker" / "cluster.py").is_file()]
    if missing:
        p.error(f"not an asyncps source tree (no worker/cluster.py): {', '.join(missing)}")
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        p.error(f"unknown mode {', '.join(unknown) or '(none)'}; choose from {', '.join(MODES)}")
    if args.rounds < 1 or args.steps < 1 or args.workers < 1 or args.servers < 1:
        p.error("--rounds, --steps, --workers and --servers must be at least 1")
    runs = []
    with tempfile.TemporaryDirectory(prefix="asyncps-startup-") as work:
        for rnd in range(args.rounds):
            for mode in modes:
                for i, tree in enumerate(trees):
                    out = Path(work) / f"r{rnd}-{mode}-{i}"
                    try:
                        seconds = run_once(Path(tree).resolve(), mode, args, out)
                    except (RuntimeError, subprocess.TimeoutExpired) as exc:
                        print(f"startup.py: {exc}", file=sys.stderr)
                        return 1
                    runs.append({"round": rnd, "mode": mode, "tree": tree, "seconds": round(seconds, 3)})
                    print(f"round {rnd + 1}/{args.rounds}  {mode:8s} {tree}: {seconds:.2f} s", flush=True)
    rows = summarize(runs, trees, modes)
    print(f"\n{'mode':8s} {'tree':30s} {'median':>8s} {'range':>15s} {'ratio':>6s}")
    for r in rows:
        print(f"{r['mode']:8s} {r['tree']:30s} {r['median']:7.2f}s {r['min']:6.2f}-{r['max']:6.2f} s {r['ratio']:6.3f}")
    if args.json:
        settings = {k: getattr(args, k) for k in ("steps", "workers", "servers", "rounds")}
        machine = {"python": platform.python_version(), "platform": platform.platform()}
        doc = {"settings": settings, "machine": machine, "summary": rows, "runs": runs}
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
