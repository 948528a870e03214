"""Quantized weights on the CPU (issue 27), side by side in one run:

1. the weights' bytes of the 11B shapes for each ``model.quantization`` (from the layer shapes,
   the per-layer formula checked against the mid model's measured bytes in int8);
2. decode of the mid model, int8 against float32 (ms per step at a stationary context,
   alternating, medians);
3. the toyworld scores (answers, revisions, false speech) of int8 against float32 on held-out
   episodes (200 by default).

Writes ``bench/results/quantization.json``. The GPU figures (decode tok/s, peak memory per mode
at 11B) are ``bench/gpu_bench.py --only quantization``.

    python bench/bench_quantization.py [--episodes 200]
"""
import argparse
import statistics
import tempfile
import time

from common import write_json, write_model  # bench/ is on sys.path as a script
import torch

from mossv_ros.engine import quantize
from mossv_ros.engine.config import EngineConfig
from mossv_ros.engine.runner import ModelRunner

GB = 1e9


def linear_bytes(n: int, k: int, mode: str, dtype_bytes: int, scale_bytes: int) -> float:
    """Stored bytes of an n x k linear weight (torchao's layouts): int8 and fp8 keep one
    scale per output row (int8 also a zero point), int4 a scale and a zero point per group of
    128 inputs in the model's dtype, two weights a byte."""
    if mode == 'none':
        return dtype_bytes * n * k
    if mode == 'int8':
        return n * k + n * scale_bytes + n
    if mode == 'fp8':
        return n * k + 4 * n
    return n * k / 2 + 2 * dtype_bytes * n * -(-k // 128)


def model_bytes(model, mode: str, dtype_bytes: int, scale_bytes: int) -> float:
    linear = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    total = sum(linear_bytes(*m.weight.shape, mode, dtype_bytes, scale_bytes)
                for m in model.modules() if isinstance(m, torch.nn.Linear))
    return total + sum(dtype_bytes * p.numel() for p in model.parameters()
                       if id(p) not in linear)


def bytes_by_mode(mid_path) -> dict:
    """11B weight bytes per mode; the formula checked on the mid model in bfloat16 and int8."""
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    from mossv_ros.engine.tiny import moss_11b_config_dict
    mid = ModelRunner(EngineConfig(model_path=str(mid_path), device='cpu', dtype='bfloat16',
                                   quantization='int8'))
    hf = mid.model.hf_model
    scale = next(m.weight for m in hf.modules() if isinstance(m, torch.nn.Linear)).scale
    predicted = model_bytes(_meta_like(hf), 'int8', 2, scale.element_size())
    check = {'mid_int8_measured_bytes': mid.weight_bytes, 'mid_int8_formula_bytes': predicted,
             'formula_matches': abs(predicted - mid.weight_bytes) < 1}
    cfg = moss_11b_config_dict()
    config = MllamaConfig(text_config=cfg['text_config'], vision_config=cfg['vision_config'],
                          image_token_index=cfg['image_token_index'])
    with torch.device('meta'):
        big = MllamaForConditionalGeneration(config)
    out = {mode: model_bytes(big, mode, 2, scale.element_size()) / GB
           for mode in quantize.QUANTIZATIONS}
    return {'gb_11b': out, 'check': check,
            'goals': {'int8 <= 12 GB': out['int8'] <= 12, 'int4 <= 7 GB': out['int4'] <= 7}}


def _meta_like(hf):
    """The mid model's shapes before quantization (a fresh copy on the meta device)."""
    from transformers import MllamaForConditionalGeneration
    with torch.device('meta'):
        return MllamaForConditionalGeneration(hf.config)


def decode_ms(mid_path, rounds: int) -> dict:
    """ms per decode step of the mid model (64 frames, about 2,800 tokens), int8 vs fp32."""
    from common import scene_images
    images = scene_images(16)
    runners = {}
    for mode in ('none', 'int8'):
        runner = ModelRunner(EngineConfig(model_path=str(mid_path), device='cpu',
                                          dtype='float32', max_frames=64, quantization=mode))
        s = runner.special
        session = runner.new_session(max_frames=64, max_context_tokens=4096)
        runner.start_session(session)
        encoded = runner.encode_frames(images)
        for i in range(64):
            frame = encoded[i % 16]
            frame.frame_index = i
            runner.feed(session, [s.silence, s.image], [(1, frame)])
        runner.feed(session, list(range(20, 200)) * 8)
        runners[mode] = (runner, session)
    times = {'none': [], 'int8': []}
    for _ in range(rounds):
        for mode, (runner, session) in runners.items():
            for _ in range(10):
                length, pos = session.kv_cache.length, session.next_pos
                t0 = time.perf_counter()
                int(torch.argmax(runner.feed(session, [11])))
                times[mode].append(time.perf_counter() - t0)
                session.kv_cache.length, session.next_pos = length, pos
    ms = {mode: statistics.median(v) * 1e3 for mode, v in times.items()}
    return {'ms_per_step': ms, 'tokens_per_s': {m: 1e3 / v for m, v in ms.items()},
            'int8_over_fp32_speed': ms['none'] / ms['int8']}


def toyworld(num_episodes: int) -> dict:
    """The three toyworld scores of int8 and float32 on held-out episodes."""
    from mossv_ros.engine.engine import StreamingEngine
    from mossv_ros.model_dirs import default_model_dir
    from mossv_ros.toyworld.evaluate import eval_episodes, score, stream_episode
    episodes = eval_episodes(num_episodes)
    out, said = {}, {}
    for mode in ('none', 'int8'):
        engine = StreamingEngine(EngineConfig(
            model_path=str(default_model_dir()), device='cpu', dtype='float32',
            quantization=mode, round_close_after_frames=0, round_close_after_sec=0.0))
        engine.start()
        try:
            assert engine.wait_ready(60), engine.stats().last_error
            said[mode] = []
            for i, ep in enumerate(episodes):
                if i:
                    engine.reset('next episode')
                    engine.wait_idle()
                said[mode].append(stream_episode(engine, ep, stamp_base=1000.0 * (i + 1)))
        finally:
            engine.stop()
        m = score(episodes, said[mode])
        out[mode] = {'answers': m['answer_accuracy_all'], 'revisions': m['revision_recall'],
                     'false_speech': m['false_speak_rate']}
    out['max_difference'] = max(abs(out['int8'][k] - out['none'][k]) for k in out['none'])
    out['episodes_identical'] = sum(a == b for a, b in zip(said['none'], said['int8']))
    out['episodes'] = num_episodes
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--episodes', type=int, default=200)
    parser.add_argument('--rounds', type=int, default=5)
    ns = parser.parse_args(argv)
    folder = tempfile.mkdtemp()
    from pathlib import Path
    mid = write_model('mid', Path(folder))
    report = {'bytes': bytes_by_mode(mid)}
    print('bytes', report['bytes'], flush=True)
    report['cpu_decode_mid'] = decode_ms(mid, ns.rounds)
    print('decode', report['cpu_decode_mid'], flush=True)
    report['toyworld'] = toyworld(ns.episodes)
    print('toyworld', report['toyworld'], flush=True)
    report['goals'] = {**report['bytes']['goals'],
                       'toyworld scores within 0.01': report['toyworld']['max_difference']
                       <= 0.01}
    path = write_json('quantization.json', report)
    print(f'wrote {path}')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
