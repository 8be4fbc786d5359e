"""Bad input, command by command: exit code 2 and exactly one line on stderr naming the problem (no
traceback, no internal exception text), before any long work starts (no Ray for sweep/search)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from bitsearch.cli import main
from conftest import make_tree


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny tree, baselines with and without a validation split, bad checkpoints, a packed model, a
    fake experiment directory, and YAML files with broken sections."""
    from trainer import load_dataset
    root = tmp_path_factory.mktemp("bad")
    tree = make_tree(root / "tiny", n_train=8, n_test=3)
    other = make_tree(root / "other", classes=("a", "b", "c", "d"), n_train=2, n_test=2)
    load_dataset(tree), load_dataset(other)  # decoded and cached now: no progress line before an error
    base = ["--data", str(tree), "--epochs", "1", "--width", "0.25", "--batch-size", "8", "--device", "cpu",
            "--no-download"]
    assert main(["train", "--out", str(root / "val"), "--val-size", "6", *base]) == 0
    assert main(["train", "--out", str(root / "noval"), *base]) == 0
    ck = root / "val" / "checkpoint.pt"
    assert main(["quantize", "--checkpoint", str(ck), "--data", str(tree), "--device", "cpu", "--out",
                 str(root / "q"), "--export", str(root / "m.bsq")]) == 0
    d = torch.load(ck, weights_only=True)
    bad = root / "ck"
    bad.mkdir()
    nan = {**d, "model": {k: v.float().fill_(float("nan")) if v.is_floating_point() else v for k, v in d["model"].items()}}
    torch.save(nan, bad / "nan.pt")
    torch.save({**d, "model": {k: v for k, v in list(d["model"].items())[5:]}}, bad / "missing.pt")
    torch.save({**d, "meta": {**d["meta"], "width": 0.5}}, bad / "width.pt")
    torch.save({k: v for k, v in d.items() if k != "meta"}, bad / "nometa.pt")
    (bad / "corrupt.pt").write_bytes(b"nope")
    (root / "afile").write_text("")
    y = root / "yaml"
    y.mkdir()
    for name, doc in {"qlist": {"quantize": [1, 2]}, "ovstr": {"quantize": {"overrides": "x"}},
                      "ovlist": {"quantize": {"overrides": ["a", "b"]}}, "keep5": {"quantize": {"keep_fp32": 5}},
                      "pattern": {"quantize": {"overrides": [{"pattern": "blocks.99.*", "w_bits": 4}]}},
                      "tlist": {"train": [1]}, "tkey": {"train": {"colour": 1}},
                      "noval": {"train": {"epochs": 1}}, "sweeplist": {"train": {"val_size": 5}, "sweep": [1]},
                      "budgetmulti": {"search": {"objectives": "multi", "size_budget_mb": 1.0}}}.items():
        (y / f"{name}.yaml").write_text(yaml.safe_dump(doc))
    (y / "broken.yaml").write_text("a: [1,\n")
    exp = root / "runs" / "fake"
    (exp / "t1").mkdir(parents=True)
    (exp / "bitsearch.json").write_text(json.dumps({"baseline": str(ck), "data": str(tree), "out": str(root / "runs"),
                                                    "name": "fake", "tracking_uri": "http://127.0.0.1:9"}))
    (exp / "t1" / "params.json").write_text(json.dumps({"w_bits": 8}))
    (exp / "t1" / "result.json").write_text(json.dumps({"trial_id": "t1", "final": True, "val_top1": 50.0}) + "\n")
    return {"root": root, "tree": tree, "other": other, "ck": ck, "noval": root / "noval" / "checkpoint.pt",
            "bad": bad, "y": y, "exp": exp, "packed": root / "m.bsq"}


def _argv(template: list[str], e: dict) -> list[str]:
    return [a.format(**{k: str(v) for k, v in e.items()}) for a in template]


TRAIN = "train --data {tree} --out {root}/t --no-download --width 0.25".split()
QUANT = "quantize --checkpoint {ck} --data {tree} --out {root}/qq --device cpu --no-download".split()
EVAL = "eval --packed {packed} --data {tree} --no-download".split()
SWEEP = "sweep --baseline {ck} --data {tree} --out {root}/runs".split()
SEARCH = "search --baseline {ck} --data {tree} --out {root}/runs".split()
STUDY = "study --data {tree} --out {root}/st --no-download".split()

CASES = [
    # train
    (TRAIN + ["--epochs", "0"], "epochs=0 is invalid"),
    (TRAIN + ["--batch-size", "0"], "batch_size=0 is invalid"),
    (TRAIN + ["--subset", "2"], "subset=2 is too small"),
    (TRAIN + ["--val-size", "1000"], "leaves no training images"),
    (["train", "--data", "{root}/none", "--out", "{root}/t", "--no-download"], "does not exist"),
    (["train", "--data", "{tree}/train/cat/0000.png", "--out", "{root}/t", "--no-download"], "not a .tar"),
    (["train", "--data", "{tree}", "--out", "{root}/empty", "--resume", "--no-download"], "--resume: no checkpoint"),
    (["train", "--data", "{tree}", "--out", "{root}/afile/sub", "--no-download"], "not writable"),
    (TRAIN + ["--config", "{root}/none.yaml"], "does not exist"),
    (TRAIN + ["--config", "{y}/broken.yaml"], "not valid YAML: line 2, column 1: expected the node content"),
    (TRAIN + ["--data", "{root}/cifar10.tar.gz"], "does not exist (an archive is read, never downloaded)"),
    (["train", "--data", "{root}/cifar10.tar.gz", "--out", "{root}/t"], "an archive is read, never downloaded"),
    (["search"], "error: search: the following arguments are required: --baseline"),
    (TRAIN + ["--config", "{y}/tlist.yaml"], "train: section"),
    (TRAIN + ["--config", "{y}/tkey.yaml"], "unknown training option(s) colour"),
    (TRAIN + ["--profile", "nope"], "unknown profile 'nope'"),
    # quantize
    (["quantize", "--checkpoint", "{root}/val", "--data", "{tree}"], "is a directory"),
    (["quantize", "--checkpoint", "{root}/none.pt", "--data", "{tree}"], "does not exist"),
    (["quantize", "--checkpoint", "{bad}/corrupt.pt", "--data", "{tree}"], "corrupt"),
    (["quantize", "--checkpoint", "{bad}/nan.pt", "--data", "{tree}"], "NaN or infinite weights"),
    (["quantize", "--checkpoint", "{bad}/missing.pt", "--data", "{tree}"], "does not fit MobileNet-v2"),
    (["quantize", "--checkpoint", "{bad}/width.pt", "--data", "{tree}"], "does not fit MobileNet-v2 width 0.5"),
    (["quantize", "--checkpoint", "{bad}/nometa.pt", "--data", "{tree}"], "no model description"),
    (QUANT + ["--batch-size=-5"], "--batch-size=-5 is invalid"),
    (QUANT + ["--batch-size", "0"], "--batch-size=0 is invalid"),
    (QUANT + ["--export", "{root}"], "is a directory"),
    (QUANT + ["--export", "{root}/afile/m.bsq"], "not writable"),
    (QUANT + ["--calib-batches", "0"], "calib_batches=0 is invalid"),
    (QUANT + ["--w-bits", "1"], "w_bits='1' is out of range"),
    (QUANT + ["--a-bits", "x"], "is not a number"),
    (QUANT + ["--method", "qat", "--epochs", "0"], "--epochs=0 is invalid"),
    (QUANT + ["--method", "qat", "--lr", "-1"], "--lr=-1.0 is invalid"),
    (QUANT + ["--config", "{y}/qlist.yaml"], "quantize: section"),
    (QUANT + ["--config", "{y}/ovstr.yaml"], "overrides='x' is invalid"),
    (QUANT + ["--config", "{y}/ovlist.yaml"], "overrides[0]='a' is invalid"),
    (QUANT + ["--config", "{y}/keep5.yaml"], "keep_fp32=5 is invalid"),
    (QUANT + ["--config", "{y}/pattern.yaml"], "layer pattern 'blocks.99.*' is invalid"),
    (["quantize", "--checkpoint", "{ck}", "--data", "{root}/none", "--no-download"], "does not exist"),
    (["quantize", "--checkpoint", "{ck}", "--data", "{other}", "--no-download"], "differ from the data"),
    # eval
    (["eval", "--packed", "{ck}", "--data", "{tree}"], "not a bitsearch packed model"),
    (["eval", "--packed", "{root}/none.bsq", "--data", "{tree}"], "cannot be read"),
    (["eval", "--packed", "{root}", "--data", "{tree}"], "is a directory"),
    (EVAL + ["--batch-size", "0"], "--batch-size=0 is invalid"),
    (["eval", "--packed", "{packed}", "--data", "{other}", "--no-download"], "trained on classes"),
    (["eval", "--packed", "{packed}", "--data", "{root}/none", "--no-download"], "does not exist"),
    # export
    (["export", "--packed", "{ck}", "--out", "{root}/x.onnx"], "not a bitsearch packed model"),
    (["export", "--packed", "{root}/none.bsq", "--out", "{root}/x.onnx"], "cannot be read"),
    (["export", "--packed", "{packed}", "--out", "{root}"], "is a directory"),
    (["export", "--packed", "{packed}", "--out", "{root}/afile/x.onnx"], "not writable"),
    (["export", "--out", "{root}/x.onnx"], "give one of --packed FILE.bsq, EXPERIMENT TRIAL_ID or --checkpoint FILE.pt"),
    (["export", "{root}", "t1", "--packed", "{packed}", "--out", "{root}/x.onnx"], "give one of --packed"),
    (["export", "{root}", "--out", "{root}/x.onnx"], "expected EXPERIMENT TRIAL_ID, got 1"),
    (["export", "--checkpoint", "{root}/nope.pt", "--out", "{root}/x.onnx"], "nope.pt: no such file"),
    (["export", "{root}", "t1", "--out", "{root}/x.onnx"], "not a bitsearch experiment directory"),
    (["export", "--packed", "{packed}", "--format", "tflite", "--out", "{root}/x.onnx"], "invalid choice"),
    (["export", "--packed", "{packed}", "--out", "{root}/x.onnx", "--check", "{other}", "--no-download"],
     "trained on classes"),
    # sweep / search: all before Ray starts
    (SWEEP + ["--w-bits", "8,x"], "not a comma-separated list of integers"),
    (SWEEP + ["--w-bits", "9"], "w_bits=9 is out of range"),
    (["sweep", "--baseline", "{root}/none.pt", "--data", "{tree}", "--out", "{root}/runs"], "does not exist"),
    (["sweep", "--baseline", "{ck}", "--data", "{root}/none", "--out", "{root}/runs"], "does not exist"),
    (["sweep", "--baseline", "{noval}", "--data", "{tree}", "--out", "{root}/runs"], "without a validation split"),
    (["sweep", "--baseline", "{ck}", "--data", "{tree}", "--out", "{root}/afile"], "not writable"),
    (SWEEP + ["--max-concurrent", "0"], "max_concurrent=0 is invalid"),
    (SWEEP + ["--cpus-per-trial", "0"], "cpus_per_trial=0.0 is invalid: a number > 0"),
    (SWEEP + ["--device", "cpu", "--gpus-per-trial", "0.25"], "--device cpu contradicts --gpus-per-trial 0.25"),
    (SWEEP + ["--device", "cuda"], "--device cuda needs --gpus-per-trial > 0"),
    (SWEEP + ["--gpus-per-trial", "1.5"], "gpus_per_trial=1.5 is invalid"),
    (SWEEP + ["--batch-size", "0"], "batch_size=0 is invalid"),
    (SWEEP + ["--method", "qat", "--qat-lr", "-1"], "qat_lr=-1.0 is invalid"),
    (SWEEP + ["--name", "a/b"], "name='a/b' is invalid"),
    (SEARCH + ["--num-samples", "0"], "num_samples=0 is invalid"),
    (SEARCH + ["--size-budget-mb", "-1"], "size_budget_mb=-1.0 is invalid"),
    (SEARCH + ["--size-budget-mb", "0.001"], "below the smallest model"),
    (SEARCH + ["--qat-epochs", "0"], "qat_epochs=0 is invalid"),
    (SWEEP + ["--finetune-subset", "-5"], "finetune_subset=-5 is invalid: an integer >= 0"),
    (SEARCH + ["--metric", "loss"], "unrecognized arguments: --metric loss"),
    (SEARCH + ["--config", "{y}/broken.yaml"], "not valid YAML"),
    (SEARCH + ["--config", "{y}/budgetmulti.yaml"], "single-objective searches only"),
    (SEARCH + ["--tracking-uri", "http://127.0.0.1:9"], "unreachable"),
    # experiments
    (["resume", "{root}/none"], "not a bitsearch experiment"),
    (["resume", "{exp}"], "no Ray Tune state to resume"),
    (["report", "{root}/val"], "not a bitsearch experiment"),
    (["compare", "{root}/none", "t1"], "not a bitsearch experiment"),
    (["compare", "{exp}", "t9"], "unknown trial id(s) t9"),
    (["sync", "{root}/none"], "not a bitsearch experiment"),
    (["sync", "{exp}"], "unreachable"),
    # server / ui
    (["server", "--root", "{root}/mlf", "--port", "99999"], "--port=99999 is invalid"),
    (["server", "--root", "{root}/afile"], "is a file"),
    (["ui", "{root}/none"], "is not a directory"),
    (["ui", "{root}/val"], "no embedded MLflow store"),
    (["ui", "{exp}"], "was logged to the tracking server"),
    # study
    (STUDY + ["--config", "{root}/none.yaml"], "does not exist"),
    (STUDY + ["--config", "{y}/sweeplist.yaml", "--stages", "foo"], "unknown stage(s) foo"),
    (STUDY + ["--config", "{y}/noval.yaml"], "val_size must be > 0"),
    (STUDY + ["--config", "{y}/sweeplist.yaml"], "sweep: section"),
    (["study", "--config", "{y}/sweeplist.yaml", "--data", "{root}/none", "--out", "{root}/st", "--no-download"],
     "does not exist"),
    # no command / unknown flag
    (["frobnicate"], "invalid choice"),
    (TRAIN + ["--colour", "red"], "unrecognized arguments"),
]


@pytest.mark.parametrize("template, message", CASES, ids=[f"{c[0][0]}-{i}" for i, c in enumerate(CASES)])
def test_bad_input_is_one_clear_line(env, template, message, capsys, monkeypatch):
    import tune.search as ts
    monkeypatch.setattr(ts, "_init_ray", lambda *a, **k: pytest.fail("Ray started for bad input"))
    before = sorted(Path(env["root"]).rglob("*"))
    code = main(_argv(template, env))
    assert sorted(Path(env["root"]).rglob("*")) == before  # nothing created, nothing removed: no side effects
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, (code, err)
    assert len(lines) == 1 and lines[0].startswith("bitsearch: error: "), err
    assert message in lines[0], lines[0]
    assert "Traceback" not in err and "rerun with --debug" not in err, err  # no internal exception leaked


def test_failed_export_leaves_nothing_behind(env, tmp_path, capsys, monkeypatch):
    """The ONNX file is written to a .tmp and renamed: a save that fails half-way (disk full) leaves
    neither the .tmp nor a partial model."""
    import onnx

    def half_written(proto, path, *a, **k):
        Path(path).write_bytes(b"partial")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(onnx, "save", half_written)
    out = tmp_path / "deploy" / "m.onnx"
    assert main(["export", "--packed", str(Path(env["root"]) / "m.bsq"), "--out", str(out)]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert sorted(p.name for p in out.parent.iterdir()) == []


def test_library_warnings_stay_out_of_the_terminal_unless_debug(tmp_path):
    """torch's "No CUDA runtime is found" log line and its pickle-protocol warning say nothing to a user:
    hidden, unless --debug; bitsearch's own warnings still show. (A fresh process: pytest would capture
    both itself.)"""
    import subprocess
    import sys
    code = (
        "import logging, sys, warnings\n"
        "import bitsearch.cmd_train as ct\n"
        "from bitsearch.cli import main\n"
        "def noisy(args):\n"
        "    logging.getLogger('torch.utils.cpp_extension').warning('No CUDA runtime is found')\n"
        "    warnings.warn_explicit('pickle protocol 2', UserWarning, 'serialization.py', 1, module='torch.serialization')\n"
        "    warnings.warn_explicit('MLflow not fully updated', UserWarning, 'search.py', 1, module='tune.search')\n"
        "    return 0\n"
        "ct.cmd_train = noisy\n"
        "sys.exit(main(sys.argv[1:]))\n")
    argv = ["train", "--data", str(tmp_path), "--out", str(tmp_path / "o")]
    run = lambda *extra: subprocess.run([sys.executable, "-c", code, *extra, *argv], capture_output=True,  # noqa: E731
                                        text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    quiet, loud = run(), run("--debug")
    assert quiet.returncode == 0 and loud.returncode == 0, (quiet.stderr, loud.stderr)
    assert "No CUDA runtime" not in quiet.stderr and "pickle protocol" not in quiet.stderr, quiet.stderr
    assert "MLflow not fully updated" in quiet.stderr
    assert "No CUDA runtime" in loud.stderr and "pickle protocol" in loud.stderr, loud.stderr
