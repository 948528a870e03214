"""ROS tests with real rclpy nodes across processes (the interfaces and the node)."""
import subprocess
import sys
import textwrap

import pytest

from .ros_helpers import spin_until, start_node, stop

rclpy = pytest.importorskip('rclpy')
pytestmark = pytest.mark.ros

PUBLISHER = textwrap.dedent("""
    import time, rclpy
    from mossv_ros.msg import Answer, Question, Silence, Status, Token
    rclpy.init()
    node = rclpy.create_node('roundtrip_pub')
    msgs = {
        'token': Token(round_id=3, request_id='r', revision=1, token_index=7,
                       token_id=42, text='héllo'),
        'silence': Silence(round_id=3, state=Silence.STATE_SILENT, frame_index=9,
                           previous_duration_sec=1.5),
        'answer': Answer(round_id=3, revision=2, question='q?', text='full text',
                         is_final=True, end_reason='silence', first_frame_index=1,
                         last_frame_index=9),
        'status': Status(state=Status.STATE_READY, state_text='ready', num_frames_cached=5,
                         cache_bytes=123, ttft_sec=0.25, last_error=''),
        'question': Question(request_id='abc', text='What is that?'),
    }
    pubs = {k: node.create_publisher(type(m), f'/rt/{k}', 10) for k, m in msgs.items()}
    for _ in range(300):
        for k, m in msgs.items():
            m.header.stamp.sec = 17
            m.header.frame_id = 'cam'
            pubs[k].publish(m)
        rclpy.spin_once(node, timeout_sec=0.05)
""")


def test_interfaces_round_trip_across_processes(ros_context):
    from mossv_ros.msg import Answer, Question, Silence, Status, Token
    proc = subprocess.Popen([sys.executable, '-c', PUBLISHER])
    try:
        node = rclpy.create_node('roundtrip_sub', context=ros_context)
        got = {}
        for key, cls in [('token', Token), ('silence', Silence), ('answer', Answer),
                         ('status', Status), ('question', Question)]:
            node.create_subscription(cls, f'/rt/{key}',
                                     lambda m, key=key: got.setdefault(key, m), 10)
        assert spin_until(node, lambda: len(got) == 5, 30), sorted(got)
    finally:
        proc.kill()
        proc.wait()
    assert got['token'].text == 'héllo' and got['token'].token_index == 7
    assert got['silence'].state == Silence.STATE_SILENT
    assert got['silence'].previous_duration_sec == 1.5
    assert got['answer'].revision == 2 and got['answer'].is_final
    assert got['status'].ttft_sec == 0.25 and got['status'].cache_bytes == 123
    assert got['question'].request_id == 'abc'
    assert all(m.header.stamp.sec == 17 and m.header.frame_id == 'cam' for m in got.values())


def test_node_without_model_status_ask_and_sigint(ros_context):
    from mossv_ros.msg import Status
    from mossv_ros.srv import Ask
    proc = start_node('--device', 'cpu')
    try:
        node = rclpy.create_node('probe', context=ros_context)
        status = []
        node.create_subscription(Status, '/mossv_assistant/status', status.append, 10)
        assert spin_until(node, lambda: status, 30), 'no Status'
        assert status[0].state == Status.STATE_UNLOADED and status[0].model_name == 'none'
        client = node.create_client(Ask, '/mossv_assistant/ask')
        assert client.wait_for_service(timeout_sec=30)
        future = client.call_async(Ask.Request(prompt='hello?'))
        assert spin_until(node, future.done, 15)
        response = future.result()
        assert response.accepted is False and 'model not loaded' in response.message
    finally:
        code, took, out = stop(proc)
    assert 'Traceback' not in out, out  # (the time to exit: bench/bench_shutdown.py)
    assert code == 0, out
    assert 'Traceback' not in out, out


def test_node_with_tiny_model_answers_over_topics(ros_context, tiny_checkpoint):
    import numpy as np
    from sensor_msgs.msg import Image

    from mossv_ros.msg import Answer, Question, Token
    proc = start_node('--model', str(tiny_checkpoint), '--device', 'cpu',
                       '--ros-args', '-p', 'sampling.max_new_tokens:=8',
                       '-p', 'qos.image_reliability:=reliable')
    try:
        node = rclpy.create_node('probe_model', context=ros_context)
        tokens, answers = [], []
        node.create_subscription(Token, '/mossv_assistant/tokens', tokens.append, 100)
        node.create_subscription(Answer, '/mossv_assistant/answer', answers.append, 10)
        cam = node.create_publisher(Image, '/image', 10)
        ask = node.create_publisher(Question, '/mossv_assistant/question', 10)
        assert spin_until(node, lambda: cam.get_subscription_count() and
                          ask.get_subscription_count(), 30)
        frame = np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8)
        sent = 0
        for i in range(40):
            msg = Image(height=60, width=80, encoding='rgb8', step=240, data=frame.tobytes())
            msg.header.stamp.sec, msg.header.frame_id = 100 + i, 'cam'
            cam.publish(msg)
            if i == 3:
                ask.publish(Question(request_id='q-1', text='What do you see?'))
                sent += 1
            spin_until(node, lambda: False, 0.1)
            if any(a.request_id == 'q-1' and a.is_final for a in answers):
                break
        final = [a for a in answers if a.request_id == 'q-1' and a.is_final]
        assert final, [(a.round_id, a.end_reason) for a in answers]
        assert final[0].question == 'What do you see?'
        stamps = [t.header.stamp.sec for t in tokens if t.request_id == 'q-1']
        assert all(100 <= s < 140 for s in stamps) and stamps == sorted(stamps)
        assert all(t.header.frame_id == 'cam' for t in tokens if t.round_id)
    finally:
        code, took, out = stop(proc)
    assert code == 0, out  # (the time to exit: bench/bench_shutdown.py)
