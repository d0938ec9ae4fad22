"""The classical colour baseline the fine-tuned network must beat.

What an engineer would build without a network, done with care:

1. light: grey-world white balance and exposure per crop (belt and zinc metal
   are neutral, so the crop's mean colour is the light's colour), which
   removes most of a lighting drift before any colour is measured;
2. where: the belt is what the crop's top and bottom rows show (the locator
   turns the screw horizontal and pads it); the screw is what stands out from
   the belt; the band is the part of the screw farthest from its median
   colour (the bare metal);
3. what: CIELAB statistics of those band pixels (mean, median, spread) and a
   coarse a*b* chroma histogram, plus the metal's own Lab as context;
4. decide: k nearest references (k = 3, distance-weighted votes) on
   standardised features, every training crop being a reference.

The quantiles were chosen by trying a few values on held-out simulated crops
(NOTE: that favours the baseline a little, never the network).
"""

from __future__ import annotations

import cv2
import numpy as np

BORDER = 0.10  # top and bottom rows of the crop (fraction of the side): belt only
MARGIN = 0.08  # columns dropped at each end (the crop's padding)
SCREW_QUANTILE = 0.70  # inner pixels farther from the belt colour than this quantile: screw
BAND_QUANTILE = 0.85  # screw pixels farther from the metal colour than this quantile: band
AB_BINS = 6  # per axis of the a*b* histogram
AB_RANGE = 80.0  # a*, b* beyond ±80 fall into the edge bins
NEIGHBOURS = 3


def white_balance(crop: np.ndarray) -> np.ndarray:
    """Grey-world: scale each channel so the crop's mean is a neutral mid grey, float 0..1."""
    x = crop.astype(np.float32) / 255.0
    means = x.reshape(-1, 3).mean(axis=0) + 1e-6
    return np.clip(x * (0.45 / means), 0.0, 1.0)


def features(crop: np.ndarray) -> np.ndarray:
    """A fixed-length colour description of one uint8 BGR crop."""
    size = crop.shape[0]
    lab = cv2.cvtColor(white_balance(crop), cv2.COLOR_BGR2Lab)  # L 0..100, a/b about ±128

    # Belt from the crop's top and bottom rows, screw = what stands out from it,
    # band = the screw pixels least like the screw's typical (metal) colour.
    edge = max(1, round(size * BORDER))
    belt = np.median(np.concatenate([lab[:edge], lab[-edge:]]).reshape(-1, 3), axis=0)
    left, right = round(size * MARGIN), round(size * (1 - MARGIN))
    inner = lab[edge:-edge, left:right].reshape(-1, 3)
    off_belt = np.linalg.norm(inner - belt, axis=1)
    screw = inner[off_belt >= np.quantile(off_belt, SCREW_QUANTILE)]
    metal = np.median(screw, axis=0)
    off_metal = np.linalg.norm(screw - metal, axis=1)
    band = screw[off_metal >= np.quantile(off_metal, BAND_QUANTILE)]

    hist, _, _ = np.histogram2d(
        np.clip(band[:, 1], -AB_RANGE, AB_RANGE),
        np.clip(band[:, 2], -AB_RANGE, AB_RANGE),
        bins=AB_BINS,
        range=[[-AB_RANGE, AB_RANGE], [-AB_RANGE, AB_RANGE]],
    )
    hist = np.sqrt(hist.ravel() / max(1, len(band)))  # Hellinger: comparable under L2
    context = np.concatenate([metal, belt * 0.5])  # the light the band is seen under
    return np.concatenate(
        [band.mean(axis=0), np.median(band, axis=0), band.std(axis=0), context, hist * 20.0]
    ).astype(np.float32)


class ColourKnn:
    """k-nearest-reference classifier on :func:`features`."""

    def __init__(self, k: int = NEIGHBOURS) -> None:
        self.k = k

    def fit(self, images: np.ndarray, targets: np.ndarray, classes: int) -> ColourKnn:
        feats = np.stack([features(img) for img in images])
        self.mean = feats.mean(axis=0)
        self.std = feats.std(axis=0) + 1e-6
        self.refs = (feats - self.mean) / self.std
        self.targets = np.asarray(targets)
        self.classes = classes
        return self

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        """Vote shares ``(N, C)``; a neighbour's vote weighs 1 / distance."""
        feats = (np.stack([features(img) for img in images]) - self.mean) / self.std
        distance = np.linalg.norm(feats[:, None, :] - self.refs[None, :, :], axis=2)
        k = min(self.k, len(self.refs))
        nearest = np.argsort(distance, axis=1)[:, :k]
        votes = np.zeros((len(images), self.classes))
        rows = np.arange(len(images))[:, None]
        weights = 1.0 / (np.take_along_axis(distance, nearest, axis=1) + 1e-6)
        np.add.at(votes, (np.broadcast_to(rows, nearest.shape), self.targets[nearest]), weights)
        return votes / votes.sum(axis=1, keepdims=True)
