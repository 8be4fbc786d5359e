"""Build, run and resume searches: Ray Tune schedules trials, Optuna proposes them, MLflow records them.

Modes
  * sweep:  a grid (default: the reference's W{8,4,2} x A{8,4,2}) with Ray's grid search;
  * search, single objective: maximise validation top-1 under a size budget; Optuna TPE with
    constant_liar (parallel trials), ASHA stops weak trials early;
  * search, multi objective: validation top-1 vs compressed size; Optuna's multi-objective TPE;
    the report computes the Pareto front.

The experiment directory (``OUT/NAME``) is the source of truth: Ray's trial results and
checkpoints, plus ``bitsearch.json`` with these settings, so `resume`, `report` and `sync` need
nothing else.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
import ray
from ray import tune
from ray.tune import ExperimentAnalysis
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from mlflow_server.tracking import SearchLogger, check_reachable, short_retries
from tune import storage
from tune.mlflow_callback import MlflowTrialCallback, ProgressCallback
from tune.resources import Cluster, fit_to_cluster
from tune.results import UNFINISHED, close_search, register_models, saved_trial_status, write_report
from tune.bisect import DropBisection, DropConstrained
from tune.settings import (SETTINGS_FILE, SearchConfigError, SearchInterrupted, SearchSettings, fixed_space,
                           load_settings, validate)
from tune.space import DefineByRun
from tune.trial import run_trial

# ------------------------------------------------------------------------------------------------
# Ray side


def _init_ray(address: str | None, num_cpus: int | None = None) -> None:
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    else:
        # Ray 2.60 turns token authentication on for a new local cluster, and warns that it did on every
        # start: keep the default, drop the warning
        auth_log = logging.getLogger("ray._private.authentication.authentication_token_setup")
        level = auth_log.level
        auth_log.setLevel(logging.ERROR)
        try:
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                     object_store_memory=200 * 1024 * 1024, logging_level=logging.WARNING)
        finally:
            auth_log.setLevel(level)


def cluster(address: str | None) -> Cluster:
    """What the Ray cluster this process is connected to offers (tune/resources.py)."""
    where = address or os.environ.get("RAY_ADDRESS") or f"{ray.get_runtime_context().gcs_address} (local)"
    return Cluster.of(where, ray.cluster_resources(), ray.nodes())


def _trainable(s: SearchSettings, trial_callbacks: tuple = (), trial_fn=run_trial):
    """The trial function with the search's fixed settings (and any extra trainer callbacks) bound
    once, as Ray's own examples pass datasets: each trial's config holds only sampled keys. Ray reserves
    ``cpus_per_trial`` and ``gpus_per_trial`` for each; the trial computes where that puts it."""
    return tune.with_resources(tune.with_parameters(trial_fn, settings=s, callbacks=tuple(trial_callbacks)),
                               {"cpu": s.cpus_per_trial, "gpu": s.gpus_per_trial})


def _quiet_ray() -> None:
    """Ray Tune's output that bitsearch replaces with its own (a new search and a resumed one alike)."""
    # Ray's default loggers include TensorBoardX, which is not installed: a warning on every search.
    # bitsearch reads the JSON results (tune/results.py); the CSV stays for Ray's own analysis tools.
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    # Ray Tune's new output engine prints an experiment box and result paths even at verbose=0; the
    # legacy one is silent at 0. bitsearch prints its own progress (ProgressCallback) and table.
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    # Ray's own lines a bitsearch user can do nothing with: "Wrote the latest version of all result files",
    # and on Ctrl-C "Stop signal received" and "Resume experiment with: Tuner.restore(...)" (bitsearch says
    # how to resume: SearchInterrupted); checkpointing every trial's epochs is what a search does
    logging.getLogger("ray.tune.tune").setLevel(logging.ERROR)
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")


def build_tuner(s: SearchSettings, trial_callbacks: tuple = (), trial_fn=run_trial):
    _quiet_ray()
    param_space: dict[str, Any] = {}
    search_alg = scheduler = None
    num_samples = s.num_samples
    if s.mode == "sweep":
        for k, vals in s.grid.items():
            param_space[k] = tune.grid_search(vals)
        num_samples = 1
    elif s.max_drop is not None and s.sensitivity:  # one trial at a time, each budget chosen from the results so far
        b = s.space["size_budget_mb"]
        search_alg = DropBisection(b["low"], b["high"], s.fp32_val_top1, s.max_drop, fixed_space(s.space), s.num_samples)
    else:
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "[I ...] A new study created in memory" line
        # the study's first trials: the allocator's solutions (or max-drop's widest model), then TPE
        sampler = optuna.samplers.TPESampler(seed=s.seed, constant_liar=True, n_startup_trials=min(4, s.num_samples))
        start = {"space": DefineByRun(s.space, s.base_quant.method, len(s.blocks)), "sampler": sampler,
                 "points_to_evaluate": list(s.start_points) or None}
        if s.max_drop is not None:  # no table: the smallest model, the drop as Optuna's constraint; no ASHA
            searcher = DropConstrained(s.fp32_val_top1, s.max_drop, **start)
        elif s.objectives == "single":
            searcher = OptunaSearch(metric="objective", mode="max", **start)
            scheduler = ASHAScheduler(time_attr="training_iteration", metric="objective", mode="max",
                                      max_t=max(2, _max_epochs(s) + 1), **s.asha)
        else:
            searcher = OptunaSearch(metric=["val_top1", "comp_mb"], mode=["max", "min"], **start)
        search_alg = ConcurrencyLimiter(searcher, max_concurrent=s.max_concurrent)
    tune_config = tune.TuneConfig(search_alg=search_alg, scheduler=scheduler, num_samples=num_samples,
                                  time_budget_s=s.time_budget_s,
                                  max_concurrent_trials=s.max_concurrent if search_alg is None else None,
                                  trial_dirname_creator=lambda t: t.trial_id,
                                  # a finished trial's worker takes the next one: no new process importing torch
                                  # and Ray Tune, and the baseline and data stay loaded (tune/trial.py)
                                  reuse_actors=True)
    run_config = tune.RunConfig(
        name=s.name, storage_path=s.out if storage.is_remote(s.out) else str(Path(s.out).resolve()),
        failure_config=tune.FailureConfig(max_failures=s.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
        callbacks=[JsonLoggerCallback(), CSVLoggerCallback(), MlflowTrialCallback(s), ProgressCallback(s, _n_trials(s))],
        verbose=0)
    return tune.Tuner(_trainable(s, trial_callbacks, trial_fn), param_space=param_space, tune_config=tune_config,
                      run_config=run_config)


def _n_trials(s: SearchSettings) -> int:
    if s.mode == "search":
        return s.num_samples
    n = 1
    for vals in s.grid.values():
        n *= len(vals)
    return n


def _max_epochs(s: SearchSettings) -> int:
    spec = s.space.get("qat_epochs")
    return int(spec[1]) if spec else s.qat_epochs


def run(s: SearchSettings, num_cpus: int | None = None, log=None, trial_callbacks: tuple = (),
        trial_fn=run_trial) -> dict[str, Any]:
    """Validate, start (or join) Ray, run the search, write the report. Returns the summary dict.
    ``log`` (a callable) hears where the experiment goes once every check has passed;
    ``trial_callbacks`` are extra trainer callbacks every trial runs with; ``trial_fn`` replaces the trial
    (tests: a stand-in that reports chosen figures)."""
    short_retries()
    s = validate(s)
    if s.tracking_uri:
        check_reachable(s.tracking_uri)
    _init_ray(s.address, num_cpus)
    s, fits = fit_to_cluster(s, cluster(s.address))  # refused here if no node can run a trial
    if log:
        blocks = (f"; one weight bit-width for each of {len(s.blocks)} blocks ({s.blocks[0]['name']} .. "
                  f"{s.blocks[-1]['name']}: w_bits_b00 ..)" if s.blocks else "")
        log(f"{s.mode}: experiment {s.path}; {fits}{blocks}")
    storage.write_text(storage.join(s.path, SETTINGS_FILE), json.dumps(s.to_dict(), indent=2))
    t0 = time.time()
    build_tuner(s, trial_callbacks, trial_fn).fit()
    return finish(s, time.time() - t0, _check_ended(s, time.time() - t0))


def _check_ended(s: SearchSettings, seconds: float) -> str:
    """Why Ray Tune returned: "completed" (every trial ran), "time_budget" (it ran out of --time-budget: what
    finished is the result, trials it stopped are "stopped"), or else a Ctrl-C (Ray returns normally on one):
    SearchInterrupted, after the in-flight trials' MLflow runs and the parent end KILLED (outcome
    "interrupted"), the report shows them "interrupted", nothing registered."""
    status = saved_trial_status(storage.local_copy(s.path)) or {}
    ended = sum(st not in UNFINISHED for st in status.values())
    if ended >= _n_trials(s):
        return "completed"
    if s.time_budget_s is not None and seconds >= 0.98 * s.time_budget_s:
        return "time_budget"
    if s.max_drop is not None and ended == len(status) and _searcher_finished(s):  # the bisection converged early
        return "completed"
    done = sum(st == "TERMINATED" for st in status.values())
    err = SearchInterrupted(done, _n_trials(s), str(s.path))
    write_report(s.path, "interrupted")
    try:
        SearchLogger(s.tracking_store, s.experiment, str(s.path)).interrupt_search(f"**{err}**")
    except Exception as e:  # noqa: BLE001 - the results are on disk; `bitsearch sync` fills MLflow in later
        warnings.warn(f"MLflow not updated ({type(e).__name__}: {str(e)[:300]}); `bitsearch sync {s.path}` later")
    raise err


def _search_state(path: str) -> tuple[Path, dict] | None:
    """Ray Tune's newest saved search-algorithm state of the experiment (``search_gen_state-*.json``,
    cloudpickle despite the name: counter, total_samples, finished) and its file; None if there is none or it
    cannot be read."""
    import ray.cloudpickle as cloudpickle
    states = sorted(storage.local_copy(path).glob("search_gen_state-*.json"), key=lambda f: f.stat().st_mtime)
    try:
        return (states[-1], cloudpickle.loads(states[-1].read_bytes())) if states else None
    except Exception:  # noqa: BLE001 - unreadable: treated as absent
        return None


def _searcher_finished(s: SearchSettings) -> bool:
    """Whether the search algorithm said it had nothing more to propose (a max-drop bisection that converged
    before --num-samples)."""
    saved = _search_state(s.path)
    return bool(saved and saved[1].get("finished"))


def resume(path: str | Path, num_cpus: int | None = None, more: int = 0, trial_fn=run_trial) -> dict[str, Any]:
    """Continue an interrupted search: finished trials are kept, errored ones resumed from their last
    checkpoint, the Optuna study's history is restored with the searcher. ``more``: a finished search runs
    exactly that many more trials, proposed by the same Optuna study. ``trial_fn``: as for ``run``."""
    short_retries()
    path = storage.normalize(path)
    s = load_settings(path)
    if not tune.Tuner.can_restore(str(path)):
        raise SearchConfigError(f"{path} holds no Ray Tune state to resume (the search never started?)")
    if more:
        s = add_samples(path, s, more)
    if trials_left(path, s) == 0:  # nothing to run: no Ray, just the report as it stands
        return {**write_report(path), "nothing_to_resume": True}
    _init_ray(s.address, num_cpus)
    fit_to_cluster(s, cluster(s.address))  # the cluster may have changed since: refused if no node fits a trial
    t0 = time.time()
    _quiet_ray()
    tuner = tune.Tuner.restore(str(path), trainable=_trainable(s, trial_fn=trial_fn), resume_errored=True)
    tuner.fit()
    return finish(s, time.time() - t0, _check_ended(s, time.time() - t0))


def add_samples(path: str, s: SearchSettings, more: int) -> SearchSettings:
    """Let a finished search propose ``more`` trials: the search algorithm's saved sample count (Ray Tune's
    SearchGenerator state beside the Optuna searcher's) and bitsearch.json's num_samples grow by ``more``, so
    the restored study continues where it stopped. Refused, with nothing changed, for a sweep (its grid is
    the whole search) and for a search with trials still to run."""
    if isinstance(more, bool) or not isinstance(more, int) or more < 1:
        raise SearchConfigError(f"--more {more!r} is invalid: a number of trials >= 1")
    if s.mode != "search":
        raise SearchConfigError(f"--more adds trials to a search; {path} is a sweep, whose grid is all it runs")
    left = trials_left(path, s)
    if left:
        raise SearchConfigError(f"{path} still has {left} trial(s) to run: `bitsearch resume {path}` first, then --more")
    saved = _search_state(path)
    if saved is None:
        raise SearchConfigError(f"{path} holds no saved search-algorithm state to continue")
    import ray.cloudpickle as cloudpickle
    file, state = saved
    state["total_samples"] = int(state["total_samples"]) + more
    state["finished"] = False
    tmp = file.with_name(f".{file.name}.tmp")
    tmp.write_bytes(cloudpickle.dumps(state))
    tmp.replace(file)
    storage.upload([str(file)], str(path))
    s = dataclasses.replace(s, num_samples=s.num_samples + more)
    storage.write_text(storage.join(s.path, SETTINGS_FILE), json.dumps(s.to_dict(), indent=2))
    return s


def trials_left(path: str | Path, s: SearchSettings) -> int | None:
    """Trials of the search not yet terminated (to run, or errored and to resume), from Ray Tune's saved
    experiment state without starting Ray; None if that state cannot be read."""
    try:
        statuses = [t.status for t in ExperimentAnalysis(str(path)).trials]
    except Exception:  # noqa: BLE001 - unreadable: let Tuner.restore decide
        return None
    return max(0, _n_trials(s) - sum(st == "TERMINATED" for st in statuses))


def finish(s: SearchSettings, seconds: float, stopped: str = "completed") -> dict[str, Any]:
    """The report, MLflow's parent run closed and the registry; ``stopped`` says why the search ended
    (completed or time_budget: an interrupt raises before this)."""
    summary = write_report(s.path, stopped)
    summary["seconds"] = seconds
    try:
        lg = SearchLogger(s.tracking_store, s.experiment, str(s.path))
        summary["mlflow_experiment_id"] = lg.experiment_id
        summary["mlflow_parent_run_id"] = lg.parent_run_id
        summary["mlflow_view"] = lg.share_view(*s.chart_axes())
        if stopped == "time_budget":  # the trials it stopped in flight end as stopped, not open
            lg.close_open_trials("stopped")
        close_search(lg, summary)
        summary["registry"] = register_models(s, summary, lg)
    except Exception as e:  # results stay on disk; `bitsearch sync` fills MLflow in later
        warnings.warn(f"MLflow not fully updated ({type(e).__name__}: {str(e)[:300]}); "
                      f"`bitsearch sync {s.path}` writes what is missing")
    return summary
