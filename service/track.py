"""Track objects frame to frame along the belt and report decision-line crossings.

The belt is rigid: every screw on it moves by (nearly) the same shift per
frame, mostly along x. The tracker estimates that shift itself, with no
speed given in advance, and uses it to predict where each track is now:

1. *Belt shift*: every pairing of a live track with a detection proposes a
   shift (its displacement per frame). The shift that lines up the most
   tracks with a detection wins (a vote, robust to new and vanished objects);
   among near-equal votes the one closest to the running estimate wins, so
   evenly spaced screws do not make the tracker slip by one screw.
2. *Assignment*: each track's predicted position (last position + belt shift
   x frames elapsed, plus its own small drift, e.g. a screw rolling in y) is
   paired with the nearest compatible detection, closest pairs first, within
   a gate.
3. *Life*: an unpaired detection starts a track; a track survives
   ``max_missed`` frames without a detection (its prediction carries it on)
   and then ends.
4. *Decision line*: a track is reported in ``crossed`` in the frame its centre
   reaches ``line_x`` moving with the belt, once in its life. A track that
   is missed around the line is reported when its *predicted* centre reaches
   the line, so an object that crossed always gets its decision.

Detections flagged ``partial`` (cut by the frame border) are ignored.

NOTE: pairing is greedy (closest first), not an optimal assignment; with
screws kept apart on the belt and a good shift estimate the two agree, and
greedy needs no solver.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace

import numpy as np

from service.locate import Detection

log = logging.getLogger(__name__)

# Share of a new measurement taken into the running belt shift per frame:
# 1 / (frames of memory, here 10); the belt's speed changes over seconds.
SHIFT_GAIN = 0.1
# The same for a track's own drift; lower, as one position is noisy.
DRIFT_GAIN = 0.2


@dataclass
class TrackStep:
    """What one ``Tracker.update`` call found.

    ``views``: (track_id, detection) for every object seen in this frame.
    ``crossed``: track ids whose centre crossed the decision line in this frame
    (each track is reported once in its life).
    ``ended``: track ids dropped this step (left the frame or lost for longer
    than the allowed misses) that never crossed the line.
    """

    views: list[tuple[int, Detection]] = field(default_factory=list)
    crossed: list[int] = field(default_factory=list)
    ended: list[int] = field(default_factory=list)


@dataclass
class _Track:
    track_id: int
    det: Detection  # last detection
    frame: int  # frame index of the last detection
    hits: int = 1
    missed: int = 0
    drift: tuple[float, float] = (0.0, 0.0)  # own velocity minus the belt's, px/frame
    crossed: bool = False  # reported in TrackStep.crossed
    born_past: bool = False  # first seen on or past the line: it can never cross
    # The longest recent view of the screw and its frame. A screw that a dark
    # band splits is often seen as two pieces; this box, carried forward with
    # the belt, tells its pieces from a new screw (see Tracker._adopt_pieces).
    whole: Detection | None = None
    whole_frame: int = 0

    def predict(self, shift: tuple[float, float], frame: int) -> tuple[float, float]:
        dt = frame - self.frame
        return (
            self.det.cx + (shift[0] + self.drift[0]) * dt,
            self.det.cy + (shift[1] + self.drift[1]) * dt,
        )

    def predicted_whole(self, shift: tuple[float, float], frame: int) -> Detection:
        whole = self.whole or self.det
        dt = frame - self.whole_frame if self.whole else frame - self.frame
        return replace(
            whole,
            cx=whole.cx + (shift[0] + self.drift[0]) * dt,
            cy=whole.cy + (shift[1] + self.drift[1]) * dt,
        )


class Tracker:
    """Keeps one id per screw from entry to exit, using the belt's motion.

    ``line_x`` is the decision line in pixels; ``direction`` is +1 when the
    belt runs left to right along x, -1 for right to left. ``max_missed``
    frames without a detection end a track.

    Keyword options: ``max_speed`` (px per frame the belt may move at most),
    ``gate_px`` (how far from its prediction a track accepts a detection, on
    top of 15 % of the shift since it was seen and 10 % of the screw's length),
    ``frame_width`` (when given, a
    track whose prediction leaves the frame ends at once instead of after
    ``max_missed`` frames), ``min_hits_to_cross`` (detections a track needs
    before a crossing is reported from its prediction alone).
    """

    def __init__(
        self,
        line_x: float,
        direction: int = 1,
        max_missed: int = 2,
        *,
        max_speed: float = 200.0,
        gate_px: float = 14.0,
        frame_width: int | None = None,
        min_hits_to_cross: int = 2,
    ) -> None:
        if direction not in (1, -1):
            raise ValueError(f"direction {direction!r} is not 1 (left to right) or -1")
        if max_missed < 0:
            raise ValueError(f"max_missed {max_missed!r} must be >= 0")
        if not max_speed > 0 or not gate_px > 0:
            raise ValueError(f"max_speed {max_speed!r} and gate_px {gate_px!r} must be > 0")
        self.line_x = float(line_x)
        self.direction = direction
        self.max_missed = max_missed
        self.max_speed = float(max_speed)
        self.gate_px = float(gate_px)
        self.frame_width = frame_width
        self.min_hits_to_cross = min_hits_to_cross
        self._tracks: dict[int, _Track] = {}
        self._next_id = 1
        self._frame = -1
        self._shift: tuple[float, float] | None = None  # belt shift, px per frame
        self._shift_updates = 0

    # ------------------------------------------------------------------ public
    @property
    def speed(self) -> float | None:
        """Estimated belt speed along x in px per frame (signed), None until seen."""
        return None if self._shift is None else self._shift[0]

    @property
    def active(self) -> int:
        """Number of live tracks."""
        return len(self._tracks)

    def last_detection(self, track_id: int) -> Detection | None:
        """The latest detection of a live track (None once the track has ended)."""
        track = self._tracks.get(track_id)
        return None if track is None else track.det

    def update(self, detections: list[Detection], frame_index: int | None = None) -> TrackStep:
        """Advance by one frame (or to ``frame_index``, when frames were dropped)."""
        frame = self._frame + 1 if frame_index is None else int(frame_index)
        if frame <= self._frame:
            raise ValueError(f"frame_index {frame} is not after the previous one ({self._frame})")
        self._frame = frame
        dets = [d for d in detections if not d.partial]
        tracks = list(self._tracks.values())
        step = TrackStep()

        # Belt shift, then pairs of (track, detection)
        if tracks and dets:
            measured = self._vote_shift(tracks, dets, frame)
            if measured is not None:
                self._shift = measured
        pairs = self._assign(tracks, dets, frame) if tracks and dets else []
        pairs += self._adopt_pieces(tracks, dets, pairs, frame)

        # Update paired tracks
        paired_tracks, paired_dets = set(), set()
        for ti, di in pairs:
            track, det = tracks[ti], dets[di]
            self._observe(track, det, frame, step)
            paired_tracks.add(ti)
            paired_dets.add(di)

        # Missed tracks coast on their prediction; lost ones end. A missed track
        # whose centre lies in a seen track's screw was a piece of that screw
        # (two pieces, then the whole): it ends now, before it can cross too.
        shift = self._shift or (0.0, 0.0)
        seen = [tracks[ti].predicted_whole(shift, frame) for ti in paired_tracks]
        for ti, track in enumerate(tracks):
            if ti in paired_tracks:
                continue
            px, py = track.predict(shift, frame)
            if any(_inside(replace(track.det, cx=px, cy=py), whole) for whole in seen):
                del self._tracks[track.track_id]
                if not track.crossed:
                    step.ended.append(track.track_id)
                continue
            track.missed += 1
            if (
                not (track.crossed or track.born_past)
                and track.hits >= self.min_hits_to_cross
                and self._ahead(track.det.cx) < 0 <= self._ahead(px)
            ):
                track.crossed = True
                step.crossed.append(track.track_id)
            left = self.frame_width is not None and not 0 <= px < self.frame_width
            if track.missed > self.max_missed or left:
                del self._tracks[track.track_id]
                if not track.crossed:
                    step.ended.append(track.track_id)

        # New tracks for the rest, except pieces of a screw already tracked
        for di, det in enumerate(dets):
            if di in paired_dets:
                continue
            live = [t for t in tracks if t.track_id in self._tracks]
            if any(_inside(det, t.predicted_whole(shift, frame)) for t in live):
                continue
            track = _Track(self._next_id, det, frame, whole=det, whole_frame=frame)
            # Born on or past the line: it never crosses, and is reported when it ends
            track.born_past = self._ahead(det.cx) >= 0
            self._next_id += 1
            self._tracks[track.track_id] = track
            step.views.append((track.track_id, det))
        return step

    # ---------------------------------------------------------------- internals
    def _ahead(self, x: float) -> float:
        """Signed distance past the decision line, in the belt's direction."""
        return (x - self.line_x) * self.direction

    def _observe(self, track: _Track, det: Detection, frame: int, step: TrackStep) -> None:
        """Move ``track`` to ``det``: drift, crossing, counters."""
        dt = frame - track.frame
        shift = self._shift or (0.0, 0.0)
        # own drift on top of the belt's (a rolling screw), smoothed
        dx = (det.cx - track.det.cx) / dt - shift[0]
        dy = (det.cy - track.det.cy) / dt - shift[1]
        limit = 0.25 * abs(shift[0]) + 2.0  # a rolling screw, not a jump
        track.drift = (
            float(np.clip(track.drift[0] + DRIFT_GAIN * (dx - track.drift[0]), -limit, limit)),
            float(np.clip(track.drift[1] + DRIFT_GAIN * (dy - track.drift[1]), -limit, limit)),
        )
        crossing = self._ahead(track.det.cx) < 0 <= self._ahead(det.cx)
        if crossing and not (track.crossed or track.born_past):
            track.crossed = True
            step.crossed.append(track.track_id)
        track.det, track.frame = det, frame
        if track.whole is None or det.length >= 0.85 * track.whole.length:
            track.whole, track.whole_frame = det, frame
        track.hits += 1
        track.missed = 0
        step.views.append((track.track_id, det))

    def _vote_shift(
        self, tracks: list[_Track], dets: list[Detection], frame: int
    ) -> tuple[float, float] | None:
        """The belt shift (px/frame) that lines up the most tracks with a detection."""
        tx = np.array([t.det.cx for t in tracks])
        ty = np.array([t.det.cy for t in tracks])
        dt = np.array([frame - t.frame for t in tracks], dtype=np.float64)
        drift = np.array([t.drift for t in tracks])
        tlen = np.array([t.det.length for t in tracks])
        dx_, dy_ = np.array([d.cx for d in dets]), np.array([d.cy for d in dets])
        dlen = np.array([d.length for d in dets])

        # Candidate shifts, one per plausible (track, detection) pair
        vx = (dx_[None, :] - tx[:, None]) / dt[:, None] - drift[:, :1]
        vy = (dy_[None, :] - ty[:, None]) / dt[:, None] - drift[:, 1:]
        along = vx * self.direction
        ratio = dlen[None, :] / tlen[:, None]
        plausible = (
            (along >= -2.0)  # the belt does not run backwards (2 px: jitter)
            & (along <= self.max_speed)
            & (np.abs(vy) <= 4.0 + 0.25 * np.abs(vx))
            & (ratio > 0.7)
            & (ratio < 1.4)
        )
        cand = np.stack([vx[plausible], vy[plausible]], axis=1)
        if len(cand) == 0:
            return None

        # Support of each candidate: tracks with a detection near their prediction
        px = tx[None, :] + (cand[:, :1] + drift[None, :, 0]) * dt[None, :]
        py = ty[None, :] + (cand[:, 1:] + drift[None, :, 1]) * dt[None, :]
        dist = np.hypot(
            dx_[None, None, :] - px[:, :, None], dy_[None, None, :] - py[:, :, None]
        ).min(axis=2)
        tol = 3.0 + 0.1 * np.abs(cand[:, :1]) * dt[None, :]
        inlier = dist <= tol
        support = inlier.sum(axis=1)
        residual = np.where(inlier, dist, 0).sum(axis=1)

        # Most support; near-ties go to the running estimate (or the slower shift)
        best = int(support.max())
        near = np.flatnonzero(support >= max(1, best - (1 if best >= 3 else 0)))
        if self._shift is not None:
            gap = np.hypot(cand[near, 0] - self._shift[0], cand[near, 1] - self._shift[1])
            choice = near[np.lexsort((residual[near], gap))[0]]
        else:
            near = np.flatnonzero(support == best)
            choice = near[np.lexsort((np.abs(cand[near, 0]), residual[near]))[0]]

        # Refine: mean shift of the chosen candidate's inlier pairs
        rows = np.flatnonzero(inlier[choice])
        if len(rows) == 0:
            return None
        pxc, pyc = px[choice, rows], py[choice, rows]
        nearest = np.argmin(np.hypot(dx_[None, :] - pxc[:, None], dy_[None, :] - pyc[:, None]), 1)
        # (raw displacements: subtracting the tracks' drift, itself measured
        # against this estimate, would feed an error back into it)
        meas_x = float(np.median((dx_[nearest] - tx[rows]) / dt[rows]))
        meas_y = float(np.median((dy_[nearest] - ty[rows]) / dt[rows]))
        self._shift_updates += 1
        if self._shift is None:
            return (meas_x, meas_y)
        # Smooth over frames (the belt's speed changes slowly), a lone pair
        # counts less; the first measurements average plainly
        gain = max(SHIFT_GAIN, 1.0 / self._shift_updates) * min(1.0, len(rows) / 3)
        return (
            self._shift[0] + gain * (meas_x - self._shift[0]),
            self._shift[1] + gain * (meas_y - self._shift[1]),
        )

    def _adopt_pieces(
        self,
        tracks: list[_Track],
        dets: list[Detection],
        pairs: list[tuple[int, int]],
        frame: int,
    ) -> list[tuple[int, int]]:
        """Pair what ``_assign`` refused on size: one screw seen whole, then in pieces.

        The locator sometimes returns only part of a screw for a frame (a dark
        band cut it, a blurred tip), or a track was born from such a part. The
        size check in ``_assign`` rightly keeps a track from jumping to another
        screw, but a detection whose centre lies inside a track's predicted box
        (or that contains the track's predicted centre) is the same screw:
        screws do not touch, so no other screw can be there. Without this, the
        piece starts a second track and the screw gets two decisions. The box
        is the track's longest recent view carried forward, not its last one,
        which may itself be a piece.
        """
        used_t = {ti for ti, _ in pairs}
        used_d = {di for _, di in pairs}
        shift = self._shift or (0.0, 0.0)
        adopted = []
        for di, det in enumerate(dets):
            if di in used_d:
                continue
            for ti, track in enumerate(tracks):
                if ti in used_t:
                    continue
                whole = track.predicted_whole(shift, frame)
                if _inside(det, whole) or _inside(whole, det):
                    adopted.append((ti, di))
                    used_t.add(ti)
                    break
        return adopted

    def _assign(
        self, tracks: list[_Track], dets: list[Detection], frame: int
    ) -> list[tuple[int, int]]:
        """Greedy nearest pairing of predictions and detections, within the gate."""
        shift = self._shift or (0.0, 0.0)
        costs = []
        for ti, track in enumerate(tracks):
            px, py = track.predict(shift, frame)
            dt = frame - track.frame
            # Before the shift is known a track may have moved anywhere downstream
            # the gate grows with the frames elapsed, and with the screw: a
            # detection that lost a piece (a band unseen) moves its centre
            gate = self.gate_px + 0.15 * abs(shift[0]) * dt + 0.1 * track.det.length
            for di, det in enumerate(dets):
                if self._shift is None:
                    along = (det.cx - track.det.cx) * self.direction
                    if not -2.0 <= along <= self.max_speed * dt:
                        continue
                    dist = abs(det.cy - track.det.cy) + 0.1 * along
                else:
                    dist = math.hypot(det.cx - px, det.cy - py)
                    if dist > gate:
                        continue
                # a detection of another size is another screw, or a piece of
                # this one: the track had better coast a frame than jump to it
                ratio = det.length / track.det.length
                if not 0.7 < ratio < 1.4:
                    continue
                turn = abs(det.angle_deg - track.det.angle_deg) % 180
                turn = min(turn, 180 - turn)
                costs.append((dist + 0.2 * turn + 0.3 * abs(det.length - track.det.length), ti, di))
        costs.sort()
        used_t, used_d, pairs = set(), set(), []
        for _, ti, di in costs:
            if ti not in used_t and di not in used_d:
                used_t.add(ti)
                used_d.add(di)
                pairs.append((ti, di))
        return pairs


def _inside(piece: Detection, whole: Detection, slack_px: float = 3.0) -> bool:
    """Whether ``piece``'s centre lies within ``whole``'s oriented box (plus a little)."""
    theta = math.radians(whole.angle_deg)
    dx, dy = piece.cx - whole.cx, piece.cy - whole.cy
    along = dx * math.cos(theta) + dy * math.sin(theta)
    across = -dx * math.sin(theta) + dy * math.cos(theta)
    return abs(along) <= whole.length / 2 + slack_px and abs(across) <= whole.width / 2 + slack_px
