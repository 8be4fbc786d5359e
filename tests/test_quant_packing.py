import numpy as np
import pytest
import torch

from quantization import QuantConfig, calibrate, prepare
from quantization.actmem import activation_memory
from quantization.packing import PackedFileError, convert, load_packed, pack_bits, packed_nbytes, save_packed, size_report, unpack_bits
from trainer.model import MobileNetV2, model_from_meta, model_meta


@pytest.mark.parametrize("bits", range(2, 9))
def test_pack_unpack_round_trip(bits):
    rng = np.random.default_rng(bits)
    for n in (1, 7, 8, 1001):
        codes = rng.integers(0, 2 ** bits, n).astype(np.uint8)
        data = pack_bits(codes, bits)
        assert len(data) == packed_nbytes(n, bits) == -(-n * bits // 8)
        assert np.array_equal(unpack_bits(data, bits, n), codes)


def _model():
    torch.manual_seed(0)
    m = MobileNetV2(num_classes=10, width=0.25).eval()
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.2, 0.2)
            mod.running_var.uniform_(0.5, 2)
            mod.weight.data.uniform_(0.5, 1.5)
    return m


@pytest.mark.parametrize("cfg", [
    QuantConfig(w_bits=8, a_bits=8),
    QuantConfig(w_bits=4, a_bits=4, w_symmetric=False, a_symmetric=True, w_granularity="per_tensor"),
    QuantConfig(w_bits=2, a_bits=3, a_observer="mse", keep_fp32=(),
                overrides=({"pattern": "blocks.1*", "w_bits": 5}, {"pattern": "classifier", "a_bits": 32})),
    QuantConfig(w_bits=3, a_bits=32, method="lsq"),
], ids=["w8a8", "w4a4-asym", "mixed", "w3-lsq"])
def test_packed_file_size_and_outputs(tmp_path, cfg):
    m = _model()
    x = torch.randn(8, 3, 32, 32)
    q = prepare(m, cfg)
    calibrate(q, [torch.randn(32, 3, 32, 32)])
    q.eval()
    entries = convert(q)
    size = size_report(entries, m, q.bitsearch_plan)
    info = save_packed(tmp_path / "m.bsq", entries, model_meta=model_meta(m), config=cfg)
    on_disk = (tmp_path / "m.bsq").stat().st_size
    assert on_disk == info["file_bytes"]
    assert on_disk - info["header_bytes"] == size["comp_bytes"]  # accounting == file, to within the header
    assert size["orig_bytes"] == 4 * sum(p.numel() for p in m.parameters())
    loaded = load_packed(tmp_path / "m.bsq", model_from_meta)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), q(x), rtol=0, atol=1e-6)
    # the packed weights use no byte per value: packed bytes == ceil(n * bits / 8) per layer
    for r in size["layers"]:
        if r["w_bits"] < 32:
            assert r["packed_bytes"] == -(-r["params"] * r["w_bits"] // 8)


def test_size_accounting_counts_every_scale_and_zero_point():
    m = _model()
    sym = size_report(convert(prepare(m, QuantConfig(w_bits=4, a_bits=32))), m)
    asym = size_report(convert(prepare(m, QuantConfig(w_bits=4, a_bits=32, w_symmetric=False))), m)
    n_channels = sum(mod.out_channels for n, mod in m.named_modules() if isinstance(mod, torch.nn.Conv2d) and n != "stem.conv")
    assert sym["metadata_bytes"] == 4 * n_channels          # one fp32 scale per output channel
    assert asym["metadata_bytes"] == 5 * n_channels         # + one uint8 zero-point each
    assert asym["comp_bytes"] - sym["comp_bytes"] == n_channels
    assert 0 < sym["quantized_fraction"] < 1


def test_corrupt_packed_file(tmp_path):
    m = _model()
    q = prepare(m, QuantConfig(w_bits=4, a_bits=32))
    save_packed(tmp_path / "m.bsq", convert(q), model_meta=model_meta(m), config=QuantConfig(w_bits=4, a_bits=32))
    raw = bytearray((tmp_path / "m.bsq").read_bytes())
    raw[-10] ^= 0xFF
    (tmp_path / "bad.bsq").write_bytes(bytes(raw))
    with pytest.raises(PackedFileError, match="checksum"):
        load_packed(tmp_path / "bad.bsq", model_from_meta)


def test_activation_memory_is_measured_not_32_over_bits():
    m = _model()
    fp = activation_memory(m)
    assert fp["batch1"]["fp32_bytes"] == fp["batch1"]["quant_bytes"]
    q = prepare(m, QuantConfig(w_bits=8, a_bits=4))
    calibrate(q, [torch.randn(4, 3, 32, 32)])
    am = activation_memory(q)
    assert am["batch1"]["fp32_bytes"] == fp["batch1"]["fp32_bytes"]
    assert am["batch128"]["fp32_bytes"] == 128 * am["batch1"]["fp32_bytes"]
    assert 1 < am["act_ratio"] <= 8
    # keeping more layers FP32 keeps more tensors at 32 bits
    q2 = prepare(m, QuantConfig(w_bits=8, a_bits=4, keep_fp32=("stem.conv", "classifier", "blocks.1*")))
    calibrate(q2, [torch.randn(4, 3, 32, 32)])
    assert activation_memory(q2)["act_ratio"] < am["act_ratio"]
