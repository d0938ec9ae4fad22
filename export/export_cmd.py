"""``python -m export --checkpoint RUN/best.pt --out model.onnx``: make and check a model file.

Steps: rebuild the checkpoint's model, wrap it with its temperature softmax,
trace it to ONNX, run onnx's full checker, compare onnxruntime with PyTorch on
real validation crops, optionally make the fp16 or int8 copy and gate it on
validation accuracy, write one self-contained file, and finally load it back
through the daemon's own contract check.
"""

from __future__ import annotations

import argparse
import logging
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from export import ExportError
from service.cli_support import existing_dir, existing_file, output_file
from service.errors import UsageError
from service.model_file import ModelInfo, check_model_file

log = logging.getLogger(__name__)

# Parity of onnxruntime (fp32) with PyTorch eager: largest allowed |difference|
# of any probability, and the argmax must agree on every crop.
PARITY_ATOL = 1e-4


@dataclass(frozen=True)
class ExportReport:
    """What an export made and measured."""

    info: ModelInfo
    val_source: str
    val_crops: int
    parity_max_diff: float
    fp32_accuracy: float
    accuracy: float  # of the written file (= fp32_accuracy for fp32)
    reduced_max_diff: float | None = None  # |fp16/int8 - fp32| probabilities
    reduced_agreement: float | None = None  # % of crops where the argmax matches fp32's


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from export.onnx_export import DEFAULT_OPSET, OPSETS
    from export.quantize import MAX_ACCURACY_LOSS_POINTS

    parser.add_argument(
        "--checkpoint",
        required=True,
        type=existing_file,
        metavar="RUN/best.pt",
        help="checkpoint written by `python -m training fit`",
    )
    parser.add_argument(
        "--out",
        required=True,
        type=output_file,
        metavar="FILE.onnx",
        help="model file to write (replaced atomically if it exists)",
    )
    parser.add_argument(
        "--opset",
        type=int,
        choices=OPSETS,
        default=DEFAULT_OPSET,
        help=f"ONNX opset (default {DEFAULT_OPSET}; onnxruntime 1.31+ runs all)",
    )
    precision = parser.add_mutually_exclusive_group()
    precision.add_argument(
        "--fp16", action="store_true", help="half-precision weights (uint8 in, float32 out kept)"
    )
    precision.add_argument(
        "--int8", action="store_true", help="static int8 quantization; needs --calibration"
    )
    parser.add_argument(
        "--calibration",
        type=existing_dir,
        metavar="DIR",
        help="folder of crops (any layout) to calibrate int8 ranges on",
    )
    parser.add_argument(
        "--val",
        type=existing_dir,
        metavar="DIR",
        help="labelled folder (one sub-folder per class) to check on, instead of "
        "the checkpoint's val_files",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help=f"write an fp16/int8 file even if it loses more than {MAX_ACCURACY_LOSS_POINTS} "
        "points of validation accuracy",
    )


def run(args: argparse.Namespace) -> int:
    precision = "int8" if args.int8 else "fp16" if args.fp16 else "fp32"
    if args.int8 and args.calibration is None:
        raise UsageError("--int8 needs --calibration DIR (a folder of training crops)")
    if args.calibration is not None and not args.int8:
        raise UsageError("--calibration is only used with --int8; add --int8 or drop it")
    report = export_checkpoint(
        args.checkpoint,
        args.out,
        opset=args.opset,
        precision=precision,
        calibration=args.calibration,
        val_dir=args.val,
        force=args.force,
    )
    print(format_report(report))
    return 0


def export_checkpoint(
    checkpoint: Path,
    out: Path,
    *,
    opset: int | None = None,
    precision: str = "fp32",
    calibration: Path | None = None,
    val_dir: Path | None = None,
    force: bool = False,
) -> ExportReport:
    """Export ``checkpoint`` to ``out`` and check it; see the module docstring."""
    from export import onnx_export as ox
    from export import quantize
    from export.crops import calibration_crops, validation_crops
    from training.model import load_checkpoint

    opset = ox.DEFAULT_OPSET if opset is None else opset

    # Model and validation crops
    try:
        net, ckpt = load_checkpoint(checkpoint)
    except ValueError as exc:  # a readable file that is not our checkpoint
        raise ExportError(f"{exc}; give a best.pt written by `python -m training fit`") from exc
    except (RuntimeError, OSError, KeyError, EOFError, pickle.UnpicklingError) as exc:
        raise ExportError(
            f"cannot load checkpoint {checkpoint}: torch.load(weights_only=True) fails "
            f"({type(exc).__name__}: {_first_line(exc)[:120]}); give a best.pt written by "
            "`python -m training fit`"
        ) from exc
    labels, size = list(ckpt["labels"]), int(ckpt["img_size"])
    model = ox.CalibratedClassifier(net, float(ckpt.get("temperature", 1.0)))
    val = validation_crops(ckpt, val_dir, size, labels)
    log.info("checking on %d crops from %s", len(val), val.source)

    # fp32 graph, checked against PyTorch
    proto = ox.export_graph(model, size, opset)
    ox.set_metadata(proto, ox.model_metadata(ckpt, "fp32", opset))
    ox.full_check(proto, "fp32")
    fp32_bytes = ox.serialize(proto)
    reference = ox.torch_probs(model, val.images)
    fp32_probs = ox.onnx_probs(fp32_bytes, val.images)
    parity = check_parity(reference, fp32_probs, val.source)
    fp32_acc = quantize.accuracy(fp32_probs, val.targets)
    log.info("fp32 parity with PyTorch: max |diff| %.2e, accuracy %.2f%%", parity, fp32_acc)

    # Reduced precision, gated on accuracy
    out_bytes, acc, reduced_diff, agreement = fp32_bytes, fp32_acc, None, None
    if precision != "fp32":
        if precision == "fp16":
            reduced = quantize.to_fp16(proto)
        else:
            reduced = quantize.to_int8(proto, calibration_crops(calibration, size))
        ox.set_metadata(reduced, ox.model_metadata(ckpt, precision, opset))
        ox.full_check(reduced, precision)
        out_bytes = ox.serialize(reduced)
        probs = ox.onnx_probs(out_bytes, val.images)
        acc = quantize.accuracy(probs, val.targets)
        reduced_diff = float(np.abs(probs - fp32_probs).max())
        agreement = float(np.mean(probs.argmax(1) == fp32_probs.argmax(1)) * 100.0)
        quantize.accuracy_gate(precision, fp32_acc, acc, force)

    # Write, then load back as the daemon would
    ox.write_model(out_bytes, out)
    info = check_model_file(out)
    log.info("wrote %s (%s, model id %s)", out, precision, info.model_id)
    return ExportReport(
        info=info,
        val_source=val.source,
        val_crops=len(val),
        parity_max_diff=parity,
        fp32_accuracy=fp32_acc,
        accuracy=acc,
        reduced_max_diff=reduced_diff,
        reduced_agreement=agreement,
    )


def check_parity(reference: np.ndarray, probs: np.ndarray, source: str) -> float:
    """Max |difference| of onnxruntime's probabilities from PyTorch's; raises past the bounds."""
    diff = float(np.abs(probs - reference).max())
    mismatched = int(np.sum(probs.argmax(1) != reference.argmax(1)))
    if diff > PARITY_ATOL or mismatched:
        raise ExportError(
            f"onnxruntime disagrees with PyTorch on {source}: max |probability difference| "
            f"{diff:.2e} (allowed {PARITY_ATOL:.0e}), argmax differs on {mismatched} of "
            f"{len(reference)} crops; nothing written"
        )
    return diff


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def format_report(report: ExportReport) -> str:
    """A few lines for the terminal: what was written and how it checked out."""
    info = report.info
    lines = [
        f"wrote {info.path}  ({info.precision}, {info.size_bytes / 1e6:.2f} MB, "
        f"model id {info.model_id})",
        f"  checked on {report.val_crops} crops from {report.val_source}",
        f"  onnxruntime vs PyTorch (fp32): max |prob diff| {report.parity_max_diff:.2e}, "
        f"argmax identical",
        f"  validation accuracy: fp32 {report.fp32_accuracy:.2f}%",
    ]
    if report.reduced_max_diff is not None:
        change = report.accuracy - report.fp32_accuracy
        lines[-1] += f", {info.precision} {report.accuracy:.2f}% ({change:+.2f} points)"
        lines.append(
            f"  {info.precision} vs fp32: max |prob diff| {report.reduced_max_diff:.2e}, "
            f"same argmax on {report.reduced_agreement:.1f}% of crops"
        )
    return "\n".join(lines)
