"""Ray Tune callback that mirrors every trial into MLflow (driver side, idempotent)."""
from __future__ import annotations

import warnings
from typing import Any

from ray import tune

from mlflow_server.logging import SearchLogger


class MlflowTrialCallback(tune.Callback):
    def __init__(self, uri: str, experiment: str, experiment_path: str, settings: dict[str, Any]):
        self.uri, self.experiment, self.experiment_path, self.settings = uri, experiment, experiment_path, settings
        self._runs: dict[str, str] = {}
        self._logger: SearchLogger | None = None
        self._warned = False

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_logger"] = None
        return d

    def _lg(self) -> SearchLogger:
        if self._logger is None:
            self._logger = SearchLogger(self.uri, self.experiment, self.experiment_path)
        return self._logger

    def _safe(self, fn, *a):
        try:
            return fn(*a)
        except Exception as e:  # the search goes on; `bitsearch sync` writes what was missed
            if not self._warned:
                warnings.warn(f"MLflow logging failed ({type(e).__name__}: {e}); trials continue, run "
                              f"`bitsearch sync {self.experiment_path}` once the server is back")
                self._warned = True
            self._logger = None
            return None

    def setup(self, **info):
        self._safe(lambda: self._lg().log_search(self.settings))

    def _run(self, trial) -> str:
        rid = self._runs.get(trial.trial_id)
        if rid is None:
            rid = self._lg().child_run(trial.trial_id, str(trial))
            self._lg().log_trial_params(rid, {k: v for k, v in trial.config.items() if k != "_s"})
            self._runs[trial.trial_id] = rid
        return rid

    def on_trial_start(self, iteration, trials, trial, **info):
        self._safe(self._run, trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._safe(lambda: self._lg().log_metrics(self._run(trial), result, int(result.get("training_iteration", 0))))

    def on_trial_complete(self, iteration, trials, trial, **info):
        ck = trial.checkpoint
        self._safe(lambda: self._lg().finish_trial(self._run(trial), trial.last_result or {},
                                                   ck.path if ck is not None else None))

    def on_trial_error(self, iteration, trials, trial, **info):
        self._safe(lambda: self._lg().finish_trial(self._run(trial), trial.last_result or {}, None, "FAILED"))
