"""The ROS 2 node: `python3 -m mova_export.ros2 --ros-args -p bundle:=/path/to/bundle -p image_topic:=/camera/image_raw`.

rclpy and the message packages come from a ROS 2 install (apt: ros-<distro>-rclpy, sensor_msgs, std_msgs, sourced
`setup.bash`), never from pip, and are imported only in node.py. This node is a thin shell: every decision (message
-> frame, stamps, pacing, the latest-frame policy, answer payloads) is mova_export.robot's, which `mova-export replay`
runs and the tests check on real ROS 2 messages written by rosbags. Not run here (no ROS 2 on the CI machines).
"""
