"""Ray Tune callback that mirrors every trial into MLflow (driver side, idempotent)."""
from __future__ import annotations

import queue
import sys
import threading
import warnings

from ray import tune

from mlflow_server.tracking import SearchLogger
from tune.results import alloc_params, trial_metrics
from tune.trial_spec import trial_spec


class MlflowTrialCallback(tune.Callback):
    """Logs from one background thread, in the order Ray reported: Ray's event loop never waits on
    MLflow (a synchronous log of ~0.5 s per result made Ray warn of a performance bottleneck, and slowed
    the whole search). Each hook captures what it logs when it is called; ``flush()`` (called at the
    experiment's end) waits until everything is written."""

    def __init__(self, settings):
        self.settings = settings
        self.uri, self.experiment, self.experiment_path = settings.tracking_store, settings.experiment, settings.path
        self._runs: dict[str, str] = {}
        self._logger: SearchLogger | None = None
        self._offline = False
        self._queue: queue.Queue | None = None

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_logger"], d["_offline"], d["_queue"] = None, False, None  # a resumed search tries the server again
        d["_runs"] = {}  # and finds its trials' runs again (SearchLogger.child_run reopens an interrupted one)
        return d

    def _lg(self) -> SearchLogger:
        if self._logger is None:
            self._logger = SearchLogger(self.uri, self.experiment, self.experiment_path)
        return self._logger

    def _safe(self, fn, *a):
        if self._offline:
            return None
        try:
            return fn(*a)
        except Exception as e:  # the search goes on; `bitsearch sync` writes what was missed
            warnings.warn(f"MLflow logging failed ({type(e).__name__}: {str(e)[:200]}); trials continue without it: "
                          f"run `bitsearch sync {self.experiment_path}` once the server is back")
            self._offline = True  # no retry storms against a dead server for the rest of this run
            self._logger = None
            return None

    def _submit(self, fn) -> None:
        if self._queue is None:
            self._queue = queue.Queue()
            threading.Thread(target=self._drain, args=(self._queue,), name="bitsearch-mlflow", daemon=True).start()
        self._queue.put(fn)

    def _drain(self, q: queue.Queue) -> None:
        while True:
            fn = q.get()
            try:
                self._safe(fn)
            finally:
                q.task_done()

    def flush(self) -> None:
        """Wait until every submitted log call has been written (or has failed)."""
        if self._queue is not None:
            self._queue.join()

    def setup(self, **info):
        def start():
            self._lg().log_search(self.settings.applicable())
            self._lg().share_view(*self.settings.chart_axes())  # the address printed at the end works at once
        self._submit(start)

    def _run(self, trial_id: str, config: dict) -> str:
        rid = self._runs.get(trial_id)
        if rid is None:
            spec = trial_spec(self.settings, config)
            rid = self._lg().child_run(trial_id, spec.label())
            self._lg().log_trial_params(rid, spec.params())
            self._runs[trial_id] = rid
        return rid

    def on_trial_start(self, iteration, trials, trial, **info):
        tid, config = trial.trial_id, dict(trial.config)
        self._submit(lambda: self._run(tid, config))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        tid, config, (metrics, step), bits = trial.trial_id, dict(trial.config), trial_metrics(result), alloc_params(result)

        def log():
            rid = self._run(tid, config)
            self._lg().log_metrics(rid, metrics, step)
            if bits:  # a budget-search trial's per-layer allocation
                self._lg().log_trial_params(rid, bits)
        self._submit(log)

    def on_trial_complete(self, iteration, trials, trial, **info):
        tid, config, ck, last = trial.trial_id, dict(trial.config), trial.checkpoint, dict(trial.last_result or {})

        def finish():  # the final report's metrics came through on_trial_result like every other report
            rid = self._run(tid, config)
            if not last.get("final"):  # ASHA stopped it: what it measured until then is logged, nothing final
                return self._lg().finish_trial(rid, None, "stopped")
            if ck is None:
                return self._lg().finish_trial(rid, None)
            with ck.as_directory() as d:  # local for a local experiment, downloaded from S3 otherwise
                self._lg().finish_trial(rid, d)
        self._submit(finish)

    def on_trial_error(self, iteration, trials, trial, **info):
        tid, config = trial.trial_id, dict(trial.config)
        self._submit(lambda: self._lg().finish_trial(self._run(tid, config), None, "failed"))

    def on_experiment_end(self, trials, **info):
        self.flush()


class ProgressCallback(tune.Callback):
    """One line on stderr per finished or failed trial (the searches run with Ray's own output off)."""

    def __init__(self, settings, total: int | None = None):
        self.settings, self.total, self.done = settings, total, 0

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.done += 1
        r = trial.last_result or {}
        # as its MLflow run is named: "W4A8 qat lr=0.01", "alloc 0.51MB A8 ptq", "W2-8A8 ptq"
        desc = trial_spec(self.settings, trial.config).label()
        val, mb = r.get("val_top1"), r.get("comp_mb")
        of = f"/{self.total}" if self.total else ""
        how = "done" if r.get("final") else "stopped early"
        print(f"trial {trial.trial_id} {how} ({self.done}{of}): {desc}  val {val if val is None else round(val, 2)}%  "
              f"{mb if mb is None else round(mb, 4)} MB", file=sys.stderr, flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        print(f"trial {trial.trial_id} failed: see {trial.local_path}/error.txt", file=sys.stderr, flush=True)
