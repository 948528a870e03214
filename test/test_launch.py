"""launch_pytest test of assistant.launch.py: runs where a ROS 2 distro provides `launch`.

Without a distro (PyPI wheels only) the launch packages do not exist; the same scenario is
covered by test_ros.py, which starts the node with ``mossv-ros run`` in another process.
"""
from pathlib import Path

import pytest

launch_pytest = pytest.importorskip(
    'launch_pytest', reason='launch/launch_pytest need a ROS 2 distro (not on PyPI)')
pytestmark = pytest.mark.launch

LAUNCH_FILE = Path(__file__).resolve().parents[1] / 'launch' / 'assistant.launch.py'


@launch_pytest.fixture
def launch_description():
    from launch.actions import IncludeLaunchDescription
    from launch.launch_description_sources import PythonLaunchDescriptionSource

    from launch import LaunchDescription
    return LaunchDescription([
        IncludeLaunchDescription(PythonLaunchDescriptionSource(str(LAUNCH_FILE)),
                                 launch_arguments={'device': 'cpu'}.items()),
        launch_pytest.actions.ReadyToTest()])


@pytest.mark.launch(fixture=launch_description)
def test_launch_starts_node_with_status():
    import rclpy

    from mossv_ros.msg import Status
    rclpy.init()
    node = rclpy.create_node('launch_probe')
    got = []
    node.create_subscription(Status, '/mossv_assistant/status', got.append, 10)
    for _ in range(300):
        rclpy.spin_once(node, timeout_sec=0.1)
        if got:
            break
    rclpy.shutdown()
    assert got and got[0].state_text == 'unloaded'
