"""`bitsearch study`: baseline, sweep, searches and REPORT.md in one resumable command.

Ray and torch are imported inside the command (start-up time of the parser).
"""
from __future__ import annotations

from pathlib import Path

from bitsearch.common import RichProgress, emit, load_profile, stderr_console, writable_dir


def add_study(sub) -> None:
    p = sub.add_parser("study", help="the whole study: baseline, sweep, searches, REPORT.md (resumable)")
    p.add_argument("--config", required=True, help="configs/quick.yaml (2-core CPU, minutes) or configs/seed.yaml (GPU)")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True, help="the study's folder (REPORT.md, each stage's results)")
    p.add_argument("--stages", default="baseline,sweep,search,mixed", help="comma list of stages to run")
    p.add_argument("--no-download", action="store_true", help="never try to download CIFAR-10")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_study)


def cmd_study(args) -> int:
    from trainer.data import source_kind
    from tune.study import run_study
    cfg = load_profile(None, args.config)
    source_kind(args.data, download=not args.no_download)
    writable_dir(args.out)
    con = stderr_console()
    res = run_study(cfg, str(Path(args.data).resolve()) if Path(args.data).exists() else args.data, args.out,
                    stages=[s.strip() for s in args.stages.split(",") if s.strip()],
                    log=lambda m: con.print(f"[bold]study[/bold] {m}"), callbacks=[RichProgress("baseline")],
                    download=not args.no_download)
    emit(res, args.json, lambda: print(f"report: {res['report']} (HTML: {res['report_html']})"))
    return 0
