"""Simulated conveyor belt: frames of banded screws on a moving belt, with the truth.

The simulator renders whole belt frames (numpy and OpenCV only) for three
users: ``python -m training synth`` (videos and the crops dataset, whose
crops the service's own locator cuts), the tests, and the daemon's default
camera ``synthetic:``. It lives under ``service/`` rather than ``training/``
because of that last one: the edge box installs only ``service``, and the
daemon must run with no camera attached.

    from service.simulator import BeltSimulator
    sim = BeltSimulator(width=1280, height=720, fps=30.0, rate=2.0, seed=0)
    frame = sim.next_frame()   # SimFrame(index, image, objects: list[ObjectTruth])

Modules: ``options`` (every knob and its randomised default), ``scene``
(arrivals, motion, truth), ``screw`` (shape and drawing), ``belt`` (moving
texture, light), ``camera`` (blur, noise, tone, compression).
"""

from service.simulator.camera import jpeg_round_trip
from service.simulator.options import SceneOptions
from service.simulator.scene import BeltSimulator, ObjectTruth, SimFrame

__all__ = ["BeltSimulator", "ObjectTruth", "SceneOptions", "SimFrame", "jpeg_round_trip"]
