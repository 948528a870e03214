"""Back-to-back CPU decode of the mid (or tiny) model in two source trees (issue 24: the
static step must not make CPU decode slower; issue 25: nor the split by job): the decode step
at a stationary context (64 frames cached, about 2,800 text tokens) and decode tokens/s through
the engine threads (a speaking engine, no frames), alternating the trees so that both see the
same machine load.

    python bench/ab_decode_cpu.py OLD_TREE NEW_TREE [--rounds 3] [--out NAME.json]

Each measurement runs in a fresh interpreter of this venv with the tree first on sys.path.
Writes ``bench/results/cpu_ab.json`` (``--out`` names another file there).
"""
import argparse
import json
from pathlib import Path
import statistics
import subprocess
import sys

ROOT = Path(__file__).resolve().parents[1]
MEASURE = r"""
import json, pathlib, statistics, sys, time
root = sys.argv[1]
sys.path[:0] = [root, root + '/bench']
from common import decode_window, scene_images, speaking_engine, write_model
import torch
from mossv_ros.engine.config import EngineConfig, SamplingConfig
from mossv_ros.engine.runner import ModelRunner
folder, kind = pathlib.Path(sys.argv[2]), sys.argv[3]
path = folder / kind
if not (path / 'model.safetensors').exists():
    write_model(kind, folder)
runner = ModelRunner(EngineConfig(model_path=str(path), device='cpu', dtype='float32',
                                  max_frames=64, max_context_tokens=4096))
s = runner.special
session = runner.new_session(max_frames=64, max_context_tokens=4096)
runner.start_session(session)
images = scene_images(16)
encoded = runner.encode_frames(images)
for i in range(64):
    frame = encoded[i % 16]
    frame.frame_index = i
    runner.feed(session, [s.silence, s.image], [(1, frame)])
runner.feed(session, list(range(20, 200)) * 8)
times = []
for r in range(60):
    length, pos = session.kv_cache.length, session.next_pos
    t0 = time.perf_counter()
    int(torch.argmax(runner.feed(session, [11])))
    times.append(time.perf_counter() - t0)
    session.kv_cache.length, session.next_pos = length, pos
cfg = EngineConfig(model_path='in-memory', device='cpu', dtype='float32', frame_rate_hz=30.0,
                   max_frames=64, max_context_tokens=4096, max_frame_queue=8,
                   sampling=SamplingConfig(temperature=0.0, max_new_tokens=1_000_000))
engine = speaking_engine(runner, cfg)
try:
    rate, _ = decode_window(engine, images, 0, 8.0)
finally:
    engine.stop()
print(json.dumps({'step_ms': statistics.median(times[5:]) * 1e3, 'engine_tokens_per_s': rate,
                  'context_tokens': session.kv_cache.length}))
"""


def measure(tree: str, models: Path, kind: str) -> dict:
    out = subprocess.run([sys.executable, '-c', MEASURE, tree, str(models), kind], check=True,
                         capture_output=True, text=True, cwd=tree).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('old')
    parser.add_argument('new')
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--model', choices=('mid', 'tiny'), default='mid',
                        help='the random model measured (tiny: the host-bound case)')
    parser.add_argument('--out', default='cpu_ab.json',
                        help='file name under bench/results (default cpu_ab.json)')
    ns = parser.parse_args(argv)
    models = Path('/tmp/mossv_ab_models')
    models.mkdir(exist_ok=True)
    runs = {'old': [], 'new': []}
    for r in range(ns.rounds):
        for name in ('old', 'new'):
            runs[name].append(measure(getattr(ns, name), models, ns.model))
            print(f'round {r} {name}: {runs[name][-1]}', flush=True)
    summary = {name: {key: statistics.median(run[key] for run in rows)
                      for key in ('step_ms', 'engine_tokens_per_s')}
               for name, rows in runs.items()}
    ratios = {'step_new_over_old': summary['new']['step_ms'] / summary['old']['step_ms'],
              'engine_new_over_old': summary['new']['engine_tokens_per_s']
              / summary['old']['engine_tokens_per_s']}
    report = {'trees': {'old': ns.old, 'new': ns.new}, 'model': ns.model, 'runs': runs,
              'median': summary, 'ratios': ratios}
    path = ROOT / 'bench' / 'results' / ns.out
    path.write_text(json.dumps(report, indent=2))
    print(json.dumps(ratios), f'-> {path}')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
