"""Per-layer sensitivity, the exact bit allocator and their commands (issue 11)."""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from bitsearch.cli import main
from conftest import make_tree, tiny_baseline

# a few layers keep these tests fast: blocks 0 and 1 (5 convs) are allocated, the rest stays FP32
FEW = {"keep_fp32": ["stem.conv", "classifier", "head.conv", "blocks.[2-9].*", "blocks.1[0-9].*"]}


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    root = tmp_path_factory.mktemp("sens")
    tree, ckpt = tiny_baseline(root, epochs=6, val_size=15)
    cfg = root / "few.yaml"
    cfg.write_text(yaml.safe_dump({"quantize": FEW}))
    return tree, ckpt, cfg


def _last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_solve_is_exact_against_brute_force():
    from pipeline.sensitivity import solve
    rng = np.random.default_rng(0)
    for trial in range(30):
        layers = [f"l{i}" for i in range(4)]
        bits = (2, 4, 8)
        costs = {n: {b: int(rng.integers(10, 40)) * b for b in bits} for n in layers}
        scores = {n: {b: float(rng.random()) / b for b in bits} for n in layers}
        cap = int(rng.integers(100, 600))
        best = None
        for combo in itertools.product(bits, repeat=len(layers)):
            c = sum(costs[n][b] for n, b in zip(layers, combo))
            s = sum(scores[n][b] for n, b in zip(layers, combo))
            if c <= cap and (best is None or s < best[0] - 1e-12):
                best = (s, combo)
        got = solve(scores, costs, cap)
        if best is None:
            assert got is None
            continue
        bits_got, score = got
        assert sum(costs[n][b] for n, b in bits_got.items()) <= cap
        assert score == pytest.approx(best[0]) and sum(scores[n][bits_got[n]] for n in layers) == pytest.approx(best[0])


def test_spearman_matches_a_hand_computed_case():
    from pipeline.sensitivity import spearman
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(3 / 10 ** 0.5)  # tie: both at the average rank


def test_weight_error_shrinks_with_bits(trained):
    from pipeline.sensitivity import allocatable_layers, weight_errors
    from quantization import QuantConfig
    base = QuantConfig(**FEW)
    layers = allocatable_layers(trained, base)
    assert len(layers) == 5 and all(n.startswith(("blocks.0.", "blocks.1.")) for n in layers)
    errs = weight_errors(trained, base, layers)
    for n in layers:
        e = [errs[n][b] for b in (2, 3, 4, 5, 6, 8)]
        assert all(a > b for a, b in zip(e, e[1:])), (n, e)  # each extra bit halves the step
        assert e[-1] < e[0] / 100


def test_hutchinson_trace_matches_the_closed_form_of_the_classifier(trained, learnable_data):
    """For the last linear layer under cross-entropy the Hessian trace is known exactly:
    mean over images of sum_k p_k (1 - p_k) * ||h||^2 (h: the classifier's input). Hutchinson's
    estimate must agree within its sampling error."""
    import dataclasses

    import torch
    from pipeline.sensitivity import hessian_traces
    from trainer.data import normalize
    data = dataclasses.replace(learnable_data, val_x=learnable_data.test_x, val_y=learnable_data.test_y)
    feats = []
    hook = trained.classifier.register_forward_hook(lambda m, i, o: feats.append((i[0].detach(), o.detach())))
    with torch.no_grad():
        trained.eval()(normalize(data.val_x))
    hook.remove()
    h, z = feats[0]
    p = torch.softmax(z, 1)
    exact = float(((p * (1 - p)).sum(1) * (h ** 2).sum(1)).mean()) / trained.classifier.weight.numel()
    est = hessian_traces(trained, data, ["classifier"], images=60, batch_size=60, samples=1000)["classifier"]
    assert exact > 0 and abs(est - exact) < 0.2 * exact, (est, exact)


def test_sensitivity_command_caches_and_ranks_bits(baseline, capsys):
    tree, ck, cfg = baseline
    args = ["sensitivity", "--baseline", str(ck), "--data", str(tree), "--config", str(cfg), "--images", "15",
            "--estimator", "both", "--no-download", "--json"]
    assert main(args) == 0
    out = _last_json(capsys)
    assert out["cached"] is False and out["estimator"] == "both"
    assert Path(out["file"]).parent == ck.parent and Path(out["csv"]).is_file() and Path(out["plot"]).is_file()
    names = [r["name"] for r in out["layers"]]
    assert len(names) == 5
    for r in out["layers"]:
        assert set(r["w"]) == set(r["a"]) == {"2", "3", "4", "5", "6", "8"} and r["params"] > 0
        assert set(r["w_hessian"]) == set(r["w"])
    # 2-bit weights hurt more than 8-bit ones, summed over layers (one layer alone can be noise)
    # the measured score is the validation loss increase with only that layer quantized: recompute one
    # entry independently (this toy model is so robust that single-layer scores are ~1e-3 either way)
    from pipeline import load_baseline
    from quantization import QuantConfig, prepare
    from trainer import load_dataset
    from trainer.train import evaluate
    fp32, c = load_baseline(str(ck))
    data = load_dataset(tree, val_size=15, seed=0, download=False)
    name = names[1]
    q = prepare(fp32, QuantConfig(w_bits=32, a_bits=32, keep_fp32=[], overrides=[{"pattern": name, "w_bits": 3}]))
    want = evaluate(q, data.val_x, data.val_y)["loss"] - evaluate(fp32, data.val_x, data.val_y)["loss"]
    assert out["layers"][1]["w"]["3"] == pytest.approx(want, abs=1e-9)
    assert out["fp32_val_loss"] == pytest.approx(evaluate(fp32, data.val_x, data.val_y)["loss"], abs=1e-9)
    # Hessian scores: a fixed trace per layer times an error that shrinks with every bit
    for r in out["layers"]:
        mags = [abs(r["w_hessian"][b]) for b in ("2", "3", "4", "5", "6", "8")]
        assert all(a > b for a, b in zip(mags, mags[1:])), (r["name"], mags)
    from pipeline.sensitivity import spearman  # the reported figure is the table's own pairs, ranked
    pairs = [(r["w"][b], r["w_hessian"][b]) for r in out["layers"] for b in r["w"]]
    assert out["spearman_loss_vs_hessian"] == pytest.approx(spearman(*zip(*pairs)), abs=1e-12)
    # cached: the same table, no recomputation
    assert main(args) == 0
    again = _last_json(capsys)
    assert again["cached"] is True and again["file"] == out["file"] and again["layers"] == out["layers"]
    # a fine-tuning-only setting (how QAT treats BN) cannot change the table: still cached
    qat_cfg = cfg.with_name("few-bn.yaml")
    qat_cfg.write_text(yaml.safe_dump({"quantize": {**FEW, "bn_live_below_bits": 0}}))
    assert main([*args[:6], str(qat_cfg), *args[7:]]) == 0
    assert _last_json(capsys)["file"] == out["file"]
    # allocating from a table with both estimators uses the Hessian scores unless told otherwise
    assert main(["allocate", "--sensitivity", out["file"], "--budget-mb", "10", "--json"]) == 0
    assert _last_json(capsys)["estimator"] == "hessian"
    assert main(["allocate", "--sensitivity", out["file"], "--budget-mb", "10", "--estimator", "loss", "--json"]) == 0
    assert _last_json(capsys)["estimator"] == "loss"
    # another setting: another table
    assert main([*args[:-4], "--estimator", "hessian", "--no-download", "--json"]) == 0
    hess = _last_json(capsys)
    assert hess["file"] != out["file"]
    assert main(["allocate", "--sensitivity", hess["file"], "--budget-mb", "10", "--estimator", "loss"]) == 2
    err = capsys.readouterr().err
    assert "Hessian scores only" in err and len(err.strip().splitlines()) == 1
    assert main(["allocate", "--sensitivity", out["file"], "--budget-mb", "10", "--estimator", "max", "--json"]) == 0
    assert _last_json(capsys)["estimator"] == "max"


def test_weight_scores_choose_the_estimator_the_table_has():
    from pipeline.sensitivity import SensitivityError, weight_scores
    # layer a: loss says W2 is costly, Hessian says cheap; layer b the other way round; loss at W3 is
    # noise (negative, and above W2 for b): monotone makes every column non-increasing and >= 0
    rows = [{"name": "a", "w": {"2": 0.5, "3": -0.01, "8": 0.0}, "w_hessian": {"2": 0.01, "3": 0.002, "8": 0.0}},
            {"name": "b", "w": {"2": 0.02, "3": 0.03, "8": 0.001}, "w_hessian": {"2": 0.4, "3": 0.05, "8": 0.0}}]
    both = {"estimator": "both", "layers": rows}
    assert weight_scores(both) == ("hessian", {"a": {2: 0.01, 3: 0.002, 8: 0.0}, "b": {2: 0.4, 3: 0.05, 8: 0.0}})
    # a negative trace estimate scores by its magnitude (a measured loss decrease clamps to 0)
    neg = {"estimator": "both", "layers": [{"name": "c", "w": {"2": -0.1, "8": 0.0},
                                            "w_hessian": {"2": -0.02, "8": -0.0001}}]}
    assert weight_scores(neg) == ("hessian", {"c": {2: 0.02, 8: 0.0001}})
    assert weight_scores(neg, "loss") == ("loss", {"c": {2: 0.0, 8: 0.0}})
    assert weight_scores(both, "loss") == ("loss", {"a": {2: 0.5, 3: 0.0, 8: 0.0}, "b": {2: 0.02, 3: 0.02, 8: 0.001}})
    assert weight_scores(both, "max") == ("max", {"a": {2: 0.5, 3: 0.002, 8: 0.0}, "b": {2: 0.4, 3: 0.05, 8: 0.001}})
    only = [{"name": r["name"], "w": r["w_hessian"]} for r in rows]
    assert weight_scores({"estimator": "hessian", "layers": only})[0] == "hessian"
    assert weight_scores({"estimator": "loss", "layers": only})[0] == "loss"
    for est, table in (("hessian", "loss"), ("loss", "hessian"), ("max", "hessian"), ("max", "loss"), ("magic", "both")):
        with pytest.raises(SensitivityError):
            weight_scores({"estimator": table, "layers": only}, est)


def test_sensitivity_is_logged_to_mlflow_with_the_baseline(baseline, tmp_path, capsys):
    from mlflow.tracking import MlflowClient
    tree, ck, cfg = baseline
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["sensitivity", "--data", str(tree), "--config", str(cfg), "--images", "15", "--no-download",
            "--tracking-uri", uri, "--json"]
    # a local baseline: a run of its own in the baselines experiment, the same run when logged again
    assert main([*args, "--baseline", str(ck)]) == 0
    first = _last_json(capsys)
    assert main([*args, "--baseline", str(ck)]) == 0
    again = _last_json(capsys)
    assert again["cached"] is True and again["mlflow_run_id"] == first["mlflow_run_id"]
    c = MlflowClient(tracking_uri=uri)
    run = c.get_run(first["mlflow_run_id"])
    assert run.data.tags["bitsearch.kind"] == "sensitivity" and run.data.tags["bitsearch.baseline"] == str(ck)
    assert c.get_experiment(run.info.experiment_id).name == "bitsearch-baselines"
    assert run.data.params["estimator"] == "loss" and run.data.metrics["sensitivity_fp32_val_loss"] > 0
    names = {Path(f.path).name for f in c.list_artifacts(run.info.run_id, "sensitivity")}
    assert names == {Path(first["file"]).name, Path(first["csv"]).name, Path(first["plot"]).name}
    # a baseline that lives in MLflow: the table goes into that baseline's run
    from mlflow_server.tracking import ensure_experiment
    exp = ensure_experiment(uri, "trained")  # artifacts beside the database, not ./mlruns of the working directory
    base_run = c.create_run(exp).info.run_id
    c.log_artifact(base_run, str(ck))
    assert main([*args, "--baseline", f"runs:/{base_run}/checkpoint.pt"]) == 0
    out = _last_json(capsys)
    assert out["mlflow_run_id"] == base_run
    logged = {Path(f.path).name for f in c.list_artifacts(base_run, "sensitivity")}
    assert Path(out["file"]).name in logged and len(logged) == 3
    # the downloaded table is the same scores as the local one (same weights, same data)
    table = json.loads((Path(c.download_artifacts(base_run, f"sensitivity/{Path(out['file']).name}", str(tmp_path)))).read_text())
    assert [r["w"] for r in table["layers"]] == [r["w"] for r in first["layers"]]


def test_allocate_fits_the_budget_exactly_and_quantize_reproduces_the_size(baseline, tmp_path, capsys):
    tree, ck, cfg = baseline
    assert main(["sensitivity", "--baseline", str(ck), "--data", str(tree), "--config", str(cfg), "--images", "15",
                 "--no-download", "--json"]) == 0
    table = _last_json(capsys)["file"]
    # the front: the smallest and the largest allocation bound the budgets
    assert main(["allocate", "--sensitivity", table, "--budget-mb", "10", "--out", str(tmp_path), "--json"]) == 0
    top = _last_json(capsys)
    assert all(v["w_bits"] == 8 for v in top["layers"].values())  # room for everything at 8 bits
    assert main(["allocate", "--sensitivity", table, "--budget-mb", "0.0001", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "below the smallest allocation" in err and len(err.strip().splitlines()) == 1
    from pipeline import load_baseline, packed_meta, prepare_quantized
    from pipeline.sensitivity import allocation_config
    from quantization import QuantConfig
    fp32, c = load_baseline(str(ck))
    floor = prepare_quantized(fp32, allocation_config(QuantConfig(**FEW), {n: 2 for n in top["layers"]}),
                              packed_meta(c)).size["comp_bytes"]
    low = (floor + top["predicted_bytes"]) // 2  # forces some layers below 8 bits
    budget = low / 1e6
    assert main(["allocate", "--sensitivity", table, "--budget-mb", f"{budget}", "--out", str(tmp_path), "--json"]) == 0
    r = _last_json(capsys)
    assert {"budget_mb", "predicted_mb", "config", "layers", "avg_w_bits"} <= set(r)
    assert r["predicted_bytes"] <= low and r["avg_w_bits"] < 8
    assert set(r["layers"]) == set(top["layers"]) and min(v["w_bits"] for v in r["layers"].values()) < 8
    # a floor on the bits: no layer below it (at a cost in summed sensitivity); below the floor's size: an error
    floor4 = prepare_quantized(fp32, allocation_config(QuantConfig(**FEW), {n: 4 for n in top["layers"]}),
                               packed_meta(c)).size["comp_bytes"]
    mid4 = (floor4 + top["predicted_bytes"]) // 2
    assert main(["allocate", "--sensitivity", table, "--budget-mb", f"{mid4 / 1e6}", "--min-bits", "4", "--out",
                 str(tmp_path / "floor"), "--json"]) == 0
    floored = _last_json(capsys)
    assert min(v["w_bits"] for v in floored["layers"].values()) >= 4 and floored["predicted_bytes"] <= mid4
    assert main(["allocate", "--sensitivity", table, "--budget-mb", f"{(floor4 - 50) / 1e6}", "--min-bits", "4",
                 "--out", str(tmp_path / "floor")]) == 2
    assert "every layer at 4 bits" in capsys.readouterr().err
    assert main(["allocate", "--sensitivity", table, "--budget-mb", "10", "--min-bits", "9"]) == 2
    assert "--min-bits=9 is invalid" in capsys.readouterr().err
    # the quantize YAML it wrote gives a packed file of exactly the predicted size
    packed = tmp_path / "alloc.bsq"
    assert main(["quantize", "--checkpoint", str(ck), "--data", str(tree), "--config", r["config"], "--export",
                 str(packed), "--out", str(tmp_path / "q"), "--device", "cpu", "--no-download", "--json"]) == 0
    out = capsys.readouterr()
    q = json.loads(out.out.strip().splitlines()[-1])
    assert packed.stat().st_size == r["predicted_bytes"] == q["comp_bytes"]
    # named by what its layers get, not by the base config's w_bits (8 here)
    bits = sorted({v["w_bits"] for v in r["layers"].values()})
    assert len(bits) > 1 and f"quantizing W{bits[0]}-{bits[-1]}A8 ptq" in " ".join(out.err.split())
    assert main(["eval", "--packed", str(packed), "--data", str(tree), "--device", "cpu", "--no-download"]) == 0
    assert f"W{bits[0]}-{bits[-1]}A8 ptq, test top-1" in capsys.readouterr().out  # the packed file says so too
    assert main(["eval", "--packed", str(packed), "--data", str(tree), "--device", "cpu", "--no-download", "--json"]) == 0
    ev = _last_json(capsys)  # its JSON: the layers' range, not the base config's 8
    assert ev["w_bits"] == f"{bits[0]}-{bits[-1]}" and ev["a_bits"] == 8 and ev["bits"] == f"W{bits[0]}-{bits[-1]}A8"
    assert main(["export", "--packed", str(packed), "--out", str(tmp_path / "alloc.onnx"), "--json"]) == 0
    assert _last_json(capsys)["w_bits"] == f"{bits[0]}-{bits[-1]}"
    # a front over several budgets: more bytes never cost more sensitivity
    assert main(["allocate", "--sensitivity", table, "--budget-mb", f"{budget},{budget + 0.0005},10",
                 "--out", str(tmp_path), "--json"]) == 0
    front = _last_json(capsys)["front"]
    assert [f["sensitivity"] for f in front] == sorted([f["sensitivity"] for f in front], reverse=True)


@pytest.mark.parametrize("argv, message", [
    (["--images", "0"], "--images=0 is invalid"),
    (["--estimator", "magic"], "invalid choice"),
])
def test_sensitivity_bad_input(baseline, argv, message, capsys):
    tree, ck, cfg = baseline
    code = main(["sensitivity", "--baseline", str(ck), "--data", str(tree), "--no-download", *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err


def test_sensitivity_needs_a_validation_split(tmp_path, capsys):
    tree = make_tree(tmp_path / "tiny", n_train=8, n_test=3)
    assert main(["train", "--data", str(tree), "--out", str(tmp_path / "b"), "--epochs", "1", "--width", "0.25",
                 "--batch-size", "8", "--device", "cpu", "--no-download"]) == 0
    capsys.readouterr()
    code = main(["sensitivity", "--baseline", str(tmp_path / "b" / "checkpoint.pt"), "--data", str(tree), "--no-download"])
    err = capsys.readouterr().err
    assert code == 2 and "without a validation split" in err and len(err.strip().splitlines()) == 1


def test_allocate_bad_input(tmp_path, capsys):
    bad = tmp_path / "t.json"
    bad.write_text("{}")
    assert main(["allocate", "--sensitivity", str(bad), "--budget-mb", "1"]) == 2
    assert "not a sensitivity table" in capsys.readouterr().err
    assert main(["allocate", "--sensitivity", str(tmp_path / "missing.json"), "--budget-mb", "1"]) == 2
    assert "not a sensitivity table" in capsys.readouterr().err


def test_grouped_allocation_gives_each_group_one_bit_width_and_the_least_summed_score(baseline, capsys):
    """groups (a per-block search's blocks): the layers of a group share one bit-width from the group's own
    range, the packed file fits the budget, and no pair of group bit-widths that fits scores less (brute
    force over the real packed sizes); a layer left out of every group is an error."""
    from pipeline import load_baseline, packed_meta, prepare_quantized
    from pipeline.sensitivity import SensitivityError, allocate, allocation_config, layer_bytes, weight_scores
    from quantization import QuantConfig
    tree, ck, cfg = baseline
    assert main(["sensitivity", "--baseline", str(ck), "--data", str(tree), "--config", str(cfg), "--images", "15",
                 "--no-download", "--json"]) == 0
    table = json.loads(Path(_last_json(capsys)["file"]).read_text())
    fp32, c = load_baseline(str(ck))
    base, meta = QuantConfig(**FEW), packed_meta(c)
    layers = [r["name"] for r in table["layers"]]
    groups = {g: ([n for n in layers if n.startswith(f"blocks.{i}.")], range(3, 9)) for i, g in enumerate(("b0", "b1"))}
    costs = layer_bytes(fp32, base, meta, layers, range(2, 9))
    scores = weight_scores(table)[1]

    def packed(g_bits):
        return prepare_quantized(fp32, allocation_config(base, {n: g_bits[g] for g, (ls, _) in groups.items() for n in ls}),
                                 meta).size["comp_bytes"]
    budget = (packed({"b0": 3, "b1": 3}) + packed({"b0": 8, "b1": 8})) // 2
    r = allocate(table, fp32, base, meta, budget / 1e6, costs=costs, groups=groups)
    assert set(r["group_bits"]) == {"b0", "b1"} and all(3 <= b <= 8 for b in r["group_bits"].values())
    assert all(r["bits"][n] == r["group_bits"][g] for g, (ls, _) in groups.items() for n in ls)
    assert r["predicted_bytes"] == packed(r["group_bits"]) <= budget
    opts = sorted(set(range(3, 9)) & set(scores[layers[0]]))  # the bit-widths the table scores (no 7)
    fits = [dict(zip(("b0", "b1"), combo)) for combo in itertools.product(opts, repeat=2)]
    least = min(sum(scores[n][gb[g]] for g, (ls, _) in groups.items() for n in ls) for gb in fits if packed(gb) <= budget)
    assert r["sensitivity"] == pytest.approx(least)
    with pytest.raises(SensitivityError, match="leave out"):
        allocate(table, fp32, base, meta, budget / 1e6, costs=costs, groups={"b0": groups["b0"]})
