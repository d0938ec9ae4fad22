"""The classifier: a torchvision MobileNet whose forward takes the daemon's crops.

Pre-processing travels with the weights: :class:`BeltNet` takes uint8 BGR
crops ``(N, S, S, 3)`` exactly as OpenCV delivers them and does the
BGR->RGB swap, the scaling and ImageNet normalisation inside ``forward``, so
the exported ONNX graph carries them and nothing outside the model file
needs to know the mean and std.

Checkpoint format (``best.pt``, loadable with ``torch.load(weights_only=True)``)::

    {
        "format": "beltsort.checkpoint/1",
        "arch": "mobilenet_v2",            # key of ARCHS
        "img_size": 96,                    # S
        "labels": ["red", ...],            # class names, index = class id
        "state_dict": {...},               # BeltNet.state_dict()
        "temperature": 1.3,                # calibrated on validation, 1.0 if not fitted
        "input_norm": "none",              # optional; "greyworld" or "metal": per-crop
                                           # white balance in forward (absent = "none")
        "weights_origin": "imagenet",      # "imagenet", "none" or the file path used
        "dataset_fingerprint": "sha256:…", # of the training file list and bytes
        "config": {...},                   # resolved training config (JSON types only)
        "metrics": {"val_accuracy": 0.99, ...},
        "created": "2026-12-03T19:00:00+00:00",
    }
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from torch import nn

from service.locate import CROP_MARGIN
from training.recipe import INPUT_NORMS

CHECKPOINT_FORMAT = "beltsort.checkpoint/1"

# ImageNet mean and std in RGB order, as torchvision's classification transforms use.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# arch name -> (constructor, ImageNet weights enum member)
ARCHS: dict[str, tuple[Callable[..., nn.Module], object]] = {
    "mobilenet_v2": (
        torchvision.models.mobilenet_v2,
        torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1,
    ),
    "mobilenet_v3_small": (
        torchvision.models.mobilenet_v3_small,
        torchvision.models.MobileNet_V3_Small_Weights.IMAGENET1K_V1,
    ),
    "mobilenet_v3_large": (
        torchvision.models.mobilenet_v3_large,
        torchvision.models.MobileNet_V3_Large_Weights.IMAGENET1K_V1,
    ),
}


# "greyworld": scale each channel so the crop's three channel means are equal
# (their average kept) before ImageNet normalisation: a colour cast of the light
# moves belt, metal and band alike, and this undoes it inside the model file.
#
# "metal": white balance and exposure read off the bare zinc. The locator's
# crop puts the screw's axis along the middle rows, between the margins
# (service.locate.CROP_MARGIN). Along it lie the head, the thread's bright
# crests and dark valleys, and the band (at most about a third of the length).
# The upper quartile of each channel there is the lit metal: a band channel
# that is dark falls below it, one that is bright is about as bright as the
# metal anyway, and the few clipped highlights sit above it. (The median was
# tried first: the valleys and a dark band channel together pull it down and
# tint the result.) Scaling it to METAL_LEVEL takes the camera's colour cast and
# exposure out, and leaves the band's colour relative to the metal beside it:
# what tells white from gray and beige, or red from maroon, under any light.
METAL_LEVEL = 160.0  # leaves room above the metal: a white band is brighter
METAL_ROWS = 5  # rows about the middle of the crop
METAL_QUANTILE = 0.75
METAL_FLOOR = 8.0  # a near-black reference (an empty crop) is not amplified


class BeltNet(nn.Module):
    """uint8 BGR crops ``(N, S, S, 3)`` in, class logits ``(N, C)`` out."""

    def __init__(self, backbone: nn.Module, img_size: int, input_norm: str = "none") -> None:
        super().__init__()
        if input_norm not in INPUT_NORMS:
            raise ValueError(f"input_norm {input_norm!r} is not one of {', '.join(INPUT_NORMS)}")
        self.backbone = backbone
        self.img_size = img_size
        self.input_norm = input_norm
        # Folded into one scale and shift per channel: x * scale + shift equals
        # (x / 255 - mean) / std, in RGB order after the channel swap.
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        self.register_buffer("scale", 1.0 / (255.0 * std), persistent=False)
        self.register_buffer("shift", -mean / std, persistent=False)

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        # NHWC uint8 BGR -> NCHW float RGB, normalised
        x = crops.permute(0, 3, 1, 2)[:, [2, 1, 0]].float()
        if self.input_norm == "greyworld":
            means = x.mean(dim=(2, 3), keepdim=True).clamp_min(1.0)  # 1.0: an all-black crop
            x = x * (means.mean(dim=1, keepdim=True) / means)
        elif self.input_norm == "metal":
            x = (x * (METAL_LEVEL / self._metal_colour(x))).clamp(0.0, 255.0)
        x = x * self.scale + self.shift
        return self.backbone(x)

    def _metal_colour(self, x: torch.Tensor) -> torch.Tensor:
        """Per-crop, per-channel upper quartile along the screw's axis: ``(N, 3, 1, 1)``."""
        size = x.shape[-1]
        first = int(size * CROP_MARGIN / (1 + 2 * CROP_MARGIN)) + 1  # inside the screw's ends
        top = (size - METAL_ROWS) // 2
        axis = x[:, :, top : top + METAL_ROWS, first : size - first].flatten(2)
        # by topk: ONNX has TopK, and no quantile or median operator to export to
        k = max(1, round(axis.shape[2] * (1.0 - METAL_QUANTILE)))
        level = axis.topk(k, dim=2).values[:, :, -1]
        return level.clamp_min(METAL_FLOOR).view(-1, 3, 1, 1)

    @property
    def head(self) -> nn.Linear:
        return self.backbone.classifier[-1]


def build_model(
    arch: str,
    num_classes: int,
    img_size: int,
    weights: str = "imagenet",
    input_norm: str = "none",
) -> BeltNet:
    """A BeltNet with a fresh ``num_classes`` head.

    ``weights``: ``"imagenet"`` (torchvision's official file, from its cache or
    downloaded; ``python -m training weights fetch`` fills the cache offline),
    ``"none"`` (random init, training from scratch), or a path to a torchvision
    state-dict file of the same architecture.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    constructor, imagenet = ARCHS[arch]
    if weights == "imagenet":
        backbone = constructor(weights=imagenet)
    elif weights == "none":
        backbone = constructor(weights=None)
    else:
        backbone = constructor(weights=None)
        state = torch.load(Path(weights), map_location="cpu", weights_only=True)
        backbone.load_state_dict(state)
    old = backbone.classifier[-1]
    backbone.classifier[-1] = nn.Linear(old.in_features, num_classes)
    return BeltNet(backbone, img_size, input_norm)


def load_checkpoint(path: str | Path) -> tuple[BeltNet, dict]:
    """Rebuild the model saved in ``best.pt``; returns ``(model in eval mode, checkpoint dict)``."""
    ckpt = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a beltsort checkpoint ({CHECKPOINT_FORMAT})")
    model = build_model(
        ckpt["arch"],
        len(ckpt["labels"]),
        ckpt["img_size"],
        weights="none",
        input_norm=ckpt.get("input_norm", "none"),
    )
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    return model, ckpt
