"""Results of an experiment directory: table like the reference's, Pareto front, plots, MLflow sync.

Reads Ray Tune's per-trial files (``<trial>/params.json`` and ``<trial>/result.json``, one JSON
line per report) directly, so it needs neither a running Ray nor MLflow.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from tune import storage
from tune.settings import SETTINGS_FILE, load_settings
from tune.space import BLOCK_PREFIX, block_bits, trial_label, trial_params

# Each measured quantity has one name from trial to table: the metric a trial reports to Ray Tune and
# MLflow (per split, like the trainer's per-epoch history: train_top1 / val_top1 / test_top1), and
# two fixed labels derived from it here and nowhere else: the reference report's table column and the
# key of the DESIGN.md JSON contract (the `bitsearch quantize` vocabulary, where top1 is test top-1).
# (metric, table column or None, JSON key)
QUANTITIES = (
    ("test_top1", "Accuracy", "top1"),
    ("val_top1", "Val_Acc", "val_top1"),
    ("fp32_top1", None, "fp32_top1"),
    ("drop", "Drop", "drop"),
    ("orig_mb", "Orig_MB", "orig_mb"),
    ("comp_mb", "Comp_MB", "comp_mb"),
    ("ratio", "Ratio", "ratio"),
    ("weight_ratio", "Weight_ratio", "weight_ratio"),
    ("act_ratio", "Act_ratio", "act_ratio"),
    ("quantized_fraction", None, "quantized_fraction"),
)
METRICS = tuple(m for m, _, _ in QUANTITIES)  # what a trial's final report carries (tune/trial.py)
# everything a trial reports that is a measurement (Ray adds pid, timestamp, time_* ... : not ours)
TRIAL_METRICS = frozenset((*METRICS, "epoch", "train_loss", "train_top1", "objective", "metadata_overhead",
                           "over_budget"))


def trial_metrics(report: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """A trial report as MLflow gets it: bitsearch's own metrics only, and the epoch as the step."""
    return {k: v for k, v in report.items() if k in TRIAL_METRICS and k != "epoch"}, int(report.get("epoch") or 0)


COLUMNS = ["trial_id", "W_bits", "A_bits", "method", "granularity", "lr", "qat_epochs",
           *(col for _, col, _ in QUANTITIES if col), "status"]


def load_trials(path: str | Path) -> list[dict[str, Any]]:
    """One dict per trial: its config, every report, and the final one."""
    settings = load_settings(str(path)) if (Path(path) / SETTINGS_FILE).is_file() else None
    out = []
    for d in sorted(Path(path).iterdir()):
        pf, rf = d / "params.json", d / "result.json"
        if not d.is_dir() or not pf.is_file():
            continue
        params = json.loads(pf.read_text())
        reports = [json.loads(line) for line in rf.read_text().splitlines() if line.strip()] if rf.is_file() else []
        final = next((r for r in reversed(reports) if r.get("final")), None)  # "done" is Ray's own key
        ck = sorted(d.glob("checkpoint_*"))
        out.append({"trial_id": reports[-1]["trial_id"] if reports else d.name, "dir": str(d),
                    "config": trial_params(params, settings), "reports": reports, "final": final,
                    "checkpoint": str(ck[-1]) if ck else None})
    return out


def table(trials: list[dict[str, Any]]) -> pd.DataFrame:
    rows = []
    for t in trials:
        c, f = t["config"], t["final"] or {}
        blocks = {k: v for k, v in c.items() if k.startswith(BLOCK_PREFIX)}
        w = f"mixed {min(blocks.values())}-{max(blocks.values())}" if blocks else c.get("w_bits")
        status = "done" if t["final"] else ("stopped" if t["reports"] else "no result")
        if f.get("over_budget"):
            status = "over budget"
        rows.append({"trial_id": t["trial_id"], "W_bits": w, "A_bits": c.get("a_bits"), "method": c.get("method", "ptq"),
                     "granularity": c.get("granularity", "per_channel"), "lr": c.get("qat_lr"),
                     "qat_epochs": c.get("qat_epochs"), **{col: f.get(m) for m, col, _ in QUANTITIES if col},
                     "status": status, **{k: v for k, v in sorted(blocks.items())}})
    df = pd.DataFrame(rows)
    if df.empty:
        return pd.DataFrame(columns=COLUMNS)
    return df


def quantize_keys(t: dict[str, Any]) -> dict[str, Any]:
    """A trial in the `bitsearch quantize` JSON vocabulary (w_bits, a_bits, top1, drop, comp_mb, ...)."""
    c, f = t["config"], t["final"] or {}
    out = {"w_bits": c.get("w_bits"), "a_bits": c.get("a_bits", 8), "method": c.get("method", "ptq"),
           **{key: f.get(m) for m, _, key in QUANTITIES}}
    if block_bits(c):
        out["block_w_bits"] = list(block_bits(c).values())
    return {k: v for k, v in out.items() if v is not None}


def records(df: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows as JSON-safe dicts: missing values dropped (per-block columns exist only for mixed trials)."""
    return [{k: v for k, v in r.items() if not (isinstance(v, float) and pd.isna(v)) and v is not None}
            for r in df.to_dict("records")]


def pareto_front(df: pd.DataFrame, acc: str = "Val_Acc", size: str = "Comp_MB") -> pd.DataFrame:
    """Trials not dominated in (higher accuracy, smaller size)."""
    d = df[(df["status"] == "done") & df[acc].notna() & df[size].notna()]
    keep = []
    for i, r in d.iterrows():
        dominated = ((d[acc] >= r[acc]) & (d[size] <= r[size]) & ((d[acc] > r[acc]) | (d[size] < r[size]))).any()
        if not dominated:
            keep.append(i)
    return d.loc[keep].sort_values(size)


def _plots(df: pd.DataFrame, front: pd.DataFrame, out: Path) -> dict[str, str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = {}
    done = df[df["status"] == "done"]
    if done.empty:
        return files
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter(done["Comp_MB"], done["Val_Acc"], c="tab:blue", label="trials")
    ax.plot(front["Comp_MB"], front["Val_Acc"], "o-", c="tab:red", label="Pareto front")
    ax.set(xlabel="compressed size (MB)", ylabel="validation top-1 (%)", title="Accuracy vs size")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    files["pareto_png"] = str(out / "pareto.png")
    fig.savefig(files["pareto_png"], dpi=110)
    plt.close(fig)

    cols = [c for c in ("A_bits", "lr", "qat_epochs", "Comp_MB", "Ratio", "Val_Acc", "Accuracy") if done[c].notna().any()]
    wb = pd.to_numeric(done["W_bits"], errors="coerce")
    num = pd.concat([wb.rename("W_bits"), done[cols].apply(pd.to_numeric, errors="coerce")], axis=1)
    num = num.loc[:, num.notna().any()]
    norm = (num - num.min()) / (num.max() - num.min()).replace(0, 1)
    fig, ax = plt.subplots(figsize=(1.4 * len(num.columns) + 2, 4))
    cmap = plt.get_cmap("viridis")
    accn = norm["Val_Acc"].fillna(0) if "Val_Acc" in norm else pd.Series(0, index=norm.index)
    for i in norm.index:
        ax.plot(range(len(num.columns)), norm.loc[i].fillna(0.5), c=cmap(float(accn.loc[i])), alpha=0.8)
    ax.set_xticks(range(len(num.columns)), num.columns)
    ax.tick_params(axis="x", pad=14)  # room for the per-axis minimum printed under each axis
    ax.set_yticks([])
    for j, c in enumerate(num.columns):
        ax.text(j, -0.06, f"{num[c].min():.3g}", ha="center", va="top", fontsize=7)
        ax.text(j, 1.04, f"{num[c].max():.3g}", ha="center", va="bottom", fontsize=7)
    ax.set_title("Parallel coordinates (colour = validation accuracy)", pad=18)
    fig.tight_layout()
    files["parallel_png"] = str(out / "parallel.png")
    fig.savefig(files["parallel_png"], dpi=110)
    plt.close(fig)
    try:
        import plotly.express as px
        p = px.parallel_coordinates(num.reset_index(drop=True), color="Val_Acc" if "Val_Acc" in num else None)
        files["parallel_html"] = str(out / "parallel.html")
        p.write_html(files["parallel_html"], include_plotlyjs=True)  # self-contained: opens offline
    except ImportError:
        pass
    return files


def write_report(experiment: str | Path) -> dict[str, Any]:
    """results.csv, results.md, pareto.png, parallel.png (+ .html), results.json in the experiment dir
    (for a remote experiment: written on a local mirror, then uploaded next to the trials)."""
    path = storage.local_copy(str(experiment))
    trials = load_trials(path)
    df = table(trials)
    front = pareto_front(df) if not df.empty else df
    files = {"csv": str(path / "results.csv"), "markdown": str(path / "results.md"), "json": str(path / "results.json")}
    df.to_csv(files["csv"], index=False)
    md = ["# Search results", "", f"Experiment: `{path}`", "",
          "Accuracy = test top-1 (%), Val_Acc = validation top-1 (%, the search objective), sizes in MB (10^6 bytes).",
          "", df.to_markdown(index=False, floatfmt=".3f") if not df.empty else "(no trials)", "",
          "## Pareto front (validation accuracy vs compressed size)", "",
          front.to_markdown(index=False, floatfmt=".3f") if not front.empty else "(none)", ""]
    Path(files["markdown"]).write_text("\n".join(md))
    files.update(_plots(df, front, path))
    done = df[df["status"] == "done"]
    # each trial: the table's columns plus the `quantize` JSON keys (shared/DESIGN.md contract)
    keys = {t["trial_id"]: quantize_keys(t) for t in trials}
    with_keys = lambda d: [{**r, **keys.get(r["trial_id"], {})} for r in records(d)]  # noqa: E731
    best = with_keys(done.sort_values("Val_Acc", ascending=False).head(1))
    summary = {"experiment": str(experiment), "trials": with_keys(df), "best": best[0] if best else None,
               "pareto": with_keys(front), "files": files}
    Path(files["json"]).write_text(json.dumps(summary, indent=2, default=str))
    storage.upload(list(files.values()), str(experiment))
    return summary


def sync(path: str | Path) -> dict[str, int]:
    """Write the MLflow runs a dropped tracking server missed; existing complete runs are left alone."""
    from mlflow_server.tracking import SearchLogger, check_reachable

    s = load_settings(str(path))
    path = storage.local_copy(s.path)
    if s.tracking_uri:
        check_reachable(s.tracking_uri)
    lg = SearchLogger(s.tracking_store, s.experiment, s.path)
    written = 0
    for t in load_trials(path):
        if not t["reports"]:
            continue
        rid = lg.child_run(t["trial_id"], trial_label(t["config"]))
        if lg.is_complete(rid):
            continue
        lg.log_trial_params(rid, t["config"])
        for r in t["reports"]:
            lg.log_metrics(rid, *trial_metrics(r))
        # a trial ASHA stopped early has no final report: its last report closes the run
        final, step = trial_metrics(t["final"] or t["reports"][-1])
        lg.finish_trial(rid, final, t["checkpoint"], "FINISHED" if t["final"] else "KILLED", step=step)
        written += 1
    if not lg.search_finished():  # the search ended while the server was offline
        lg.finish_search(list(write_report(s.path)["files"].values()))
    return {"written": written}
