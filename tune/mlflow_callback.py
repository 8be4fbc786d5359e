"""Ray Tune callback that mirrors every trial into MLflow (driver side, idempotent)."""
from __future__ import annotations

import queue
import sys
import threading
import time
import warnings

from ray import tune

from mlflow_server.tracking import SearchLogger, check_reachable
from tune.results import alloc_params, trial_metrics
from tune.trial_spec import trial_spec


class MlflowTrialCallback(tune.Callback):
    """Logs from one background thread, in the order Ray reported: Ray's event loop never waits on
    MLflow (a synchronous log per result made Ray warn of a performance bottleneck, and slowed the whole
    search). Each hook captures what it logs when it is called; ``flush()`` (called at the
    experiment's end) waits until everything is written.

    A tracking server that stops answering (restarted, briefly unreachable) loses nothing: the failed call
    and every later one wait in order, the server is asked again every ``retry_s`` seconds (when the next
    call comes, and once more at the end), and the backlog is written when it answers. What is still
    waiting when the search ends is left to `bitsearch sync`."""

    retry_s = 10.0

    def __init__(self, settings):
        self.settings = settings
        self.uri, self.experiment, self.experiment_path = settings.tracking_store, settings.experiment, settings.path
        self._runs: dict[str, str] = {}
        self._logger: SearchLogger | None = None
        self._offline_since: float | None = None
        self._backlog: list = []
        self._queue: queue.Queue | None = None

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_logger"], d["_offline_since"], d["_backlog"], d["_queue"] = None, None, [], None  # a resumed search
        d["_runs"] = {}  # tries the server again, and finds its trials' runs again (child_run reopens them)
        return d

    def __setstate__(self, state):
        self.__dict__.update({"_offline_since": None, "_backlog": [], **state})
        self.__dict__.pop("_offline", None)  # callbacks saved before the backlog existed

    def _lg(self) -> SearchLogger:
        if self._logger is None:
            self._logger = SearchLogger(self.uri, self.experiment, self.experiment_path)
        return self._logger

    def _safe(self, fn, *, now: bool = False) -> None:
        """Run ``fn`` after the backlog; while the server is away, keep it for later (``now``: ask the server
        again whatever the time since the last try)."""
        self._backlog.append(fn)
        if self._offline_since is not None:
            if not now and time.monotonic() - self._offline_since < self.retry_s:
                return
            try:
                check_reachable(self.uri)
            except Exception:  # noqa: BLE001 - still away: the next call (or the end) tries again
                self._offline_since = time.monotonic()
                return
            n = len(self._backlog)
            print(f"MLflow answers again: writing the {n} update{'s' * (n != 1)} it missed", file=sys.stderr, flush=True)
            self._offline_since = None
        while self._backlog:
            try:
                self._backlog[0]()
            except Exception as e:  # the search goes on; this call and the later ones wait for the server
                warnings.warn(f"MLflow logging failed ({type(e).__name__}: {str(e)[:200]}); trials continue, their "
                              f"updates wait and are written when the server answers again (or by `bitsearch sync "
                              f"{self.experiment_path}`)")
                self._offline_since = time.monotonic()
                self._logger = None  # a fresh client once it is back
                return
            self._backlog.pop(0)

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
        """Wait until every submitted log call has been written, or is waiting for a server that is away
        (asked once more now)."""
        if self._queue is not None:
            self._queue.join()
        if self._backlog:
            self._safe(lambda: None, now=True)
        if self._backlog:
            warnings.warn(f"MLflow is still unreachable: {len(self._backlog) - 1} update(s) not written; run "
                          f"`bitsearch sync {self.experiment_path}` once the server is back")

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
