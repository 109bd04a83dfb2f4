"""MoVA in a robot's world, without ROS installed: ROS 2 camera messages to frames, a frame loop with pacing and the
latest-frame policy (shared by the ROS 2 node in mova_export.ros2 and `mova-export replay`), and bag replay.

messages.py  sensor_msgs/Image and CompressedImage -> RGB frames, stamps, answer payloads (std_msgs/String JSON)
loop.py      Pacer (every N / at most HZ) and RobotLoop (frames in, answers out through MoVARuntime.submit)
replay.py    `mova-export replay`: a ROS 2 bag (MCAP or sqlite3, read with rosbags) through RobotLoop
Torch-free like the runtime; replay needs the `ros` extra (rosbags).
"""
from .loop import Pacer, RobotLoop
from .messages import ANSWER_TOPIC, Frame, Skipped, answer_payload, frame_from_message

__all__ = ["ANSWER_TOPIC", "Frame", "Pacer", "RobotLoop", "Skipped", "answer_payload", "frame_from_message"]
