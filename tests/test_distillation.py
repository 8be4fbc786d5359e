"""Knowledge distillation from the FP32 baseline during QAT/LSQ (issue 11)."""
from __future__ import annotations

import json

import pytest
import torch

from bitsearch.cli import main


def test_kd_loss_is_hintons_term():
    from trainer.train import kd_loss
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)
    T = 3.0
    p_t = torch.softmax(t / T, 1)
    manual = (p_t * (torch.log(p_t) - torch.log_softmax(s / T, 1))).sum(1).mean() * T * T
    torch.testing.assert_close(kd_loss(s, t, T), manual)
    assert float(kd_loss(t, t, T)) == pytest.approx(0.0, abs=1e-6)


def test_pure_distillation_makes_the_student_agree_with_the_teacher(trained, learnable_data):
    """kd_weight=1: the labels are never used (here they are scrambled); the student learns the
    teacher's answers all the same."""
    import dataclasses

    from trainer import TrainConfig, train
    from trainer.model import MobileNetV2
    from trainer.train import evaluate

    teacher_pred = evaluate(trained, learnable_data.test_x, learnable_data.test_y)["pred"]
    cfg = TrainConfig(width=0.25, epochs=5, batch_size=16, lr=0.05, seed=3, device="cpu", eval_test=False,
                      kd_weight=1.0, kd_temperature=1.0)
    scrambled = dataclasses.replace(learnable_data, train_y=(learnable_data.train_y + 1) % 3)
    torch.manual_seed(0)
    untrained = MobileNetV2(num_classes=3, width=0.25)
    before = (evaluate(untrained, learnable_data.test_x, learnable_data.test_y)["pred"] == teacher_pred).float().mean()
    student = MobileNetV2(num_classes=3, width=0.25)
    student.load_state_dict(untrained.state_dict())
    snapshot = {k: v.clone() for k, v in trained.state_dict().items()}
    train(student, scrambled, cfg, teacher=trained)
    after = (evaluate(student, learnable_data.test_x, learnable_data.test_y)["pred"] == teacher_pred).float().mean()
    assert after > 0.8 and after > before + 0.3, (float(before), float(after))
    for k, v in trained.state_dict().items():  # the teacher is not trained, nor are its BN statistics
        assert torch.equal(v, snapshot[k]), k
    assert not trained.training


def test_kd_without_a_teacher_is_an_error(learnable_data):
    from trainer import ConfigError, TrainConfig, train
    from trainer.model import MobileNetV2
    with pytest.raises(ConfigError, match="needs a teacher"):
        train(MobileNetV2(num_classes=3, width=0.25), learnable_data,
              TrainConfig(width=0.25, epochs=1, batch_size=16, device="cpu", kd_weight=0.5))
    with pytest.raises(ConfigError, match="kd_weight"):
        TrainConfig(kd_weight=1.5)


def test_quantize_cli_distils(tmp_path, capsys):
    from conftest import make_tree
    tree = make_tree(tmp_path / "tiny", n_train=12, n_test=4)
    assert main(["train", "--data", str(tree), "--out", str(tmp_path / "b"), "--epochs", "1", "--width", "0.25",
                 "--batch-size", "12", "--device", "cpu", "--no-download"]) == 0
    ck = str(tmp_path / "b" / "checkpoint.pt")
    capsys.readouterr()
    common = ["quantize", "--checkpoint", ck, "--data", str(tree), "--device", "cpu", "--no-download",
              "--w-bits", "4", "--a-bits", "8", "--batch-size", "12"]
    assert main([*common, "--method", "ptq", "--kd-weight", "0.5"]) == 2
    assert "needs a method that fine-tunes" in capsys.readouterr().err
    assert main([*common, "--method", "qat", "--kd-weight", "2"]) == 2
    assert "--kd-weight=2.0 is invalid" in capsys.readouterr().err
    assert main([*common, "--method", "qat", "--epochs", "1", "--kd-weight", "0.7", "--kd-temperature", "3",
                 "--out", str(tmp_path / "q"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["kd_weight"] == 0.7 and out["kd_temperature"] == 3.0 and out["method"] == "qat"
