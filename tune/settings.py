"""Search settings: one frozen object, validated once before Ray starts, saved with the experiment
(``OUT/NAME/bitsearch.json``) and handed to every trial with ``tune.with_parameters``."""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mlflow_server.tracking import default_tracking_uri, fetch_artifact, is_artifact_uri
from pipeline import load_baseline, packed_meta, prepare_quantized
from pipeline.sensitivity import (FORMAT, SensitivityError, allocate, allocation_config, check_min_bits, layer_bytes,
                                  weight_scores)
from quantization import FineTune, Method, QuantConfig, QuantConfigError
from quantization.api import layer_blocks, plan_for
from trainer.data import source_kind
from tune import storage
from tune.space import SpaceError, num_range, smallest_bits, validate_space
from tune.trial_spec import FINE_TUNE_KEYS, block_key, quant_config

_FT = FineTune()  # the fine-tuning defaults
FINE_TUNE_NAMES = {field: key for key, field in FINE_TUNE_KEYS.items()} | {"kd_temperature": "kd_temperature"}

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
    time_budget_s: float | None = None         # the search ends on time with what it finished (in-flight trials stopped)
    max_drop: float | None = None              # the smallest model within this many validation points of FP32: by
                                               # bisection over the allocator's size budgets with a sensitivity
                                               # table, else Optuna with the drop as a constraint (tune/bisect.py)
    latency_budget_ms: float | None = None     # a trial whose exported ONNX model takes longer (batch 1, 1 thread, on
                                               # the trial's node) is over budget, as one larger than size_budget_mb
    num_samples: int = 8
    max_concurrent: int | None = None          # default: as many trials as the cluster's CPUs and GPUs hold
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0                # > 0: every trial runs on (a share of) a GPU Ray assigns it
    wait_for_resources: bool = False           # an autoscaling cluster: wait for what the trials ask, do not refuse
    asha: dict[str, Any] = field(default_factory=lambda: {"grace_period": 1, "reduction_factor": 2})
    max_failures: int = 2
    seed: int = 0
    batch_size: int = 128
    qat_epochs: int = _FT.epochs               # when the space does not search it
    qat_lr: float = _FT.lr
    kd_weight: float = _FT.kd_weight           # distillation from the baseline (when the space does not search it)
    kd_temperature: float = _FT.kd_temperature
    sensitivity: str | None = None             # table of `bitsearch sensitivity`: space key size_budget_mb allocates with it
    estimator: str | None = None               # its scores to allocate with: loss | hessian | max (default: hessian where present)
    min_bits: int | None = None                # no allocated layer below this many weight bits (default: the table's 2)
    finetune_subset: int = 0                   # QAT/LSQ train on a stratified subset of N images (0: all)
    quant_base: dict[str, Any] = field(default_factory=dict)   # fixed QuantConfig fields (keep_fp32, observers, ...)
    tracking_uri: str | None = None
    experiment: str = "bitsearch"
    address: str | None = None
    device: str = "auto"                       # auto: cuda when gpus_per_trial > 0, else cpu
    # filled in by validate() from the baseline
    subset: int = 0
    val_size: int = 0
    split_seed: int = 0                        # the baseline's seed: its train/validation split, which trials reuse
    fp32_top1: float | None = None
    fp32_val_top1: float | None = None
    w8_mb: float | None = None                 # the uniform W8A8 packed size: the "best" is compared with it
    blocks: list[dict[str, Any]] = field(default_factory=list)  # space.block_w_bits: the model's blocks in order,
                                               # {name, layers} (quantization.api.layer_blocks)
    start_points: list[dict[str, Any]] = field(default_factory=list)  # the search's first trials (Optuna's queue):
                                               # the allocator's per-block solutions, max-drop's widest model

    @property
    def base_quant(self) -> QuantConfig:
        """The search's fixed quantization settings (quant_base over QuantConfig's defaults)."""
        return QuantConfig.from_dict(self.quant_base)

    @property
    def fine_tune(self) -> FineTune:
        """The fine-tuning of trials that do not sample it (QuantConfigError if a value is out of range)."""
        return FineTune.from_values({"epochs": self.qat_epochs, "lr": self.qat_lr, "kd_weight": self.kd_weight,
                                     "kd_temperature": self.kd_temperature}, FINE_TUNE_NAMES)

    @property
    def trial_device(self) -> str:
        """Where trials compute: on the GPU Ray assigns them when they ask for one, else on the CPU (a trial
        that asked for no GPU never touches CUDA)."""
        return "cuda" if self.gpus_per_trial > 0 else "cpu"

    @property
    def tracking_store(self) -> str:
        """--tracking-uri, or the embedded SQLite store next to the experiments."""
        return self.tracking_uri or default_tracking_uri(self.out)

    @property
    def path(self) -> str:
        """The experiment: OUT/NAME, a local/NFS path or an S3-compatible URI."""
        return storage.join(self.out, self.name)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def chart_axes(self) -> tuple[list[str], list[str]]:
        """(params, metrics) of the search's parallel-coordinates chart: what every trial has. qat_lr only
        when every trial fine-tunes (a PTQ trial has none, and MLflow draws a missing value at the top of
        its axis); test_top1 never (a trial ASHA stopped did not measure it); a budget search's trials have
        no w_bits param (their allocation's mean bits are the metric avg_w_bits)."""
        methods = (self.space if self.mode == "search" else self.grid).get("method") or [self.base_quant.method]
        lr = ["qat_lr"] if all(Method.parse("method", m).fine_tunes for m in methods) else []
        if self.mode == "search" and "size_budget_mb" in self.space:  # allocated trials: bits are a measurement
            return ["a_bits", *lr], ["avg_w_bits", "comp_mb", "val_top1"]
        return ["w_bits", "a_bits", *lr], ["comp_mb", "val_top1"]

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


class SearchInterrupted(Exception):
    """Ctrl-C (SIGINT) ended the search before its trials: Ray saved its state, `bitsearch resume` goes on."""

    def __init__(self, done: int, total: int, path: str):
        self.done, self.total, self.path = done, total, path
        super().__init__(f"interrupted: {done} of {total} trials done; continue with `bitsearch resume {path}`")


def settings_from(d: dict[str, Any]) -> SearchSettings:
    known = set(SearchSettings.__dataclass_fields__)
    unknown = sorted(set(d) - known)
    if unknown:
        raise SearchConfigError(f"unknown search option(s) {', '.join(unknown)}; allowed: {', '.join(sorted(known))}")
    return SearchSettings(**d)


def search_settings(mode: str, section: dict[str, Any], flags: dict[str, Any], grid: dict[str, list], *, baseline: str,
                    data: str, out: str, source: str | None = None) -> SearchSettings:
    """The settings of `bitsearch sweep` / `search`: the profile's section (``sweep:`` or ``search:``) with the
    command line's ``flags`` on top; a sweep's ``grid`` lists (from --w-bits, ...) replace the section's or
    the default grid's. Local paths become absolute (trials run in other working directories)."""
    if not isinstance(section, dict):
        raise SearchConfigError(f"the {mode} section of {source} must be a mapping")
    d = {**section, **flags}
    d.setdefault("name", mode)
    d.update(mode=mode, baseline=baseline if is_artifact_uri(baseline) else str(Path(baseline).resolve()),
             data=str(Path(data).resolve()), out=out)
    if mode == "sweep":
        d["grid"] = {**(d.get("grid") or DEFAULT_GRID), **grid}
    return settings_from(d)


def validate(s: SearchSettings) -> SearchSettings:
    """Every check that can fail before Ray starts, section by section. Returns the settings to run with:
    an absolute local --out, the normalised space, and the baseline's data split and FP32 test top-1."""
    s = _check_storage(s)
    _check_options(s)
    default_space = SearchSettings.__dataclass_fields__["space"].default_factory()
    if s.max_drop is not None and s.sensitivity and s.space == default_space:  # bisection, no space given: PTQ at A8
        s = dataclasses.replace(s, space={"a_bits": [8, 8], "method": ["ptq"]})
    s = _check_space(s)
    source_kind(s.data, download=False)  # DataError now, not in every trial once Ray has started
    fp32, ck = load_baseline(fetch_artifact(s.baseline, s.tracking_uri))
    _check_baseline(s, fp32, ck)
    if s.mode == "search" and "block_w_bits" in s.space:
        s = dataclasses.replace(s, blocks=_blocks(fp32))
    if s.time_budget_s is not None:
        _check_time_budget(s, fp32, ck)
    w8_mb = _packed_mb(fp32, ck, quant_config({"w_bits": 8, "a_bits": 8}, s.quant_base))
    if s.max_drop is not None:
        _check_max_drop(s)
    if s.mode == "search" and ("size_budget_mb" in s.space or (s.max_drop is not None and s.sensitivity)):
        s = _check_allocation(s, fp32, ck, w8_mb)
    elif s.estimator is not None or s.min_bits is not None:
        raise SearchConfigError("estimator and min_bits choose how space.size_budget_mb allocates; this search has none")
    tc, hist = ck["config"], ck.get("history") or []
    s = dataclasses.replace(s, subset=int(tc.get("subset", 0)), val_size=int(tc.get("val_size", 0)),
                            split_seed=int(tc.get("seed", 0)),  # not the search's seed: a validation split
                            # drawn with another seed would hold images the baseline trained on
                            fp32_top1=hist[-1].get("test_top1") if hist else None,  # same test set for every trial
                            fp32_val_top1=hist[-1].get("val_top1") if hist else None,
                            w8_mb=w8_mb)
    if s.size_budget_mb is not None:
        _check_budget(s, fp32, ck)
    return dataclasses.replace(s, start_points=_start_points(s, fp32, ck))


def _check_storage(s: SearchSettings) -> SearchSettings:
    if not storage.is_remote(s.out):  # resume/sync/report from any working directory
        s = dataclasses.replace(s, out=str(Path(s.out).expanduser().resolve()))
    if storage.is_remote(s.out) and not s.tracking_uri:
        raise SearchConfigError(f"--out {s.out} is remote storage: pass --tracking-uri (an MLflow server), the "
                                "embedded SQLite store needs a local --out")
    if not isinstance(s.name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", s.name):
        raise SearchConfigError(f"name={s.name!r} is invalid: letters, digits, '.', '_' and '-' (one folder under --out)")
    return s


def _check_options(s: SearchSettings) -> None:
    """The scalar options: modes, counts, resources and the fixed fine-tuning settings (FineTune's checks)."""
    if s.mode not in ("sweep", "search"):
        raise SearchConfigError(f"mode={s.mode!r} is invalid: sweep or search")
    if s.objectives not in ("single", "multi"):
        raise SearchConfigError(f"objectives={s.objectives!r} is invalid: single or multi")
    v = s.size_budget_mb
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < float("inf")):
        raise SearchConfigError(f"size_budget_mb={v!r} is invalid: a number > 0")
    v = s.time_budget_s
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < float("inf")):
        raise SearchConfigError(f"time_budget_s={v!r} is invalid: a number of seconds > 0")
    v = s.max_drop
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < float("inf")):
        raise SearchConfigError(f"max_drop={v!r} is invalid: validation points below FP32, a number >= 0")
    v = s.latency_budget_ms
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < float("inf")):
        raise SearchConfigError(f"latency_budget_ms={v!r} is invalid: a number of milliseconds > 0")
    for k, lo in (("num_samples", 1), ("max_concurrent", 1), ("batch_size", 1), ("finetune_subset", 0)):
        v = getattr(s, k)
        if (v is not None or k != "max_concurrent") and (isinstance(v, bool) or not isinstance(v, int) or v < lo):
            raise SearchConfigError(f"{k}={v!r} is invalid: an integer >= {lo}")
    _check_resources_asked(s)
    try:
        s.fine_tune
    except QuantConfigError as e:
        raise SearchConfigError(str(e)) from None


def _check_resources_asked(s: SearchSettings) -> None:
    """Per-trial resources and the device: a trial runs on a GPU exactly when it asks Ray for one."""
    for k in ("cpus_per_trial", "gpus_per_trial"):
        v = getattr(s, k)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < float("inf"):
            raise SearchConfigError(f"{k}={v!r} is invalid: a number >= 0")
    if s.cpus_per_trial <= 0:
        raise SearchConfigError(f"cpus_per_trial={s.cpus_per_trial!r} is invalid: a number > 0")
    if s.gpus_per_trial > 1 and not float(s.gpus_per_trial).is_integer():
        raise SearchConfigError(f"gpus_per_trial={s.gpus_per_trial!r} is invalid: a share of one GPU (0.25) or "
                                "a whole number of GPUs")
    if s.device not in ("auto", "cpu", "cuda"):
        raise SearchConfigError(f"device={s.device!r} is invalid: auto, cpu or cuda")
    if s.device == "cpu" and s.gpus_per_trial > 0:
        raise SearchConfigError(f"--device cpu contradicts --gpus-per-trial {s.gpus_per_trial:g}: a trial that "
                                "asks Ray for a GPU computes on it; drop one of them")
    if s.device == "cuda" and s.gpus_per_trial == 0:
        raise SearchConfigError("--device cuda needs --gpus-per-trial > 0 (e.g. 0.25): Ray gives a trial a GPU "
                                "only when it asks for one")


def _check_space(s: SearchSettings) -> SearchSettings:
    """The sampled space (search) or the grid (sweep), and the fixed QuantConfig fields on their own."""
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
        s.base_quant  # noqa: B018 - the fixed QuantConfig fields are valid on their own
    except (SpaceError, QuantConfigError) as e:
        raise SearchConfigError(str(e)) from None
    return s


def _check_baseline(s: SearchSettings, fp32, ck: dict) -> None:
    try:
        plan_for(fp32, s.base_quant)  # the fixed layer patterns match this model
    except QuantConfigError as e:
        raise SearchConfigError(str(e)) from None
    if int(ck["config"].get("val_size", 0)) <= 0:
        raise SearchConfigError(f"baseline {s.baseline} was trained without a validation split; the search objective "
                                "needs one: train it with --val-size N")


def _check_max_drop(s: SearchSettings) -> None:
    """--max-drop: a single-objective search; with a sensitivity table its only sampled value is the size
    budget (bisection), without one Optuna samples the space with the drop as a constraint."""
    if s.mode != "search" or s.objectives != "single":
        raise SearchConfigError("max_drop applies to single-objective searches only (the smallest model within the drop)")
    if s.size_budget_mb is not None:
        raise SearchConfigError("give either max_drop (the smallest model within the drop) or size_budget_mb")
    if not s.sensitivity:
        return
    for k, v in s.space.items():
        fixed = (v["low"] == v["high"]) if isinstance(v, dict) else (len(v) == 1 or (len(v) == 2 and v[0] == v[1]))
        if k != "size_budget_mb" and (k == "block_w_bits" or not fixed):
            raise SearchConfigError(f"with max_drop the search chooses only the size budget: give space.{k} one value")


def _blocks(fp32) -> list[dict[str, Any]]:
    """The baseline's blocks for space.block_w_bits (SearchConfigError when it has none)."""
    try:
        blocks = layer_blocks(fp32)
    except QuantConfigError as e:
        raise SearchConfigError(str(e)) from None
    if not blocks:
        raise SearchConfigError(f"space.block_w_bits: {type(fp32).__name__} has no blocks (no convolution reads a "
                                "feature map); search w_bits or size_budget_mb instead")
    return [{"name": name, "layers": layers} for name, layers in blocks]


def _check_time_budget(s: SearchSettings, fp32, ck: dict) -> None:
    """--time-budget shorter than one trial: refused. The bound is what every trial does at the least, on this
    machine: the FP32 forward pass over the validation and test images it evaluates (a quantized model's is
    slower, calibration and fine-tuning come on top). Trials on GPUs are not timed here."""
    least = least_trial_s(fp32, ck, s.batch_size, s.cpus_per_trial) if s.gpus_per_trial == 0 else None
    if least is not None and s.time_budget_s < least:
        raise SearchConfigError(f"time_budget_s={s.time_budget_s:g} is shorter than one trial: each evaluates "
                                f"{_eval_images(ck):,} images, at least {least:.0f} s on this machine; raise it")


def _eval_images(ck: dict) -> int:
    counts = (ck.get("meta") or {}).get("data") or {}
    return int(counts.get("val") or 0) + int(counts.get("test") or 0)


def least_trial_s(fp32, ck: dict, batch_size: int, threads: float) -> float | None:
    """Seconds of the FP32 forward pass over a trial's validation and test images with ``threads`` CPU
    threads (timed on two batches after a warm-up); None when the checkpoint does not say how many."""
    import time

    import torch
    n = _eval_images(ck)
    if not n:
        return None
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, int(threads)))
    try:
        x = torch.randn(min(batch_size, n), 3, 32, 32)
        fp32.eval()
        with torch.inference_mode():
            fp32(x)
            t0 = time.perf_counter()
            fp32(x)
            fp32(x)
            per_image = (time.perf_counter() - t0) / (2 * len(x))
    finally:
        torch.set_num_threads(before)
    return n * per_image


def fixed_space(space: dict[str, Any]) -> dict[str, Any]:
    """The one value of each fixed space key (a max-drop search), the size budget left out."""
    return {k: v["low"] if isinstance(v, dict) else v[0] for k, v in space.items() if k != "size_budget_mb"}


def _check_allocation(s: SearchSettings, fp32, ck: dict, w8_mb: float) -> SearchSettings:
    """space.size_budget_mb: a sensitivity table of this baseline, and a budget range that an allocation
    can meet (a max-drop search without one: from the smallest allocation to the W8A8 size). Returns the
    settings with the table's absolute path, the estimator and the budget range resolved."""
    table = _table(s, fp32, "space.size_budget_mb and max_drop allocate bits by sensitivity")
    try:
        est, _ = weight_scores(table, s.estimator)
        check_min_bits(s.min_bits)
    except SensitivityError as e:
        raise SearchConfigError(str(e)) from None
    lo_bits = max(s.min_bits or 2, min(int(b) for r in table["layers"] for b in r["w"]))
    floor = allocation_config(s.base_quant, {r["name"]: lo_bits for r in table["layers"]})
    floor_mb = _packed_mb(fp32, ck, floor)
    if "size_budget_mb" not in s.space:  # max-drop: the whole front
        s = dataclasses.replace(s, space={**s.space, "size_budget_mb": {"low": floor_mb, "high": max(w8_mb, floor_mb),
                                                                         "log": False}})
    low = num_range("size_budget_mb", s.space["size_budget_mb"])[0]
    if low < floor_mb:
        raise SearchConfigError(f"space.size_budget_mb starts at {low} MB, below the smallest allocation "
                                f"({floor_mb:.4f} MB with every layer at {lo_bits} bits): raise the low end")
    return dataclasses.replace(s, sensitivity=str(Path(s.sensitivity).resolve()), estimator=est)


def _table(s: SearchSettings, fp32, why: str) -> dict[str, Any]:
    """The sensitivity table ``s.sensitivity``, checked against the baseline (SearchConfigError saying ``why``
    it is needed when there is none)."""
    try:
        table = json.loads(Path(s.sensitivity).read_text()) if s.sensitivity else None
    except (OSError, ValueError):
        table = None
    if not table or table.get("format") != FORMAT:
        raise SearchConfigError(f"{why}: give sensitivity: PATH, a table written by `bitsearch sensitivity` "
                                f"({s.sensitivity!r} is none)")
    plan = plan_for(fp32, s.base_quant)
    unknown = [r["name"] for r in table["layers"] if r["name"] not in plan]
    if unknown:
        raise SearchConfigError(f"sensitivity table {s.sensitivity} names layers this baseline lacks ({unknown[0]}, ...)")
    return table


def _start_points(s: SearchSettings, fp32, ck: dict) -> list[dict[str, Any]]:
    """The first trials of an Optuna search, so that TPE starts from good points: for a per-block search with a
    sensitivity table, the allocator's solutions with one bit-width per block (at the size budget, or at three
    sizes across the space's range for a multi-objective search); for a max-drop search without a table, the
    widest model the space allows (the one most likely within the drop). Activation bits at the space's widest;
    what a point leaves out, Optuna samples."""
    if s.mode != "search" or (s.max_drop is not None and s.sensitivity):  # a bisection proposes its own
        return []
    widest = {k: s.space[k][1] for k in ("w_bits", "a_bits") if k in s.space}
    if s.max_drop is not None:
        point = {**widest, **({"method": str(Method.PTQ)} if str(Method.PTQ) in s.space.get("method", []) else {})}
        return [point] if point else []
    if not s.sensitivity or "block_w_bits" not in s.space or (s.objectives == "single" and s.size_budget_mb is None):
        return []
    table = _table(s, fp32, "the per-block search starts from the allocator's solutions")
    layers = [r["name"] for r in table["layers"]]
    lo, hi = s.space["block_w_bits"]
    in_block = {n: i for i, b in enumerate(s.blocks) for n in b["layers"]}
    groups = {block_key(i): ([n for n in layers if in_block.get(n) == i], range(lo, hi + 1)) for i in range(len(s.blocks))}
    rest = [n for n in layers if n not in in_block]
    if rest:  # the layers outside the blocks take the trial's w_bits
        w = s.space.get("w_bits")
        groups["w_bits"] = (rest, range(w[0], w[1] + 1) if w else [s.base_quant.w_bits])
    groups = {g: v for g, v in groups.items() if v[0]}
    a = {"a_bits": widest["a_bits"]} if "a_bits" in widest else {}
    base, meta = quant_config(a, s.quant_base), packed_meta(ck)
    costs = layer_bytes(fp32, base, meta, layers, sorted({b for _, bits in groups.values() for b in bits}))
    if s.objectives == "single":
        budgets = [s.size_budget_mb]
    else:
        def size_at(pick) -> float:  # every group at its narrowest (min) or widest (max) bit-width
            return _packed_mb(fp32, ck, allocation_config(base, {n: pick(bits) for ls, bits in groups.values() for n in ls}))
        low, high = size_at(min), size_at(max)
        budgets = [low + f * (high - low) for f in (0.25, 0.5, 0.75)]
    points = []
    for mb in budgets:
        try:
            alloc = allocate(table, fp32, base, meta, mb, estimator=s.estimator, costs=costs, groups=groups)
        except SensitivityError:
            continue
        point = {k: v for k, v in {**alloc["group_bits"], **a}.items() if k != "w_bits" or "w_bits" in s.space}
        if point not in points:
            points.append(point)
    return points


def _check_budget(s: SearchSettings, fp32, ck: dict) -> None:
    """size_budget_mb: a single-objective search whose space allows a model within the budget."""
    if s.mode != "search" or s.objectives != "single":
        raise SearchConfigError("size_budget_mb applies to single-objective searches only")
    if "size_budget_mb" in s.space:
        raise SearchConfigError("give either size_budget_mb (one budget) or space.size_budget_mb (a budget range)")
    small = quant_config(smallest_bits(s.space, len(s.blocks)), s.quant_base, s.blocks)
    mb = _packed_mb(fp32, ck, small)
    if s.size_budget_mb < mb:
        raise SearchConfigError(f"size_budget_mb={s.size_budget_mb} is below the smallest model this space allows "
                                f"({mb:.4f} MB at {small.w_bits}-bit weights): raise the budget or widen the space")


def _packed_mb(fp32, ck: dict, cfg: QuantConfig) -> float:
    return prepare_quantized(fp32, cfg, packed_meta(ck)).size["comp_mb"]


def load_settings(path: str) -> SearchSettings:
    """The settings saved with an experiment (local path or URI)."""
    sf = storage.join(path, SETTINGS_FILE)
    if not storage.exists(sf):
        raise SearchConfigError(f"{path} is not a bitsearch experiment (no {SETTINGS_FILE})")
    d = json.loads(storage.read_text(sf))
    for legacy in LEGACY_KEYS:  # written by older versions; no longer settings
        d.pop(legacy, None)
    return settings_from(d)


