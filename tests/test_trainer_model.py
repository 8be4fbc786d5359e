import pytest
import torch

from trainer.model import MobileNetV2, count_params, model_from_meta, model_meta


def test_full_width_parameter_count_matches_reference():
    n = count_params(MobileNetV2(num_classes=10, width=1.0))
    assert 2_200_000 <= n <= 2_300_000
    assert n == 2_236_682


@pytest.mark.parametrize("width", [0.25, 0.5, 1.0])
def test_batch_one_shape_and_finite(width):
    m = MobileNetV2(num_classes=10, width=width).eval()
    out = m(torch.randn(1, 3, 32, 32))
    assert out.shape == (1, 10) and torch.isfinite(out).all()


def test_layer_names_are_stable():
    names = {n for n, _ in MobileNetV2(width=0.25).named_modules()}
    for n in ["stem.conv", "stem.bn", "blocks.0.dw.conv", "blocks.0.project.conv", "blocks.1.expand.conv",
              "blocks.16.project.conv", "head.conv", "classifier"]:
        assert n in names
    assert "blocks.0.expand.conv" not in names  # t == 1: no expansion
    assert "blocks.17.dw.conv" not in names


def test_every_conv_is_followed_by_bn_and_cifar_strides():
    m = MobileNetV2(width=0.5)
    convs = [n for n, x in m.named_modules() if isinstance(x, torch.nn.Conv2d)]
    bns = {n for n, x in m.named_modules() if isinstance(x, torch.nn.BatchNorm2d)}
    assert all(c.replace(".conv", ".bn") in bns for c in convs)
    assert m.stem.conv.stride == (1, 1) and m.blocks[1].dw.conv.stride == (1, 1)
    feats = m.head(m.blocks(m.stem(torch.randn(1, 3, 32, 32))))
    assert feats.shape[-2:] == (4, 4)  # three stride-2 stages: 32 -> 4


def test_meta_round_trip():
    m = MobileNetV2(num_classes=7, width=0.5, dropout=0.1)
    m2 = model_from_meta(model_meta(m))
    assert m2.load_state_dict(m.state_dict()) is not None and m2.num_classes == 7
