"""Staleness alone, without any system: the built-in task trained in one process with delayed gradients.

    python bench/staleness.py --json bench/results/staleness.json
    python bench/staleness.py --delays 0 1 2 --updates 1000 --qk-norm both
    python bench/staleness.py --rules plain dc local4-avg --delays 1 2 4 --random --plot staleness.png

Each run is plain `torch.optim.AdamW` with the peers comparison's settings (bench/peers.py:
lr 6e-3, betas 0.9/0.95, 100 warm-up updates, batch 16, worker slices of 2 workers taken
in turn) where update u applies the gradient computed on the weights of update u - d
(d = 0: ordinary training). Delay d is what a push meets in asyncps without averaging when
d other pushes land between its pull and its apply (2 workers, s >= 1: d is about 1). So
it separates what staleness costs the algorithm from what any system costs. Every
`--every` updates it records the held-out loss (peers' 64 windows) and, for each attention
layer, the largest attention logit and the mean attention entropy on one fixed batch.
`--rules` runs the servers' update rules on a real shard store (bench/staleness_rules.py:
delay compensation, momentum shrinking, staleness-scaled lr, asynchronous local steps
with their outer optimizers and elastic averaging); `--random` adds delays drawn from 0..4.
Blocks; one process, `--threads` torch threads; denormals flushed as ps-worker does.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from peers_common import RunSpec, Task  # noqa: E402
from peers_eval import Evaluator  # noqa: E402
from staleness_rules import VARIANTS, Runner, eval_model  # noqa: E402
from worker.data import Corpus, default_corpus_path  # noqa: E402
from worker.task import ByteGPT, TaskConfig  # noqa: E402


@torch.no_grad()
def attention_stats(model: ByteGPT, idx: torch.Tensor) -> list[dict]:
    """Per layer: the largest |attention logit| and the mean entropy (nats) of the attention rows."""
    out, (b, t) = [], idx.shape
    x = model.tok_emb(idx) + model.pos_emb(torch.arange(t))
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    for block in model.blocks:
        attn = block.attn
        q, k, _ = attn.qkv(block.ln1(x)).split(x.shape[-1], dim=2)
        shape = (b, t, attn.n_head, x.shape[-1] // attn.n_head)
        q, k = (z.view(shape).transpose(1, 2) for z in (q, k))
        q, k = attn.q_norm(q), attn.k_norm(k)
        logits = (q @ k.transpose(-1, -2) / math.sqrt(shape[-1])).masked_fill(~causal, float("-inf"))
        p = logits.softmax(-1)
        entropy = -(p * torch.log(p.clamp_min(1e-30))).sum(-1).mean()
        out.append(
            {"max_logit": round(float(logits[:, :, causal].abs().max()), 2), "entropy": round(float(entropy), 4)}
        )
        x = block(x)
    return out


def run(delay: int | str, qk_norm: bool, args: argparse.Namespace, corpus: Corpus, rule: str = "plain") -> dict:
    task = TaskConfig(
        context=args.context, d_model=args.d_model, n_layer=args.n_layer, n_head=args.n_head, qk_norm=qk_norm
    )
    spec = RunSpec(
        system="staleness",
        scenario="uniform",
        workers=2,
        out="",
        lr=args.lr,
        warmup=args.warmup,
        batch_size=args.batch_size,
        task=task,
        data=args.data,
        seed=args.seed,
    )
    runner = Runner(rule, delay, spec, corpus, seed=args.seed, budget=args.updates)
    ev = Evaluator(spec, corpus, args.eval_windows)
    torch.set_num_threads(args.threads)  # Evaluator sets 1
    fixed = Task(spec, rank=1, world=2, corpus=corpus).batch()[0]
    points, t0, mark = [], time.perf_counter(), args.every
    while runner.batches < args.updates:
        runner.step()
        if runner.batches >= mark or runner.batches >= args.updates:
            mark += args.every
            model = eval_model(runner)
            point = {
                "updates": runner.batches,
                "heldout": round(ev.loss(model.state_dict()), 4),
                "attention": attention_stats(model, fixed),
                "seconds": round(time.perf_counter() - t0, 1),
            }
            torch.set_num_threads(args.threads)
            points.append(point)
            print(f"rule {rule} delay {delay} qk_norm {qk_norm}: {point}", flush=True)
    return {
        "rule": rule,
        "delay": delay,
        "qk_norm": qk_norm,
        "points": points,
        "final_heldout": points[-1]["heldout"] if points else None,
    }


def plot(runs: list[dict], path: str) -> None:
    """Held-out loss against batches, one line per (rule, delay, qk_norm), matplotlib's Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    for r in runs:
        label = f"{r['rule']} d={r['delay']}" + (" qk" if r["qk_norm"] else "")
        ax.plot([pt["updates"] for pt in r["points"]], [pt["heldout"] for pt in r["points"]], marker="o", label=label)
    ax.set_xlabel("batches of the budget (updates; with local steps, inner steps)")
    ax.set_ylabel("held-out loss (nats/byte)")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="bench/staleness.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--delays", type=int, nargs="+", default=[0, 1, 2], help="gradient delays (updates) to run")
    p.add_argument("--random", action="store_true", help="also run delays drawn uniformly from 0..4 (seeded)")
    p.add_argument(
        "--rules",
        nargs="+",
        default=["plain"],
        choices=list(VARIANTS),
        metavar="RULE",
        help=f"update rules to run: {', '.join(VARIANTS)}",
    )
    p.add_argument("--updates", type=int, default=1000, help="updates per run")
    p.add_argument("--every", type=int, default=200, help="updates between measurements")
    p.add_argument("--qk-norm", choices=["off", "on", "both"], default="both", help="the model's qk_norm")
    p.add_argument("--lr", type=float, default=6e-3, help="AdamW learning rate (peers' default)")
    p.add_argument("--warmup", type=int, default=100, help="updates of linear lr warm-up")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per update")
    p.add_argument("--context", type=int, default=128, help="bytes of context")
    p.add_argument("--d-model", type=int, default=128, help="model width")
    p.add_argument("--n-layer", type=int, default=2, help="transformer blocks")
    p.add_argument("--n-head", type=int, default=4, help="attention heads")
    p.add_argument("--data", help="text file or folder (default: this Python's standard library)")
    p.add_argument("--eval-windows", type=int, default=64, help="held-out windows per evaluation")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the results here")
    p.add_argument("--plot", help="draw held-out loss against updates (batches) per rule and delay into this PNG")
    args = p.parse_args(argv)
    if min(args.delays) < 0 or args.updates < 1 or args.every < 1:
        p.error("--delays must be >= 0, --updates and --every >= 1")
    torch.set_flush_denormal(True)
    try:
        TaskConfig(context=args.context, d_model=args.d_model, n_layer=args.n_layer, n_head=args.n_head)
        corpus = Corpus.load(args.data or default_corpus_path(), context=args.context)
    except (ValueError, FileNotFoundError) as exc:
        p.error(str(exc))
    norms = {"off": [False], "on": [True], "both": [False, True]}[args.qk_norm]
    delays = list(args.delays) + (["random"] if args.random else [])
    runs = [run(d, qk, args, corpus, rule) for qk in norms for rule in args.rules for d in delays]
    print(f"{'rule':>16} {'qk_norm':>8} {'delay':>6} " + " ".join(f"{pt['updates']:>7}" for pt in runs[0]["points"]))
    for r in runs:
        print(
            f"{r['rule']:>16} {str(r['qk_norm']):>8} {r['delay']:>6} "
            + " ".join(f"{pt['heldout']:7.3f}" for pt in r["points"])
        )
    if args.plot:
        plot(runs, args.plot)
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "settings": {k: v for k, v in vars(args).items() if k != "json"},
                    "torch": torch.__version__,
                    "runs": runs,
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
