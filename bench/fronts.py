"""Accuracy-vs-size fronts of finished searches on one plot (issue 11): sensitivity-guided budget search
vs per-block TPE vs uniform bit-widths.

Reads each experiment folder (`bitsearch search/sweep --out OUT --name NAME` -> OUT/NAME), takes every
finished trial's packed size and test/validation top-1, scores its per-layer weight bits with a
sensitivity table (the same scores the allocator minimises, so all three arms are ranked by one
predictor; a bit-width the table lacks scores as the next narrower one), and writes: the trials, each
arm's Pareto front (test top-1 vs packed MB), the best compression within 1 point of FP32 (test
top-1), how many of each other arm's trials an arm's front dominates or ties, and the Spearman rank
correlation between predicted sensitivity and real test top-1.

    python bench/fronts.py --sensitivity runs/cpu-A/sensitivity-KEY.json \\
        --arm budget=runs/i11/budget --arm per-block=runs/i11/perblock --arm uniform=runs/i11/uniform \\
        --out docs/bench/fronts-cpu-ptq.json --plot docs/img/fronts-cpu-ptq.png
"""
from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def trial_points(exp: Path, scores: dict[str, dict[int, float]]) -> list[dict]:
    """Finished trials: label, packed bytes, ratio, accuracies, per-layer bits, predicted sensitivity."""
    from tune.results import load_trials, table
    trials = load_trials(exp)
    df = table(trials)
    labels = dict(zip(df["trial_id"], df["w_bits"]))
    out = []
    for t in trials:
        q = Path(t["dir"]) / "work" / "final" / "quantize.json"
        if not t["final"] or not q.is_file():
            continue
        r = json.loads(q.read_text())
        layers = r["layers"] if isinstance(r["layers"], list) else ast.literal_eval(r["layers"])
        bits = {x["layer"]: int(x["w_bits"]) for x in layers if x.get("w_bits") is not None}
        missing = [n for n in scores if n not in bits or bits[n] < min(scores[n])]
        out.append({"trial_id": t["trial_id"], "label": str(labels.get(t["trial_id"])), "a_bits": r["a_bits"],
                    "method": r["method"], "comp_bytes": r["comp_bytes"], "ratio": r["ratio"], "top1": r["top1"],
                    "val_top1": r["val_top1"], "avg_w_bits": t["final"].get("avg_w_bits"),
                    "predicted": None if missing else sum(score_at(scores[n], bits[n]) for n in scores),
                    "bits": {n: bits[n] for n in scores if n in bits}})
    return out


def score_at(score: dict[int, float], bits: int) -> float:
    """A layer's score at ``bits``; a width the table lacks (7, when a search sampled it) scores as the
    next narrower one it has (an upper bound: scores never rise with more bits)."""
    return score[max(b for b in score if b <= bits)]


def rank_corr(points: list[dict]) -> float | None:
    """Spearman between predicted sensitivity (negated: less is better) and test top-1; None when
    undefined (fewer than 3 points, or a constant)."""
    import math

    from pipeline.sensitivity import spearman
    pts = [p for p in points if p["predicted"] is not None]
    if len(pts) < 3:
        return None
    r = spearman([-p["predicted"] for p in pts], [p["top1"] for p in pts])
    return None if math.isnan(r) else r


def front(points: list[dict], acc: str = "top1") -> list[dict]:
    """Points not dominated in (higher accuracy, fewer bytes), by size."""
    keep = [p for p in points if not any(q[acc] >= p[acc] and q["comp_bytes"] <= p["comp_bytes"]
                                         and (q[acc] > p[acc] or q["comp_bytes"] < p["comp_bytes"]) for q in points)]
    return sorted(keep, key=lambda p: p["comp_bytes"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sensitivity", required=True)
    ap.add_argument("--estimator", choices=["loss", "hessian", "max"], default=None)
    ap.add_argument("--arm", action="append", required=True, help="NAME=EXPERIMENT_FOLDER (repeat)")
    ap.add_argument("--within", type=float, default=1.0, help="points of test top-1 below FP32 (default 1)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--plot")
    a = ap.parse_args()

    from pipeline.sensitivity import weight_scores
    table = json.loads(Path(a.sensitivity).read_text())
    est, scores = weight_scores(table, a.estimator)
    arms = {}
    fp32 = None
    for spec in a.arm:
        name, _, path = spec.partition("=")
        pts = trial_points(Path(path), scores)
        for p in pts:
            q = json.loads((Path(path) / p["trial_id"] / "work" / "final" / "quantize.json").read_text())
            fp32 = q.get("fp32_top1", fp32)
        ok = [p for p in pts if fp32 is not None and p["top1"] >= fp32 - a.within]
        arms[name] = {"experiment": path, "trials": pts, "front": [p["trial_id"] for p in front(pts)],
                      "best_within": max(ok, key=lambda p: p["ratio"]) if ok else None,
                      "spearman_predicted_vs_top1": rank_corr(pts)}
    every = [p for arm in arms.values() for p in arm["trials"]]
    for name, arm in arms.items():  # how many of each other arm's points this arm's front dominates or ties
        mine = [p for p in arm["trials"] if p["trial_id"] in arm["front"]]
        arm["dominates"] = {other: sum(any(m["top1"] >= p["top1"] and m["comp_bytes"] <= p["comp_bytes"] for m in mine)
                                       for p in o["trials"])
                            for other, o in arms.items() if other != name}
    res = {"sensitivity": a.sensitivity, "estimator": est, "fp32_top1": fp32, "within_points": a.within,
           "spearman_all": rank_corr(every), "arms": arms}
    Path(a.out).write_text(json.dumps(res, indent=1))
    for name, arm in arms.items():
        b = arm["best_within"]
        print(f"{name}: {len(arm['trials'])} trials, front {len(arm['front'])}, best within {a.within:g} point: "
              + (f"{b['ratio']:.2f}x ({b['top1']:.2f}%, {b['comp_bytes']:,} B)" if b else "none")
              + f", Spearman {arm['spearman_predicted_vs_top1']}, dominates {arm['dominates']}")
    print(f"Spearman over all trials (predicted {est} sensitivity vs test top-1): {res['spearman_all']}")
    if a.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(8, 5))
        for (name, arm), m in zip(arms.items(), "o^sDv"):
            pts = arm["trials"]
            line = ax.scatter([p["comp_bytes"] / 1e6 for p in pts], [p["top1"] for p in pts], marker=m, alpha=0.45)
            f = front(pts)
            ax.plot([p["comp_bytes"] / 1e6 for p in f], [p["top1"] for p in f], marker=m, color=line.get_facecolor()[0],
                    alpha=1.0, label=f"{name} ({len(pts)} trials)")
        if fp32 is not None:
            ax.axhline(fp32, color="k", lw=0.8, ls="--", label=f"FP32 {fp32:.2f}%")
            ax.axhline(fp32 - a.within, color="grey", lw=0.8, ls=":", label=f"FP32 - {a.within:g} point")
        accs = [p["top1"] for arm in arms.values() for p in arm["trials"]]
        floor = max(min(accs) - 2, (fp32 or max(accs)) - 25)  # collapsed trials (~10%) would flatten the rest
        below = sum(x < floor for x in accs)
        ax.set_ylim(floor, max(accs) + 1)
        ax.set_xlabel("packed model file (MB, 10^6 bytes)")
        ax.set_ylabel("test top-1 (%)")
        ax.set_title("Accuracy vs honest size: front per search (lines), every trial (points)"
                     + (f"\n{below} trial(s) below {floor:.0f}% not shown" if below else ""), fontsize=10)
        ax.legend(loc="lower right", fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(a.plot, dpi=120)
        print(f"plot: {a.plot}")


if __name__ == "__main__":
    main()
