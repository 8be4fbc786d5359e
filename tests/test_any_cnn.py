"""Any CNN (issue 33): ResNet-20 and a network the project has never seen (tests/nets/vgg_like.py: convs with
bias and no BN, a grouped conv, max-pooling, a Linear chain) through train, quantize, pack, eval and export,
with their layers found by tracing; and one clear error for what bitsearch cannot handle."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bitsearch.cli import main
from conftest import make_tree

NETS = Path(__file__).resolve().parent / "nets"
MODELS = {"resnet20": "resnet20", "user": f"{NETS / 'vgg_like.py'}:build"}


def _last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(tree, {model: checkpoint}): each network trained 3 epochs on a tiny learnable tree."""
    root = tmp_path_factory.mktemp("anycnn")
    tree = make_tree(root / "tiny", n_train=20, n_test=6)
    cks = {}
    for key, spec in MODELS.items():
        assert main(["train", "--model", spec, "--data", str(tree), "--out", str(root / key), "--epochs", "3",
                     "--batch-size", "16", "--lr", "0.05", "--val-size", "9", "--device", "cpu", "--no-download"]) == 0
        cks[key] = root / key / "checkpoint.pt"
    return tree, cks


def test_traced_layer_facts_equal_mobilenets_own_description():
    """Tracing finds in MobileNet-v2 exactly what the model says of itself: every conv and linear in order, the
    BN folded into each, which inputs come from ReLU6 and which ReLU6 a layer may absorb."""
    from quantization.trace import traced_layers
    from trainer.model import MobileNetV2
    m = MobileNetV2(num_classes=10, width=0.5)
    own, traced = m.quantizable_layers(), traced_layers(m)
    fields = ("name", "bn", "input_relu6", "relu6_source")
    assert [tuple(getattr(i, f) for f in fields) for i in traced] == [tuple(getattr(i, f) for f in fields) for i in own]


def test_resnet20_is_he_et_als_network():
    from trainer import build_model, count_params
    from quantization.trace import traced_layers
    model, meta = build_model("resnet20", 10)
    assert meta == {"arch": "resnet20", "num_classes": 10} and 0.26e6 < count_params(model) < 0.28e6
    layers = traced_layers(model)  # 19 convs and the classifier; every conv but the stem reads a ReLU output
    assert len(layers) == 20 and layers[0].name == "stem.conv" and layers[-1].name == "classifier"
    assert all(i.bn for i in layers[:-1]) and all(i.input_nonneg for i in layers[1:]) and not layers[0].input_nonneg


def test_blocks_come_from_the_models_own_structure():
    """A per-block search's blocks: the children of a model's Sequential of units (MobileNet-v2's 17 inverted
    residuals, ResNet-20's 9 basic blocks, stem and classifier outside), else stages of convolutions by the
    resolution they read (a flat network); a Linear is in no stage."""
    from torch import nn

    from quantization.api import described_layers, layer_blocks
    from trainer import build_model
    mnv2 = build_model("mobilenetv2", 10, width=0.5)[0]
    blocks = layer_blocks(mnv2)
    assert [b for b, _ in blocks] == [f"blocks.{i}" for i in range(17)]
    assert [n for _, ls in blocks for n in ls] == [i.name for i in described_layers(mnv2) if i.name.startswith("blocks.")]
    blocks = dict(layer_blocks(build_model("resnet20", 10)[0]))
    assert blocks == {f"layers.{i}": [f"layers.{i}.conv1", f"layers.{i}.conv2"] for i in range(9)}
    user = build_model(MODELS["user"], 10)[0]
    assert layer_blocks(user) == [("stage0@32x32", ["features.0"]), ("stage1@16x16", ["features.3"]),
                                  ("stage2@8x8", ["features.7"])]
    flat = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                         nn.Flatten(), nn.Linear(16 * 16 * 16, 10))
    assert layer_blocks(flat) == [("stage0@32x32", ["0", "2", "4"]), ("stage1@16x16", ["6"])]
    assert flat.training  # the probe forward leaves the model as it found it


@pytest.mark.parametrize("key", list(MODELS))
def test_a_network_trains_quantizes_packs_and_exports(trained, key, tmp_path, capsys):
    """The model is recorded in the checkpoint (no --model after train); W8A8 and W4A8 files are exactly their
    reported size, the first conv and the classifier stay FP32 (found by position, not name), inputs after
    ReLU get an unsigned grid, and onnxruntime agrees with the packed model."""
    tree, cks = trained
    ck = cks[key]
    from trainer import load_checkpoint
    meta = load_checkpoint(ck)["meta"]
    assert meta["arch"] == ("resnet20" if key == "resnet20" else "file")
    for w in (8, 4):
        packed = tmp_path / f"w{w}.bsq"
        assert main(["quantize", "--checkpoint", str(ck), "--data", str(tree), "--w-bits", str(w), "--a-bits", "8",
                     "--export", str(packed), "--out", str(tmp_path / f"q{w}"), "--device", "cpu", "--no-download",
                     "--json"]) == 0
        q = _last_json(capsys)
        assert os.path.getsize(packed) == q["comp_bytes"] == q["export_bytes"]
        rows = {r["layer"]: r for r in q["layers"]}
        fp32 = {n for n, r in rows.items() if r["w_bits"] == 32 and r["params"]}
        assert fp32 == ({"stem.conv", "classifier"} if key == "resnet20" else {"features.0", "head.4"})
        assert {r["w_bits"] for n, r in rows.items() if r["params"] and n not in fp32} == {w}
        assert main(["export", "--packed", str(packed), "--out", str(tmp_path / f"w{w}.onnx"), "--check", str(tree),
                     "--no-download", "--json"]) == 0
        ex = _last_json(capsys)  # on 18 images: at most one may differ (another CPU's kernels round differently)
        n = ex["test_images"]
        assert ex["agreement"] >= 100 * (n - 1) / n and abs(ex["onnx_top1"] - ex["packed_top1"]) <= 100 / n + 1e-4, ex
        if key == "resnet20" and w == 8:  # residual adds on quantized tensors: every add but the last (read by
            # pooling and the FP32 classifier) is a QLinearAdd, and so every quantized conv but that block's conv2
            assert ex["ops"].get("QLinearAdd") == 8 and ex["integer_convs"] == 17 and ex["convs"] == 19, ex["ops"]
    from quantization.api import quant_layers
    from quantization.packing import load_packed
    from trainer import model_from_meta
    model = load_packed(tmp_path / "w8.bsq", model_from_meta)
    unsigned = [m.aq.signed is False for n, m in quant_layers(model).items() if m.aq is not None]
    assert unsigned and all(unsigned)  # every quantized layer of these nets reads a ReLU output


@pytest.mark.parametrize("spec, message", [
    ("vgg16", "model='vgg16' is invalid: a built-in (mobilenetv2, resnet20) or FILE.py:FUNCTION"),
    ("missing.py:build", "no file"),
    (f"{NETS / 'vgg_like.py'}:nope", "vgg_like.py has no function nope"),
    (f"{NETS / 'bad_nets.py'}:not_a_module", "returned a list, not a torch nn.Module"),
    (f"{NETS / 'bad_nets.py'}:branchy", "Branchy cannot be traced by torch.fx"),
    (f"{NETS / 'bad_nets.py'}:group_norm", "module norm (GroupNorm) has weights bitsearch cannot quantize or fold"),
])
def test_a_network_bitsearch_cannot_handle_is_one_clear_error(spec, message, tmp_path, capsys):
    tree = make_tree(tmp_path / "t", n_train=4, n_test=2)
    code = main(["train", "--model", spec, "--data", str(tree), "--out", str(tmp_path / "o"), "--epochs", "1",
                 "--device", "cpu", "--no-download"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o" / "checkpoint.pt").exists()


def test_a_packed_user_network_whose_file_changed_is_refused(trained, tmp_path, capsys):
    """The packed file records the network's file and its sha256: a changed file is not silently rebuilt."""
    import shutil
    tree, cks = trained
    src = tmp_path / "net.py"
    shutil.copy(NETS / "vgg_like.py", src)
    assert main(["train", "--model", f"{src}:build", "--data", str(tree), "--out", str(tmp_path / "b"), "--epochs", "1",
                 "--batch-size", "16", "--val-size", "9", "--device", "cpu", "--no-download"]) == 0
    packed = tmp_path / "m.bsq"
    assert main(["quantize", "--checkpoint", str(tmp_path / "b" / "checkpoint.pt"), "--data", str(tree), "--export",
                 str(packed), "--out", str(tmp_path / "q"), "--device", "cpu", "--no-download"]) == 0
    capsys.readouterr()
    src.write_text(src.read_text() + "\n# edited\n")
    assert main(["eval", "--packed", str(packed), "--data", str(tree), "--device", "cpu", "--no-download"]) == 2
    err = capsys.readouterr().err
    assert "changed since the model was trained" in err and len(err.strip().splitlines()) == 1, err
