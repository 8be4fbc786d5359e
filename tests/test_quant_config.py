import pytest

from quantization import QuantConfig, QuantConfigError, prepare
from trainer.model import MobileNetV2


@pytest.mark.parametrize("kw, message", [
    ({"w_bits": 0}, "w_bits=0 is out of range"),
    ({"w_bits": 1}, "w_bits=1 is out of range"),
    ({"a_bits": 33}, "a_bits=33 is out of range"),
    ({"w_bits": "four"}, "is not a number"),
    ({"w_bits": 4.5}, "out of range"),
    ({"method": "magic"}, "method='magic' is invalid"),
    ({"w_granularity": "per-row"}, "allowed per-channel, per-tensor"),
    ({"a_granularity": "per-channel"}, "activations have no fixed channel set"),
    ({"a_observer": "max"}, "allowed minmax, ema, percentile, mse"),
    ({"calib_batches": 0}, "calib_batches=0"),
    ({"bn_live_below_bits": -1}, "bn_live_below_bits=-1 is invalid"),
    ({"freeze_bn_epoch": 1.5}, "freeze_bn_epoch=1.5 is invalid"),
    ({"live_bn_lr_factor": 0}, "live_bn_lr_factor=0.0 is invalid: a number > 0"),
    ({"bn_reestimate_batches": -1}, "bn_reestimate_batches=-1 is invalid: an integer >= 0"),
    ({"percentile": "high"}, "is not a number"),
    ({"colour": 3}, "unknown quantization option"),
    ({"overrides": [{"pattern": "blocks.1.*", "w_bits": 9}]}, "overrides\\[blocks.1.\\*\\].w_bits=9"),
    ({"overrides": [{"w_bits": 4}]}, "has no pattern"),
])
def test_bad_configs_one_clear_error(kw, message):
    with pytest.raises(QuantConfigError, match=message) as e:
        QuantConfig.from_dict(kw)
    assert "\n" not in str(e.value)


def test_unknown_layer_pattern_and_layer_without_channels():
    m = MobileNetV2(width=0.25)
    with pytest.raises(QuantConfigError, match="'blocks.99.\\*' is invalid: it matches no layer"):
        prepare(m, QuantConfig(overrides=({"pattern": "blocks.99.*", "w_bits": 4},)))
    with pytest.raises(QuantConfigError, match="no weight channels"):
        prepare(m, QuantConfig(overrides=({"pattern": "blocks.2.dw.bn", "w_granularity": "per-channel"},)))


def test_round_trip_dict_and_yaml():
    c = QuantConfig(w_bits=4, a_bits=6, method="lsq", keep_fp32=("classifier",),
                    overrides=({"pattern": "stem.conv", "w_bits": 8, "a_bits": 8}, {"pattern": "blocks.1?.*", "w_bits": 2}))
    import yaml  # the CLI's path: a YAML quantize: section -> from_dict
    assert QuantConfig.from_dict(c.to_dict()) == c
    assert QuantConfig.from_dict(yaml.safe_load(yaml.safe_dump(c.to_dict()))) == c
    assert QuantConfig.from_dict(yaml.safe_load("w_bits: '3'\na_bits: 32\n")) == QuantConfig(w_bits=3, a_bits=32)
    # packed headers and sensitivity cache keys leave out the settings added later that only steer the procedure
    later = {"bn_live_below_bits", "live_bn_lr_factor", "bn_reestimate_batches"}
    assert later <= set(c.to_dict()) and not later & set(c.to_dict(procedure=False))


def test_plan_resolves_exceptions_overrides_and_mixed_precision():
    m = MobileNetV2(width=0.25)
    c = QuantConfig(w_bits=4, a_bits=8, keep_fp32=("classifier", "stem.conv"),
                    overrides=({"pattern": "stem.conv", "w_bits": 8, "a_bits": 8}, {"pattern": "blocks.3.*", "w_bits": 2},
                               {"pattern": "head.conv", "w_granularity": "per-tensor"}))
    q = prepare(m, c)
    plan = q.bitsearch_plan
    assert plan["classifier"].w_bits == 32 and not plan["classifier"].quantized
    assert plan["stem.conv"].w_bits == 8
    assert plan["blocks.3.dw.conv"].w_bits == 2 and plan["blocks.4.dw.conv"].w_bits == 4
    assert q.head.conv.wq.axis is None and q.blocks[3].dw.conv.wq.bits == 2
    assert type(q.classifier).__name__ == "Linear"
    # weights-only: activations FP32
    q2 = prepare(m, QuantConfig(w_bits=4, a_bits=32))
    assert q2.blocks[3].dw.conv.aq is None and q2.blocks[3].dw.conv.wq is not None
