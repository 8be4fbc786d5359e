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

import json
import os
import re
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tune import storage
from tune.space import SpaceError, smallest_bits, validate_space, quant_config

SETTINGS_FILE = "bitsearch.json"
DEFAULT_GRID = {"w_bits": [8, 4, 2], "a_bits": [8, 4, 2]}


@dataclass
class SearchSettings:
    baseline: str
    data: str
    out: str
    name: str = "search"
    mode: str = "search"                       # sweep | search
    objectives: str = "single"                 # single | multi
    space: dict[str, Any] = field(default_factory=lambda: {"w_bits": [2, 8], "a_bits": [4, 8], "method": ["ptq", "qat"],
                                                           "qat_lr": {"low": 1e-4, "high": 0.05, "log": True}})
    grid: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_GRID))
    metric: str = "val_top1"                   # single objective (maximised, under the size budget)
    size_budget_mb: float | None = None
    num_samples: int = 8
    max_concurrent: int = 2
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    asha: dict[str, Any] = field(default_factory=lambda: {"grace_period": 1, "reduction_factor": 2})
    max_failures: int = 2
    seed: int = 0
    batch_size: int = 128
    qat_epochs: int = 1                        # when the space does not search it
    qat_lr: float = 0.01
    quant_base: dict[str, Any] = field(default_factory=dict)   # fixed QuantConfig fields (keep_fp32, observers, ...)
    tracking_uri: str | None = None
    experiment: str = "bitsearch"
    address: str | None = None
    device: str = "auto"
    # filled in by prepare_settings
    subset: int = 0
    val_size: int = 0
    fp32_top1: float | None = None
    fail_once_after_epoch: int = 0             # test hook

    @property
    def tracking_store(self) -> str:
        """--tracking-uri, or the embedded SQLite store next to the experiments."""
        from mlflow_server.logging import default_tracking_uri
        return self.tracking_uri or default_tracking_uri(self.out)

    @property
    def path(self) -> str:
        """The experiment: OUT/NAME, a local/NFS path or an S3-compatible URI."""
        return storage.join(self.out, self.name)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class SearchConfigError(ValueError):
    pass


def settings_from(d: dict[str, Any]) -> SearchSettings:
    known = set(SearchSettings.__dataclass_fields__)
    unknown = sorted(set(d) - known)
    if unknown:
        raise SearchConfigError(f"unknown search option(s) {', '.join(unknown)}; allowed: {', '.join(sorted(known))}")
    return SearchSettings(**d)


def validate(s: SearchSettings) -> SearchSettings:
    """Every check that can fail before Ray starts. Fills in subset/val split from the baseline."""
    from quantization import QuantConfigError, prepare
    from quantization.api import plan_for
    from quantization.packing import convert, size_report
    from tune.pipeline import load_baseline, packed_meta

    if not storage.is_remote(s.out):
        s.out = str(Path(s.out).expanduser().resolve())  # resume/sync/report from any working directory
    if storage.is_remote(s.out) and not s.tracking_uri:
        raise SearchConfigError(f"--out {s.out} is remote storage: pass --tracking-uri (an MLflow server), the "
                                "embedded SQLite store needs a local --out")
    if s.mode not in ("sweep", "search"):
        raise SearchConfigError(f"mode={s.mode!r} is invalid: sweep or search")
    if s.objectives not in ("single", "multi"):
        raise SearchConfigError(f"objectives={s.objectives!r} is invalid: single or multi")
    if s.metric != "val_top1":  # the one implemented objective (see trial.objective)
        raise SearchConfigError(f"metric={s.metric!r} is unknown: allowed val_top1 (validation top-1, maximised "
                                "under the size budget)")
    if not isinstance(s.name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", s.name):
        raise SearchConfigError(f"name={s.name!r} is invalid: letters, digits, '.', '_' and '-' (one folder under --out)")
    for k in ("qat_lr", "size_budget_mb"):
        v = getattr(s, k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < float("inf")):
            raise SearchConfigError(f"{k}={v!r} is invalid: a number > 0")
    for k, lo in (("num_samples", 1), ("max_concurrent", 1), ("batch_size", 1), ("qat_epochs", 1)):
        if not isinstance(getattr(s, k), int) or getattr(s, k) < lo:
            raise SearchConfigError(f"{k}={getattr(s, k)!r} is invalid: an integer >= {lo}")
    if s.cpus_per_trial <= 0 or s.gpus_per_trial < 0:
        raise SearchConfigError("cpus_per_trial must be > 0 and gpus_per_trial >= 0 (fractions such as 0.25 share a GPU)")
    try:
        if s.mode == "search":
            s.space = validate_space(s.space)
        else:
            if not s.grid:
                raise SearchConfigError("the sweep grid is empty: give w_bits and/or a_bits lists")
            for k, vals in s.grid.items():
                if k not in ("w_bits", "a_bits", "method", "granularity") or not isinstance(vals, list) or not vals:
                    raise SearchConfigError(f"grid.{k}={vals!r} is invalid: a non-empty list for w_bits, a_bits, method "
                                            "or granularity")
                for v in vals:
                    quant_config({k: v}, s.quant_base)
        quant_config({}, s.quant_base)  # the fixed QuantConfig fields are valid on their own
    except (SpaceError, QuantConfigError) as e:
        raise SearchConfigError(str(e)) from None
    from trainer.data import source_kind
    source_kind(s.data, download=False)  # DataError now, not in every trial once Ray has started
    fp32, ck = load_baseline(s.baseline, s.tracking_uri)
    try:
        plan_for(fp32, quant_config({}, s.quant_base))  # the fixed layer patterns match this model
    except QuantConfigError as e:
        raise SearchConfigError(str(e)) from None
    tc = ck["config"]
    s.subset, s.val_size = int(tc.get("subset", 0)), int(tc.get("val_size", 0))
    if s.val_size <= 0:
        raise SearchConfigError(f"baseline {s.baseline} was trained without a validation split; the search objective "
                                "needs one: train it with --val-size N")
    hist = ck.get("history") or []
    s.fp32_top1 = hist[-1].get("test_top1") if hist else None  # same test set: no need to re-evaluate per trial
    if s.size_budget_mb is not None:
        if s.mode != "search" or s.objectives != "single":
            raise SearchConfigError("size_budget_mb applies to single-objective searches only")
        small = quant_config(smallest_bits(s.space), s.quant_base)
        mb = size_report(convert(prepare(fp32, small), packed_meta(ck)), fp32)["comp_mb"]
        if s.size_budget_mb < mb:
            raise SearchConfigError(f"size_budget_mb={s.size_budget_mb} is below the smallest model this space allows "
                                    f"({mb:.4f} MB at {small.w_bits}-bit weights): raise the budget or widen the space")
    return s


# ------------------------------------------------------------------------------------------------
# Ray side


def _init_ray(address: str | None, num_cpus: int | None = None) -> None:
    import ray
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                 object_store_memory=200 * 1024 * 1024)


def _trainable(s: SearchSettings):
    from ray import tune

    from tune.trial import run_trial
    return tune.with_resources(run_trial, {"cpu": s.cpus_per_trial, "gpu": s.gpus_per_trial})


def _mlflow_callback(s: SearchSettings):
    from tune.mlflow_callback import MlflowTrialCallback
    return MlflowTrialCallback(s.tracking_store, s.experiment, s.path, s.to_dict())


def build_tuner(s: SearchSettings):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from tune.mlflow_callback import ProgressCallback

    param_space: dict[str, Any] = {"_s": s.to_dict()}
    search_alg = scheduler = None
    num_samples = s.num_samples
    if s.mode == "sweep":
        for k, vals in s.grid.items():
            param_space[k] = tune.grid_search(vals)
        num_samples = 1
    else:
        import optuna
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        from tune.space import DefineByRun
        sampler = optuna.samplers.TPESampler(seed=s.seed, constant_liar=True, n_startup_trials=min(4, s.num_samples))
        if s.objectives == "single":
            searcher = OptunaSearch(space=DefineByRun(s.space), metric="objective", mode="max", sampler=sampler)
            scheduler = ASHAScheduler(time_attr="training_iteration", metric="objective", mode="max",
                                      max_t=max(2, _max_epochs(s) + 1), **s.asha)
        else:
            searcher = OptunaSearch(space=DefineByRun(s.space), metric=["val_top1", "comp_mb"], mode=["max", "min"],
                                    sampler=sampler)
        search_alg = ConcurrencyLimiter(searcher, max_concurrent=s.max_concurrent)
    tune_config = tune.TuneConfig(search_alg=search_alg, scheduler=scheduler, num_samples=num_samples,
                                  max_concurrent_trials=s.max_concurrent if search_alg is None else None,
                                  trial_dirname_creator=lambda t: t.trial_id)
    run_config = tune.RunConfig(
        name=s.name, storage_path=s.out if storage.is_remote(s.out) else str(Path(s.out).resolve()),
        failure_config=tune.FailureConfig(max_failures=s.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
        callbacks=[_mlflow_callback(s), ProgressCallback(_n_trials(s))], verbose=0)
    return tune.Tuner(_trainable(s), param_space=param_space, tune_config=tune_config, run_config=run_config)


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


def _short_mlflow_retries() -> None:
    """A tracking server that goes away mid-search must not stall the driver in retries."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def run(s: SearchSettings, num_cpus: int | None = None, log=None) -> dict[str, Any]:
    """Validate, start (or join) Ray, run the search, write the report. Returns the summary dict.
    ``log`` (a callable) hears where the experiment goes once every check has passed."""
    from mlflow_server.logging import check_reachable
    _short_mlflow_retries()
    validate(s)
    if s.tracking_uri:
        check_reachable(s.tracking_uri)
    if log:
        log(f"{s.mode}: experiment {s.path}")
    storage.write_text(storage.join(s.path, SETTINGS_FILE), json.dumps(s.to_dict(), indent=2))
    _init_ray(s.address, num_cpus)
    t0 = time.time()
    build_tuner(s).fit()
    return finish(s, time.time() - t0)


def resume(path: str | Path, num_cpus: int | None = None) -> dict[str, Any]:
    """Continue an interrupted search: finished trials are kept, errored ones resumed from their last
    checkpoint, the Optuna study's history is restored with the searcher."""
    from ray import tune
    _short_mlflow_retries()
    path = storage.normalize(path)
    s = load_settings(path)
    if not tune.Tuner.can_restore(str(path)):
        raise SearchConfigError(f"{path} holds no Ray Tune state to resume (the search never started?)")
    _init_ray(s.address, num_cpus)
    t0 = time.time()
    tuner = tune.Tuner.restore(str(path), trainable=_trainable(s), resume_errored=True)
    tuner.fit()
    return finish(s, time.time() - t0)


def load_settings(path: str) -> SearchSettings:
    """The settings saved with an experiment (local path or URI)."""
    sf = storage.join(path, SETTINGS_FILE)
    if not storage.exists(sf):
        raise SearchConfigError(f"{path} is not a bitsearch experiment (no {SETTINGS_FILE})")
    return settings_from(json.loads(storage.read_text(sf)))


def finish(s: SearchSettings, seconds: float) -> dict[str, Any]:
    from tune.results import write_report
    summary = write_report(s.path)
    summary["seconds"] = seconds
    try:
        from mlflow_server.logging import SearchLogger
        lg = SearchLogger(s.tracking_store, s.experiment, str(s.path))
        summary["mlflow_experiment_id"] = lg.experiment_id
        summary["mlflow_parent_run_id"] = lg.parent_run_id
        lg.finish_search(list(summary["files"].values()))
    except Exception as e:  # results stay on disk; `bitsearch sync` fills MLflow in later
        warnings.warn(f"MLflow parent run not updated: {e}")
    return summary
