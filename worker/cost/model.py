"""The cost model: predicted wall time of a `ps-cluster` run, from the seed formula and the refined model.

Pure arithmetic on a calibration (see `worker/cost/calibrate.py` for how it is measured);
nothing here blocks or touches a process, and every object is immutable once built, so
it is safe to share between threads.

Seed formula (the documents this project comes from): T = M/P · T_task + T_comm, with
T_task and T_comm the per-iteration compute and communication times measured with one
worker and one server, and T_comm counted once per worker iteration (M/P · t_comm).

Refined model, what the measurements show matters:

* run time = start-up (launcher, S servers, P workers, export and held-out loss, stop;
  measured by one-step ps-cluster probes, linear in P + S) + ceil(M/P) clocks;
* compute of one clock: P worker processes, each with ps-cluster's cores/P torch threads,
  measured together (so cores shared by P > cores processes, and a GPU shared by workers
  on one host, are in the number); with gradient averaging or s = 0 the clock waits for
  the slowest worker (the lockstep maximum), with s > 0 and no averaging the straggler
  term shrinks as 1/(s+1);
* communication of one clock: P workers pulling and pushing through S servers with one
  averaged update per clock, measured as a whole, so the server bandwidth and cores that
  P workers share are in it; linear in bytes between probed sizes, linear in P beyond;
  without averaging each shard applies P updates instead of one (apply rate);
* `--pipeline`: the next pull overlaps compute only on cores the computation leaves
  idle (none on a CPU machine whose workers use every core; all with a GPU);
* `--local-steps H`: a clock is one push of every worker, H iterations each; so
  ceil(ceil(M/P)/H) clocks (ps-cluster's --steps counts batches, not pushes), each of H
  iterations' compute plus H steps of the worker's own AdamW (measured by the compute
  probes, P processes at once), and one exchange. Where every clock waits for the slowest
  worker, H times the per-iteration lockstep: an upper bound, as a worker that is slow in one
  iteration may catch up in the next before the exchange.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Job:
    """What is predicted: a model of `params` parameters, `tokens` = batch × context per iteration."""

    params: int
    tokens: int
    steps: int
    staleness: float = 0.0
    average_gradients: bool = True
    pipeline: bool = False
    local_steps: int = 0  # > 0: H iterations of the worker's own optimizer per push (one exchange per H)

    @property
    def every(self) -> int:
        """Iterations per exchange: H with local steps, else 1."""
        return max(1, self.local_steps)

    @property
    def bytes(self) -> int:
        return 4 * self.params

    @property
    def work(self) -> float:
        return float(self.params) * self.tokens


@dataclass(frozen=True)
class Prediction:
    workers: int
    servers: int
    steps: int
    seed_formula_seconds: float
    refined_seconds: float
    startup_seconds: float
    clock_seconds: float
    compute_seconds: float
    comm_seconds: float
    clocks: int

    def row(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def seed_formula(steps: int, workers: int, t_task: float, t_comm: float, every: int = 1) -> float:
    """T = M/P · T_task + T_comm, T_comm = M/(P·every) · t_comm: one worker's compute of one
    iteration and its communication of one exchange (every iteration, or every H with local steps)."""
    return steps / workers * t_task + steps / (workers * every) * t_comm


def line(x: float, points: Sequence[tuple[float, float]]) -> float:
    """Piecewise-linear through `points` (x, y), extended linearly past both ends; one point: y ∝ x.

    Never negative. Points with equal x are averaged.
    """
    if not points:
        raise ValueError("no calibration points")
    merged: dict[float, list[float]] = {}
    for px, py in points:
        merged.setdefault(float(px), []).append(float(py))
    pts = sorted((px, sum(ys) / len(ys)) for px, ys in merged.items())
    if len(pts) == 1:
        px, py = pts[0]
        return max(0.0, py * x / px) if px else max(0.0, py)
    if x <= pts[0][0]:
        (x0, y0), (x1, y1) = pts[0], pts[1]
    elif x >= pts[-1][0]:
        (x0, y0), (x1, y1) = pts[-2], pts[-1]
    else:
        i = next(i for i in range(1, len(pts)) if x <= pts[i][0])
        (x0, y0), (x1, y1) = pts[i - 1], pts[i]
    return max(0.0, y0 + (y1 - y0) * (x - x0) / (x1 - x0))


def threads_for(workers: int, cores: int) -> int:
    """ps-cluster's default --threads 0: cores // workers, at least one."""
    return max(1, cores // workers)


def oversubscription(workers: int, cores: int) -> float:
    """How many compute threads share each core (≥ 1) with ps-cluster's thread rule."""
    return max(1.0, workers * threads_for(workers, cores) / cores)


class CostModel:
    """Predictions from one calibration dict (the JSON `ps-cost calibrate` writes)."""

    def __init__(self, calibration: dict):
        self.cal = calibration
        self.cores = int(calibration["machine"]["cpus"])
        self.gpu = calibration.get("settings", {}).get("device", "cpu").startswith("cuda")
        for key in ("compute", "comm", "startup"):
            if not calibration.get(key):
                raise ValueError(f"calibration has no {key!r} measurements")

    # -- parts --------------------------------------------------------------------------
    def _compute_at(self, job: Job, workers: int, key: str) -> float:
        rows = [r for r in self.cal["compute"] if r["workers"] == workers]
        if key == "inner_step_seconds":  # an optimizer step scales with the parameters, not the tokens
            return line(job.params, [(r["params"], r[key]) for r in rows])
        return line(job.work, [(r["params"] * r["tokens"], r[key]) for r in rows])

    def _shared(self, job: Job, workers: int, key: str) -> float:
        """Seconds of the compute row `key` with `workers` processes sharing the machine."""
        probed = sorted({r["workers"] for r in self.cal["compute"]})
        if workers in probed:
            return self._compute_at(job, workers, key)
        if workers > probed[-1]:  # more processes than probed: time grows with threads per core
            top = probed[-1]
            if self.gpu:  # one GPU shared by every worker on the host
                scale = workers / top
            else:
                scale = oversubscription(workers, self.cores) / oversubscription(top, self.cores)
            return self._compute_at(job, top, key) * scale
        return line(workers, [(p, self._compute_at(job, p, key)) for p in probed])

    def compute(self, job: Job, workers: int) -> tuple[float, float]:
        """(lockstep, mean) seconds of one iteration's compute with `workers` processes sharing the machine."""
        return self._shared(job, workers, "lockstep_seconds"), self._shared(job, workers, "mean_seconds")

    def comm(self, job: Job, workers: int, servers: int) -> float:
        """Seconds of one clock's pulls, pushes and update (nothing computed), `workers` at once through `servers`."""
        by_s = sorted({r["servers"] for r in self.cal["comm"]})
        s = min(by_s, key=lambda v: (abs(v - servers), -v))  # nearest probed server count
        rows = [r for r in self.cal["comm"] if r["servers"] == s]
        by_p = sorted({r["workers"] for r in rows})
        per_p = [
            (p, line(job.bytes, [(r["bytes"], r["clock_seconds"]) for r in rows if r["workers"] == p])) for p in by_p
        ]
        t = line(workers, per_p)
        if not job.average_gradients and workers > 1:  # P updates per clock instead of one, shards in parallel
            t += (workers - 1) * job.bytes / servers / (self.cal.get("apply", {}).get("adamw_gbps", 2.0) * 1e9)
        return t

    def startup(self, job: Job, workers: int, servers: int) -> float:
        """Fixed cost of one ps-cluster run: the one-step probes' wall time less their one clock.

        A job with local steps takes the probes run with local steps where the calibration has them."""
        local = [r for r in self.cal["startup"] if r.get("local_steps")]
        rows = local if job.local_steps and local else [r for r in self.cal["startup"] if not r.get("local_steps")]
        per_model: dict[int, list[tuple[float, float]]] = {}
        for r in rows:
            probe = probe_job(r["params"], r["tokens"], bool(r.get("local_steps")))
            clock = self.clock(probe, r["workers"], r["servers"])[0]
            per_model.setdefault(r["params"], []).append((r["workers"] + r["servers"], r["wall_seconds"] - clock))
        n = workers + servers
        pts = [(params, _flat_line(n, pts)) for params, pts in per_model.items()]
        if len(pts) == 1:
            return max(0.0, pts[0][1])
        return line(job.params, pts)

    def inner_step(self, job: Job, workers: int) -> float:
        """Seconds of one step of a worker's own AdamW (local steps only) with `workers` processes
        sharing the machine, as the compute probes measured it; a calibration without that
        measurement (older, or from summaries) falls back to the shards' AdamW apply rate."""
        if not job.local_steps:
            return 0.0
        if all("inner_step_seconds" in r for r in self.cal["compute"]):
            return self._shared(job, workers, "inner_step_seconds")
        return job.bytes / (self.cal.get("apply", {}).get("adamw_gbps", 2.0) * 1e9)

    def clock(self, job: Job, workers: int, servers: int) -> tuple[float, float, float]:
        """(clock, compute, comm) seconds: one exchange of every worker (one iteration, or H with local steps)."""
        lock, mean = self.compute(job, workers)
        step = self.inner_step(job, workers)
        lock, mean = job.every * (lock + step), job.every * (mean + step)
        comm = self.comm(job, workers, servers)
        if job.average_gradients or job.staleness == 0 or workers == 1:
            compute = lock  # one update per clock: everyone waits for the slowest worker
        elif math.isinf(job.staleness):
            compute = mean
        else:
            compute = mean + (lock - mean) / (1 + job.staleness)
        if job.pipeline:
            idle = 1.0 if self.gpu else max(0.0, 1 - workers * threads_for(workers, self.cores) / self.cores)
            total = max(compute, comm) + (1 - idle) * min(compute, comm)
        else:
            total = compute + comm
        return total, compute, comm

    def seed_parts(self, job: Job) -> tuple[float, float]:
        """(T_task per iteration, T_comm per exchange) with one worker and one server."""
        return self.compute(job, 1)[1] + self.inner_step(job, 1), self.comm(job, 1, 1)

    # -- whole runs -----------------------------------------------------------------------
    def predict(self, job: Job, workers: int, servers: int) -> Prediction:
        t_task, t_comm = self.seed_parts(job)
        clock, compute, comm = self.clock(job, workers, servers)
        clocks = math.ceil(math.ceil(job.steps / workers) / job.every)
        startup = self.startup(job, workers, servers)
        return Prediction(
            workers,
            servers,
            job.steps,
            seed_formula(job.steps, workers, t_task, t_comm, job.every),
            startup + clocks * clock,
            startup,
            clock,
            compute,
            comm,
            clocks,
        )

    def table(self, job: Job, workers: list[int], servers: list[int]) -> list[Prediction]:
        return [self.predict(job, p, s) for p in workers for s in servers]


def _flat_line(x: float, pts: list[tuple[float, float]]) -> float:
    """Like `line`, but one point means a constant (start-up does not vanish at zero processes)."""
    if len({px for px, _ in pts}) == 1:
        return max(0.0, sum(py for _, py in pts) / len(pts))
    return line(x, pts)


def probe_job(params: int, tokens: int, local: bool = False) -> Job:
    """What a start-up probe ran: one iteration per worker, s = 0 with averaged gradients;
    `local`: with --local-steps, which makes that iteration's clock one inner step and one exchange."""
    return Job(params=params, tokens=tokens, steps=1, local_steps=1 if local else 0)


def recommend(preds: list[Prediction], cores: int, tolerance: float = 0.05) -> tuple[Prediction, str]:
    """The fewest processes within `tolerance` of the fastest refined prediction, and a one-line reason."""
    if not preds:
        raise ValueError("nothing to recommend from")
    best = min(preds, key=lambda p: p.refined_seconds)
    near = [p for p in preds if p.refined_seconds <= best.refined_seconds * (1 + tolerance)]
    pick = min(near, key=lambda p: (p.workers + p.servers, p.refined_seconds))
    notes = []
    more_p = [p for p in preds if p.servers == pick.servers and p.workers > pick.workers]
    if more_p:
        q = min(more_p, key=lambda p: p.workers)
        gain = 1 - q.refined_seconds / pick.refined_seconds
        why = (
            f" ({q.workers} workers oversubscribe {cores} cores)"
            if q.workers * threads_for(q.workers, cores) > cores
            else ""
        )
        notes.append(
            f"P={q.workers} {'is ' + _pct(-gain) + ' slower' if gain < 0 else 'saves ' + _pct(gain) + ' only'}{why}"
        )
    more_s = [p for p in preds if p.workers == pick.workers and p.servers > pick.servers]
    if more_s:
        q = min(more_s, key=lambda p: p.servers)
        gain = 1 - q.refined_seconds / pick.refined_seconds
        notes.append(
            f"S={q.servers} {'is ' + _pct(-gain) + ' slower' if gain < 0 else 'saves ' + _pct(gain) + ' only'}"
        )
    head = f"P={pick.workers}, S={pick.servers}: {pick.refined_seconds:.0f} s predicted"
    return pick, head + (": " + "; ".join(notes) if notes else "")


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"
