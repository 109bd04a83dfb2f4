"""MoVANode: rclpy glue around mova_export.robot.RobotLoop. Needs a ROS 2 install (rclpy, sensor_msgs, std_msgs);
written against rclpy's Humble/Jazzy API and not run here: no ROS 2 on the machines this project is tested on.

Parameters (all optional but `bundle`):
  bundle          the bundle folder
  image_topic     sensor_msgs/Image topic, or CompressedImage when it ends in /compressed or `compressed` is true
  questions       standing questions asked of every answered frame (string array)
  question_topic  std_msgs/String: a one-shot question about the newest frame (default /mova/question)
  answer_topic    std_msgs/String with the answer's JSON (default /mova/answer)
  rate_hz         answer at most this many frames a second by header stamps (0: no limit)
  every           answer every N-th frame (1: each)
  policy          latest (a newer frame replaces one still waiting) or queue
  max_new_tokens, device (cuda | cpu), backend (auto | onnxruntime | tensorrt), trusted_key (a public key PEM:
  refuse a bundle not signed by it)
"""
from __future__ import annotations

from typing import Any

import rclpy
from rclpy.node import Node
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import String

from ..robot.loop import Pacer, RobotLoop
from ..robot.messages import ANSWER_TOPIC, COMPRESSED_TYPE, IMAGE_TYPE
from ..runtime import MoVARuntime


class MoVANode(Node):
    def __init__(self) -> None:
        super().__init__("mova")
        p = {name: self.declare_parameter(name, default).value for name, default in (
            ("bundle", ""), ("image_topic", "/camera/image_raw"), ("compressed", False),
            ("questions", ["Describe the scene in this image."]), ("question_topic", "/mova/question"),
            ("answer_topic", ANSWER_TOPIC), ("rate_hz", 0.0), ("every", 1), ("policy", "latest"),
            ("max_new_tokens", 64), ("device", "cuda"), ("backend", "auto"), ("trusted_key", ""))}
        if not p["bundle"]:
            raise SystemExit("mova: set the bundle parameter (--ros-args -p bundle:=/path/to/bundle)")
        options: dict[str, Any] = {"device": p["device"], "backend": p["backend"]}
        if p["trusted_key"]:
            options["trusted_key"] = p["trusted_key"]
        self.runtime = MoVARuntime.from_bundle(p["bundle"], **options)
        self.runtime.warmup()
        self.publisher = self.create_publisher(String, p["answer_topic"], 10)
        pacer = Pacer(p["every"] if p["every"] > 1 else None, p["rate_hz"] if p["rate_hz"] > 0 else None)
        self.loop = RobotLoop(self.runtime, list(p["questions"]), self._publish, pacer=pacer, policy=p["policy"],
                              max_new_tokens=p["max_new_tokens"], image_topic=p["image_topic"])
        compressed = p["compressed"] or p["image_topic"].rstrip("/").endswith("/compressed")
        msg_class, msgtype = (CompressedImage, COMPRESSED_TYPE) if compressed else (Image, IMAGE_TYPE)
        self.create_subscription(msg_class, p["image_topic"], lambda msg: self.loop.on_image(
            msg, msgtype, self.get_clock().now().nanoseconds), qos_profile_sensor_data)
        self.create_subscription(String, p["question_topic"], lambda msg: self.loop.on_question(msg.data), 10)
        self.get_logger().info(f"MoVA on {p['image_topic']} -> {p['answer_topic']} ({p['policy']} policy)")

    def _publish(self, payload: str, frame: Any, answer: Any) -> None:
        self.publisher.publish(String(data=payload))   # from the runtime's worker thread: rclpy's publish is safe

    def destroy_node(self) -> None:
        self.get_logger().info(f"MoVA: {self.loop.counts()}")
        self.runtime.close()
        super().destroy_node()


def main(args: list[str] | None = None) -> None:
    rclpy.init(args=args)
    node = MoVANode()
    try:
        rclpy.spin(node)
    except KeyboardInterrupt:
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
