"""`bitsearch quantize`, `eval` and `export`: one model at a time.

torch and the pipeline are imported inside the commands (start-up time of the parser); only the
torch-free config module is imported here, for the choices the flags offer.
"""
from __future__ import annotations

from pathlib import Path

from bitsearch.common import (RichProgress, UserError, emit, experiment_dir, explicit, load_profile, stderr_console,
                             writable_file)
from pipeline.formats import WEIGHT_HELP, WEIGHT_STORAGE as WEIGHTS
from quantization.config import FineTune, Granularity, Method

QUANT_FLAGS = {"w_bits": "w_bits", "a_bits": "a_bits", "granularity": "w_granularity", "symmetric": "w_symmetric",
               "method": "method", "calib_batches": "calib_batches", "observer": "a_observer",
               "bn_reestimate": "bn_reestimate_batches"}
FINE_TUNE_FLAGS = {"epochs": "epochs", "lr": "lr", "kd_weight": "kd_weight", "kd_temperature": "kd_temperature"}
_FT = FineTune()


def add_quantize(sub) -> None:
    p = sub.add_parser("quantize", help="quantize a trained checkpoint (PTQ, QAT or LSQ) and measure it")
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt from `bitsearch train`")
    p.add_argument("--data", required=True)
    p.add_argument("--w-bits", dest="w_bits", help="weight bits 2..8, 32 = FP32 (default: the --config's, else 8)")
    p.add_argument("--a-bits", dest="a_bits", help="activation bits 2..8, 32 = FP32 (default: the --config's, else 8)")
    p.add_argument("--granularity", choices=[g.flag for g in Granularity], help="weight scales: one per output channel or one per tensor (default: per-channel)")
    p.add_argument("--symmetric", action="store_const", const=True, help="symmetric weights (default)")
    p.add_argument("--asymmetric", dest="symmetric", action="store_const", const=False, help="asymmetric weights")
    p.add_argument("--observer", choices=["minmax", "ema", "percentile", "mse"], help="how activation ranges are calibrated (default: minmax)")
    p.add_argument("--method", choices=list(Method), help="ptq (calibrate only), qat (fine-tune with fake "
                   "quantization) or lsq (also learn the step sizes) (default: the --config's, else ptq)")
    p.add_argument("--epochs", type=int, default=None, help=f"QAT/LSQ fine-tuning epochs (default {_FT.epochs})")
    p.add_argument("--lr", type=float, default=None, help=f"QAT/LSQ learning rate (default {_FT.lr})")
    p.add_argument("--calib-batches", dest="calib_batches", type=int,
                   help="training batches that calibrate the activation ranges (default: the --config's, else 8)")
    p.add_argument("--bn-reestimate", dest="bn_reestimate", type=int, metavar="BATCHES",
                   help="PTQ: re-estimate BN statistics on the quantized model over this many augmented training "
                        "batches (default 16; 0 keeps the FP32 model's statistics)")
    p.add_argument("--kd-weight", dest="kd_weight", type=float, default=None,
                   help="QAT/LSQ: distil from the FP32 baseline, loss = (1-w) label loss + w KD loss (default 0: off)")
    p.add_argument("--kd-temperature", dest="kd_temperature", type=float, default=None, help=f"distillation temperature (default {_FT.kd_temperature:g})")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=128)
    p.add_argument("--config", help="YAML with a quantize: section (per-layer overrides, exceptions, kd: {weight, temperature}, ...; "
                   "default: none)")
    p.add_argument("--export", help="write the bit-packed model file here (default: only in --out)")
    p.add_argument("--out", help="output directory (default: next to the checkpoint, quant-W<w>A<a>-<method>; "
                   "mixed bits: W<lowest>-<highest>)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--no-download", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_quantize)


def cmd_quantize(args) -> int:
    from mlflow_server.tracking import fetch_artifact
    from pipeline.quantize import quantize_checkpoint, quantize_settings

    qcfg, ft = quantize_settings(load_profile(None, args.config).get("quantize") or {}, explicit(args, QUANT_FLAGS),
                                 explicit(args, FINE_TUNE_FLAGS), args.config or "the config")
    if args.export:
        writable_file(args.export, "--export")
    if args.out:
        writable_file(Path(args.out) / "quantize.json", "--out")
    con = stderr_console()
    res = quantize_checkpoint(fetch_artifact(args.checkpoint), args.data, qcfg, ft, batch_size=args.batch_size,
                              device=args.device, out_dir=args.out, export=args.export,
                              download=not args.no_download, log=con.print,
                              callbacks=[RichProgress(str(qcfg.method))] if ft else [])
    emit(res, args.json, lambda: _print_quantized(res))
    return 0


def _print_quantized(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table
    c = Console(highlight=False)
    c.print(f"{result['label']} {result['method']}: top-1 {result['top1']:.2f}% "
            f"(FP32 {result['fp32_top1']:.2f}%, drop {result['drop']:+.2f})")
    t = Table("layer", "params", "w_bits", "a_bits", "packed B", "meta B", "fp32 B", "total B",
              title="Size per layer (the totals sum to the file)")
    bits = lambda b: "-" if b is None else str(b)  # noqa: E731  (the file-header row has none)
    for r in result["layers"]:
        t.add_row(r["layer"], f"{r['params']:,}", bits(r["w_bits"]), bits(r["a_bits"]), f"{r['packed_bytes']:,}",
                  f"{r['metadata_bytes']:,}", f"{r['fp32_bytes']:,}", f"{r['total_bytes']:,}")
    c.print(t)
    c.print(f"size {result['orig_mb']:.3f} MB -> {result['comp_mb']:.3f} MB: ratio {result['ratio']:.2f}x, "
            f"weights {result['weight_ratio']:.2f}x, metadata {100 * result['metadata_overhead']:.2f}% of it, "
            f"{100 * result['quantized_fraction']:.1f}% of params quantized")
    am = result["activation_memory"]
    c.print(f"peak activation memory (batch 1): {am['batch1']['fp32_bytes']:,} B FP32 -> "
            f"{am['batch1']['quant_bytes']:,} B ({am['batch1']['ratio']:.2f}x); batch 128: "
            f"{am['batch128']['fp32_bytes']:,} -> {am['batch128']['quant_bytes']:,} B")
    if result.get("export"):
        c.print(f"packed model {result['export']}: {result['export_bytes']:,} B on disk = comp_mb "
                f"(of which {result['export_header_bytes']:,} B header, tensor table and checksum)")


# ------------------------------------------------------------------------------------------------
# eval


def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="measure a model file on its own: a packed .bsq (test top-1, size on disk) or a "
                                    "training checkpoint (FP32 test top-1)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--packed", help="a .bsq file from `bitsearch quantize --export` or a search trial (one of "
                     "--packed / --checkpoint; no default)")
    src.add_argument("--checkpoint", help="a `bitsearch train` checkpoint (e.g. models/*.pt): its FP32 test top-1 "
                     "(no default)")
    p.add_argument("--data", required=True)
    p.add_argument("--batch-size", dest="batch_size", type=int, default=256)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--no-download", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    from pipeline.quantize import evaluate_checkpoint, evaluate_packed
    con = stderr_console()
    opts = dict(batch_size=args.batch_size, device=args.device, download=not args.no_download, log=con.print)
    if args.checkpoint:
        res = evaluate_checkpoint(args.checkpoint, args.data, **opts)
        emit(res, args.json, lambda: print(f"{args.checkpoint}: FP32 {res['arch']} width {res['width']}, test top-1 "
                                           f"{res['top1']:.2f}% on {res['test_images']:,} images ({res['device']})"))
        return 0
    res = evaluate_packed(args.packed, args.data, **opts)
    emit(res, args.json, lambda: print(f"{args.packed}: {res['label']} {res['method']}, test top-1 {res['top1']:.2f}% "
                                       f"on {res['test_images']:,} images, {res['file_bytes']:,} B on disk "
                                       f"({res['comp_mb']:.4f} MB)"))
    return 0


# ------------------------------------------------------------------------------------------------
# export


def add_export(sub) -> None:
    p = sub.add_parser("export", help="export a packed model (.bsq, or a search trial's) to ONNX (QDQ, int8/int4 weights)")
    p.add_argument("source", nargs="*", metavar="EXPERIMENT TRIAL_ID",
                   help="a search's experiment directory and one of its trial ids (instead of --packed)")
    p.add_argument("--packed", help="a .bsq file from `bitsearch quantize --export` or a search trial (default: "
                   "EXPERIMENT TRIAL_ID's)")
    p.add_argument("--checkpoint", help="a `bitsearch train` checkpoint instead: its FP32 ONNX graph, the reference "
                   "for speed and accuracy (default: none)")
    p.add_argument("--weights", choices=WEIGHTS, default=WEIGHTS[0],
                   help="how quantized weights are stored (default %(default)s): " + "; ".join(
                       f"{k}: {v}" for k, v in WEIGHT_HELP.items()))
    p.add_argument("--format", choices=["onnx"], default="onnx", help="the model format")
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument("--check", metavar="DATA", help="run the ONNX model in onnxruntime on DATA's test images and "
                   "compare with the packed model (top-1 and agreement of predictions; default: no check)")
    p.add_argument("--no-download", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    from pipeline.export import export_model
    from tune.results import trial_packed
    if sum(map(bool, (args.packed, args.source, args.checkpoint))) != 1:
        raise UserError("give one of --packed FILE.bsq, EXPERIMENT TRIAL_ID or --checkpoint FILE.pt")
    if args.source and len(args.source) != 2:
        raise UserError(f"expected EXPERIMENT TRIAL_ID, got {len(args.source)} value(s): {' '.join(args.source)}")
    if args.checkpoint and not Path(args.checkpoint).is_file():
        raise UserError(f"--checkpoint {args.checkpoint}: no such file")
    packed = (Path(args.packed) if args.packed else
              trial_packed(experiment_dir(args.source[0]), args.source[1]) if args.source else None)
    out = writable_file(args.out, "--out")
    res = export_model(packed, out, args.check, download=not args.no_download, log=stderr_console().print,
                       weights=args.weights, checkpoint=args.checkpoint)

    def human():
        if packed is None:
            print(f"{out}: {res['onnx_bytes']:,} B ONNX (opset {res['opset']}; FP32) from {args.checkpoint}")
        else:
            kinds = ", ".join(f"{res[f'layers_{k}']} {k}" for k in ("int8", "uint8", "int4") if res[f"layers_{k}"])
            print(f"{out}: {res['onnx_bytes']:,} B ONNX (opset {res['opset']}; {kinds or 'no integer'} and "
                  f"{res['layers_fp32']} FP32 layers) from {packed} ({res['packed_bytes']:,} B)")
        print(f"onnxruntime on this CPU: {res['latency_ms_b1']:.2f} ms per image (batch 1, 1 thread); "
              f"{res['integer_convs']} of {res['convs']} convolutions as integer kernels")
        if res.get("weights") == "int8" and res.get("integer_convs") and res.get("cpu_vnni") is False:
            print("this CPU has no VNNI: its u8s8 kernels saturate, so some predictions differ here "
                  "(--weights auto, the default, stores int8 only where it computes exactly)")
        if "onnx_top1" in res:
            print(f"onnxruntime: test top-1 {res['onnx_top1']:.2f}% vs packed model {res['packed_top1']:.2f}%, "
                  f"same prediction on {res['agreement']:.2f}% of {res['test_images']:,} images")
    emit(res, args.json, human)
    return 0
