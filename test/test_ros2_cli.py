"""The ``ros2`` command line against the node, as a robot team uses it.

``ros2 run mossv_ros assistant_node`` (from a shell whose PATH does not have the venv), then
``ros2 topic echo``, ``ros2 service call``, ``ros2 param get/set``, ``ros2 lifecycle get/set``
and ``ros2 interface show``, each checked on its output. Skips with the reason where the
``ros2`` CLI is not installed (see scripts/setup_env.sh).
"""
import statistics
import time

import pytest

from .ros2_tools import (
    BIN,
    interrupt,
    kill_group,
    missing_ros2_tools,
    ros2,
    ros2_env,
    ros2_retry,
    ros2_transition,
    start,
    wait_log,
)
from .ros_helpers import spin_until

MISSING = missing_ros2_tools()
pytestmark = [pytest.mark.skipif(bool(MISSING), reason=MISSING), pytest.mark.timeout(300)]
NODE = '/mossv_assistant'


def _cli_service_call_works() -> bool:
    """The ros2cli wheels of ../shared/ros2 are the Kilted line, whose ``ros2 service call``
    uses ``with rclpy.init()``: rclpy 7 (Jazzy) has no such context manager. A Jazzy robot's
    own ros2cli (0.32) does not use it; here, on Jazzy, the call is made with an rclpy client.
    """
    import rclpy
    return hasattr(rclpy, 'InitContextManager')


CLI_SERVICE_CALL = _cli_service_call_works()


def call_ask(prompt: str, ros_context) -> tuple:
    """``ros2 service call <node>/ask`` (an rclpy client where that verb cannot run).

    :returns: (accepted, message).
    """
    if CLI_SERVICE_CALL:
        out = ros2_retry('service', 'call', f'{NODE}/ask', 'mossv_ros/srv/Ask',
                         f"{{prompt: '{prompt}'}}", until=lambda o: 'response:' in o)
        return 'accepted=True' in out, out
    import rclpy

    from mossv_ros.srv import Ask
    node = rclpy.create_node('ask_probe', context=ros_context)
    try:
        client = node.create_client(Ask, f'{NODE}/ask')
        assert client.wait_for_service(timeout_sec=30)
        future = client.call_async(Ask.Request(prompt=prompt))
        assert spin_until(node, future.done, 15)
        return future.result().accepted, future.result().message
    finally:
        node.destroy_node()


@pytest.fixture(scope='module')
def cli_node(tmp_path_factory):
    """``ros2 run`` from a PATH without the venv (defect 4: the installed executable named
    ``/usr/bin/env python3`` and died with "No module named 'mossv_ros'")."""
    from mossv_ros.toyworld import shipped_model_dir
    log = tmp_path_factory.mktemp('cli') / 'node.log'
    env = ros2_env(PATH='/usr/local/bin:/usr/bin:/bin')
    proc = start([str(BIN / 'ros2'), 'run', 'mossv_ros', 'assistant_node', '--ros-args',
                  '-p', f'model.path:={shipped_model_dir()}', '-p', 'engine.device:=cpu'],
                 env=env, log=log)
    try:
        wait_log(log, 'active: listening', 60, proc)
        yield proc, log
    finally:
        code, took = interrupt(proc, timeout=10)
        kill_group(proc)
        assert code == 0, log.read_text()


def test_topic_echo_and_interface_show(cli_node):
    out = ros2_retry('topic', 'echo', '--once', f'{NODE}/status',
                     until=lambda o: 'state_text: ready' in o)
    assert 'model_name: toyworld' in out
    out = ros2('interface', 'show', 'mossv_ros/msg/Answer').stdout
    assert 'bool is_final' in out and 'string end_reason' in out and 'int32 revision' in out


@pytest.mark.skipif(not CLI_SERVICE_CALL, reason='the Kilted-line ros2cli wheels cannot '
                    'run `ros2 service call` on rclpy 7 (Jazzy): see _cli_service_call_works')
def test_service_call_ask(cli_node):
    out = ros2_retry('service', 'call', f'{NODE}/ask', 'mossv_ros/srv/Ask',
                     "{prompt: 'How many shapes are there?', request_id: cli-1}",
                     until=lambda o: 'response:' in o)
    assert 'accepted=True' in out and 'accepted as round' in out, out


def _status_period(ros_context, seconds: float) -> float:
    """Median seconds between Status messages received over ``seconds``."""
    import rclpy

    from mossv_ros.msg import Status
    node = rclpy.create_node('period_probe', context=ros_context)
    stamps = []
    node.create_subscription(Status, f'{NODE}/status', lambda m: stamps.append(
        time.monotonic()), 10)
    spin_until(node, lambda: len(stamps) >= 2, 20)
    spin_until(node, lambda: False, seconds)
    node.destroy_node()
    assert len(stamps) >= 3, stamps
    return statistics.median(b - a for a, b in zip(stamps, stamps[1:]))


def test_param_set_live_and_rejected(cli_node, ros_context):
    """Defect 5: ``ros2 param set`` said "successful" and nothing happened."""
    _, log = cli_node
    assert 'Double value is: 1.0' in ros2_retry(
        'param', 'get', NODE, 'status.period_sec', until=lambda o: 'value is' in o)
    assert _status_period(ros_context, 2.5) > 0.7
    out = ros2_retry('param', 'set', NODE, 'status.period_sec', '0.25',
                     until=lambda o: 'parameter' in o)
    assert 'Set parameter successful' in out, out
    assert _status_period(ros_context, 2.0) < 0.4  # applied live
    out = ros2_retry('param', 'set', NODE, 'sampling.temperature', '0.5',
                     until=lambda o: 'parameter' in o)
    assert 'Set parameter successful' in out, out
    wait_log(log, 'parameters applied: sampling.temperature', 10)
    for name, value, reason in [
            ('engine.device', 'banana', 'cannot change while the node is active'),
            ('sampling.top_p', '5.0', 'sampling.top_p=5.0 is invalid'),
            ('status.period_sec', '0.0', 'status.period_sec=0.0 is invalid'),
            ('frames.rate_hz', '-1.0', 'frames.rate_hz=-1.0 is invalid')]:
        out = ros2_retry('param', 'set', NODE, name, value, until=lambda o: 'parameter' in o)
        assert 'Setting parameter failed' in out and reason in out, out
    assert 'String value is: cpu' in ros2_retry('param', 'get', NODE, 'engine.device',
                                                until=lambda o: 'value is' in o)


def test_lifecycle_deactivate_activate(cli_node, ros_context):
    """Every ros2 call bounded; a transition whose response the CLI loses is checked with the
    test's own client before anything is sent again (ros2_tools.ros2_transition: a CI run
    once hung 60 s in ``ros2 lifecycle set ... deactivate``)."""
    assert 'active [3]' in ros2_retry('lifecycle', 'get', NODE, until=lambda o: '[' in o)
    ros2_transition(NODE, 'deactivate', 'inactive', ros_context)
    assert 'inactive [2]' in ros2_retry('lifecycle', 'get', NODE, until=lambda o: '[' in o)
    out = ros2_retry('param', 'set', NODE, 'cache.max_frames', '8',
                     until=lambda o: 'parameter' in o)
    assert 'cannot change while the node is inactive' in out, out
    accepted, out = call_ask('hi', ros_context)
    assert not accepted and 'not ready: the node is inactive' in out, out
    ros2_transition(NODE, 'activate', 'active', ros_context)
    assert 'active [3]' in ros2_retry('lifecycle', 'get', NODE, until=lambda o: '[' in o)
    accepted, out = call_ask('hi', ros_context)
    assert accepted, out
