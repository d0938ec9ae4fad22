"""``python -m export inspect FILE``: print a model file's contract, or say what breaks it.

Runs the daemon's own check (:func:`service.model_file.check_model_file`), so a
file that passes here loads on the line, and a file that fails gets the same
one-line reason the daemon would give (exit status 2).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import onnx

from service.model_file import LABELS_KEY, ModelInfo, check_model_file


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=Path, metavar="FILE", help="ONNX model file")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")


def run(args: argparse.Namespace) -> int:
    info = check_model_file(args.file)
    print(json.dumps(as_dict(info), indent=2) if args.json else describe(info))
    return 0


def as_dict(info: ModelInfo) -> dict:
    return {
        "path": str(info.path),
        "model_id": info.model_id,
        "sha256": info.sha256,
        "size_bytes": info.size_bytes,
        "precision": info.precision,
        "input": {
            "name": info.input_name,
            "dtype": "uint8",
            "shape": ["N", info.input_size, info.input_size, 3],
            "layout": "BGR",
        },
        "output": {"name": info.output_name, "dtype": "float32", "shape": ["N", info.num_classes]},
        "labels": info.labels,
        "metadata": info.metadata,
    }


def describe(info: ModelInfo) -> str:
    """The contract of a checked file, for a person."""
    model = onnx.load(str(info.path), load_external_data=False)
    # Quantization tools import many domains they never use; list the used ones.
    used = {"", *(node.domain for node in model.graph.node)}
    opsets = ", ".join(
        f"{o.domain or 'ai.onnx'} {o.version}" for o in model.opset_import if o.domain in used
    )
    s = info.input_size
    lines = [
        f"model file  {info.path}",
        f"model id    {info.model_id}",
        f"sha256      {info.sha256}",
        f"size        {info.size_bytes:,} bytes",
        f"precision   {info.precision}",
        f"onnx        IR {model.ir_version}, opset {opsets}, {len(model.graph.node)} nodes, "
        f"producer {model.producer_name} {model.producer_version}".rstrip(),
        f"input       {info.input_name}: uint8 [N, {s}, {s}, 3] BGR",
        f"output      {info.output_name}: float32 [N, {info.num_classes}] probabilities",
        f"labels      {info.num_classes}: "
        + ", ".join(f"{i}={name}" for i, name in enumerate(info.labels)),
        "metadata",
    ]
    width = max((len(k) for k in info.metadata), default=0)
    for key, value in info.metadata.items():
        if key != LABELS_KEY:
            lines.append(f"  {key:<{width}}  {value}")
    lines.append("contract    OK (checker, signature, metadata, onnxruntime CPU dummy batch)")
    return "\n".join(lines)
