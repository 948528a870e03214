"""Two cameras through ROS across processes: the assistant node (shipped toyworld model) with
a session per camera, a camera process publishing both topics, questions routed to each."""
import subprocess
import sys
import textwrap

import pytest

from .ros_helpers import spin_until, start_node, stop

rclpy = pytest.importorskip('rclpy')
pytestmark = pytest.mark.ros

#: publishes a toyworld episode per camera, 1 frame per second of stamp time (reliable QoS);
#: head stamps 100 + t, frame_id head_link; wrist stamps 500 + t, frame_id wrist_link
CAMERAS = textwrap.dedent("""
    import sys, time, rclpy
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image
    from mossv_ros.toyworld.world import make_episode
    rclpy.init()
    node = rclpy.create_node('two_cameras')
    qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
    cams = {'head': (node.create_publisher(Image, '/head/image', qos), 100, 'head_link',
                     make_episode(1_000_006, num_frames=30)),
            'wrist': (node.create_publisher(Image, '/wrist/image', qos), 500, 'wrist_link',
                      make_episode(1_000_009, num_frames=30))}
    while not all(p.get_subscription_count() for p, *_ in cams.values()):
        rclpy.spin_once(node, timeout_sec=0.1)
    for t in range(30):
        for pub, base, frame_id, ep in cams.values():
            rgb = ep.frame(t)
            msg = Image(height=rgb.shape[0], width=rgb.shape[1], encoding='rgb8',
                        step=rgb.shape[1] * 3, data=rgb.tobytes())
            msg.header.stamp.sec, msg.header.frame_id = base + t, frame_id
            pub.publish(msg)
        rclpy.spin_once(node, timeout_sec=0.4)
""")


def test_two_cameras_route_questions_and_stamp_answers_across_processes(ros_context):
    from mossv_ros.msg import Answer, Question, Status, Token
    from mossv_ros.toyworld import shipped_model_dir
    node_proc = start_node('--model', str(shipped_model_dir()), '--device', 'cpu',
                           '--ros-args', '-p', 'cameras.names:=[head, wrist]',
                           '-p', 'cameras.topics:=[/head/image, /wrist/image]',
                           '-p', 'qos.image_reliability:=reliable',
                           '-p', 'round.close_after_frames:=3',
                           '-p', 'status.period_sec:=0.2')
    cams = None
    try:
        node = rclpy.create_node('two_camera_probe', context=ros_context)
        tokens, answers, status = [], [], []
        node.create_subscription(Token, '/mossv_assistant/tokens', tokens.append, 1000)
        node.create_subscription(Answer, '/mossv_assistant/answer', answers.append, 100)
        node.create_subscription(Status, '/mossv_assistant/status', status.append, 10)
        ask = node.create_publisher(Question, '/mossv_assistant/question', 10)
        assert spin_until(node, lambda: any(s.state_text == 'ready' for s in status), 60)
        assert [c.name for c in status[-1].cameras] == ['head', 'wrist']
        assert spin_until(node, lambda: ask.get_subscription_count(), 10)
        ask.publish(Question(request_id='bad', text='Anything?', camera='rear'))
        cams = subprocess.Popen([sys.executable, '-c', CAMERAS])
        assert spin_until(node, lambda: any(c.num_frames_received >= 3 for s in status[-1:]
                                            for c in s.cameras if c.name == 'wrist'), 60)
        ask.publish(Question(request_id='h', text='How many shapes are there?', camera='head'))
        ask.publish(Question(request_id='w', text='How many shapes are there?',
                             camera='wrist'))
        done = {'h', 'w'}
        assert spin_until(node, lambda: done <= {a.request_id for a in answers if a.is_final},
                          90), [(a.request_id, a.end_reason) for a in answers]
        last_status = status[-1]
    finally:
        if cams is not None:
            cams.kill()
            cams.wait()
        code, _, out = stop(node_proc)
    assert code == 0, out
    [bad] = [a for a in answers if a.request_id == 'bad']
    assert bad.is_final and 'rear' in bad.end_reason and 'head, wrist' in bad.end_reason
    for rid, cam, base, frame_id in (('h', 'head', 100, 'head_link'),
                                     ('w', 'wrist', 500, 'wrist_link')):
        mine = [a for a in answers if a.request_id == rid]
        assert mine and all(a.camera == cam for a in mine), rid
        rounds = {a.round_id for a in mine}
        assert len(rounds) == 1 and rounds != {0}
        said = [t for t in tokens if t.request_id == rid]
        assert said and all(t.camera == cam and t.round_id in rounds for t in said)
        stamped = [m for m in mine + said if m.header.frame_id]
        assert stamped and all(m.header.frame_id == frame_id
                               and base <= m.header.stamp.sec < base + 30 for m in stamped)
    head, wrist = last_status.cameras
    assert head.header.frame_id == 'head_link' and wrist.header.frame_id == 'wrist_link'
    assert last_status.num_frames_received == head.num_frames_received + \
        wrist.num_frames_received
