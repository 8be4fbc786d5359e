"""`bitsearch sweep`, `search`, `resume`, `report`, `compare` and `sync`: searches on Ray Tune.

Ray, Optuna and torch are imported inside the commands (start-up time of the parser).
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

from bitsearch.common import UserError, emit, experiment_dir, explicit, load_profile, stderr_console, writable_dir
from quantization.config import FineTune, Method
from tune import storage


def _int_list(text: str | None) -> list:
    if not text:
        return []
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{text!r} is not a comma-separated list of integers") from None


def _common_search_args(p) -> None:
    p.add_argument("--baseline", required=True, help="FP32 checkpoint.pt from `bitsearch train` (with --val-size), "
                   "or an MLflow artifact URI such as runs:/<run_id>/checkpoint.pt")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True, help="storage: a local/NFS path or s3://bucket/prefix; the experiment "
                   "lives in OUT/NAME")
    p.add_argument("--name", help="experiment name (default: sweep / search)")
    p.add_argument("--config", help="YAML with a search: (or sweep:) section; flags override it (default: none)")
    p.add_argument("--max-concurrent", dest="max_concurrent", type=int,
                   help="trials at once (default: as many as the Ray cluster's CPUs and GPUs hold)")
    p.add_argument("--cpus-per-trial", dest="cpus_per_trial", type=float, help="CPUs Ray reserves per trial (default 1)")
    p.add_argument("--gpus-per-trial", dest="gpus_per_trial", type=float,
                   help="GPU per trial, e.g. 0.25 = four trials share one GPU, each capped at a quarter of its memory "
                        "(default 0: trials compute on the CPU)")
    p.add_argument("--wait-for-resources", dest="wait_for_resources", action="store_const", const=True,
                   help="an autoscaling cluster: wait for nodes that fit a trial instead of refusing the search "
                        "(default: off, refuse)")
    p.add_argument("--tracking-uri", dest="tracking_uri", help="MLflow server (default: OUT/mlflow.db)")
    p.add_argument("--experiment", help="MLflow experiment the search logs to (default: bitsearch)")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS or a local Ray)")
    p.add_argument("--batch-size", dest="batch_size", type=int, help="images per batch (default 128)")
    p.add_argument("--finetune-subset", dest="finetune_subset", type=int,
                   help="QAT/LSQ fine-tune on a stratified subset of N training images (validation and test stay "
                        "whole; default: all, 0)")
    p.add_argument("--kd-weight", dest="kd_weight", type=float,
                   help="QAT/LSQ trials distil from the baseline with this weight (0..1; space key kd_weight samples "
                        "it; default 0: no distillation)")
    p.add_argument("--kd-temperature", dest="kd_temperature", type=float, help="distillation temperature (default 4)")
    p.add_argument("--sensitivity", help="table from `bitsearch sensitivity`: with space key size_budget_mb every trial "
                   "allocates per-layer weight bits within its sampled budget; with block_w_bits the allocator's "
                   "per-block solutions are the first trials; with --max-drop the search bisects budgets (default: none)")
    p.add_argument("--estimator", choices=["loss", "hessian", "max"],
                   help="which scores of the sensitivity table to allocate with (default: hessian where the table has it)")
    p.add_argument("--min-bits", dest="min_bits", type=int,
                   help="budget trials: no layer below this many weight bits (default: the table's narrowest, 2)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"],
                   help="auto (default): a trial computes on its GPU when --gpus-per-trial > 0, else on the CPU")
    p.add_argument("--time-budget", dest="time_budget_s", type=float, metavar="SECONDS",
                   help="end the search after this long with the trials it finished (in-flight ones stopped; "
                        "the JSON says \"stopped\": \"time_budget\"); default: no limit")
    p.add_argument("--max-drop", dest="max_drop", type=float, metavar="POINTS",
                   help="search: the smallest model whose validation top-1 is at most this many points below FP32: "
                        "with --sensitivity by bisection over the allocator's size budgets (--num-samples caps the "
                        "trials), without it Optuna samples the space with the drop as a constraint; the answer is "
                        "`best` (default: none)")
    p.add_argument("--latency-budget-ms", dest="latency_budget_ms", type=float, metavar="MS",
                   help="a trial whose exported ONNX model takes longer than this (onnxruntime, batch 1, 1 thread, on "
                        "the trial's node: results column onnx_ms) is over budget: not the best, not on the front; "
                        "default: no limit")
    p.add_argument("--json", action="store_true")


SEARCH_FLAGS = {"name": "name", "max_concurrent": "max_concurrent", "cpus_per_trial": "cpus_per_trial",
                "gpus_per_trial": "gpus_per_trial", "tracking_uri": "tracking_uri", "address": "address",
                "batch_size": "batch_size", "device": "device", "num_samples": "num_samples",
                "objectives": "objectives", "size_budget_mb": "size_budget_mb",
                "qat_epochs": "qat_epochs", "qat_lr": "qat_lr", "finetune_subset": "finetune_subset",
                "kd_weight": "kd_weight", "kd_temperature": "kd_temperature", "sensitivity": "sensitivity",
                "estimator": "estimator", "min_bits": "min_bits", "experiment": "experiment",
                "wait_for_resources": "wait_for_resources", "time_budget_s": "time_budget_s",
                "latency_budget_ms": "latency_budget_ms", "max_drop": "max_drop"}


_FT = FineTune()  # the fine-tuning defaults


def _fine_tune_args(p) -> None:
    p.add_argument("--qat-epochs", dest="qat_epochs", type=int,
                   help=f"QAT/LSQ epochs when the space does not sample them (default {_FT.epochs})")
    p.add_argument("--qat-lr", dest="qat_lr", type=float,
                   help=f"QAT/LSQ learning rate when the space does not sample it (default {_FT.lr:g})")


def add_search(sub) -> None:
    p = sub.add_parser("sweep", help="grid sweep (default: W{8,4,2} x A{8,4,2}) on Ray Tune")
    _common_search_args(p)
    p.add_argument("--w-bits", dest="w_bits", help="weight bits to sweep, a comma list (default: 8,4,2)")
    p.add_argument("--a-bits", dest="a_bits", help="activation bits to sweep, a comma list (default: 8,4,2)")
    p.add_argument("--method", choices=list(Method), help="every trial's method (default: ptq)")
    _fine_tune_args(p)
    p.set_defaults(func=cmd_search, mode="sweep")
    p = sub.add_parser("search", help="Optuna search over bit-widths and learning rate on Ray Tune")
    _common_search_args(p)
    p.add_argument("--objectives", choices=["single", "multi"], help="single: accuracy under a size budget; "
                   "multi: accuracy vs size (Pareto front) (default: single)")
    p.add_argument("--num-samples", dest="num_samples", type=int, help="trials the search runs (default 8)")
    p.add_argument("--size-budget-mb", dest="size_budget_mb", type=float,
                   help="single objective: the most accurate model whose packed file is at most this many MB "
                        "(default: no budget)")
    _fine_tune_args(p)
    p.set_defaults(func=cmd_search, mode="search")
    for name, help_, func in (("resume", "continue an interrupted sweep/search", cmd_resume),
                              ("report", "results table, Pareto front and plots of an experiment", cmd_report),
                              ("compare", "chosen trials side by side", cmd_compare),
                              ("sync", "write the MLflow runs a dropped tracking server missed", cmd_sync)):
        p = sub.add_parser(name, help=help_)
        p.add_argument("path", help="experiment directory (OUT/NAME)")
        if name == "compare":
            p.add_argument("trials", nargs="+", help="trial ids (see `bitsearch report`)")
        if name == "resume":
            p.add_argument("--more", type=int, default=0, metavar="N",
                           help="a finished search: run exactly N more trials, proposed by the same Optuna study "
                                "(default 0: only finish what was interrupted)")
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=func)


def _search_result(summary: dict) -> dict:
    return {"experiment": summary["experiment"], "trials": summary["trials"], "best": summary["best"],
            "pareto": summary["pareto"], "mlflow_experiment_id": summary.get("mlflow_experiment_id"),
            "files": summary["files"], "seconds": summary.get("seconds"), "registry": summary.get("registry"),
            "stopped": summary.get("stopped", "completed")}


def _print_table(summary: dict) -> None:
    import pandas as pd
    df = pd.DataFrame(summary["trials"])
    cols = [c for c in ("trial_id", "w_bits", "a_bits", "method", "lr", "test_top1", "val_top1", "drop", "comp_mb", "ratio",
                        "status") if c in df]
    print(df[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}", na_rep="-") if len(df) else "(no trials)")
    if summary.get("best"):
        from tune.results import best_line
        print(best_line(summary["best"]))
    print(f"report: {summary['files'].get('markdown')}")
    reg = summary.get("registry") or {}
    if reg.get("champion_version") is not None:
        print(f"model registry: {reg['registered_model']} ({len(reg['versions'])} Pareto version(s)), champion = "
              f"version {reg['champion_version']} (trial {reg['champion_trial']}): "
              f"mlflow.pyfunc.load_model(\"models:/{reg['registered_model']}@champion\")")
    hint = mlflow_hint(summary)
    if hint:
        print(hint)


def mlflow_hint(summary: dict) -> str | None:
    """How to open the search's trials in MLflow: its shared view (its trials in the chart view, the
    parallel-coordinates chart of bits, size and validation top-1) of the experiment's runs page; the UI's
    default page for an experiment is its GenAI overview, which shows none of them."""
    from tune.settings import load_settings
    exp_id = summary.get("mlflow_experiment_id")
    if exp_id is None:
        return None
    try:
        s = load_settings(storage.normalize(summary["experiment"]))
    except Exception:  # noqa: BLE001 - a hint, never an error
        return None
    from mlflow_server.tracking import runs_view_route
    route = runs_view_route(exp_id, summary.get("mlflow_view"))
    if s.tracking_uri and s.tracking_uri.startswith(("http://", "https://")):
        return f"MLflow: {s.tracking_uri.rstrip('/')}/{route}"
    return f"MLflow: run `{bitsearch_command()} ui {s.out}`, then open http://127.0.0.1:5000/{route}"


def bitsearch_command() -> str:
    """How a fresh shell runs this bitsearch: `bitsearch` when that is what PATH finds, else the script's path
    (e.g. .venv/bin/bitsearch, relative to the working directory when below it)."""
    mine = Path(sys.executable).with_name("bitsearch")
    found = shutil.which("bitsearch")
    if not mine.exists() or (found and Path(found).resolve() == mine.resolve()):
        return "bitsearch"
    try:
        return str(mine.relative_to(Path.cwd()))
    except ValueError:
        return str(mine)


def cmd_search(args) -> int:
    from tune.search import run
    from tune.settings import search_settings
    section = load_profile(None, args.config).get(args.mode, {}) if args.config else {}
    grid = {}
    if args.mode == "sweep":
        grid = {k: v for k, v in (("w_bits", _int_list(args.w_bits)), ("a_bits", _int_list(args.a_bits)),
                                  ("method", [args.method] if args.method else [])) if v}
    s = search_settings(args.mode, section, explicit(args, SEARCH_FLAGS), grid, baseline=args.baseline, data=args.data,
                        out=args.out, source=args.config)
    if not storage.is_remote(args.out):
        writable_dir(args.out)
    summary = run(s, log=stderr_console().print)
    emit(_search_result(summary), args.json, lambda: _print_table(summary))
    return 0


def cmd_resume(args) -> int:
    from tune.search import resume
    summary = resume(experiment_dir(args.path), more=args.more)
    if summary.get("nothing_to_resume"):
        n = len(summary["trials"])
        emit({**_search_result(summary), "nothing_to_resume": True}, args.json,
             lambda: print(f"nothing to resume: all {n} trials of {args.path} have finished; "
                           f"report: {summary['files'].get('markdown')}"))
        return 0
    emit(_search_result(summary), args.json, lambda: _print_table(summary))
    return 0


def cmd_report(args) -> int:
    from tune.results import write_report
    summary = write_report(experiment_dir(args.path))
    emit(_search_result(summary), args.json, lambda: _print_table(summary))
    return 0


def cmd_compare(args) -> int:
    from tune.results import compare
    sel = compare(experiment_dir(args.path), args.trials)

    def cell(v):  # 39.47, not 39.469999; 8, not 8.0
        return f"{v:.4g}" if isinstance(v, float) else v
    emit({"trials": sel.to_dict("records")}, args.json, lambda: print(sel.set_index("trial_id").T.map(cell).to_string()))
    return 0


def cmd_sync(args) -> int:
    from tune.results import sync
    res = sync(experiment_dir(args.path))

    def text():
        print(f"wrote {res['written']} missing MLflow run(s)")
        if res["champion_version"] is not None:
            print(f"registered model {res['registered_model']}: champion = version {res['champion_version']}")
    emit(res, args.json, text)
    return 0
