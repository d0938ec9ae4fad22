"""``python -m training evaluate``: metrics and plots of a model on a labelled folder.

The model is a training checkpoint (``best.pt``, probabilities with its fitted
temperature) or an exported ONNX file, run with onnxruntime exactly as the
daemon would: input ``crops`` uint8 BGR NHWC, output ``probs``, class names
from the ``beltsort.labels`` metadata. No code of ours sits between the file
and the numbers for ONNX.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from service.cli_support import existing_dir, existing_file, output_dir
from service.errors import ModelFileError

log = logging.getLogger(__name__)

ONNX_BATCH = 64


def add_arguments(parser) -> None:
    parser.add_argument(
        "--model",
        type=existing_file,
        required=True,
        help="best.pt checkpoint or exported model.onnx",
    )
    parser.add_argument(
        "--data",
        type=existing_dir,
        required=True,
        help="folder with one sub-folder of crops per class (the model's names)",
    )
    parser.add_argument(
        "--out", type=output_dir, help="folder for metrics.json and plots (default: print only)"
    )
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")


def run(args) -> int:
    from service.cli_support import setup_logging
    from training.common import prepare_torch_env

    prepare_torch_env()
    setup_logging(args.log_level)
    metrics = evaluate(args.model, args.data, args.out)
    print(
        f"{metrics['samples']} crops: accuracy {metrics['accuracy']:.4f}, "
        f"macro F1 {metrics['macro_f1']:.4f}, ECE {metrics['ece']:.4f}"
    )
    return 0


def evaluate(model_path: Path, data_dir: Path, out_dir: Path | None = None) -> dict:
    """Metrics of the model at ``model_path`` on ``data_dir``; files in ``out_dir`` if given."""
    from training.data import load_folder

    predictor = load_predictor(model_path)
    data = load_folder(data_dir, predictor.img_size, labels=predictor.labels)
    probs = predictor.probs(data.images)
    if out_dir is None:
        from training.metrics import classification_metrics

        return classification_metrics(probs, data.targets, predictor.labels)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    metrics = write_report(Path(out_dir), data.images, data.targets, probs, predictor.labels)
    metrics = {
        "model": str(Path(model_path).resolve()),
        "data": str(Path(data_dir).resolve()),
        **metrics,
    }
    (Path(out_dir) / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def write_report(
    out_dir: Path,
    images: np.ndarray,
    targets: np.ndarray,
    probs: np.ndarray,
    labels: Sequence[str],
) -> dict:
    """Metrics of ``probs``, plus ``confusion.png`` and ``misclassified.png`` in ``out_dir``."""
    from training import plots
    from training.metrics import classification_metrics

    metrics = classification_metrics(probs, targets, labels)
    plots.confusion(np.asarray(metrics["confusion"]), labels, out_dir / "confusion.png")
    plots.misclassified_grid(images, targets, probs, labels, out_dir / "misclassified.png")
    return metrics


class Predictor:
    """Calibrated probabilities from a checkpoint or an ONNX file, same interface."""

    labels: list[str]
    img_size: int

    def probs(self, images: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class CheckpointPredictor(Predictor):
    def __init__(self, path: Path) -> None:
        import torch

        from training.model import load_checkpoint

        try:
            self.model, ckpt = load_checkpoint(path)
        except (ValueError, RuntimeError, KeyError, OSError) as exc:
            raise ModelFileError(f"cannot load checkpoint {path}: {exc}") from exc
        self.labels = list(ckpt["labels"])
        self.img_size = int(ckpt["img_size"])
        self.temperature = float(ckpt.get("temperature", 1.0))
        self.device = torch.device("cpu")

    def probs(self, images: np.ndarray) -> np.ndarray:
        from training.calibrate import softmax
        from training.loop import predict_logits

        return softmax(predict_logits(self.model, images, self.device), self.temperature)


class OnnxPredictor(Predictor):
    def __init__(self, path: Path) -> None:
        import onnxruntime as ort

        try:
            self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise ModelFileError(f"onnxruntime cannot load {path}: {exc}") from exc
        meta = self.session.get_modelmeta().custom_metadata_map
        try:
            self.labels = list(json.loads(meta["beltsort.labels"]))
            self.img_size = int(meta["beltsort.input_size"])
        except (KeyError, ValueError) as exc:
            raise ModelFileError(
                f"{path} lacks beltsort.labels / beltsort.input_size metadata ({exc}); "
                "export it with `python -m export`"
            ) from exc
        names = [i.name for i in self.session.get_inputs()]
        if names != ["crops"]:
            raise ModelFileError(f"{path} has inputs {names}; the contract is one input 'crops'")

    def probs(self, images: np.ndarray) -> np.ndarray:
        out = [
            self.session.run(["probs"], {"crops": images[i : i + ONNX_BATCH]})[0]
            for i in range(0, len(images), ONNX_BATCH)
        ]
        return np.concatenate(out).astype(np.float64)


def load_predictor(path: Path) -> Predictor:
    """A predictor for ``.onnx`` (onnxruntime) or anything else (a torch checkpoint)."""
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        return OnnxPredictor(path)
    return CheckpointPredictor(path)
