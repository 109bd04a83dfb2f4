"""ROS 2 messages <-> MoVA: camera messages to RGB frames, header stamps, answer payloads.

Every function here takes a message by its fields only (`msg.encoding`, `msg.data`, `msg.header.stamp.sec`...), so
the same code reads rosbags' dataclasses (replay, the tests) and rclpy's generated classes (the node): `data` is a
numpy uint8 array in one and a bytes-like sequence in the other; both go through np.frombuffer / np.asarray.
Written here because no library converts sensor_msgs/Image without ROS itself (cv_bridge needs a ROS install).
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image as PILImage
from PIL import UnidentifiedImageError

IMAGE_TYPE = "sensor_msgs/msg/Image"
COMPRESSED_TYPE = "sensor_msgs/msg/CompressedImage"
STRING_TYPE = "std_msgs/msg/String"
IMAGE_TYPES = (IMAGE_TYPE, COMPRESSED_TYPE)
ANSWER_TOPIC = "/mova/answer"
# encoding -> (channels, how to get RGB from the channels)
ENCODINGS = {"rgb8": (3, slice(0, 3)), "bgr8": (3, slice(2, None, -1)), "rgba8": (4, slice(0, 3)),
             "bgra8": (4, slice(2, None, -1)), "mono8": (1, None)}


class Skipped(Exception):
    """A camera message MoVA cannot read, with the one-line reason (counted and reported, never fatal)."""


@dataclass(frozen=True)
class Frame:
    """A decoded camera message: RGB pixels and where and when they were taken."""
    rgb: np.ndarray
    stamp_ns: int
    frame_id: str
    received_ns: int = 0                    # when it arrived (a bag's receive time, the node's clock)

    @property
    def stamp(self) -> dict[str, int]:
        return {"sec": self.stamp_ns // 10**9, "nanosec": self.stamp_ns % 10**9}


def stamp_ns(msg: Any) -> int:
    stamp = msg.header.stamp
    return int(stamp.sec) * 10**9 + int(stamp.nanosec)


def _bytes(data: Any) -> np.ndarray:
    if isinstance(data, np.ndarray):
        return data.reshape(-1).view(np.uint8)
    return np.frombuffer(bytes(data), np.uint8)


def rgb_from_image(msg: Any) -> np.ndarray:
    """sensor_msgs/Image in rgb8, bgr8, rgba8, bgra8 or mono8 -> HxWx3 uint8 RGB (row padding in `step` dropped).
    Raises Skipped for other encodings (16UC1 depth, bayer_*, 32FC1...) and for data that does not fit the shape."""
    encoding = str(msg.encoding)
    if encoding not in ENCODINGS:
        raise Skipped(f"encoding {encoding!r} is not a color or gray image MoVA reads (it reads "
                      f"{', '.join(ENCODINGS)})")
    channels, order = ENCODINGS[encoding]
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    data = _bytes(msg.data)
    if height < 1 or width < 1 or step < width * channels or data.size < height * step:
        raise Skipped(f"{encoding} image {width}x{height} with step {step} does not fit its {data.size} data bytes")
    rows = data[:height * step].reshape(height, step)[:, :width * channels].reshape(height, width, channels)
    rgb = np.repeat(rows, 3, axis=2) if order is None else rows[:, :, order]
    return np.ascontiguousarray(rgb)


def rgb_from_compressed(msg: Any) -> np.ndarray:
    """sensor_msgs/CompressedImage (jpeg, png; `format` may read "rgb8; jpeg compressed bgr8") -> HxWx3 RGB."""
    fmt = str(msg.format).lower()
    if not any(kind in fmt for kind in ("jpeg", "jpg", "png")) and fmt:
        raise Skipped(f"compressed format {msg.format!r} is not jpeg or png")
    try:
        with PILImage.open(io.BytesIO(_bytes(msg.data).tobytes())) as image:
            return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise Skipped(f"compressed image ({msg.format or 'no format'}) does not decode: "
                      f"{type(exc).__name__}") from None


def frame_from_message(msg: Any, msgtype: str, received_ns: int = 0) -> Frame:
    """A camera message of either type -> Frame; Skipped (with the reason) for what MoVA cannot read."""
    if msgtype == IMAGE_TYPE:
        rgb = rgb_from_image(msg)
    elif msgtype == COMPRESSED_TYPE:
        rgb = rgb_from_compressed(msg)
    else:
        raise Skipped(f"{msgtype} is not an image message ({' or '.join(IMAGE_TYPES)})")
    if min(rgb.shape[:2]) < 2:
        raise Skipped(f"image of {rgb.shape[1]}x{rgb.shape[0]} pixels is too small")
    return Frame(rgb, stamp_ns(msg), str(msg.header.frame_id), received_ns)


def answer_payload(frame: Frame, question: str, answer: Any, topic: str = "") -> str:
    """The JSON an answer message carries (std_msgs/String.data): the source frame's stamp and frame_id, the image
    topic, the question, the answer, its experts, whether it was cut and its timings (ms)."""
    return json.dumps({"stamp": frame.stamp, "frame_id": frame.frame_id, "image_topic": topic,
                       "question": question, "answer": answer.text, "experts": answer.experts,
                       "cut": answer.cut, "cache_hits": answer.cache_hits,
                       "timings_ms": {k: round(v, 3) for k, v in answer.timings_ms.items()}}, sort_keys=True)
