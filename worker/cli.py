"""`ps-worker`: run one worker of the built-in byte-level LM task against asyncps servers.

The training flags (task, optimizer, batch, data) are shared with `ps-cluster`, which
passes them through to each worker it starts; every flag can also be set through its
environment variable (shown in --help).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from asyncps_common import security
from asyncps_common.delay import DEFAULT_DC_LAMBDA, HISTORY_RULES, RULES, UNBOUNDED_HISTORY
from asyncps_common.flags import FlagParser, int_range, non_negative, positive, staleness_flag
from asyncps_common.jitter import parse_jitter
from asyncps_common.metrics_http import OFF, add_metrics_flags, metrics_tls, serve_metrics
from asyncps_common.optimizer import OPTIMIZERS, validate
from protos import compress, wire
from worker.environment import default_worker_id, resolve_rank
from worker.metrics import WorkerMetrics
from worker.optim_config import inner_config, optimizer_config
from worker.rpc import DATA_STREAMS, TRANSPORTS, CallOptions
from worker.task import TaskConfig
from worker.trainer import WorkerConfig, pick_device, train


def compression_flag(text: str) -> str:
    try:
        return compress.check(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


OUTER = ("sgd", "nesterov", "delayed-nesterov")  # outer optimizers of --local-steps
# (flag, type, default, help) shared by ps-worker and ps-cluster, passed through verbatim.
TRAINING_FLAGS: list[tuple[str, Callable[[str], Any], object, str]] = [
    ("staleness", staleness_flag, 0.0, "staleness bound s: a whole number, or inf for fully asynchronous"),
    ("optimizer", str, "adamw", f"server-side optimizer: {', '.join(OPTIMIZERS)}"),
    ("lr", positive(float), 6e-3, "learning rate"),
    ("momentum", non_negative(float), 0.0, "SGD momentum"),
    ("weight-decay", non_negative(float), 0.0, "weight decay (decoupled for adamw)"),
    ("beta1", non_negative(float), 0.9, "Adam beta1"),
    ("beta2", non_negative(float), 0.95, "Adam beta2"),
    ("warmup", non_negative(int), 100, "updates over which the lr ramps up linearly"),
    ("batch-size", positive(int), 16, "sequences per iteration per worker"),
    ("context", positive(int), 128, "bytes of context"),
    ("d-model", positive(int), 128, "model width"),
    ("n-layer", positive(int), 2, "transformer blocks"),
    ("n-head", positive(int), 4, "attention heads"),
    ("device", str, "auto", "auto (CUDA when present), cpu or cuda[:N]"),
    ("seed", non_negative(int), 0, "seed for the model's initial weights and the data order"),
    ("data", str, None, "text file or folder to train on (default: this Python's standard library)"),
    (
        "compression",
        compression_flag,
        "none",
        "tensors on the wire: none (float32), bf16 or fp16 (pulls and "
        "pushes), onebit (pushes: signs + scales, error feedback)",
    ),
    (
        "update-rule",
        str,
        "plain",
        (
            f"how the servers apply a stale push: {', '.join(RULES[:3])} (dc: delay "
            "compensation with the weights each gradient read; elastic, with --local-steps: "
            "move the weights toward the pushing worker's; docs/asynchrony.md)"
        ),
    ),
    ("dc-lambda", non_negative(float), DEFAULT_DC_LAMBDA, "update rule dc: the adaptive lambda"),
    (
        "dc-history",
        non_negative(int),
        0,
        (
            "update rules dc and elastic: versions of the weights each shard keeps "
            f"(0: s + 1, or {UNBOUNDED_HISTORY} with s = inf); at least s + 1"
        ),
    ),
    (
        "local-steps",
        non_negative(int),
        0,
        (
            "H > 0: each worker runs H steps of its own optimizer (the flags above) "
            "per push and pushes the change of its weights; the servers apply the "
            "outer optimizer (--outer-*); --steps counts batches"
        ),
    ),
    (
        "prefetch",
        positive(int),
        1,
        (
            "with --pipeline: pulls of the next N clocks in flight at once, so a "
            "link never idles between two pulls (needs --staleness of at least N)"
        ),
    ),
    (
        "lookahead",
        non_negative(float),
        0.0,
        (
            "with --local-steps and --no-average-gradients: start each worker's inner steps ahead of "
            "its pull by this times (P-1)/P of the change between its last two pulls, the drift the "
            "others' pushes add meanwhile (0: off; 0.5 with --update-rule elastic learned the most, "
            "docs/asynchrony.md)"
        ),
    ),
    ("outer-optimizer", str, None, f"with --local-steps: {', '.join(OUTER)} (default sgd)"),
    (
        "outer-lr",
        positive(float),
        None,
        (
            "with --local-steps: outer lr (default 1 with --average-gradients, else 0.6/--world: each "
            "push applied at 0.6/P: it learned more per sample than 1/P, see docs/asynchrony.md; "
            "1/--world with --update-rule elastic)"
        ),
    ),
    (
        "outer-momentum",
        non_negative(float),
        None,
        ("with --local-steps: outer momentum (default 0.9 for nesterov and delayed-nesterov)"),
    ),
    (
        "outer-period",
        positive(int),
        None,
        ("with --outer-optimizer delayed-nesterov: pushes per momentum step (default --world)"),
    ),
]
SWITCHES: list[tuple[str, bool, str]] = [
    ("nesterov", False, "Nesterov momentum (SGD)"),
    ("staleness-aware-lr", False, "divide the lr by each update's staleness"),
    ("average-gradients", True, "one update per clock from the mean of all live workers' gradients (synchronous)"),
    (
        "balance-batches",
        False,
        "with --average-gradients: the shards give each worker a batch in proportion to "
        "its speed, the workers' combined batch unchanged (LB-BSP; machines of unequal speed)",
    ),
    (
        "decay-all",
        True,
        "with --weight-decay, decay every parameter; --no-decay-all leaves biases, LayerNorm "
        "weights and embeddings undecayed, as transformer recipes do (measured 0.009 nats/byte "
        "worse on a short run of this task: docs/byom.md)",
    ),
    (
        "dynamic-local-steps",
        False,
        (
            "with --local-steps: the servers split the workers' combined H in proportion "
            "to their measured speed, so a slow worker pushes on time"
        ),
    ),
    (
        "outer-lr-follows-split",
        True,
        (
            "with --dynamic-local-steps and no averaging: every push's outer lr times the spread "
            "of the workers' split (largest H / mean H: 1 when they are equal, 1.5 for a 3x "
            "straggler's 6 + 2), so pushes enter larger while a worker is slow; "
            "--no-outer-lr-follows-split: the outer lr alone"
        ),
    ),
    ("pipeline", False, "request the next pull before computing (needs s >= 1)"),
    (
        "qk-norm",
        False,
        "built-in model: LayerNorm on each head's queries and keys, which keeps stale "
        "updates from blowing up the attention logits (s > 0 without averaging)",
    ),
    (
        "flush-denormal",
        True,
        "on the CPU, flush denormal floats to zero (a stale model's saturated "
        "softmax makes them; each costs ~100 cycles)",
    ),
]


def add_training_flags(p: FlagParser) -> None:
    for name, kind, default, text in TRAINING_FLAGS:
        p.env_flag(name, type=kind, default=default, help=text)
    for name, default, text in SWITCHES:
        p.env_switch(name, default=default, help=text)


def training_argv(args: argparse.Namespace) -> list[str]:
    """The training flags of `args` as a command line (ps-cluster hands them to ps-worker)."""
    argv: list[str] = []
    for name, _kind, _default, _text in TRAINING_FLAGS:
        value = getattr(args, name.replace("-", "_"))
        if value is not None:
            argv += [f"--{name}", str(value)]
    for name, _default, _text in SWITCHES:
        argv.append(f"--{name}" if getattr(args, name.replace("-", "_")) else f"--no-{name}")
    return argv


def check_training_args(p: FlagParser, args: argparse.Namespace) -> None:
    """Turn inconsistent training flags into one-line errors (exit 2)."""
    outer = [
        f"--{n}"
        for n in ("outer-optimizer", "outer-lr", "outer-momentum", "outer-period")
        if getattr(args, n.replace("-", "_")) is not None
    ]
    if outer and not args.local_steps:
        p.error(f"{outer[0]} sets an outer optimizer, which needs --local-steps H")
    if args.dynamic_local_steps and not args.local_steps:
        p.error("--dynamic-local-steps needs --local-steps H")
    if args.outer_optimizer is not None and args.outer_optimizer not in OUTER:
        p.error(f"--outer-optimizer {args.outer_optimizer!r}: choose one of {', '.join(OUTER)}")
    if args.update_rule not in RULES[:3]:
        p.error(
            f"--update-rule {args.update_rule!r}: choose one of {', '.join(RULES[:3])}"
            " (delayed-nesterov is an --outer-optimizer)"
        )
    if args.local_steps and args.update_rule == "dc":
        p.error("--update-rule dc needs plain gradients: it cannot be used with --local-steps")
    if args.update_rule == "elastic" and args.outer_optimizer == "delayed-nesterov":
        p.error("--update-rule elastic is an outer rule of its own: it cannot go with delayed-nesterov")
    if args.dc_history and args.update_rule not in HISTORY_RULES:
        p.error(f"--dc-history is for --update-rule {' or '.join(HISTORY_RULES)} (the rules that keep old versions)")
    if not args.local_steps and args.update_rule == "elastic":
        p.error("--update-rule elastic averages the workers' weights: it needs --local-steps H")
    if args.lookahead and (not args.local_steps or args.average_gradients):
        p.error(
            "--lookahead moves a worker ahead of the others' pushes: it needs --local-steps H "
            "and --no-average-gradients (with averaging nothing lands between a pull and its push)"
        )
    if args.outer_period is not None and args.outer_optimizer != "delayed-nesterov":
        p.error("--outer-period is for --outer-optimizer delayed-nesterov")
    try:
        validate(optimizer_config(args), staleness=args.staleness)
        if args.local_steps:
            validate(inner_config(args))
        task_config(args)
        pick_device(args.device)
    except ValueError as exc:
        p.error(str(exc))
    if args.pipeline and args.staleness < 1:
        p.error("--pipeline needs --staleness of at least 1")
    if args.prefetch > 1 and not args.pipeline:
        p.error("--prefetch is for --pipeline")
    if args.pipeline and args.prefetch > args.staleness:
        p.error(f"--prefetch {args.prefetch} needs --staleness of at least {args.prefetch}")
    if args.data is not None and not os.path.exists(args.data):
        p.error(f"--data {args.data}: no such file or folder")


def task_config(args: argparse.Namespace) -> TaskConfig:
    return TaskConfig(
        context=args.context, d_model=args.d_model, n_layer=args.n_layer, n_head=args.n_head, qk_norm=args.qk_norm
    )


def add_transport_flag(p: FlagParser) -> None:
    p.env_flag(
        "transport",
        default="auto",
        choices=list(TRANSPORTS),
        help="pulls and pushes: auto (the servers' TCP data plane when reachable, else gRPC), tcp, grpc",
    )
    p.env_flag(
        "data-streams",
        type=int_range(1, wire.MAX_STRIPES),
        default=DATA_STREAMS,
        help="data-plane connections a pull or push of the model uses at once: each of S shards "
        f"is striped over ceil(N/S) (parts of at least {wire.STRIPE_MIN_BYTES >> 20} MiB; 1: no striping)",
    )


def build_parser() -> FlagParser:
    p = FlagParser(prog="ps-worker", description="Run one asyncps worker of the built-in byte-level LM task.")
    p.env_flag(
        "servers",
        required=False,
        help="comma-separated server addresses host:port, in shard order "
        "(a replicated shard: its replicas joined by |, head first)",
    )
    p.env_flag("steps", type=positive(int), default=1000, help="iterations this worker runs")
    p.env_flag(
        "rank",
        type=non_negative(int),
        default=None,
        help="this worker's index (selects its data slice); default: $JOB_COMPLETION_INDEX (a Kubernetes "
        "Indexed Job's), or 0 when --world is 1",
    )
    p.env_flag("world", type=positive(int), default=1, help="number of workers (data slices)")
    p.env_flag("worker-id", help="name for this worker (default: host-pid)")
    p.env_flag("threads", type=non_negative(int), default=0, help="torch threads (0: torch's default)")
    p.env_flag("slowdown", type=positive(float), default=1.0, help="straggler factor: sleep (F-1) x compute per step")
    p.env_flag(
        "jitter",
        type=parse_jitter,
        default=(0.0, 0.0),
        help="transient stragglers P,F: at each step, with probability P (seeded by --seed and --rank), "
        "sleep F x that step's compute time (e.g. 0.1,4; default off)",
    )
    p.env_flag("report", help="append JSON-lines progress to this file")
    p.env_flag(
        "report-every", type=non_negative(float), default=0.5, help="seconds between progress lines (0: every step)"
    )
    p.env_flag(
        "snapshot-dir", help="save the weights just pulled here as safetensors files, every --snapshot-every seconds"
    )
    p.env_flag(
        "snapshot-every",
        type=non_negative(float),
        default=1.0,
        help="seconds between weight snapshots (with --snapshot-dir)",
    )
    p.env_flag(
        "first-step",
        type=non_negative(int),
        default=0,
        help="steps an earlier life of this worker already did (a restart runs --steps minus these)",
    )
    p.env_flag("retry-seconds", type=non_negative(float), default=60.0, help="how long to retry an unavailable server")
    add_transport_flag(p)
    add_metrics_flags(p, "127.0.0.1", "address for /metrics (0.0.0.0: every interface)")
    p.env_flag(
        "metrics-linger",
        type=non_negative(float),
        default=0.0,
        help="after the last step, keep /metrics up until a scrape has read asyncps_worker_finished 1, "
        "at most this many seconds (so the AsyncpsWorkerDown alert knows it finished; 0: exit at once)",
    )
    security.add_security_flags(p, "client")
    p.env_flag("log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="logging level")
    add_training_flags(p)
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if not args.servers:
        p.error("--servers is required (comma-separated host:port list)")
    try:
        args.rank, rank_from_index = resolve_rank(args.rank, args.world)
    except ValueError as exc:
        p.error(str(exc))
    check_training_args(p, args)
    if args.first_step >= args.steps:
        p.error(f"--first-step {args.first_step} leaves nothing of --steps {args.steps} to do")
    sec = security.from_args(p, args, "client")
    logging.basicConfig(level=args.log_level, format=f"%(asctime)s ps-worker[{args.rank}] %(levelname)s %(message)s")
    servers = [a.strip() for a in args.servers.split(",") if a.strip()]
    for i, shard in enumerate(servers):  # a replicated shard: its replicas joined by "|"
        replicas = [r.strip() for r in shard.split("|")]
        if not all(replicas) or len(set(replicas)) != len(replicas):
            p.error(f"--servers: shard {i}'s replicas {shard!r} must be distinct host:port entries joined by |")
    worker_id = args.worker_id or default_worker_id(args.rank, rank_from_index)
    metrics = WorkerMetrics(worker_id, len(servers))
    metrics_ssl = metrics_tls(p, args)  # checked even with the endpoint off: a wrong file is a mistake
    if args.metrics_port != OFF:
        try:
            serve_metrics(metrics.registry, args.metrics_host, args.metrics_port, args.metrics_port_file, metrics_ssl)
        except OSError as exc:
            p.error(f"cannot serve metrics on {args.metrics_host}:{args.metrics_port}: {exc.strerror or exc}")
    cfg = WorkerConfig(
        servers=servers,
        optimizer=optimizer_config(args),
        local_steps=args.local_steps,
        inner=inner_config(args) if args.local_steps else None,
        lookahead=args.lookahead,
        task=task_config(args),
        data=args.data,
        rank=args.rank,
        world=args.world,
        worker_id=worker_id,
        staleness=args.staleness,
        pipeline=args.pipeline,
        prefetch=args.prefetch,
        flush_denormal=args.flush_denormal,
        batch_size=args.batch_size,
        steps=args.steps,
        decay_all=args.decay_all,
        device=args.device,
        seed=args.seed,
        threads=args.threads,
        slowdown=args.slowdown,
        jitter=args.jitter,
        report=args.report,
        report_every=args.report_every,
        first_step=args.first_step,
        snapshot_dir=args.snapshot_dir,
        snapshot_every=args.snapshot_every,
        compression=args.compression,
        options=CallOptions(retry_seconds=args.retry_seconds, transport=args.transport, data_streams=args.data_streams),
        metrics=metrics,
        security=sec,
    )
    try:
        result = train(cfg)
    except (ValueError, FileNotFoundError) as exc:
        sys.stderr.write(f"ps-worker: error: {exc}\n")
        return 2
    log = logging.getLogger(__name__)
    log.info(
        "done: %d steps, T_task %.4fs, T_comm %.4fs, loss %.3f",
        result["steps"],
        result["t_task_seconds"],
        result["t_comm_seconds"],
        result["final_loss"] or float("nan"),
    )
    metrics.finish()
    if args.metrics_port != OFF and args.metrics_linger > 0:
        if metrics.wait_scraped(args.metrics_linger):
            log.info("final metrics scraped (asyncps_worker_finished 1 received); exiting")
        else:
            log.warning(
                "no scrape of /metrics within --metrics-linger %gs after the last step; exiting anyway",
                args.metrics_linger,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
