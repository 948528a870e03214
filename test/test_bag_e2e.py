"""End to end across processes: a rosbag2 made from a real video with two questions, replayed
(with /clock) into the assistant node running the tiny checkpoint with use_sim_time."""
import signal
import threading

import pytest

from .conftest import shared_videos
from .ros_helpers import spin_until, start_node, stop

rclpy = pytest.importorskip('rclpy')
pytestmark = [pytest.mark.ros, pytest.mark.skipif(not shared_videos(),
                                                  reason='../shared/data/videos not present')]

START_NS = 1_700_000_000 * 10**9
QUESTIONS = [(2.0, 'What is in front of the camera?'), (6.0, 'What changed since then?')]


@pytest.fixture(scope='module')
def video_bag(tmp_path_factory):
    from mossv_ros.bag import from_video
    path = tmp_path_factory.mktemp('bags') / 'clip'
    return from_video(str(shared_videos()[0]), str(path), QUESTIONS, fps=5, width=320,
                      start_ns=START_NS)


def _ns(stamp):
    return stamp.sec * 10**9 + stamp.nanosec


def test_bag_replay_into_node_answers_every_question(ros_context, tiny_checkpoint, video_bag):
    from mossv_ros.bag import play
    from mossv_ros.msg import Answer, Silence, Status, Token

    proc = start_node('--model', str(tiny_checkpoint), '--device', 'cpu', '--ros-args',
                       '-p', 'use_sim_time:=true', '-p', 'sampling.max_new_tokens:=10',
                       '-p', 'frames.rate_hz:=2.0', '-p', 'round.close_after_frames:=3',
                       '-p', 'qos.image_reliability:=reliable')
    try:
        rec = rclpy.create_node('recorder', context=ros_context)
        got = {'tokens': [], 'silence': [], 'answer': [], 'status': []}
        for key, cls in [('tokens', Token), ('silence', Silence), ('answer', Answer),
                         ('status', Status)]:
            rec.create_subscription(cls, f'/mossv_assistant/{key}', got[key].append, 1000)
        ready = lambda: (rec.count_subscribers('/image') and  # noqa: E731
                         rec.count_subscribers('/mossv_assistant/question') and
                         any(s.state == Status.STATE_READY for s in got['status']))
        assert spin_until(rec, ready, 60), 'node never became ready'
        player = rclpy.create_node('player', context=ros_context)
        result = {}
        thread = threading.Thread(target=lambda: result.update(
            r=play(str(video_bag.path), clock=True, node=player,
                                 wait_for_subscribers=10.0)))
        thread.start()
        spin_until(rec, lambda: not thread.is_alive(), 120)
        thread.join()
        ids = [f'bag-{i}@{result["r"].request_tag}' for i in range(2)]  # this replay's
        answered = lambda: {a.request_id for a in got['answer']}  # noqa: E731
        spin_until(rec, lambda: set(ids) <= answered(), 30)
        assert proc.poll() is None, 'the node died'
        # SIGINT while listening: the open round still ends with a final Answer we receive
        proc.send_signal(signal.SIGINT)
        spin_until(rec, lambda: proc.poll() is not None, 10)
        spin_until(rec, lambda: False, 0.5)
    finally:
        code, _, out = stop(proc)
    assert result['r'].counts == {'/image': video_bag.counts['/image'],
                                  '/mossv_assistant/question': 2, }
    for rid, (_, text) in zip(ids, QUESTIONS):
        toks = [t for t in got['tokens'] if t.request_id == rid]
        answers = [a for a in got['answer'] if a.request_id == rid]
        assert toks, f'no tokens for {rid}'
        assert {t.round_id for t in toks} == {answers[0].round_id} and answers[0].round_id > 0
        assert [a.is_final for a in answers][-1:] == [True], \
            [(a.end_reason, a.is_final) for a in answers]
        assert all(a.question == text for a in answers)
    assert {t.round_id for t in got['tokens'] if t.request_id == ids[0]} != \
        {t.round_id for t in got['tokens'] if t.request_id == ids[1]}
    assert any(s.state == Silence.STATE_SILENT for s in got['silence'])
    outputs = got['tokens'] + got['silence'] + got['answer']
    # Output before the first frame (the model speaking under the empty session prompt) has no
    # conditioning frame: zero stamp, empty frame_id, never in a question's round.
    pre_frame = [m for m in outputs if m.header.frame_id == '']
    assert all(_ns(m.header.stamp) == 0 and m.round_id == 0 for m in pre_frame)
    framed = [m for m in outputs if m.header.frame_id]
    assert len(framed) > len(pre_frame)
    assert all(m.header.frame_id == 'camera' for m in framed)
    bad = [m for m in framed if not START_NS <= _ns(m.header.stamp) <= video_bag.end_ns]
    assert not bad, bad[:3]
    for rnd in {t.round_id for t in got['tokens']}:
        stamps = [_ns(t.header.stamp) for t in got['tokens'] if t.round_id == rnd]
        assert stamps == sorted(stamps), f'stamps went backwards in round {rnd}'
    assert code == 0, out  # (the time to exit: bench/bench_shutdown.py)
    assert 'Traceback' not in out, out
