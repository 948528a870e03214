"""The benchmark scripts run (reduced sizes): ``bench/gpu_bench.py --tiny`` on the CPU and
``bench/run_cpu.py --quick``. Numbers are not asserted here (benchmarks, not tests); the
scripts' structure and JSON output are."""
import json
from pathlib import Path
import subprocess
import sys

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_gpu_bench_runs_tiny_on_cpu():
    res = subprocess.run([sys.executable, 'bench/gpu_bench.py', '--tiny', '--hf', '--inductor'],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    report = json.loads((ROOT / 'bench' / 'results' / 'gpu_tiny.json').read_text())
    assert not [k for k, v in report.items() if isinstance(v, dict) and 'error' in v], report
    cor = report['correctness']
    assert cor['tiny_float32']['argmax_equal'] == cor['tiny_float32']['rows'] > 0
    assert cor['normalize_equal'] and cor['toyworld']['cpu_float32']['equal_to_cpu_fp32']
    step = report['step']
    assert step['frames_cached'] == 16 and step['ttft_graph_s'] > 0
    assert step['graph_sdpa']['wall_ms'] > 0 and step['eager_sdpa']['wall_ms'] > 0
    # the step compiled by inductor computes the eager step's logits (float32, CPU)
    inductor = step['graph_inductor']
    assert inductor['wall_ms'] > 0 and inductor['compile_s'] > 0, inductor
    assert inductor['max_abs_dlogit_vs_eager'] < 1e-4 and inductor['argmax_equal'], inductor
    assert step['best'] != 'graph_inductor'  # not what the engine runs
    assert report['encode']['device_encode_eager_ms'] > 0
    assert report['engine']['tokens_per_s_0fps'] > 0 and report['engine']['tokens_per_s_1fps'] > 0
    assert report['hf_generate']['frames'] == 16 and report['hf_generate']['ttft_s'] > 0
    assert set(report['sessions']['tokens_per_s']) == {'1', '2', '4'}
    assert len(report['targets']) == 8
    assert 'transformers' in res.stdout and 'TTFT' in res.stdout


def test_gpu_bench_memory_and_quantization_stages_run_tiny_on_cpu(tmp_path):
    """``--only memory,quantization`` (issue 33): a checkpoint written to disk, loaded by the
    streaming load under each cap, decoded; each quantization mode side by side."""
    res = subprocess.run([sys.executable, 'bench/gpu_bench.py', '--tiny', '--only',
                          'memory,quantization', '--quantization', 'none,int8', '--out',
                          str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    report = json.loads((tmp_path / 'gpu_memory_tiny.json').read_text())
    memory, quant = report['memory'], report['quantization']
    assert set(memory) - {'stage_s'} == {'int8_2gib', 'none_3gib', 'int8_3gib'}, memory
    for case in ('int8_2gib', 'none_3gib'):
        assert memory[case]['tokens_per_s'] > 0, memory[case]
        assert memory[case]['plan_weight_bytes'] == memory[case]['weight_bytes']
    assert memory['int8_2gib']['weight_bytes'] < memory['none_3gib']['weight_bytes']
    assert quant['int8']['quantized_layers'] > 0 and quant['none']['tokens_per_s'] > 0
