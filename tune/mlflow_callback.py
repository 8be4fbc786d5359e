"""Ray Tune callback that mirrors every trial into MLflow (driver side, idempotent)."""
from __future__ import annotations

import warnings
from ray import tune

from mlflow_server.tracking import SearchLogger
from tune.results import trial_metrics
from tune.space import block_bits, trial_label, trial_params


class MlflowTrialCallback(tune.Callback):
    def __init__(self, settings):
        self.settings = settings
        self.uri, self.experiment, self.experiment_path = settings.tracking_store, settings.experiment, settings.path
        self._runs: dict[str, str] = {}
        self._logger: SearchLogger | None = None
        self._offline = False

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_logger"], d["_offline"] = None, False  # a resumed search tries the server again
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

    def setup(self, **info):
        self._safe(lambda: self._lg().log_search(self.settings.to_dict()))

    def _run(self, trial) -> str:
        rid = self._runs.get(trial.trial_id)
        if rid is None:
            params = trial_params(trial.config, self.settings)
            rid = self._lg().child_run(trial.trial_id, trial_label(params))
            self._lg().log_trial_params(rid, params)
            self._runs[trial.trial_id] = rid
        return rid

    def on_trial_start(self, iteration, trials, trial, **info):
        self._safe(self._run, trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._safe(lambda: self._lg().log_metrics(self._run(trial), *trial_metrics(result)))

    def on_trial_complete(self, iteration, trials, trial, **info):
        ck = trial.checkpoint

        def finish():
            final, step = trial_metrics(trial.last_result or {})
            if ck is None:
                return self._lg().finish_trial(self._run(trial), final, None, step=step)
            with ck.as_directory() as d:  # local for a local experiment, downloaded from S3 otherwise
                self._lg().finish_trial(self._run(trial), final, d, step=step)
        self._safe(finish)

    def on_trial_error(self, iteration, trials, trial, **info):
        def failed():
            final, step = trial_metrics(trial.last_result or {})
            self._lg().finish_trial(self._run(trial), final, None, "FAILED", step=step)
        self._safe(failed)


class ProgressCallback(tune.Callback):
    """One line on stderr per finished or failed trial (the searches run with Ray's own output off)."""

    def __init__(self, total: int | None = None):
        self.total, self.done = total, 0

    def on_trial_complete(self, iteration, trials, trial, **info):
        import sys
        self.done += 1
        r, c = trial.last_result or {}, trial.config
        desc = " ".join(f"{k}={c[k]}" for k in ("w_bits", "a_bits", "method") if k in c)
        if block_bits(c):
            bits = block_bits(c).values()
            desc += f" block_w_bits={min(bits)}..{max(bits)}"
        val, mb = r.get("val_top1"), r.get("comp_mb")
        of = f"/{self.total}" if self.total else ""
        how = "done" if r.get("final") else "stopped early"
        print(f"trial {trial.trial_id} {how} ({self.done}{of}): {desc}  val {val if val is None else round(val, 2)}%  "
              f"{mb if mb is None else round(mb, 4)} MB", file=sys.stderr, flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        import sys
        print(f"trial {trial.trial_id} failed: see {trial.local_path}/error.txt", file=sys.stderr, flush=True)
