"""Launch the MoVA node: `ros2 launch docs/ros2/mova.launch.py bundle:=/opt/mova/bundle image_topic:=/camera/image_raw`.

mova-export is a pip package, not a ROS package, so the node runs as a process (`python3 -m mova_export.ros2`) in the
environment where `pip install mova-export[ros]` put it, with ROS 2 sourced. Not run in this project's CI (no ROS 2).
"""
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, ExecuteProcess
from launch.substitutions import LaunchConfiguration


def generate_launch_description():
    args = {"bundle": "/opt/mova/bundle", "image_topic": "/camera/image_raw", "rate_hz": "1.0", "policy": "latest",
            "device": "cuda"}
    return LaunchDescription([
        *(DeclareLaunchArgument(name, default_value=value) for name, value in args.items()),
        ExecuteProcess(
            cmd=["python3", "-m", "mova_export.ros2", "--ros-args",
                 *(x for name in args for x in ("-p", [f"{name}:=", LaunchConfiguration(name)])),
                 "-p", "questions:=['What is ahead?', 'Can the arm grasp the object in front?']"],
            output="screen"),
    ])
