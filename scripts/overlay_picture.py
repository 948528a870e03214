#!/usr/bin/env python3
"""Write a picture of ``~/overlay`` from a real run: the shipped toyworld model in the node
(in this process), the demo's held-out toyworld episode as the camera, its first question.
The node's overlay pictures are taken as it hands them to its overlay thread (the same
picture it publishes on ``~/overlay``, to a subscriber of this script), and the first one that
shows the answer being spoken is saved.

``python scripts/overlay_picture.py docs/overlay.png`` (the README's picture).
"""
import sys
import threading
import time

import cv2
import numpy as np


def main(out: str) -> int:
    import rclpy
    from rclpy.parameter import Parameter
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import Image

    from mossv_ros.demo import DEMO_EPISODE_SEED
    from mossv_ros.model_dirs import default_model_dir
    from mossv_ros.ros.executor import MultiThreadedExecutor
    from mossv_ros.ros.node import AssistantNode
    from mossv_ros.ros.overlay import render_overlay
    from mossv_ros.toyworld.world import make_episode

    episode = make_episode(DEMO_EPISODE_SEED)
    question = episode.questions[0]
    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    node = AssistantNode(context=ctx, parameter_overrides=[
        Parameter('model.path', value=str(default_model_dir())),
        Parameter('engine.device', value='cpu')])
    probe = rclpy.create_node('overlay_picture', context=ctx)
    published = []
    probe.create_subscription(Image, '/mossv_assistant/overlay', published.append,
                              qos_profile_sensor_data)
    handed = []
    submit = node._overlay.submit

    def record(rgb, header, say):
        handed.append((rgb, say))
        submit(rgb, header, say)
    node._overlay.submit = record
    executor = MultiThreadedExecutor(num_threads=4, context=ctx)
    for n in (node, probe):
        executor.add_node(n)
    threading.Thread(target=executor.spin, daemon=True).start()
    saved = False
    try:
        node.trigger_configure()
        node.trigger_activate()
        while not node._overlay.wanted():
            time.sleep(0.05)
        for t in range(episode.num_frames):
            frame = episode.frame(t)
            msg = Image(height=frame.shape[0], width=frame.shape[1], encoding='rgb8',
                        step=frame.shape[1] * 3, data=np.ascontiguousarray(frame).tobytes())
            msg.header.stamp.sec, msg.header.frame_id = 1000 + t, 'toyworld_camera'
            node._on_image(msg)
            if t == question.after_frame:
                node.engine.submit_question(question.text, 'overlay-picture')
            time.sleep(0.6)
            speaking = [(rgb, say) for rgb, say in handed if say.text and say.round_id]
            if speaking:
                rgb, say = speaking[0]
                cv2.imwrite(out, render_overlay(rgb, say)[:, :, ::-1])
                print(f'wrote {out}: frame {say.frame_index}, round {say.round_id}, '
                      f'{say.question!r} -> {say.text!r}; {len(published)} pictures published')
                saved = True
                break
    finally:
        executor.shutdown(timeout_sec=1.0)
        node._close_io()
        node._stop_engine()
        probe.destroy_node()
        node.destroy_node()
        rclpy.try_shutdown(context=ctx)
    return 0 if saved else 1


if __name__ == '__main__':
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else 'docs/overlay.png'))
