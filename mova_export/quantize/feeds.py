"""Calibration and held-out feeds: which samples calibrate, which ones the gate judges on, and what was missing."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from ..core.errors import ExportError

Feed = Mapping[str, np.ndarray]


def split_feeds(feeds: Sequence[Feed], held_out: float | int = 0.25) -> tuple[list[dict], list[dict]]:
    """Deterministic split into (calibration, held_out): `held_out` is a count (int >= 1) or a fraction in (0, 1)
    (at least one feed). Held-out feeds are spread evenly over the sequence (3 feeds -> the middle one is held out);
    at least one feed is left to calibrate on."""
    calib, held, _ = _split(list(feeds), held_out)
    return calib, held


def _split(feeds: list[Feed], held_out: float | int) -> tuple[list[dict], list[dict], list[int]]:
    feeds = [dict(f) for f in feeds]
    n = len(feeds)
    if n < 2:
        raise ExportError(f"split_feeds needs at least 2 feeds (1 to calibrate, 1 to hold out), got {n}; "
                          "add calibration images or calibrate and measure on the same feeds without a split")
    if isinstance(held_out, bool) or not isinstance(held_out, (int, float)):
        raise ExportError(f"held_out must be a count or a fraction, got {held_out!r}")
    if isinstance(held_out, float):
        if not 0.0 < held_out < 1.0:
            raise ExportError(f"held_out fraction {held_out} is outside (0, 1); pass e.g. 0.25 or a count")
        k = max(1, round(n * held_out))
    else:
        k = int(held_out)
    if not 1 <= k <= n - 1:
        raise ExportError(f"held_out={held_out} leaves {n - k} of {n} feeds to calibrate on; hold out 1..{n - 1}")
    picked = sorted({(2 * i + 1) * n // (2 * k) for i in range(k)})
    return [f for i, f in enumerate(feeds) if i not in picked], [feeds[i] for i in picked], picked


@dataclass
class FeedSplit:
    """The feeds one quantization calibrates on and the held-out ones its gate judges (with their labels); when the
    set has fewer samples than the recipe asks for, `shortfall` says so in one line (the build prints it and the
    report records it)."""
    calibration: list[dict]
    held_out: list[dict]
    held_out_labels: list[str]
    asked: tuple[int, int]             # (calibration samples, held-out samples) the recipe asks for
    shortfall: str | None = None

    def to_json(self) -> dict:
        return {"samples": len(self.calibration), "held_out": len(self.held_out),
                "asked": {"samples": self.asked[0], "held_out": self.asked[1]},
                "held_out_samples": list(self.held_out_labels), "shortfall": self.shortfall}


def split_calibration(feeds: Sequence[Feed], labels: Sequence[str], samples: int, held_out: int) -> FeedSplit:
    """Hold out `held_out` feeds (spread evenly over the set) and calibrate on `samples` of the rest. A set smaller
    than samples + held_out keeps the recipe's proportion of held-out feeds (at least one) and records the shortfall.
    """
    feeds, labels = list(feeds), list(labels)
    if len(labels) != len(feeds):
        raise ExportError(f"{len(labels)} labels for {len(feeds)} calibration feeds; this is a bug")
    n = len(feeds)
    wanted = samples + held_out
    shortfall = None
    if n < wanted:
        held = min(held_out, max(1, round(n * held_out / wanted)))
        shortfall = (f"the recipe asks for {samples} calibration + {held_out} held-out samples; the calibration set "
                     f"has {n}: calibrating on {max(0, n - held)}, judging on {held} (pass --calib with more images)")
    else:
        held = held_out
    calib, held_feeds, picked = _split(feeds, held)
    held_labels = [labels[i] for i in picked]
    return FeedSplit(calib[:samples], held_feeds, held_labels, (samples, held_out), shortfall)
