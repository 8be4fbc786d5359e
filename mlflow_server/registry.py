"""The MLflow Model Registry: a search's chosen models, loadable with ``mlflow.pyfunc.load_model``.

Every Pareto-front trial of a search becomes a version of one registered model (``EXPERIMENT-NAME``,
the MLflow experiment and the search's name). A version is an MLflow pyfunc model logged under the
trial's run (``model/``): the packed ``.bsq`` file and its ``quantize.json`` (config and metrics);
``mlflow.pyfunc.load_model("models:/NAME@champion")`` predicts CIFAR-10 classes from uint8 images
[N, 3, 32, 32] wherever bitsearch is installed (its code reads the packed file). The code is not
copied into the model: MLflow would put that copy first on sys.path and drop the already imported
modules of the same name, which breaks a process that uses bitsearch itself. The best version within the
search's size budget (highest validation top-1; test top-1 is never used to choose) carries the
alias ``champion``. Registering is idempotent: a trial already registered is not registered again.
"""
from __future__ import annotations

import re
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

# mlflow (and torch, for the model's requirements) are imported where a model is registered: mlflow is
# slow to import, and the search's driver imports this module before it registers anything.

TRIAL_TAG = "bitsearch.trial_id"
CHAMPION = "champion"


def model_name(experiment: str, search_name: str) -> str:
    """The registered model of a search: ``EXPERIMENT-NAME`` with characters MLflow dislikes replaced."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{experiment}-{search_name}")


def _log_pyfunc(client, run_id: str, packed: Path, quantize_json: Path | None) -> str:
    """Save the pyfunc model (mlflow_server/pyfunc_model.py, as code: nothing pickled) locally, upload it
    as the run's ``model/`` artifact; its artifact URI."""
    import mlflow.pyfunc
    import torch
    from mlflow.models import infer_signature

    artifacts = {"packed": str(packed)}
    if quantize_json is not None and quantize_json.is_file():
        artifacts["quantize_config"] = str(quantize_json)
    example = np.zeros((2, 3, 32, 32), dtype=np.uint8)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # MLflow's advice on type hints and input examples
        dest = Path(tmp) / "model"
        mlflow.pyfunc.save_model(
            path=str(dest), python_model=str(Path(__file__).with_name("pyfunc_model.py")), artifacts=artifacts,
            signature=infer_signature(example, np.zeros(2, dtype=np.int64)),
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}"])
        client.log_artifacts(run_id, str(dest), artifact_path="model")
    return client.get_run(run_id).info.artifact_uri.rstrip("/") + "/model"


def _rounded(v: Any, digits: int = 2) -> str:
    """A figure as a tag or description shows it: 91.67, not 91.66666412353516 (integers and text as they are)."""
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def register_search(uri: str, experiment: str, search_name: str, trials: list[dict[str, Any]],
                    run_ids: dict[str, str], budget_mb: float | None,
                    answer: tuple[str, str] | None = None) -> dict[str, Any]:
    """Register ``trials`` (Pareto-front rows of a search summary with the trial's ``checkpoint`` dir)
    as versions of the search's model; alias ``champion`` on the best within ``budget_mb``, or on the trial
    ``answer`` = (trial id, the rule that chose it) names.
    ``run_ids`` maps trial id -> its MLflow run. Returns {registered_model, versions, champion_version,
    champion_trial}."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=uri, registry_uri=uri)
    name = model_name(experiment, search_name)
    within = f"within the size budget of {budget_mb:g} MB" if budget_mb is not None else "(the search had no size budget)"
    rule = answer[1] if answer else f"the best validation top-1 {within}"
    about = (f"bitsearch: the Pareto-front models of search {search_name!r} (experiment {experiment!r}); alias "
             f"{CHAMPION!r} = {rule}")
    try:
        c.get_registered_model(name)
        c.update_registered_model(name, description=about)
    except MlflowException:
        c.create_registered_model(name, description=about)
    have = {v.tags.get(TRIAL_TAG): v.version for v in c.search_model_versions(f"name = '{name}'")}
    versions: dict[str, str] = {}
    for t in trials:
        tid, ck, rid = t["trial_id"], t.get("checkpoint"), run_ids.get(t["trial_id"])
        if tid in have:
            versions[tid] = have[tid]
            continue
        if not ck or rid is None or not (Path(ck) / "model.bsq").is_file():
            continue
        source = _log_pyfunc(c, rid, Path(ck) / "model.bsq", Path(ck) / "quantize.json")
        tags = {TRIAL_TAG: tid, **{k: _rounded(t[k]) for k in ("label", "w_bits", "a_bits", "method", "val_top1",
                                                               "test_top1", "comp_mb", "ratio") if t.get(k) is not None}}
        v = c.create_model_version(name, source=source, run_id=rid, tags=tags,
                                   description=f"trial {tid} ({t.get('label')}): val top-1 {_rounded(t.get('val_top1'))}%, "
                                               f"test top-1 {_rounded(t.get('test_top1'))}%, "
                                               f"{_rounded(t.get('comp_mb'), 4)} MB packed")
        versions[tid] = v.version
    fits = [t for t in trials if t["trial_id"] in versions and t.get("val_top1") is not None
            and (budget_mb is None or (t.get("comp_mb") or float("inf")) <= budget_mb)]
    out = {"registered_model": name, "versions": {k: int(v) for k, v in versions.items()},
           "champion_version": None, "champion_trial": None}
    if answer:  # the search named its answer (a max-drop search: the smallest model within the drop)
        fits = [t for t in fits if t["trial_id"] == answer[0]] if budget_mb is None else []
    if fits:
        best = max(fits, key=lambda t: (t["val_top1"], -(t.get("comp_mb") or 0)))
        c.set_registered_model_alias(name, CHAMPION, versions[best["trial_id"]])
        out.update(champion_version=int(versions[best["trial_id"]]), champion_trial=best["trial_id"])
    return out

