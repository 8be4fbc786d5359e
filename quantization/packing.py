"""convert -> the packed model (a table of tensors to store); the file; size accounting from the same bytes.

File layout (format 2, little-endian)::

    b"BSQP" | u16 format version | u32 header length | u32 payload length | header | payload | SHA-256

* header: zlib-compressed JSON: the model description, the quantization config and the tensor
  table (one row per tensor: name, kind, role, bits, qmin, shape). Offsets and byte counts are not
  stored: tensors lie back to back in table order and each one's length follows from kind, bits
  and shape.
* payload: the tensors back to back:

  * ``packed``  integer weight codes, ``bits`` bits each (offset by -qmin to be unsigned), as one
    little-endian bit stream per tensor padded to a whole byte: no byte per value;
  * ``f32``     float32 (scales, folded biases, FP32 layers, BN of FP32 layers);
  * ``u8``      zero-points of asymmetric quantizers.

* SHA-256 of every byte before it (preamble, header and payload): any edit or truncation is caught.

``size_report`` counts the bytes of exactly this file, header and checksum included, so
``comp_bytes == file size`` (what ``ls -l`` shows) for every configuration.
"""
from __future__ import annotations

import hashlib
import json
import math
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from quantization.api import prepare, quant_layers
from quantization.config import Method, QuantConfig, QuantConfigError
from quantization.primitives import dequantize, quantize

MAGIC = b"BSQP"
FORMAT_VERSION = 3
# version 2: the same file, but a traced model (one that does not describe its layers) has FP32 residual adds
READS_VERSIONS = (2, 3)
PREAMBLE = struct.Struct("<4sHII")   # magic, version, header length, payload length
DIGEST_BYTES = 32                    # SHA-256 trailer
KINDS = ("packed", "f32", "u8")
ROLES = ("weight", "weight_fp32", "bias", "meta", "fp32")
MB = 1e6  # sizes are reported in MB = 10^6 bytes


class PackedFileError(RuntimeError):
    """A packed model file is unreadable, corrupt, edited or does not fit its own description."""


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
    tensor: torch.Tensor | None  # codes (int, unsigned offset applied) or values; None in a table read from a file
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

    def row(self) -> list:
        """The entry's line in the file's tensor table."""
        return [self.name, self.kind, self.role, self.bits, self.qmin, list(self.shape)]

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


@dataclass
class Packed:
    """A deployable quantized model: the tensors to store plus what it takes to rebuild the network.
    ``header()`` and ``to_bytes()`` are the file; ``file_bytes`` is its exact size."""
    entries: list[Entry]
    model_meta: dict[str, Any]
    config: QuantConfig
    plan: dict | None = None

    def header(self) -> bytes:
        doc = {"format": "bitsearch-packed", "model": self.model_meta, "config": self.config.to_dict(procedure=False),
               "tensors": [e.row() for e in self.entries]}
        return zlib.compress(json.dumps(doc, separators=(",", ":"), sort_keys=True).encode(), 9)

    @property
    def payload_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries)

    @property
    def overhead_bytes(self) -> int:
        """Everything in the file that is not a tensor: preamble, header (table, config) and checksum."""
        return PREAMBLE.size + len(self.header()) + DIGEST_BYTES

    @property
    def file_bytes(self) -> int:
        return self.overhead_bytes + self.payload_bytes

    def to_bytes(self) -> bytes:
        header = self.header()
        chunks = []
        for e in self.entries:
            data = e.payload()
            assert len(data) == e.nbytes, (e.name, len(data), e.nbytes)
            chunks.append(data)
        payload = b"".join(chunks)
        body = PREAMBLE.pack(MAGIC, FORMAT_VERSION, len(header), len(payload)) + header + payload
        return body + hashlib.sha256(body).digest()


@torch.no_grad()
def convert(qmodel: nn.Module, model_meta: dict[str, Any]) -> Packed:
    """The tensors that make up the deployable quantized model (BN folded, integer weight codes).
    ``model_meta`` is what ``load_packed``'s ``build_model`` needs to rebuild the FP32 architecture."""
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
        for key, q in (("aq", m.aq), ("oq", m.oq)):
            if q is not None:
                s = q.effective_scale()
                entries.append(Entry(f"{name}.{key}.scale", "f32", "meta", name, s, tuple(s.shape)))
                if not q.symmetric:
                    entries.append(Entry(f"{name}.{key}.zero_point", "u8", "meta", name, q.zero_point, tuple(s.shape)))
    prefixes = tuple(f"{n}." for n in qlayers)
    for key, t in qmodel.state_dict().items():
        if key.startswith(prefixes) or not t.is_floating_point():
            continue  # quant layers handled above; integer counters (num_batches_tracked) are not needed
        role = "weight_fp32" if key.endswith(".weight") and t.ndim >= 2 else "fp32"
        entries.append(Entry(key, "f32", role, _layer_of(key), t, tuple(t.shape)))
    return Packed(entries, dict(model_meta), qmodel.bitsearch_qconfig, getattr(qmodel, "bitsearch_plan", None))


# ------------------------------------------------------------------------------------------------
# size accounting

FILE_ROW = "(file: header, tensor table, checksum)"


def size_report(packed: Packed, fp32_model: nn.Module) -> dict[str, Any]:
    """Per-layer and total sizes of exactly the bytes of the packed file.

    * ``orig_mb``: the FP32 model's parameters at 4 bytes each (the usual "model size");
    * ``comp_mb``: the packed file's size: packed weights, scales, zero-points, biases, FP32 leftovers,
      and the file's own header (config, tensor table) and checksum. ``comp_bytes`` == ``ls -l``;
    * ``ratio`` = orig / comp; ``weight_ratio``: conv/linear weights at FP32 vs as stored (no metadata);
    * ``metadata_bytes``: scales + zero-points; ``metadata_overhead``: those plus the file header as a
      fraction of comp; ``quantized_fraction``: share of all parameters stored below 32 bits;
    * ``avg_w_bits``: bits per stored weight over the quantized conv/linear layers (parameter-weighted;
      equals w_bits for a uniform config); ``avg_a_bits``: mean activation bit-width over the layers
      whose input is quantized (32 if none is).

    ``layers`` has one row per layer plus one for the file header; their ``total_bytes`` sum to comp.
    """
    entries = packed.entries
    orig_params = sum(p.numel() for p in fp32_model.parameters())
    rows: dict[str, dict[str, Any]] = {}
    blank = {"params": 0, "w_bits": 32, "a_bits": 32, "packed_bytes": 0, "metadata_bytes": 0, "fp32_bytes": 0,
             "header_bytes": 0}
    for e in entries:
        r = rows.setdefault(e.layer, {"layer": e.layer, **blank})
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
    for name, p in (packed.plan or {}).items():
        if name in rows:
            rows[name]["a_bits"] = p.a_bits
    overhead = packed.overhead_bytes
    rows[FILE_ROW] = {"layer": FILE_ROW, **blank, "w_bits": None, "a_bits": None, "header_bytes": overhead}
    for r in rows.values():
        r["total_bytes"] = r["packed_bytes"] + r["metadata_bytes"] + r["fp32_bytes"] + r["header_bytes"]
    comp = packed.payload_bytes + overhead
    meta = sum(e.nbytes for e in entries if e.role == "meta")
    wq = [e for e in entries if e.role == "weight"]
    wf = [e for e in entries if e.role == "weight_fp32"]
    n_wq = sum(e.numel for e in wq)
    n_w = n_wq + sum(e.numel for e in wf)
    w_stored = sum(e.nbytes for e in wq) + sum(e.nbytes for e in wf)
    a_bits = [r["a_bits"] for r in rows.values() if r["layer"] != FILE_ROW and r["a_bits"] and r["a_bits"] < 32]
    return {
        "orig_bytes": orig_params * 4, "comp_bytes": comp, "header_bytes": overhead,
        "orig_mb": orig_params * 4 / MB, "comp_mb": comp / MB, "comp_kb": comp / 1000, "ratio": orig_params * 4 / comp,
        "weight_ratio": n_w * 4 / max(1, w_stored), "metadata_bytes": meta,
        "metadata_overhead": (meta + overhead) / comp,
        "quantized_fraction": n_wq / max(1, orig_params), "params": orig_params,
        "avg_w_bits": sum(e.numel * e.bits for e in wq) / n_wq if n_wq else 32.0,
        "avg_a_bits": sum(a_bits) / len(a_bits) if a_bits else 32.0,
        "layers": list(rows.values()),
    }


# ------------------------------------------------------------------------------------------------
# file


def save_packed(path: str | Path, packed: Packed) -> dict[str, Any]:
    """Write the packed file atomically; returns {'path', 'file_bytes', 'header_bytes', 'payload_bytes'}."""
    data = packed.to_bytes()
    assert len(data) == packed.file_bytes
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    try:
        tmp.write_bytes(data)
        tmp.replace(p)
    finally:
        tmp.unlink(missing_ok=True)
    return {"path": str(p), "file_bytes": len(data), "header_bytes": packed.overhead_bytes,
            "payload_bytes": packed.payload_bytes}


def _header_length(body: bytes) -> int | None:
    """The length of the zlib stream after the preamble (the header as written), or None if it is not one."""
    d = zlib.decompressobj()
    try:
        d.decompress(body[PREAMBLE.size:])
    except zlib.error:
        return None
    return len(body) - PREAMBLE.size - len(d.unused_data) if d.eof else None


def read_packed(path: str | Path) -> tuple[dict, bytes]:
    """(header, payload) of a packed file whose checksum, lengths and header structure are intact; the header
    with the preamble's ``format_version``."""
    p = Path(path)
    if p.is_dir():
        raise PackedFileError(f"{path} is a directory, not a packed model file (.bsq)")
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise PackedFileError(f"{path} cannot be read: {e.strerror or e}") from None
    if len(raw) < PREAMBLE.size + DIGEST_BYTES or raw[:4] != MAGIC:
        raise PackedFileError(f"{path} is not a bitsearch packed model (bad magic or too short: {len(raw)} bytes)")
    _, version, hlen, plen = PREAMBLE.unpack_from(raw)
    if version not in READS_VERSIONS:
        raise PackedFileError(f"{path} has format version {version}; this bitsearch reads "
                              f"{', '.join(map(str, READS_VERSIONS))}")
    body, digest = raw[:-DIGEST_BYTES], raw[-DIGEST_BYTES:]
    if len(body) != PREAMBLE.size + hlen + plen:
        real = _header_length(body)
        if real is not None and len(body) == PREAMBLE.size + real + plen:  # only the header-length field is off
            raise PackedFileError(f"{path}: header is corrupt (its length field says {hlen} bytes, the header is "
                                  f"{real})")
        raise PackedFileError(f"{path} is truncated or padded: {len(raw)} bytes, its preamble says "
                              f"{PREAMBLE.size + hlen + plen + DIGEST_BYTES}")
    if hashlib.sha256(body).digest() != digest:
        raise PackedFileError(f"{path}: checksum mismatch (the file was edited or is corrupt)")
    try:
        header = json.loads(zlib.decompress(body[PREAMBLE.size:PREAMBLE.size + hlen]))
    except (zlib.error, ValueError):
        raise PackedFileError(f"{path}: header is corrupt") from None
    if not isinstance(header, dict) or header.get("format") != "bitsearch-packed" or not isinstance(
            header.get("tensors"), list) or not isinstance(header.get("model"), dict):
        raise PackedFileError(f"{path}: header lacks the model, config or tensor table")
    header["format_version"] = version  # from the preamble: which model a version-2 file holds (_rebuild)
    return header, body[PREAMBLE.size + hlen:]


def read_config(d: Any) -> QuantConfig:
    """A packed header's quantization config. Files written before ``quantize_outputs`` existed hold
    models without output quantizers."""
    if isinstance(d, dict) and "quantize_outputs" not in d:
        d = {**d, "quantize_outputs": False}
    return QuantConfig.from_dict(d)


def _rebuild(path, header: dict, build_model: Callable[[dict], nn.Module]) -> tuple[nn.Module, Packed]:
    """The architecture and quantization the header describes, and the tensor table they imply."""
    try:
        cfg = read_config(header.get("config")).replace(method=Method.PTQ)
    except QuantConfigError as e:
        raise PackedFileError(f"{path}: the stored quantization config is invalid ({e})") from None
    try:
        model = prepare(build_model(header["model"]), cfg, traced_adds=header.get("format_version", 3) >= 3).eval()
    except (QuantConfigError, ValueError, KeyError, TypeError) as e:
        raise PackedFileError(f"{path}: the stored model description cannot be built ({e})") from None
    for m in quant_layers(model).values():
        m.fold_()
    return model, convert(model, header["model"])


def _check_qparams(path, name: str, scale: torch.Tensor, zero_point: torch.Tensor, q) -> None:
    if (scale <= 0).any():
        raise PackedFileError(f"{path}: {name} has a quantization scale <= 0")
    if ((zero_point < min(q.qmin, 0)) | (zero_point > q.qmax)).any():
        raise PackedFileError(f"{path}: {name} has a zero-point outside its {q.bits}-bit range")


@torch.no_grad()
def load_packed(path: str | Path, build_model: Callable[[dict], nn.Module]) -> nn.Module:
    """Rebuild an inference model from a packed file: ``build_model(header['model'])`` makes the FP32
    architecture; quant layers are folded and get the dequantized integer weights, so the outputs
    equal the fake-quant model's (eval mode). Every tensor the model needs must be in the file, with
    the kind, bits and shape that its config implies; anything else raises PackedFileError."""
    header, payload = read_packed(path)
    model, expected = _rebuild(path, header, build_model)
    want = [e.row() for e in expected.entries]
    if header["tensors"] != want:
        got = {tuple(r[:1]) for r in header["tensors"] if isinstance(r, list) and r}
        missing = [r[0] for r in want if (r[0],) not in got]
        what = f"missing {', '.join(missing[:3])}" if missing else "tensor kinds, bits or shapes differ"
        raise PackedFileError(f"{path}: tensor table does not fit the model its header describes ({what})")
    if len(payload) != expected.payload_bytes:
        raise PackedFileError(f"{path}: payload is {len(payload)} bytes, its tensor table needs {expected.payload_bytes}")
    values: dict[str, torch.Tensor] = {}
    off = 0
    for e in expected.entries:
        chunk = payload[off: off + e.nbytes]
        off += e.nbytes
        if e.kind == "packed":
            t = torch.from_numpy(unpack_bits(chunk, e.bits, e.numel).astype(np.int32) + e.qmin)
        elif e.kind == "u8":
            t = torch.from_numpy(np.frombuffer(chunk, np.uint8).astype(np.int32))
        else:
            t = torch.from_numpy(np.frombuffer(chunk, np.float32).copy())
            if not torch.isfinite(t).all():
                raise PackedFileError(f"{path}: tensor {e.name} holds NaN or infinite values")
        values[e.name] = t.reshape(e.shape)
    qlayers = quant_layers(model)
    for name, m in qlayers.items():
        inner = m.conv if hasattr(m, "conv") else m.linear
        for q in (m.wq, m.aq, m.oq):
            if q is not None:
                q.observing = False
        if m.wq is not None:
            wq = m.wq
            s = values.pop(f"{name}.wq.scale")
            z = values.pop(f"{name}.wq.zero_point", torch.zeros(s.shape, dtype=torch.int32))
            c = values.pop(f"{name}.{'conv' if hasattr(m, 'conv') else 'linear'}.weight")
            _check_qparams(path, name, s, z, wq)
            wq.scale, wq.zero_point = s, z
            inner.weight.copy_(dequantize(c, s, z, wq.axis))
            wq.enabled = False  # the weight already sits on the integer grid
        for key, q in (("aq", m.aq), ("oq", m.oq)):
            if q is not None:
                s = values.pop(f"{name}.{key}.scale")
                z = values.pop(f"{name}.{key}.zero_point", torch.zeros((), dtype=torch.int32))
                _check_qparams(path, name, s, z, q)
                q.scale, q.zero_point = s, z
                q.enabled = True
    unexpected = model.load_state_dict(values, strict=False).unexpected_keys  # the rest: biases, FP32 layers
    if unexpected:
        raise PackedFileError(f"{path}: tensors {unexpected[:3]} do not fit the model")
    model.bitsearch_header = header
    return model
