"""Several cameras, one model (issue 18): batched decode of 1, 2 and 4 sessions speaking at
once, and a question's TTFT while the other sessions speak. Mid model, CPU, one run.

* aggregate decode tokens/s with N sessions speaking (``<|silence|>`` suppressed), side by side
  in one run; goal: 4 sessions >= 2x the tokens/s of one;
* TTFT of a question to one camera with the 3 others speaking / alone (one camera); goal
  <= 1.5x;
* memory: the cache bytes each extra session allocates (its text KV and vision cache rows).

Writes ``bench/results/sessions.json``. ``python bench/bench_sessions.py [--window 6]``.
"""
import argparse
from pathlib import Path
import tempfile
import time

from common import (
    machine,
    median,
    MID_CONFIG,
    speaking_engine,
    verdict,
    write_json,
    write_model,
)

from mossv_ros.engine.config import EngineConfig, SamplingConfig
from mossv_ros.engine.events import RoundEvent, TokenEvent
from mossv_ros.engine.runner import ModelRunner

QUESTION = 'What is in front of the camera right now?'


def _config(path, n) -> EngineConfig:
    return EngineConfig(model_path=str(path), device='cpu', dtype='float32', max_frames=16,
                        max_context_tokens=8192, round_close_after_sec=0.0,
                        cameras=tuple(f'cam{i}' for i in range(n)),
                        sampling=SamplingConfig(max_new_tokens=1_000_000))


def _engine(runner, path, n):
    """A started engine of ``n`` cameras on the loaded mid model in which every session
    speaks without pause (``<|silence|>`` suppressed)."""
    return speaking_engine(runner, _config(path, n))


def _tokens_per_sec(engine, window_s: float) -> dict:
    """Tokens each camera emitted during ``window_s`` seconds (after a warm-up second)."""
    for cam in engine.config.cameras:  # every session speaks from a question of its own
        engine.submit_question(QUESTION, camera=cam)
    time.sleep(1.0)
    engine.poll_events()
    t0 = time.monotonic()
    time.sleep(window_s)
    events = engine.poll_events()
    per = {cam: 0 for cam in engine.config.cameras}
    for e in events:
        if isinstance(e, TokenEvent) and t0 <= e.emit_ts <= t0 + window_s:
            per[e.camera] += 1
    return {'total': sum(per.values()) / window_s,
            'per_session': {c: n / window_s for c, n in per.items()}}


def _ttft(engine, camera: str, repeats: int) -> float:
    """Median seconds from submitting a question to ``camera`` to its first token."""
    out = []
    for _ in range(repeats):
        engine.poll_events()
        t0 = time.monotonic()
        ok, rid, message = engine.submit_question(QUESTION, camera=camera)
        assert ok, message
        first = None
        end = time.monotonic() + 60
        while first is None and time.monotonic() < end:
            for e in engine.poll_events(timeout=0.05):
                if isinstance(e, TokenEvent) and e.round_id == rid:
                    first = e.emit_ts
                    break
        assert first is not None, 'no first token'
        out.append(first - t0)
        engine.cancel_round(rid, 'bench')
        end = time.monotonic() + 30
        while time.monotonic() < end and not any(
                isinstance(e, RoundEvent) and e.round_id == rid and e.kind == 'ended'
                for e in engine.poll_events(timeout=0.05)):
            pass
    return median(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--window', type=float, default=6.0, help='seconds per measurement')
    parser.add_argument('--repeats', type=int, default=5, help='TTFT repeats')
    ns = parser.parse_args(argv)
    path = write_model('mid', Path(tempfile.mkdtemp()))
    runner = ModelRunner(_config(path, 1))  # loaded once, shared by every engine below
    decode = {}
    for n in (1, 2, 4):
        engine = _engine(runner, path, n)
        try:
            decode[n] = _tokens_per_sec(engine, ns.window)
        finally:
            engine.stop()
        print(f'{n} session(s) speaking: {decode[n]["total"]:.1f} tok/s in all')
    ratio4 = decode[4]['total'] / decode[1]['total']
    # TTFT of a question to cam0: alone (one camera, speaking until asked) and with 3 other
    # sessions speaking (four cameras, all speaking): the question waits for the decode step
    # under way, then its prefill runs on its own session
    engine = _engine(runner, path, 1)
    try:
        alone = _ttft(engine, 'cam0', ns.repeats)
    finally:
        engine.stop()
    engine = _engine(runner, path, 4)
    try:
        for cam in ('cam1', 'cam2', 'cam3'):
            engine.submit_question(QUESTION, camera=cam)
        time.sleep(1.0)
        busy = _ttft(engine, 'cam0', ns.repeats)
        sessions = engine.sessions()
        row = sessions['cam1']
        per_session = (sum(t.nbytes for t in row.kv_cache.k + row.kv_cache.v)
                       + sum(t.nbytes for t in row.vision_cache.k + row.vision_cache.v))
        per_frame = row.vision_cache.bytes_per_frame
        per_token = row.kv_cache.bytes_per_token
    finally:
        engine.stop()
    ttft_ratio = busy / alone
    report = {
        'machine': machine(), 'model': 'mid', 'model_config': MID_CONFIG,
        'decode_tokens_per_sec': {str(n): d for n, d in decode.items()},
        'decode_ratio_4_vs_1': ratio4,
        'decode_goal': verdict(ratio4 >= 2.0),
        'ttft_alone_sec': alone, 'ttft_3_others_speaking_sec': busy,
        'ttft_ratio': ttft_ratio, 'ttft_goal': verdict(ttft_ratio <= 1.5),
        'session_cache_bytes_allocated': per_session,
        'session_cache_config': {'max_frames': 16, 'max_context_tokens': 8192,
                                 'bytes_per_frame': per_frame, 'bytes_per_token': per_token},
    }
    out = write_json('sessions.json', report)
    print(f'4 vs 1 session: {ratio4:.2f}x tok/s ({report["decode_goal"]}); TTFT with 3 '
          f'speaking / alone: {busy * 1e3:.0f} / {alone * 1e3:.0f} ms = {ttft_ratio:.2f}x '
          f'({report["ttft_goal"]}); each extra session allocates {per_session / 2**20:.1f} '
          f'MiB of caches here -> {out}')
    return report


if __name__ == '__main__':
    main()
