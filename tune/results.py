"""Results of an experiment directory: table like the reference's, Pareto front, plots, MLflow sync.

Reads Ray Tune's per-trial files (``<trial>/params.json`` and ``<trial>/result.json``, one JSON
line per report) directly, so it needs neither a running Ray nor MLflow.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from mlflow_server.registry import register_search
from mlflow_server.tracking import SearchLogger, check_reachable
from tune import storage
from tune.bisect import within
from tune.settings import SearchConfigError, load_settings
from tune.trial_spec import BLOCK_PREFIX, trial_spec
from tune.sysmetrics import PREFIX as SYSTEM_PREFIX

# matplotlib and plotly are imported where the report's plots are drawn: every trial worker imports this
# module (for the metric names) and never draws.

# Each measured quantity has one name from trial to table: the metric a trial reports to Ray Tune and
# MLflow (per split, like the trainer's per-epoch history: train_top1 / val_top1 / test_top1), which is
# also its results-table column, and the key of the DESIGN.md JSON contract (the `bitsearch quantize`
# vocabulary, where top1 is test top-1). (metric, in the results table, JSON key)
QUANTITIES = (
    ("test_top1", True, "top1"),
    ("val_top1", True, "val_top1"),
    ("fp32_top1", False, "fp32_top1"),
    ("drop", True, "drop"),
    ("orig_mb", True, "orig_mb"),
    ("comp_mb", True, "comp_mb"),
    ("comp_kb", False, "comp_kb"),
    ("ratio", True, "ratio"),
    ("weight_ratio", True, "weight_ratio"),
    ("act_ratio", True, "act_ratio"),
    ("quantized_fraction", False, "quantized_fraction"),
    ("avg_w_bits", False, "avg_w_bits"),
    ("avg_a_bits", False, "avg_a_bits"),
    ("onnx_ms", True, "onnx_ms"),  # the exported model's onnxruntime latency, batch 1 on 1 thread of its node
)
TABLE_QUANTITIES = tuple(m for m, shown, _ in QUANTITIES if shown)
# known from the config alone, before any training: every report of a trial carries them, so a trial
# that ASHA stopped early still has its size on a parallel-coordinates plot
SIZE_METRICS = ("comp_mb", "comp_kb", "ratio", "avg_w_bits", "avg_a_bits")
METRICS = tuple(m for m, _, _ in QUANTITIES)  # what a trial's final report carries (tune/trial.py)
# everything a trial reports that is a measurement (Ray adds pid, timestamp, time_* ... : not ours)
TRIAL_METRICS = frozenset((*METRICS, "epoch", "train_loss", "train_top1", "objective", "metadata_overhead", "alloc_sensitivity",
                           "over_budget", "images_per_s", "gpu_peak_memory_mb"))


def trial_metrics(report: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """A trial report as MLflow gets it: bitsearch's own metrics (and the system/ metrics its worker
    sampled, tune/sysmetrics.py) only, and the epoch as the step."""
    ours = {k: v for k, v in report.items() if (k in TRIAL_METRICS or k.startswith(SYSTEM_PREFIX)) and k != "epoch"}
    return ours, int(report.get("epoch") or 0)


def alloc_params(report: dict[str, Any]) -> dict[str, Any]:
    """A budget-search trial's allocation (per-layer weight bits) as MLflow params ``bits.<layer>``."""
    return {f"bits.{k}": v for k, v in (report.get("alloc_bits") or {}).items()}


COLUMNS = ["trial_id", "label", "w_bits", "a_bits", "method", "granularity", "lr", "qat_epochs", *TABLE_QUANTITIES,
           "status"]


def load_trials(path: str | Path) -> list[dict[str, Any]]:
    """One dict per trial: its TrialSpec (``spec``), every report, and the final one."""
    settings = load_settings(str(path))
    known = saved_trial_status(path)
    out = []
    for d in sorted(Path(path).iterdir()):
        pf, rf = d / "params.json", d / "result.json"
        if not d.is_dir() or not pf.is_file() or (known is not None and d.name not in known):
            continue
        params = json.loads(pf.read_text())
        reports = [json.loads(line) for line in rf.read_text().splitlines() if line.strip()] if rf.is_file() else []
        final = next((r for r in reversed(reports) if r.get("final")), None)  # "done" is Ray's own key
        ck = sorted(d.glob("checkpoint_*"))
        out.append({"trial_id": reports[-1]["trial_id"] if reports else d.name, "dir": str(d),
                    "spec": trial_spec(settings, params), "reports": reports, "final": final,
                    "failed": final is None and (d / "error.txt").is_file(),  # Ray writes it for a trial that errored
                    # in flight when the search was interrupted (ASHA's stopped trials are TERMINATED)
                    "interrupted": final is None and known is not None and known.get(d.name) in UNFINISHED,
                    "checkpoint": str(ck[-1]) if ck else None})
    return out


def trial_packed(experiment: str | Path, trial_id: str) -> Path:
    """The packed file of a finished trial of a local experiment."""
    trials = load_trials(experiment)
    match = [t for t in trials if t["trial_id"] == trial_id]
    if not match:
        known = ", ".join(t["trial_id"] for t in trials[:8]) or "none"
        raise SearchConfigError(f"no trial {trial_id!r} in {experiment}; trials: {known}")
    f = Path(match[0]["dir"]) / "work" / "final" / "model.bsq"
    if not f.is_file():
        raise SearchConfigError(f"trial {trial_id} of {experiment} has no packed model (it did not finish)")
    return f


def compare(experiment: str, trial_ids: list[str]) -> pd.DataFrame:
    """The results-table rows of ``trial_ids`` (SearchConfigError naming unknown ids)."""
    df = table(load_trials(storage.local_copy(experiment)))
    missing = [t for t in trial_ids if t not in set(df["trial_id"])]
    if missing:
        raise SearchConfigError(f"unknown trial id(s) {', '.join(missing)}; known: {', '.join(df['trial_id'])}")
    return df[df["trial_id"].isin(trial_ids)]


def saved_trial_status(path: str | Path) -> dict[str, str] | None:
    """Trial id -> its status (PENDING, RUNNING, PAUSED, TERMINATED, ERROR) in Ray Tune's last saved
    experiment state (the trials' folders are named by trial id), or None without one. A driver killed just
    after starting a trial leaves its folder behind although the saved state never held it; `resume` runs
    the search from that state, so the folder is not one of its trials."""
    states = sorted(Path(path).glob("experiment_state-*.json"))
    if not states:
        return None
    try:
        trials = [json.loads(t[0]) for t in json.loads(states[-1].read_text())["trial_data"]]
        return {t["trial_id"]: str(t.get("status", "")) for t in trials}
    except (ValueError, KeyError, IndexError, TypeError):  # a format this code does not know: keep every folder
        return None


UNFINISHED = ("PENDING", "RUNNING", "PAUSED")  # Ray Tune statuses of a trial a stopped driver left behind


def table(trials: list[dict[str, Any]], unfinished: str = "interrupted") -> pd.DataFrame:
    """The results table; ``unfinished``: what a trial the driver left in flight is called (interrupted by
    Ctrl-C, or stopped when the search's time budget ran out)."""
    rows = []
    for t in trials:
        f = t["final"] or {}
        row = t["spec"].row()
        if t["spec"].size_budget_mb is not None and f.get("avg_w_bits") is not None:  # allocated by sensitivity
            row["w_bits"] = f"alloc {f['avg_w_bits']:.2f}"
        blocks = {k: row.pop(k) for k in list(row) if k.startswith(BLOCK_PREFIX)}
        status = ("done" if t["final"] else "failed" if t.get("failed") else unfinished if t.get("interrupted")
                  else "stopped" if t["reports"] else "no result")
        if f.get("over_budget"):
            status = "over budget"
        # a stopped or interrupted trial: what it measured at its last report (validation top-1, size)
        measured = f or (t["reports"][-1] if t["reports"] else {})
        rows.append({"trial_id": t["trial_id"], **row, **{m: measured.get(m) for m in TABLE_QUANTITIES},
                     "status": status, **blocks})
    df = pd.DataFrame(rows)
    if df.empty:
        return pd.DataFrame(columns=COLUMNS)
    return df


def quantize_keys(t: dict[str, Any]) -> dict[str, Any]:
    """A trial in the `bitsearch quantize` JSON vocabulary (w_bits, a_bits, top1, drop, comp_mb, ...)."""
    spec, f = t["spec"], t["final"] or {}
    uniform = not spec.block_w_bits and spec.size_budget_mb is None
    out = {"w_bits": spec.quant.w_bits if uniform else None, "a_bits": spec.quant.a_bits, "method": str(spec.method),
           **{key: f.get(m) for m, _, key in QUANTITIES}}
    if spec.block_w_bits:
        out["block_w_bits"] = list(spec.block_w_bits)
    return {k: v for k, v in out.items() if v is not None}


def records(df: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows as JSON-safe dicts: missing values dropped (per-block columns exist only for mixed trials)."""
    return [{k: v for k, v in r.items() if not (isinstance(v, float) and pd.isna(v)) and v is not None}
            for r in df.to_dict("records")]


def pareto_front(df: pd.DataFrame, acc: str = "val_top1", size: str = "comp_mb") -> pd.DataFrame:
    """Trials not dominated in (higher accuracy, smaller size)."""
    d = df[(df["status"] == "done") & df[acc].notna() & df[size].notna()]
    keep = []
    for i, r in d.iterrows():
        dominated = ((d[acc] >= r[acc]) & (d[size] <= r[size]) & ((d[acc] > r[acc]) | (d[size] < r[size]))).any()
        if not dominated:
            keep.append(i)
    return d.loc[keep].sort_values(size)


def _parallel_frame(done: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The numeric axes of a parallel-coordinates plot, one value per trial on every axis: a mixed
    trial's w_bits is the mean of its block bits, lr and qat_epochs are 0 for PTQ. Axes on which every
    trial has the same value are returned separately (``fixed``) instead of as a flat line."""
    blocks = [c for c in done.columns if c.startswith(BLOCK_PREFIX)]
    wb = pd.to_numeric(done["w_bits"], errors="coerce")
    if blocks:
        wb = wb.fillna(done[blocks].apply(pd.to_numeric, errors="coerce").mean(axis=1))
    num = pd.DataFrame({"w_bits": wb})
    for c in ("a_bits", "lr", "qat_epochs", "comp_mb", "ratio", "val_top1", "test_top1"):
        num[c] = pd.to_numeric(done[c], errors="coerce")
    num[["lr", "qat_epochs"]] = num[["lr", "qat_epochs"]].fillna(0.0)  # PTQ does not fine-tune
    num = num.loc[:, num.notna().all()]
    fixed = {c: num[c].iloc[0] for c in num.columns if num[c].nunique() == 1 and c != "val_top1"}
    return num.drop(columns=list(fixed)), fixed


def _plots(df: pd.DataFrame, front: pd.DataFrame, out: Path) -> dict[str, str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = {}
    done = df[df["status"] == "done"]
    if done.empty:
        return files
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter(done["comp_mb"], done["val_top1"], c="tab:blue", label="trials")
    ax.plot(front["comp_mb"], front["val_top1"], "o-", c="tab:red", label="Pareto front")
    for _, r in front.iterrows():  # the front's points named, so the plot reads without the table
        ax.annotate(r["label"], (r["comp_mb"], r["val_top1"]), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set(xlabel="packed model size (MB)", ylabel="validation top-1 (%)",
           title=f"Validation top-1 vs size: {len(done)} trials, {len(front)} on the Pareto front")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    files["pareto_png"] = str(out / "pareto.png")
    fig.savefig(files["pareto_png"], dpi=110)
    plt.close(fig)

    num, fixed = _parallel_frame(done)
    norm = (num - num.min()) / (num.max() - num.min()).replace(0, 1)
    fig, ax = plt.subplots(figsize=(1.5 * len(num.columns) + 3, 4.5))
    cmap = plt.get_cmap("viridis")
    lo, hi = float(num["val_top1"].min()), float(num["val_top1"].max())
    for i in norm.index:
        ax.plot(range(len(num.columns)), norm.loc[i], c=cmap(float(norm.loc[i, "val_top1"])), alpha=0.85, lw=1.5)
    for j, c in enumerate(num.columns):
        ax.axvline(j, c="0.6", lw=0.8, zorder=0)
        ax.text(j, -0.05, f"{num[c].min():.3g}", ha="center", va="top", fontsize=8)
        ax.text(j, 1.03, f"{num[c].max():.3g}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(num.columns)), num.columns)
    ax.tick_params(axis="x", pad=16)  # room for the per-axis minimum printed under each axis
    ax.set_yticks([])
    ax.set_ylim(-0.12, 1.1)
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(lo, hi if hi > lo else lo + 1))
    fig.colorbar(sm, ax=ax, label="validation top-1 (%)", pad=0.02)
    title = f"Parallel coordinates: {len(done)} finished trials (colour = validation top-1)"
    if fixed:
        title += "\nsame for all: " + ", ".join(f"{k}={v:g}" for k, v in fixed.items())
    ax.set_title(title, fontsize=10, pad=14)
    fig.tight_layout()
    files["parallel_png"] = str(out / "parallel.png")
    fig.savefig(files["parallel_png"], dpi=110)
    plt.close(fig)
    try:
        import plotly.express as px
        p = px.parallel_coordinates(num.reset_index(drop=True), color="val_top1", color_continuous_scale="Viridis")
        files["parallel_html"] = str(out / "parallel.html")
        p.write_html(files["parallel_html"], include_plotlyjs=True)  # self-contained: opens offline
    except ImportError:
        pass
    return files


def _markdown(df: pd.DataFrame) -> str:
    return df.astype(object).where(df.notna(), None).to_markdown(index=False, floatfmt=".3f", missingval="-")


def results_markdown(path: str | Path, df: pd.DataFrame, front: pd.DataFrame) -> str:
    """results.md: every trial, then the Pareto front; a value a trial did not measure is "-"."""
    md = ["# Search results", "", f"Experiment: `{path}`", "",
          "test_top1 / val_top1: test / validation top-1 (%; validation is what the search compares), drop: FP32 "
          "test top-1 minus test_top1, sizes in MB (10^6 bytes, comp_mb = the packed file). \"-\": not measured "
          "(a stopped or interrupted trial ended before its final evaluation; a PTQ trial has no lr).",
          "", _markdown(df) if not df.empty else "(no trials)", "",
          "## Pareto front (validation top-1 vs packed size)", "",
          _markdown(front) if not front.empty else "(none)", ""]
    return "\n".join(md)


def write_report(experiment: str | Path, stopped: str | None = None) -> dict[str, Any]:
    """results.csv, results.md, pareto.png, parallel.png (+ .html), results.json in the experiment dir
    (for a remote experiment: written on a local mirror, then uploaded next to the trials)."""
    path = storage.local_copy(str(experiment))
    trials = load_trials(path)
    # a trial left in flight: stopped by the time budget, else interrupted (Ctrl-C; `resume` finishes it)
    df = table(trials, "stopped" if stopped == "time_budget" else "interrupted")
    front = pareto_front(df) if not df.empty else df
    files = {"csv": str(path / "results.csv"), "markdown": str(path / "results.md"), "json": str(path / "results.json")}
    df.to_csv(files["csv"], index=False)
    Path(files["markdown"]).write_text(results_markdown(path, df, front))
    files.update(_plots(df, front, path))
    done = df[df["status"] == "done"]
    # each trial: the table's columns plus the `quantize` JSON keys (shared/DESIGN.md contract) and the
    # folder of its last checkpoint (the packed model is in it)
    keys = {t["trial_id"]: {**quantize_keys(t), **({"checkpoint": t["checkpoint"]} if t["checkpoint"] else {})}
            for t in trials}
    with_keys = lambda d: [{**r, **keys.get(r["trial_id"], {})} for r in records(d)]  # noqa: E731
    s = load_settings(str(path))
    best = with_keys(best_rows(done, s))
    summary = {"experiment": str(experiment), "trials": with_keys(df),
               "best": best_summary(best[0], s) if best else None,
               "pareto": with_keys(front), "files": files, **({"stopped": stopped} if stopped else {})}
    Path(files["json"]).write_text(json.dumps(summary, indent=2, default=str))
    storage.upload(list(files.values()), str(experiment))
    return summary


def best_rows(done: pd.DataFrame, s) -> pd.DataFrame:
    """The answer among the finished trials: the highest validation top-1; for a max-drop search the smallest
    model within the drop (none if no trial is)."""
    if s.max_drop is None:
        return done.sort_values("val_top1", ascending=False).head(1)
    ok = done[[within(r, s.fp32_val_top1, s.max_drop) for r in records(done)]] if not done.empty else done
    return ok.sort_values(["comp_mb", "val_top1"], ascending=[True, False]).head(1)


def best_summary(row: dict[str, Any], s) -> dict[str, Any]:
    """The answer of a search: its best trial (highest validation top-1; within the size budget, a search
    that has one) with what a user compares it to: ``val_drop`` (FP32 validation top-1 minus its own),
    ``ratio_vs_fp32`` and ``ratio_vs_w8`` (the FP32 model's and the uniform W8A8 model's bytes over its)."""
    out = dict(row)
    if s.fp32_val_top1 is not None and row.get("val_top1") is not None:
        out["val_drop"] = round(s.fp32_val_top1 - row["val_top1"], 4)
    if row.get("ratio") is not None:
        out["ratio_vs_fp32"] = row["ratio"]
    if s.w8_mb and row.get("comp_mb"):
        out["ratio_vs_w8"] = round(s.w8_mb / row["comp_mb"], 4)
    return out


def best_line(best: dict[str, Any]) -> str:
    """The best trial in one line, as the CLI prints it and the parent run's description shows it."""
    drop = f" ({best['val_drop']:+.2f} below FP32)" if best.get("val_drop") is not None else ""
    vs = ", ".join(f"{best[k]:.2f}x {name}" for k, name in (("ratio_vs_fp32", "FP32"), ("ratio_vs_w8", "W8A8"))
                   if best.get(k) is not None)
    return (f"best: trial {best['trial_id']} ({best.get('label')}): val top-1 {_fmt(best.get('val_top1'), 2)}%{drop}, "
            f"test top-1 {_fmt(best.get('test_top1'), 2)}%, {_fmt(best.get('comp_mb'), 4)} MB" + (f", {vs} smaller" if vs else ""))


def parent_summary(summary: dict[str, Any]) -> tuple[dict[str, float], str]:
    """What the search's parent MLflow run shows: metrics (trial counts, the best trial's measurements)
    and a markdown note (the best trial and the Pareto front), from a write_report summary."""
    trials, best, front = summary["trials"], summary.get("best") or {}, summary.get("pareto") or []
    metrics = {"trials": len(trials), "trials_done": sum(t.get("status") == "done" for t in trials),
               "pareto_trials": len(front),
               **{f"best_{m}": best.get(key) for m, _, key in QUANTITIES if best.get(key) is not None},
               **{f"best_{k}": best[k] for k in ("val_drop", "ratio_vs_w8") if best.get(k) is not None}}
    def row(t):
        return (f"| {t.get('trial_id')} | {t.get('label')} | {_fmt(t.get('val_top1'), 2)} | {_fmt(t.get('test_top1'), 2)} "
                f"| {_fmt(t.get('comp_kb'), 1)} | {_fmt(t.get('ratio'), 2)} |")
    head = ["| trial | config | val top-1 | test top-1 | size (KB) | ratio |", "|---|---|---|---|---|---|"]
    note = [f"**bitsearch search** `{summary['experiment']}`: {metrics['trials_done']} of {metrics['trials']} trials done.", ""]
    if best:
        note += ["Best trial (validation top-1):", "", *head, row(best), "", best_line(best), ""]
    if front:
        note += ["Pareto front (validation top-1 vs packed size):", "", *head, *map(row, front), ""]
    note += ["Plots and tables: the Artifacts tab (pareto.png, parallel.png, parallel.html, results.md)."]
    return metrics, "\n".join(note)


def _fmt(v: Any, digits: int) -> str:
    return "-" if v is None or (isinstance(v, float) and v != v) else f"{v:.{digits}f}"


def close_search(lg, summary: dict[str, Any]) -> None:
    """Close the search's MLflow parent run with its report: first delete the open runs of trials the report
    does not hold (SearchLogger.drop_orphans), then the report's files and the best trial's metrics."""
    lg.drop_orphans({t["trial_id"] for t in summary["trials"]})
    lg.finish_search(list(summary["files"].values()), "FINISHED", *parent_summary(summary))


def register_models(s, summary: dict[str, Any], lg) -> dict[str, Any]:
    """The search's Pareto-front trials as versions of its registered model (mlflow_server.registry);
    the champion alias on the best within the size budget (a max-drop search: on its answer, ``best``)."""
    front = summary.get("pareto") or []  # each row names its trial's checkpoint folder (write_report)
    run_ids = {t["trial_id"]: rid for t in front if (rid := lg.trial_run(t["trial_id"])) is not None}
    best = summary.get("best")
    answer = ((best["trial_id"], f"the smallest model within {s.max_drop:g} validation points of FP32")
              if s.max_drop is not None and best else None)
    reg = register_search(s.tracking_store, s.experiment, s.name, front, run_ids, s.size_budget_mb, answer)
    if reg["versions"]:  # the parent run names what it registered
        lg.tag_search({"bitsearch.registered_model": reg["registered_model"],
                       "bitsearch.registered_versions": ",".join(str(v) for v in sorted(reg["versions"].values())),
                       "bitsearch.champion": f"version {reg['champion_version']} (trial {reg['champion_trial']})"
                       if reg["champion_version"] is not None else
                       "none within the drop" if s.max_drop is not None else "none within the size budget"})
    return reg


def sync(path: str | Path) -> dict[str, int]:
    """Write the MLflow runs a dropped tracking server missed; existing complete runs are left alone."""
    s = load_settings(str(path))
    path = storage.local_copy(s.path)
    if s.tracking_uri:
        check_reachable(s.tracking_uri)
    lg = SearchLogger(s.tracking_store, s.experiment, s.path)
    written = 0
    for t in load_trials(path):
        if not t["reports"]:
            continue
        rid = lg.child_run(t["trial_id"], t["spec"].label())
        if lg.is_complete(rid):
            continue
        lg.log_trial_params(rid, t["spec"].params())
        logged = lg.logged_steps(rid, "comp_mb")  # every report carries the size: what reached the server
        for r in t["reports"]:
            metrics, step = trial_metrics(r)
            if step not in logged:  # once per step: a report the server already has is not written again
                lg.log_metrics(rid, metrics, step)
            if alloc_params(r):
                lg.log_trial_params(rid, alloc_params(r))
        if t["final"]:
            lg.finish_trial(rid, t["checkpoint"])
        else:  # ASHA stopped it early (or it failed): what it measured until then is all there is
            lg.finish_trial(rid, None, "failed" if t["failed"] else "stopped")
        written += 1
    if not lg.search_finished():  # the search ended while the server was offline
        close_search(lg, write_report(s.path))
    rj = path / "results.json"
    registry = (register_models(s, json.loads(rj.read_text()), lg) if rj.is_file()  # idempotent
                else {"registered_model": None, "champion_version": None})
    return {"written": written, "registered_model": registry["registered_model"],
            "champion_version": registry["champion_version"]}
