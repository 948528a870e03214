"""``mossv-ros demo``: a camera clip published at its real rate into the assistant, a scripted
question, and a live terminal view of tokens, silence and revisions."""
import threading
import time

import numpy as np
import rclpy
from rclpy.executors import MultiThreadedExecutor
from rclpy.lifecycle import TransitionCallbackReturn
from rclpy.parameter import Parameter


def _frames(ns):
    """Yield (t_sec, RGB frame) from --video or the generated scene."""
    if ns.video:
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
    else:
        from .scene import scene_clip
        yield from scene_clip(ns.duration, fps=ns.fps)


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

    from .cli import default_model_dir
    from .ros.client import AnswerView
    from .ros.node import AssistantNode

    model = ns.model or str(default_model_dir())
    print(f'mossv-ros demo: model {model}; clip: {ns.video or "generated scene"}')
    rclpy.init()
    bar = _LoadBar()
    node = AssistantNode(load_progress=bar, parameter_overrides=[
        Parameter('model.path', value=model), Parameter('engine.device', value='cpu'),
        Parameter('engine.dtype', value='float32'),
        Parameter('sampling.max_new_tokens', value=48),
        Parameter('qos.image_reliability', value='reliable')])
    view = AnswerView('/mossv_assistant', name='mossv_demo_view')
    camera = rclpy.create_node('mossv_demo_camera')
    pub = camera.create_publisher(Image, '/image', 10)
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
        asked = False
        for t, frame in _frames(ns):
            delay = start + t - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            msg = Image(height=frame.shape[0], width=frame.shape[1], encoding='rgb8',
                        step=frame.shape[1] * 3, data=frame.tobytes())
            msg.header.stamp = camera.get_clock().now().to_msg()
            msg.header.frame_id = 'demo_camera'
            pub.publish(msg)
            if not asked and t >= ns.ask_at:
                ok, rid, message = node.engine.submit_question(ns.question, 'demo')
                print(f'\n>>> [{t:.1f} s] asked: {ns.question!r} -> {message}')
                asked = True
        time.sleep(1.0)
        stats = node.engine.stats()
        print(f'\n--- demo done: {stats.num_frames_received} frames fed, '
              f'{stats.num_frames_cached} cached, {len(view.answers)} answer messages')
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
