"""Search settings: one frozen object, validated once before Ray starts, saved with the experiment
(``OUT/NAME/bitsearch.json``) and handed to every trial with ``tune.with_parameters``."""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from quantization.config import QAT_EPOCHS, QAT_LR
from tune import storage
from tune.space import SpaceError, num_range, quant_config, smallest_bits, validate_space

SETTINGS_FILE = "bitsearch.json"
LEGACY_KEYS = ("metric", "fail_once_after_epoch")
GRID_KEYS = ("w_bits", "a_bits", "method", "granularity")
DEFAULT_GRID = {"w_bits": [8, 4, 2], "a_bits": [8, 4, 2]}


@dataclass(frozen=True)
class SearchSettings:
    baseline: str
    data: str
    out: str
    name: str = "search"
    mode: str = "search"                       # sweep | search
    objectives: str = "single"                 # single | multi
    space: dict[str, Any] = field(default_factory=lambda: {"w_bits": [2, 8], "a_bits": [4, 8], "method": ["ptq", "qat"],
                                                           "qat_lr": {"low": 1e-4, "high": 0.05, "log": True}})
    grid: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_GRID))
    size_budget_mb: float | None = None
    num_samples: int = 8
    max_concurrent: int = 2
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    asha: dict[str, Any] = field(default_factory=lambda: {"grace_period": 1, "reduction_factor": 2})
    max_failures: int = 2
    seed: int = 0
    batch_size: int = 128
    qat_epochs: int = QAT_EPOCHS               # when the space does not search it
    qat_lr: float = QAT_LR
    kd_weight: float = 0.0                     # distillation from the baseline (when the space does not search it)
    kd_temperature: float = 4.0
    sensitivity: str | None = None             # table of `bitsearch sensitivity`: space key size_budget_mb allocates with it
    estimator: str | None = None               # its scores to allocate with: loss | hessian | max (default: hessian where present)
    min_bits: int | None = None                # no allocated layer below this many weight bits (default: the table's 2)
    finetune_subset: int = 0                   # QAT/LSQ train on a stratified subset of N images (0: all)
    quant_base: dict[str, Any] = field(default_factory=dict)   # fixed QuantConfig fields (keep_fp32, observers, ...)
    tracking_uri: str | None = None
    experiment: str = "bitsearch"
    address: str | None = None
    device: str = "auto"
    # filled in by validate() from the baseline
    subset: int = 0
    val_size: int = 0
    fp32_top1: float | None = None

    @property
    def tracking_store(self) -> str:
        """--tracking-uri, or the embedded SQLite store next to the experiments."""
        from mlflow_server.tracking import default_tracking_uri
        return self.tracking_uri or default_tracking_uri(self.out)

    @property
    def path(self) -> str:
        """The experiment: OUT/NAME, a local/NFS path or an S3-compatible URI."""
        return storage.join(self.out, self.name)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def applicable(self) -> dict[str, Any]:
        """The settings that shape this search (the parent run's params): a sweep has no sampled space,
        ASHA or sample count, a search no grid; only a single-objective search uses ASHA; unset
        options (None) and the address of the Ray cluster are left out."""
        d = self.to_dict()
        drop = {"address"}
        if self.mode == "sweep":
            drop |= {"space", "objectives", "num_samples", "asha"}
        else:
            drop |= {"grid"} | ({"asha"} if self.objectives == "multi" else set())
        return {k: v for k, v in d.items() if k not in drop and v is not None and v != {}}


class SearchConfigError(ValueError):
    pass


def settings_from(d: dict[str, Any]) -> SearchSettings:
    known = set(SearchSettings.__dataclass_fields__)
    unknown = sorted(set(d) - known)
    if unknown:
        raise SearchConfigError(f"unknown search option(s) {', '.join(unknown)}; allowed: {', '.join(sorted(known))}")
    return SearchSettings(**d)


def validate(s: SearchSettings) -> SearchSettings:
    """Every check that can fail before Ray starts. Returns the settings to run with: an absolute
    local --out, the normalised space, and the baseline's data split and FP32 test top-1."""
    from quantization import QuantConfigError
    from quantization.api import plan_for
    from mlflow_server.tracking import fetch_artifact
    from pipeline import load_baseline, packed_meta, prepare_quantized

    if not storage.is_remote(s.out):  # resume/sync/report from any working directory
        s = dataclasses.replace(s, out=str(Path(s.out).expanduser().resolve()))
    if storage.is_remote(s.out) and not s.tracking_uri:
        raise SearchConfigError(f"--out {s.out} is remote storage: pass --tracking-uri (an MLflow server), the "
                                "embedded SQLite store needs a local --out")
    if s.mode not in ("sweep", "search"):
        raise SearchConfigError(f"mode={s.mode!r} is invalid: sweep or search")
    if s.objectives not in ("single", "multi"):
        raise SearchConfigError(f"objectives={s.objectives!r} is invalid: single or multi")
    if not isinstance(s.name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", s.name):
        raise SearchConfigError(f"name={s.name!r} is invalid: letters, digits, '.', '_' and '-' (one folder under --out)")
    for k in ("qat_lr", "size_budget_mb"):
        v = getattr(s, k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < float("inf")):
            raise SearchConfigError(f"{k}={v!r} is invalid: a number > 0")
    if isinstance(s.kd_weight, bool) or not isinstance(s.kd_weight, (int, float)) or not 0 <= s.kd_weight <= 1:
        raise SearchConfigError(f"kd_weight={s.kd_weight!r} is invalid: a number in [0, 1]")
    if isinstance(s.kd_temperature, bool) or not isinstance(s.kd_temperature, (int, float)) or not 0 < s.kd_temperature < float("inf"):
        raise SearchConfigError(f"kd_temperature={s.kd_temperature!r} is invalid: a number > 0")
    for k, lo in (("num_samples", 1), ("max_concurrent", 1), ("batch_size", 1), ("qat_epochs", 1),
                  ("finetune_subset", 0)):
        if not isinstance(getattr(s, k), int) or getattr(s, k) < lo:
            raise SearchConfigError(f"{k}={getattr(s, k)!r} is invalid: an integer >= {lo}")
    if s.cpus_per_trial <= 0 or s.gpus_per_trial < 0:
        raise SearchConfigError("cpus_per_trial must be > 0 and gpus_per_trial >= 0 (fractions such as 0.25 share a GPU)")
    try:
        if s.mode == "search":
            s = dataclasses.replace(s, space=validate_space(s.space))
        else:
            if not s.grid:
                raise SearchConfigError("the sweep grid is empty: give w_bits and/or a_bits lists")
            for k, vals in s.grid.items():
                if k not in GRID_KEYS or not isinstance(vals, list) or not vals:
                    raise SearchConfigError(f"grid.{k}={vals!r} is invalid: a non-empty list for w_bits, a_bits, method "
                                            "or granularity")
                for v in vals:
                    quant_config({k: v}, s.quant_base)
        quant_config({}, s.quant_base)  # the fixed QuantConfig fields are valid on their own
    except (SpaceError, QuantConfigError) as e:
        raise SearchConfigError(str(e)) from None
    from trainer.data import source_kind
    source_kind(s.data, download=False)  # DataError now, not in every trial once Ray has started
    fp32, ck = load_baseline(fetch_artifact(s.baseline, s.tracking_uri))
    packed_mb = lambda cfg: prepare_quantized(fp32, cfg, packed_meta(ck)).size["comp_mb"]  # noqa: E731
    try:
        plan_for(fp32, quant_config({}, s.quant_base))  # the fixed layer patterns match this model
    except QuantConfigError as e:
        raise SearchConfigError(str(e)) from None
    tc = ck["config"]
    if int(tc.get("val_size", 0)) <= 0:
        raise SearchConfigError(f"baseline {s.baseline} was trained without a validation split; the search objective "
                                "needs one: train it with --val-size N")
    if s.mode == "search" and "size_budget_mb" in s.space:
        from pipeline.sensitivity import FORMAT, SensitivityError, check_min_bits, weight_scores
        try:
            table = json.loads(Path(s.sensitivity).read_text()) if s.sensitivity else None
        except (OSError, ValueError):
            table = None
        if not table or table.get("format") != FORMAT:
            raise SearchConfigError("space.size_budget_mb allocates bits by sensitivity: give sensitivity: PATH, a table "
                                    f"written by `bitsearch sensitivity` ({s.sensitivity!r} is none)")
        plan = plan_for(fp32, quant_config({}, s.quant_base))
        unknown = [r["name"] for r in table["layers"] if r["name"] not in plan]
        if unknown:
            raise SearchConfigError(f"sensitivity table {s.sensitivity} names layers this baseline lacks ({unknown[0]}, ...)")
        try:
            est, _ = weight_scores(table, s.estimator)
            check_min_bits(s.min_bits)
        except SensitivityError as e:
            raise SearchConfigError(str(e)) from None
        from pipeline.sensitivity import allocation_config
        lo_bits = max(s.min_bits or 2, min(int(b) for r in table["layers"] for b in r["w"]))
        floor = allocation_config(quant_config({}, s.quant_base), {r["name"]: lo_bits for r in table["layers"]})
        floor_mb = packed_mb(floor)
        low = num_range("size_budget_mb", s.space["size_budget_mb"])[0]
        if low < floor_mb:
            raise SearchConfigError(f"space.size_budget_mb starts at {low} MB, below the smallest allocation "
                                    f"({floor_mb:.4f} MB with every layer at {lo_bits} bits): raise the low end")
        s = dataclasses.replace(s, sensitivity=str(Path(s.sensitivity).resolve()), estimator=est)
    elif s.estimator is not None or s.min_bits is not None:
        raise SearchConfigError("estimator and min_bits choose how space.size_budget_mb allocates; this search has none")
    hist = ck.get("history") or []
    s = dataclasses.replace(s, subset=int(tc.get("subset", 0)), val_size=int(tc.get("val_size", 0)),
                            fp32_top1=hist[-1].get("test_top1") if hist else None)  # same test set for every trial
    if s.size_budget_mb is not None:
        if s.mode != "search" or s.objectives != "single":
            raise SearchConfigError("size_budget_mb applies to single-objective searches only")
        if "size_budget_mb" in s.space:
            raise SearchConfigError("give either size_budget_mb (one budget) or space.size_budget_mb (a budget range)")
        small = quant_config(smallest_bits(s.space), s.quant_base)
        mb = packed_mb(small)
        if s.size_budget_mb < mb:
            raise SearchConfigError(f"size_budget_mb={s.size_budget_mb} is below the smallest model this space allows "
                                    f"({mb:.4f} MB at {small.w_bits}-bit weights): raise the budget or widen the space")
    return s


def load_settings(path: str) -> SearchSettings:
    """The settings saved with an experiment (local path or URI)."""
    sf = storage.join(path, SETTINGS_FILE)
    if not storage.exists(sf):
        raise SearchConfigError(f"{path} is not a bitsearch experiment (no {SETTINGS_FILE})")
    d = json.loads(storage.read_text(sf))
    for legacy in LEGACY_KEYS:  # written by older versions; no longer settings
        d.pop(legacy, None)
    return settings_from(d)


