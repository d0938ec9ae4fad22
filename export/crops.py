"""The real crops an export is checked on (validation) and calibrated on (int8).

Images are read with training's own reader (``training.data.read_crop``), so
they reach the model exactly as they did in training: uint8 BGR, resized to
the model's input size the same way.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.errors import DatasetError

log = logging.getLogger(__name__)

# Enough crops for stable int8 ranges; more only slows calibration down.
MAX_CALIBRATION_CROPS = 512


@dataclass(frozen=True)
class LabelledCrops:
    """uint8 BGR crops ``(N, S, S, 3)``, their class ids, and where they came from."""

    images: np.ndarray
    targets: np.ndarray
    source: str

    def __len__(self) -> int:
        return len(self.targets)


def validation_crops(
    checkpoint: dict, val_dir: Path | None, size: int, labels: list[str]
) -> LabelledCrops:
    """The validation crops of a checkpoint: ``--val DIR`` when given, else its ``val_files``.

    ``val_files`` are the absolute image paths training held out; each file's
    class is its folder's name (the labelled-folder layout training reads).
    """
    if val_dir is not None:
        from training.data import load_folder

        crop_set = load_folder(val_dir, size, labels)
        return LabelledCrops(crop_set.images, crop_set.targets, f"labelled folder {val_dir}")
    files = checkpoint.get("val_files")
    if not files:
        raise DatasetError(
            "the checkpoint has no 'val_files' (held-out validation images) to check the export "
            "on; give a labelled folder with --val DIR (one sub-folder per class)"
        )
    return _from_files(files, size, labels)


def _from_files(files: list, size: int, labels: list[str]) -> LabelledCrops:
    from training.data import read_crop

    index = {name: i for i, name in enumerate(labels)}
    images, targets, missing, unknown = [], [], [], []
    for entry in files:
        # A bare path takes its class from its folder; a (path, label) pair says it.
        if isinstance(entry, list | tuple) and len(entry) == 2:
            path, label = Path(entry[0]), str(entry[1])
        else:
            path = Path(entry)
            label = path.parent.name
        if label not in index:
            unknown.append(f"{path} ({label!r})")
            continue
        image = read_crop(path, size) if path.is_file() else None
        if image is None:
            missing.append(str(path))
            continue
        images.append(image)
        targets.append(index[label])

    if unknown:
        raise DatasetError(
            f"{len(unknown)} of the checkpoint's val_files are in folders that are not among its "
            f"labels, e.g. {unknown[0]}; give a labelled folder with --val DIR instead"
        )
    if missing:
        log.warning(
            "%d of %d val_files are missing or unreadable (e.g. %s); checking on the other %d",
            len(missing),
            len(files),
            missing[0],
            len(images),
        )
    if not images:
        raise DatasetError(
            f"none of the checkpoint's {len(files)} val_files can be read (e.g. {missing[0]}); "
            "were they moved? give a labelled folder with --val DIR instead"
        )
    return LabelledCrops(
        np.stack(images),
        np.asarray(targets, dtype=np.int64),
        f"the checkpoint's val_files ({len(images)} of {len(files)})",
    )


def calibration_crops(folder: Path, size: int, limit: int = MAX_CALIBRATION_CROPS) -> np.ndarray:
    """Up to ``limit`` crops from anywhere under ``folder`` (labels not needed), spread evenly."""
    from training.data import IMAGE_SUFFIXES, read_crop

    paths = sorted(
        p for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if len(paths) > limit:
        # Every k-th file rather than the first `limit`, so every class folder is represented.
        paths = [paths[i] for i in np.linspace(0, len(paths) - 1, limit).round().astype(int)]
    images = [image for p in paths if (image := read_crop(p, size)) is not None]
    if not images:
        raise DatasetError(
            f"calibration folder {str(folder)!r} has no readable images "
            f"({', '.join(sorted(IMAGE_SUFFIXES))}); give a folder of training crops"
        )
    log.info("calibrating on %d crops from %s", len(images), folder)
    return np.stack(images)
