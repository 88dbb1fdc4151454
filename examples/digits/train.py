"""Handwritten digits through asyncps: your own model and script, under the launcher.

scikit-learn ships the data (1797 8x8 images, no download). A small MLP is trained
by P copies of this script, each on its own slice of the training images, through
asyncps servers; the weight matrices are decayed and the biases are not (two
parameter groups, as torch.optim takes them). Nothing here names an address: the
launcher tells `PSClient` where the servers are and which copy this is.

    pip install scikit-learn
    ps-cluster --servers 2 --workers 2 -- python examples/digits/train.py --epochs 10

Rank 0 measures the accuracy on the held-out fifth of the images at the end and writes
it to $ASYNCPS_RUN_DIR/digits.json (the launcher's --out).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from sklearn.datasets import load_digits

from worker import PSClient


def data(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train x, train y, test x, test y): a fixed 80/20 split, pixels scaled to [0, 1]."""
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x, dtype=torch.float32) / 16.0, torch.tensor(y)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = len(y) * 4 // 5
    return x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]


def main() -> None:
    p = argparse.ArgumentParser(description="Train an MLP on scikit-learn's digits through asyncps.")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--staleness", type=float, default=1)
    args = p.parse_args()

    torch.manual_seed(0)  # every copy builds the same initial model; the first to reach a server sets it
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    matrices = [p for p in model.parameters() if p.dim() > 1]
    biases = [p for p in model.parameters() if p.dim() == 1]
    groups = [{"params": matrices, "weight_decay": args.weight_decay}, {"params": biases, "weight_decay": 0.0}]
    train_x, train_y, test_x, test_y = data(seed=0)

    with PSClient(groups, optimizer={"name": "adamw", "lr": args.lr}, staleness=args.staleness) as ps:
        mine = torch.arange(ps.rank, len(train_y), ps.world)  # this copy's slice of the training images
        gen = torch.Generator().manual_seed(ps.rank)
        steps = 0  # this copy's updates (its clock may be one more: a copy that registers after another
        # has pushed starts at the slowest live worker's clock)
        for _ in range(args.epochs):
            for batch in mine[torch.randperm(len(mine), generator=gen)].split(args.batch_size):
                ps.pull()
                loss = torch.nn.functional.cross_entropy(model(train_x[batch]), train_y[batch])
                loss.backward()
                ps.push(samples=len(batch))
                steps += 1
        ps.pull()  # the servers' weights after this copy's last update
        with torch.no_grad():
            accuracy = float((model(test_x).argmax(1) == test_y).float().mean())
    print(f"worker {ps.rank} of {ps.world}: {steps} steps, held-out accuracy {accuracy:.3f}", flush=True)
    if ps.rank == 0 and os.environ.get("ASYNCPS_RUN_DIR"):
        out = Path(os.environ["ASYNCPS_RUN_DIR"]) / "digits.json"
        out.write_text(json.dumps({"accuracy": accuracy, "steps": steps, "test_images": len(test_y)}) + "\n")


if __name__ == "__main__":
    main()
