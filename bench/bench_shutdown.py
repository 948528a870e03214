"""SIGINT to exit (issue 26 item 9): ``mossv-ros run`` with the toyworld model, stopped with
SIGINT ``--runs`` times while idle and ``--runs`` times while busy (frames at 10 Hz and a
question every half second: the engine speaking), optionally with one CPU core kept busy by
another process (``--load``). Seconds from the signal to the process's exit; the README's
"within 2 s" is checked against the worst run. Writes ``bench/results/shutdown.json``.

    python bench/bench_shutdown.py --runs 10 --load
"""
import argparse
import json
import multiprocessing
from pathlib import Path
import sys
import time

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / 'test')]


def _spin_forever():
    while True:
        pass


def one_run(index: int, busy: bool) -> float:
    import numpy as np
    import rclpy
    from ros_helpers import spin_until, start_node, stop
    from sensor_msgs.msg import Image

    from mossv_ros.msg import Question, Status
    from mossv_ros.toyworld import shipped_model_dir
    ns = f'/shutdown{index}{"b" if busy else "i"}'
    proc = start_node('--model', str(shipped_model_dir()), '--device', 'cpu', '--ros-args',
                      '-r', f'__ns:={ns}', '-p', 'status.period_sec:=0.2',
                      '-p', 'qos.image_reliability:=reliable',
                      '-p', 'sampling.max_new_tokens:=200')
    node = rclpy.create_node(f'shutdown_probe{index}')
    try:
        status = []
        node.create_subscription(Status, f'{ns}/mossv_assistant/status', status.append, 10)
        cam = node.create_publisher(Image, f'{ns}/image', 10)
        ask = node.create_publisher(Question, f'{ns}/mossv_assistant/question', 10)
        if not spin_until(node, lambda: any(s.state_text == 'ready' for s in status), 60):
            raise RuntimeError('the node did not come up')
        image = np.zeros((112, 112, 3), np.uint8).tobytes()
        for k in range(20 if busy else 1):
            if busy:
                msg = Image(height=112, width=112, encoding='rgb8', step=336, data=image)
                msg.header.stamp.sec, msg.header.stamp.nanosec = 100 + k // 10, k % 10 * 10**8
                cam.publish(msg)
                if k % 5 == 0:
                    ask.publish(Question(request_id=f'q{k}', text='How many shapes are there?'))
            spin_until(node, lambda: False, 0.05 if busy else 1.0)
        code, took, out = stop(proc)
        if code != 0:
            raise RuntimeError(f'exit code {code}: {out[-2000:]}')
        return took
    finally:
        node.destroy_node()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--runs', type=int, default=10)
    parser.add_argument('--load', action='store_true', help='keep one CPU core busy')
    ns = parser.parse_args(argv)
    import rclpy
    rclpy.init()
    burner = None
    if ns.load:
        burner = multiprocessing.Process(target=_spin_forever, daemon=True)
        burner.start()
    try:
        results = {mode: [round(one_run(i, mode == 'busy'), 3) for i in range(ns.runs)]
                   for mode in ('idle', 'busy')}
    finally:
        if burner is not None:
            burner.terminate()
        rclpy.try_shutdown()
    worst = max(max(v) for v in results.values())
    report = {'runs': ns.runs, 'load': ns.load, 'exit_sec': results, 'worst_sec': worst,
              'within_2_s': worst <= 2.0, 'time': time.strftime('%Y-%m-%d %H:%M:%S')}
    path = ROOT / 'bench' / 'results' / 'shutdown.json'
    path.write_text(json.dumps(report, indent=2))
    print(json.dumps(report))
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
