"""Measure the ranges the metrics' histogram buckets must cover, from a real ps-cluster run.

    python bench/metric_ranges.py --out runs/ranges -- --steps 1000
    python bench/metric_ranges.py --out runs/ranges-ssp -- --steps 600 --staleness 2 --no-average-gradients

Runs `ps-cluster --out OUT --no-progress <args after -->`, scrapes every process's
/metrics (ports from OUT/logs/*.metrics-port) every 0.5 s while it runs, keeps each
process's last scrape, and writes per histogram and shard the count and the bucket edges
at p10, p50, p90, p99 and the maximum. The answers are bucket edges: to fit new buckets,
first make the buckets much finer (docs/deploy.md's figures used a 1.25x grid from 0.1 ms).
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

SAMPLE = re.compile(r"^(\w+)_bucket\{(.*)\} (\S+)$", re.M)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("cluster_args", nargs="*")
    a = ap.parse_args()
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker.cluster", "--out", str(a.out), "--no-progress", *a.cluster_args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    last: dict[str, str] = {}
    while proc.poll() is None:
        for f in (a.out / "logs").glob("*.metrics-port"):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{int(f.read_text())}/metrics", timeout=2) as r:
                    last[f.name] = r.read().decode()
            except (OSError, ValueError):
                pass  # not up yet, or already gone
        time.sleep(0.5)
    sys.stdout.write(proc.stdout.read().decode())
    hist: dict[tuple[str, str], dict[float, float]] = collections.defaultdict(lambda: collections.defaultdict(float))
    for text in last.values():
        for name, labels, value in SAMPLE.findall(text):
            lab = dict(re.findall(r'(\w+)="([^"]*)"', labels))
            hist[(name, lab.get("shard", ""))][float(lab["le"].replace("+Inf", "inf"))] += float(value)
    for (name, shard), buckets in sorted(hist.items()):
        total = buckets[float("inf")]
        if not total:
            continue
        edges = sorted(buckets)
        q = {p: next(le for le in edges if buckets[le] >= p * total) for p in (0.1, 0.5, 0.9, 0.99, 1.0)}
        sys.stdout.write(
            f"{name:48s} shard={shard:2s} n={int(total):6d} "
            + " ".join(f"p{int(p * 100)}<={v:g}" for p, v in q.items())
            + "\n"
        )
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
