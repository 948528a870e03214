"""``mossv-ros demo``: a camera clip published into the assistant, scripted questions, and a
live terminal view of tokens, silence and revisions.

Default: a held-out toyworld episode (1 frame per second of stamp time, played ``--speed``
times faster) with its own questions, answered by the shipped toyworld model; at the end a
contact sheet PNG shows the frames next to what was said. ``--video``: a real video file (or
``--scene``: a toyworld episode seen by a 320x240 camera) with the tiny random model, at the
clip's real rate.
"""
import threading
import time

import numpy as np
import rclpy
from rclpy.lifecycle import TransitionCallbackReturn
from rclpy.parameter import Parameter
from rclpy.qos import qos_profile_sensor_data
from rclpy.time import Time

from .ros.executor import MultiThreadedExecutor

#: The toyworld episode the demo plays by default (held out from training).
DEMO_EPISODE_SEED = 1_000_017


def _frames(ns):
    """Yield (t_sec, RGB frame) from --video, the toyworld episode or the generated scene."""
    if getattr(ns, 'episode', None) is not None:
        for t in range(ns.episode.num_frames):
            image = ns.episode.frame(t)
            for k in range(int(ns.fps)):  # a camera at ns.fps Hz; the node keeps 1 per second
                yield t + k / ns.fps, image
    elif ns.video:
        import cv2
        cap = cv2.VideoCapture(ns.video)
        if not cap.isOpened():
            raise SystemExit(f'cannot open video {ns.video}')
        fps = cap.get(cv2.CAP_PROP_FPS) or 30.0
        i = 0
        while True:
            ok, bgr = cap.read()
            if not ok or i / fps > ns.duration:
                break
            yield i / fps, np.ascontiguousarray(bgr[:, :, ::-1])
            i += 1
        cap.release()
    else:  # --scene: a toyworld episode through a 320x240 camera, one world state a second
        from .toyworld.world import camera_frames
        frames = camera_frames(max(1, int(ns.duration) + 1), seed=ns.seed or 0)
        for i in range(int(ns.duration * ns.fps)):
            yield i / ns.fps, frames[int(i / ns.fps)]


class _LoadBar:
    """A tqdm progress bar over checkpoint files while the model loads."""

    def __init__(self):
        self.bar = None

    def __call__(self, done: int, total: int) -> None:
        from tqdm import tqdm
        if self.bar is None:
            self.bar = tqdm(total=total, desc='loading model', unit='file')
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_demo(ns) -> int:
    from sensor_msgs.msg import Image

    from .model_dirs import default_model_dir, random_tiny_model_dir
    from .ros.client import AnswerView
    from .ros.node import AssistantNode

    ns.episode = None
    if ns.video or ns.scene:
        model = ns.model or str(random_tiny_model_dir())
        speed = 1.0
        questions = [(ns.ask_at, ns.question)]
        clip = ns.video or 'generated scene'
    else:
        from .toyworld.world import make_episode
        model = ns.model or str(default_model_dir())
        ns.episode = make_episode(ns.seed, num_frames=int(ns.duration))
        speed = ns.speed
        questions = [(q.after_frame + 0.5, q.text) for q in ns.episode.questions]
        clip = f'toyworld episode {ns.seed} ({ns.episode.num_frames} s at {speed:g}x)'
    print(f'mossv-ros demo: model {model}; clip: {clip}')
    rclpy.init()
    bar = _LoadBar()
    node = AssistantNode(load_progress=bar, parameter_overrides=[
        Parameter('model.path', value=model), Parameter('engine.device', value='cpu'),
        Parameter('sampling.max_new_tokens', value=48)])
    view = AnswerView('/mossv_assistant', name='mossv_demo_view')
    camera = rclpy.create_node('mossv_demo_camera')
    # Sensor-data QoS like a camera driver: best effort never blocks the publisher.
    pub = camera.create_publisher(Image, '/image', qos_profile_sensor_data)
    executor = MultiThreadedExecutor(num_threads=4)
    for n in (node, view, camera):
        executor.add_node(n)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    try:
        if node.trigger_configure() != TransitionCallbackReturn.SUCCESS:
            print('the assistant failed to configure (see log)')
            return 1
        bar.close()
        node.trigger_activate()
        start = time.monotonic()
        start_ns = camera.get_clock().now().nanoseconds
        pending = sorted(questions)
        for t, frame in _frames(ns):
            delay = start + t / speed - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            elif delay < -0.05 and t % 1.0:
                continue  # behind schedule: a live camera drops stale frames, never bursts
            while pending and pending[0][0] <= t:
                at, text = pending.pop(0)
                _, _, message = node.engine.submit_question(text, 'demo')
                print(f'\n>>> [{at:.1f} s] asked: {text!r} -> {message}')
            msg = Image(height=frame.shape[0], width=frame.shape[1], encoding='rgb8',
                        step=frame.shape[1] * 3, data=frame.tobytes())
            msg.header.stamp = Time(nanoseconds=start_ns + int(t * 1e9)).to_msg()
            msg.header.frame_id = 'demo_camera'
            pub.publish(msg)
        time.sleep(1.0)
        stats = node.engine.stats()
        print(f'\n--- demo done: {stats.num_frames_received} frames fed, '
              f'{stats.num_frames_cached} cached, {len(view.answers)} answer messages')
        lat = sorted(node.engine.frame_latencies)
        if lat:
            print(f'    frame arrival -> in cache: median {lat[len(lat) // 2] * 1e3:.0f} ms, '
                  f'max {lat[-1] * 1e3:.0f} ms; dropped {stats.num_dropped_frames}')
        if ns.episode is not None and ns.contact_sheet:
            from .toyworld.contact import contact_sheet
            from .toyworld.evaluate import utterances
            said = [(u.frame, u.text) for u in utterances(
                (round((Time.from_msg(a.header.stamp).nanoseconds - start_ns) * 1e-9),
                 a.round_id, a.revision, a.is_final, a.text)
                for a in view.answers if a.header.frame_id)]
            path = contact_sheet(ns.episode, said, ns.contact_sheet)
            print(f'contact sheet (frames and what was said): {path}')
        return 0
    except KeyboardInterrupt:
        return 130
    finally:
        node._stop_engine()  # publishes the last (final / cancelled) answers
        time.sleep(0.3)  # let the view receive them
        executor.shutdown(timeout_sec=1.0)
        spinner.join(timeout=2.0)
        node._close_io()
        for n in (node, view, camera):
            n.destroy_node()
        rclpy.try_shutdown()
