"""Wire speed of asyncps against raw TCP and TensorPipe, all measured in one run.

    python bench/wire.py                      # 64 MB model, 5 repetitions, servers 1 2 4
    python bench/wire.py --json runs/wire.json --reps 7 --mb 64 --servers 1 2 4

Measures, each repeated `--reps` times after one warm-up:

* tcp:        raw TCP between two processes on 127.0.0.1, one direction, 4 MB
              `sendall` from / `recv_into` a preallocated buffer (the ceiling);
* tcp_streams: the same payload cut in `--tcp-streams` parts (default 2), each over its
              own connection and thread, all at once: what one stream leaves unused;
* push_floor: the least work a push must do, with no asyncps code: raw TCP over as many
              streams as the first `--data-streams` value, then each receiving thread
              checks its part for NaN/Inf (`protos.wire.all_finite`) and one SGD step
              (the servers' own optimizer, as below) is applied before the answer byte;
* pull, push: asyncps through real `ps-server` processes and the real worker client
              (`PSClient`'s all-shards-at-once pull and push of its flat fp32 buffers),
              one worker and 1, 2, 4 servers, over each transport (`--transports`):
              `tcp`, the servers' TCP data plane (the default), and `grpc`, the gRPC
              streams; the data plane once per `--data-streams` value (default: the
              product's 2, then 1: each shard's exchange striped over that many
              connections, parts of at least 4 MiB, and not striped, for comparison);
              a push is timed until every shard has answered, i.e. including the
              server's validation and optimizer step (plain SGD here; the other
              optimizers' apply rate is measured apart); every pull is of a new
              version (the one the push before it made), as in training;
* phases:     with `--phases`, where a one-server striped push spends its time, as the
              server logs it at DEBUG (open, receive, check, commit; medians in ms);
* apply:      the shard store's optimizer step (GB/s of gradient applied), in-process;
* grpc_raw:   the ceiling gRPC itself sets: grpc.aio streaming prebuilt 4 MB `bytes`
              messages between two processes, no asyncps code at all;
* tensorpipe: torch.distributed.rpc (TensorPipe backend), `bench/wire_tp.py`: the echo
              SPEC quotes (the tensor to another process and back, GB/s of the tensor ÷
              the round trip: `tensorpipe_gbps`), and one way each: `send` (the tensor
              there, its size back), `fetch` (a pull: the peer's tensor back) and `push`
              (the tensor there, checked for NaN/Inf and applied by one step of the
              servers' SGD: a parameter server on torch.distributed.rpc). Measured
              first, while this process is fresh (measured after the rest, its echo
              came out 1.14-1.18 GB/s in three runs, against 1.22-1.35 measured first).

Prints medians with min-max and the ratios of asyncps to raw TCP and TensorPipe (its echo,
as the issue's target reads; and per direction: pull to `fetch`, push to `push`);
`--json PATH` writes every sample. Loopback only, free ports only. The baselines with no
asyncps code (raw TCP, the push floor, raw gRPC) are in `bench/wire_raw.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/wire.py` from anywhere
    sys.path.insert(0, str(ROOT))

GB = 1e9


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def summary(samples: list[float]) -> dict:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "samples": samples}


# -- (c) optimizer apply rate, (b) asyncps: servers and model shared with the cost probes --

from wire_raw import bench_grpc_raw, bench_tcp  # noqa: E402  (bench/, the script's own folder)
from wire_tp import bench_tensorpipe  # noqa: E402  (bench/ too)
from worker.cost.servers import FlatModel as Model  # noqa: E402
from worker.cost.servers import apply_rates, start_servers, stop_servers  # noqa: E402
from worker.rpc import DATA_STREAMS  # noqa: E402

_TP_SAME_WAY = {"pull": "fetch", "push": "push"}  # TensorPipe's call doing what each does, one way


def bench_apply(nbytes: int, reps: int) -> dict[str, list[float]]:
    return apply_rates(nbytes, reps)


def bench_asyncps(
    nbytes: int,
    servers: int,
    reps: int,
    workdir: Path,
    chunk_bytes: int | None,
    transport: str = "tcp",
    streams: int = 1,
    server_args: list[str] | None = None,
) -> dict:
    from protos import wire
    from worker import CallOptions, PSClient

    procs, addrs = start_servers(servers, workdir, chunk_bytes, server_args)
    opts = CallOptions(
        transport=transport, data_streams=streams, **({"chunk_bytes": chunk_bytes} if chunk_bytes else {})
    )
    try:
        model = Model(nbytes)
        with PSClient(
            addrs, model, optimizer={"name": "sgd", "lr": 1e-3}, options=opts, worker_id=f"bench-{servers}"
        ) as ps:
            used = {s.transport for s in ps._shards}
            if used != {transport}:
                raise RuntimeError(f"asked for transport {transport}, the client uses {used}")
            parts = [wire.stripe_count(spec.numel, streams) if transport == "tcp" else 1 for spec in ps.plan.shards]
            pulls, pushes = [], []
            grad = ps._free_grads.pop()  # the client's own preallocated gradient buffer
            grad.normal_(0, 1e-3)
            for i in range(reps + 1):
                t0 = time.perf_counter()
                heads = ps._run(ps._pull_all(ps.clock, own_lag=0))
                t1 = time.perf_counter()
                versions = [h.version for h in heads]  # what this gradient was computed on
                ps._run(ps._push_all(ps.clock, grad, 0, 0.0, versions))  # hands `grad` back to _free_grads
                t2 = time.perf_counter()
                ps._free_grads.pop()
                ps.clock += 1
                if i:
                    pulls.append(nbytes / (t1 - t0) / GB)
                    pushes.append(nbytes / (t2 - t1) / GB)
            ps._free_grads.append(grad)
        return {
            "servers": servers,
            "transport": transport,
            "data_streams": streams if transport == "tcp" else 1,
            "parts_per_shard": parts,
            "pull_gbps": summary(pulls),
            "push_gbps": summary(pushes),
        }
    finally:
        stop_servers(procs)


def bench_push_phases(nbytes: int, reps: int, workdir: Path, streams: int) -> dict:
    """Where a one-server striped push spends its time, as the server itself logs it at
    DEBUG (ps_server/dataplane.py `_push_part`): per part, waiting for the exchange to be
    opened, receiving, the NaN/Inf check, and (the part that completes it) the commit:
    apply and clock advance on the event loop. Medians in ms over `reps` pushes."""
    bench_asyncps(nbytes, 1, reps, workdir, None, "tcp", streams, ["--log-level", "DEBUG"])
    rows = [
        dict(kv.split("=") for kv in line.split("phases push ", 1)[1].split())
        for line in (workdir / "s1-0.log").read_text().splitlines()
        if "phases push " in line
    ]
    if not rows:
        raise RuntimeError("the server logged no push phases (pushes not striped?)")
    out = {}
    for who, committed in (("committing_part", True), ("other_parts", False)):
        chosen = [r for r in rows if (r["committed"] == "1") == committed][-reps * (1 if committed else streams - 1) :]
        out[who] = (
            {
                k: statistics.median(float(r[k]) for r in chosen)
                for k in ("open_ms", "receive_ms", "check_ms", "commit_ms", "total_ms")
            }
            if chosen
            else {}
        )
    out["parts"] = int(rows[-1]["part"].split("/")[1])
    return out


# -- report -------------------------------------------------------------------------------


def fmt(s: dict) -> str:
    return f"{s['median']:6.2f}  ({s['min']:.2f}-{s['max']:.2f})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="bench/wire.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--mb", type=int, default=64, help="payload size in MB (2^20 bytes) (default 64)")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions of each measurement (default 5)")
    p.add_argument("--servers", type=int, nargs="+", default=[1, 2, 4], help="server counts (default 1 2 4)")
    p.add_argument(
        "--transports",
        nargs="+",
        default=["tcp", "grpc"],
        choices=["tcp", "grpc"],
        help="asyncps transports to measure (default: tcp grpc); the first gives pull_gbps/push_gbps",
    )
    p.add_argument(
        "--data-streams",
        type=int,
        nargs="+",
        default=None,
        help=f"data-plane connections per shard exchange, one row each (default: {DATA_STREAMS} 1); "
        "the first gives pull_gbps/push_gbps",
    )
    p.add_argument("--chunk-bytes", type=int, default=None, help="asyncps gRPC chunk size (default: the product's)")
    p.add_argument("--tp-transports", default="", help="TensorPipe transports, e.g. 'uv' (default: its own choice)")
    p.add_argument(
        "--tcp-streams", type=int, default=2, help="also raw TCP over this many connections at once (1: not measured)"
    )
    p.add_argument(
        "--phases",
        action="store_true",
        help="also time a one-server striped push's phases inside the server (its DEBUG log)",
    )
    p.add_argument("--skip", nargs="*", default=[], choices=["tcp", "grpc", "asyncps", "apply", "tensorpipe"])
    p.add_argument("--json", metavar="PATH", help="write the results here")
    args = p.parse_args(argv)
    if args.mb <= 0 or args.reps <= 0 or args.tcp_streams <= 0:
        p.error("--mb, --reps and --tcp-streams must be positive")
    streams = args.data_streams or list(dict.fromkeys([DATA_STREAMS, 1]))
    if not all(1 <= k <= 16 for k in streams):
        p.error("--data-streams must be 1 to 16")
    nbytes = args.mb << 20
    torch.manual_seed(0)
    res: dict = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
        },
        "payload_bytes": nbytes,
        "reps": args.reps,
    }
    import grpc

    res["machine"]["grpcio"] = grpc.__version__
    if "tensorpipe" not in args.skip:  # first, while this process is fresh: the baseline gets its best chance
        transports = args.tp_transports.split(",") if args.tp_transports else None
        tp = {k: summary(v) for k, v in bench_tensorpipe(nbytes, args.reps, free_port(), transports).items()}
        res["tensorpipe"] = tp.pop("echo")  # SPEC's figure: the tensor's bytes / the round trip
        res["tensorpipe_gbps"] = res["tensorpipe"]["median"]
        res["tensorpipe_both_ways_gbps"] = 2 * res["tensorpipe_gbps"]
        res["tensorpipe_one_way"] = tp  # send, fetch, push
        res["tensorpipe_transports"] = transports or "default"
    if "tcp" not in args.skip:
        res["tcp"] = summary(bench_tcp(nbytes, args.reps))
        res["tcp_gbps"] = res["tcp"]["median"]
        if args.tcp_streams > 1:
            res["tcp_streams"] = {
                "streams": args.tcp_streams,
                **summary(bench_tcp(nbytes, args.reps, args.tcp_streams)),
            }
        res["push_floor"] = {"streams": streams[0], **summary(bench_tcp(nbytes, args.reps, streams[0], apply=True))}
    if "grpc" not in args.skip:
        res["grpc_raw"] = {f"{k}_gbps": summary(v) for k, v in bench_grpc_raw(nbytes, args.reps, 4 << 20).items()}
    if "apply" not in args.skip:
        res["apply"] = {k: summary(v) for k, v in bench_apply(nbytes, args.reps).items()}
    if "asyncps" not in args.skip:
        with tempfile.TemporaryDirectory(prefix="asyncps-bench-") as tmp:
            res["rows"] = [
                bench_asyncps(nbytes, s, args.reps, Path(tmp), args.chunk_bytes, t, k)
                for t in args.transports
                for k in (streams if t == "tcp" else [1])
                for s in args.servers
            ]
            if args.phases:
                res["push_phases_ms"] = bench_push_phases(nbytes, args.reps, Path(tmp), max(streams))
        res["transport"] = args.transports[0]
        one = next((r for r in res["rows"] if r["servers"] == 1), res["rows"][0])
        res["pull_gbps"], res["push_gbps"] = one["pull_gbps"]["median"], one["push_gbps"]["median"]

    print(f"{args.mb} MB fp32 payload, {args.reps} repetitions, {os.cpu_count()} CPUs; GB/s, median (min-max)")
    if "tcp" in res:
        print(f"  raw TCP, 1 direction, 4 MB chunks   {fmt(res['tcp'])}")
    if "tcp_streams" in res:
        t = res["tcp_streams"]
        print(f"  raw TCP, {t['streams']} streams at once         {fmt(t)}   {t['median'] / res['tcp_gbps']:.2f}x TCP")
    if "push_floor" in res:
        t = res["push_floor"]
        print(f"  push floor: TCP x{t['streams']}, check, SGD step {fmt(t)}   {t['median'] / res['tcp_gbps']:.2f}x TCP")
    for kind, s in res.get("grpc_raw", {}).items():
        print(f"  raw gRPC {kind[:4]}, prebuilt 4 MB msgs  {fmt(s)}")
    if "tensorpipe" in res:
        print(
            f"  TensorPipe rpc echo (÷ round trip)  {fmt(res['tensorpipe'])}   (both ways: "
            f"{res['tensorpipe_both_ways_gbps']:.2f})"
        )
        for kind, s in res["tensorpipe_one_way"].items():
            print(f"  TensorPipe rpc one way, {kind:<11} {fmt(s)}")
    for name, s in res.get("apply", {}).items():
        print(f"  server apply, {name:<21} {fmt(s)}")
    for r in res.get("rows", []):
        for kind in ("pull", "push"):
            s = r[f"{kind}_gbps"]
            via = f"tcp x{r['data_streams']}" if r["transport"] == "tcp" else r["transport"]
            line = f"  asyncps {kind}, {via:<6}, {r['servers']} server(s) {fmt(s)}"
            if "tcp" in res:
                line += f"   {s['median'] / res['tcp_gbps']:.2f}x TCP"
            if "tensorpipe" in res:
                same_way = res["tensorpipe_one_way"][_TP_SAME_WAY[kind]]["median"]
                line += (
                    f"   {s['median'] / res['tensorpipe_gbps']:.2f}x TensorPipe echo"
                    f"   {s['median'] / same_way:.2f}x its {_TP_SAME_WAY[kind]}"
                )
            print(line)
    if "push_phases_ms" in res:
        ph = res["push_phases_ms"]
        for who in ("committing_part", "other_parts"):
            if ph[who]:
                print(
                    f"  push phases in the server, {who.replace('_', ' ')} (of {ph['parts']}), ms: "
                    + ", ".join(f"{k[:-3]} {v:.1f}" for k, v in ph[who].items())
                )
    if "rows" in res and "tcp" in res:
        res["ratios"] = {f"{k}_vs_tcp": res[f"{k}_gbps"] / res["tcp_gbps"] for k in ("pull", "push")}
        if "tensorpipe" in res:
            for k in ("pull", "push"):
                res["ratios"][f"{k}_vs_tensorpipe"] = res[f"{k}_gbps"] / res["tensorpipe_gbps"]
                res["ratios"][f"{k}_vs_tensorpipe_{_TP_SAME_WAY[k]}"] = (
                    res[f"{k}_gbps"] / res["tensorpipe_one_way"][_TP_SAME_WAY[k]]["median"]
                )
        if "push_floor" in res:
            res["ratios"]["push_vs_floor"] = res["push_gbps"] / res["push_floor"]["median"]
            if "tensorpipe" in res:
                res["ratios"]["floor_vs_tensorpipe"] = res["push_floor"]["median"] / res["tensorpipe_gbps"]
                res["ratios"]["floor_vs_tensorpipe_push"] = (
                    res["push_floor"]["median"] / res["tensorpipe_one_way"]["push"]["median"]
                )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
