"""A search's life beyond one clean run: a trial that fails and is retried, ASHA stopping weak trials, trials
over the size budget, a driver killed outright, and Ctrl-C; each time the report and MLflow say what happened
and `resume` finishes the search. (Its own module: its tests run beside tests/test_search.py's.)"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from bitsearch.cli import main
from test_search import _runs, _server_start, _settings, baseline, ray_session, s3, server  # noqa: F401 - fixtures


class FailOnce:
    """trainer callback injected into the trial: crash once, right after the given epoch's checkpoint."""

    def __init__(self, epoch: int, marker: str):
        self.epoch, self.marker = epoch, Path(marker)

    def on_epoch_end(self, epoch, m, state):
        if epoch + 1 == self.epoch and not self.marker.exists():
            self.marker.write_text("x")
            raise RuntimeError("injected failure")


def test_failing_trial_is_retried_from_its_checkpoint(ray_session, baseline, tmp_path):
    import ray.cloudpickle
    from tune.search import run
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers need not import this test module
    s = _settings(baseline, tmp_path, name="retry", num_samples=1, max_concurrent=1,
                  space={"w_bits": [4, 4], "method": ["qat"]}, qat_epochs=2)
    summary = run(s, trial_callbacks=(FailOnce(1, str(tmp_path / "failed-once")),))
    assert (tmp_path / "failed-once").exists()
    t = summary["trials"][0]
    assert t["status"] == "done"
    res = [json.loads(x) for x in (Path(summary["experiment"]) / t["trial_id"] / "result.json").read_text().splitlines()]
    final = res[-1]
    assert final["final"] and final["resumed"] is True  # restarted from the epoch-1 checkpoint


def _asha_probe(config, settings, callbacks=()):
    """A trial whose validation top-1 is 10 x its w_bits at every epoch (bitsearch's report keys, no training)."""
    from ray import tune
    w = int(config["w_bits"])
    for epoch in (1, 2, 3):
        tune.report({"objective": 10.0 * w, "val_top1": 10.0 * w, "comp_mb": w / 10, "ratio": 32 / w, "epoch": epoch,
                     "final": False})
    tune.report({"objective": 10.0 * w, "val_top1": 10.0 * w, "test_top1": 10.0 * w, "comp_mb": w / 10,
                 "ratio": 32 / w, "epoch": 4, "final": True})


def test_asha_stops_weak_trials_and_they_show_as_stopped(ray_session, baseline, tmp_path):
    """Forced: one trial at a time, each judged against the earlier ones at the same epoch; a stopped trial is
    "stopped" in the report with what it measured ("-" for the rest) and in MLflow FINISHED, named so."""
    import ray.cloudpickle
    from mlflow import MlflowClient

    from tune.search import run
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    s = _settings(baseline, tmp_path, name="asha", num_samples=6, max_concurrent=1, qat_epochs=3,
                  space={"w_bits": [2, 8], "method": ["qat"]})
    summary = run(s, trial_fn=_asha_probe)
    stopped = [t for t in summary["trials"] if t["status"] == "stopped"]
    assert stopped and len(stopped) < 6, [(t["w_bits"], t["status"]) for t in summary["trials"]]
    assert all("test_top1" not in t and t["val_top1"] == 10.0 * t["w_bits"] for t in stopped)
    md = (Path(summary["experiment"]) / "results.md").read_text()
    assert "nan" not in md.lower() and len(re.findall(r"\| stopped +\|", md)) == len(stopped)
    c = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = {r.data.tags["bitsearch.trial_id"]: r for r in c.search_runs([summary["mlflow_experiment_id"]])
            if "bitsearch.trial_id" in r.data.tags}
    for t in stopped:
        r = runs[t["trial_id"]]
        assert r.info.status == "FINISHED" and r.data.tags["bitsearch.outcome"] == "stopped"
        assert r.info.run_name.endswith(" (stopped early)") and "test_top1" not in r.data.metrics


def test_over_budget_trials_skip_the_work_and_say_so(ray_session, baseline, tmp_path):
    from pipeline import load_baseline, packed_meta, prepare_quantized
    from quantization import QuantConfig
    from tune.search import run
    fp32, c = load_baseline(str(baseline[1]))
    budget = prepare_quantized(fp32, QuantConfig(w_bits=6), packed_meta(c)).size["comp_mb"]  # W7 and W8 do not fit
    s = _settings(baseline, tmp_path, name="budget1", num_samples=4, size_budget_mb=budget,
                  space={"w_bits": [2, 8], "a_bits": [8, 8], "method": ["ptq"]})
    summary = run(s)
    over = [t for t in summary["trials"] if t["comp_mb"] > budget]
    assert over and len(over) < 4, [(t["w_bits"], t["comp_mb"]) for t in summary["trials"]]
    for t in summary["trials"]:  # too big: its size is known at once, nothing is evaluated
        assert t["status"] == ("over budget" if t in over else "done"), t
        assert ("test_top1" in t) == (t not in over)
    assert summary["best"]["comp_mb"] <= budget


def test_a_latency_budget_takes_slow_exports_out_of_the_answer(ray_session, baseline, tmp_path):
    """Every trial measures its exported ONNX model (onnx_ms: batch 1, 1 thread, on its node); a trial slower
    than latency_budget_ms is over budget like one larger than the size budget: no best, no front."""
    from tune.search import run
    from tune.trial import objective
    assert objective(80.0, 1.0, None, 2.0, 4.0) == 80.0 and objective(80.0, 1.0, 2.0, 6.0, 4.0) == pytest.approx(-50.0)
    assert objective(80.0, 3.0, 2.0, 1.0, 4.0) == pytest.approx(-50.0)  # the larger overshoot counts
    s = _settings(baseline, tmp_path, name="lat", num_samples=2, latency_budget_ms=1e-6,
                  space={"w_bits": [8, 8], "a_bits": [8, 8], "method": ["ptq"]})
    summary = run(s)
    assert len(summary["trials"]) == 2
    for t in summary["trials"]:
        assert t["status"] == "over budget" and t["onnx_ms"] > 0 and t["test_top1"] is not None, t
    assert summary["best"] is None and summary["pareto"] == []


def test_resume_more_adds_exactly_n_trials_from_the_same_study(ray_session, baseline, tmp_path, capsys):
    """`resume EXP --more 2` on a finished 2-trial search: 4 trials in all, the 2 new ones proposed by the
    continued Optuna study (a restarted study with the same seed would propose the first two again);
    refused with nothing changed on a sweep, on a search with trials still to run, and for N < 1."""
    import ray.cloudpickle

    from tune.search import add_samples, resume, run
    from tune.settings import SearchConfigError
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    s = _settings(baseline, tmp_path, name="more", num_samples=2, max_concurrent=1,
                  space={"w_bits": [2, 8], "method": ["qat"]})
    first = run(s, trial_fn=_asha_probe)["trials"]
    exp = tmp_path / "more"
    trials = resume(str(exp), more=2, trial_fn=_asha_probe)["trials"]
    assert len(trials) == 4 and all(t["status"] in ("done", "stopped") for t in trials)
    assert {t["trial_id"] for t in first} < {t["trial_id"] for t in trials}
    new = [t["w_bits"] for t in trials if t["trial_id"] not in {f["trial_id"] for f in first}]
    assert len(new) == 2 and new != [t["w_bits"] for t in first]
    assert json.loads((exp / "bitsearch.json").read_text())["num_samples"] == 4
    before = sorted(p.name for p in exp.iterdir())
    assert main(["resume", str(exp), "--more", "-1"]) == 2
    assert "--more -1 is invalid" in capsys.readouterr().err
    assert sorted(p.name for p in exp.iterdir()) == before
    with pytest.raises(SearchConfigError, match="is a sweep"):
        add_samples(str(exp), _settings(baseline, tmp_path, name="more", mode="sweep"), 2)


def _saved_terminated(exp: Path) -> list[str]:
    """Trial folders that the driver's last saved experiment state (trials and Optuna study) records as finished."""
    states = sorted(exp.glob("experiment_state-*.json"))
    try:
        data = json.loads(states[-1].read_text()) if states else {"trial_data": []}
    except (OSError, ValueError):  # caught mid-write: try again
        return []
    trials = [json.loads(t[0]) for t in data["trial_data"]]
    done = [t["relative_logdir"] for t in trials if t["status"] == "TERMINATED"]
    import pickle
    searcher = sorted(exp.glob("searcher-state-*.pkl"))  # Ray saves the searcher after the trial states
    try:
        study = pickle.loads(searcher[-1].read_bytes())["_ot_study"] if searcher else None
    except Exception:  # caught mid-write: try again
        return []
    finished = sum(t.state.name == "COMPLETE" for t in study.trials) if study else 0
    return done if finished >= len(done) else []


def test_killed_search_resumes_without_rerunning_or_duplicating(ray_session, server, baseline, tmp_path):
    """Kill the search driver after its first trial finishes; resume; 3 trials, no duplicate runs."""
    from tune.search import resume
    tree, ck = baseline
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"search": {"space": {"w_bits": [2, 8], "a_bits": [4, 8], "method": ["qat"]},
                                          "qat_epochs": 1, "num_samples": 3, "max_concurrent": 1,
                                          "experiment": "srv-resume"}}))
    env = {**os.environ, "RAY_ADDRESS": ray_session}
    proc = subprocess.Popen([sys.executable, "-m", "bitsearch", "search", "--baseline", str(ck), "--data", str(tree),
                             "--out", str(tmp_path), "--name", "kr", "--config", str(cfg), "--batch-size", "16",
                             "--device", "cpu", "--tracking-uri", server], env=env, stdout=subprocess.DEVNULL,
                            stderr=(tmp_path / "driver.err").open("w"), start_new_session=True)
    exp = tmp_path / "kr"
    first = None
    deadline = time.time() + 240
    while time.time() < deadline and first is None:  # kill once the saved state says a trial has finished
        first = next((exp / d / "result.json" for d in _saved_terminated(exp)), None)
        time.sleep(0.2)
    assert first is not None, "no trial finished in time"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    err = (tmp_path / "driver.err").read_text()
    assert "search: experiment" in err and "A new study created" not in err, err  # no Optuna INFO line
    first_reports = first.read_text()
    summary = resume(exp)
    assert len(summary["trials"]) == 3 and all(t["status"] in ("done", "stopped") for t in summary["trials"])
    assert first.read_text() == first_reports  # the finished trial was not rerun
    # the Optuna study came back with the experiment: 3 completed trials, the pre-kill one among them
    import pickle
    state = pickle.loads(sorted(exp.glob("searcher-state-*.pkl"))[-1].read_bytes())
    study = state["_ot_study"]
    assert len(study.trials) == 3 and all(t.state.name == "COMPLETE" for t in study.trials)
    assert first.parent.name in state["_ot_trials"]
    exp_id = requests.get(f"{server}/api/2.0/mlflow/experiments/get-by-name",
                          params={"experiment_name": "srv-resume"}, timeout=30).json()["experiment"]["experiment_id"]
    runs = _runs(server, exp_id)
    trial_ids = [t["value"] for r in runs for t in r["data"].get("tags", []) if t["key"] == "bitsearch.trial_id"]
    assert len(trial_ids) == 3 and len(set(trial_ids)) == 3


def test_ctrl_c_ends_the_search_killed_and_resume_finishes_it(ray_session, baseline, tmp_path, capsys):
    """Ctrl-C (SIGINT) while a trial is in flight: exit 130 with one line naming `bitsearch resume`; the
    parent and the in-flight trial's MLflow runs KILLED (outcome interrupted), nothing registered, the report
    calls the trial interrupted. `resume` then finishes it: every run FINISHED once, the model registered."""
    from mlflow import MlflowClient

    tree, ck = baseline
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"search": {"space": {"w_bits": [4, 8], "method": ["qat"]}, "qat_epochs": 2,
                                          "objectives": "multi",  # no ASHA: every trial runs to its end
                                          "num_samples": 3, "max_concurrent": 1}}))
    proc = subprocess.Popen([sys.executable, "-m", "bitsearch", "search", "--baseline", str(ck), "--data", str(tree),
                             "--out", str(tmp_path), "--name", "ci", "--config", str(cfg), "--batch-size", "16",
                             "--device", "cpu"], env={**os.environ, "RAY_ADDRESS": ray_session},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    exp, deadline = tmp_path / "ci", time.time() + 240
    while time.time() < deadline:  # one trial finished, the next one reporting
        done = _saved_terminated(exp)
        if done and any((d / "result.json").is_file() and (d / "result.json").stat().st_size
                        for d in exp.iterdir() if d.is_dir() and d.name not in done):
            break
        time.sleep(0.2)
    else:
        pytest.fail("no second trial in flight in time")
    os.kill(proc.pid, signal.SIGINT)
    err = proc.communicate(timeout=120)[1]
    lines = [ln for ln in err.splitlines() if ln.startswith("interrupted")]
    assert proc.returncode == 130 and len(lines) == 1, err
    assert re.fullmatch(rf"interrupted: [12] of 3 trials done; continue with `bitsearch resume {exp}`", lines[0])
    assert "Tuner.restore" not in err and "Configuration for experiment" not in err and "Traceback" not in err, err
    c = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = c.search_runs([c.get_experiment_by_name("bitsearch").experiment_id])
    parent = next(r for r in runs if r.data.tags.get("bitsearch.kind") == "search")
    trials = [r for r in runs if r.data.tags.get("bitsearch.kind") == "trial"]
    assert parent.info.status == "KILLED" and "bitsearch resume" in parent.data.tags["mlflow.note.content"]
    cut = [r for r in trials if r.data.tags.get("bitsearch.outcome") == "interrupted"]
    assert len(cut) == 1 and cut[0].info.status == "KILLED", [(r.info.status, r.data.tags) for r in trials]
    assert c.search_registered_models() == []
    report = json.loads((exp / "results.json").read_text())
    assert [t["status"] for t in report["trials"] if t["trial_id"] == cut[0].data.tags["bitsearch.trial_id"]] == ["interrupted"]

    assert main(["resume", str(exp), "--json"]) == 0  # the CLI's resume continues the same search
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [t["status"] for t in summary["trials"]] == ["done"] * 3 and summary["registry"]["champion_version"]
    assert summary["stopped"] == "completed"
    runs = c.search_runs([c.get_experiment_by_name("bitsearch").experiment_id])
    trials = [r for r in runs if r.data.tags.get("bitsearch.kind") == "trial"]
    assert len({r.data.tags["bitsearch.trial_id"] for r in trials}) == len(trials) == 3
    assert all(r.info.status == "FINISHED" and r.data.tags["bitsearch.outcome"] == "done" for r in runs if r in trials)
    assert next(r for r in runs if r.data.tags.get("bitsearch.kind") == "search").info.status == "FINISHED"


def _slow_probe(config, settings, callbacks=()):
    """A trial of 3 epochs of 1.2 s (bitsearch's report keys, no training)."""
    from ray import tune
    w = int(config["w_bits"])
    for epoch in (1, 2, 3):
        time.sleep(1.2)
        tune.report({"objective": 10.0 * w, "val_top1": 10.0 * w, "comp_mb": w / 10, "epoch": epoch,
                     "final": epoch == 3, **({"test_top1": 10.0 * w} if epoch == 3 else {})})


def test_time_budget_ends_the_search_with_what_it_finished(ray_session, baseline, tmp_path, capsys):
    """--time-budget: 30 samples of trials of 3.6 s each (108 s) in 40 s; a fresh Ray worker may take most of
    25 s on a loaded 2-core machine (CI: no trial finished in a 25 s budget), so the budget leaves it 36 s. The
    search ends on time (no interrupt), the JSON says stopped: time_budget, the finished trials are the result,
    a trial it stopped is "stopped"."""
    import ray.cloudpickle

    from tune.search import run
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    s = _settings(baseline, tmp_path, name="tb", num_samples=30, max_concurrent=1, qat_epochs=3, time_budget_s=40,
                  space={"w_bits": [2, 8], "method": ["qat"]})
    t0 = time.time()
    summary = run(s, trial_fn=_slow_probe)
    assert time.time() - t0 < 80 and summary["stopped"] == "time_budget"
    status = [t["status"] for t in summary["trials"]]
    # stopped: by ASHA or by the budget mid-trial; no result: started as the budget ran out, nothing measured
    assert 1 <= status.count("done") <= 29 and set(status) <= {"done", "stopped", "no result"}, status
    assert len(status) < 30  # the budget, not the samples, ended it
    assert summary["best"]["trial_id"] in {t["trial_id"] for t in summary["trials"] if t["status"] == "done"}
    saved = json.loads((Path(summary["experiment"]) / "results.json").read_text())
    assert saved["stopped"] == "time_budget"


def _drop_probe(config, settings, callbacks=()):
    """A trial whose model is the budget it was given (comp_mb = size_budget_mb) and whose validation top-1 falls
    1 point below FP32 for every 10% of the W8A8 size it gives up."""
    from ray import tune
    b = float(config["size_budget_mb"])
    val = settings.fp32_val_top1 - 10.0 * (settings.w8_mb - b) / settings.w8_mb
    tune.report({"objective": val, "val_top1": val, "test_top1": val, "comp_mb": b, "ratio": 1.0, "epoch": 0,
                 "final": True})


@pytest.fixture(scope="module")
def table(baseline):
    """A Hessian sensitivity table of the tiny baseline (its file)."""
    tree, ck = baseline
    assert main(["sensitivity", "--baseline", str(ck), "--data", str(tree), "--estimator", "hessian", "--images", "9",
                 "--no-download", "--json"]) == 0
    return str(max(Path(ck).parent.glob("sensitivity-*.json"), key=lambda f: f.stat().st_mtime))


def test_max_drop_bisects_the_budgets_to_the_smallest_model_within_the_drop(ray_session, baseline, table, tmp_path):
    """--max-drop 3: models at >= 70% of the W8A8 size are within 3 points. Bisection measures the top budget
    first, then halves toward 70%: the answer (`best`) is the smallest measured model within the drop, within
    a quarter of the budget range of the true edge after 3 trials, one at a time; the test-set figure is not
    what chose it (refusals: tests/test_search.py)."""
    import ray.cloudpickle

    from tune.search import run
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    s = _settings(baseline, tmp_path, name="drop", num_samples=3, max_drop=3.0, sensitivity=table,
                  space={"a_bits": 8, "method": "ptq"})
    summary = run(s, trial_fn=_drop_probe)
    from tune.settings import load_settings
    s = load_settings(str(tmp_path / "drop"))
    trials, best = summary["trials"], summary["best"]
    budgets = sorted(t["comp_mb"] for t in trials)
    lo = s.space["size_budget_mb"]["low"]
    assert len(trials) == 3 and budgets[-1] == pytest.approx(s.w8_mb)  # the top of the range is measured first
    within = [b for b in budgets if b >= 0.7 * s.w8_mb]
    assert best["val_drop"] <= 3.0 and best["comp_mb"] == min(within) < s.w8_mb
    # each halving keeps the edge (70% of W8) inside the interval: after 2 the answer is within 1/4 of the range
    assert best["comp_mb"] - 0.7 * s.w8_mb <= (s.w8_mb - lo) / 4 + 1e-9, (budgets, lo, s.w8_mb)


def _optuna_trials(experiment: str) -> list:
    """The Optuna study's trials of a finished search, in the order they were asked for (Ray saves the
    searcher with the experiment)."""
    import pickle
    saved = max(Path(experiment).glob("searcher-state-*.pkl"), key=lambda f: f.stat().st_mtime)
    return pickle.loads(saved.read_bytes())["_ot_study"].trials


def _bits_probe(config, settings, callbacks=()):
    """A trial whose validation top-1 falls 1 point below FP32 per weight bit under 8 (the mean of its block
    bit-widths where it has them) and whose size is its bits / 10."""
    from ray import tune
    blocks = [v for k, v in config.items() if k.startswith("w_bits_b")]
    w = sum(blocks) / len(blocks) if blocks else float(config["w_bits"])
    val = settings.fp32_val_top1 - (8 - w)
    tune.report({"objective": val, "val_top1": val, "test_top1": val, "comp_mb": w / 10, "ratio": 32 / w,
                 "epoch": 0, "final": True})


def test_max_drop_without_a_table_is_optuna_with_the_drop_as_a_constraint(ray_session, baseline, tmp_path):
    """--max-drop 2.5 and no sensitivity table: Optuna samples w_bits, the widest model first (the queued
    known-good point); the answer is the smallest model within 2.5 points (6 bits here) among those run."""
    import ray.cloudpickle

    from tune.search import run
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    s = _settings(baseline, tmp_path, name="drop-optuna", num_samples=6, max_concurrent=1, max_drop=2.5,
                  space={"w_bits": [2, 8], "a_bits": 8, "method": "ptq"})
    summary = run(s, trial_fn=_bits_probe)
    trials = summary["trials"]
    assert len(trials) == 6 and all(t["status"] == "done" for t in trials)
    asked = _optuna_trials(summary["experiment"])
    assert asked[0].params["w_bits"] == 8 and len(asked) == 6  # the queued point first
    for t in asked:  # each trial's excess drop reached Optuna as its constraint
        assert t.constraints == {"val_drop": pytest.approx(8 - t.params["w_bits"] - 2.5, abs=1e-6)}
    within = [t for t in trials if t["w_bits"] >= 6]
    assert summary["best"]["trial_id"] == min(within, key=lambda t: t["comp_mb"])["trial_id"]
    assert summary["best"]["val_drop"] <= 2.5


def test_a_per_block_search_starts_from_the_allocators_solution(ray_session, baseline, table, tmp_path):
    """block_w_bits with a sensitivity table and a size budget: the first trial runs the allocator's
    per-block solution for the budget (one bit-width per block, within the space, the packed file within the
    budget); Optuna samples what follows."""
    import ray.cloudpickle

    from pipeline import load_baseline, packed_meta, prepare_quantized
    from tune.search import run
    from tune.settings import load_settings, validate
    from tune.trial_spec import quant_config
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    tree, ck = baseline
    fp32, c = load_baseline(str(ck))

    def packed_mb(point):
        return prepare_quantized(fp32, quant_config(point, {}), packed_meta(c)).size["comp_mb"]
    w4 = packed_mb({"w_bits": 4, "a_bits": 8})
    budget = (w4 + packed_mb({"w_bits": 8, "a_bits": 8})) / 2
    s = _settings(baseline, tmp_path, name="warm", num_samples=2, max_concurrent=1, sensitivity=table,
                  size_budget_mb=budget, space={"block_w_bits": [4, 8], "a_bits": [6, 8], "method": "ptq"})
    multi = validate(dataclasses.replace(s, objectives="multi", size_budget_mb=None)).start_points
    assert 1 <= len(multi) <= 3 and w4 < packed_mb(multi[0]) < packed_mb(multi[-1])  # across the range, smallest first
    summary = run(s, trial_fn=_bits_probe)
    (point,) = load_settings(str(tmp_path / "warm")).start_points
    assert point["a_bits"] == 8 and len([k for k in point if k.startswith("w_bits_b")]) == 17  # every block
    assert all(4 <= v <= 8 for v in point.values()) and packed_mb(point) <= budget
    first = _optuna_trials(summary["experiment"])[0].params
    assert {k: first[k] for k in point} == point and len(summary["trials"]) == 2


def test_a_search_runs_on_resnet20(ray_session, baseline, tmp_path):
    """Any CNN: a 2-trial per-block search on a ResNet-20 baseline, its trials real (PTQ, packed, exported): one
    bit-width per basic block (its 9 found in the model), each applied to that block's two convs in the packed
    file; the stem and the classifier (outside the blocks) FP32 by default."""
    from quantization.packing import read_packed
    from tune.search import run
    tree, _ = baseline
    assert main(["train", "--model", "resnet20", "--data", str(tree), "--out", str(tmp_path / "r20"), "--epochs", "1",
                 "--batch-size", "16", "--val-size", "9", "--device", "cpu", "--no-download"]) == 0
    s = _settings((tree, tmp_path / "r20" / "checkpoint.pt"), tmp_path, name="r20", num_samples=2, max_concurrent=1,
                  space={"block_w_bits": [3, 8], "a_bits": 8, "method": "ptq"})
    summary = run(s)
    assert [t["status"] for t in summary["trials"]] == ["done", "done"]
    for t in summary["trials"]:
        final = Path(summary["experiment"]) / t["trial_id"]
        packed = next(final.rglob("model.bsq"))
        assert packed.stat().st_size == round(t["comp_mb"] * 1e6) and next(final.rglob("model.onnx")).exists()
        weights = {name: (role, bits) for name, _, role, bits, *_ in read_packed(packed)[0]["tensors"]}
        sampled = [t[f"w_bits_b{i:02d}"] for i in range(9)]
        assert [weights[f"layers.{i}.{c}.conv.weight"] for i in range(9) for c in ("conv1", "conv2")] == \
            [("weight", b) for b in sampled for _ in range(2)]
        assert "w_bits_b09" not in t
        assert weights["stem.conv.weight"] == weights["classifier.weight"] == ("weight_fp32", 32)
