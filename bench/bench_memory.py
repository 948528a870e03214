# Copyright 2026 The mossv_ros authors
# SPDX-License-Identifier: Apache-2.0
"""Memory on the CPU (issue 33), side by side in one run:

1. **the streaming load**: an int8 load of a checkpoint of at least 300 M parameters written
   by the tiny writer (float32, 1.3 GB), each load in a fresh process; peak RSS growth during
   the load (``VmHWM`` reset at the start, minus RSS then) against the final int8 bytes, for
   the streaming loader and for the old way (every tensor read into one state dict, then
   quantized) as a reference; goal: streaming <= 1.3x the final int8 bytes;
2. **the plan**: planned against measured bytes of weights and caches on the mid model, float32
   and int8; goal: within 10 %;
3. **configure/cleanup cycles**: RSS after each of five engine start/stop cycles of the mid
   model (the engine and its runner dropped each time, no ``gc.collect()``, the freed memory
   released as the node's cleanup does); goal: the fifth within 5 % of the first.

Writes ``bench/results/memory.json``. The GPU figures (peak device memory during the 11B load
and decode per mode, under 16 and 24 GiB caps) are ``bench/gpu_bench.py --only memory``.

    python bench/bench_memory.py
"""
import json
from pathlib import Path
import subprocess
import sys
import tempfile

from common import machine, MID_CONFIG, ROOT, rss_bytes, verdict, write_json, write_model

#: >= 300 M parameters of the MOSS architecture (20 text layers of hidden 1024, 4 cross)
BIG_CONFIG = dict(text_hidden=1024, text_layers=20, cross_layers=(3, 8, 13, 18),
                  intermediate=4352, heads=16, kv_heads=4, max_positions=4096)

LOAD_CHILD = r'''
import json, sys, time
sys.path.insert(0, {root!r})
import torch
from mossv_ros.engine import quantize
from mossv_ros.engine.checkpoint import load_hf_model, weight_index
# imports first (torchao imports more, and sets inductor's flags, at its first quantize_):
# the measurement is the load's
quantize.apply(torch.nn.Linear(256, 64, bias=False), 'int8')
import safetensors.torch  # noqa: F401
import transformers.models.mllama.modeling_mllama  # noqa: F401


def status(key):
    for line in open('/proc/self/status'):
        if line.startswith(key + ':'):
            return int(line.split()[1]) * 1024
    return 0


def old_way(path):
    """The load before issue 33: every tensor into one state dict, then quantize."""
    from pathlib import Path
    from safetensors import safe_open
    from transformers import MllamaForConditionalGeneration
    from mossv_ros.engine.checkpoint import read_config, _rename_key
    config, _ = read_config(Path(path))
    with torch.device('meta'):
        model = MllamaForConditionalGeneration(config)
    state = {{}}
    with safe_open(str(Path(path) / 'model.safetensors'), 'pt', device='cpu') as handle:
        for key in handle.keys():
            state[_rename_key(key)] = handle.get_tensor(key).to(torch.float32, copy=True)
    model.load_state_dict(state, strict=False, assign=True)
    del state
    quantize.apply(model, 'int8')
    return model


open('/proc/self/clear_refs', 'w').write('5')  # peak RSS from here
before = status('VmRSS')
t0 = time.perf_counter()
if sys.argv[2] == 'streaming':
    model, _ = load_hf_model(__import__('pathlib').Path(sys.argv[1]), torch.float32, 'cpu',
                             quantization='int8')
else:
    model = old_way(sys.argv[1])
seconds = time.perf_counter() - t0
print(json.dumps({{'rss_before': before, 'peak_rss': status('VmHWM'),
                  'rss_after': status('VmRSS'), 'load_s': seconds,
                  'final_bytes': quantize.weight_bytes(model),
                  'num_params': sum(1 for _ in model.parameters())}}))
'''


def stage_load(folder: Path) -> dict:
    from mossv_ros.engine import memory
    from mossv_ros.engine.tiny import tiny_config_dict, write_tiny_checkpoint
    cfg = tiny_config_dict(**BIG_CONFIG)
    path = write_tiny_checkpoint(folder / 'big', config_dict=cfg)
    shape = memory.model_shape(path)
    out = {'num_params': shape.num_params,
           'file_bytes': (path / 'model.safetensors').stat().st_size,
           'largest_tensor_float32_bytes': shape.largest_tensor_bytes('float32')}
    code = LOAD_CHILD.format(root=str(ROOT))
    for way in ('streaming', 'old_way'):
        run = subprocess.run([sys.executable, '-c', code, str(path), way], capture_output=True,
                             text=True, timeout=900)
        if run.returncode:
            out[way] = {'error': run.stderr[-2000:]}
            continue
        got = json.loads(run.stdout.strip().splitlines()[-1])
        got['peak_growth_bytes'] = got['peak_rss'] - got['rss_before']
        got['peak_growth_over_final'] = got['peak_growth_bytes'] / got['final_bytes']
        out[way] = got
        print(f'  {way}: peak growth {got["peak_growth_bytes"] / 2**20:.0f} MiB = '
              f'{got["peak_growth_over_final"]:.2f} x the final {got["final_bytes"] / 2**20:.0f}'
              f' MiB ({got["load_s"]:.1f} s)', flush=True)
    ratio = out.get('streaming', {}).get('peak_growth_over_final', float('inf'))
    out['goal'] = {'streaming peak RSS growth <= 1.3 x final int8 bytes': verdict(ratio <= 1.3)}
    return out


def stage_plan(mid: Path) -> dict:
    from mossv_ros.engine.config import EngineConfig
    from mossv_ros.engine.runner import ModelRunner
    out = {}
    worst = 0.0
    for mode in ('none', 'int8'):
        runner = ModelRunner(EngineConfig(model_path=str(mid), device='cpu', quantization=mode,
                                          cameras=('a', 'b')))
        sessions = runner.new_sessions(2)
        plan = runner.memory_plan
        planned = plan.weight_bytes + plan.cache_bytes
        measured = runner.measured_bytes(sessions[0].pool)
        error = abs(planned - measured) / measured
        worst = max(worst, error)
        out[mode] = {'planned_weights_and_caches': planned, 'measured': measured,
                     'relative_error': error, 'plan_total': plan.total_bytes}
        print(f'  plan {mode}: planned {planned} measured {measured} ({error:.2%})',
              flush=True)
    out['goal'] = {'plan within 10 % of weights + caches': verdict(worst <= 0.10)}
    return out


def stage_cycles(mid: Path, cycles: int = 5) -> dict:
    from mossv_ros.engine.config import EngineConfig
    from mossv_ros.engine.engine import StreamingEngine
    from mossv_ros.engine.reclaim import release_freed_memory
    from mossv_ros.engine.runner import ModelRunner
    rss = []
    for _ in range(cycles):
        config = EngineConfig(model_path=str(mid), device='cpu', cameras=('a', 'b'))
        engine = StreamingEngine(config, runner=ModelRunner(config))
        engine.start()
        assert engine.wait_ready(120), engine.stats().last_error
        engine.stop()
        del engine  # no gc.collect(): reference counting alone must free it
        release_freed_memory()  # as the node's cleanup does
        rss.append(rss_bytes())
    growth = (rss[-1] - rss[0]) / rss[0]
    print(f'  cycles: RSS {[round(r / 2**20) for r in rss]} MiB ({growth:+.2%})', flush=True)
    return {'rss_after_each_bytes': rss, 'growth_last_vs_first': growth,
            'goal': {'5 cycles within 5 % of the first': verdict(abs(growth) <= 0.05)}}


def main() -> int:
    folder = Path(tempfile.mkdtemp())
    mid = write_model('mid', folder)
    report = {'machine': machine(), 'mid_config': MID_CONFIG, 'big_config': BIG_CONFIG}
    print('1. streaming load (int8, >= 300 M parameters)', flush=True)
    report['load'] = stage_load(folder)
    print('2. plan vs measured (mid model)', flush=True)
    report['plan'] = stage_plan(mid)
    print('3. configure/cleanup cycles (mid model)', flush=True)
    report['cycles'] = stage_cycles(mid)
    path = write_json('memory.json', report)
    print(f'wrote {path}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
