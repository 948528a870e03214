"""Faults (issue 6): an exception inside the engine thread surfaces as Status ERROR and takes
the node out of Active through ErrorProcessing; ~/reset or a lifecycle cycle recovers without
restarting the process; Ask during model loading gets "not ready"; a camera gap shows on
Status; SIGTERM during generation shuts down cleanly within 2 s; a context budget too small
fails configure clearly."""
import signal
import threading
import time

import numpy as np
import pytest

from .ros_helpers import assistant_in_process as _node
from .ros_helpers import spin_until, start_node, stop
from .ros_helpers import teardown_assistant as _teardown

rclpy = pytest.importorskip('rclpy')
pytestmark = pytest.mark.ros


def _feed(node, n=1, start=0):
    from sensor_msgs.msg import Image
    for i in range(start, start + n):
        img = np.full((24, 32, 3), i % 255, np.uint8)
        msg = Image(height=24, width=32, encoding='rgb8', step=96, data=img.tobytes())
        msg.header.stamp.sec, msg.header.frame_id = 100 + i, 'cam'
        node._on_image(msg)


def test_engine_exception_then_reset_and_lifecycle_cycle_recover(ros_context, tiny_checkpoint):
    from lifecycle_msgs.msg import State
    from rclpy.lifecycle import TransitionCallbackReturn

    from mossv_ros.msg import Status
    from mossv_ros.srv import Ask, Reset
    node, executor = _node(ros_context, tiny_checkpoint)
    probe = rclpy.create_node('fault_probe', context=ros_context)
    status = []
    probe.create_subscription(Status, '/mossv_assistant/status', status.append, 100)
    ask = probe.create_client(Ask, '/mossv_assistant/ask')
    reset = probe.create_client(Reset, '/mossv_assistant/reset')

    def call(client, req):
        fut = client.call_async(req)
        assert spin_until(probe, fut.done, 10)
        return fut.result()

    def break_engine():
        real = node.engine.runner.feed

        def boom(*a, **k):
            node.engine.runner.feed = real  # fail once
            raise RuntimeError('simulated CUDA fault')
        node.engine.runner.feed = boom
        _feed(node, 1, start=len(status) + 1000)
        assert spin_until(probe, lambda: status and status[-1].state == Status.STATE_ERROR, 10)
        assert 'simulated CUDA fault' in status[-1].last_error
        # the lifecycle went Active -> ErrorProcessing -> Unconfigured
        assert spin_until(probe, lambda: node._state_machine.current_state[0] ==
                          State.PRIMARY_STATE_UNCONFIGURED, 10)

    try:
        assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS
        assert node.trigger_activate() == TransitionCallbackReturn.SUCCESS
        assert ask.wait_for_service(timeout_sec=10) and reset.wait_for_service(timeout_sec=10)
        break_engine()
        res = call(ask, Ask.Request(prompt='still there?'))
        assert not res.accepted and 'error' in res.message
        assert call(reset, Reset.Request()).success
        assert spin_until(probe, lambda: status[-1].state == Status.STATE_READY, 10)
        assert call(ask, Ask.Request(prompt='back?')).accepted
        assert node._state_machine.current_state[0] == State.PRIMARY_STATE_ACTIVE
        break_engine()  # again, now recovered by a lifecycle cycle (no model reload)
        engine = node.engine
        assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS
        assert node.trigger_activate() == TransitionCallbackReturn.SUCCESS
        assert node.engine is engine
        assert node._state_machine.current_state[0] == State.PRIMARY_STATE_ACTIVE
        assert spin_until(probe, lambda: status[-1].state == Status.STATE_READY, 10)
        assert ask.wait_for_service(timeout_sec=10)
        assert call(ask, Ask.Request(prompt='and again?')).accepted
    finally:
        _teardown(executor, node, probe)


def test_ask_while_loading_says_not_ready(ros_context, tiny_checkpoint):
    """~/ask exists in every lifecycle state: before configure it says the node is not
    active, during the model load it says the model is loading, then it accepts."""
    from rclpy.lifecycle import TransitionCallbackReturn
    from rclpy.parameter import Parameter

    from mossv_ros.ros.executor import MultiThreadedExecutor
    from mossv_ros.ros.node import AssistantNode
    from mossv_ros.srv import Ask

    gate, loading = threading.Event(), threading.Event()

    def slow_load(done, total):
        loading.set()
        gate.wait(20)

    node = AssistantNode(context=ros_context, load_progress=slow_load, parameter_overrides=[
        Parameter('model.path', value=str(tiny_checkpoint)),
        Parameter('engine.device', value='cpu'), Parameter('engine.dtype', value='float32')])
    executor = MultiThreadedExecutor(num_threads=4, context=ros_context)
    executor.add_node(node)
    threading.Thread(target=executor.spin, daemon=True).start()
    probe = rclpy.create_node('loading_probe', context=ros_context)
    ask = probe.create_client(Ask, '/mossv_assistant/ask')
    from mossv_ros.msg import Status
    status = []
    probe.create_subscription(Status, '/mossv_assistant/status', status.append, 100)

    def call(prompt):
        fut = ask.call_async(Ask.Request(prompt=prompt))
        assert spin_until(probe, fut.done, 10)
        return fut.result()

    result = {}
    try:
        assert ask.wait_for_service(timeout_sec=10)
        res = call('hello?')
        assert not res.accepted and 'not ready' in res.message and 'unconfigured' in res.message
        up = threading.Thread(target=lambda: result.update(
            c=node.trigger_configure(), a=node.trigger_activate()))
        up.start()
        assert loading.wait(20)
        res = call('hello?')
        assert not res.accepted and res.message == 'not ready: the model is loading'
        # Status says LOADING (it said UNLOADED, model 'none', for the whole load: item 12)
        assert spin_until(probe, lambda: any(s.state == Status.STATE_LOADING for s in status),
                          10), [s.state_text for s in status]
        loading_msg = [s for s in status if s.state == Status.STATE_LOADING][0]
        assert loading_msg.model_name == tiny_checkpoint.name
        gate.set()
        up.join(30)
        assert result == {'c': TransitionCallbackReturn.SUCCESS,
                          'a': TransitionCallbackReturn.SUCCESS}
        assert call('hello?').accepted
    finally:
        gate.set()
        _teardown(executor, node, probe)


def test_camera_gap_shows_on_status_and_resets(ros_context, tiny_checkpoint):
    from rclpy.lifecycle import TransitionCallbackReturn

    from mossv_ros.msg import Status
    node, executor = _node(ros_context, tiny_checkpoint, **{'frames.reset_after_gap_sec': 10.0})
    probe = rclpy.create_node('gap_probe', context=ros_context)
    status = []
    probe.create_subscription(Status, '/mossv_assistant/status', status.append, 100)
    try:
        assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS
        assert node.trigger_activate() == TransitionCallbackReturn.SUCCESS
        _feed(node, 3, start=0)  # stamps 100, 101, 102 s
        assert node.engine.wait_idle(10)
        # the camera is silent: Status reports the time since the newest image (node clock)
        assert spin_until(probe, lambda: status and status[-1].frame_gap_sec > 1e6, 10)
        _feed(node, 2, start=30)  # stamps 130, 131 s: a 28 s gap
        assert spin_until(probe, lambda: status and status[-1].num_session_resets == 1, 10)
        assert status[-1].longest_frame_gap_sec == pytest.approx(28.0)
        spin_until(probe, lambda: status[-1].num_frames_cached == 2, 10)
        assert status[-1].num_frames_cached == 2, (status[-1], node.engine.stats())
    finally:
        _teardown(executor, node, probe)


def test_context_budget_too_small_fails_configure_clearly(ros_context, tiny_checkpoint):
    from rclpy.lifecycle import TransitionCallbackReturn
    node, executor = _node(ros_context, tiny_checkpoint, **{'cache.max_context_tokens': 256})
    try:
        assert node.trigger_configure() == TransitionCallbackReturn.FAILURE
        assert node.engine is None or node.engine.state == 'error'
    finally:
        executor.shutdown(timeout_sec=1.0)
        node._stop_engine()
        node.destroy_node()


def test_sigterm_during_generation_exits_cleanly_within_2s(ros_context, tiny_checkpoint):
    from mossv_ros.msg import Question, Status, Token
    proc = start_node('--model', str(tiny_checkpoint), '--device', 'cpu', '--ros-args',
                      '-p', 'sampling.max_new_tokens:=100000')
    node = rclpy.create_node('sigterm_probe', context=ros_context)
    tokens, status = [], []
    node.create_subscription(Token, '/mossv_assistant/tokens', tokens.append, 100)
    node.create_subscription(Status, '/mossv_assistant/status', status.append, 10)
    pub = node.create_publisher(Question, '/mossv_assistant/question', 10)
    try:
        # ~/question exists in every lifecycle state: wait until the model is ready (a
        # question before that is rejected with "not ready")
        assert spin_until(node, lambda: pub.get_subscription_count() and any(
            s.state_text == 'ready' for s in status), 30)
        time.sleep(1.0)
        pub.publish(Question(request_id='long', text='Talk for a long time.'))
        assert spin_until(node, lambda: any(t.request_id == 'long' for t in tokens), 30)
    finally:
        code, took, out = stop(proc, sig=signal.SIGTERM)
    assert code == 0, out
    assert 'Traceback' not in out, out
