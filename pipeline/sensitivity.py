"""Per-layer quantization sensitivity and the exact bit allocation under a byte budget (issue 11).

Sensitivity: for every layer the base config quantizes, and every weight bit-width (and every
activation bit-width of its input quantizer), a score of what quantizing that layer alone costs.
Two estimators:

* ``loss``: measured. The increase of validation loss when only that layer is quantized (its weights
  at b bits, or its input at b bits after calibration), everything else FP32. Exact, one evaluation
  per (layer, bits).
* ``hessian``: HAWQ-V2. The layer's average Hessian trace (Hutchinson's estimator on validation
  batches) times the squared norm of the weight's quantization error at b bits, as the pipeline's own
  quantizer makes it. Weights only; cheap (a few Hessian-vector products for all layers at once).

The table is computed once per (baseline file, data split, estimator, settings) and cached beside
the baseline (``sensitivity-<key>.json``).

Allocation: per-layer weight bit-widths minimising the summed sensitivity subject to the packed
file's exact byte size (layer bytes from the same accounting as the .bsq file: packed weights,
scales, zero-points, biases, FP32 exceptions, header) <= budget; solved exactly by dynamic
programming over bytes, then checked on the real packed size of the resulting config.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
import yaml
from torch import nn

from pipeline.quantize import load_baseline, packed_meta

from quantization import FP32, QuantConfig
from quantization.api import calibrate, plan_for, prepare, quant_layers
from quantization.packing import convert, size_report
from trainer.data import Dataset, load_dataset, normalize
from trainer.train import evaluate

# matplotlib is imported where the table's plot is drawn: search workers import this module to allocate.

FORMAT = "bitsearch-sensitivity-v1"
W_BITS = (2, 3, 4, 5, 6, 8)
A_BITS = (2, 3, 4, 5, 6, 8)
ESTIMATORS = ("loss", "hessian")
MB = 1e6


class SensitivityError(ValueError):
    """Bad input for sensitivity or allocation; the message says what and what is allowed."""


def allocatable_layers(fp32: nn.Module, base: QuantConfig) -> list[str]:
    """The layers whose weights ``base`` quantizes (its FP32 exceptions stay FP32)."""
    return [n for n, p in plan_for(fp32, base).items() if p.w_bits != FP32]


def _only(base: QuantConfig, layer: str, w_bits: int = FP32, a_bits: int = FP32) -> QuantConfig:
    """``base`` with every layer FP32 except ``layer`` (its weights at w_bits, its input at a_bits)."""
    return base.replace(w_bits=FP32, a_bits=FP32, keep_fp32=[], method="ptq",
                        overrides=[{"pattern": layer, "w_bits": w_bits, "a_bits": a_bits}])


def _val(data: Dataset, images: int) -> tuple[torch.Tensor, torch.Tensor]:
    if data.val_y is None or len(data.val_y) == 0:
        raise SensitivityError("sensitivity needs a validation split: the baseline was trained without one "
                               "(train it with --val-size N)")
    return data.val_x[:images], data.val_y[:images]


def _calib(data: Dataset, n: int, batch_size: int = 64) -> list[torch.Tensor]:
    return [normalize(data.train_x[i:i + batch_size]) for i in range(0, min(len(data.train_x), n * batch_size), batch_size)]


@torch.no_grad()
def loss_scores(fp32: nn.Module, data: Dataset, base: QuantConfig, layers: list[str], *, w_bits=W_BITS,
                a_bits=A_BITS, images: int = 1000, calib_batches: int = 4,
                progress: Callable[[str], None] | None = None) -> tuple[dict[str, dict], float]:
    """({layer: {"w": {bits: dloss}, "a": {bits: dloss}}}, FP32 validation loss)."""
    x, y = _val(data, images)
    base_loss = evaluate(fp32, x, y)["loss"]
    calib = _calib(data, calib_batches)
    out: dict[str, dict] = {}
    for i, name in enumerate(layers):
        w = {b: evaluate(prepare(fp32, _only(base, name, w_bits=b)), x, y)["loss"] - base_loss for b in w_bits}
        a = {}
        for b in a_bits:
            q = prepare(fp32, _only(base, name, a_bits=b))
            calibrate(q, iter(calib), len(calib))
            a[b] = evaluate(q, x, y)["loss"] - base_loss
        out[name] = {"w": w, "a": a}
        if progress:
            progress(f"[{i + 1}/{len(layers)}] {name}: dloss at W{min(w_bits)} {w[min(w_bits)]:+.4f}, "
                     f"A{min(a_bits)} {a[min(a_bits)]:+.4f}")
    return out, base_loss


def hessian_traces(fp32: nn.Module, data: Dataset, layers: list[str], *, images: int = 1000, batch_size: int = 200,
                   samples: int = 8, seed: int = 0) -> dict[str, float]:
    """Average Hessian trace (trace / number of weights) of the validation loss w.r.t. each layer's
    weight: Hutchinson's estimator E[v^T H v] with Rademacher v, all layers from the same products."""
    model = copy.deepcopy(fp32).eval()
    params = [model.get_submodule(n).weight for n in layers]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    x, y = _val(data, images)
    g = torch.Generator().manual_seed(seed)
    tr = torch.zeros(len(layers), dtype=torch.float64)
    n_batches = 0
    for i in range(0, len(y), batch_size):
        loss = nn.functional.cross_entropy(model(normalize(x[i:i + batch_size])), y[i:i + batch_size])
        grads = torch.autograd.grad(loss, params, create_graph=True)
        for _ in range(samples):
            vs = [(torch.randint(0, 2, p.shape, generator=g) * 2 - 1).to(p.dtype) for p in params]
            hv = torch.autograd.grad(grads, params, grad_outputs=vs, retain_graph=True)
            tr += torch.tensor([float((h * v).sum()) for h, v in zip(hv, vs)], dtype=torch.float64)
        n_batches += 1
    tr /= max(1, n_batches) * samples
    return {n: float(t) / params[i].numel() for i, (n, t) in enumerate(zip(layers, tr))}


@torch.no_grad()
def weight_errors(fp32: nn.Module, base: QuantConfig, layers: list[str], w_bits=W_BITS) -> dict[str, dict[int, float]]:
    """||Q_b(W) - W||^2 per layer and bit-width, from the pipeline's own quantizer (BN folded, then the
    error expressed on the trained weight)."""
    out: dict[str, dict[int, float]] = {n: {} for n in layers}
    for b in w_bits:
        q = prepare(fp32, allocation_config(base.replace(a_bits=FP32, method="ptq"), {n: b for n in layers})).eval()
        ql = quant_layers(q)
        for n in layers:
            out[n][b] = float(ql[n].weight_error().pow(2).sum())
    return out


def cache_key(baseline: str | Path, data_desc: dict, settings: dict) -> str:
    h = hashlib.sha256()
    with open(baseline, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    h.update(json.dumps({"data": data_desc, **settings}, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    r = np.empty(len(x))
    r[order] = np.arange(len(x), dtype=float)
    for v in np.unique(x):  # ties share their average rank
        m = x == v
        r[m] = r[m].mean()
    return r


def spearman(a: Iterable[float], b: Iterable[float]) -> float:
    """Spearman rank correlation (average ranks for ties); NaN when either side is constant."""
    ra, rb = _ranks(np.asarray(list(a), float)), _ranks(np.asarray(list(b), float))
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def sensitivity(baseline: str | Path, fp32: nn.Module, data: Dataset, base: QuantConfig, *, estimator: str = "loss",
                images: int = 1000, calib_batches: int = 4, samples: int = 8, data_desc: dict | None = None,
                progress: Callable[[str], None] | None = None, force: bool = False) -> dict[str, Any]:
    """The sensitivity table of ``baseline`` (cached beside it). ``estimator``: loss | hessian | both
    (both: the measured table plus the Hessian scores and their rank correlation)."""
    if estimator not in (*ESTIMATORS, "both"):
        raise SensitivityError(f"estimator {estimator!r} is invalid: allowed {', '.join(ESTIMATORS)} or both")
    if images < 1:
        raise SensitivityError(f"images={images} is invalid: at least 1 validation image")
    layers = allocatable_layers(fp32, base)
    if not layers:
        raise SensitivityError("the base quantization config quantizes no layer's weights")
    settings = {"format": FORMAT, "estimator": estimator, "images": images, "calib_batches": calib_batches,
                "samples": samples, "w_bits": list(W_BITS), "a_bits": list(A_BITS),
                "base": base.to_dict(procedure=False)}
    key = cache_key(baseline, data_desc or {}, settings)
    path = Path(baseline).resolve().parent / f"sensitivity-{key}.json"
    if path.is_file() and not force:
        table = json.loads(path.read_text())
        table["cached"] = True
        return table
    t0 = time.time()
    params = {n: fp32.get_submodule(n).weight.numel() for n in layers}
    rows: dict[str, dict] = {n: {"name": n, "params": params[n]} for n in layers}
    extra: dict[str, Any] = {}
    if estimator in ("loss", "both"):
        scores, base_loss = loss_scores(fp32, data, base, layers, images=images, calib_batches=calib_batches,
                                        progress=progress)
        extra["fp32_val_loss"] = base_loss
        for n in layers:
            rows[n]["w"] = {str(b): v for b, v in scores[n]["w"].items()}
            rows[n]["a"] = {str(b): v for b, v in scores[n]["a"].items()}
    if estimator in ("hessian", "both"):
        if progress:
            progress(f"Hessian traces of {len(layers)} layers ({samples} Hutchinson samples per batch)")
        traces = hessian_traces(fp32, data, layers, images=images, samples=samples)
        errs = weight_errors(fp32, base, layers)
        key_w = "w" if estimator == "hessian" else "w_hessian"
        for n in layers:
            rows[n]["hessian_trace"] = traces[n]
            rows[n][key_w] = {str(b): traces[n] * e for b, e in errs[n].items()}
            rows[n].setdefault("a", {})
        if estimator == "both":
            pairs = [(rows[n]["w"][b], rows[n]["w_hessian"][b]) for n in layers for b in rows[n]["w"]]
            extra["spearman_loss_vs_hessian"] = spearman(*zip(*pairs))
    table = {"format": FORMAT, "file": str(path), "estimator": estimator, "baseline": str(Path(baseline).resolve()),
             "data": data_desc or {}, "images": min(images, len(data.val_y)), "settings": settings,
             "seconds": round(time.time() - t0, 1), **extra, "layers": [rows[n] for n in layers], "cached": False}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(table, indent=1))
    tmp.replace(path)
    write_table_files(table)
    return table


def write_table_files(table: dict[str, Any]) -> dict[str, str]:
    """CSV (one row per layer and bit-width) and a plot (score per layer, one line per bit-width) beside
    the JSON table."""
    p = Path(table["file"])
    csv, png = p.with_suffix(".csv"), p.with_suffix(".png")
    lines = ["layer,params,kind,bits,score"]
    for r in table["layers"]:
        for kind in ("w", "a", "w_hessian"):
            for b, v in (r.get(kind) or {}).items():
                lines.append(f"{r['name']},{r['params']},{kind},{b},{v:.6g}")
    csv.write_text("\n".join(lines) + "\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [r["name"].replace(".conv", "") for r in table["layers"]]
    kinds = [k for k in ("w", "a") if any(r.get(k) for r in table["layers"])]
    fig, axes = plt.subplots(len(kinds), 1, figsize=(max(8, 0.22 * len(names) + 2), 3.6 * len(kinds)), squeeze=False)
    for ax, kind in zip(axes[:, 0], kinds):
        bits = sorted({int(b) for r in table["layers"] for b in (r.get(kind) or {})})
        for b in bits:
            ys = [max(1e-6, (r.get(kind) or {}).get(str(b), float("nan"))) for r in table["layers"]]
            ax.plot(range(len(names)), ys, "o-", ms=3, label=f"{b} bit")
        ax.set_yscale("log")
        ax.set_ylabel(("weight" if kind == "w" else "input activation") + " sensitivity")
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=len(bits))
    est = table["estimator"]
    axes[0, 0].set_title(f"Per-layer sensitivity ({'increase of validation loss' if est != 'hessian' else 'Hessian trace x ||dW||^2'}"
                         f"; values <= 1e-6 drawn at 1e-6)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return {"csv": str(csv), "plot": str(png)}


# ------------------------------------------------------------------------------------------------
# allocation


def layer_bytes(fp32: nn.Module, base: QuantConfig, meta: dict, layers: list[str], bits=W_BITS,
                a_bits: int | None = None) -> dict[str, dict[int, int]]:
    """Bytes of each layer in the packed file at each weight bit-width (the .bsq accounting: packed
    weights, scales, zero-points, bias, activation quantizer parameters)."""
    out: dict[str, dict[int, int]] = {n: {} for n in layers}
    for b in bits:
        cfg = allocation_config(base, {n: b for n in layers}, a_bits)
        rows = {r["layer"]: r for r in size_report(convert(prepare(fp32, cfg), meta), fp32)["layers"]}
        for n in layers:
            out[n][b] = int(rows[n]["total_bytes"])
    return out


def allocation_config(base: QuantConfig, bits: dict[str, int], a_bits: int | None = None) -> QuantConfig:
    """``base`` with one override per allocated layer (its exact name as the pattern)."""
    ovs = [*base.to_dict()["overrides"], *({"pattern": n, "w_bits": b} for n, b in bits.items())]
    return base.replace(overrides=ovs, **({"a_bits": a_bits} if a_bits is not None else {}))


def solve(scores: dict[str, dict[int, float]], costs: dict[str, dict[int, int]], capacity: int) -> tuple[dict[str, int], float] | None:
    """Exact: bits per layer minimising the summed score with the summed cost <= capacity (bytes), by
    dynamic programming over bytes; None if even the cheapest choice does not fit."""
    layers = list(scores)
    # widest first: on equal scores the DP keeps the first option, i.e. more bits when they fit
    opts = {n: sorted((b for b in scores[n] if b in costs[n]), reverse=True) for n in layers}
    base_cost = sum(min(costs[n][b] for b in opts[n]) for n in layers)
    cap = capacity - base_cost
    if cap < 0:
        return None
    extra_max = sum(max(costs[n][b] for b in opts[n]) - min(costs[n][b] for b in opts[n]) for n in layers)
    cap = min(cap, extra_max)
    inf = float("inf")
    dp = np.zeros(cap + 1)  # dp[c]: least summed score of the layers so far with extra bytes <= c
    choice = np.zeros((len(layers), cap + 1), dtype=np.int8)
    for li, n in enumerate(layers):
        lo = min(costs[n][b] for b in opts[n])
        best = np.full(cap + 1, inf)
        arg = np.zeros(cap + 1, dtype=np.int8)
        for bi, b in enumerate(opts[n]):
            k = costs[n][b] - lo
            if k > cap:
                continue
            cand = np.full(cap + 1, inf)
            cand[k:] = dp[:cap + 1 - k] + scores[n][b]
            better = cand < best
            best[better], arg[better] = cand[better], bi
        dp, choice[li] = best, arg
    c = cap
    out: dict[str, int] = {}
    for li in range(len(layers) - 1, -1, -1):
        n = layers[li]
        b = opts[n][choice[li, c]]
        out[n] = b
        c -= costs[n][b] - min(costs[n][bb] for bb in opts[n])
    return out, float(dp[cap])


def monotone(score: dict[int, float]) -> dict[int, float]:
    """A layer's scores as the allocator uses them: never below 0 and never higher for more bits (a
    measured negative score, or a wider format scoring worse than a narrower one, is evaluation noise)."""
    out, best = {}, float("inf")
    for b in sorted(score):
        best = min(best, max(0.0, score[b]))
        out[b] = best
    return out


ALLOC_ESTIMATORS = ("loss", "hessian", "max")


def weight_scores(table: dict[str, Any], estimator: str | None = None) -> tuple[str, dict[str, dict[int, float]]]:
    """(estimator, {layer: {bits: score}}): the weight scores the allocator minimises, each layer's made
    ``monotone``. ``loss`` and ``hessian`` are the table's columns; ``max`` (a table with both) takes
    per layer and bit-width the larger of the two, so that neither estimator's blind spot is free.

    Default: the Hessian estimator wherever the table has it. On the cpu model the measured single-layer
    scores are not additive (a layer alone at W2 can even raise accuracy) and their allocations collapse
    the model; the Hessian ones (magnitudes, see below) allocate well (docs/RESULTS.md, mixed precision)."""
    have = table.get("estimator")
    est = estimator or ("loss" if have == "loss" else "hessian")
    where = table.get("file", "the table")
    if est not in ALLOC_ESTIMATORS:
        raise SensitivityError(f"estimator {est!r} is invalid: allowed {', '.join(ALLOC_ESTIMATORS)}")
    if (est == "hessian" and have == "loss") or (est == "loss" and have == "hessian") or (est == "max" and have != "both"):
        raise SensitivityError(f"{where} holds {'Hessian' if have == 'hessian' else 'measured (loss)'} scores only; "
                               f"estimator {est} needs `bitsearch sensitivity --estimator both`")

    def column(key: str, magnitude: bool = False) -> dict[str, dict[int, float]]:
        return {r["name"]: monotone({int(b): abs(float(v)) if magnitude else float(v) for b, v in r[key].items()})
                for r in table["layers"]}
    # a negative Hessian score is a negative trace estimate: Hutchinson's estimator could not resolve the
    # sign of a small, indefinite curvature. Its magnitude is the scale we have; clamped to 0 (as a
    # measured loss decrease is) the layer looked free and sat at 2 bits in every allocation
    if est == "max":
        lo, he = column("w"), column("w_hessian", magnitude=True)
        return est, {n: {b: max(lo[n][b], he[n][b]) for b in lo[n]} for n in lo}
    if est == "hessian":
        return est, column("w_hessian" if have == "both" else "w", magnitude=True)
    return est, column("w")


def check_min_bits(min_bits: Any, name: str = "min_bits") -> None:
    """SensitivityError unless ``min_bits`` is None or an integer in 2..8 (the allocator's floor)."""
    if min_bits is not None and (isinstance(min_bits, bool) or not isinstance(min_bits, int) or not 2 <= min_bits <= 8):
        raise SensitivityError(f"{name}={min_bits!r} is invalid: an integer in 2..8")


def allocate(table: dict[str, Any], fp32: nn.Module, base: QuantConfig, meta: dict, budget_mb: float, *,
             a_bits: int | None = None, estimator: str | None = None, costs: dict | None = None,
             min_bits: int | None = None, groups: dict[str, tuple[list[str], Iterable[int]]] | None = None
             ) -> dict[str, Any]:
    """The allocation for ``budget_mb`` (10^6 bytes of packed file): per-layer weight bits, the config,
    its exact packed size. ``min_bits``: no layer narrower than that (the summed scores miss how a few
    2-3 bit layers interact). ``groups``: name -> (layers, the bit-widths they may take), layers that share
    one bit-width (a per-block search's blocks; ``group_bits`` in the result); by default each layer is its
    own group. SensitivityError when no allocation fits."""
    check_min_bits(min_bits)
    layers = [r["name"] for r in table["layers"]]
    scores = weight_scores(table, estimator)[1]
    if min_bits is not None:
        scores = {n: {b: v for b, v in sc.items() if b >= min_bits} for n, sc in scores.items()}
        if any(not sc for sc in scores.values()):
            raise SensitivityError(f"min_bits={min_bits} leaves no bit-width the table scores (at most "
                                   f"{max(b for sc in weight_scores(table, estimator)[1].values() for b in sc)})")
    costs = costs or layer_bytes(fp32, base, meta, layers, sorted({b for s in scores.values() for b in s}), a_bits)
    groups = groups or {n: ([n], scores[n]) for n in layers}
    missing = set(layers) - {n for members, _ in groups.values() for n in members}
    if missing:
        raise SensitivityError(f"the allocation's groups leave out {sorted(missing)[0]} (and {len(missing) - 1} more)")
    g_scores = {g: {b: sum(scores[n][b] for n in members) for b in set(allowed) if all(b in scores[n] for n in members)}
                for g, (members, allowed) in groups.items()}
    empty = [g for g, sc in g_scores.items() if not sc]
    if empty:
        raise SensitivityError(f"group {empty[0]} may take no bit-width the table scores for all its layers")
    g_costs = {g: {b: sum(costs[n][b] for n in groups[g][0]) for b in sc} for g, sc in g_scores.items()}

    def per_layer(g_bits: dict[str, int]) -> dict[str, int]:
        return {n: g_bits[g] for g, (members, _) in groups.items() for n in members}
    lowest = {g: min(sc) for g, sc in g_scores.items()}
    budget = int(math.floor(budget_mb * MB))
    lo_cfg = allocation_config(base, per_layer(lowest), a_bits)
    fixed = _packed_bytes(fp32, lo_cfg, meta) - sum(g_costs[g][b] for g, b in lowest.items())  # header + FP32 layers
    capacity = budget - fixed
    for attempt in range(12):  # the header's length depends a little on the chosen bits: check, tighten, re-solve
        got = solve(g_scores, g_costs, capacity)
        if got is None:
            smallest = (fixed + sum(g_costs[g][b] for g, b in lowest.items())) / MB
            raise SensitivityError(f"budget {budget_mb} MB is below the smallest allocation ({smallest:.6f} MB with "
                                   f"every layer at {min(lowest.values())} bits)")
        g_bits, score = got
        bits = per_layer(g_bits)
        cfg = allocation_config(base, bits, a_bits)
        size = _packed_bytes(fp32, cfg, meta)
        if size <= budget:
            params = {r["name"]: r["params"] for r in table["layers"]}
            return {"budget_mb": budget_mb, "predicted_bytes": size, "predicted_mb": size / MB, "sensitivity": score,
                    "bits": bits, "group_bits": g_bits, "config": cfg,
                    "avg_w_bits": sum(params[n] * b for n, b in bits.items()) / sum(params.values())}
        capacity -= (size - budget) + 16 * 2 ** attempt  # a growing margin: the header can move a few bytes each time
    raise SensitivityError(f"no allocation within {budget_mb} MB after 12 rounds (internal error)")


def _packed_bytes(fp32: nn.Module, cfg: QuantConfig, meta: dict) -> int:
    return int(size_report(convert(prepare(fp32, cfg), meta), fp32)["comp_bytes"])


def score_baseline(baseline: str | Path, data_path: str, base: QuantConfig, *, estimator: str = "loss",
                   images: int = 1000, force: bool = False, download: bool = True,
                   log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """`bitsearch sensitivity`: the table of a training checkpoint (a local file), scored on its own
    validation split (never on test)."""
    if isinstance(images, bool) or not isinstance(images, int) or images < 1:
        raise SensitivityError(f"--images={images} is invalid: an integer >= 1")
    fp32, ck = load_baseline(baseline)
    plan_for(fp32, base)  # layer patterns that match nothing: an error before the data is read
    tc = ck["config"]
    if not tc.get("val_size"):
        raise SensitivityError(f"{baseline} was trained without a validation split: sensitivity is scored on validation "
                               "images, never on test; retrain with --val-size N")
    data = load_dataset(data_path, subset=tc.get("subset", 0), val_size=tc.get("val_size", 0), seed=tc.get("seed", 0),
                        download=download, progress=log)
    desc = {"path": str(Path(data_path).resolve()) if "://" not in data_path else data_path,
            **{k: tc.get(k, 0) for k in ("subset", "val_size", "seed")}}
    return sensitivity(baseline, fp32.eval(), data, base, estimator=estimator, images=images, data_desc=desc,
                       progress=log, force=force)


def load_table(path: str | Path) -> dict[str, Any]:
    """A sensitivity table written by `bitsearch sensitivity` (SensitivityError for anything else)."""
    try:
        table = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        table = None
    if not isinstance(table, dict) or table.get("format") != FORMAT:
        raise SensitivityError(f"{path} is not a sensitivity table written by `bitsearch sensitivity`")
    return table


def parse_budgets(text: str) -> list[float]:
    """``0.3`` or ``0.25,0.3,0.4`` (MB) -> budgets, each a number > 0."""
    try:
        budgets = [float(b) for b in str(text).split(",") if b.strip()]
    except ValueError:
        raise SensitivityError(f"--budget-mb={text!r} is invalid: a number of MB, or a comma-separated list") from None
    if not budgets or any(not (b > 0 and math.isfinite(b)) for b in budgets):
        raise SensitivityError(f"--budget-mb={text!r} is invalid: every budget must be a number > 0 (MB)")
    return budgets


def allocate_budgets(table: dict[str, Any], baseline: str | Path, budgets: list[float], out_dir: str | Path, *,
                     a_bits: int | None = None, estimator: str | None = None,
                     min_bits: int | None = None) -> dict[str, Any]:
    """`bitsearch allocate`: the allocation for each budget, each written as a quantize YAML in ``out_dir``
    (``alloc-<budget>MB.yaml``, whose packed file is exactly ``predicted_bytes`` long). ``baseline``: the
    table's checkpoint as a local file. Returns {estimator, rows}."""
    if a_bits is not None and not (2 <= a_bits <= 8 or a_bits == FP32):
        raise SensitivityError(f"--a-bits={a_bits} is invalid: allowed 2..8, or 32 for FP32")
    check_min_bits(min_bits, "--min-bits")
    est, scores = weight_scores(table, estimator)
    fp32, ck = load_baseline(baseline)
    base = QuantConfig.from_dict(table["settings"]["base"])
    meta = packed_meta(ck)
    layers = [r["name"] for r in table["layers"]]
    costs = layer_bytes(fp32, base, meta, layers, sorted({b for v in scores.values() for b in v}), a_bits)
    allocs = [allocate(table, fp32, base, meta, b, a_bits=a_bits, estimator=est, costs=costs, min_bits=min_bits)
              for b in budgets]  # every budget solved before any file is written
    rows = []
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    for b, r in zip(budgets, allocs):
        path = Path(out_dir) / f"alloc-{b:g}MB.yaml"
        path.write_text(f"# bitsearch allocate: {b:g} MB budget, {r['predicted_bytes']} bytes packed, "
                        f"summed {est} sensitivity {r['sensitivity']:.6g}, average {r['avg_w_bits']:.3f} weight bits\n"
                        + yaml.safe_dump({"quantize": r["config"].to_dict()}, sort_keys=False))
        rows.append({"budget_mb": b, "predicted_mb": r["predicted_mb"], "predicted_bytes": r["predicted_bytes"],
                     "sensitivity": r["sensitivity"], "config": str(path), "avg_w_bits": r["avg_w_bits"],
                     "layers": {n: {"w_bits": w, "a_bits": r["config"].a_bits} for n, w in r["bits"].items()}})
    return {"estimator": est, "rows": rows}


__all__ = ["A_BITS", "ALLOC_ESTIMATORS", "ESTIMATORS", "SensitivityError", "W_BITS", "allocatable_layers", "allocate",
           "allocate_budgets", "allocation_config", "hessian_traces", "load_table", "parse_budgets", "score_baseline", "layer_bytes", "loss_scores", "sensitivity", "solve", "spearman",
           "weight_errors", "weight_scores", "write_table_files"]
