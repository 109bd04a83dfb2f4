"""What every vision tower's spec has in common, declared once: the checkpoint prefix of its vision_tower_<i>, the
features output [1, grid^2, C] with C from its architecture, and for a pixel tower its pixel_values input and a
smooth random picture as its seeded sample."""
from __future__ import annotations

from typing import Any, Callable, Mapping

from . import ComponentSpec, TensorSpec, arch
from .layers import smooth_image_sample


def pixel_input(side: Callable[[Any], int]) -> Callable[[Any], tuple[TensorSpec, ...]]:
    """A tower that reads one normalised picture: pixel_values [1, 3, side, side]."""
    return lambda cfg: (TensorSpec("pixel_values", (1, 3, side(cfg), side(cfg))),)


def pixel_sample(side: Callable[[Any], int], mean: tuple[float, ...], std: tuple[float, ...]
                 ) -> Callable[[Any, int], dict[str, Any]]:
    return lambda cfg, seed: {"pixel_values": smooth_image_sample(seed, side(cfg), mean, std)}


def tower_spec(name: str, tower: str, out_channels: Callable[[Mapping[str, Any]], int], **fields: Any) -> ComponentSpec:
    """The spec of vision tower `name` stored under model.vision_tower.<tower>.; `fields` are the rest of its
    ComponentSpec (presets, build, inputs, sample_inputs, image_inputs, expert, memory, ...)."""
    return ComponentSpec(name=name, kind="tower", prefix=f"model.vision_tower.{tower}.", out_channels=out_channels,
                         outputs=lambda cfg: (TensorSpec("features", (1, cfg.grid_tokens,
                                                                      out_channels(arch(cfg, name)))),),
                         **fields)
