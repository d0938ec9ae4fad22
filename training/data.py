"""Labelled crop folders: one sub-folder per class, images inside.

Class order: the folder names sorted, except when they are exactly the
default palette's twenty names, in which case the palette's bin order is used
so that class id = default bin. Images are read once with OpenCV, made 3-channel
BGR and resized to the model's input size, and held in memory as one uint8
array (a few thousand 96 px crops are tens of MB).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from service.errors import DatasetError
from service.palette import default_labels

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}
TINY_CLASS = 5  # fewer images than this in a class earns a warning
MAX_LISTED = 10  # skipped files named in the warning; the count covers the rest


@dataclass
class CropSet:
    """Images ``(N, S, S, 3)`` uint8 BGR, their class ids and source files."""

    images: np.ndarray
    targets: np.ndarray
    labels: list[str]
    files: list[Path]

    def __len__(self) -> int:
        return len(self.targets)

    def subset(self, index: Sequence[int] | np.ndarray) -> CropSet:
        index = np.asarray(index, dtype=np.int64)
        return CropSet(
            images=self.images[index],
            targets=self.targets[index],
            labels=self.labels,
            files=[self.files[i] for i in index],
        )

    def counts(self) -> np.ndarray:
        return np.bincount(self.targets, minlength=len(self.labels))

    def fingerprint(self) -> str:
        """SHA-256 of the (class, file name, file bytes) list: which data a model saw."""
        digest = hashlib.sha256()
        for path, target in sorted(zip(self.files, self.targets, strict=True)):
            digest.update(f"{self.labels[target]}/{path.name}\n".encode())
            digest.update(path.read_bytes())
        return "sha256:" + digest.hexdigest()


def class_order(names: Sequence[str]) -> list[str]:
    """Sorted names, or the palette's bin order when the names are exactly the palette's."""
    palette = default_labels()
    if sorted(names) == sorted(palette):
        return list(palette)
    return sorted(names)


def read_crop(path: Path, size: int) -> np.ndarray | None:
    """``path`` as uint8 BGR ``(size, size, 3)``, or None when it is not a readable image."""
    if path.suffix.lower() not in IMAGE_SUFFIXES or path.stat().st_size == 0:
        return None
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None or image.size == 0:
        return None
    if image.dtype != np.uint8:
        # 16-bit PNG/TIFF: keep the top 8 bits
        image = (image // 257).astype(np.uint8) if image.dtype == np.uint16 else None
        if image is None:
            return None
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    elif image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    if image.shape[:2] != (size, size):
        # Crops from the locator are already square; anything else is squashed,
        # as the daemon's crops never are.
        shrinking = image.shape[0] > size or image.shape[1] > size
        interp = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
        image = cv2.resize(image, (size, size), interpolation=interp)
    return np.ascontiguousarray(image)


def load_folder(root: Path, size: int, labels: Sequence[str] | None = None) -> CropSet:
    """Read every class folder under ``root``.

    ``labels``: the class list to map folder names onto (a trained model's);
    a folder not in it is an error. Without it the order comes from
    :func:`class_order`. Unreadable files are skipped and reported in one
    warning; a class with no usable image is a :class:`DatasetError`.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder {str(root)!r} does not exist or is not a folder")
    folders = {p.name: p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")}
    if not folders:
        raise DatasetError(
            f"dataset folder {str(root)!r} has no class sub-folders; "
            "put each class's images in a folder named after the class"
        )
    if labels is None:
        labels = class_order(list(folders))
    else:
        unknown = sorted(set(folders) - set(labels))
        if unknown:
            raise DatasetError(
                f"class folders {unknown} in {str(root)!r} are not among the model's "
                f"{len(labels)} labels ({', '.join(labels)})"
            )
    labels = list(labels)

    images, targets, files, skipped = [], [], [], []
    for class_id, name in enumerate(labels):
        folder = folders.get(name)
        if folder is None:
            continue  # evaluating on a subset of the model's classes is fine
        found = 0
        for path in sorted(folder.iterdir()):
            if not path.is_file():
                continue
            image = read_crop(path, size)
            if image is None:
                skipped.append(path)
                continue
            images.append(image)
            targets.append(class_id)
            files.append(path.resolve())
            found += 1
        if found == 0:
            raise DatasetError(
                f"class {name!r} ({folder}) has no readable images; add some or remove the folder"
            )
        if found < TINY_CLASS:
            log.warning("class %r has only %d images; expect unreliable results", name, found)

    if skipped:
        listed = ", ".join(str(p) for p in skipped[:MAX_LISTED])
        more = f" and {len(skipped) - MAX_LISTED} more" if len(skipped) > MAX_LISTED else ""
        log.warning(
            "skipped %d unreadable, empty or non-image files: %s%s", len(skipped), listed, more
        )
    return CropSet(
        images=np.stack(images),
        targets=np.asarray(targets, dtype=np.int64),
        labels=labels,
        files=files,
    )


def stratified_split(
    targets: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(train, val)`` with about ``fraction`` of each class in val.

    Every class with two images or more gives at least one to validation and
    keeps at least one for training.
    """
    rng = np.random.default_rng(seed)
    train, val = [], []
    for class_id in np.unique(targets):
        members = rng.permutation(np.flatnonzero(targets == class_id))
        n_val = round(len(members) * fraction)
        n_val = min(max(n_val, 1), len(members) - 1) if len(members) >= 2 else 0
        val.extend(members[:n_val])
        train.extend(members[n_val:])
    return np.sort(np.asarray(train, dtype=np.int64)), np.sort(np.asarray(val, dtype=np.int64))


def take_shots(
    targets: np.ndarray, shots: int, seed: int, labels: Sequence[str] | None = None
) -> np.ndarray:
    """Indices of the first ``shots`` images per class in a seeded order.

    The same seed gives nested sets: the 10-shot set contains the 5-shot one.
    """
    rng = np.random.default_rng(seed)
    chosen = []
    for class_id in np.unique(targets):
        members = rng.permutation(np.flatnonzero(targets == class_id))
        if len(members) < shots:
            name = labels[class_id] if labels is not None else class_id
            raise DatasetError(
                f"class {name!r} has {len(members)} images in the training pool, "
                f"fewer than {shots} shots; lower --shots or add images"
            )
        chosen.extend(members[:shots])
    return np.sort(np.asarray(chosen, dtype=np.int64))


def make_class_folder(path: Path) -> None:
    """Create a class folder (and its parents) or say clearly why not."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DatasetError(f"cannot create class folder {str(path)!r}: {exc.strerror}") from exc
