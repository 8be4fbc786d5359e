from pathlib import Path

import numpy as np
import pytest
import torch

from quantization import QuantConfig, calibrate, prepare
from quantization.actmem import activation_memory
from quantization.packing import (FILE_ROW, PackedFileError, convert, load_packed, pack_bits, packed_nbytes, save_packed,
                                  size_report, unpack_bits)
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
    QuantConfig(w_bits=2, a_bits=8),
    QuantConfig(w_bits=2, a_bits=3, a_observer="mse", keep_fp32=(),
                overrides=({"pattern": "blocks.1*", "w_bits": 5}, {"pattern": "classifier", "a_bits": 32})),
    QuantConfig(w_bits=3, a_bits=32, method="lsq"),
], ids=["w8a8", "w4a4-asym", "w2a8", "mixed", "w3-lsq"])
def test_reported_size_is_the_file_size_and_outputs_match(tmp_path, cfg):
    m = _model()
    x = torch.randn(8, 3, 32, 32)
    q = prepare(m, cfg)
    calibrate(q, [torch.randn(32, 3, 32, 32)])
    q.eval()
    packed = convert(q, model_meta(m))
    size = size_report(packed, m)
    info = save_packed(tmp_path / "m.bsq", packed)
    on_disk = (tmp_path / "m.bsq").stat().st_size
    assert on_disk == info["file_bytes"] == size["comp_bytes"] == round(size["comp_mb"] * 1e6)  # what `ls -l` shows
    assert size["ratio"] == size["orig_bytes"] / on_disk
    assert sum(r["total_bytes"] for r in size["layers"]) == on_disk  # the per-layer table sums to the file
    file_row = next(r for r in size["layers"] if r["layer"] == FILE_ROW)
    assert file_row["header_bytes"] == info["header_bytes"] and 0 < file_row["header_bytes"] < 0.05 * on_disk
    assert size["orig_bytes"] == 4 * sum(p.numel() for p in m.parameters())
    assert not list(tmp_path.glob("*.tmp"))
    loaded = load_packed(tmp_path / "m.bsq", model_from_meta)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), q(x), rtol=0, atol=1e-6)
    # the packed weights use no byte per value: packed bytes == ceil(n * bits / 8) per layer
    for r in size["layers"]:
        if r["w_bits"] is not None and r["w_bits"] < 32:
            assert r["packed_bytes"] == -(-r["params"] * r["w_bits"] // 8)


def test_size_accounting_counts_every_scale_and_zero_point():
    m = _model()
    sym = size_report(convert(prepare(m, QuantConfig(w_bits=4, a_bits=32)), model_meta(m)), m)
    asym = size_report(convert(prepare(m, QuantConfig(w_bits=4, a_bits=32, w_symmetric=False)), model_meta(m)), m)
    n_channels = sum(mod.out_channels for n, mod in m.named_modules() if isinstance(mod, torch.nn.Conv2d) and n != "stem.conv")
    assert sym["metadata_bytes"] == 4 * n_channels          # one fp32 scale per output channel
    assert asym["metadata_bytes"] == 5 * n_channels         # + one uint8 zero-point each
    payload = lambda r: r["comp_bytes"] - r["header_bytes"]  # noqa: E731
    assert payload(asym) - payload(sym) == n_channels
    assert 0 < sym["quantized_fraction"] < 1


@pytest.fixture(scope="module")
def packed_file(tmp_path_factory):
    m = _model()
    cfg = QuantConfig(w_bits=4, a_bits=4, w_symmetric=False)
    q = prepare(m, cfg)
    calibrate(q, [torch.randn(16, 3, 32, 32)])
    path = tmp_path_factory.mktemp("packed") / "m.bsq"
    save_packed(path, convert(q, model_meta(m)))
    return path


def _bad(tmp_path, data: bytes):
    p = tmp_path / "bad.bsq"
    p.write_bytes(data)
    with pytest.raises(PackedFileError) as e:
        load_packed(p, model_from_meta)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_every_edit_of_header_or_payload_is_caught(packed_file, tmp_path):
    from quantization.packing import PREAMBLE
    raw = packed_file.read_bytes()
    hlen = PREAMBLE.unpack_from(raw)[2]
    rng = np.random.default_rng(0)
    header_pos = rng.integers(PREAMBLE.size, PREAMBLE.size + hlen, 60)
    payload_pos = rng.integers(PREAMBLE.size + hlen, len(raw), 60)
    for pos in [*header_pos, *payload_pos, len(raw) - 1]:
        bad = bytearray(raw)
        bad[pos] = (bad[pos] + int(rng.integers(1, 256))) % 256
        msg = _bad(tmp_path, bytes(bad))
        assert "checksum" in msg or "truncated" in msg, msg


@pytest.mark.parametrize("offset", [6, 7, 8, 9])  # the u32 header length after magic and version
def test_a_flipped_header_length_byte_says_the_header_is_corrupt(packed_file, tmp_path, offset):
    raw = bytearray(packed_file.read_bytes())
    raw[offset] ^= 0x01 << (offset - 6)
    msg = _bad(tmp_path, bytes(raw))
    assert "header is corrupt" in msg and "truncated" not in msg, msg


@pytest.mark.parametrize("cut", [0, 3, 4, 5, 9, 13, 14, 45, -33, -1])
def test_truncated_files_are_a_clear_error(packed_file, tmp_path, cut):
    raw = packed_file.read_bytes()
    _bad(tmp_path, raw[:cut] if cut >= 0 else raw[:len(raw) + cut])


def _rewrite(path: Path, edit) -> bytes:
    """The file with its header changed by ``edit`` and a *valid* checksum (a deliberate forgery)."""
    import hashlib
    import json
    import zlib
    from quantization.packing import DIGEST_BYTES, PREAMBLE
    raw = path.read_bytes()
    magic, version, hlen, plen = PREAMBLE.unpack_from(raw)
    header = json.loads(zlib.decompress(raw[PREAMBLE.size:PREAMBLE.size + hlen]))
    edit(header)
    h = zlib.compress(json.dumps(header).encode())
    payload = raw[PREAMBLE.size + hlen:-DIGEST_BYTES]
    body = PREAMBLE.pack(magic, version, len(h), len(payload)) + h + payload
    return body + hashlib.sha256(body).digest()


def _set_qmin(h):
    h["tensors"][0][4] += 1


def _drop_tensor(h):
    h["tensors"].pop(3)


@pytest.mark.parametrize("edit, expect", [
    (_set_qmin, "tensor table does not fit"),
    (_drop_tensor, "missing"),
    (lambda h: h["config"].update(w_bits=3), "tensor table does not fit"),
    (lambda h: h["config"].update(w_bits=1), "config is invalid"),
    (lambda h: h["model"].update(width="wide"), "cannot be built"),
    (lambda h: h.pop("tensors"), "lacks"),
], ids=["qmin", "missing-tensor", "bits", "bad-bits", "bad-model", "no-table"])
def test_forged_headers_with_valid_checksum_do_not_load(packed_file, tmp_path, edit, expect):
    msg = _bad(tmp_path, _rewrite(packed_file, edit))
    assert expect in msg, msg


def test_missing_or_directory_path(tmp_path):
    with pytest.raises(PackedFileError, match="cannot be read"):
        load_packed(tmp_path / "none.bsq", model_from_meta)
    with pytest.raises(PackedFileError, match="is a directory"):
        load_packed(tmp_path, model_from_meta)


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


@pytest.mark.parametrize("width, w_bits, a_bits, outputs", [(0.25, 8, 2, True), (0.25, 4, 4, False), (0.5, 8, 8, True),
                                                         ("resnet20", 8, 4, True)])
def test_every_tensor_counted_below_32_bits_holds_at_most_2_pow_b_values(width, w_bits, a_bits, outputs):
    """Run the traced model and count the distinct values of each tensor as it is stored: as computed when a
    quantizer writes it (a layer's output quantizer, a block's SharedInput), else the output of its only
    reader's input quantizer when it has exactly one reader (through views) that quantizes it. Without
    quantize_outputs the residual sums (read by the next block and the next add) are computed in FP32, so
    counting them at a_bits would fail here; with it every residual add reads and writes quantized tensors."""
    from torch import fx
    from quantization.actmem import input_quantizer, is_view, output_quantizer, tensor_table

    from trainer.resnet import ResNet20
    torch.manual_seed(0)
    m = (ResNet20() if width == "resnet20" else MobileNetV2(num_classes=10, width=width)).eval()
    q = prepare(m, QuantConfig(w_bits=w_bits, a_bits=a_bits, keep_fp32=("stem.conv",), quantize_outputs=outputs))
    calibrate(q, [torch.randn(8, 3, 32, 32)])
    gm, table = tensor_table(q)
    modules = dict(gm.named_modules())
    values = {}

    class Record(fx.Interpreter):
        def run_node(self, n):
            values[n] = super().run_node(n)
            return values[n]

    Record(gm).run(torch.randn(4, 3, 32, 32))

    def readers(n):
        return [r for u in n.users for r in (readers(u) if is_view(u, modules) else [u])]

    counted = [t for t in table if t.numel and t.bits < 32]
    assert len(counted) > 10
    for t in counted:
        rs = readers(t.node)
        written = t.node.op == "call_module" and output_quantizer(modules[t.node.target]) is not None
        aq = input_quantizer(modules[rs[0].target]) if len(rs) == 1 and rs[0].op == "call_module" else None
        stored = aq(values[t.node]) if aq is not None and not written else values[t.node]
        assert stored.unique().numel() <= 2 ** t.bits, (t.node.name, t.bits, stored.unique().numel())
    is_add = lambda n: n.op == "call_function" and "add" in str(n.target)  # noqa: E731
    adds = [t for t in table if is_add(t.node)]
    if outputs and width == "resnet20":  # a traced model: each sum's ReLU output is written once on its grid,
        # but the last one, which only pooling reads (the classifier reads the pooled tensor)
        relu = [t for t in table if any(u in [a.node for a in adds] for u in t.node.all_input_nodes)]
        assert [t.bits for t in relu] == [a_bits] * 8 + [32], [(t.node.name, t.bits) for t in relu]
        return
    if outputs:  # each residual sum is written once on its grid, then read by the next block's SharedInput
        assert adds and all(t.bits == a_bits for t in adds)
        return
    # a residual sum that a later add reads again is kept at 32 bits; one read only by the next conv is not
    carried = [t for t in adds if any(is_add(u) for u in readers(t.node))]
    assert carried and all(t.bits == 32 for t in carried)
