"""Where a search's time goes beyond the trials' own work: the same 4-trial PTQ sweep as
bench/overhead.py, each trial timed on its worker (wall and CPU seconds; with cProfile unless
--no-cprofile, the top of the first two trials' profiles in the JSON), the driver's phases timed (Ray
start, Tune's start, Tuner.fit, report + MLflow finish), and the CPU seconds of the driver and of every
other process (Ray's own) over the search.

The wrapped trial function is pickled by value, so the first trial also imports tune.trial (and torch),
which a normal search does while Tune starts the worker.

    python bench/overhead_profile.py --no-cprofile --baseline runs/quick/checkpoint.pt \
        --data ../shared/data/cifar10-jpeg.tar.gz --out docs/bench/overhead-profile.json
"""
from __future__ import annotations

import cProfile
import io
import json
import os
import pstats
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from overhead import arguments, sweep_settings  # noqa: E402  (the same sweep as bench/overhead.py)

PROF_DIR = Path("/tmp/bitsearch-overhead-prof")
CPROFILE = True  # set by --no-cprofile before the trial function is pickled (by value, with this global)


def profiled_trial(config, settings, callbacks=()):
    """tune.trial.run_trial under cProfile; this function is pickled by value (it lives in __main__)."""
    import os as _os
    import time as _time
    from ray import tune as _tune

    from tune.trial import run_trial
    import psutil as _psutil
    t0, c0 = _time.time(), _psutil.Process().cpu_times()
    prof = cProfile.Profile() if CPROFILE else None
    try:
        if prof is None:
            run_trial(config, settings, callbacks)
        else:
            prof.runcall(run_trial, config, settings, callbacks)
    finally:
        tid = _tune.get_context().get_trial_id()
        if prof is not None:
            prof.dump_stats(str(PROF_DIR / f"{tid}.prof"))
        c1 = _psutil.Process().cpu_times()
        with open(PROF_DIR / "trials.jsonl", "a") as f:
            f.write(json.dumps({"trial_id": tid, "pid": _os.getpid(), "start": t0, "end": _time.time(),
                                "cpu_s": c1.user + c1.system - c0.user - c0.system}) + "\n")


def top(path: Path, n: int = 25) -> list[str]:
    out = io.StringIO()
    pstats.Stats(str(path), stream=out).sort_stats("cumulative").print_stats(n)
    return [ln for ln in out.getvalue().splitlines() if ln.strip()][-n - 1:]


def main() -> None:
    ap = arguments("docs/bench/overhead-profile.json")
    ap.add_argument("--no-cprofile", action="store_true", help="phases and CPU seconds only (cProfile slows "
                    "Python-heavy code: the trial times are then the real ones)")
    a = ap.parse_args()
    global CPROFILE
    CPROFILE = not a.no_cprofile
    import shutil
    shutil.rmtree(PROF_DIR, ignore_errors=True)
    PROF_DIR.mkdir(parents=True)

    import psutil
    import ray

    import tune.search as search
    from ray import tune

    def profiled_trainable(s, trial_callbacks=()):
        return tune.with_resources(tune.with_parameters(profiled_trial, settings=s, callbacks=tuple(trial_callbacks)),
                                   {"cpu": s.cpus_per_trial, "gpu": s.gpus_per_trial})
    search._trainable = profiled_trainable
    phases: dict[str, float] = {}
    real_finish = search.finish

    def timed_finish(s, seconds):
        phases["fit_end"] = time.time()
        out = real_finish(s, seconds)
        phases["finish_end"] = time.time()
        return out
    search.finish = timed_finish

    def cpu_by_process() -> dict[int, tuple[str, float]]:
        res = {}
        for p in psutil.process_iter(["name"]):
            try:
                t = p.cpu_times()
                res[p.pid] = (p.info["name"] or "?", t.user + t.system)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return res

    out = Path("/tmp/bitsearch-overhead")
    before = cpu_by_process()
    t0 = time.time()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=200 * 1024 * 1024)
    phases["ray_init_end"] = time.time()
    s = sweep_settings(a, out, "overhead-prof")
    summ = search.run(s)
    after = cpu_by_process()  # Ray still up: its processes are there (a finished trial worker may not be)
    trials = [json.loads(ln) for ln in (PROF_DIR / "trials.jsonl").read_text().splitlines()]
    worker_pids = {t["pid"] for t in trials}
    me = os.getpid()
    rest: dict[str, float] = {}
    for pid, (name, c) in after.items():
        if pid in worker_pids or pid == me:
            continue
        d = c - before.get(pid, (name, 0.0))[1]
        if d > 0.05:
            rest[name] = rest.get(name, 0.0) + d
    cpu = {"trials (worker process during trials)": sum(t["cpu_s"] for t in trials),
           "driver (Tune loop, MLflow logging, report)": after[me][1] - before[me][1],
           "other processes (Ray's, the system's)": sum(rest.values())}
    trials.sort(key=lambda t: t["start"])
    res = {"date": time.strftime("%Y-%m-%d %H:%M"), "baseline": a.baseline, "trials": len(trials),
           "ray_init_s": phases["ray_init_end"] - t0,
           "search_s": phases["finish_end"] - t0,
           "first_trial_starts_after_s": trials[0]["start"] - phases["ray_init_end"],
           "trial_wall_s": [round(t["end"] - t["start"], 2) for t in trials],
           "gaps_between_trials_s": [round(b["start"] - a_["end"], 2) for a_, b in zip(trials, trials[1:])],
           "last_trial_end_to_fit_end_s": phases["fit_end"] - trials[-1]["end"],
           "finish_s": phases["finish_end"] - phases["fit_end"],
           "worker_processes": len(worker_pids),
           "cpu_s": {k: round(v, 1) for k, v in cpu.items()}, "trial_cpu_s": [round(t["cpu_s"], 1) for t in trials],
           "other_processes_cpu_s": {k: round(v, 1) for k, v in sorted(rest.items(), key=lambda kv: -kv[1])},
           "cprofile": CPROFILE,
           "experiment": summ["experiment"],
           "profile_top": {t["trial_id"]: top(PROF_DIR / f"{t['trial_id']}.prof") for t in trials[:2]} if CPROFILE else {}}
    print(json.dumps({k: v for k, v in res.items() if k != "profile_top"}, indent=2))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
