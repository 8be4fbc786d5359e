"""Logging to MLflow: one parent run per search, one child run per trial, baseline runs.

Trial runs are written from the driver (a Ray Tune callback), so workers need no MLflow access.
Each child run carries the tag ``bitsearch.trial_id``: logging is idempotent, so `bitsearch sync`
(or a resumed search) fills in what a dropped server missed without duplicating runs.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import time
import warnings
from pathlib import Path
from typing import Any

import requests

# mlflow is imported where a store is used: trial workers import this module (fetch_artifact of a local
# path, the store's default address) and mlflow is slow to import.

ARTIFACTS_DIR = "mlartifacts"  # next to an embedded store's mlflow.db: every artifact stays under the search's --out
TRIAL_TAG = "bitsearch.trial_id"
SEARCH_TAG = "bitsearch.experiment_path"
OUTCOME_TAG = "bitsearch.outcome"
# a closed trial run's outcome tag -> its MLflow status. A trial that ASHA stopped early ended as planned (FINISHED,
# named "... (stopped early)"): the UI draws KILLED and FAILED alike with its failure mark
OUTCOMES = {"done": "FINISHED", "stopped": "FINISHED", "failed": "FAILED"}
STOPPED_SUFFIX = " (stopped early)"
SHARED_VIEW_TAG = "mlflow.sharedViewState."  # the MLflow UI's own prefix for a shared experiment-page view
INTERRUPTED = "interrupted"  # the outcome of a trial in flight when its search was interrupted (it resumes)


def runs_view_route(experiment_id: str, share_key: str | None = None) -> str:
    """The UI route of an experiment's runs: with ``share_key`` (SearchLogger.share_view), the search's
    trials in the chart view with its parallel-coordinates chart."""
    route = f"#/experiments/{experiment_id}/runs"
    return f"{route}?compareRunsMode=CHART&viewStateShareKey={share_key}" if share_key else route


class TrackingError(RuntimeError):
    pass


def short_retries() -> None:
    """Client settings for a search's driver: a tracking server that goes away mid-search must not
    stall it in retries; MLflow does not print "View run / View experiment at" for every run it
    closes (bitsearch prints the experiment's runs-table address once, at the end), nor progress bars
    for artifact transfers, nor its database-creation log lines."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for name in ("mlflow.store.db.utils",                      # "Creating initial MLflow database tables"
                 "mlflow.store.model_registry.abstract_store"):  # "Waiting up to 300 seconds for model version"
        logging.getLogger(name).setLevel(logging.WARNING)


def mlflow_version() -> str:
    import mlflow
    return mlflow.__version__


def default_tracking_uri(out_dir: str | Path) -> str:
    """The embedded store: SQLite next to the search's results."""
    return f"sqlite:///{Path(out_dir).resolve() / 'mlflow.db'}"


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Raise TrackingError unless an http(s) tracking server answers /health."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        r = requests.get(uri.rstrip("/") + "/health", timeout=timeout)
        ok = r.status_code == 200
    except requests.RequestException as e:
        raise TrackingError(f"MLflow tracking server {uri} is unreachable ({type(e).__name__}); start it with "
                            "`bitsearch server` or pass another --tracking-uri") from None
    if not ok:
        raise TrackingError(f"MLflow tracking server {uri} answered /health with HTTP {r.status_code}")


def is_artifact_uri(path: str | Path) -> bool:
    """An MLflow artifact URI (``runs:/<run_id>/checkpoint.pt``, ``mlflow-artifacts:/...``, ``s3://...``)."""
    p = str(path)
    return "://" in p or p.startswith("runs:/")


def fetch_artifact(path: str | Path, tracking_uri: str | None = None) -> str:
    """A local path for a file: a path as is, or an MLflow artifact URI downloaded once."""
    p = str(path)
    if not is_artifact_uri(p):
        return p
    import mlflow.artifacts
    return mlflow.artifacts.download_artifacts(artifact_uri=p, tracking_uri=tracking_uri)


def _client(uri: str):
    from mlflow.tracking import MlflowClient
    return MlflowClient(tracking_uri=uri)


def embedded_artifact_root(uri: str) -> Path | None:
    """For an embedded SQLite store (``sqlite:///DIR/mlflow.db``): DIR/mlartifacts, else None (a server
    decides where artifacts go)."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):]).parent / ARTIFACTS_DIR


def ensure_experiment(uri: str, name: str, artifact_location: str | None = None) -> str:
    """The experiment's id, created if needed. With an embedded store its artifacts go to
    DIR/mlartifacts/NAME beside the database (not ./mlruns of the current directory)."""
    c = _client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    root = embedded_artifact_root(uri)
    if artifact_location is None and root is not None:
        artifact_location = (root / name).resolve().as_uri()
    return c.create_experiment(name, artifact_location=artifact_location)


def _flat_params(cfg: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in cfg.items():
        if k.startswith("_"):
            continue
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat_params(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
    return out


def _numeric(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}


def log_metrics(client, run_id: str, metrics: dict[str, Any], step: int) -> None:
    """Every numeric metric in one request (MLflow's log_batch), not one call per metric."""
    from mlflow.entities import Metric
    ts = int(time.time() * 1000)
    batch = [Metric(k, v, ts, step) for k, v in _numeric(metrics).items()]
    for i in range(0, len(batch), 1000):  # the server's per-request limit
        client.log_batch(run_id, metrics=batch[i:i + 1000])


BASELINES_EXPERIMENT = "bitsearch-baselines"
SENSITIVITY_TAG = "bitsearch.sensitivity"


def log_sensitivity(uri: str, baseline: str, table: dict[str, Any]) -> str:
    """A sensitivity table (JSON, CSV, plot) in MLflow with its baseline: under ``sensitivity/`` of the
    baseline's own run when the baseline is a ``runs:/<id>/...`` URI, else in a run of its own in the
    baselines experiment (tags: the baseline path, the table's cache key). Idempotent: the same table
    goes to the same run. Returns the run id."""
    check_reachable(uri)
    short_retries()
    c = _client(uri)
    key = Path(table["file"]).stem
    m = re.match(r"runs:/([0-9a-f]+)/", str(baseline))
    own = m is None
    if m:
        run_id = m.group(1)
    else:
        exp = ensure_experiment(uri, BASELINES_EXPERIMENT)
        found = c.search_runs([exp], filter_string=f"tags.`{SENSITIVITY_TAG}` = '{key}'", max_results=1)
        if found:
            run_id = found[0].info.run_id
        else:
            run_id = c.create_run(exp, run_name=f"sensitivity-{Path(str(baseline)).parent.name}",
                                  tags={"bitsearch.kind": "sensitivity", SENSITIVITY_TAG: key,
                                        "bitsearch.baseline": str(baseline)}).info.run_id
            from mlflow.entities import Param
            params = {"estimator": table["estimator"], "images": table["images"], "layers": len(table["layers"]),
                      **_flat_params(table.get("data") or {}, "data.")}
            c.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
    log_metrics(c, run_id, {f"sensitivity_{k}": table.get(k) for k in ("seconds", "spearman_loss_vs_hessian",
                                                                       "fp32_val_loss")}, 0)
    f = Path(table["file"])
    for part in (f, f.with_suffix(".csv"), f.with_suffix(".png")):
        if part.is_file():
            c.log_artifact(run_id, str(part), artifact_path="sensitivity")
    if own:
        c.set_terminated(run_id)
    return run_id


class SearchLogger:
    """Parent run + idempotent child runs. Holds only strings, so it pickles with the Tune experiment."""

    def __init__(self, uri: str, experiment_name: str, experiment_path: str, artifact_location: str | None = None):
        self.uri, self.experiment_name, self.experiment_path = uri, experiment_name, experiment_path
        self.experiment_id = ensure_experiment(uri, experiment_name, artifact_location)
        self.parent_run_id = self._parent()

    def _parent(self) -> str:
        c = _client(self.uri)
        runs = c.search_runs([self.experiment_id], f"tags.`{SEARCH_TAG}` = '{self.experiment_path}'", max_results=1)
        if runs:
            return runs[0].info.run_id
        run = c.create_run(self.experiment_id, run_name=Path(self.experiment_path).name,
                           tags={SEARCH_TAG: self.experiment_path, "bitsearch.kind": "search"})
        return run.info.run_id

    def log_search(self, settings: dict[str, Any]) -> None:
        from mlflow.entities import Param
        c = _client(self.uri)
        have = c.get_run(self.parent_run_id).data.params
        params = [Param(k, v[:6000]) for k, v in list(_flat_params(settings).items())[:100] if k not in have]
        if params:
            c.log_batch(self.parent_run_id, params=params)

    def trial_run(self, trial_id: str) -> str | None:
        """The run of a trial of this search, or None."""
        runs = _client(self.uri).search_runs([self.experiment_id], f"tags.`{TRIAL_TAG}` = '{trial_id}' and "
                                             f"tags.`mlflow.parentRunId` = '{self.parent_run_id}'", max_results=1)
        return runs[0].info.run_id if runs else None

    def child_run(self, trial_id: str, trial_name: str) -> str:
        rid = self.trial_run(trial_id)
        if rid is not None:
            c = _client(self.uri)
            run = c.get_run(rid)
            if run.data.tags.get(OUTCOME_TAG) == INTERRUPTED:  # `bitsearch resume` continues the trial: reopen it
                c.delete_tag(rid, OUTCOME_TAG)
                c.update_run(rid, status="RUNNING")
            return rid
        c = _client(self.uri)
        return c.create_run(self.experiment_id, run_name=trial_name,
                            tags={TRIAL_TAG: trial_id, "mlflow.parentRunId": self.parent_run_id,
                                  "bitsearch.kind": "trial"}).info.run_id

    def log_trial_params(self, run_id: str, config: dict[str, Any]) -> None:
        from mlflow.entities import Param
        c = _client(self.uri)
        have = c.get_run(run_id).data.params
        params = [Param(k, v) for k, v in _flat_params(config).items() if k not in have]
        if params:
            c.log_batch(run_id, params=params)

    def log_metrics(self, run_id: str, metrics: dict[str, Any], step: int) -> None:
        log_metrics(_client(self.uri), run_id, metrics, step)

    def is_complete(self, run_id: str) -> bool:
        """The trial run is closed: final metrics and artifacts written (or its stop or failure noted), once.
        An interrupted trial's run is not: the trial resumes."""
        return _client(self.uri).get_run(run_id).data.tags.get(OUTCOME_TAG, INTERRUPTED) != INTERRUPTED

    def interrupt_search(self, note: str) -> int:
        """The search was interrupted: its open trial runs (in flight) end KILLED with outcome "interrupted",
        the parent KILLED with ``note``; nothing is registered. Returns how many trial runs were open."""
        c = _client(self.uri)
        n = self.close_open_trials(INTERRUPTED)
        c.set_tag(self.parent_run_id, "mlflow.note.content", note)
        c.set_terminated(self.parent_run_id, "KILLED")
        return n

    def close_open_trials(self, outcome: str) -> int:
        """End the search's trial runs still open (in flight when the driver stopped): ``interrupted`` (KILLED:
        they resume) or ``stopped`` (FINISHED, named so: the time budget ran out). Returns how many."""
        c = _client(self.uri)
        runs = c.search_runs([self.experiment_id], f"tags.`mlflow.parentRunId` = '{self.parent_run_id}'",
                             max_results=5000)
        open_runs = [r.info.run_id for r in runs if OUTCOME_TAG not in r.data.tags]
        for rid in open_runs:
            if outcome == INTERRUPTED:
                c.set_tag(rid, OUTCOME_TAG, INTERRUPTED)
                c.set_terminated(rid, "KILLED")
            else:
                self.finish_trial(rid, None, outcome)
        return len(open_runs)

    def search_finished(self) -> bool:
        return _client(self.uri).get_run(self.parent_run_id).info.status == "FINISHED"

    def finish_trial(self, run_id: str, artifacts_dir: str | None, outcome: str = "done") -> None:
        """Close a trial run once; its metrics were logged report by report (each once per step).
        done: its artifacts, tag bitsearch.complete=1. stopped (ASHA stopped it early: the run's name says
        so) and failed: only what it measured until then, so a stopped trial cannot pass for a finished
        one. Every closed run has the tag bitsearch.outcome = done | stopped | failed to filter on."""
        c = _client(self.uri)
        if self.is_complete(run_id):
            return
        if outcome == "done":
            if artifacts_dir and Path(artifacts_dir).is_dir():
                c.log_artifacts(run_id, artifacts_dir, artifact_path="trial")
            c.set_tag(run_id, "bitsearch.complete", "1")
        elif outcome == "stopped":
            name = c.get_run(run_id).info.run_name or ""
            if not name.endswith(STOPPED_SUFFIX):
                c.set_tag(run_id, "mlflow.runName", name + STOPPED_SUFFIX)
        c.set_tag(run_id, OUTCOME_TAG, outcome)
        c.set_terminated(run_id, OUTCOMES[outcome])

    def logged_steps(self, run_id: str, key: str) -> set[int]:
        """The steps at which ``key`` has been logged to the run."""
        return {m.step for m in _client(self.uri).get_metric_history(run_id, key)}

    def drop_orphans(self, trial_ids: set[str]) -> int:
        """Delete this search's unclosed trial runs whose trial is not one of ``trial_ids``: a driver killed
        just after starting a trial opened its run, but the saved state `resume` continues from never held
        that trial (tune/results.py). Deleted runs leave the UI's table (MLflow keeps them as deleted)."""
        c = _client(self.uri)
        runs = c.search_runs([self.experiment_id], f"tags.`mlflow.parentRunId` = '{self.parent_run_id}'",
                             max_results=5000)
        gone = [r.info.run_id for r in runs
                if r.data.tags.get(TRIAL_TAG) not in trial_ids and OUTCOME_TAG not in r.data.tags]
        for rid in gone:
            c.delete_run(rid)
        return len(gone)

    def share_view(self, params: list[str], metrics: list[str]) -> str:
        """The MLflow UI view of this search's trials, stored in the experiment the way the UI's own "share"
        button stores one (tag ``mlflow.sharedViewState.<key>``, plain JSON): the trials in the chart view,
        all of them shown, one parallel-coordinates chart with ``params`` and ``metrics`` as axes. Returns
        its key (the parent run's id) for ``runs_view_route``."""
        key = self.parent_run_id
        section = f"bitsearch-{key[:8]}"
        state = {
            # a filter and an order other than start time: the UI lists the trials flat (their parent, nesting
            # them, would hide them from the chart), best validation top-1 first
            "searchFilter": f"tags.`mlflow.parentRunId` = '{key}'", "orderByKey": "metrics.`val_top1`",
            "orderByAsc": False,
            "runsHiddenMode": "SHOW_ALL", "hideEmptyCharts": True, "isAccordionReordered": True,
            "compareRunSections": [{"uuid": section, "name": "bitsearch search", "display": True, "isReordered": True}],
            "compareRunCharts": [{"uuid": f"{section}-parallel", "type": "PARALLEL", "metricSectionId": section,
                                  "runsCountToCompare": 100, "deleted": False, "isGenerated": False,
                                  "displayName": "trials: bits, size and validation top-1", "showAllRuns": True,
                                  "selectedParams": list(params), "selectedMetrics": list(metrics)}],
        }
        _client(self.uri).set_experiment_tag(self.experiment_id, f"{SHARED_VIEW_TAG}{key}", json.dumps(state))
        return key

    def tag_search(self, tags: dict[str, str]) -> None:
        c = _client(self.uri)
        for k, v in tags.items():
            c.set_tag(self.parent_run_id, k, v)

    def finish_search(self, artifacts: list[str], status: str = "FINISHED", metrics: dict[str, Any] | None = None,
                      note: str | None = None) -> None:
        """Close the parent run: the search's result files, its summary ``metrics`` (the best trial's),
        and ``note`` (markdown: the run's description in the UI)."""
        c = _client(self.uri)
        for a in artifacts:
            if Path(a).exists():
                c.log_artifact(self.parent_run_id, a)
        if metrics:
            self.log_metrics(self.parent_run_id, metrics, step=0)
        if note:
            c.set_tag(self.parent_run_id, "mlflow.note.content", note)
        c.set_terminated(self.parent_run_id, status)


class TrainRunLogger:
    """trainer Callback: the baseline training as an MLflow run (params, per-epoch metrics, reports)."""

    def __init__(self, uri: str, run_name: str, experiment: str = BASELINES_EXPERIMENT):
        check_reachable(uri)
        self.uri, self.run_name, self.experiment = uri, run_name, experiment
        self.run_id = None

    def on_train_start(self, state):
        c = _client(self.uri)
        exp = ensure_experiment(self.uri, self.experiment)
        self.run_id = c.create_run(exp, run_name=self.run_name, tags={"bitsearch.kind": "baseline"}).info.run_id
        from mlflow.entities import Param
        flat = _flat_params({**state["config"].to_dict(), "data": state.get("data", {})})
        c.log_batch(self.run_id, params=[Param(k, v[:6000]) for k, v in flat.items()])

    def on_epoch_end(self, epoch, m, state):
        try:
            log_metrics(_client(self.uri), self.run_id, m, int(m["epoch"]))
        except Exception as e:  # the run goes on; the checkpoint is the source of truth
            warnings.warn(f"MLflow logging failed: {e}")

    def on_train_end(self, result):
        c = _client(self.uri)
        log_metrics(c, self.run_id, {f"final_{k}": result.get(k) for k in ("top1", "train_top1")}, 0)
        for p in (result.get("reports") or {}).values():
            c.log_artifact(self.run_id, p)
        if result.get("checkpoint"):
            c.log_artifact(self.run_id, result["checkpoint"])
        c.set_terminated(self.run_id)
