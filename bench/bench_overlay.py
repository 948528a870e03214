"""Decode throughput of the node with and without a ``~/overlay`` subscriber (issue 19).

The in-process node on the tiny model speaks continuously (``<|silence|>`` suppressed, as in
the decode benchmark of run_cpu.py) while frames arrive at 2 fps; tokens are counted from
``~/tokens`` over alternating windows: no overlay subscriber, one overlay subscriber, again.
Goal: tok/s with the subscriber >= 0.97 of without. Writes ``bench/results/overlay.json``.
``python bench/bench_overlay.py [--window 8]``.
"""
import argparse
from pathlib import Path
import tempfile
import threading
import time

from common import assistant_node, verdict, write_json, write_model
import numpy as np


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--window', type=float, default=8.0, help='seconds per window')
    parser.add_argument('--rounds', type=int, default=2, help='window pairs')
    ns = parser.parse_args(argv)
    import rclpy
    from rclpy.parameter import Parameter
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import Image

    from mossv_ros.engine.sampling import Sampler
    from mossv_ros.msg import Token
    from mossv_ros.ros.executor import MultiThreadedExecutor

    tiny = write_model('tiny', Path(tempfile.mkdtemp()) / 'tiny')
    with assistant_node(tiny, Parameter('sampling.max_new_tokens', value=1_000_000),
                        Parameter('round.close_after_sec', value=0.0)) as (node, ctx):
        engine = node.engine
        runner = engine.runner
        engine.parts.sampler = Sampler(engine.config.sampling,  # speak without pause
                                  runner.suppressed_ids() + [runner.special.silence],
                                  runner.vocab_size)
        probe = rclpy.create_node('overlay_bench_probe', context=ctx)
        tokens, overlays = [], []
        probe.create_subscription(Token, '/mossv_assistant/tokens',
                                  lambda m: tokens.append(time.monotonic()), 1000)
        executor = MultiThreadedExecutor(num_threads=4, context=ctx)
        for n in (node, probe):
            executor.add_node(n)
        spinner = threading.Thread(target=executor.spin, daemon=True)
        spinner.start()
        stop = threading.Event()
        image = np.random.default_rng(0).integers(0, 255, (240, 320, 3), dtype=np.uint8)

        def camera():  # 2 fps of stamp time and wall time
            i = 0
            while not stop.wait(0.5):
                msg = Image(height=240, width=320, encoding='rgb8', step=960,
                            data=image.tobytes())
                msg.header.stamp = node.get_clock().now().to_msg()
                msg.header.frame_id = 'cam'
                node._on_image(msg)
                i += 1
        feeder = threading.Thread(target=camera, daemon=True)
        feeder.start()
        engine.submit_question('Describe everything you see.', 'bench')
        time.sleep(2.0)  # warm-up
        windows = {'none': [], 'overlay': []}
        try:
            for _ in range(ns.rounds):
                for kind in ('none', 'overlay'):
                    sub = None
                    if kind == 'overlay':
                        sub = probe.create_subscription(
                            Image, '/mossv_assistant/overlay',
                            lambda m: overlays.append(time.monotonic()),
                            qos_profile_sensor_data)
                        end = time.monotonic() + 10
                        while not node._overlay.wanted() and time.monotonic() < end:
                            time.sleep(0.05)
                    t0 = time.monotonic()
                    time.sleep(ns.window)
                    n = sum(1 for t in tokens if t0 <= t <= t0 + ns.window)
                    windows[kind].append(n / ns.window)
                    if sub is not None:
                        probe.destroy_subscription(sub)
                        time.sleep(1.0)
        finally:
            stop.set()
            feeder.join()
            executor.shutdown(timeout_sec=1.0)
            probe.destroy_node()
    # the overlay's own cost, measured directly: one render of a 320x240 frame
    from mossv_ros.ros.overlay import OverlayText, render_overlay
    say = OverlayText(12, 3, 1, 'Describe everything you see.', 'word ' * 60)
    t0 = time.perf_counter()
    for _ in range(200):
        render_overlay(image, say)
    render_ms = (time.perf_counter() - t0) / 200 * 1e3
    none = sum(windows['none']) / len(windows['none'])
    over = sum(windows['overlay']) / len(windows['overlay'])
    ratio = over / none if none else float('nan')
    result = {'tok_per_sec_none': windows['none'], 'tok_per_sec_overlay': windows['overlay'],
              'ratio': round(ratio, 3), 'overlay_messages': len(overlays),
              'window_sec': ns.window, 'goal': '>= 0.97', 'pass': ratio >= 0.97,
              'render_ms_per_frame': round(render_ms, 3)}
    print(f'decode tok/s: no overlay subscriber {none:.0f}, one subscriber {over:.0f}, '
          f'ratio {ratio:.3f} ({len(overlays)} overlay pictures) -> {verdict(ratio >= 0.97)}; '
          f'one render {render_ms:.2f} ms')
    write_json('overlay.json', result)
    return result


if __name__ == '__main__':
    main()
