"""What MoVA computes from a frame's pixels alone, kept per frame: a robot asks several questions of one frame.

The base features, the routing pass's image and routing tokens, each expert's features and every preprocessed
image input depend on the pixels only, never on the question. A `FrameState` holds them as they are computed; the
`FrameCache` keeps the states of recent frames in an LRU bounded in bytes, keyed by the frame's content (its
shape, dtype and a BLAKE2b digest of its bytes: a frame re-sent as a new array is still a hit, a frame changed in
one pixel is a miss). A second question on a cached frame runs only what depends on the question: the LLM's
routing, the text encoder, the answer pass's adapter, the experts not computed yet, and the LLM's answer. Cached
arrays are the very arrays the graphs returned (made read-only), so answers are bit-identical with the cache on
or off.

The bound counts what stays cached between requests. A state in use by a request (or held by a `rt.frame(...)`
handle) lives as long as that needs it, as it would without a cache; the cache is trimmed when each request ends.
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

FRAMES_BY_DEFAULT = 3          # the default bound: this many frames with every expert computed


def frame_key(rgb: np.ndarray) -> str:
    """The frame's content key: shape, dtype and a 128-bit BLAKE2b of the bytes (~1 GB/s: 1.4 ms at 672x672)."""
    digest = hashlib.blake2b(np.ascontiguousarray(rgb).data, digest_size=16)
    digest.update(repr((rgb.shape, rgb.dtype.str)).encode())
    return digest.hexdigest()


@dataclass(eq=False)
class FrameState:
    """The pixel-only results of one frame, filled as requests compute them."""
    rgb: np.ndarray
    key: str = ""
    inputs: dict[str, list[np.ndarray]] = field(default_factory=dict)     # image input kind -> arrays
    base: np.ndarray | None = None
    routing: tuple[np.ndarray, np.ndarray] | None = None                  # (image tokens, routing tokens)
    experts: dict[str, np.ndarray] = field(default_factory=dict)          # component -> aligned features

    def keep(self, value: np.ndarray) -> np.ndarray:
        """A graph's output, read-only from now on (a caller writing into it would change later answers)."""
        value.flags.writeable = False
        return value

    @property
    def nbytes(self) -> int:
        arrays = [self.rgb, *(a for arrays in self.inputs.values() for a in arrays), *self.experts.values()]
        arrays += [a for a in (self.base, *(self.routing or ())) if a is not None]
        return sum(int(a.nbytes) for a in arrays)


class FrameCache:
    """FrameStates of recent frames, least recently used out first, at most `capacity` bytes between requests
    (0: nothing is kept; every request gets a fresh state). Thread-safe."""

    def __init__(self, capacity: int):
        self.capacity = max(0, int(capacity))
        self._states: OrderedDict[str, FrameState] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = self.evictions = 0

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    def state(self, rgb: np.ndarray) -> tuple[FrameState, bool]:
        """(the frame's state, whether it was cached); a new state is cached at once."""
        if not self.enabled:
            return FrameState(rgb), False
        key = frame_key(rgb)
        with self._lock:
            state = self._states.get(key)
            if state is not None:
                self._states.move_to_end(key)
                self.hits += 1
                return state, True
            self.misses += 1
            state = FrameState(rgb, key)
            self._states[key] = state
            return state, False

    def trim(self) -> None:
        """Drop least recently used states until the rest fit the capacity (the newest one too if it alone
        does not fit)."""
        with self._lock:
            total = sum(s.nbytes for s in self._states.values())
            while self._states and total > self.capacity:
                _, dropped = self._states.popitem(last=False)
                total -= dropped.nbytes
                self.evictions += 1

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(s.nbytes for s in self._states.values())

    def __len__(self) -> int:
        return len(self._states)

    def clear(self) -> None:
        with self._lock:
            self._states.clear()

    def stats(self) -> dict[str, int | float]:
        return {"frames": len(self), "mib": round(self.nbytes / 2**20, 3), "capacity_mib": self.capacity / 2**20,
                "hits": self.hits, "misses": self.misses, "evictions": self.evictions}


def frame_bytes(graphs: Iterable[Any], camera: tuple[int, int] = (1080, 1920)) -> int:
    """What one frame's state holds at most, from the bundle's graph specs: a camera frame, the towers' inputs and
    outputs (every expert computed) and the routing graph's outputs (the default bound's unit)."""
    total = camera[0] * camera[1] * 3
    for graph in graphs:
        specs = [*graph.inputs, *graph.outputs] if graph.role == "tower" else (
            graph.outputs if graph.role == "adapter_routing" else [])
        for spec in specs:
            if all(isinstance(d, int) for d in spec.shape):
                total += int(np.prod(spec.shape)) * np.dtype(spec.dtype).itemsize
    return total
