"""One trial, one object: what a trial's worker ran, its MLflow run, its row in the results and its labels
agree field by field, in every kind of search (real Ray, the embedded MLflow store, a tiny model)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import tiny_baseline

pytestmark = pytest.mark.slow

# mode -> (search settings, what the mode must exercise)
MODES = {
    "ptq": dict(space={"w_bits": [2, 8], "a_bits": [4, 8], "method": ["ptq"]}),
    "qat": dict(space={"w_bits": [4, 8], "method": ["qat"], "qat_lr": {"low": 0.001, "high": 0.05, "log": True}}),
    "lsq-kd": dict(space={"w_bits": [4, 8], "method": ["lsq"], "kd_weight": [0.3, 0.6]}),
    "qat-fixed-kd": dict(space={"w_bits": [4, 8], "method": ["qat"]}, kd_weight=0.5, qat_lr=0.02),
    # the method fixed by the base config, not sampled: the fine-tuning keys must still be sampled and shown
    "qat-base": dict(space={"w_bits": [4, 8], "qat_lr": {"low": 0.001, "high": 0.05, "log": True}},
                     quant_base={"method": "qat"}),
    "mixed": dict(space={"block_w_bits": [4, 8], "a_bits": [6, 8], "method": ["ptq"]}),
    "budget": dict(space={"method": ["ptq"]}),  # size_budget_mb added below, from the tiny model's sizes
    "sweep": dict(mode="sweep", grid={"w_bits": [4], "a_bits": [6], "method": ["qat"]}),
}


@pytest.fixture(scope="module")
def ray_local():
    import ray
    ray.init(num_cpus=2, object_store_memory=150 * 1024 * 1024, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("spec")
    tree, ck = tiny_baseline(root, epochs=1)
    return tree, ck, root


def _budget_space(tree, ck, root) -> dict:
    """A sensitivity table of the tiny baseline and a budget range between its W2 and W8 sizes."""
    from bitsearch.cli import main
    from pipeline import load_baseline, packed_meta, prepare_quantized
    from quantization import QuantConfig
    assert main(["sensitivity", "--baseline", str(ck), "--data", str(tree), "--estimator", "hessian", "--images", "9",
                 "--no-download"]) == 0
    table = next(Path(ck).parent.glob("sensitivity-*.json"))
    fp32, c = load_baseline(ck)
    mb = {b: prepare_quantized(fp32, QuantConfig(w_bits=b), packed_meta(c)).size["comp_mb"] for b in (2, 8)}
    return {"space": {"method": ["ptq"], "size_budget_mb": [round(mb[2] * 1.3, 4), round(mb[8], 4)]},
            "sensitivity": str(table)}


def _worker_record(trial_dir: Path) -> dict:
    """What the worker itself wrote down of the trial it ran: the pipeline's quantize.json."""
    return json.loads((trial_dir / "work" / "final" / "quantize.json").read_text())


def _mlflow(out: Path, trial_id: str):
    from mlflow.tracking import MlflowClient
    c = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    exp = c.get_experiment_by_name("bitsearch")
    (run,) = c.search_runs([exp.experiment_id], f"tags.`bitsearch.trial_id` = '{trial_id}'")
    for key in run.data.metrics:  # each metric once per step (the final report used to repeat the last epoch's)
        steps = [m.step for m in c.get_metric_history(run.info.run_id, key)]
        assert len(steps) == len(set(steps)), (key, steps)
    return run.data.params, run.info.run_name


@pytest.mark.parametrize("mode", list(MODES))
def test_trial_settings_agree(mode, base, ray_local, tmp_path):
    from tune.search import run
    from tune.settings import settings_from

    tree, ck, root = base
    d = dict(baseline=str(ck), data=str(tree), out=str(tmp_path), batch_size=16, device="cpu", max_concurrent=1,
             num_samples=1, qat_epochs=1, name=mode, **MODES[mode])
    if mode == "budget":
        d.update(_budget_space(tree, ck, root))
    s = settings_from(d)
    summary = run(s, num_cpus=2)
    (row,) = summary["trials"]
    assert row["status"] == "done", row
    tid = row["trial_id"]
    ran = _worker_record(tmp_path / mode / tid)
    params, run_name = _mlflow(tmp_path, tid)
    sampled = json.loads((tmp_path / mode / tid / "params.json").read_text())
    spec = json.loads((tmp_path / mode / tid / "work" / "final" / "trial.json").read_text())

    # the method and what it fine-tuned with
    method = ran["method"]
    assert params["method"] == row["method"] == method == spec["quant"]["method"]
    fine_tunes = method in ("qat", "lsq")
    assert (ran["qat_epochs"] > 0) == fine_tunes and bool(ran["history"]) == fine_tunes
    if fine_tunes:
        assert float(params["qat_epochs"]) == ran["qat_epochs"] and float(params["qat_lr"]) == ran["qat_lr"]
        assert float(params["kd_weight"]) == ran["kd_weight"]
        assert row["lr"] == ran["qat_lr"] and row["qat_epochs"] == ran["qat_epochs"]
        assert f"lr={ran['qat_lr']:.2g}" in run_name
        assert (f"kd={ran['kd_weight']:.2g}" in run_name) == (ran["kd_weight"] > 0)
        assert ran["kd_temperature"] == (s.kd_temperature if ran["kd_weight"] > 0 else None)
        for key in set(s.space if s.mode == "search" else ()) & {"qat_lr", "kd_weight"}:  # sampled = what ran
            assert sampled[key] == pytest.approx(ran[key]), key
    else:
        assert row.get("lr") is None and "lr=" not in run_name and ran["qat_lr"] == 0.0
        assert not {"qat_epochs", "qat_lr", "kd_weight"} & set(params)  # not run with: not logged (not 0)

    # the bit-widths
    assert int(params["a_bits"]) == row["a_bits"] == ran["a_bits"]
    assert params["granularity"] == row["granularity"] == ran["granularity"]
    blocks = sorted(k for k in sampled if k.startswith("w_bits_b"))
    if mode == "mixed":
        assert blocks and all(int(params[k]) == row[k] == sampled[k] for k in blocks)
        ran_blocks = {o["pattern"]: o["w_bits"] for o in ran["config"]["overrides"]}
        assert [ran_blocks[f"blocks.{int(k[-2:])}.*"] for k in blocks] == [sampled[k] for k in blocks]
        lo, hi = min(sampled[k] for k in blocks), max(sampled[k] for k in blocks)
        assert row["w_bits"] == f"mixed {lo}-{hi}" and run_name.startswith(f"W{lo}-{hi}A{ran['a_bits']} ")
        assert float(params["w_bits"]) == pytest.approx(sum(sampled[k] for k in blocks) / len(blocks), abs=0.01)
    elif mode == "budget":
        assert not blocks and "w_bits" not in params and ran["config"]["overrides"]
        assert row["w_bits"] == f"alloc {ran['avg_w_bits']:.2f}"
        assert run_name.startswith(f"alloc {sampled['size_budget_mb']:.3g}MB A{ran['a_bits']} {method}")
        assert ran["comp_mb"] <= sampled["size_budget_mb"]
    else:
        assert int(params["w_bits"]) == row["w_bits"] == ran["w_bits"]
        assert run_name.startswith(f"W{ran['w_bits']}A{ran['a_bits']} {method}")
    assert spec["label"] == row["label"] == run_name  # the run name, the table's, the report's and the plots' label
    assert row["comp_mb"] == ran["comp_mb"] and row["val_top1"] == ran["val_top1"]
