"""What `ps-cluster` shows and writes: the live progress bar, the loss curve, summary.json.

`Monitor.poll` follows the workers' JSON-lines reports and the servers' Status, and
draws one tqdm bar for the whole cluster. `final_report` exports the trained model
from the servers into a safetensors file and measures its held-out loss. Used from
the launcher's main thread only.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from tqdm import tqdm

from asyncps_common.security import NONE, Security
from protos.asyncps.v1 import ps_pb2 as pb
from worker.data import Corpus, default_corpus_path, heldout_loss
from worker.export import pull_into
from worker.optim_config import follows_split, outer_lr
from worker.task import ByteGPT, TaskConfig, save_model
from worker.trainer import model_params


class Monitor:
    def __init__(self, args: argparse.Namespace, out: Path, stubs: list, workers: list):
        self.args, self.out, self.stubs, self.workers = args, out, stubs, workers
        self.latest: dict[int, dict] = {}
        self.done: dict[int, dict] = {}
        self._offsets: dict[int, int] = {}
        self.loss_curve: list[list[float]] = []
        self.first_step_at: float | None = None
        self.bar = tqdm(
            total=args.steps,
            unit="it",
            dynamic_ncols=True,
            disable=not args.progress,
            desc=f"asyncps S={args.servers} P={args.workers}",
        )

    def _read_reports(self) -> None:
        for r in range(len(self.workers)):
            path = self.out / "logs" / f"worker-{r}.jsonl"
            if not path.exists():
                continue
            with open(path) as f:
                f.seek(self._offsets.get(r, 0))
                for line in f:
                    if not line.endswith("\n"):
                        break  # a line still being written; read it next time
                    self._offsets[r] = self._offsets.get(r, 0) + len(line.encode())
                    rec = json.loads(line)
                    if rec["event"] == "progress":
                        self.latest[r] = rec
                    elif rec["event"] == "done":
                        self.done[r] = rec

    def poll(self, elapsed: float) -> None:
        self._read_reports()
        try:
            st: pb.StatusResponse = self.stubs[0].Status(pb.StatusRequest(), timeout=5)
        except Exception:  # a status miss only delays the bar
            return
        step = sum(rec["step"] for rec in self.latest.values())
        clocks = [c.clock for c in st.clocks if c.worker_id.startswith("worker-")]
        gap = (max(clocks) - min(clocks)) if clocks else 0
        if step and self.first_step_at is None:
            self.first_step_at = elapsed
        losses = [rec["loss"] for rec in self.latest.values()]
        loss = sum(losses) / len(losses) if losses else math.nan
        if losses:
            self.loss_curve.append([step, loss, round(elapsed, 3)])
        busy = elapsed - (self.first_step_at or elapsed)
        rate = step * self.args.batch_size / busy if busy > 1.0 else 0.0
        self.bar.n = min(step, self.args.steps)
        self.bar.set_postfix(loss=f"{loss:.3f}", samples_s=f"{rate:.0f}", clock_gap=gap, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        self._read_reports()
        self.bar.n = self.args.steps
        self.bar.close()


def final_report(
    args: argparse.Namespace, out: Path, servers: list[str], mon: Monitor, task: TaskConfig, security: Security = NONE
) -> dict:
    """Export the model, measure held-out loss, and assemble the summary (without wall time)."""
    torch.manual_seed(args.seed)
    model = ByteGPT(task)
    pull_into(servers, model_params(model, args.weight_decay, args.decay_all), security=security)
    model_path = out / "model.safetensors"
    save_model(model, task, model_path)
    corpus = Corpus.load(args.data or default_corpus_path(), context=task.context)
    held = heldout_loss(model, corpus.heldout, task.context, max_windows=args.eval_windows)
    done = [mon.done[r] for r in sorted(mon.done)]
    iterations = sum(d["steps"] for d in done)
    train_seconds = max(d["t"] for d in done)
    return {
        "iterations": iterations,
        "workers": args.workers,
        "servers": args.servers,
        "staleness": args.staleness,
        "optimizer": args.optimizer,
        "update_rule": args.update_rule,
        "local_steps": args.local_steps,
        "lookahead": args.lookahead if args.local_steps else None,
        "outer_optimizer": (args.outer_optimizer or "sgd") if args.local_steps else None,
        "outer_lr": (
            outer_lr(args.outer_lr, args.average_gradients, args.workers, args.update_rule)
            if args.local_steps
            else None
        ),
        "outer_lr_follows_split": follows_split(args),
        "average_gradients": args.average_gradients,
        "lr": args.lr,
        "batch_size": args.batch_size,
        "parameters": sum(p.numel() for p in model.parameters()),
        "t_task_seconds": sum(d["t_task_seconds"] for d in done) / len(done),
        "t_comm_seconds": sum(d["t_comm_seconds"] for d in done) / len(done),
        "bound_wait_seconds": sum(d["bound_wait_seconds"] for d in done) / len(done),
        "train_seconds": train_seconds,
        "samples_per_second": iterations * args.batch_size / train_seconds,
        "final_train_loss": sum(d["final_loss"] for d in done) / len(done),
        "heldout_loss": held,
        "loss_curve": mon.loss_curve,
        "model_path": str(model_path),
        "task": task.to_metadata(),
    }


def write_summary(out: Path, summary: dict) -> None:
    path = out / "summary.json"
    summary["summary_path"] = str(path)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    tmp.replace(path)
