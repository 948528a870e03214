"""Robot-grade interfaces (issue 19): the ``~/answer_question`` action across processes with a
real ActionClient (feedback = the round's Token stream, result = its final Answers, cancel,
rejections with the reason, a burst of 20 goals), ``ros2 action send_goal``, ``/diagnostics``
levels as the situation changes, and ``~/overlay`` (only with a subscriber, the frame's stamp,
the drawn text)."""
import numpy as np
import pytest

from .ros_helpers import spin_until, start_node, stop

rclpy = pytest.importorskip('rclpy')
pytestmark = [pytest.mark.ros, pytest.mark.timeout(300)]
NODE = '/robot/mossv_assistant'


@pytest.fixture(scope='module')
def node_proc(tiny_checkpoint):
    proc = start_node('--model', str(tiny_checkpoint), '--device', 'cpu', '--ros-args',
                      '-r', '__ns:=/robot', '-p', 'sampling.max_new_tokens:=6',
                      '-p', 'round.close_after_sec:=1.0', '-p', 'status.period_sec:=0.2')
    yield proc
    code, _, out = stop(proc)
    assert code == 0 and 'Traceback' not in out, out[-3000:]


@pytest.fixture
def client(node_proc, ros_context):
    from rclpy.action import ActionClient

    from mossv_ros.action import AnswerQuestion
    from mossv_ros.msg import Answer, Status, Token
    node = rclpy.create_node('action_probe', context=ros_context)
    got = {'tokens': [], 'answer': [], 'status': []}
    deep = rclpy.qos.QoSProfile(depth=5000, reliability=rclpy.qos.ReliabilityPolicy.RELIABLE)
    node.create_subscription(Token, f'{NODE}/tokens', got['tokens'].append, deep)
    node.create_subscription(Answer, f'{NODE}/answer', got['answer'].append, deep)
    node.create_subscription(Status, f'{NODE}/status', got['status'].append, 100)
    action = ActionClient(node, AnswerQuestion, f'{NODE}/answer_question')
    assert action.wait_for_server(timeout_sec=60)
    assert spin_until(node, lambda: any(s.state_text == 'ready' for s in got['status']), 60)
    yield node, action, got
    action.destroy()
    node.destroy_node()


def _send(node, action, prompt, request_id='', feedback=None, timeout=30):
    from mossv_ros.action import AnswerQuestion
    fut = action.send_goal_async(AnswerQuestion.Goal(prompt=prompt, request_id=request_id),
                                 feedback_callback=feedback)
    assert spin_until(node, fut.done, 15)
    handle = fut.result()
    assert handle.accepted
    return handle


def _result(node, handle, timeout=30):
    fut = handle.get_result_async()
    assert spin_until(node, fut.done, timeout)
    return fut.result()


def test_action_feedback_is_the_token_stream_and_result_the_answers(client):
    from action_msgs.msg import GoalStatus
    node, action, got = client
    feedback = []
    handle = _send(node, action, 'What do you see?', 'act-1',
                   lambda f: feedback.append(f.feedback))
    res = _result(node, handle)
    assert res.status == GoalStatus.STATUS_SUCCEEDED, res.result.end_reason
    rid = res.result.round_id
    assert rid and feedback and all(f.round_id == rid for f in feedback)
    spin_until(node, lambda: any(a.round_id == rid and a.is_final for a in got['answer']), 5)
    # (the ~/tokens topic is another stream than the action's feedback: its last samples may
    # still be on their way when the result came)
    spin_until(node, lambda: sum(t.round_id == rid for t in got['tokens']) >= len(feedback), 10)
    tokens = [(t.revision, t.token_index, t.text) for t in got['tokens']
              if t.round_id == rid]
    assert [(f.revision, f.token_index, f.token) for f in feedback] == tokens
    answers = {a.revision: a.text for a in got['answer'] if a.round_id == rid}
    assert list(res.result.texts) == [answers[k] for k in sorted(answers)]
    final = [a for a in got['answer'] if a.round_id == rid and a.is_final]
    assert len(final) == 1 and res.result.end_reason == final[0].end_reason
    assert feedback[-1].text == res.result.texts[feedback[-1].revision]


def test_action_cancel_mid_answer(client):
    from action_msgs.msg import GoalStatus
    from rcl_interfaces.msg import Parameter, ParameterType, ParameterValue
    from rcl_interfaces.srv import SetParameters
    node, action, got = client
    params = node.create_client(SetParameters, f'{NODE}/set_parameters')
    assert params.wait_for_service(timeout_sec=15)

    def max_tokens(n):
        fut = params.call_async(SetParameters.Request(parameters=[Parameter(
            name='sampling.max_new_tokens', value=ParameterValue(
                type=ParameterType.PARAMETER_INTEGER, integer_value=n))]))
        assert spin_until(node, fut.done, 15) and fut.result().results[0].successful
    max_tokens(3000)
    try:
        feedback = []
        handle = _send(node, action, 'Tell me a long story.', 'act-cancel',
                       lambda f: feedback.append(f.feedback))
        assert spin_until(node, lambda: len(feedback) >= 3, 20)
        cancel = handle.cancel_goal_async()
        assert spin_until(node, cancel.done, 15)
        res = _result(node, handle)
    finally:
        max_tokens(6)
    assert res.status == GoalStatus.STATUS_CANCELED, (res.status, res.result.end_reason)
    assert res.result.end_reason.startswith('cancelled')
    rid = res.result.round_id
    assert spin_until(node, lambda: any(a.round_id == rid and a.is_final
                                        for a in got['answer']), 10)
    final = [a for a in got['answer'] if a.round_id == rid and a.is_final]
    assert len(final) == 1 and final[0].end_reason.startswith('cancelled'), final


def test_action_rejections_say_why_and_a_burst_of_20_all_end(client):
    from action_msgs.msg import GoalStatus
    from lifecycle_msgs.msg import Transition
    from lifecycle_msgs.srv import ChangeState
    node, action, got = client
    res = _result(node, _send(node, action, '   '))
    assert res.status == GoalStatus.STATUS_ABORTED
    assert res.result.end_reason.startswith('rejected: prompt is empty or whitespace only')
    change = node.create_client(ChangeState, f'{NODE}/change_state')
    assert change.wait_for_service(timeout_sec=15)

    def transition(tid):
        fut = change.call_async(ChangeState.Request(transition=Transition(id=tid)))
        assert spin_until(node, fut.done, 60) and fut.result().success
    transition(Transition.TRANSITION_DEACTIVATE)
    try:
        res = _result(node, _send(node, action, 'hello?'))
    finally:
        transition(Transition.TRANSITION_ACTIVATE)
    assert res.status == GoalStatus.STATUS_ABORTED
    assert 'rejected: not ready: the node is inactive' in res.result.end_reason
    handles = [_send(node, action, f'question {i}?', f'burst-{i}') for i in range(20)]
    results = [_result(node, h, timeout=60) for h in handles]
    statuses = {r.status for r in results}
    assert statuses <= {GoalStatus.STATUS_SUCCEEDED, GoalStatus.STATUS_ABORTED}, statuses
    assert all(r.result.end_reason for r in results)
    assert sum(r.status == GoalStatus.STATUS_SUCCEEDED for r in results) >= 1


def test_ros2_action_send_goal_feedback(client):
    from .ros2_tools import missing_ros2_tools, ros2
    if missing_ros2_tools():
        pytest.skip(missing_ros2_tools())
    out = ros2('action', 'send_goal', '--feedback', f'{NODE}/answer_question',
               'mossv_ros/action/AnswerQuestion', "{prompt: 'What do you see?'}",
               timeout=60, check=False).stdout
    assert 'accepted with ID' in out and 'Feedback:' in out, out
    assert 'Goal finished with status: SUCCEEDED' in out, out


# ---------------------------------------------------------------------- in-process
def _frame(i, value=None):
    from sensor_msgs.msg import Image
    img = np.full((24, 32, 3), (i * 37) % 255 if value is None else value, np.uint8)
    msg = Image(height=24, width=32, encoding='rgb8', step=96, data=img.tobytes())
    msg.header.stamp.sec, msg.header.frame_id = 100 + i, 'cam'
    return msg


def test_diagnostics_levels_follow_the_situation(ros_context, tiny_checkpoint):
    """Camera sending -> OK; camera silent -> WARN; engine error -> ERROR; ~/reset -> OK."""
    import time

    from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
    from rclpy.lifecycle import TransitionCallbackReturn

    from mossv_ros.srv import Reset

    from .ros_helpers import assistant_in_process, teardown_assistant
    node, executor = assistant_in_process(ros_context, tiny_checkpoint,
                                          **{'diagnostics.period_sec': 0.2,
                                             'diagnostics.camera_stale_sec': 1.0})
    probe = rclpy.create_node('diag_probe', context=ros_context)
    arrays = []
    probe.create_subscription(DiagnosticArray, '/diagnostics', arrays.append, 100)
    reset = probe.create_client(Reset, '/mossv_assistant/reset')

    def level(part, since):
        for arr in reversed(arrays[since:]):
            for st in arr.status:
                if st.name == f'mossv_assistant: {part}':
                    return st
        return None

    def wait_level(part, want, timeout=10, received=None):
        def match():
            st = level(part, 0)
            return st is not None and st.level == want and (received is None or {
                kv.key: kv.value for kv in st.values}['num_images'] == received)
        return spin_until(probe, match, timeout), level(part, 0)
    try:
        ok = TransitionCallbackReturn.SUCCESS
        assert node.trigger_configure() == ok and node.trigger_activate() == ok
        for i in range(4):  # frames stamped with the (wall) node clock: the camera is live
            msg = _frame(i)
            msg.header.stamp = node.get_clock().now().to_msg()
            node._on_image(msg)
            time.sleep(0.1)
        got, st = wait_level('camera /image', DiagnosticStatus.OK, received='4')
        assert got, st
        values = {kv.key: kv.value for kv in st.values}
        assert values['num_images'] == '4' and float(values['frame_gap_sec']) < 1.0
        got, st = wait_level('camera /image', DiagnosticStatus.WARN)
        assert got and 'no frame for' in st.message, st
        got, model = wait_level('model', DiagnosticStatus.OK)
        assert got and {kv.key: kv.value for kv in model.values}['dtype'] == 'float32'
        got, st = wait_level('engine', DiagnosticStatus.OK)
        assert got and {kv.key: kv.value for kv in st.values}['decode_path'] == 'eager (cpu)'
        real = node.engine.runner.feed

        def boom(*a, **k):
            node.engine.runner.feed = real
            raise RuntimeError('simulated CUDA fault')
        node.engine.runner.feed = boom
        msg = _frame(50)
        msg.header.stamp = node.get_clock().now().to_msg()
        node._on_image(msg)
        got, st = wait_level('engine', DiagnosticStatus.ERROR)
        assert got and 'simulated CUDA fault' in {kv.key: kv.value for kv in st.values}[
            'last_error'], st
        assert reset.wait_for_service(timeout_sec=10)
        fut = reset.call_async(Reset.Request())
        assert spin_until(probe, fut.done, 30) and fut.result().success
        got, st = wait_level('engine', DiagnosticStatus.OK)
        assert got, st
    finally:
        teardown_assistant(executor, node, probe)


def test_overlay_only_with_a_subscriber_stamped_and_showing_the_text(ros_context,
                                                                     tiny_checkpoint):
    import time

    from rclpy.lifecycle import TransitionCallbackReturn
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import Image

    from mossv_ros.ros.overlay import OverlayText, render_overlay

    from .ros_helpers import assistant_in_process, teardown_assistant
    node, executor = assistant_in_process(ros_context, tiny_checkpoint)
    probe = rclpy.create_node('overlay_probe', context=ros_context)
    try:
        ok = TransitionCallbackReturn.SUCCESS
        assert node.trigger_configure() == ok and node.trigger_activate() == ok
        for i in range(3):
            node._on_image(_frame(i))
            time.sleep(0.3)
        assert node._overlay.num_published == 0  # nobody looks: nothing rendered
        got = []
        probe.create_subscription(Image, '/mossv_assistant/overlay', got.append,
                                  qos_profile_sensor_data)
        assert spin_until(probe, node._overlay.wanted, 10)
        assert node.engine.submit_question('What do you see?', 'ov')[0]
        for i in range(3, 12):
            node._on_image(_frame(i))
            spin_until(probe, lambda: False, 0.3)
        assert spin_until(probe, lambda: len(got) >= 3, 10), len(got)
        for msg in got:
            assert msg.encoding == 'rgb8' and msg.width == 640
            assert msg.header.frame_id == 'cam' and 103 <= msg.header.stamp.sec <= 111
    finally:
        teardown_assistant(executor, node, probe)
    frame = np.full((48, 64, 3), 90, np.uint8)
    a = render_overlay(frame, OverlayText(7, 1, 0, 'What colour?', 'It is red.'))
    b = render_overlay(frame, OverlayText(7, 1, 0, 'What colour?', 'It is blue.'))
    silent = render_overlay(frame, OverlayText(7, 1, 0, 'What colour?', ''))
    band = slice(480, None)  # the frame scaled to 640 wide is 480 rows; the band follows
    assert a.shape == b.shape and not np.array_equal(a[band], b[band])
    assert not np.array_equal(a[band], silent[band])
    assert np.array_equal(a[:480], b[:480])  # the picture itself is untouched


def test_diagnostics_warn_when_cuda_graph_capture_failed():
    """A node that fell back to eager steps works, but slower than it should: WARN with why."""
    from builtin_interfaces.msg import Time
    from diagnostic_msgs.msg import DiagnosticStatus

    from mossv_ros.engine import events as ev
    from mossv_ros.ros.diagnostics import diagnostic_array
    stats = ev.EngineStats(state='ready', decode_path='eager (capture failed: RuntimeError: x)')
    engine = [st for st in diagnostic_array('n', Time(), {}, stats, [], 2.0, 0.0).status
              if st.name == 'n: engine'][0]
    assert engine.level == DiagnosticStatus.WARN and 'capture failed' in engine.message
    stats.decode_path = 'cuda graphs (8 steps + encoder)'
    engine = [st for st in diagnostic_array('n', Time(), {}, stats, [], 2.0, 0.0).status
              if st.name == 'n: engine'][0]
    assert engine.level == DiagnosticStatus.OK
