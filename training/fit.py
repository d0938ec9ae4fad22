"""``python -m training fit``: fine-tune a MobileNet on a folder of labelled crops.

Writes a run folder: ``best.pt`` (format in :mod:`training.model`, plus
``val_files``), ``config.json``, ``metrics.json`` (validation accuracy,
per-class precision/recall/F1, ECE before and after temperature scaling),
``history.csv`` and plots.
"""

from __future__ import annotations

import csv
import json
import logging
import platform
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

from service.cli_support import bounded_float, bounded_int, existing_dir, output_dir
from service.errors import DatasetError, UsageError
from training.common import ARCH_NAMES, add_compute_arguments, start_command
from training.recipe import INPUT_NORMS, FitConfig

log = logging.getLogger(__name__)


def add_arguments(parser) -> None:
    d = FitConfig()  # defaults live in one place
    parser.add_argument(
        "--data",
        type=existing_dir,
        required=True,
        help="folder with one sub-folder of crops per class",
    )
    parser.add_argument("--out", type=output_dir, required=True, help="run folder to write")
    parser.add_argument(
        "--val",
        type=existing_dir,
        help="validation folder (same classes); default: a stratified split of --data",
    )
    parser.add_argument(
        "--val-fraction",
        type=bounded_float(0.0, 0.5, low_open=True),
        default=d.val_fraction,
        help=f"share of each class held out when --val is not given (default {d.val_fraction})",
    )
    parser.add_argument(
        "--arch", choices=ARCH_NAMES, default=d.arch, help=f"backbone (default {d.arch})"
    )
    parser.add_argument(
        "--weights",
        default=d.weights,
        help="imagenet (torchvision's file; fetched when missing), none (from scratch) "
        f"or PATH to a torchvision state dict (default {d.weights})",
    )
    parser.add_argument(
        "--input-norm",
        choices=INPUT_NORMS,
        default=d.input_norm,
        help="per-crop normalisation inside the model before ImageNet's: greyworld "
        "(channel means) or metal (the bare zinc along the screw's axis) undoes a colour "
        f"cast of the light (default {d.input_norm})",
    )
    parser.add_argument(
        "--img-size",
        type=bounded_int(32, 512),
        default=d.img_size,
        help=f"crop side S in pixels (default {d.img_size})",
    )
    parser.add_argument(
        "--epochs",
        type=bounded_int(1, 1000),
        default=d.epochs,
        help=f"total epochs, head phase included (default {d.epochs})",
    )
    parser.add_argument(
        "--head-epochs",
        type=bounded_int(0, 1000),
        default=d.head_epochs,
        help=f"epochs with the backbone frozen first (default {d.head_epochs})",
    )
    parser.add_argument(
        "--freeze-blocks",
        type=bounded_int(0, 30),
        default=d.freeze_blocks,
        help="leading backbone blocks that stay frozen after the head phase too "
        f"(default {d.freeze_blocks})",
    )
    parser.add_argument(
        "--batch-size",
        type=bounded_int(1, 1024),
        default=d.batch_size,
        help=f"crops per step (default {d.batch_size})",
    )
    parser.add_argument(
        "--lr",
        type=bounded_float(0.0, 1.0, low_open=True),
        default=d.lr,
        help=f"peak learning rate of the full phase (default {d.lr:g})",
    )
    parser.add_argument(
        "--lr-head",
        type=bounded_float(0.0, 1.0, low_open=True),
        default=d.lr_head,
        help=f"peak learning rate of the head phase (default {d.lr_head:g})",
    )
    parser.add_argument(
        "--patience",
        type=bounded_int(1, 1000),
        default=d.patience,
        help=f"stop after this many epochs without a better validation score "
        f"(default {d.patience})",
    )
    parser.add_argument(
        "--seed", type=int, default=d.seed, help=f"seed of every random draw (default {d.seed})"
    )
    add_compute_arguments(parser)


def run(args) -> int:
    start_command(args)
    cfg = FitConfig(
        arch=args.arch,
        input_norm=args.input_norm,
        img_size=args.img_size,
        weights=args.weights,
        epochs=args.epochs,
        head_epochs=args.head_epochs,
        freeze_blocks=args.freeze_blocks,
        batch_size=args.batch_size,
        lr_head=args.lr_head,
        lr=args.lr,
        patience=args.patience,
        val_fraction=args.val_fraction,
        seed=args.seed,
        device=args.device,
        threads=args.threads,
    )
    fit(cfg, args.data, args.out, val_dir=args.val)
    return 0


def fit(cfg, data_dir: Path, out_dir: Path, val_dir: Path | None = None) -> dict:
    """Train per ``cfg`` on ``data_dir``, write the run folder; returns the metrics."""
    import torch

    from training import plots
    from training.calibrate import expected_calibration_error, fit_temperature, softmax
    from training.common import configure_threads, resolve_device, seed_everything
    from training.data import load_folder, stratified_split
    from training.evaluate import write_report
    from training.loop import predict_logits, train
    from training.model import CHECKPOINT_FORMAT

    started, cpu_started = time.perf_counter(), time.process_time()
    if cfg.weights not in ("imagenet", "none") and not Path(cfg.weights).is_file():
        # Before minutes of data loading, not after.
        raise UsageError(
            f"--weights {cfg.weights!r} is neither imagenet, none nor an existing file"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    threads = configure_threads(cfg.threads)
    seed_everything(cfg.seed)

    # Data
    data = load_folder(data_dir, cfg.img_size)
    if val_dir is not None:
        train_set = data
        val_set = load_folder(val_dir, cfg.img_size, labels=data.labels)
    else:
        train_index, val_index = stratified_split(data.targets, cfg.val_fraction, cfg.seed)
        if len(val_index) == 0:
            raise DatasetError(
                f"{data_dir} is too small to hold out validation crops; "
                "give each class two images or more, or pass --val"
            )
        train_set, val_set = data.subset(train_index), data.subset(val_index)
    log.info(
        "%d classes, %d training and %d validation crops, %s, %d threads",
        len(data.labels),
        len(train_set),
        len(val_set),
        device,
        threads,
    )

    # Model
    model, weights_origin = _build(cfg, len(data.labels))

    # Train, then calibrate on validation
    result = train(model, cfg, train_set, val_set, device)
    logits = predict_logits(result.model, val_set.images, device)
    temperature = fit_temperature(logits, val_set.targets)
    probs_raw = softmax(logits)
    probs = softmax(logits, temperature)
    metrics = {
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "stopped_early": result.stopped_early,
        "temperature": round(temperature, 4),
        "ece_before": round(expected_calibration_error(probs_raw, val_set.targets), 4),
        "train_seconds": round(time.perf_counter() - started, 1),
        # all threads' CPU time: on a shared machine the fairer measure of cost
        "cpu_seconds": round(time.process_time() - cpu_started, 1),
    }
    report = write_report(out_dir, val_set.images, val_set.targets, probs, data.labels)
    metrics = {**metrics, "ece_after": report["ece"], **report}
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")

    # Run folder: config, history, curves, checkpoint
    config = {
        **asdict(cfg),
        "data": str(Path(data_dir).resolve()),
        "val": str(Path(val_dir).resolve()) if val_dir else None,
        "resolved_device": str(device),
        "resolved_threads": threads,
        "weights_origin": weights_origin,
        "labels": data.labels,
        "versions": {"torch": str(torch.__version__), "python": platform.python_version()},
    }
    # Through JSON and back: only plain types reach the checkpoint, which
    # torch.load(weights_only=True) must be able to read.
    config = json.loads(json.dumps(config))
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    _write_history(result.history, out_dir / "history.csv")
    plots.learning_curves(result.history, out_dir / "learning_curves.png")
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "arch": cfg.arch,
        "img_size": cfg.img_size,
        "labels": list(data.labels),
        "state_dict": {k: v.detach().cpu() for k, v in result.model.state_dict().items()},
        "temperature": temperature,
        "input_norm": cfg.input_norm,
        "weights_origin": weights_origin,
        "dataset_fingerprint": train_set.fingerprint(),
        "config": config,
        "metrics": {
            "val_accuracy": report["accuracy"],
            "val_macro_f1": report["macro_f1"],
            "val_ece_before": metrics["ece_before"],
            "val_ece_after": report["ece"],
            "best_epoch": result.best_epoch,
        },
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "val_files": [str(p) for p in val_set.files],
    }
    torch.save(checkpoint, out_dir / "best.pt")
    log.info(
        "best epoch %d: val accuracy %.4f, ECE %.4f -> %.4f (T=%.3f); %s in %.0f s",
        result.best_epoch,
        report["accuracy"],
        metrics["ece_before"],
        report["ece"],
        temperature,
        out_dir / "best.pt",
        metrics["train_seconds"],
    )
    return metrics


def _build(cfg, num_classes: int):
    """The model and a record of where its starting weights came from."""
    from training.model import build_model
    from training.weights import ensure_weights

    if cfg.weights == "imagenet":
        path = ensure_weights(cfg.arch)
        return build_model(
            cfg.arch, num_classes, cfg.img_size, "imagenet", cfg.input_norm
        ), f"imagenet:{path.name}"
    if cfg.weights == "none":
        return build_model(cfg.arch, num_classes, cfg.img_size, "none", cfg.input_norm), "none"
    path = Path(cfg.weights)
    try:
        model = build_model(cfg.arch, num_classes, cfg.img_size, str(path), cfg.input_norm)
    except (RuntimeError, ValueError, OSError) as exc:
        raise UsageError(
            f"--weights {str(path)!r} is not a torchvision {cfg.arch} state dict: "
            f"{str(exc).splitlines()[0][:200]}"
        ) from exc
    return model, str(path.resolve())


def _write_history(history: list[dict], path: Path) -> None:
    columns = ["epoch", "phase", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "seconds"]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)
