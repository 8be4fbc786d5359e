"""convert -> a table of tensors to store; the packed file; size accounting from the same table.

File layout (little-endian)::

    b"BSQP" | u16 format version | u32 header length | header (UTF-8 JSON) | payload

The header holds the model description, the quantization config, the tensor table (name, kind,
shape, bits, offset, length) and the payload's SHA-256. The payload is the tensors back to back:

* ``packed``  integer weight codes, ``bits`` bits each (offset by -qmin to be unsigned), as one
  little-endian bit stream per tensor padded to a whole byte: no byte per value;
* ``f32``     float32 (scales, folded biases, FP32 layers, BN of FP32 layers);
* ``u8``      zero-points of asymmetric quantizers.

``size_report`` counts exactly the payload, so ``file size == header + payload`` and the reported
compressed size is what sits on disk apart from the header.
"""
from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from quantization.api import prepare, quant_layers
from quantization.config import QuantConfig
from quantization.primitives import dequantize, quantize

MAGIC = b"BSQP"
FORMAT_VERSION = 1
MB = 1e6  # sizes are reported in MB = 10^6 bytes


class PackedFileError(RuntimeError):
    pass


# ------------------------------------------------------------------------------------------------
# bit packing


def pack_bits(codes: np.ndarray, bits: int) -> bytes:
    """Unsigned integer codes (< 2**bits) -> little-endian bit stream, ceil(n * bits / 8) bytes.

    >>> pack_bits(np.array([1, 2, 3, 0]), 2).hex()
    '39'
    """
    c = np.ascontiguousarray(codes, dtype=np.uint8).reshape(-1)
    if c.size and int(c.max()) >= 2 ** bits:
        raise ValueError(f"code {int(c.max())} does not fit in {bits} bits")
    bitmat = np.unpackbits(c[:, None], axis=1, bitorder="little")[:, :bits]
    return np.packbits(bitmat.reshape(-1), bitorder="little").tobytes()


def unpack_bits(data: bytes, bits: int, n: int) -> np.ndarray:
    """Inverse of pack_bits: the first ``n`` codes of ``bits`` bits each, as uint8."""
    flat = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")[: n * bits]
    return (flat.reshape(n, bits).astype(np.uint16) << np.arange(bits, dtype=np.uint16)).sum(1).astype(np.uint8)


def packed_nbytes(n: int, bits: int) -> int:
    return math.ceil(n * bits / 8)


# ------------------------------------------------------------------------------------------------
# convert


@dataclass
class Entry:
    name: str              # state-dict key in the folded model this tensor loads into
    kind: str              # packed | f32 | u8
    role: str              # weight | weight_fp32 | bias | meta | fp32
    layer: str             # the layer (module prefix) it belongs to
    tensor: torch.Tensor   # codes (int, unsigned offset applied) or values
    shape: tuple[int, ...]
    bits: int = 32
    qmin: int = 0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        n = self.numel
        return packed_nbytes(n, self.bits) if self.kind == "packed" else n * (1 if self.kind == "u8" else 4)

    def payload(self) -> bytes:
        t = self.tensor.detach().cpu()
        if self.kind == "packed":
            return pack_bits((t.to(torch.int32) - self.qmin).numpy(), self.bits)
        if self.kind == "u8":
            return t.to(torch.uint8).numpy().tobytes()
        return t.to(torch.float32).contiguous().numpy().tobytes()


def _layer_of(key: str) -> str:
    parts = key.split(".")
    return ".".join(parts[:-1]) if len(parts) > 1 else key


@torch.no_grad()
def convert(qmodel: nn.Module) -> list[Entry]:
    """The tensors that make up the deployable quantized model (BN folded, integer weight codes)."""
    qmodel = qmodel.eval()
    qlayers = quant_layers(qmodel)
    entries: list[Entry] = []
    for name, m in qlayers.items():
        w, b = m.folded()
        inner = "conv" if hasattr(m, "conv") else "linear"
        wkey, bkey = f"{name}.{inner}.weight", f"{name}.{inner}.bias"
        if m.wq is not None:
            wq = m.wq
            if wq.dynamic:
                wq.observe(w)
            s = wq.effective_scale()
            codes = quantize(w, s, wq.zero_point, wq.qmin, wq.qmax, wq.axis)
            entries.append(Entry(wkey, "packed", "weight", name, codes, tuple(w.shape), wq.bits, wq.qmin))
            entries.append(Entry(f"{name}.wq.scale", "f32", "meta", name, s, tuple(s.shape)))
            if not wq.symmetric:
                entries.append(Entry(f"{name}.wq.zero_point", "u8", "meta", name, wq.zero_point, tuple(s.shape)))
        else:
            entries.append(Entry(wkey, "f32", "weight_fp32", name, w, tuple(w.shape)))
        if b is not None:
            entries.append(Entry(bkey, "f32", "bias", name, b, tuple(b.shape)))
        if m.aq is not None:
            s = m.aq.effective_scale()
            entries.append(Entry(f"{name}.aq.scale", "f32", "meta", name, s, tuple(s.shape)))
            if not m.aq.symmetric:
                entries.append(Entry(f"{name}.aq.zero_point", "u8", "meta", name, m.aq.zero_point, tuple(s.shape)))
    prefixes = tuple(f"{n}." for n in qlayers)
    for key, t in qmodel.state_dict().items():
        if key.startswith(prefixes) or not t.is_floating_point():
            continue  # quant layers handled above; integer counters (num_batches_tracked) are not needed
        role = "weight_fp32" if key.endswith(".weight") and t.ndim >= 2 else "fp32"
        entries.append(Entry(key, "f32", role, _layer_of(key), t, tuple(t.shape)))
    return entries


# ------------------------------------------------------------------------------------------------
# size accounting


def size_report(entries: list[Entry], fp32_model: nn.Module, plan: dict | None = None) -> dict[str, Any]:
    """Per-layer and total sizes of exactly what the packed file stores.

    * ``orig_mb``: the FP32 model's parameters at 4 bytes each (the usual "model size");
    * ``comp_mb``: every stored byte: packed weights, scales, zero-points, biases, FP32 leftovers;
    * ``ratio`` = orig / comp; ``weight_ratio``: conv/linear weights at FP32 vs as stored (no metadata);
    * ``metadata_overhead``: scales + zero-points as a fraction of comp; ``quantized_fraction``: share of
      all parameters stored below 32 bits.
    """
    orig_params = sum(p.numel() for p in fp32_model.parameters())
    rows: dict[str, dict[str, Any]] = {}
    for e in entries:
        r = rows.setdefault(e.layer, {"layer": e.layer, "params": 0, "w_bits": 32, "a_bits": 32, "packed_bytes": 0,
                                      "metadata_bytes": 0, "fp32_bytes": 0})
        n = e.numel
        if e.role == "weight":
            r["params"] += n
            r["w_bits"] = e.bits
            r["packed_bytes"] += e.nbytes
        elif e.role == "meta":
            r["metadata_bytes"] += e.nbytes
        else:
            r["fp32_bytes"] += e.nbytes
            if e.role == "weight_fp32":
                r["params"] += n
    if plan:
        for name, p in plan.items():
            if name in rows:
                rows[name]["a_bits"] = p.a_bits
    for r in rows.values():
        r["total_bytes"] = r["packed_bytes"] + r["metadata_bytes"] + r["fp32_bytes"]
    comp = sum(e.nbytes for e in entries)
    meta = sum(e.nbytes for e in entries if e.role == "meta")
    wq = [e for e in entries if e.role == "weight"]
    wf = [e for e in entries if e.role == "weight_fp32"]
    n_wq = sum(e.numel for e in wq)
    n_w = n_wq + sum(e.numel for e in wf)
    w_stored = sum(e.nbytes for e in wq) + sum(e.nbytes for e in wf)
    return {
        "orig_bytes": orig_params * 4, "comp_bytes": comp,
        "orig_mb": orig_params * 4 / MB, "comp_mb": comp / MB, "ratio": orig_params * 4 / comp,
        "weight_ratio": n_w * 4 / max(1, w_stored), "metadata_bytes": meta, "metadata_overhead": meta / comp,
        "quantized_fraction": n_wq / max(1, orig_params), "params": orig_params,
        "layers": list(rows.values()),
    }


# ------------------------------------------------------------------------------------------------
# file


def save_packed(path: str | Path, entries: list[Entry], *, model_meta: dict, config: QuantConfig,
                extra: dict | None = None) -> dict[str, Any]:
    """Write the packed file; returns {'path', 'file_bytes', 'header_bytes', 'payload_bytes'}."""
    table, chunks, off = [], [], 0
    for e in entries:
        data = e.payload()
        assert len(data) == e.nbytes, (e.name, len(data), e.nbytes)
        table.append({"name": e.name, "kind": e.kind, "role": e.role, "layer": e.layer, "shape": list(e.shape),
                      "bits": e.bits, "qmin": e.qmin, "offset": off, "nbytes": len(data)})
        chunks.append(data)
        off += len(data)
    payload = b"".join(chunks)
    header = json.dumps({"format": "bitsearch-packed", "version": FORMAT_VERSION, "model": model_meta,
                         "config": config.to_dict(), "tensors": table, "payload_bytes": len(payload),
                         "sha256": hashlib.sha256(payload).hexdigest(), "extra": extra or {}},
                        separators=(",", ":")).encode()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(MAGIC + struct.pack("<HI", FORMAT_VERSION, len(header)) + header + payload)
    tmp.replace(p)
    head = len(MAGIC) + 6 + len(header)
    return {"path": str(p), "file_bytes": head + len(payload), "header_bytes": head, "payload_bytes": len(payload)}


def read_packed(path: str | Path) -> tuple[dict, bytes]:
    raw = Path(path).read_bytes()
    if raw[:4] != MAGIC:
        raise PackedFileError(f"{path} is not a bitsearch packed model (bad magic)")
    version, hlen = struct.unpack("<HI", raw[4:10])
    if version != FORMAT_VERSION:
        raise PackedFileError(f"{path} has format version {version}; this bitsearch reads {FORMAT_VERSION}")
    try:
        header = json.loads(raw[10:10 + hlen])
    except ValueError:
        raise PackedFileError(f"{path}: header is corrupt") from None
    payload = raw[10 + hlen:]
    if hashlib.sha256(payload).hexdigest() != header["sha256"] or len(payload) != header["payload_bytes"]:
        raise PackedFileError(f"{path}: checksum mismatch (file is truncated or corrupt)")
    return header, payload


@torch.no_grad()
def load_packed(path: str | Path, build_model: Callable[[dict], nn.Module]) -> nn.Module:
    """Rebuild an inference model from a packed file: ``build_model(header['model'])`` makes the FP32
    architecture; quant layers are folded and get the dequantized integer weights, so the outputs
    equal the fake-quant model's (eval mode)."""
    header, payload = read_packed(path)
    cfg = QuantConfig.from_dict(header["config"]).replace(method="ptq")
    model = prepare(build_model(header["model"]), cfg).eval()
    qlayers = quant_layers(model)
    for m in qlayers.values():
        m.fold_()
    values: dict[str, torch.Tensor] = {}
    codes: dict[str, tuple[np.ndarray, dict]] = {}
    for t in header["tensors"]:
        chunk = payload[t["offset"]: t["offset"] + t["nbytes"]]
        shape = tuple(t["shape"])
        if t["kind"] == "packed":
            n = int(np.prod(shape))
            codes[t["name"]] = (unpack_bits(chunk, t["bits"], n).astype(np.int32) + t["qmin"], t)
        elif t["kind"] == "u8":
            values[t["name"]] = torch.from_numpy(np.frombuffer(chunk, np.uint8).astype(np.int32)).reshape(shape)
        else:
            values[t["name"]] = torch.from_numpy(np.frombuffer(chunk, np.float32).copy()).reshape(shape)
    for name, m in qlayers.items():
        inner = m.conv if hasattr(m, "conv") else m.linear
        for q in (m.wq, m.aq):
            if q is not None:
                q.observing = False
        if m.wq is not None:
            wq = m.wq
            s = values.pop(f"{name}.wq.scale")
            z = values.pop(f"{name}.wq.zero_point", torch.zeros(s.shape, dtype=torch.int32))
            c, t = codes.pop(f"{name}.{'conv' if hasattr(m, 'conv') else 'linear'}.weight")
            wq.scale, wq.zero_point = s, z
            inner.weight.copy_(dequantize(torch.from_numpy(c).reshape(t["shape"]), s, z, wq.axis))
            wq.enabled = False  # the weight already sits on the integer grid
        if m.aq is not None:
            m.aq.scale = values.pop(f"{name}.aq.scale")
            m.aq.zero_point = values.pop(f"{name}.aq.zero_point", torch.zeros((), dtype=torch.int32))
            m.aq.enabled = True
    missing = [k for k in values if k not in model.state_dict()]
    if missing or codes:
        raise PackedFileError(f"{path}: tensors {missing[:3] or list(codes)[:3]} do not fit the model")
    model.load_state_dict(values, strict=False)
    model.bitsearch_header = header
    return model
