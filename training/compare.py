"""``python -m training compare``: does ImageNet pre-training pay, and by how much?

For each number of training crops per class ("shots"), on one fixed held-out
set, three sorters are trained on the same crops:

- ``pretrained``: the MobileNet from ImageNet weights, fine-tuned with the
  normal recipe (head phase, then the whole net);
- ``scratch``: the same architecture from random weights, the whole net from
  the first step (a frozen random backbone would only waste its budget) at a
  higher peak rate, as random init wants;
- ``colour-knn``: the classical baseline of :mod:`training.baseline`.

Both networks get the same optimiser-step budget and the same augmentations,
and no early stopping (there is no validation split to stop on: the held-out
set is only looked at once, at the end). The shot sets are nested: the 10-shot
crops include the 5-shot ones.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from pathlib import Path

from service.cli_support import bounded_int, existing_dir, output_dir
from service.errors import UsageError
from training.common import ARCH_NAMES, add_compute_arguments, start_command

log = logging.getLogger(__name__)

SCRATCH_LR = 3e-3  # peak rate for random init (fine-tuning uses the lower FitConfig.lr)


def shots_list(text: str) -> list[int]:
    """Parse ``5,10,20,50``: positive whole numbers, each once, ascending."""
    import argparse

    try:
        values = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"shots {text!r} is not a comma-separated list of whole numbers, e.g. 5,10,20,50"
        ) from None
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError(f"shots {text!r} must be whole numbers of 1 or more")
    return values


def add_arguments(parser) -> None:
    parser.add_argument(
        "--data",
        type=existing_dir,
        required=True,
        help="folder with one sub-folder of crops per class: the training pool "
        "(and the held-out set, unless --test is given)",
    )
    parser.add_argument(
        "--out", type=output_dir, required=True, help="folder for the table and plot"
    )
    parser.add_argument(
        "--shots",
        type=shots_list,
        default=[5, 10, 20, 50],
        help="training crops per class to try (default 5,10,20,50)",
    )
    parser.add_argument(
        "--test",
        type=existing_dir,
        help="held-out folder; default: --holdout crops per class taken from --data",
    )
    parser.add_argument(
        "--holdout",
        type=bounded_int(1, 10000),
        default=20,
        help="crops per class held out of --data when --test is not given (default 20)",
    )
    parser.add_argument(
        "--steps",
        type=bounded_int(1, 100000),
        default=250,
        help="optimiser steps per network, the same for both (default 250)",
    )
    parser.add_argument(
        "--img-size",
        type=bounded_int(32, 512),
        default=64,
        help="crop side S in pixels (default 64, for speed)",
    )
    parser.add_argument(
        "--arch",
        choices=ARCH_NAMES,
        default="mobilenet_v2",
        help="backbone for both networks (default mobilenet_v2)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of every random draw (default 0)")
    add_compute_arguments(parser)


def run(args) -> int:
    start_command(args)
    rows = compare(
        data_dir=args.data,
        out_dir=args.out,
        shots=args.shots,
        test_dir=args.test,
        holdout=args.holdout,
        steps=args.steps,
        img_size=args.img_size,
        arch=args.arch,
        seed=args.seed,
        device_name=args.device,
        threads=args.threads,
    )
    print((Path(args.out) / "compare.md").read_text(), end="")
    return 0 if rows else 1


def compare(
    data_dir: Path,
    out_dir: Path,
    shots: list[int],
    test_dir: Path | None = None,
    holdout: int = 20,
    steps: int = 250,
    img_size: int = 64,
    arch: str = "mobilenet_v2",
    seed: int = 0,
    device_name: str = "auto",
    threads: int | None = None,
) -> list[dict]:
    """Train and score every (method, shots) pair; write compare.csv/.md/.png and return rows."""
    from training import plots
    from training.baseline import ColourKnn
    from training.common import configure_threads, resolve_device, seed_everything
    from training.data import load_folder, take_shots
    from training.loop import predict_logits, train
    from training.model import build_model
    from training.recipe import FitConfig
    from training.weights import ensure_weights

    out_dir = Path(out_dir)
    device = resolve_device(device_name)
    threads = configure_threads(threads)

    # The fixed held-out set and the pool the shots are drawn from
    data = load_folder(data_dir, img_size)
    if test_dir is not None:
        pool, test = data, load_folder(test_dir, img_size, labels=data.labels)
    else:
        counts = data.counts()
        if counts.min() <= holdout:
            raise UsageError(
                f"--holdout {holdout} leaves no training crops for the smallest class "
                f"({data.labels[int(counts.argmin())]}: {counts.min()} crops); "
                "lower --holdout or pass --test"
            )
        pool_index, test_index = _holdout_split(data.targets, holdout, seed)
        pool, test = data.subset(pool_index), data.subset(test_index)
    largest = min(pool.counts())
    if shots[-1] > largest:
        raise UsageError(
            f"--shots {shots[-1]} is more than the {largest} training crops of the smallest "
            "class; lower --shots, lower --holdout or add crops"
        )
    classes = len(data.labels)
    log.info(
        "%d classes; %d held-out crops; pool %d; shots %s; %d steps per network on %s",
        classes,
        len(test),
        len(pool),
        shots,
        steps,
        device,
    )
    ensure_weights(arch)

    rows = []
    for k in shots:
        train_set = pool.subset(take_shots(pool.targets, k, seed, pool.labels))
        steps_per_epoch = math.ceil(len(train_set) / 32)
        epochs = max(2, round(steps / steps_per_epoch))
        for method in ("pretrained", "scratch", "colour-knn"):
            started = time.perf_counter()
            seed_everything(seed)
            if method == "colour-knn":
                model = ColourKnn().fit(train_set.images, train_set.targets, classes)
                probs = model.predict_proba(test.images)
            else:
                pretrained = method == "pretrained"
                cfg = FitConfig(
                    arch=arch,
                    img_size=img_size,
                    seed=seed,
                    epochs=epochs,
                    weights="imagenet" if pretrained else "none",
                    head_epochs=max(1, round(0.15 * epochs)) if pretrained else 0,
                    lr=FitConfig.lr if pretrained else SCRATCH_LR,
                )
                net = build_model(arch, classes, img_size, cfg.weights)
                result = train(net, cfg, train_set, None, device)
                probs = predict_logits(result.model, test.images, device)
            accuracy = float((probs.argmax(1) == test.targets).mean())
            seconds = time.perf_counter() - started
            rows.append(
                {
                    "method": method,
                    "shots": k,
                    "accuracy": round(accuracy, 4),
                    "train_crops": len(train_set),
                    "steps": 0 if method == "colour-knn" else epochs * steps_per_epoch,
                    "seconds": round(seconds, 1),
                }
            )
            log.info("%-10s %3d shots: accuracy %.4f (%.0f s)", method, k, accuracy, seconds)
        _write(rows, out_dir)

    plots.shots_curve(rows, out_dir / "compare.png")
    meta = {
        "data": str(Path(data_dir).resolve()),
        "test": str(test_dir) if test_dir else None,
        "holdout_per_class": None if test_dir else holdout,
        "test_crops": len(test),
        "steps": steps,
        "img_size": img_size,
        "arch": arch,
        "seed": seed,
        "device": str(device),
        "threads": threads,
        "labels": data.labels,
    }
    (out_dir / "compare.json").write_text(json.dumps({"config": meta, "rows": rows}, indent=2))
    return rows


def _holdout_split(targets, holdout: int, seed: int):
    """``holdout`` crops of every class for the test set, the rest for the pool."""
    import numpy as np

    rng = np.random.default_rng(seed + 1)  # not the shot order's stream
    pool, test = [], []
    for class_id in np.unique(targets):
        members = rng.permutation(np.flatnonzero(targets == class_id))
        test.extend(members[:holdout])
        pool.extend(members[holdout:])
    return np.sort(np.asarray(pool)), np.sort(np.asarray(test))


def _write(rows: list[dict], out_dir: Path) -> None:
    """compare.csv (one row per method and shots) and compare.md (shots x method)."""
    with (out_dir / "compare.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    shots = sorted({r["shots"] for r in rows})
    cell = {(r["method"], r["shots"]): r["accuracy"] for r in rows}
    lines = [
        "| shots/class | " + " | ".join(methods) + " | pretrained - scratch |",
        "|---:|" + "---:|" * (len(methods) + 1),
    ]
    for k in shots:
        values = [cell.get((m, k)) for m in methods]
        gap = ""
        if cell.get(("pretrained", k)) is not None and cell.get(("scratch", k)) is not None:
            gap = f"{100 * (cell[('pretrained', k)] - cell[('scratch', k)]):+.1f} pts"
        text = [f"{100 * v:.1f} %" if v is not None else "" for v in values]
        lines.append(f"| {k} | " + " | ".join(text) + f" | {gap} |")
    (out_dir / "compare.md").write_text("\n".join(lines) + "\n")
