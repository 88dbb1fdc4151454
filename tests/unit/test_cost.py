"""The cost model's arithmetic on a hand-made calibration, the recommendation, the calibration file, CLI errors."""

from __future__ import annotations

import json
import math
import socket
from pathlib import Path

import pytest
import torch

from worker.cost import cli, drift
from worker.cost.calibrate import FORMAT, PRESETS, lockstep, machine
from worker.cost.model import CostModel, Job, Prediction, line, recommend, seed_formula
from worker.cost.validate import Mode, error_summary, job_for, write_json

# One model of 1000 parameters (4000 bytes), 10 tokens per iteration, on 2 cores.
# Compute: P=1 100 ms; P=2 120 ms lockstep (100 mean); P=4 250 ms lockstep (200 mean).
# Communication per clock, S=1: 10 ms per worker at 4000 bytes, 20 ms per worker at 8000 bytes.
# Start-up probes: P+S=2 takes 10 s plus one clock (110 ms), P+S=6 takes 12 s plus one clock (290 ms).
CAL = {
    "format": FORMAT,
    "machine": {"hostname": "test", "cpus": 2, "gpu": None, "date": "2026-01-01T00:00:00+00:00"},
    "settings": {"device": "cpu"},
    "compute": [
        {"params": 1000, "tokens": 10, "workers": 1, "lockstep_seconds": 0.100, "mean_seconds": 0.100},
        {"params": 1000, "tokens": 10, "workers": 2, "lockstep_seconds": 0.120, "mean_seconds": 0.100},
        {"params": 1000, "tokens": 10, "workers": 4, "lockstep_seconds": 0.250, "mean_seconds": 0.200},
    ],
    "comm": [
        {"servers": 1, "workers": p, "bytes": b, "clock_seconds": p * b / 4000 * 0.01}
        for p in (1, 2, 4)
        for b in (4000, 8000)
    ],
    "startup": [
        {"params": 1000, "tokens": 10, "workers": 1, "servers": 1, "wall_seconds": 10.11},
        {"params": 1000, "tokens": 10, "workers": 4, "servers": 2, "wall_seconds": 12.29},
    ],
    "apply": {"adamw_gbps": 2.0},
}
JOB = Job(params=1000, tokens=10, steps=100)
ROOT = Path(__file__).resolve().parents[2]


def test_seed_formula_by_hand():
    assert seed_formula(1000, 4, 0.05, 0.01) == pytest.approx(250 * 0.06)
    assert CostModel(CAL).predict(JOB, 2, 1).seed_formula_seconds == pytest.approx(50 * (0.1 + 0.01))


def test_line_interpolates_extends_and_clamps():
    pts = [(1, 2), (3, 6)]
    assert line(2, pts) == pytest.approx(4)
    assert line(5, pts) == pytest.approx(10)
    assert line(0, pts) == pytest.approx(0)
    assert line(3, [(1, 5), (2, 1)]) == 0.0  # a falling line never goes negative
    assert line(3, [(2, 4)]) == pytest.approx(6)  # one point: proportional
    assert line(2, [(1, 1), (1, 3), (3, 6)]) == pytest.approx(4)  # equal x averaged
    with pytest.raises(ValueError):
        line(1, [])


def test_refined_model_by_hand():
    cost = CostModel(CAL)
    p = cost.predict(JOB, 2, 1)
    # start-up 10 s + 0.5 s per process beyond two; 50 clocks of 120 ms compute + 20 ms communication
    assert p.startup_seconds == pytest.approx(10.5)
    assert (p.compute_seconds, p.comm_seconds, p.clock_seconds) == pytest.approx((0.12, 0.02, 0.14))
    assert p.clocks == 50
    assert p.refined_seconds == pytest.approx(10.5 + 50 * 0.14)
    # uneven split: 100 iterations over 3 workers take 34 clocks; P=3 between the probed 2 and 4
    p3 = cost.predict(JOB, 3, 1)
    assert p3.clocks == 34
    assert p3.compute_seconds == pytest.approx(0.185)
    assert p3.comm_seconds == pytest.approx(0.03)


def test_more_workers_than_probed_scale_with_threads_per_core():
    p = CostModel(CAL).predict(JOB, 8, 1)
    # 8 one-thread workers on 2 cores: twice the oversubscription of 4 -> 500 ms; comm extends the line to 80 ms
    assert p.compute_seconds == pytest.approx(0.5)
    assert p.comm_seconds == pytest.approx(0.08)
    assert p.clocks == 13
    assert p.startup_seconds == pytest.approx(13.5)
    assert p.refined_seconds == pytest.approx(13.5 + 13 * 0.58)


def test_model_size_scales_compute_and_bytes():
    cost = CostModel(CAL)
    big = Job(params=1500, tokens=10, steps=100)
    lock, mean = cost.compute(big, 1)
    assert (lock, mean) == pytest.approx((0.15, 0.15))  # one probed size: compute proportional to work
    assert cost.comm(big, 1, 1) == pytest.approx(0.015)  # between the probed 4000 and 8000 bytes
    assert cost.comm(JOB, 1, 2) == pytest.approx(0.01)  # S=2 not probed: the nearest probed count


def test_staleness_averaging_and_pipeline():
    cost = CostModel(CAL)
    asyn = Job(params=1000, tokens=10, steps=100, staleness=math.inf, average_gradients=False)
    _, compute, comm = cost.clock(asyn, 4, 1)
    assert compute == pytest.approx(0.2)  # no lockstep: the mean worker
    assert comm == pytest.approx(0.04 + 3 * 4000 / 2e9)  # three more updates per clock at 2 GB/s
    ssp = Job(params=1000, tokens=10, steps=100, staleness=2, average_gradients=False)
    assert cost.clock(ssp, 4, 1)[1] == pytest.approx(0.2 + 0.05 / 3)
    piped = Job(params=1000, tokens=10, steps=100, staleness=1, average_gradients=False, pipeline=True)
    assert cost.clock(piped, 1, 1)[0] == pytest.approx(0.11)  # one worker fills both cores: nothing hidden
    gpu = CostModel({**CAL, "settings": {"device": "cuda"}})
    assert gpu.clock(piped, 1, 1)[0] == pytest.approx(0.1)  # compute on the GPU hides the 10 ms pull


def test_local_steps_exchange_once_per_h_iterations():
    cost = CostModel(CAL)
    step = 4000 / 2e9  # one step of the worker's own AdamW at the measured apply rate
    sync = Job(params=1000, tokens=10, steps=100, local_steps=4)
    p = cost.predict(sync, 2, 1)
    # 50 iterations per worker are 13 pushes; each clock H = 4 iterations at the lockstep, then one exchange
    assert p.clocks == 13
    assert (p.compute_seconds, p.comm_seconds) == pytest.approx((4 * (0.12 + step), 0.02))
    assert p.startup_seconds == pytest.approx(10.5)  # the start-up probes ran one default iteration, whatever the job
    assert p.refined_seconds == pytest.approx(10.5 + 13 * (4 * (0.12 + step) + 0.02))
    # the seed formula counts one exchange per H iterations: T = M/P T_task + M/(P H) t_comm
    assert p.seed_formula_seconds == pytest.approx(50 * (0.1 + step) + 100 / 8 * 0.01)
    assert seed_formula(100, 2, 0.1, 0.01, every=4) == pytest.approx(5.125)
    asyn = Job(params=1000, tokens=10, steps=100, staleness=2, average_gradients=False, local_steps=4)
    _, compute, comm = cost.clock(asyn, 2, 1)
    assert compute == pytest.approx(4 * (0.1 + 0.02 / 3 + step))  # the straggler term shrinks with s as before
    assert comm == pytest.approx(0.02 + 4000 / 2e9)  # two updates per clock, one exchange per H iterations
    # a run with local steps is predicted faster than one exchanging every iteration, by the exchanges it saves
    plain = cost.predict(Job(params=1000, tokens=10, steps=100), 2, 1)
    assert plain.refined_seconds - p.refined_seconds == pytest.approx(50 * 0.14 - 13 * (0.48 + 0.02), abs=0.01)


def test_inner_step_comes_from_the_compute_probes_when_measured():
    rows = [{**r, "inner_step_seconds": 0.001 * r["workers"]} for r in CAL["compute"]]  # 1, 2, 4 ms
    cost = CostModel({**CAL, "compute": rows})
    job = Job(params=1000, tokens=10, steps=100, local_steps=4)
    assert cost.inner_step(job, 2) == pytest.approx(0.002)
    assert cost.inner_step(job, 3) == pytest.approx(0.003)  # between the probed 2 and 4
    assert cost.inner_step(job, 8) == pytest.approx(0.008)  # twice the threads per core of 4
    assert cost.inner_step(Job(params=2000, tokens=10, steps=100, local_steps=4), 1) == pytest.approx(0.002)
    assert cost.inner_step(JOB, 2) == 0.0  # no local steps: the servers step, not the worker
    assert cost.clock(job, 2, 1)[1] == pytest.approx(4 * (0.12 + 0.002))


def test_local_steps_take_the_start_up_probes_run_with_local_steps():
    step = 4000 / 2e9
    local_rows = [  # one second slower to start than the default probes, plus their one clock
        {"params": 1000, "tokens": 10, "workers": 1, "servers": 1, "local_steps": 4, "wall_seconds": 11 + 0.11 + step},
        {"params": 1000, "tokens": 10, "workers": 4, "servers": 2, "local_steps": 4, "wall_seconds": 13 + 0.29 + step},
    ]
    cost = CostModel({**CAL, "startup": CAL["startup"] + local_rows})
    local = Job(params=1000, tokens=10, steps=100, local_steps=4)
    assert cost.startup(local, 2, 1) == pytest.approx(11.5)
    assert cost.startup(JOB, 2, 1) == pytest.approx(10.5)  # the default mode keeps the default probes
    assert CostModel(CAL).startup(local, 2, 1) == pytest.approx(10.5)  # none with local steps: the default ones


def test_validate_mode_flags_match_the_predicted_job():
    assert Mode().flags() == [] and Mode().name() == "default"
    mode = Mode(staleness=2, average_gradients=False, local_steps=4)
    assert mode.flags() == ["--staleness", "2", "--no-average-gradients", "--local-steps", "4"]
    assert Mode(staleness=math.inf).flags() == ["--staleness", "inf"]
    job = job_for(PRESETS["small"], 100, mode)
    assert (job.params, job.staleness, job.average_gradients, job.local_steps) == (PRESETS["small"].params, 2, False, 4)


def test_recommend_prefers_fewer_processes_within_tolerance():
    def pred(p, s, t):
        return Prediction(p, s, 100, 0.0, t, 0.0, 0.0, 0.0, 0.0, 1)

    preds = [pred(1, 1, 20.0), pred(1, 2, 20.5), pred(2, 1, 12.0), pred(2, 2, 11.8), pred(4, 1, 14.0), pred(4, 2, 14.5)]
    pick, reason = recommend(preds, cores=2)
    assert (pick.workers, pick.servers) == (2, 1)
    assert reason == "P=2, S=1: 12 s predicted: P=4 is 17% slower (4 workers oversubscribe 2 cores); S=2 saves 2% only"
    pick, reason = recommend(preds, cores=2, tolerance=0.0)
    assert (pick.workers, pick.servers) == (2, 2)
    assert "\n" not in reason
    with pytest.raises(ValueError):
        recommend([], cores=2)


def test_lockstep_takes_the_slowest_worker_per_iteration():
    lock, mean = lockstep([[1.0, 3.0, 2.0], [2.0, 1.0, 2.0]])
    assert lock == pytest.approx(2.0)  # maxima 2, 3, 2
    assert mean == pytest.approx(2.0)  # median of 1, 3, 2, 2, 1, 2


def test_error_summary():
    rows = [{"seed_error": e, "refined_error": e / 10} for e in (-0.5, 0.1, 0.3)]
    assert error_summary(rows) == {
        "seed": {"median_abs": 0.3, "max_abs": 0.5},
        "refined": {"median_abs": 0.03, "max_abs": 0.05},
    }


def test_calibration_round_trip(tmp_path):
    cal = {**CAL, "machine": {**machine(), "cpus": 2}}
    path = tmp_path / "cal.json"
    write_json(cal, path)
    loaded = cli.load_calibration(cli.build_parser(), str(path))
    assert loaded == json.loads(json.dumps(cal))
    assert {"hostname", "cpus", "cpu_model", "torch", "gpu", "date"} <= set(loaded["machine"])
    assert CostModel(loaded).predict(JOB, 4, 2) == CostModel(CAL).predict(JOB, 4, 2)


def test_predict_cli_writes_rows(tmp_path, capsys):
    path = tmp_path / "cal.json"
    write_json(CAL, path)
    out = tmp_path / "p.json"
    assert (
        cli.main(
            [
                "predict",
                "--calibration",
                str(path),
                "--params",
                "1000",
                "--batch-size",
                "1",
                "--context",
                "10",
                "--steps",
                "100",
                "--workers",
                "1,2,4",
                "--servers",
                "1",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    rows = json.loads(out.read_text())["rows"]
    assert [(r["workers"], r["servers"]) for r in rows] == [(1, 1), (2, 1), (4, 1)]
    assert rows[1]["refined_seconds"] == pytest.approx(17.5)
    assert rows[1]["seed_formula_seconds"] == pytest.approx(5.5)
    assert "recommended: P=2, S=1" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["predict", "--calibration", "{missing}"], "no calibration at"),
        (["predict", "--calibration", "{notjson}"], "cannot read calibration"),
        (["predict", "--calibration", "{wrong}"], "is not a ps-cost calibration"),
        (["predict", "--calibration", "{incomplete}"], "is incomplete"),
        (["predict", "--workers", "0,2"], "expected positive whole numbers"),
        (["predict", "--staleness", "0", "--pipeline"], "--pipeline needs --staleness"),
        (["predict", "--local-steps", "-1"], "--local-steps"),
        (["predict", "--local-steps", "4", "--link-gbit", "1"], "not modelled by the network model"),
        (["validate", "--json", "x.json", "--local-steps", "two"], "--local-steps"),
        (["predict", "--calibration", "{good}", "--d-model", "10", "--n-head", "4"], "not divisible"),
        (["calibrate", "--models", "huge"], "unknown model 'huge'"),
        (["calibrate", "--startup", "1-1"], "expected P:S pairs"),
        (["validate", "--json", "x.json", "--models", "small,wide", "--steps", "1,2,3"], "gives 3 values for 2 models"),
        (["validate", "--json", "x.json", "--steps", "2"], "at least the largest worker count"),
        (["validate"], "required: --json"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_cli_mistakes_are_one_line_and_exit_2(tmp_path, capsys, argv, message):
    files = {
        "missing": tmp_path / "none.json",
        "notjson": tmp_path / "bad.json",
        "wrong": tmp_path / "wrong.json",
        "incomplete": tmp_path / "inc.json",
        "good": tmp_path / "good.json",
    }
    files["notjson"].write_text("{not json")
    files["wrong"].write_text(json.dumps({"format": "other"}))
    files["incomplete"].write_text(json.dumps({**CAL, "comm": []}))
    files["good"].write_text(json.dumps(CAL))
    argv = [a.format(**files) for a in argv]
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert message in err


# -- drift: does the machine still compute as fast as when it was calibrated? -----------------


def _on_this_host(**models_and_rows) -> dict:
    """A calibration made on this host with one-process compute probes of the given models (name: seconds)."""
    specs = [{**PRESETS[name].__dict__, "params": PRESETS[name].params} for name in models_and_rows]
    rows = [{"model": name, "workers": 1, "threads": 1, "mean_seconds": sec} for name, sec in models_and_rows.items()]
    return {**CAL, "machine": {**CAL["machine"], "hostname": socket.gethostname()}, "models": specs, "compute": rows}


def test_drift_reruns_the_one_process_probe_of_the_nearest_calibrated_model():
    cal = _on_this_host(tiny=1e-6, small=1e-6)
    d = drift.measure(cal, params=PRESETS["tiny"].params + 10)
    assert d is not None and d.model == "tiny"  # nearest by parameters: the small probe is not run
    assert d.calibrated_seconds == 1e-6 and 0 < d.now_seconds < 5
    assert d.ratio > 1 and d.large() and "slower than when calibrated" in d.describe()


def test_drift_is_skipped_where_it_would_not_compare_like_with_like():
    assert drift.measure(CAL) is None  # calibrated on host "test"
    assert drift.measure({**_on_this_host(tiny=0.01), "compute": []}) is None  # --from-summary: no probes
    odd = _on_this_host(tiny=0.01)
    odd["models"][0]["vocab_size"] = 512  # a model entry this version does not know
    assert drift.measure(odd) is None
    cuda = {**_on_this_host(tiny=0.01), "settings": {"device": "cuda"}}
    if not torch.cuda.is_available():
        assert drift.measure(cuda) is None


def test_drift_describes_both_ways_and_warns_past_ten_percent():
    assert drift.Drift("small", 0.1, 0.13).describe().startswith("this machine computes 30% slower")
    assert "20% faster" in drift.Drift("small", 0.1, 0.08).describe()
    assert not drift.Drift("small", 0.1, 0.109).large() and drift.Drift("small", 0.1, 0.089).large()


def test_predict_warns_when_the_machine_drifted_from_its_calibration(tmp_path, caplog):
    cal = json.loads((ROOT / "bench" / "results" / "cost-12-07b-calibration.json").read_text())
    cal["machine"]["hostname"] = socket.gethostname()
    for row in cal["compute"]:
        if row["model"] == "small" and row["workers"] == 1:
            row["mean_seconds"] = row["lockstep_seconds"] = 1e-4  # no machine computes this fast
    path = tmp_path / "cal.json"
    write_json(cal, path)
    argv = [
        "predict",
        "--calibration",
        str(path),
        "--workers",
        "1",
        "--servers",
        "1",
        "--json",
        str(tmp_path / "p.json"),
    ]
    assert cli.main(argv) == 0
    assert "slower than when calibrated" in caplog.text and "recalibrate" in caplog.text
    assert json.loads((tmp_path / "p.json").read_text())["compute_drift"] > 10
    caplog.clear()
    assert cli.main([*argv, "--no-drift-check"]) == 0
    assert "calibrated" not in caplog.text
    assert json.loads((tmp_path / "p.json").read_text())["compute_drift"] is None
