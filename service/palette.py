"""The default class list: twenty band colours in bin order, with reference sRGB.

The file ``palette.json`` beside this module is package data; nothing reads
the copy in the design folder at run time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources


@dataclass(frozen=True)
class BandColour:
    """One class: its name (the label and bin order) and reference sRGB."""

    name: str
    rgb: tuple[int, int, int]

    @property
    def bgr(self) -> tuple[int, int, int]:
        r, g, b = self.rgb
        return (b, g, r)


@cache
def default_palette() -> tuple[BandColour, ...]:
    """The twenty default classes; index = class id = default bin."""
    text = resources.files(__package__).joinpath("palette.json").read_text("utf-8")
    return tuple(
        BandColour(name=c["name"], rgb=tuple(c["rgb"])) for c in json.loads(text)["classes"]
    )


def default_labels() -> list[str]:
    return [c.name for c in default_palette()]
