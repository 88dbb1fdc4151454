"""Weight decay on every parameter vs. biases, LayerNorm weights and embeddings left undecayed.

Runs the built-in task with `ps-cluster` (S servers, P workers, AdamW with
--weight-decay) once per seed in each mode, alternating modes so machine noise falls on
both, and prints each run's held-out loss and per-mode medians and spreads:

    python -m bench.decay_groups --steps 400 --seeds 0 1 --weight-decay 0.1

Lower held-out loss is better; undecayed groups were to become `ps-worker`'s default only
if they measured no worse than --decay-all (they did not: docs/byom.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

MODES = {"groups": ["--no-decay-all"], "decay-all": ["--decay-all"]}


def run(mode: str, seed: int, args: argparse.Namespace, root: Path) -> float:
    out = root / f"{mode}-{seed}"
    cmd = [
        sys.executable,
        "-m",
        "worker.cluster",
        "--servers",
        str(args.servers),
        "--workers",
        str(args.workers),
        "--steps",
        str(args.steps),
        "--weight-decay",
        str(args.weight_decay),
        "--seed",
        str(seed),
        "--out",
        str(out),
        "--no-progress",
        "--no-metrics",
        "--eval-windows",
        str(args.eval_windows),
        *MODES[mode],
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if r.returncode != 0:
        raise SystemExit(f"{mode} seed {seed} failed:\n{r.stderr[-2000:]}")
    return json.loads((out / "summary.json").read_text())["heldout_loss"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--servers", type=int, default=2)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--eval-windows", type=int, default=64)
    args = p.parse_args()
    results: dict[str, list[float]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        for i, seed in enumerate(args.seeds):
            order = list(MODES) if i % 2 == 0 else list(reversed(MODES))
            for mode in order:
                loss = run(mode, seed, args, Path(tmp))
                results[mode].append(loss)
                print(f"{mode:<10} seed {seed}: held-out loss {loss:.4f} nats/byte", flush=True)
    for mode, losses in results.items():
        print(
            f"{mode:<10} median {statistics.median(losses):.4f}  range {min(losses):.4f}-{max(losses):.4f}  "
            f"(n={len(losses)})"
        )


if __name__ == "__main__":
    main()
