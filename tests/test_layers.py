"""The code's own rules: the layer contracts (import-linter, pyproject.toml), short functions, and no
package changing another's objects behind its back."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("bitsearch", "trainer", "quantization", "pipeline", "tune", "mlflow_server")


def test_import_contracts_hold():
    """`lint-imports` with the contracts of pyproject.toml: at least four, all kept."""
    r = subprocess.run([str(Path(sys.executable).with_name("lint-imports"))], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    kept = [line for line in r.stdout.splitlines() if line.rstrip().endswith(("KEPT", "(1 ignored import)"))]
    assert len(kept) >= 4 and "0 broken" in r.stdout, r.stdout[-3000:]


def test_a_forbidden_import_breaks_a_contract(tmp_path):
    """The contracts are not vacuous: the same check on a copy of the packages where quantization imports
    the trainer fails and names the contract."""
    import shutil
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "quantization" / "config.py").write_text("import trainer.config  # noqa\n"
                                                         + (ROOT / "quantization" / "config.py").read_text())
    r = subprocess.run([str(Path(sys.executable).with_name("lint-imports"))], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300, env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert r.returncode != 0 and "quantization imports no trainer" in r.stdout and "BROKEN" in r.stdout, r.stdout[-2000:]


def test_no_function_is_longer_than_60_lines():
    long = []
    for pkg in PACKAGES:
        for p in sorted((ROOT / pkg).rglob("*.py")):
            for n in ast.walk(ast.parse(p.read_text())):
                if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 60:
                    long.append(f"{p.relative_to(ROOT)}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)")
    assert not long, long


def test_a_baseline_moved_to_another_device_is_a_copy():
    """quantize_model may run on another device than the (cached) baseline's: the caller's model stays
    where it was (the meta device stands in for a GPU)."""
    from pipeline.quantize import _on_device
    m = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2)).train()
    moved = _on_device(m, torch.device("meta"))
    assert moved is not m and next(moved.parameters()).device.type == "meta" and not moved.training
    assert next(m.parameters()).device.type == "cpu" and m.training
    assert _on_device(m, torch.device("cpu")) is m  # already there: no copy


def test_learning_rate_multiples_are_an_optimizer_option():
    """The trainer reads per-parameter learning-rate multiples from its lr_scales argument, never from
    attributes another package set on the parameters."""
    from trainer.train import param_groups
    m = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))
    groups = param_groups(m, 1e-4, False, lr=0.1, lr_scales={"1.weight": 3.0, "1.bias": 3.0})
    by_lr = {g.get("lr", 0.1): sum(p.numel() for p in g["params"]) for g in groups}
    assert by_lr == {0.1: 8, 0.1 * 3.0: 6}
    assert not any(hasattr(p, "lr_scale") for p in m.parameters())
    try:
        param_groups(m, 1e-4, False, lr=0.1, lr_scales={"2.weight": 2.0})
    except ValueError as e:
        assert "2.weight" in str(e)
    else:
        raise AssertionError("an unknown parameter name must be an error")
