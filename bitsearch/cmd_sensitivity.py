"""`bitsearch sensitivity` and `allocate`: per-layer sensitivity of a baseline, and the exact bit allocation
within a packed-size budget.

torch and the pipeline are imported inside the commands (start-up time of the parser).
"""
from __future__ import annotations

from pathlib import Path

from bitsearch.common import emit, load_profile, stderr_console, writable_dir


def add_sensitivity(sub) -> None:
    p = sub.add_parser("sensitivity", help="per-layer quantization sensitivity of a baseline (cached beside it)")
    p.add_argument("--baseline", required=True, help="checkpoint.pt from `bitsearch train` (with a validation split)")
    p.add_argument("--data", required=True)
    p.add_argument("--estimator", default="loss", choices=["loss", "hessian", "both"],
                   help="loss: measured increase of validation loss (weights and inputs); hessian: HAWQ-V2 "
                        "trace x ||dW||^2 (weights); both: the measured table plus the Hessian scores and their "
                        "rank correlation")
    p.add_argument("--images", type=int, default=1000, help="validation images to score on (default 1000)")
    p.add_argument("--config", help="YAML with a quantize: section: the base config (granularity, exceptions, ...; default: "
                   "QuantConfig's)")
    p.add_argument("--force", action="store_true", help="recompute even if a cached table exists")
    p.add_argument("--tracking-uri", dest="tracking_uri",
                   help="log the table, CSV and plot to MLflow with the baseline: into the baseline's run for a "
                        "runs:/<id>/checkpoint.pt baseline, else into a run of the bitsearch-baselines experiment (default: "
                        "no MLflow)")
    p.add_argument("--no-download", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_sensitivity)
    p = sub.add_parser("allocate", help="per-layer bit-widths minimising sensitivity within a packed-size budget")
    p.add_argument("--sensitivity", required=True, help="the JSON table `bitsearch sensitivity` wrote")
    p.add_argument("--budget-mb", dest="budget_mb", required=True,
                   help="packed-file budget in MB (10^6 bytes); a comma-separated list gives the front over budgets")
    p.add_argument("--a-bits", dest="a_bits", type=int, default=None, help="activation bits for every layer (default: the base config's)")
    p.add_argument("--estimator", choices=["loss", "hessian", "max"], default=None,
                   help="which scores to allocate with when the table has both; max: the larger of the two per layer "
                        "and bit-width (default: hessian, see docs/RESULTS.md, mixed precision)")
    p.add_argument("--min-bits", dest="min_bits", type=int, default=None,
                   help="no layer below this many weight bits (default: the table's narrowest, 2)")
    p.add_argument("--out", help="folder for the quantize YAML(s) (default: beside the table)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_allocate)


def _base_qconfig(config: str | None):
    """The base QuantConfig of a `quantize:` section (its fine-tuning settings are not QuantConfig fields)."""
    from pipeline.quantize import quantize_settings
    section = dict(load_profile(None, config).get("quantize") or {}) if config else {}
    return quantize_settings(section, {}, {}, config)[0]


def cmd_sensitivity(args) -> int:
    from mlflow_server.tracking import check_reachable, fetch_artifact, log_sensitivity
    from pipeline.sensitivity import score_baseline

    base = _base_qconfig(args.config)
    if args.tracking_uri:
        check_reachable(args.tracking_uri)  # before the work, not after it
    con = stderr_console()
    table = score_baseline(fetch_artifact(args.baseline, args.tracking_uri), args.data, base, estimator=args.estimator,
                           images=args.images, force=args.force, download=not args.no_download, log=con.print)
    out = {k: table[k] for k in ("file", "estimator", "cached", "images", "seconds", "fp32_val_loss",
                                 "spearman_loss_vs_hessian") if k in table}
    out["csv"], out["plot"] = str(Path(table["file"]).with_suffix(".csv")), str(Path(table["file"]).with_suffix(".png"))
    out["layers"] = [{k: r[k] for k in ("name", "params", "w", "a", "w_hessian", "hessian_trace") if k in r}
                     for r in table["layers"]]
    if args.tracking_uri:
        out["mlflow_run_id"] = log_sensitivity(args.tracking_uri, args.baseline, table)
    emit(out, args.json, lambda: _print_table(table, out, args.tracking_uri))
    return 0


def _print_table(table: dict, out: dict, tracking_uri: str | None) -> None:
    first = table["layers"][0]
    worst = sorted(table["layers"], key=lambda r: -float(r["w"][min(r["w"], key=int)]))[:3]
    print(f"{len(table['layers'])} layers x W{{{','.join(first['w'])}}}"
          + (f" x A{{{','.join(first['a'])}}}" if first.get("a") else "")
          + f" ({table['estimator']}{', cached' if table['cached'] else ''}): {table['file']}")
    print("most sensitive at the lowest weight bits: " + ", ".join(r["name"] for r in worst))
    if "spearman_loss_vs_hessian" in table:
        print(f"rank correlation loss vs Hessian estimator: {table['spearman_loss_vs_hessian']:.3f}")
    if "mlflow_run_id" in out:
        print(f"MLflow: run {out['mlflow_run_id']} at {tracking_uri} (artifacts under sensitivity/)")


def cmd_allocate(args) -> int:
    from mlflow_server.tracking import fetch_artifact
    from pipeline.sensitivity import allocate_budgets, load_table, parse_budgets

    table = load_table(args.sensitivity)
    budgets = parse_budgets(args.budget_mb)
    out_dir = writable_dir(args.out or Path(args.sensitivity).parent)
    res = allocate_budgets(table, fetch_artifact(table["baseline"]), budgets, out_dir, a_bits=args.a_bits,
                           estimator=args.estimator, min_bits=args.min_bits)
    rows = res["rows"]
    out = {**rows[0], "estimator": res["estimator"]} if len(rows) == 1 else {"front": rows, "estimator": res["estimator"]}

    def human():
        for r in rows:
            print(f"{r['budget_mb']:g} MB budget: {r['predicted_bytes']:,} bytes packed, avg {r['avg_w_bits']:.2f} "
                  f"weight bits, summed sensitivity {r['sensitivity']:.4g} -> {r['config']}")
    emit(out, args.json, human)
    return 0
