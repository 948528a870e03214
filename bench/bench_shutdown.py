"""SIGINT to exit (issue 26 item 9, issue 36 item 2): ``mossv-ros run`` with the toyworld
model, stopped with SIGINT ``--runs`` times in each of four situations: idle; idle with one CPU
core kept busy by another process; speaking (frames at 10 Hz and a question every half second)
with that core busy; and 8 cameras speaking with that core busy. Seconds from the signal to the
process's exit; the goal (under 1 s) is checked against the worst run. Writes
``bench/results/shutdown.json``.

    python bench/bench_shutdown.py --runs 20
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


def one_run(index: int, busy: bool, cameras: int = 1) -> float:
    import numpy as np
    import rclpy
    from ros_helpers import spin_until, start_node, stop
    from sensor_msgs.msg import Image

    from mossv_ros.msg import Question, Status
    from mossv_ros.toyworld import shipped_model_dir
    ns = f'/shutdown{index}{"b" if busy else "i"}{cameras}'
    names = [f'cam{i}' for i in range(cameras)] if cameras > 1 else []
    many = (['-p', f'cameras.names:=[{",".join(names)}]', '-p',
             f'cameras.topics:=[{",".join(n + "/image" for n in names)}]'] if names else [])
    proc = start_node('--model', str(shipped_model_dir()), '--device', 'cpu', '--ros-args',
                      '-r', f'__ns:={ns}', '-p', 'status.period_sec:=0.2',
                      '-p', 'qos.image_reliability:=reliable',
                      '-p', 'sampling.max_new_tokens:=200', *many)
    node = rclpy.create_node(f'shutdown_probe{index}')
    try:
        status = []
        node.create_subscription(Status, f'{ns}/mossv_assistant/status', status.append, 10)
        cams = [node.create_publisher(Image, f'{ns}/{n}/image' if n else f'{ns}/image', 10)
                for n in (names or [''])]
        ask = node.create_publisher(Question, f'{ns}/mossv_assistant/question', 10)
        if not spin_until(node, lambda: any(s.state_text == 'ready' for s in status), 60):
            raise RuntimeError('the node did not come up')
        image = np.zeros((112, 112, 3), np.uint8).tobytes()
        for k in range(20 if busy else 1):
            if busy:
                msg = Image(height=112, width=112, encoding='rgb8', step=336, data=image)
                msg.header.stamp.sec, msg.header.stamp.nanosec = 100 + k // 10, k % 10 * 10**8
                for cam in cams:
                    cam.publish(msg)
                if k % 5 == 0:
                    for n in (names or ['']):
                        ask.publish(Question(request_id=f'q{k}{n}', camera=n,
                                             text='How many shapes are there?'))
            spin_until(node, lambda: False, 0.05 if busy else 1.0)
        code, took, out = stop(proc)
        if code != 0:
            raise RuntimeError(f'exit code {code}: {out[-2000:]}')
        return took
    finally:
        node.destroy_node()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--runs', type=int, default=20)
    ns = parser.parse_args(argv)
    import rclpy
    rclpy.init()
    situations = {'idle': (False, False, 1), 'idle_one_core_busy': (True, False, 1),
                  'speaking_one_core_busy': (True, True, 1),
                  'cameras8_speaking_one_core_busy': (True, True, 8)}
    results = {}
    try:
        for name, (load, busy, cameras) in situations.items():
            burner = None
            if load:
                burner = multiprocessing.Process(target=_spin_forever, daemon=True)
                burner.start()
            try:
                results[name] = [round(one_run(i, busy, cameras), 3) for i in range(ns.runs)]
            finally:
                if burner is not None:
                    burner.terminate()
            print(name, results[name], flush=True)
    finally:
        rclpy.try_shutdown()
    worst = max(max(v) for v in results.values())
    report = {'runs': ns.runs, 'exit_sec': results, 'worst_sec': worst,
              'within_1_s': worst < 1.0, 'time': time.strftime('%Y-%m-%d %H:%M:%S')}
    path = ROOT / 'bench' / 'results' / 'shutdown.json'
    path.write_text(json.dumps(report, indent=2))
    print(json.dumps(report))
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
