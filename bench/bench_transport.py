"""Camera frames between processes: how many arrive, by size, reliability and encoding.

A publisher in another process sends 30 Hz camera images for a few seconds (raw ``rgb8``
640x480 and 1920x1080, each over best-effort and reliable QoS, and JPEG ``CompressedImage``
of both sizes over best-effort); this process subscribes with the same QoS (depth 1, like the
node) and counts what arrives. Reports frames received per second and the share of frames
sent. ``python bench/bench_transport.py [--seconds 5] [--json bench/results/transport.json]``.
The README's QoS guidance comes from this table (issue 16 item 13).
"""
import argparse
import json
import os
from pathlib import Path
import subprocess
import sys
import threading
import time

PUBLISHER = r"""
import sys, time
import numpy as np, rclpy, cv2
from rclpy.qos import QoSProfile, ReliabilityPolicy, HistoryPolicy
from sensor_msgs.msg import Image, CompressedImage
width, height, reliable, compressed, seconds = (int(sys.argv[1]), int(sys.argv[2]),
                                               sys.argv[3] == '1', sys.argv[4] == '1',
                                               float(sys.argv[5]))
rclpy.init()
node = rclpy.create_node('transport_bench_camera')
qos = QoSProfile(depth=1, history=HistoryPolicy.KEEP_LAST,
                 reliability=ReliabilityPolicy.RELIABLE if reliable else
                 ReliabilityPolicy.BEST_EFFORT)
pub = node.create_publisher(CompressedImage if compressed else Image, 'bench_image', qos)
# a camera-like picture (smooth shading, a few shapes, mild noise): JPEG sizes like a real scene
yy, xx = np.mgrid[0:height, 0:width]
frame = np.stack([xx * 255 // width, yy * 255 // height, (xx + yy) * 127 // (width + height)],
                 -1).astype(np.uint8)
for k in range(6):
    cv2.circle(frame, (width * (k + 1) // 7, height // 2), height // 8, (40 * k, 200, 90), -1)
frame = cv2.add(frame, np.random.default_rng(0).integers(0, 8, frame.shape, dtype=np.uint8))
jpeg = cv2.imencode('.jpg', frame, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
end = time.monotonic() + 20
while pub.get_subscription_count() == 0 and time.monotonic() < end:
    time.sleep(0.05)
time.sleep(1.0)  # let discovery settle
print('START', len(jpeg) if compressed else frame.nbytes, flush=True)
n, t0 = 0, time.monotonic()
while time.monotonic() - t0 < seconds:
    if compressed:
        msg = CompressedImage(format='jpeg', data=jpeg)
    else:
        msg = Image(height=height, width=width, encoding='rgb8', step=width * 3,
                    data=frame.tobytes())
    msg.header.frame_id = str(n)
    pub.publish(msg)
    n += 1
    time.sleep(max(0.0, t0 + n / 30.0 - time.monotonic()))
print('SENT', n, flush=True)
node.destroy_node()
rclpy.shutdown()
"""

CASES = [  # (label, width, height, reliable, compressed)
    ('raw 640x480, best effort', 640, 480, False, False),
    ('raw 640x480, reliable', 640, 480, True, False),
    ('raw 1920x1080, best effort', 1920, 1080, False, False),
    ('raw 1920x1080, reliable', 1920, 1080, True, False),
    ('JPEG 640x480, best effort', 640, 480, False, True),
    ('JPEG 1920x1080, best effort', 1920, 1080, False, True),
]


def run_case(width, height, reliable, compressed, seconds):
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import CompressedImage, Image

    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    node = rclpy.create_node('transport_bench_sink', context=ctx)
    got = []
    qos = QoSProfile(depth=1, history=HistoryPolicy.KEEP_LAST,
                     reliability=ReliabilityPolicy.RELIABLE if reliable else
                     ReliabilityPolicy.BEST_EFFORT)
    node.create_subscription(CompressedImage if compressed else Image, 'bench_image',
                             lambda m: got.append(time.monotonic()), qos)
    ex = SingleThreadedExecutor(context=ctx)
    ex.add_node(node)
    proc = subprocess.Popen([sys.executable, '-c', PUBLISHER, str(width), str(height),
                             '1' if reliable else '0', '1' if compressed else '0',
                             str(seconds)], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED='1'))
    lines = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    sent = 0
    try:
        end = time.monotonic() + seconds + 40
        while time.monotonic() < end and not sent:
            ex.spin_once(timeout_sec=0.01)
            sent = next((int(x.split()[1]) for x in list(lines) if x.startswith('SENT')), 0)
        t_end = time.monotonic() + 1.0
        while time.monotonic() < t_end:  # late arrivals
            ex.spin_once(timeout_sec=0.01)
    finally:
        proc.wait(10)
        ex.shutdown()
        node.destroy_node()
        rclpy.try_shutdown(context=ctx)
    size = next((int(x.split()[1]) for x in lines if x.startswith('START')), 0)
    return {'sent': sent, 'received': len(got), 'message_bytes': size,
            'received_per_sec': round(len(got) / seconds, 1),
            'share': round(len(got) / sent, 3) if sent else 0.0}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--seconds', type=float, default=5.0)
    parser.add_argument('--json', default=str(Path(__file__).parent / 'results' /
                                              'transport.json'))
    parser.add_argument('--transports', default='',
                        help='FASTDDS_BUILTIN_TRANSPORTS for both processes (e.g. LARGE_DATA)')
    ns = parser.parse_args(argv)
    os.environ.setdefault('ROS_AUTOMATIC_DISCOVERY_RANGE', 'LOCALHOST')
    if ns.transports:  # read by Fast DDS at participant creation, in both processes
        os.environ['FASTDDS_BUILTIN_TRANSPORTS'] = ns.transports
    results = {}
    print(f'| frames between processes, 30 Hz for {ns.seconds:g} s | message | received / s '
          f'| share |')
    print('| --- | ---: | ---: | ---: |')
    for label, w, h, reliable, compressed in CASES:
        r = run_case(w, h, reliable, compressed, ns.seconds)
        results[label] = r
        print(f'| {label} | {r["message_bytes"] / 1e3:,.0f} kB | {r["received_per_sec"]} | '
              f'{r["share"] * 100:.0f} % |', flush=True)
    if ns.json:
        Path(ns.json).write_text(json.dumps({'seconds': ns.seconds, 'rate_hz': 30,
                                             'fastdds_builtin_transports': ns.transports
                                             or 'DEFAULT',
                                             'rmw': os.environ.get('RMW_IMPLEMENTATION',
                                                                   'rmw_fastrtps_cpp'),
                                             'cases': results}, indent=1) + '\n')
    return results


if __name__ == '__main__':
    main()
