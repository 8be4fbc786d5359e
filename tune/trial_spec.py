"""TrialSpec: everything one trial runs with, decided once.

``trial_spec(settings, config)`` is the only function that turns a search's fixed settings and a
trial's sampled hyperparameters (Ray Tune's trial config) into the settings the trial runs with. The
worker runs it (tune/trial.py); its MLflow run is named and given params from it
(tune/mlflow_callback.py, tune/results.sync); the results table, the report, the JSON and the
registry tags read its ``row()`` (tune/results.py). Nothing else derives a trial's setting from the
config, so what the worker ran and what every view of it says cannot drift apart.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

from quantization import FineTune, Method, QuantConfig, QuantConfigError

BLOCK_PREFIX = "w_bits_b"  # mixed precision: one sampled weight bit-width per block, w_bits_b00, w_bits_b01, ...
# sampled keys that set QuantConfig fields (the sampled name -> the field)
QUANT_KEYS = {"w_bits": "w_bits", "a_bits": "a_bits", "method": "method", "granularity": "w_granularity"}
FINE_TUNE_KEYS = {"qat_epochs": "epochs", "qat_lr": "lr", "kd_weight": "kd_weight"}


def block_key(i: int) -> str:
    return f"{BLOCK_PREFIX}{i:02d}"


@dataclass(frozen=True)
class TrialSpec:
    """One trial's settings. ``quant`` is the quantization config before any allocation (a budget trial's
    per-layer bits are chosen on the worker from ``size_budget_mb`` and recorded there); ``fine_tune`` is
    None for a method that does not fine-tune."""

    sampled: dict[str, Any]                 # the trial's config as the search sampled it (Ray's trial.config)
    quant: QuantConfig
    fine_tune: FineTune | None
    block_w_bits: tuple[int, ...] = ()      # per-block mixed precision, in the order of SearchSettings.blocks
    size_budget_mb: float | None = None     # bits allocated by sensitivity within this packed-size budget

    @property
    def method(self) -> Method:
        return self.quant.method

    def label(self) -> str:
        """What the trial is, in a few characters (its MLflow run name, its progress line):
        ``W5A6 qat lr=0.037``, ``W4-8A8 ptq`` (lowest-highest block bits), ``alloc 0.31MB A8 qat lr=0.01``."""
        q = self.quant
        if self.size_budget_mb is not None:
            label = f"alloc {self.size_budget_mb:.3g}MB A{q.a_bits} {q.method}"
        else:
            w = f"{min(self.block_w_bits)}-{max(self.block_w_bits)}" if self.block_w_bits else q.w_bits
            label = f"W{w}A{q.a_bits} {q.method}"
        if self.fine_tune is not None:
            label += f" lr={self.fine_tune.lr:.2g}"
            if self.fine_tune.kd_weight:
                label += f" kd={self.fine_tune.kd_weight:.2g}"
        return label

    def params(self) -> dict[str, Any]:
        """MLflow params, numeric where they can be: what the trial was run with and nothing it was not
        (a PTQ trial has no qat_epochs, qat_lr or kd_weight: it does not fine-tune); a mixed-precision
        trial's w_bits is the mean of its block bit-widths (the blocks are params too); an allocated
        trial's bits are its avg_w_bits metric and bits.<layer> params."""
        ft = self.fine_tune
        p = {**{k: v for k, v in self.sampled.items() if ft or k not in FINE_TUNE_KEYS}, "method": str(self.method),
             "a_bits": self.quant.a_bits, "granularity": str(self.quant.w_granularity),
             **({"qat_epochs": ft.epochs, "qat_lr": ft.lr, "kd_weight": ft.kd_weight} if ft else {})}
        if self.block_w_bits:
            p["w_bits"] = round(sum(self.block_w_bits) / len(self.block_w_bits), 2)
        elif self.size_budget_mb is None:
            p["w_bits"] = self.quant.w_bits
        return p

    def row(self) -> dict[str, Any]:
        """The trial's columns in the results table (and so in the JSON, the report and registry tags):
        its label, w_bits (``mixed 4-8`` for per-block bits, ``alloc`` for an allocation: its average bits are a
        measurement, filled in from the trial's result), a_bits, method, granularity, lr and qat_epochs
        (None for PTQ), and the per-block bits."""
        ft = self.fine_tune
        w: Any = self.quant.w_bits
        if self.block_w_bits:
            w = f"mixed {min(self.block_w_bits)}-{max(self.block_w_bits)}"
        elif self.size_budget_mb is not None:
            w = "alloc"
        return {"label": self.label(), "w_bits": w, "a_bits": self.quant.a_bits, "method": str(self.method),
                "granularity": str(self.quant.w_granularity), "lr": ft.lr if ft else None,
                "qat_epochs": ft.epochs if ft else None,
                **{block_key(i): b for i, b in enumerate(self.block_w_bits)}}

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: written beside the trial's packed model (``trial.json``)."""
        return {"sampled": dict(self.sampled), "quant": self.quant.to_dict(),
                "fine_tune": self.fine_tune.to_dict() if self.fine_tune else None,
                "block_w_bits": list(self.block_w_bits), "size_budget_mb": self.size_budget_mb,
                "label": self.label()}


def quant_config(sampled: dict[str, Any], base: dict[str, Any], blocks: Sequence[dict[str, Any]] = ()) -> QuantConfig:
    """The search's fixed QuantConfig fields (``base``) with a trial's sampled ones on top; per-block
    bits become layer-name overrides: ``NAME.*`` for a block that is a module (``blocks.3.*``), its layers'
    names for a stage. ``blocks``: the search's (SearchSettings.blocks, ``{name, layers}`` in block order);
    settings saved before it existed searched MobileNet-v2's ``blocks.N``."""
    d = dict(base)
    d.update({field: sampled[key] for key, field in QUANT_KEYS.items() if key in sampled})
    bits = block_bits(sampled)
    if bits:
        if not blocks:
            blocks = [{"name": f"blocks.{i}", "layers": [f"blocks.{i}.*"]} for i in range(len(bits))]
        if len(blocks) != len(bits):
            raise QuantConfigError(f"the trial sampled {len(bits)} block bit-widths for a model of {len(blocks)} blocks")
        d["overrides"] = list(d.get("overrides", [])) + [{"pattern": p, "w_bits": b}
                                                         for block, b in zip(blocks, bits) for p in block_patterns(block)]
    return QuantConfig.from_dict(d)


def block_patterns(block: dict[str, Any]) -> list[str]:
    """The layer-name patterns of one block: ``NAME.*`` when every layer lies inside module NAME."""
    name, layers = block["name"], list(block["layers"])
    return [f"{name}.*"] if all(n.startswith(f"{name}.") for n in layers) else layers


def block_bits(sampled: dict[str, Any]) -> tuple[int, ...]:
    """The per-block weight bit-widths a trial sampled, in block order (() for a uniform trial)."""
    keys = sorted((int(k[len(BLOCK_PREFIX):]), k) for k in sampled if k.startswith(BLOCK_PREFIX))
    return tuple(int(sampled[k]) for _, k in keys)


def trial_spec(settings, config: dict[str, Any]) -> TrialSpec:
    """The one function that decides a trial's settings: the search's fixed ``settings`` (a
    SearchSettings) with the trial's sampled ``config`` on top. Fine-tuning settings the search did not
    sample come from the settings (whose defaults are FineTune's)."""
    sampled = dict(config)
    q = quant_config(sampled, settings.quant_base, settings.blocks)
    ft = None
    if q.method.fine_tunes:
        ft = dataclasses.replace(settings.fine_tune, **{field: sampled[key] for key, field in FINE_TUNE_KEYS.items()
                                                        if key in sampled})
    budget = sampled.get("size_budget_mb")
    return TrialSpec(sampled=sampled, quant=q, fine_tune=ft, block_w_bits=block_bits(sampled),
                     size_budget_mb=None if budget is None else float(budget))
