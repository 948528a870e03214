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
    res = subprocess.run([sys.executable, 'bench/gpu_bench.py', '--tiny'], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    report = json.loads((ROOT / 'bench' / 'results' / 'gpu_tiny.json').read_text())
    ours = report['ours']
    assert ours['frames_cached'] == 16 and ours['ttft_s'] > 0 and ours['frame_encode_s'] > 0
    assert ours['tokens_per_s_0fps'] > 0 and ours['tokens_per_s_1fps'] > 0
    assert report['hf_generate']['frames'] == 16 and report['hf_generate']['ttft_s'] > 0
    assert set(report['sessions']['tokens_per_s']) == {'1', '2', '4'}
    assert 'transformers' in res.stdout and 'TTFT' in res.stdout
