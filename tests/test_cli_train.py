import json
import os
import subprocess
import sys

import pytest

from bitsearch.cli import main


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_train_json_contract_and_files(tree, tmp_path, capsys):
    out_dir = tmp_path / "run"
    code, out, err = run_cli(capsys, "train", "--data", str(tree), "--out", str(out_dir), "--epochs", "1",
                             "--width", "0.25", "--batch-size", "16", "--device", "cpu", "--no-download", "--json")
    assert code == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    for k in ("params", "epochs", "top1", "train_top1", "checkpoint", "out_dir"):
        assert k in res
    assert res["epochs"] == 1 and res["params"] > 100_000
    assert json.loads((out_dir / "result.json").read_text())["top1"] == res["top1"]
    for f in ("checkpoint.pt", "curves.png", "confusion.png", "summary.json", "summary.md"):
        assert (out_dir / f).exists()
    assert "epoch   1" in err  # progress goes to stderr


def test_resume_continues_from_checkpoint_config(tree, tmp_path, capsys):
    out_dir = tmp_path / "run"
    base = ["train", "--data", str(tree), "--out", str(out_dir), "--width", "0.25", "--batch-size", "16",
            "--device", "cpu", "--no-download"]
    assert run_cli(capsys, *base, "--epochs", "1")[0] == 0
    code, out, err = run_cli(capsys, "train", "--data", str(tree), "--out", str(out_dir), "--resume", "--json",
                             "--no-download")
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["epochs"] == 1  # finished run: nothing retrained
    code, _, err = run_cli(capsys, *base, "--epochs", "3", "--lr", "0.3", "--resume")
    assert code == 2 and "different configuration" in err


@pytest.mark.parametrize("args, message", [
    (["--epochs", "0"], "epochs=0 is invalid"),
    (["--lr", "-1"], "lr=-1.0 is invalid"),
    (["--width", "0"], "width=0.0 is invalid"),
    (["--epochs", "x"], "invalid int value"),
    (["--profile", "nope"], "unknown profile 'nope'"),
])
def test_bad_flags_one_line_nonzero(tree, tmp_path, capsys, args, message):
    code, out, err = run_cli(capsys, "train", "--data", str(tree), "--out", str(tmp_path / "o"), "--no-download", *args)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_missing_data_and_unwritable_out(tmp_path, tree, capsys):
    code, _, err = run_cli(capsys, "train", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "o"), "--no-download")
    assert code == 2 and "does not exist" in err and "--data PATH" in err
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if os.access(ro, os.W_OK):  # root ignores permission bits: use a path under a file instead
        target = tmp_path / "afile"
        target.write_text("")
        target = target / "sub"
    else:
        target = ro / "sub"
    code, _, err = run_cli(capsys, "train", "--data", str(tree), "--out", str(target), "--no-download")
    assert code == 2 and "not writable" in err and len(err.strip().splitlines()) == 1


def test_console_script_runs(tmp_path):
    r = subprocess.run([sys.executable, "-m", "bitsearch", "train", "--data", str(tmp_path / "x"), "--out",
                        str(tmp_path / "o"), "--no-download"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("bitsearch: error:") and r.stdout == ""
