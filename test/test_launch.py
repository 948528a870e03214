"""``ros2 launch mossv_ros assistant.launch.py`` for real: launch_pytest and the ``ros2`` CLI.

Runs against the shipped toyworld model on the CPU, with the launch system and ``ros2`` CLI
that scripts/setup_env.sh installs from ../shared/ros2. Without them these tests skip with
the reason (test_ros.py covers the node through ``mossv-ros run``).
"""
from pathlib import Path

import pytest

from .ros2_tools import (
    BIN,
    interrupt,
    kill_group,
    missing_ros2_tools,
    processes_mentioning,
    ros2,
    ros2_retry,
    start,
    wait_log,
)
from .ros_helpers import spin_until

# launch_pytest waits for its launch description without a bound: a launch that fails
# early would hang the test until the global timeout (600 s).
pytestmark = pytest.mark.timeout(240)
MISSING = missing_ros2_tools()
needs_tools = pytest.mark.skipif(bool(MISSING), reason=MISSING)
LAUNCH_FILE = Path(__file__).resolve().parents[1] / 'launch' / 'assistant.launch.py'


def toyworld_dir() -> str:
    from mossv_ros.toyworld import shipped_model_dir
    return str(shipped_model_dir())


def write_params(path: Path, **params) -> Path:
    """A params file setting only ``params`` (dotted names), for the node name wildcard."""
    import yaml
    nested = {}
    for name, value in params.items():
        group, key = name.split('.', 1)
        nested.setdefault(group, {})[key] = value
    path.write_text(yaml.safe_dump({'/**': {'ros__parameters': nested}}))
    return path


def test_skip_guard_names_a_missing_executable(tmp_path):
    """Defect 6: with launch installed but no executable, the tests must skip with the reason
    instead of waiting for a node that never starts (it hung for the 600 s timeout)."""
    index = tmp_path / 'share' / 'ament_index' / 'resource_index' / 'packages'
    index.mkdir(parents=True)
    (index / 'mossv_ros').write_text('')
    reason = missing_ros2_tools(prefix=tmp_path)
    if MISSING:  # the tools themselves are missing: that is named first
        assert reason == MISSING
    else:
        assert 'lib/mossv_ros/assistant_node' in reason and 'not installed' in reason
        assert missing_ros2_tools() == ''


# ---------------------------------------------------------------------- launch_pytest
if not MISSING:
    import launch_pytest

    @pytest.fixture(scope='module')
    def launch_params(tmp_path_factory):
        # rounds close after 2 silent frames so an Ask ends quickly
        return write_params(tmp_path_factory.mktemp('launch') / 'fast_rounds.yaml',
                            **{'round.close_after_frames': 2})

    @launch_pytest.fixture(scope='module')
    def launched(launch_params):
        from launch.actions import IncludeLaunchDescription
        from launch.launch_description_sources import PythonLaunchDescriptionSource

        from launch import LaunchDescription
        args = {'namespace': 'robot1', 'image_topic': '/cam/front', 'device': 'cpu',
                'model_path': toyworld_dir(), 'params_file': str(launch_params)}
        return LaunchDescription([
            IncludeLaunchDescription(PythonLaunchDescriptionSource(str(LAUNCH_FILE)),
                                     launch_arguments=args.items()),
            launch_pytest.actions.ReadyToTest()])

    @needs_tools
    @pytest.mark.launch(fixture=launched)
    def test_launch_arguments_namespace_topic_model_device(ros_context):
        """Status under the namespace reaches READY with the toyworld model; the node listens
        on the remapped camera topic; a question asked by Ask ends in one final Answer."""
        import numpy as np
        import rclpy
        from sensor_msgs.msg import Image

        from mossv_ros.msg import Answer, Status
        from mossv_ros.srv import Ask
        node = rclpy.create_node('launch_probe', context=ros_context)
        status, answers = [], []
        node.create_subscription(Status, '/robot1/mossv_assistant/status', status.append, 10)
        node.create_subscription(Answer, '/robot1/mossv_assistant/answer', answers.append, 10)
        assert spin_until(node, lambda: any(s.state_text == 'ready' for s in status), 60), \
            [s.state_text for s in status]
        assert status[-1].model_name == 'toyworld'
        # each argument did what it says: device and model_path override, params_file applies
        from rcl_interfaces.srv import GetParameters
        get = node.create_client(GetParameters, '/robot1/mossv_assistant/get_parameters')
        assert get.wait_for_service(timeout_sec=30)
        fut = get.call_async(GetParameters.Request(
            names=['engine.device', 'model.path', 'round.close_after_frames']))
        assert spin_until(node, fut.done, 15)
        device, model, close = fut.result().values
        assert (device.string_value, model.string_value, close.integer_value) == (
            'cpu', toyworld_dir(), 2)
        cam = node.create_publisher(Image, '/cam/front', 10)
        assert spin_until(node, cam.get_subscription_count, 30), 'not listening on /cam/front'
        client = node.create_client(Ask, '/robot1/mossv_assistant/ask')
        assert client.wait_for_service(timeout_sec=30)
        future = client.call_async(Ask.Request(prompt='How many shapes are there?',
                                               request_id='launch-1'))
        assert spin_until(node, future.done, 15)
        response = future.result()
        assert response.accepted, response.message
        grey = np.full((112, 112, 3), 128, np.uint8).tobytes()
        for i in range(20):  # one frame per second of stamp time, sent quickly
            msg = Image(height=112, width=112, encoding='rgb8', step=336, data=grey)
            msg.header.stamp.sec, msg.header.frame_id = 1000 + i, 'front'
            cam.publish(msg)
            if spin_until(node, lambda: any(a.is_final for a in answers), 0.3):
                break
        final = [a for a in answers if a.is_final and a.round_id == response.round_id]
        assert len(final) == 1, [(a.round_id, a.is_final, a.end_reason) for a in answers]
        assert final[0].request_id == 'launch-1' and final[0].header.frame_id == 'front'
        node.destroy_node()


# ---------------------------------------------------------------------- ros2 launch (CLI)
@needs_tools
def test_ros2_launch_params_file_alone_then_sigint(tmp_path):
    """Defects 2 and 3: a params file alone sets model.path and engine.device (the launch
    arguments' defaults no longer override it), and device cpu runs float32, the one rule.
    SIGINT to ``ros2 launch`` exits 0 within 5 s and leaves no process behind."""
    params = write_params(tmp_path / 'my.yaml', **{'model.path': toyworld_dir(),
                                                    'engine.device': 'cpu'})
    log = tmp_path / 'launch.log'
    proc = start([str(BIN / 'ros2'), 'launch', 'mossv_ros',
                  'assistant.launch.py', f'params_file:={params}'], log=log)
    try:
        out = wait_log(log, 'model ready', 60, proc)
        assert 'float32 on cpu' in out, out
        assert 'bfloat16' not in out, out
        got = ros2_retry('param', 'get', '/mossv_assistant', 'model.path',
                         until=lambda o: 'String value is' in o)
        assert toyworld_dir() in got
        got = ros2_retry('param', 'get', '/mossv_assistant', 'engine.device',
                         until=lambda o: 'value is' in o)
        assert 'String value is: cpu' in got, got
        assert processes_mentioning(str(params)), 'the node process is not running'
        code, _ = interrupt(proc, timeout=10)
    finally:
        kill_group(proc)
    out = log.read_text()
    assert code == 0, out  # (the time to exit: bench/bench_shutdown.py)
    assert 'process has finished cleanly' in out, out
    assert processes_mentioning(str(params)) == [], 'processes left behind'


@needs_tools
def test_ros2_launch_two_cameras_as_the_readme_shows(tmp_path):
    """The README's two-camera launch: the packaged config/two_cameras.yaml found through
    ``ros2 pkg prefix``, the model and device as launch arguments; the node subscribes one
    topic per camera and reports each camera in Status."""
    prefix = ros2('pkg', 'prefix', 'mossv_ros').stdout.strip()
    params = Path(prefix) / 'share' / 'mossv_ros' / 'config' / 'two_cameras.yaml'
    assert params.is_file(), params
    log = tmp_path / 'launch.log'
    proc = start([str(BIN / 'ros2'), 'launch', 'mossv_ros', 'assistant.launch.py',
                  f'model_path:={toyworld_dir()}', 'device:=cpu', f'params_file:={params}'],
                 log=log)
    try:
        out = wait_log(log, 'active: listening on', 90, proc)
        assert '/head/image' in out and '/wrist/image' in out, out
        got = ros2_retry('param', 'get', '/mossv_assistant', 'cameras.names',
                         until=lambda o: 'values are' in o)
        assert 'head' in got and 'wrist' in got, got
        status = ros2_retry('topic', 'echo', '--once', '/mossv_assistant/status',
                            until=lambda o: 'name: wrist' in o)
        assert 'name: head' in status, status
        code, _ = interrupt(proc, timeout=10)
    finally:
        kill_group(proc)
    assert code == 0, log.read_text()
