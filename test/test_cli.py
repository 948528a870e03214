"""The ``mossv-ros`` command: demo headless, ask, offline, bag from-video + play round trip."""
import os
import subprocess
import sys
import threading

import pytest
import yaml

from .conftest import shared_videos
from .ros_helpers import spin_until, start_node, stop

rclpy = pytest.importorskip('rclpy')
pytestmark = pytest.mark.ros


def mossv_ros(*args, timeout=180):
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    return subprocess.run([sys.executable, '-m', 'mossv_ros.cli', *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


def test_demo_default_toyworld_answers_and_saves_a_contact_sheet(tmp_path):
    """The embedded default: a held-out toyworld episode answered by the shipped toyworld
    model; the printed answers are the ones the episode's ground truth says, and a contact
    sheet PNG is written."""
    from mossv_ros.demo import DEMO_EPISODE_SEED
    from mossv_ros.toyworld.world import make_episode, speech_frames

    sheet = tmp_path / 'sheet.png'
    res = mossv_ros('demo', '--speed', '1', '--fps', '5', '--contact-sheet', str(sheet))
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert 'toyworld episode' in out and '--- demo done:' in out and 'loading model' in out
    episode = make_episode(DEMO_EPISODE_SEED, num_frames=20)
    truth = [text for _, (_, text, _) in speech_frames(episode)]
    assert truth
    heard = sum(f': {text}' in out for text in truth)
    assert heard >= 0.75 * len(truth), (truth, out)
    assert sheet.stat().st_size > 10_000 and 'contact sheet' in out
    assert 'Traceback' not in out


def test_demo_generated_scene_with_a_scripted_question(tiny_checkpoint):
    res = mossv_ros('demo', '--scene', '--model', str(tiny_checkpoint), '--duration', '4',
                    '--ask-at', '1.5', '--question', 'Which shapes are there?')
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert "asked: 'Which shapes are there?' -> accepted as round 1" in out
    assert '--- demo done:' in out and 'loading model' in out
    assert '(round 1, final' in out, out
    assert 'Traceback' not in out


@pytest.mark.skipif(not shared_videos(), reason='../shared/data/videos not present')
def test_demo_plays_a_video_file(tiny_checkpoint):
    res = mossv_ros('demo', '--model', str(tiny_checkpoint), '--video', str(shared_videos()[0]),
                    '--duration', '3', '--ask-at', '1')
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    fed = int(out.split('--- demo done: ')[1].split(' frames fed')[0])
    assert fed >= 2  # 3 s of video at frames.rate_hz 1.0


def test_ask_prints_the_streamed_answer(tiny_checkpoint):
    proc = start_node('--model', str(tiny_checkpoint), '--device', 'cpu', '--ros-args',
                      '-p', 'sampling.max_new_tokens:=6')
    try:
        res = mossv_ros('ask', 'What is on the table?', '--timeout', '60')
    finally:
        code, _, out = stop(proc)
    assert res.returncode == 0, res.stdout + res.stderr + out
    lines = res.stdout.splitlines()
    assert lines[0].startswith('[round ') and lines[0].endswith('What is on the table?')
    rid = lines[0].split(']')[0].split()[1]
    assert f'[answer (round {rid}' in res.stdout
    assert code == 0, out


def test_ask_without_a_node_times_out_cleanly():
    res = mossv_ros('ask', 'anyone?', '--node', '/nobody_here', '--timeout', '2')
    assert res.returncode == 2 and 'no service /nobody_here/ask' in res.stdout


def test_offline_cli_on_images(tiny_checkpoint, tmp_path):
    import cv2
    import numpy as np
    path = tmp_path / 'a.png'
    cv2.imwrite(str(path), np.full((40, 60, 3), 128, np.uint8))
    res = mossv_ros('offline', 'What is this?', '--image', str(path), '--model',
                    str(tiny_checkpoint), '--device', 'cpu', '--max-new-tokens', '3')
    assert res.returncode == 0, res.stderr
    assert '1 frames' in res.stdout and 'TTFT' in res.stdout
    bad = mossv_ros('offline', '   ', '--image', str(path), '--model', str(tiny_checkpoint))
    assert bad.returncode != 0 and 'prompt is empty' in bad.stderr


@pytest.mark.skipif(not shared_videos(), reason='../shared/data/videos not present')
@pytest.mark.parametrize('storage,compressed', [('sqlite3', False), (None, True)])
def test_bag_from_video_then_play_round_trips(ros_context, tmp_path, storage, compressed):
    """storage None: no --storage, which must write MCAP (the rosbag2 default since Iron)."""
    from rosbags.rosbag2 import Reader
    from sensor_msgs.msg import CompressedImage, Image

    from mossv_ros.bag import typestore
    from mossv_ros.msg import Question

    bag = tmp_path / 'bag'
    args = ['bag', 'from-video', str(shared_videos()[0]), str(bag)]
    args += ['--storage', storage] if storage else []
    args += ['--fps', '4', '--width', '160', '--question', '1.0:first?',
            '--question', '2.5:second?']
    res = mossv_ros(*args + (['--compressed'] if compressed else []))
    assert res.returncode == 0, res.stderr
    store = typestore()
    recorded = {}
    meta = yaml.safe_load((bag / 'metadata.yaml').read_text())['rosbag2_bagfile_information']
    assert meta['storage_identifier'] == (storage or 'mcap') and meta['version'] == 8
    with Reader(bag) as reader:
        for conn, ns, raw in reader.messages():
            msg = store.deserialize_cdr(raw, conn.msgtype)
            recorded.setdefault(conn.topic, []).append(
                (msg.header.stamp.sec, msg.header.stamp.nanosec))
            assert msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec == ns
    assert len(recorded['/mossv_assistant/question']) == 2
    topic = '/image/compressed' if compressed else '/image'  # image_transport naming
    assert set(recorded) == {topic, '/mossv_assistant/question'}
    recorded['/image'] = recorded.pop(topic)
    assert len(recorded['/image']) >= 8

    node = rclpy.create_node('bag_sink', context=ros_context)
    got = {'/cam': [], '/q': []}
    node.create_subscription(CompressedImage if compressed else Image, '/cam',
                             got['/cam'].append, 1000)
    node.create_subscription(Question, '/q', got['/q'].append, 100)
    player = threading.Thread(target=lambda: got.update(res=mossv_ros(
        'bag', 'play', str(bag), '--rate', '5', '--remap', f'{topic}:=/cam',
        '--remap', '/mossv_assistant/question:=/q', '--wait-for-subscribers', '20')))
    player.start()
    spin_until(node, lambda: not player.is_alive(), 120)
    spin_until(node, lambda: len(got['/cam']) >= len(recorded['/image']), 5)
    assert got['res'].returncode == 0, got['res'].stderr
    stamps = [(m.header.stamp.sec, m.header.stamp.nanosec) for m in got['/cam']]
    assert stamps == recorded['/image']
    assert [m.text for m in got['/q']] == ['first?', 'second?']
    # each playback asks under request ids of its own (the printed tag), never the bag's
    tag = got['res'].stdout.split('<request_id>@')[1].split()[0]
    assert [m.request_id for m in got['/q']] == [f'bag-0@{tag}', f'bag-1@{tag}']
    if not compressed:
        assert got['/cam'][0].encoding == 'bgr8' and got['/cam'][0].width == 160


def test_plan_sizes_a_gpu_from_config_json_alone(tmp_path):
    """Issue 33: ``mossv-ros plan`` reads config.json only (no weights present here), says
    whether the 11B model fits a 16 GiB card, what would, and what fits which card."""
    import json

    from mossv_ros.engine.tiny import moss_11b_config_dict
    (tmp_path / 'config.json').write_text(json.dumps(moss_11b_config_dict()))
    no = mossv_ros('plan', '--model', str(tmp_path), '--memory-gib', '16')
    assert no.returncode == 1, no.stdout + no.stderr
    assert 'does NOT fit' in no.stdout and 'would fit: model.quantization:=int8' in no.stdout
    yes = mossv_ros('plan', '--model', str(tmp_path), '--memory-gib', '16', '--quantization',
                    'int8', '--table')
    assert yes.returncode == 0 and ': fits' in yes.stdout, yes.stdout + yes.stderr
    rows = {line.split('|')[1].strip().split(':')[0]: [c.strip() for c in line.split('|')[2:6]]
            for line in yes.stdout.splitlines() if line.startswith('| ') and 'camera' in line}
    assert rows['none, 1 camera(s)'] == ['no', 'yes', 'yes', 'yes']
    assert rows['int8, 1 camera(s)'] == ['yes', 'yes', 'yes', 'yes']
    bad = mossv_ros('plan', '--model', str(tmp_path / 'missing'))
    assert bad.returncode == 2 and 'no config.json' in bad.stderr and 'Traceback' not in \
        bad.stderr
