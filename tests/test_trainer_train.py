import importlib
import json
import shutil

import pytest
import torch

from conftest import two_threads
from trainer import CheckpointError, ConfigError, TrainConfig, train
from trainer.model import MobileNetV2

TINY = dict(width=0.25, epochs=2, batch_size=16, lr=0.05, seed=3, device="cpu")


def _model(seed=0):
    torch.manual_seed(seed)
    return MobileNetV2(num_classes=3, width=0.25)


def test_learns_and_writes_reports(learnable_data, tmp_path):
    cfg = TrainConfig(**{**TINY, "epochs": 3})
    with two_threads():
        res = train(_model(), learnable_data, cfg, out_dir=tmp_path)
    assert res["top1"] > 60.0, res["history"]  # 3 easy classes; chance is 33%
    h = res["history"]
    assert [e["epoch"] for e in h] == [1, 2, 3] and h[-1]["lr"] == pytest.approx(0.0, abs=1e-9)
    for k in ("train_loss", "train_top1", "test_loss", "test_top1", "epoch_s", "images_per_s"):
        assert k in h[-1]
    for f in ("checkpoint.pt", "curves.png", "confusion.png", "summary.json", "summary.md"):
        assert (tmp_path / f).stat().st_size > 0
    s = json.loads((tmp_path / "summary.json").read_text())
    assert set(s["per_class_top1"]) == {"r", "g", "b"}
    assert sum(map(sum, s["confusion_matrix"])) == 60


def test_resume_reproduces_an_uninterrupted_run(learnable_data, tmp_path):
    cfg = TrainConfig(**TINY)
    full = _model()
    train(full, learnable_data, cfg, out_dir=tmp_path / "full", write_reports=False)

    # "killed" after epoch 1: the checkpoint of a 1-epoch-in run is what a crash leaves behind
    part = tmp_path / "part"
    train(_model(), learnable_data, cfg, out_dir=tmp_path / "tmp", callbacks=[_StopAfter(1, part)], write_reports=False)
    resumed = _model(seed=99)  # different init: everything must come from the checkpoint
    res = train(resumed, learnable_data, cfg, out_dir=part, resume=True, write_reports=False)
    assert [e["epoch"] for e in res["history"]] == [1, 2]
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)


def _resumed_after_epoch_1_ends_as(model, data, cfg, tmp_path):
    """A run "killed" after epoch 1 and resumed (from another initialisation) ends with ``model``'s weights."""
    part = tmp_path / "part"
    train(_model(), data, cfg, out_dir=tmp_path / "tmp", callbacks=[_StopAfter(1, part)], write_reports=False)
    resumed = _model(seed=99)
    train(resumed, data, cfg, out_dir=part, resume=True, write_reports=False)
    for (k, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)


class _StopAfter:
    """Copies the checkpoint as it stood after epoch ``n`` (what a kill leaves behind)."""

    def __init__(self, n, dest):
        self.n, self.dest = n, dest

    def on_epoch_end(self, epoch, m, state):
        if epoch + 1 == self.n:
            self.dest.mkdir()
            shutil.copy(state["checkpoint"], self.dest / "checkpoint.pt")


def test_resume_refuses_corrupt_or_mismatched_checkpoints(learnable_data, tmp_path):
    cfg = TrainConfig(**{**TINY, "epochs": 1})
    train(_model(), learnable_data, cfg, out_dir=tmp_path, write_reports=False)
    with pytest.raises(CheckpointError, match="different configuration: lr=0.05"):
        train(_model(), learnable_data, cfg.replace(lr=0.2), out_dir=tmp_path, resume=True)
    # a checkpoint from before a setting existed was made with that setting's default: it resumes
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    del ck["config"]["kd_weight"], ck["config"]["kd_temperature"]
    torch.save(ck, tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match=r"different configuration: kd_temperature=4.0 \(now 2.0\)"):
        train(_model(), learnable_data, cfg.replace(kd_temperature=2.0), out_dir=tmp_path, resume=True)
    resumed = train(_model(), learnable_data, cfg, out_dir=tmp_path, resume=True, write_reports=False)
    assert [h["epoch"] for h in resumed["history"]] == [1]
    with pytest.raises(CheckpointError, match="does not fit this model"):
        train(MobileNetV2(num_classes=3, width=0.5), learnable_data, cfg.replace(width=0.25), out_dir=tmp_path,
              resume=True)
    (tmp_path / "checkpoint.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        train(_model(), learnable_data, cfg, out_dir=tmp_path, resume=True)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        train(_model(), learnable_data, cfg, out_dir=tmp_path / "empty", resume=True)


@pytest.mark.parametrize("field, value, message", [
    ("epochs", 0, "epochs=0 is invalid"),
    ("lr", -0.1, "lr=-0.1 is invalid"),
    ("width", 0, "width=0.0 is invalid"),
    ("batch_size", 0, "batch_size=0"),
    ("device", "tpu", "auto, cpu or cuda"),
    ("epochs", "ten", "expected int"),
    ("colour", 1, "unknown training option"),
])
def test_bad_numbers_are_refused(field, value, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_dict({field: value})


def test_precision_switches_and_cpu_bf16_keeps_quantizers_in_fp32(learnable_data, tmp_path, monkeypatch):
    """--amp/--channels-last apply on CPU too; auto = on where the CPU has native bf16; the run says
    which; fake-quant arithmetic stays FP32."""
    T = importlib.import_module("trainer.train")  # the module (trainer.train is also the function)
    from quantization import QuantConfig, calibrate, prepare
    from trainer.config import ConfigError
    from trainer.train import precision
    cpu = torch.device("cpu")
    for native in (True, False):
        monkeypatch.setattr(T, "cpu_has_native_bf16", lambda native=native: native)
        amp, cl, line = precision(TrainConfig(), cpu)
        assert (amp, cl) == (native, native)
        assert f"CPU {'with' if native else 'without'} native bf16" in line and "amp=auto" in line
        assert precision(TrainConfig(amp="off", channels_last="off"), cpu)[:2] == (False, False)
    monkeypatch.undo()
    amp, cl, line = precision(TrainConfig(amp="on", channels_last="off"), cpu)
    assert (amp, cl) == (True, False) and "bf16 autocast on" in line and "channels-last off" in line
    assert TrainConfig(amp=True).amp == "auto" and TrainConfig(amp="no").amp == "off"  # older configs
    assert TrainConfig(channels_last=True).channels_last == "auto"
    with pytest.raises(ConfigError, match="amp='fast' is invalid: on, off or auto"):
        TrainConfig(amp="fast")
    torch.manual_seed(0)
    m = MobileNetV2(num_classes=3, width=0.25)
    res = train(m, learnable_data, TrainConfig(width=0.25, epochs=1, batch_size=32, device="cpu", amp="on",
                                               channels_last="on", eval_test=False))
    assert res["amp"] and res["channels_last"] and m.stem.conv.weight.is_contiguous(memory_format=torch.channels_last)
    q = prepare(m.eval(), QuantConfig(w_bits=4, a_bits=4))
    x = torch.randn(4, 3, 32, 32)
    calibrate(q, [x])
    seen = []
    aq = q.blocks[1].dw.conv.aq
    aq.register_forward_hook(lambda mod, inp, out: seen.append((inp[0].dtype, out.dtype)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q(x)
    assert seen == [(torch.bfloat16, torch.float32)]  # a bf16 conv output, quantized in FP32


def test_progressive_resizing_trains_early_epochs_small_and_resumes_exactly(learnable_data, tmp_path):
    """progressive="16:1,24:1": epoch 1 sees 16 px batches, epoch 2 24 px, epoch 3 the stored 32 px;
    evaluation always sees 32 px; a run killed in the low-resolution phase resumes to the same weights."""
    from trainer.train import resize_batch

    cfg = TrainConfig(**{**TINY, "epochs": 3, "progressive": "16:1,24:1", "amp": "off", "channels_last": "off",
                         "bn_reestimate": "off"})  # its train-mode passes are not training steps
    model = _model()
    seen: list[tuple[bool, int]] = []
    model.register_forward_pre_hook(lambda m, args: seen.append((m.training, args[0].shape[-1])))
    res = train(model, learnable_data, cfg, out_dir=tmp_path / "full", write_reports=False)
    steps = (len(learnable_data.train_y) + 15) // 16
    train_sizes = [s for training, s in seen if training]
    assert train_sizes == [16] * steps + [24] * steps + [32] * steps
    assert {s for training, s in seen if not training} == {32}
    assert [h["train_px"] for h in res["history"]] == [16.0, 24.0, 32.0]
    assert res["top1"] > 60.0, res["history"]  # still learns the 3 easy classes

    _resumed_after_epoch_1_ends_as(model, learnable_data, cfg, tmp_path)

    # the resize is an antialiased downscale of the whole image: a constant image stays that constant
    x = torch.full((2, 3, 32, 32), 0.7)
    x[:, :, :16] = -0.3  # top half darker: the 16 px image keeps the halves
    small = resize_batch(x, 16)
    assert small.shape == (2, 3, 16, 16)
    torch.testing.assert_close(small[:, :, :7], torch.full((2, 3, 7, 16), -0.3))
    torch.testing.assert_close(small[:, :, 9:], torch.full((2, 3, 7, 16), 0.7))


@pytest.mark.parametrize("spec", ["24:3", "32:1", "24", "24:0", "6:1", "a:b"])
def test_bad_progressive_schedules_are_refused(spec):
    with pytest.raises(ConfigError, match=rf"progressive='{spec}' is invalid: must be empty or SIZE:EPOCHS"):
        TrainConfig(epochs=3, progressive=spec)


class _Weights:
    """The trained model's first conv weight after every optimiser step."""

    def __init__(self):
        self.model, self.steps = None, []

    def on_train_start(self, state):
        self.model = state["model"]
        self.steps.append(next(self.model.parameters()).detach().clone())

    def on_batch_end(self, epoch, step, steps, loss):
        self.steps.append(next(self.model.parameters()).detach().clone())


def test_ema_is_what_is_evaluated_saved_and_returned_and_it_resumes_exactly(learnable_data, tmp_path):
    cfg = TrainConfig(**{**TINY, "ema_decay": 0.9})
    seen = _Weights()
    model = _model()
    res = train(model, learnable_data, cfg, out_dir=tmp_path / "full", callbacks=[seen], write_reports=False)
    expect = seen.steps[0]
    for w in seen.steps[1:]:  # avg = 0.9 avg + 0.1 w after every step, from the initial weights
        expect = 0.9 * expect + 0.1 * w
    ck = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    first = next(iter(ck["model"]))
    torch.testing.assert_close(ck["model"][first], expect, rtol=0, atol=1e-6)
    torch.testing.assert_close(model.state_dict()[first], ck["model"][first], rtol=0, atol=0)  # returned = saved
    assert not torch.equal(ck["train_model"][first], ck["model"][first])  # the raw weights kept for resuming
    from trainer import evaluate
    assert evaluate(model, learnable_data.test_x, learnable_data.test_y)["top1"] == res["top1"]

    _resumed_after_epoch_1_ends_as(model, learnable_data, cfg, tmp_path)


def test_weights_only_checkpoint_quantizes_but_does_not_resume(learnable_data, tmp_path):
    from pipeline.quantize import load_baseline
    from trainer import model_meta, save_weights_only
    cfg = TrainConfig(**{**TINY, "epochs": 1, "ema_decay": 0.5})
    model = _model()
    train(model, learnable_data, cfg, out_dir=tmp_path, write_reports=False, meta=model_meta(model))
    slim = save_weights_only(tmp_path / "checkpoint.pt", tmp_path / "ref.pt")
    assert slim.stat().st_size < 0.5 * (tmp_path / "checkpoint.pt").stat().st_size  # no momentum, no raw weights
    fp32, ck = load_baseline(slim)
    for (k, a), b in zip(model.state_dict().items(), fp32.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
    (tmp_path / "again").mkdir()
    shutil.copy(slim, tmp_path / "again" / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="weights only .* cannot resume"):
        train(_model(), learnable_data, cfg, out_dir=tmp_path / "again", resume=True)


def test_final_figures_are_fp32_even_when_training_under_autocast(learnable_data):
    from trainer import evaluate
    cfg = TrainConfig(**{**TINY, "epochs": 1, "amp": "on"})
    model = _model()
    with two_threads():
        res = train(model, learnable_data, cfg, write_reports=False)
    assert res["amp"] is True
    fp32 = evaluate(model, learnable_data.test_x, learnable_data.test_y, amp=False)
    assert res["top1"] == fp32["top1"] and res["history"][-1]["test_loss"] == fp32["loss"]


@pytest.mark.parametrize("setting, re_estimated", [("auto", True), ("off", False), ("on", True)])
def test_a_short_run_ends_with_bn_statistics_of_its_final_weights(learnable_data, setting, re_estimated, monkeypatch):
    """A run of a few steps leaves BN running averages (momentum 0.1) that describe earlier weights, and in eval
    mode the predictions collapse to one class (1 epoch on 2,000 CIFAR images: 10.00% test, docs/lab). Short runs
    ("auto": fewer than SHORT_RUN_STEPS steps) end with the statistics re-estimated on the final weights: then a
    second re-estimation changes nothing, while without it the statistics are the lagging averages."""
    import copy

    from trainer.train import reestimate_bn
    tt = importlib.import_module("trainer.train")  # the module (trainer.train is also the function)
    cfg = TrainConfig(**{**TINY, "epochs": 1, "bn_reestimate": setting})
    model = _model()
    with two_threads():
        train(model, learnable_data, cfg, write_reports=False)
    again = copy.deepcopy(model)
    assert reestimate_bn(again, learnable_data.train_x) == 1  # 192 images: one batch of 250
    stats = lambda m: [t for k, t in m.state_dict().items() if "running_" in k]  # noqa: E731
    same = all(torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(stats(model), stats(again)))
    assert same == re_estimated
    if setting == "auto":  # a run of SHORT_RUN_STEPS steps or more keeps its running averages
        monkeypatch.setattr(tt, "SHORT_RUN_STEPS", 12)  # 192 images / 16 = 12 steps
        long_run = _model()
        with two_threads():
            train(long_run, learnable_data, cfg, write_reports=False)
        again = copy.deepcopy(long_run)
        reestimate_bn(again, learnable_data.train_x)
        assert not all(torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(stats(long_run), stats(again)))
