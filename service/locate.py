"""Find screws on the belt: one oriented box per object, and the crop cut from it.

How an object is found, in one frame and with no memory of earlier ones:

1. *Downscale* the frame by ``downscale`` (default 2, area averaging) and take
   the brightness ``V = max(B, G, R)``: zinc is bright in every channel, and a
   saturated band (red, blue, yellow) keeps a high V where grey would drop it.
2. *Belt estimate*: a grey opening then closing of a much smaller copy (cells
   of ``cell_px``), wider than any screw is thick, so screws and their
   shadows vanish from it while the belt's slow gradients, vignetting and
   light drift stay.
3. *Adaptive threshold*: the residual ``V - belt`` is measured against the
   frame's own noise (median and MAD of the residual), hysteresis-style: a
   blob of the low mask counts when it is bright throughout (its upper
   quartile over the high level). Each blob is then cut again at half its own
   contrast and grown back two pixels inside itself, so bright belt texture
   touching a screw falls off while thread valleys stay.
4. *Join the parts of one screw*: a band darker than the metal splits it in
   two (or more, with threads). Two parts are joined when together they are
   no thicker than the thicker one alone (collinear), the gap along the axis
   is short, and either they came from one blob of the low mask, or the gap
   is paint (unlike the belt nearby), or, for a band in the belt's own
   colour, the facing ends are both plain shank (a screw's own end is a head
   or a tip). Joined groups must still be no longer than a screw.
5. *Oriented box and shape test* on the joined parts: length, width, aspect
   and fill must fit a screw, else the blob is rejected (debris, seams, specks).

Objects cut by the frame border are *not fully visible*: their centre, length
and crop would be wrong, so the locator drops them by default. An object
counts as cut when its blob touches the border, or when paint runs on from
its shank end to the border (the band is cut, the rest lies outside). With
``LocatorConfig(keep_partial=True)`` they come back flagged ``partial=True``
(for display); the tracker ignores such detections, so a track starts when
the screw has fully entered the frame and a crop is never cut from half a
screw.

NOTE: two cases cannot be told apart from one frame and are resolved one way:
two screws lying end to end on one line, shank to shank, closer than
``blind_gap_ratio`` of their joint length, with belt between them, look
like one screw whose band has the belt's colour, and are returned as one.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import cv2
import numpy as np

from service.errors import ConfigError

log = logging.getLogger(__name__)

# MAD of a normal distribution times this is its standard deviation.
MAD_TO_SIGMA = 1.4826
# Every n-th pixel (both axes) of the residual goes into the noise estimate:
# 1/36 of a 640x360 image is 6,400 samples, plenty for a median.
NOISE_SAMPLE_STEP = 6
# Steps (downscaled px) a blob's bright core grows back after the own-contrast
# cut: enough to bridge thread valleys (a pitch is >= 1.6 px, so a valley is
# at most a few downscaled px), too few to climb far into attached texture.
REGROW_STEPS = 2
# Depth (downscaled px) of the slice at a part's end where its end width is read.
END_SLICE_PX = 3.0
# An end this much wider than the shank is a head.
HEAD_RATIO = 1.3


@dataclass(frozen=True)
class LocatorConfig:
    """Knobs of the locator. Lengths are in full-resolution pixels.

    The defaults follow DESIGN.md's operating envelope: screws 40-200 px long,
    brighter than a matte, darker belt.
    """

    downscale: int = 2  # segmentation runs on a frame this many times smaller
    min_length: float = 32.0  # 0.8 x the envelope's 40 px: blur and shading shorten blobs
    max_length: float = 240.0  # 1.2 x the envelope's 200 px
    min_width: float = 3.0
    max_width: float = 80.0  # a 200 px screw with a wide head, plus motion blur
    min_aspect: float = 1.8  # length / width; debris and specks are rounder
    min_fill: float = 0.2  # blob area / box area: a headed screw fills 0.3-0.6, band gaps less
    # Background cells: a screw must be thinner than about half the opening
    # (cell_px * open_cells) for the opening to erase it.
    cell_px: int = 16
    open_cells: int = 7
    k_low: float = 3.0  # low threshold, in noise sigmas over the belt
    k_high: float = 6.0  # a blob must reach this somewhere to count
    min_contrast_low: float = 5.0  # grey levels: floors for a nearly noise-free belt
    min_contrast_high: float = 16.0
    min_part_area: float = 40.0  # px^2; a blob this big may be a screw on its own
    min_fragment_area: float = 16.0  # px^2; smaller blobs are noise, even beside a screw
    # A blob is cut again at this share of its own typical contrast (75th
    # percentile over the belt): halfway up the metal's edge ramp.
    own_contrast: float = 0.5
    max_gap_ratio: float = 0.45  # longest band gap / joined length
    blind_gap_ratio: float = 0.35  # the same for a band that looks like the belt
    k_gap: float = 3.0  # gap pixels differ from the belt by this many local belt sigmas
    keep_partial: bool = False  # return objects cut by the frame border, flagged

    def __post_init__(self) -> None:
        if self.downscale not in (1, 2, 3, 4):
            raise ConfigError(f"locator downscale {self.downscale!r} is not 1, 2, 3 or 4")
        if not 0 < self.min_length < self.max_length:
            raise ConfigError(
                f"locator lengths min {self.min_length!r} / max {self.max_length!r}: "
                "need 0 < min_length < max_length (px)"
            )
        if not 0 < self.min_width < self.max_width:
            raise ConfigError(
                f"locator widths min {self.min_width!r} / max {self.max_width!r}: "
                "need 0 < min_width < max_width (px)"
            )
        if self.cell_px < self.downscale or self.open_cells < 3:
            raise ConfigError(
                f"locator cell_px {self.cell_px!r} / open_cells {self.open_cells!r}: "
                "need cell_px >= downscale and open_cells >= 3"
            )
        if not 0 < self.k_low <= self.k_high:
            raise ConfigError(
                f"locator k_low {self.k_low!r} / k_high {self.k_high!r}: need 0 < k_low <= k_high"
            )


@dataclass(frozen=True)
class Detection:
    """One object found in one frame.

    ``angle_deg`` is the direction of the screw's long axis in image
    coordinates (x right, y down), in [0, 180). ``bbox`` is the axis-aligned
    box ``(x, y, w, h)`` in whole pixels, clipped to the frame. ``area`` is the
    segmented area in px^2. ``partial`` is True for an object cut by the frame
    border (only returned with ``keep_partial``).
    """

    cx: float
    cy: float
    length: float
    width: float
    angle_deg: float
    bbox: tuple[int, int, int, int]
    area: float
    partial: bool = False


@dataclass(eq=False)
class _Part:
    """One connected blob of the bright mask, in downscaled pixels."""

    points: np.ndarray  # (N, 2) int32 contour points, downscaled image coords
    area: float
    box: tuple[int, int, int, int]  # x, y, w, h in the downscaled image
    border: bool
    label: int  # its blob's label in the low-threshold mask
    rect: tuple = ()  # cv2.minAreaRect of points
    dims: tuple[float, float, float] = (0.0, 0.0, 0.0)  # length, width, angle_deg of rect

    def __post_init__(self) -> None:
        self.rect = cv2.minAreaRect(self.points)
        self.dims = _rect_dims(self.rect)


def _rect_dims(rect) -> tuple[float, float, float]:
    """(length, width, angle_deg of the long side in [0, 180)) of a minAreaRect.

    OpenCV's rect ``(centre, (w, h), theta)`` has its ``w`` side along
    ``theta`` (that is how ``boxPoints`` draws it, whatever range a given
    OpenCV version gives theta in), so the long side is along theta or
    theta + 90.
    """
    (w, h), theta = rect[1], rect[2]
    if w >= h:
        return float(w), float(h), float(theta) % 180.0
    return float(h), float(w), (float(theta) + 90.0) % 180.0


def _width_profile(along: np.ndarray, across: np.ndarray) -> tuple[float, float, float]:
    """(median width, width at the low end, width at the high end) of an outline.

    ``along`` and ``across`` are the outline points' coordinates on the axis
    and across it; widths are read in 1 px slices along the axis, the ends
    as the widest slice within ``END_SLICE_PX`` of each end.
    """
    slices = np.floor(along - along.min()).astype(np.int64)
    order = np.argsort(slices, kind="stable")
    slices, across = slices[order], across[order]
    starts = np.flatnonzero(np.r_[True, slices[1:] != slices[:-1]])
    widths = np.maximum.reduceat(across, starts) - np.minimum.reduceat(across, starts) + 1.0
    positions = slices[starts]
    low = widths[positions <= END_SLICE_PX].max()
    high = widths[positions >= positions.max() - END_SLICE_PX].max()
    return float(np.median(widths)), float(low), float(high)


class Locator:
    """Segments objects from the belt in BGR frames of one source.

    Nothing carries over from one frame to the next (light drift and flicker
    are handled by estimating the belt and the noise in every frame anew).
    ``detect`` keeps per-frame scratch state on the instance, so use one
    instance per thread (one per source is the natural choice).

    >>> locator = Locator()
    >>> for det in locator.detect(frame):
    ...     crop = cut_crop(frame, det, 96)
    """

    def __init__(self, config: LocatorConfig | None = None) -> None:
        self.config = config or LocatorConfig()
        c = self.config
        self._open_kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (c.open_cells,) * 2)
        self._regrow_kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (3, 3))
        self._minor = np.ones(1, dtype=bool)  # per blob label of the current frame

    # ------------------------------------------------------------------ public
    def detect(self, frame: np.ndarray) -> list[Detection]:
        """Every screw-like object in ``frame`` (uint8 BGR, H x W x 3)."""
        if not (
            isinstance(frame, np.ndarray)
            and frame.dtype == np.uint8
            and frame.ndim == 3
            and frame.shape[2] == 3
        ):
            shape = getattr(frame, "shape", None)
            dtype = getattr(frame, "dtype", type(frame).__name__)
            raise ValueError(f"frame must be uint8 BGR (H, W, 3); got shape {shape}, {dtype}")
        c = self.config
        d = c.downscale
        height, width = frame.shape[:2]
        if height < 4 * c.cell_px or width < 4 * c.cell_px:
            raise ValueError(f"frame {width}x{height} is too small for cell_px {c.cell_px}")

        # Downscale (area average: also a cheap denoise) and brightness
        hs, ws = height // d, width // d
        small = frame[: hs * d, : ws * d]
        if d > 1:
            small = cv2.resize(small, (ws, hs), interpolation=cv2.INTER_AREA)
        b, g, r = cv2.split(small)
        value = cv2.max(cv2.max(b, g), r)

        # Belt estimate: opening on coarse cells erases screws, keeps gradients
        cell = max(1, c.cell_px // d)
        coarse_size = (max(4, ws // cell), max(4, hs // cell))
        coarse = cv2.resize(value, coarse_size, interpolation=cv2.INTER_AREA)
        coarse = cv2.morphologyEx(coarse, cv2.MORPH_OPEN, self._open_kernel)
        coarse = cv2.morphologyEx(coarse, cv2.MORPH_CLOSE, self._open_kernel)
        coarse = cv2.blur(coarse, (3, 3))
        belt = cv2.resize(coarse, (ws, hs), interpolation=cv2.INTER_LINEAR)
        residual = cv2.subtract(value, belt, dtype=cv2.CV_16S)

        # Noise of this frame: robust statistics of the residual (mostly belt)
        sample = residual[::NOISE_SAMPLE_STEP, ::NOISE_SAMPLE_STEP]
        level = float(np.median(sample))
        sigma = MAD_TO_SIGMA * float(np.median(np.abs(sample - level)))
        sigma = max(sigma, 0.5)
        low = level + max(c.k_low * sigma, c.min_contrast_low)
        high = level + max(c.k_high * sigma, c.min_contrast_high)

        # Bright blobs, kept when they reach the high level somewhere
        mask = (residual > low).astype(np.uint8)
        count, labels, stats, _ = cv2.connectedComponentsWithStatsWithAlgorithm(
            mask, 8, cv2.CV_32S, cv2.CCL_GRANA
        )
        reaches_high = np.bincount(labels[residual > high], minlength=count) > 0
        sizes = stats[:, cv2.CC_STAT_AREA]
        longest = np.maximum(stats[:, cv2.CC_STAT_WIDTH], stats[:, cv2.CC_STAT_HEIGHT]) * d
        # far longer than any screw: a seam or a belt edge
        keep = (sizes >= c.min_fragment_area / (d * d)) & (longest <= 1.5 * c.max_length)
        keep[0] = False
        is_main = keep & reaches_high & (sizes >= c.min_part_area / (d * d))
        # Blobs too small to be a screw part (gloss on paint, specks) never
        # count as "another object" in a band gap
        self._minor = sizes < c.min_part_area / (d * d)
        self._minor[0] = True

        # Main parts: big enough to be a screw or most of one
        parts: list[_Part] = []
        for i in np.flatnonzero(is_main):
            x, y, w, h, _ = (int(v) for v in stats[i])
            roi_mask = labels[y : y + h, x : x + w] == i
            roi_residual = residual[y : y + h, x : x + w]
            # Own contrast: cut again at a share of this blob's typical brightness,
            # so bright belt texture touching a bright screw falls off it
            values = roi_residual[roi_mask]
            upper = float(np.partition(values, len(values) * 3 // 4)[len(values) * 3 // 4])
            if upper <= high:
                continue  # a faint patch with a bright speck: a screw is bright throughout
            own = level + c.own_contrast * (upper - level)
            if own > low:
                # ... then grow the core back a little inside the blob: thread
                # valleys and shaded edges return, texture beyond a neck does not
                core = (roi_mask & (roi_residual > own)).view(np.uint8)
                grown = cv2.dilate(core, self._regrow_kernel, iterations=REGROW_STEPS)
                roi_mask &= grown.view(bool)
            # Border contact is judged on the whole blob: cutting may pull it off the edge
            border = x == 0 or y == 0 or x + w == ws or y + h == hs
            parts += self._parts_in(roi_mask, roi_residual, (x, y), (ws, hs), high, border, int(i))

        # Fragments: too small or too faint alone, but may be the far side of a band
        fragments = [(i, stats[i]) for i in np.flatnonzero(keep & ~is_main)]

        # Join the parts of one screw split by a dark band
        groups = self._join_parts(parts, fragments, labels, small, sigma)

        # Oriented box and shape test per object
        detections = []
        for group in groups:
            det = self._measure(group, width, height, small, labels, sigma)
            if det is not None:
                detections.append(det)
        return detections

    def _parts_in(
        self,
        roi_mask: np.ndarray,
        roi_residual: np.ndarray,
        offset: tuple[int, int],
        image_size: tuple[int, int],
        high: float,
        border: bool,
        label: int,
    ) -> list[_Part]:
        """The connected pieces of ``roi_mask`` big and bright enough to be screw parts."""
        c = self.config
        min_area_small = c.min_part_area / (c.downscale * c.downscale)
        count, labels, stats, _ = cv2.connectedComponentsWithStats(roi_mask.view(np.uint8), 8)
        parts = []
        for j in range(1, count):
            x, y, w, h, area = (int(v) for v in stats[j])
            if area < min_area_small:
                continue
            mask = labels[y : y + h, x : x + w] == j
            if count > 2 and int(roi_residual[y : y + h, x : x + w][mask].max()) <= high:
                continue
            x, y = x + offset[0], y + offset[1]
            contours, _ = cv2.findContours(
                mask.view(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE, offset=(x, y)
            )
            points = np.concatenate(contours).reshape(-1, 2)
            edge = x == 0 or y == 0 or x + w == image_size[0] or y + h == image_size[1]
            part = _Part(points, float(area), (x, y, w, h), border or edge, label)
            parts.append(part)
        return parts

    # ----------------------------------------------------------------- joining
    def _join_parts(
        self,
        parts: list[_Part],
        fragments: list[tuple[int, np.ndarray]],
        labels: np.ndarray,
        small: np.ndarray,
        sigma: float,
    ) -> list[list[_Part]]:
        """Group parts that are pieces of one screw (union-find over close pairs).

        Main parts pair with each other and with fragments; two fragments never
        pair (a screw is never only fragments). A fragment's outline is read
        only when it lies near a main part, as specks can number thousands.

        NOTE: so a run of thread crests that fell apart into specks beyond a
        band joins only as far as a main part reaches, and long thin screws
        can come out short (seed 7 in the README). Closing the mask before
        labelling joins the crests but cost recall on other scenes.
        """
        c = self.config
        d = c.downscale
        n_main = len(parts)
        reach = c.max_length * c.max_gap_ratio / d
        frag_boxes = np.array([f[1][:4] for f in fragments], dtype=np.float64).reshape(-1, 4)
        boxes = np.concatenate(
            [np.array([p.box for p in parts], dtype=np.float64).reshape(-1, 4), frag_boxes]
        )
        x0, y0 = boxes[:, 0], boxes[:, 1]
        x1, y1 = x0 + boxes[:, 2], y0 + boxes[:, 3]
        root = list(range(len(boxes)))
        frag_parts: dict[int, _Part] = {}

        def find(i: int) -> int:
            while root[i] != i:
                root[i] = root[root[i]]
                i = root[i]
            return i

        def part(k: int) -> _Part:
            if k < n_main:
                return parts[k]
            if k not in frag_parts:
                label, (x, y, w, h, area) = fragments[k - n_main]
                frag_parts[k] = self._fragment(labels, int(label), (x, y, w, h), int(area))
            return frag_parts[k]

        # Outline points and thickest part of each group, by root
        members = {i: p.points for i, p in enumerate(parts)}
        thickest = {i: p.dims[1] for i, p in enumerate(parts)}
        centres = np.stack([x0 + x1, y0 + y1], axis=1) / 2
        thick_of = np.array([p.dims[1] for p in parts] + [0.0] * len(fragments))
        radii = np.hypot(x1 - x0, y1 - y0) / 2
        # Only parts near the line of a main part's axis, not beyond reach of
        # its ends, are examined (specks can number thousands): one matrix,
        # main parts x all parts
        dims = np.array([p.dims for p in parts]).reshape(-1, 3)
        length, width = dims[:, :1], dims[:, 1:2]
        angle = np.radians(dims[:, 2:])
        own_centres = np.array([p.rect[0] for p in parts]).reshape(-1, 2)
        offset_x = centres[None, :, 0] - own_centres[:, :1]
        offset_y = centres[None, :, 1] - own_centres[:, 1:]
        along = np.abs(offset_x * np.cos(angle) + offset_y * np.sin(angle))
        across = np.abs(-offset_x * np.sin(angle) + offset_y * np.cos(angle))
        # the other part must reach past an end (not lie alongside), within
        # reach, on the axis: a fragment's centre within the main part's width,
        # a main part's within both widths
        is_fragment = np.arange(len(boxes)) >= n_main
        across_limit = width / 2 + 1.0 + np.where(is_fragment, 0.0, thick_of / 2)[None, :]
        near_all = (
            (along <= length / 2 + reach + radii[None, :])
            & (along + radii[None, :] >= length / 2)
            & (across <= across_limit)
        )
        # a round blob (a head alone) has no axis to speak of: any direction will do
        round_blob = (length < 1.5 * width)[:, 0]
        near_all[round_blob] = (
            np.hypot(offset_x, offset_y)[round_blob]
            <= radii[:n_main, None][round_blob] + reach + radii[None, :]
        )
        near_all[np.arange(n_main), np.arange(n_main)] = False

        examined: set[tuple[int, int]] = set()
        for i in range(n_main):
            near = near_all[i]
            for j in np.flatnonzero(near):
                pair = (min(i, j), max(i, j))
                if pair in examined:
                    continue
                examined.add(pair)
                ri, rj = find(i), find(j)
                if ri == rj or not self._same_screw(part(i), part(j), small, labels, sigma):
                    continue
                # The groups joined must still make one screw (pairs may chain
                # along a line of screws lying end to end)
                joint = np.concatenate([members[ri], members.get(rj, part(j).points)])
                joint_len, joint_wid, _ = _rect_dims(cv2.minAreaRect(joint))
                thick = max(thickest[ri], thickest.get(rj, part(j).dims[1]))
                if (joint_len + 1) * d > c.max_length or joint_wid > 1.3 * thick + 2.0:
                    continue
                root[rj] = ri
                members[ri] = joint
                thickest[ri] = thick

        # Every group holds a main part: fragments never joined to one are dropped
        groups: dict[int, list[_Part]] = {find(i): [] for i in range(n_main)}
        for k in [*range(n_main), *frag_parts]:
            if find(k) in groups:
                groups[find(k)].append(part(k))
        return list(groups.values())

    @staticmethod
    def _fragment(labels: np.ndarray, label: int, box: tuple, area: int) -> _Part:
        """A small blob of the low mask as a part (its outline read now)."""
        x, y, w, h = (int(v) for v in box)
        mask = (labels[y : y + h, x : x + w] == label).view(np.uint8)
        contours, _ = cv2.findContours(
            mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE, offset=(x, y)
        )
        points = np.concatenate(contours).reshape(-1, 2)
        hs, ws = labels.shape
        border = x == 0 or y == 0 or x + w == ws or y + h == hs
        part = _Part(points, float(area), (x, y, w, h), border, label)
        return part

    def _same_screw(
        self, a: _Part, b: _Part, small: np.ndarray, labels: np.ndarray, sigma: float
    ) -> bool:
        """True when parts ``a`` and ``b`` are the two sides of one banded screw."""
        c = self.config
        d = c.downscale
        union = np.concatenate([a.points, b.points])
        rect = cv2.minAreaRect(union)
        length, width, angle = _rect_dims(rect)

        # Collinear: together no thicker than the thicker part alone
        thick = max(a.dims[1], b.dims[1])
        if width > 1.3 * thick + 2.0 or (length + 1) * d > c.max_length:
            return False

        # Gap along the joint axis between the parts' facing ends
        axis = np.array([math.cos(math.radians(angle)), math.sin(math.radians(angle))])
        if np.dot(a.rect[0], axis) > np.dot(b.rect[0], axis):
            a, b = b, a
        pa, pb = a.points @ axis, b.points @ axis
        gap = float(pb.min() - pa.max())
        if gap > c.max_gap_ratio * length:
            return False
        if gap <= 1.0 or a.label == b.label:
            # touching, or cut from one blob of the low mask (threads, shading):
            # collinear pieces of one bright blob are one screw
            return True

        # The gap must be paint, not belt: sample the centre line across it
        # (contour points are the parts' last pixels: sample strictly between them)
        along = np.arange(pa.max() + 1.0, pb.min() - 0.5)
        if len(along) == 0:
            along = np.array([(pa.max() + pb.min()) / 2])
        paint, ours = self._paint_along(rect[0], axis, along, thick, small, labels, sigma, a, b)
        if np.mean(paint) >= 0.5:
            return True

        # A band in the belt's own colour (black on a black belt) leaves no
        # trace: join two sizeable parts on tight alignment alone.
        # NOTE: two screws lying end to end on one line, closer than
        # blind_gap_ratio x their joint length, are then taken for one.
        if (
            not ours.all()
            or gap > c.blind_gap_ratio * length
            or width > 1.1 * thick + 1.0
            or min(a.area, b.area) * d * d < c.min_part_area
        ):
            return False
        for part in (a, b):
            part_len, part_wid, part_angle = part.dims
            turn = abs(part_angle - angle) % 180.0
            if part_len >= 1.5 * max(part_wid, 1.0) and min(turn, 180.0 - turn) > 10.0:
                return False
        # A band cuts the shank square: both facing ends are shank, as wide as
        # each other and as each part's shank. A screw's own end is a tip
        # (narrower) or a head (wider); two heads are two screws. A head is
        # judged against the wider part's shank: a piece that runs to the tip
        # tapers, so its own median width is less than its facing end's.
        normal = np.array([-axis[1], axis[0]])
        shank_a, far_a, near_a = _width_profile(pa, a.points @ normal)
        shank_b, near_b, far_b = _width_profile(pb, b.points @ normal)
        shank = max(shank_a, shank_b)
        heads = (far_a >= HEAD_RATIO * shank_a) + (far_b >= HEAD_RATIO * shank_b)
        return (
            heads < 2
            and abs(near_a - near_b) <= max(1.5, 0.3 * max(near_a, near_b))
            and 0.7 * shank_a <= near_a < HEAD_RATIO * shank
            and 0.7 * shank_b <= near_b < HEAD_RATIO * shank
        )

    def _paint_along(
        self,
        centre,
        axis: np.ndarray,
        along: np.ndarray,
        thick: float,
        small: np.ndarray,
        labels: np.ndarray,
        sigma: float,
        *owners: _Part,
    ) -> tuple[np.ndarray, np.ndarray]:
        """For points on the line through ``centre`` along ``axis`` (at coordinates
        ``along`` on it): where the colour is paint (unlike the belt nearby, and
        not on some other blob than the ``owners``'), and where it is not on
        another blob."""
        c = self.config
        centre = np.asarray(centre, dtype=np.float64)
        pts = centre + np.outer(along - float(centre @ axis), axis)
        hs, ws = small.shape[:2]
        xs = np.clip(np.rint(pts[:, 0]).astype(int), 0, ws - 1)
        ys = np.clip(np.rint(pts[:, 1]).astype(int), 0, hs - 1)
        colour = small[ys, xs].astype(np.int16)
        belt_colour, spread = self._belt_near(small, labels, xs, ys, max(3, math.ceil(thick)))
        diff = np.abs(colour - belt_colour).max(axis=1)
        # The belt's local spread, capped by the frame's (a ring may catch paint or shadow)
        spread = min(spread, sigma)
        # A gap across some other sizeable blob (a neighbour's head) is no band
        owner = labels[ys, xs]
        ours = self._minor[owner]
        for part in owners:
            ours |= owner == part.label
        return (diff > max(c.k_gap * spread, c.min_contrast_low)) & ours, ours

    def _runs_off_frame(
        self, group: list[_Part], rect, small: np.ndarray, labels: np.ndarray, sigma: float
    ) -> bool:
        """True when paint runs on from an end of the object to the frame border:
        a band cut by the border, with the rest of the screw outside."""
        c = self.config
        length, thick, angle = _rect_dims(rect)
        axis = np.array([math.cos(math.radians(angle)), math.sin(math.radians(angle))])
        centre = np.asarray(rect[0], dtype=np.float64)
        hs, ws = small.shape[:2]

        # Ends near the border, going on along the axis (usually none)
        near_ends = []
        for sign in (-1.0, 1.0):
            end = centre + sign * (length / 2) * axis
            reach = math.inf
            for k, limit in ((0, ws - 1), (1, hs - 1)):
                step = sign * axis[k]
                if step > 1e-6:
                    reach = min(reach, (limit - end[k]) / step)
                elif step < -1e-6:
                    reach = min(reach, end[k] / -step)
            if reach < 1.0:
                return True
            if reach <= c.max_gap_ratio * max(length, c.min_length / c.downscale):
                near_ends.append((sign, reach))
        if not near_ends:
            return False

        points = np.concatenate([p.points for p in group])
        shank, low_end, high_end = _width_profile(
            points @ axis, points @ np.array([-axis[1], axis[0]])
        )
        for sign, reach in near_ends:
            end_width = low_end if sign < 0 else high_end
            if not 0.7 * shank <= end_width < HEAD_RATIO * shank:
                continue  # a head or a tip: the screw's own end, not a band's edge
            t_end = float(centre @ axis) + sign * length / 2
            along = t_end + sign * np.arange(1.0, reach + 0.5)
            paint, _ = self._paint_along(centre, axis, along, thick, small, labels, sigma, *group)
            # paint all the way to the border (a shadow beyond a tip stops short)
            if paint[-1] and np.mean(paint) >= 0.8:
                return True
        return False

    @staticmethod
    def _belt_near(
        small: np.ndarray, labels: np.ndarray, xs: np.ndarray, ys: np.ndarray, pad: int
    ) -> tuple[np.ndarray, float]:
        """The belt's colour around some points and its spread (a sigma, grey levels).

        Read on the outline of a box ``pad`` pixels around the points, leaving
        out bright blobs (the screw's own ends cross the outline).
        """
        hs, ws = small.shape[:2]
        x0, x1 = max(0, int(xs.min()) - pad), min(ws - 1, int(xs.max()) + pad)
        y0, y1 = max(0, int(ys.min()) - pad), min(hs - 1, int(ys.max()) + pad)
        # the box outline: top and bottom rows, left and right columns
        ring = np.concatenate(
            [small[y0, x0 : x1 + 1], small[y1, x0 : x1 + 1],
             small[y0 : y1 + 1, x0], small[y0 : y1 + 1, x1]]
        )  # fmt: skip
        owner = np.concatenate(
            [labels[y0, x0 : x1 + 1], labels[y1, x0 : x1 + 1],
             labels[y0 : y1 + 1, x0], labels[y0 : y1 + 1, x1]]
        )  # fmt: skip
        belt = owner == 0
        if np.count_nonzero(belt) >= 8:
            ring = ring[belt]
        # medians by partition (the upper middle for an even count: close enough)
        ring = ring.astype(np.int16)
        middle = len(ring) // 2
        median = np.partition(ring, middle, axis=0)[middle]
        deviation = np.abs(ring - median).max(axis=1)
        spread = MAD_TO_SIGMA * float(np.partition(deviation, middle)[middle])
        return median, spread

    # ---------------------------------------------------------------- measuring
    def _measure(
        self,
        group: list[_Part],
        width: int,
        height: int,
        small: np.ndarray,
        labels: np.ndarray,
        sigma: float,
    ) -> Detection | None:
        """Oriented box of one object, in full-resolution pixels; None if not screw-like."""
        c = self.config
        d = c.downscale
        points = group[0].points if len(group) == 1 else np.concatenate([p.points for p in group])
        rect = group[0].rect if len(group) == 1 else cv2.minAreaRect(points)
        length_s, width_s, angle = group[0].dims if len(group) == 1 else _rect_dims(rect)
        # Contour points are pixel centres: the blob spans one more pixel each way.
        length = (length_s + 1.0) * d
        thickness = (width_s + 1.0) * d
        area = sum(p.area for p in group) * d * d
        partial = any(p.border for p in group)
        if partial and not c.keep_partial:
            return None

        # Shape test (a partial object only has to be not too big)
        fill = area / max(length * thickness, 1.0)
        if length > c.max_length or thickness > c.max_width:
            return None
        if not partial and (
            length < c.min_length
            or thickness < c.min_width
            or length < c.min_aspect * thickness
            or fill < c.min_fill
        ):
            return None
        if not partial and self._runs_off_frame(group, rect, small, labels, sigma):
            if not c.keep_partial:
                return None
            partial = True

        # Downscaled pixel i covers full pixels d*i .. d*i+d-1: centre at d*i + (d-1)/2
        cx = rect[0][0] * d + (d - 1) / 2
        cy = rect[0][1] * d + (d - 1) / 2
        xs, ys = points[:, 0], points[:, 1]
        x0, y0 = int(xs.min()) * d, int(ys.min()) * d
        x1 = min(width, (int(xs.max()) + 1) * d)
        y1 = min(height, (int(ys.max()) + 1) * d)
        return Detection(
            cx=float(cx),
            cy=float(cy),
            length=float(length),
            width=float(thickness),
            angle_deg=float(angle),
            bbox=(x0, y0, x1 - x0, y1 - y0),
            area=float(area),
            partial=partial,
        )


# ---------------------------------------------------------------------- crops
CROP_MARGIN = 0.15  # margin around the screw, as a share of its length, each side
# Above this shrink factor the ROI is first area-averaged, so a thread's fine
# stripes do not alias when warpAffine samples it (it does not low-pass).
MAX_DIRECT_SHRINK = 1.5


def cut_crop(
    frame: np.ndarray, det: Detection, size: int, *, margin: float = CROP_MARGIN
) -> np.ndarray:
    """The object rotated so its axis is horizontal, fixed margin, padded square,
    resized to ``size x size``: uint8 BGR ``(size, size, 3)``.

    The oriented box grows by ``margin x length`` on every side; its long side
    spans the crop's width and the rows above and below it are filled with the
    belt's colour (the median of the box's outer rows), so a neighbour lying
    beside the screw does not appear in its crop. Only a local ROI is resized
    and rotated, never the whole frame.
    """
    if size < 8:
        raise ValueError(f"crop size {size!r} is too small; use 8 px or more")
    height, width = frame.shape[:2]
    pad = margin * det.length
    box_len = det.length + 2 * pad
    box_wid = min(det.width + 2 * pad, box_len)
    theta = math.radians(det.angle_deg)
    cos_t, sin_t = math.cos(theta), math.sin(theta)

    # ROI: the axis-aligned hull of the rotated box, clipped to the frame
    half_x = (abs(cos_t) * box_len + abs(sin_t) * box_wid) / 2 + 2
    half_y = (abs(sin_t) * box_len + abs(cos_t) * box_wid) / 2 + 2
    x0 = max(0, math.floor(det.cx - half_x))
    y0 = max(0, math.floor(det.cy - half_y))
    x1 = min(width, math.ceil(det.cx + half_x) + 1)
    y1 = min(height, math.ceil(det.cy + half_y) + 1)
    roi = frame[y0:y1, x0:x1]
    cx, cy = det.cx - x0, det.cy - y0

    # Anti-aliasing: shrink the ROI first, by a whole factor (OpenCV's fast
    # path for INTER_AREA), when the crop is much smaller than the screw
    scale = size / box_len  # output px per source px
    factor = int(1.0 / scale) if scale < 1 / MAX_DIRECT_SHRINK else 1
    if factor >= 2 and roi.shape[0] >= factor and roi.shape[1] >= factor:
        new_h, new_w = roi.shape[0] // factor, roi.shape[1] // factor
        roi = roi[: new_h * factor, : new_w * factor]
        roi = cv2.resize(roi, (new_w, new_h), interpolation=cv2.INTER_AREA)
        # pixel k of the result averages source pixels k*f .. k*f + f - 1
        cx, cy = (cx - (factor - 1) / 2) / factor, (cy - (factor - 1) / 2) / factor
        scale *= factor

    # Rotate the box into a (size x band) strip: destination -> source map
    band = max(1, min(size, round(box_wid * size / box_len)))
    ux, uy = cos_t / scale, sin_t / scale  # one output px along the axis, in source px
    u0, v0 = (size - 1) / 2, (band - 1) / 2  # the strip's centre
    matrix = np.array([[ux, -uy, cx - ux * u0 + uy * v0], [uy, ux, cy - uy * u0 - ux * v0]])
    strip = cv2.warpAffine(
        roi,
        matrix,
        (size, band),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_REPLICATE,
    )
    if band == size:
        return strip

    # Pad to square with the belt's colour
    edge = np.concatenate([strip[0], strip[-1]])[::2]  # every other pixel: plenty
    fill = [int(v) for v in np.median(edge, axis=0)]
    top = (size - band) // 2
    return cv2.copyMakeBorder(strip, top, size - band - top, 0, 0, cv2.BORDER_CONSTANT, value=fill)
