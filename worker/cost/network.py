"""The cost model on real links: communication time from bytes, P, S, link rate and compression.

Pure arithmetic (plus `measure_link`, which builds a two-host shaped network to measure
one). Every host has one full-duplex link of rate B (goodput: B × the measured TCP
efficiency) and one-way latency L to the switch; a model of n parameters:

* asyncps, per clock (one pull and one push per worker): a worker's link carries its push
  out (`push_bytes`) and its pull in (`pull_bytes`); each of S servers, holding 1/S of the
  model, takes P pushes in and sends P pulls out, P/S of each direction's bytes. A direction
  lasts as long as its busiest link: max(bytes/B, P·bytes/(S·B)). Without --pipeline the
  push and the pull follow each other (T_comm = push + pull + 2 round trips); with it the
  next pull is under way while the push goes out, on the other direction of the same links
  (T_comm = max(push, pull) + a round trip): the BytePS bound, M bytes each way per step.
* DDP ring all-reduce (gloo): every link moves 2(P−1)/P · M in each direction, in 2(P−1)
  steps of a round trip each: T_comm = 2(P−1)/P · M/B + 2(P−1) · 2L.
* Compression changes the bytes: bf16/fp16 halve both directions; onebit pushes
  `protos.compress.push_bytes` (≈ n/8 + 4n/1024), pulls stay fp32. DDP with bf16 halves M.

A clock (`clock_seconds`): compute + T_comm for DDP (its one bucket is reduced after the
backward pass) and unpipelined asyncps; pipelined asyncps with bound s overlaps the wire with
compute, max(C, U, D, (C + U + A + D)/(s + 1)) with U, D the push and pull (reached in practice
with `--prefetch s`: one pull in flight leaves the links idle between pulls). Samples/s = P × batch
/ clock. Immutable and thread-safe.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from dataclasses import dataclass, replace
from pathlib import Path

from protos import compress

log = logging.getLogger(__name__)
FORMAT = "asyncps-network-calibration-1"


@dataclass(frozen=True)
class Link:
    gbit: float  # the link's rate
    latency_s: float = 0.0  # one way, host to switch
    efficiency: float = 0.95  # TCP payload / link rate (measured: raw TCP over the shaped link)
    # the same with both directions of every link busy with several flows, as a pipelined
    # clock's pushes and pulls keep them (measured: an all-to-all both ways); None: `efficiency`
    exchange_efficiency: float | None = None

    @property
    def bytes_per_second(self) -> float:
        return self.gbit * 1e9 / 8 * self.efficiency

    @property
    def exchange_bytes_per_second(self) -> float:
        return self.gbit * 1e9 / 8 * (self.exchange_efficiency or self.efficiency)


def wire_bytes(params: int, compression: str) -> tuple[int, int]:
    """(push, pull) bytes of one worker for one clock."""
    name = compress.check(compression)
    return compress.push_bytes(name, params), params * compress.pull_dtype(name).itemsize


def asyncps_parts(
    params: int, workers: int, servers: int, link: Link, compression: str = "none", pipeline: bool = True
) -> tuple[float, float]:
    """(push, pull) seconds of one asyncps clock on the busiest link of each direction, a round
    trip each. Pipelined, pushes and pulls share the links' two directions at once (the
    exchange efficiency); without, they take turns (the single-flow one)."""
    push, pull = wire_bytes(params, compression)
    fan_in = max(1.0, workers / servers)  # the busiest link: a worker's own, or a server's share of P
    b = link.exchange_bytes_per_second if pipeline else link.bytes_per_second
    rtt = 4 * link.latency_s  # host -> switch -> host and back
    return fan_in * push / b + rtt, fan_in * pull / b + rtt


def asyncps_comm(
    params: int, workers: int, servers: int, link: Link, compression: str = "none", pipeline: bool = True
) -> float:
    """Seconds of communication of one asyncps clock (see the module docstring)."""
    up, down = asyncps_parts(params, workers, servers, link, compression, pipeline)
    return max(up, down) if pipeline else up + down


def ddp_comm(params: int, workers: int, link: Link, compression: str = "none") -> float:
    """Seconds of one ring all-reduce of the gradients (fp32, or bf16 with the compress hook)."""
    if workers == 1:
        return 0.0
    nbytes = params * (2 if compression == "bf16" else 4)
    return 2 * (workers - 1) / workers * nbytes / link.bytes_per_second + 2 * (workers - 1) * 4 * link.latency_s


def clock_seconds(
    system: str,
    compute: float,
    comm: float,
    pipeline: bool = True,
    parts: tuple[float, float] | None = None,
    apply: float = 0.0,
    staleness: float = 1.0,
) -> float:
    """One iteration of every worker. DDP: compute, then the all-reduce (a model under DDP's
    25 MB bucket is one bucket, reduced after the backward pass: nothing overlaps). asyncps
    without --pipeline: compute + push + pull. Pipelined with bound s, push U and pull D: the
    pull of clock c+1 is asked for when clock c's arrives and is answered once clock c-s's
    pushes are in, so one chain push -> apply -> pull -> compute spans s + 1 clocks, one pull
    and one push are on the wire at a time: T = max(C, U, D, (C + U + A + D) / (s + 1)),
    A the servers' work between the last push of a clock and the first pull it frees
    (s = 1: T = D + max(0, C + U + A - T); s = inf: max(C, U, D))."""
    if system == "ddp-gloo":
        return compute + comm
    if not pipeline:
        return compute + comm + apply
    up, down = parts if parts is not None else (comm, comm)
    chain = 0.0 if math.isinf(staleness) else (compute + up + apply + down) / (max(1.0, staleness) + 1)
    return max(compute, up, down, chain)


class NetworkModel:
    """Predictions from a network calibration (`ps-cost calibrate --network`)."""

    def __init__(self, cal: dict):
        if cal.get("format") != FORMAT:
            raise ValueError(f"not a network calibration (format {FORMAT})")
        self.cal = cal
        self.link = Link(
            cal["link"]["gbit"],
            cal["link"]["latency_ms"] / 1e3,
            cal["link"]["efficiency"],
            cal["link"].get("exchange_efficiency"),
        )
        self.compute = {r["model"]: r for r in cal.get("compute", [])}

    def with_rate(self, gbit: float) -> NetworkModel:
        """The same calibration on links of another rate (efficiency and latency kept)."""
        cal = json.loads(json.dumps(self.cal))
        cal["link"]["gbit"] = gbit
        return NetworkModel(cal)

    def comm(
        self,
        system: str,
        params: int,
        workers: int,
        servers: int,
        compression: str,
        pipeline: bool = True,
        link: Link | None = None,
    ) -> float:
        """Seconds of communication per clock on `link` (default: the calibrated link)."""
        link = link or self.link
        if system == "ddp-gloo":
            return ddp_comm(params, workers, link, compression)
        return asyncps_comm(params, workers, servers, link, compression, pipeline)

    def link_for(self, compute: dict | None, servers: int) -> Link:
        """The link as a calibrated model's flows meet it with this many servers: its exchange
        efficiency measured for that server count (or the nearest measured), else the link's."""
        measured = {int(k): v for k, v in (compute or {}).get("exchange_efficiency", {}).items()}
        if not measured:
            return self.link
        nearest = min(measured, key=lambda s: (abs(s - servers), s))
        return replace(self.link, exchange_efficiency=measured[nearest])

    def samples_per_second(
        self,
        system: str,
        model: str,
        workers: int,
        servers: int,
        compression: str,
        pipeline: bool = True,
        staleness: float = 1.0,
    ) -> tuple[float, float]:
        """(samples/s, T_comm per clock) of a run of the calibrated `model` on these links."""
        c = self.compute[model]
        link = self.link_for(c, servers)
        comm = self.comm(system, c["params"], workers, servers, compression, pipeline, link)
        parts = (
            asyncps_parts(c["params"], workers, servers, link, compression, pipeline) if system == "asyncps" else None
        )
        apply = self.apply_seconds(c["params"], workers, servers) if system == "asyncps" else 0.0
        return workers * c["batch_size"] / clock_seconds(
            system, c["compute_seconds"], comm, pipeline, parts, apply, staleness
        ), comm

    def apply_seconds(self, params: int, workers: int, servers: int) -> float:
        """A server's work per clock on its 1/S of the model: taking in P gradients, averaging,
        the AdamW step, answering P pulls (`server_seconds_per_param` per parameter and worker)."""
        return self.cal.get("server_seconds_per_param", 0.0) * params / servers * workers


def _shaped():
    """bench/shaped.py, the multi-host harness (it lives with the benchmarks, beside this package)."""
    import sys

    bench = Path(__file__).resolve().parents[2] / "bench"
    if str(bench) not in sys.path:
        sys.path.insert(0, str(bench))
    import shaped

    return shaped


def measure_link(gbit: float, delay_ms: float, workers: int = 0) -> dict:
    """Raw TCP goodput and round trip over a two-host shaped network of this rate (needs root);
    with `workers` P > 0 also the exchange efficiency: the goodput per link and direction of an
    all-to-all both ways between P and P hosts, each flow about 2 s at the rate."""
    shaped = _shaped()
    with shaped.ShapedNet(["a", "b"], rate_mbit=gbit * 1000, delay_ms=delay_ms) as net:
        goodput = statistics.median(shaped.tcp_rate_mbit(net, "a", "b", seconds=1.5) for _ in range(3))
        rtt = shaped.tcp_rtt_ms(net, "a", "b")
        link = {
            "gbit": gbit,
            "efficiency": round(goodput / (gbit * 1000), 4),
            "latency_ms": round(rtt / 4, 4),
            "rtt_ms": round(rtt, 4),
            "delay_applied": net.delay_applied,
            "measured": True,
        }
    if workers > 0:
        flow = int(gbit * 1e9 / 8 * 2 / workers)  # each flow 2 s at the rate
        link["exchange_efficiency"] = measure_exchange(gbit, delay_ms, workers, [(workers, flow)])[0]
        link["exchange_hosts"] = f"{workers} x {workers}, both ways, flows of 2 s"
    return link


def measure_exchange(gbit: float, delay_ms: float, workers: int, cases: list[tuple[int, int]]) -> list[float]:
    """The exchange efficiency of each (servers S, bytes per flow) case: an all-to-all both ways
    between P worker hosts and S server hosts, the busiest link's goodput per direction over
    the rate (median of three; needs root). Short flows lose more to TCP's start and to the
    slowest flow's tail than long ones, and the pattern matters: S = P is a P x P all-to-all,
    S = 1 funnels every flow through one link."""
    shaped = _shaped()
    left = [f"w{i}" for i in range(workers)]
    right = [f"s{i}" for i in range(max(s for s, _ in cases))]
    out = []
    with shaped.ShapedNet(left + right, rate_mbit=gbit * 1000, delay_ms=delay_ms) as net:
        for servers, nbytes in cases:
            rates = [shaped.exchange_rate_mbit(net, left, right[:servers], nbytes) for _ in range(3)]
            out.append(round(statistics.median(rates) / (gbit * 1000), 4))
    return out


def scaleout_staleness(result: dict, model: str) -> float | None:
    """The staleness bound of `model`'s scale-out series in bench/network.py's rows: the bound
    whose uncompressed asyncps rows cover the most server counts (the larger on a tie)."""
    cover: dict[float, set] = {}
    for r in result["rows"]:
        if r["model"] == model and r["system"] == "asyncps" and r["compression"] == "none":
            cover.setdefault(row_staleness(r, result) or 1.0, set()).add(r["servers"])
    return max(cover, key=lambda s: (len(cover[s]), s)) if cover else None


def predicted_scaleout(cal: dict, result: dict) -> dict:
    """{model: {S: samples/s}} for bench/network.py's asyncps rows (no compression, each model's
    scale-out bound), at its link rate."""
    nm = NetworkModel(cal).with_rate(result["link_gbit"])
    servers = sorted({r["servers"] for r in result["rows"] if r["system"] == "asyncps" and r["servers"]})
    out = {}
    for model in sorted({r["model"] for r in result["rows"]}):
        staleness = scaleout_staleness(result, model)
        if model in nm.compute and staleness is not None:
            out[model] = {
                s: round(
                    nm.samples_per_second(
                        "asyncps", model, result["workers"], s, "none", result["asyncps"]["pipeline"], staleness
                    )[0],
                    2,
                )
                for s in servers
            }
    return out


def compare(cal: dict, result: dict) -> dict:
    """Predicted against measured samples/s for every group of bench/network.py's rows (median of runs)."""
    nm = NetworkModel(cal).with_rate(result["link_gbit"])
    groups: dict[tuple, list[float]] = {}
    for r in result["rows"]:
        if "samples_per_second" in r and r["model"] in nm.compute:
            key = (r["model"], r["system"], r["servers"] or 0, r["compression"], row_staleness(r, result))
            groups.setdefault(key, []).append(r["samples_per_second"])
    rows = []
    for (model, system, servers, comp, staleness), values in groups.items():
        measured = statistics.median(values)
        pred, comm = nm.samples_per_second(
            system, model, result["workers"], servers, comp, result["asyncps"]["pipeline"], staleness or 1.0
        )
        rows.append(
            {
                "model": model,
                "system": system,
                "servers": servers or None,
                "compression": comp,
                "staleness": staleness,
                "measured_samples_per_second": round(measured, 3),
                "predicted_samples_per_second": round(pred, 3),
                "predicted_comm_seconds": round(comm, 4),
                "error": round(pred / measured - 1, 4),
                "runs": len(values),
            }
        )
    errs = [abs(r["error"]) for r in rows]
    summary = {"median_abs": round(statistics.median(errs), 4), "max_abs": round(max(errs), 4)} if errs else {}
    return {"rows": rows, "errors": summary, "link_gbit": result["link_gbit"]}


def row_staleness(row: dict, result: dict) -> float | None:
    """An asyncps row's staleness bound (rows from before it was recorded per row: the grid's);
    None for DDP."""
    if row["system"] == "ddp-gloo":
        return None
    return row.get("staleness", result["asyncps"].get("staleness", 1.0))


def compute_from_runs(models: list, result: dict) -> list[dict]:
    """Each model's compute per iteration as bench/network.py's DDP ranks measured it on the
    harness (forward + backward alone, the P processes at once, median over runs)."""
    out = []
    for m in models:
        name = _bench_name(m.name)
        vals = [r["compute_seconds"] for r in result["rows"] if r["model"] == name and "compute_seconds" in r]
        if vals:
            out.append(
                {
                    "model": name,
                    "params": m.params,
                    "batch_size": m.batch_size,
                    "tokens": m.tokens,
                    "workers": result["workers"],
                    "compute_seconds": statistics.median(vals),
                    "source": f"{len(vals)} DDP runs of bench/network.py",
                }
            )
    if not out:
        raise ValueError("no DDP rows with compute_seconds for these models")
    return out


def calibrate_network(
    models: list,
    workers: int,
    gbit: float,
    delay_ms: float,
    latency_ms: float | None = None,
    efficiency: float = 0.95,
    iters: int = 8,
    compute_from: dict | None = None,
) -> dict:
    """A network calibration: the link (measured on the shaped harness, or `latency_ms` and
    `efficiency` taken as given) and each model's compute per iteration with `workers`
    processes computing at once (bench/network.py's threads: one each on a small machine):
    probed here, or taken from bench/network.py's DDP runs (`compute_from`, its result).
    With a measured link, also each model's exchange efficiency for S = 1, 2, 4, ..., P servers
    (`measure_exchange` with its own flows: 1/S of the model per worker and server)."""
    import os

    from worker.cost.calibrate import ProbePool, Settings, machine, probe_compute

    if latency_ms is None:
        link = measure_link(gbit, delay_ms, workers)
    else:
        link = {"gbit": gbit, "efficiency": efficiency, "latency_ms": latency_ms, "measured": False}
    log.info("link: %s", link)
    if compute_from is not None:
        compute = compute_from_runs(models, compute_from)
    else:
        pool = ProbePool(workers, [workers])
        try:
            rows = probe_compute(
                pool, Settings(models=models, workers=[workers], rounds=1, iters=iters), os.cpu_count() or 1
            )
        finally:
            pool.close()
        compute = [
            {
                "model": _bench_name(m.name),
                "params": m.params,
                "batch_size": m.batch_size,
                "tokens": m.tokens,
                "workers": workers,
                "compute_seconds": r["lockstep_seconds"],
                "source": "probe",
            }
            for m, r in zip(models, rows)
        ]
    if link.get("measured"):  # each model's own flows, 1/S of it between each worker and each of S servers
        counts = sorted({*(1 << k for k in range(workers.bit_length()) if 1 << k <= workers), workers})
        cases = [(s, 4 * c["params"] // s) for c in compute for s in counts]
        effs = iter(measure_exchange(gbit, delay_ms, workers, cases))
        for c in compute:
            c["exchange_efficiency"] = {str(s): next(effs) for s in counts}  # JSON keys: server counts
    return {
        "format": FORMAT,
        "machine": machine(),
        "link": link,
        "compute": compute,
        "server_seconds_per_param": server_probe(workers),
    }


def server_probe(workers: int, params: int = 1 << 20, rounds: int = 3) -> float:
    """Seconds per parameter and worker of a shard's work in one clock, timed here (median of
    `rounds`): for each of P workers a gradient received (copied in, checked finite) and a pull
    sent (copied out), their mean, one fused AdamW step, as ps_server does on one thread."""
    import time

    import torch

    from protos import wire

    torch.set_num_threads(1)
    w = torch.nn.Parameter(torch.randn(params))
    opt = torch.optim.AdamW([w], lr=1e-3, fused=True)
    grads = [torch.randn(params) for _ in range(workers)]
    buf, out = torch.empty(params), torch.empty(params)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        acc = torch.zeros(params)
        for g in grads:
            buf.copy_(g)
            wire.all_finite(buf)
            acc.add_(buf)
        w.grad = acc.div_(workers)
        opt.step()
        for _ in grads:
            out.copy_(w.detach())
        times.append(time.perf_counter() - t0)
    return statistics.median(times) / params / workers


def _bench_name(name: str) -> str:
    """bench/network.py calls ps-cost's `small` preset `builtin` (ps-worker's default model)."""
    return "builtin" if name == "small" else name


def table(cmp: dict) -> str:
    lines = [
        f"{'model':<8} {'system':<9} {'S':>2} {'compr.':<7} {'measured':>9} {'predicted':>10} {'error':>6}  samples/s"
    ]
    for r in cmp["rows"]:
        lines.append(
            f"{r['model']:<8} {r['system']:<9} {r['servers'] or '-':>2} {r['compression']:<7} "
            f"{r['measured_samples_per_second']:>9.2f} {r['predicted_samples_per_second']:>10.2f} "
            f"{100 * r['error']:>+5.0f}%"
        )
    e = cmp["errors"]
    if e:
        lines.append(f"absolute error, median / worst: {100 * e['median_abs']:.0f}% / {100 * e['max_abs']:.0f}%")
    return "\n".join(lines) + "\n"
