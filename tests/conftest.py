"""Shared fixtures: tiny synthetic CIFAR-like data that the tests make themselves."""
from __future__ import annotations

import os
import tarfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch


# `make test` runs the suite in two pytest-xdist workers, one test file at a time each (--dist loadfile: a
# module's Ray and MLflow server start once). The longest files go first (the Makefile passes
# --no-loadscope-reorder: pytest-xdist would otherwise hand out the files with the most tests first) so
# neither worker is left with one long file at the end.
LONGEST_FIRST = ("test_search.py", "test_study_and_bench.py", "test_search_lifecycle.py", "test_trial_settings.py", "test_gpu_scheduling.py",
                 "test_cluster.py", "test_server.py", "test_sensitivity.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept otherwise


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    os.environ["BITSEARCH_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    # one compute thread per xdist worker (two workers share the 2 cores; 2 in a plain `pytest` run)
    torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


@contextmanager
def two_threads():
    """Compute with 2 threads inside, as a plain `pytest` run on 2 cores does (the 1-thread xdist workers
    otherwise): the tests that use it were written against that arithmetic, and a tiny model's accuracy
    can move by a few images with the thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def make_tree(root: Path, classes=("cat", "dog", "ship"), n_train=12, n_test=4, seed=0, size=32) -> Path:
    """Write train/<class>/*.png and test/<class>/*.png; each class has its own mean colour so a tiny
    model can learn it."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for ci, c in enumerate(classes):
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                base = np.zeros((size, size, 3), np.float32)
                base[..., ci % 3] = 180
                img = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{i:04d}.png")
    return root


def tiny_baseline(root: Path, epochs: int = 2, val_size: int = 9) -> tuple[Path, Path]:
    """A tiny image tree under ``root`` and a width-0.25 baseline trained on it with `bitsearch train`:
    (tree, checkpoint)."""
    from bitsearch.cli import main

    tree = make_tree(root / "tiny", n_train=20, n_test=6)
    assert main(["train", "--data", str(tree), "--out", str(root / "base"), "--epochs", str(epochs), "--width", "0.25",
                 "--batch-size", "16", "--lr", "0.05", "--val-size", str(val_size), "--device", "cpu",
                 "--no-download"]) == 0
    return tree, root / "base" / "checkpoint.pt"


@pytest.fixture
def tree(tmp_path) -> Path:
    return make_tree(tmp_path / "tiny")


@pytest.fixture
def tar_of_tree(tmp_path) -> Path:
    src = make_tree(tmp_path / "src" / "tiny-cifar")
    out = tmp_path / "tiny.tar.gz"
    with tarfile.open(out, "w:gz") as tf:
        tf.add(src, arcname="tiny-cifar")
    return out


@pytest.fixture(scope="session")
def learnable_data():
    """A small in-memory dataset a narrow MobileNet-v2 learns in a couple of epochs (3 classes)."""
    from trainer.data import Dataset

    g = torch.Generator().manual_seed(0)

    def make(n):
        y = torch.arange(n) % 3
        x = torch.randint(0, 90, (n, 3, 32, 32), generator=g)
        for c in range(3):
            x[y == c, c] += 150
        return x.clamp(0, 255).to(torch.uint8), y

    tx, ty = make(192)
    vx, vy = make(60)
    return Dataset(tx, ty, vx, vy, ("r", "g", "b"), "synthetic")


@pytest.fixture(scope="session")
def trained(learnable_data, tmp_path_factory):
    """A width-0.25 MobileNet-v2 that has learned learnable_data (> 90% test top-1), BN re-estimated.
    Trained once per test run: the first xdist worker to need it saves it where the other loads it."""
    from filelock import FileLock

    from quantization import recalibrate_bn
    from trainer import TrainConfig, evaluate, normalize, train
    from trainer.model import MobileNetV2

    torch.manual_seed(0)
    m = MobileNetV2(num_classes=3, width=0.25)
    base = tmp_path_factory.getbasetemp()
    shared = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "trained.pt"  # this run's only
    with FileLock(f"{shared}.lock"):
        if shared.is_file():
            m.load_state_dict(torch.load(shared, weights_only=True))
        else:
            # FP32 on every CPU (auto would pick bf16 on native-bf16 ones): the same reference model everywhere
            with two_threads():  # the same reference model as in a plain `pytest` run
                train(m, learnable_data, TrainConfig(width=0.25, epochs=3, batch_size=16, lr=0.05, seed=3,
                                                     device="cpu", eval_test=False, amp="off", channels_last="off"))
                x = learnable_data.train_x
                recalibrate_bn(m, (normalize(x[i:i + 32]) for i in range(0, len(x), 32)), len(x) // 32)
            torch.save(m.state_dict(), shared)
    m.eval()
    assert evaluate(m, learnable_data.test_x, learnable_data.test_y)["top1"] > 90
    return m
