"""GPU benchmark (issue 5, item 6): the 11B configuration with random bf16 weights on one GPU.

Measures, in one run on the same model: frame encode time, TTFT after a question with 256
frames already cached, decode tokens/s with no frames and while ingesting 1 fps (through the
real engine threads), batched decode of 1, 2 and 4 camera sessions, peak memory; and the
same model driven through plain transformers ``generate`` with every frame re-encoded after
the question (the upstream-style baseline).
Speed does not depend on weight values, so random weights of the real shapes are used
(moss-model.md sections 3 and 8). Prints one table and writes ``bench/results/gpu.json``.

    python bench/gpu_bench.py            # 11B on cuda (about 5 minutes on an H100)
    python bench/gpu_bench.py --tiny     # the section 9 tiny model on the CPU (CI smoke run)
"""
import argparse
import tempfile
import time

from common import (  # bench/ is on sys.path when run as a script
    decode_window,
    drain,
    machine,
    median,
    speaking_engine,
    verdict,
    write_json,
)
import torch

from mossv_ros.engine.config import EngineConfig, SamplingConfig
from mossv_ros.engine.events import Frame
from mossv_ros.engine.offline import offline_prompt_text
from mossv_ros.engine.runner import ModelRunner
from mossv_ros.engine.sampling import Sampler
from mossv_ros.engine.tiny import (
    moss_11b_config_dict,
    MOSS_SPECIAL_TOKENS,
    tiny_config_dict,
    TINY_SPECIAL_TOKENS,
    write_tokenizer,
)

QUESTION = 'What is the person in front of the camera holding right now?'
#: HBM bandwidth (bytes/s) and dense bf16 peak (FLOP/s) by device name (vendor datasheets).
DEVICE_LIMITS = [('H200', 4.8e12, 989e12), ('H100 NVL', 3.9e12, 835e12),
                 ('H100 PCIe', 2.0e12, 756e12), ('H100', 3.35e12, 989e12),
                 ('A100', 2.0e12, 312e12), ('L40S', 0.864e12, 362e12)]
FRAME_FLOPS_11B = 3.08e12  # moss-model.md section 8.2


def sync(device):
    if device.startswith('cuda'):
        torch.cuda.synchronize()


def build_runner(tiny: bool, device: str, dtype, max_frames: int):
    from transformers import MllamaConfig, MllamaForConditionalGeneration, PreTrainedTokenizerFast

    cfg = tiny_config_dict(max_positions=131072) if tiny else moss_11b_config_dict()
    folder = tempfile.mkdtemp()
    from pathlib import Path
    write_tokenizer(Path(folder), TINY_SPECIAL_TOKENS if tiny else MOSS_SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    config = MllamaConfig(text_config=cfg['text_config'], vision_config=cfg['vision_config'],
                          image_token_index=cfg['image_token_index'])
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = MllamaForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(('gate', 'cross_attn_attn_gate', 'cross_attn_mlp_gate')) \
                    and p.numel() == 1:
                p.fill_(0.5)
    engine_cfg = EngineConfig(model_path='random-weights', device=device,
                              dtype={torch.bfloat16: 'bfloat16',
                                     torch.float32: 'float32'}[dtype],
                              max_frames=max_frames, max_context_tokens=4096,
                              frame_rate_hz=30.0, max_frame_queue=8)
    return ModelRunner.from_model(engine_cfg, model, tokenizer), model


def images(n, px):
    from mossv_ros.toyworld.world import camera_frames
    return camera_frames(n, 1280 if px > 200 else 320, 720 if px > 200 else 240)


def bench_runner(runner, frames, device):
    """Encode ms per frame, then TTFT with ``len(frames)`` frames cached (runner level)."""
    s = runner.special
    enc = []
    for i in range(13):
        sync(device)
        t0 = time.perf_counter()
        runner.encode_frames(frames[i % len(frames):i % len(frames) + 1])
        sync(device)
        if i >= 3:
            enc.append(time.perf_counter() - t0)
    session = runner.new_session(max_frames=len(frames), max_context_tokens=4096)
    runner.start_session(session)
    for i, img in enumerate(frames):
        encoded = runner.encode_frames([img])[0]
        encoded.frame_index = i
        runner.feed(session, [s.silence, s.image], [(1, encoded)])
    q_ids = runner.question_ids(QUESTION)
    sampler = Sampler(SamplingConfig(), runner.suppressed_ids(), runner.vocab_size)
    saved = (session.kv_cache.length, session.next_pos)
    ttft = []
    for r in range(6):
        sync(device)
        t0 = time.perf_counter()
        sampler(runner.feed(session, q_ids))  # sampling reads the logits: implies a sync
        ttft.append(time.perf_counter() - t0)
        session.kv_cache.length, session.next_pos = saved
    return {'frame_encode_s': median(enc), 'ttft_s': median(ttft[1:]),
            'frames_cached': session.vision_cache.num_frames,
            'question_tokens': len(q_ids)}


def bench_engine(runner, frames, window_s, fill_frames):
    """Decode tokens/s through the engine threads: no frames vs ingesting 1 fps."""
    cfg = runner.config
    cfg.sampling = SamplingConfig(temperature=0.0, max_new_tokens=1_000_000)
    engine = speaking_engine(runner, cfg)
    out = {}
    try:
        i = 0
        while engine.stats().num_frames_cached < fill_frames:  # fill at ~20 fps
            engine.submit_frame(Frame(frames[i % len(frames)], stamp=i,
                                      arrival_ts=time.monotonic()))
            i += 1
            time.sleep(0.05)
            drain(engine)
        for fps in (0, 1):
            rate, lat = decode_window(engine, frames, fps, window_s)
            out[f'tokens_per_s_{fps}fps'] = rate
            out[f'frame_latency_p50_s_{fps}fps'] = median(lat) if lat else float('nan')
        out['frames_cached_during_decode'] = engine.stats().num_frames_cached
    finally:
        engine.stop()
    return out


def bench_hf_generate(runner, model, frames, device, new_tokens):
    """Upstream-style baseline: stock transformers ``generate`` over the offline prompt with
    every frame re-encoded after the question. Halves the frame count on OOM and says so."""
    n = len(frames)
    while n >= 1:
        try:
            ids = runner.tokenize(offline_prompt_text(QUESTION, n))
            input_ids = torch.tensor([ids], device=device)
            # Stock Mllama pads every image to max_num_tiles (4) tiles, as its processor does;
            # only the first tile is real (aspect ratio id 1 = 1x1).
            tiles = model.config.vision_config.max_num_tiles
            one = runner.pixel_values(frames[:n])  # (N, 3, H, W)
            pix = torch.zeros((1, n, tiles) + tuple(one.shape[1:]), dtype=one.dtype,
                              device=device)
            pix[0, :, 0] = one
            image_rows = (input_ids[0] == runner.special.image).nonzero().flatten().tolist()
            cam = torch.zeros(1, len(ids), n, tiles, dtype=torch.long, device=device)
            for f, row in enumerate(image_rows):
                cam[0, row:, f, 0] = 1  # cumulative: frame f visible from its <|image|> on
            ar_mask = torch.zeros(1, n, tiles, dtype=torch.long, device=device)
            ar_mask[..., 0] = 1
            kwargs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                          pixel_values=pix,
                          aspect_ratio_ids=torch.ones(1, n, dtype=torch.long, device=device),
                          aspect_ratio_mask=ar_mask, cross_attention_mask=cam,
                          do_sample=False)
            times = {}
            for k in (1, 1 + new_tokens):
                runs = []
                for _ in range(2):
                    sync(device)
                    t0 = time.perf_counter()
                    with torch.no_grad():
                        model.generate(**kwargs, max_new_tokens=k, min_new_tokens=k)
                    sync(device)
                    runs.append(time.perf_counter() - t0)
                times[k] = min(runs)
            return {'frames': n, 'tiles_per_frame_encoded': tiles, 'ttft_s': times[1],
                    'tokens_per_s': new_tokens / max(1e-9, times[1 + new_tokens] - times[1])}
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            n //= 2
    return {'frames': 0, 'ttft_s': float('nan'), 'tokens_per_s': float('nan')}


@torch.no_grad()
def bench_sessions(runner, frames, device, steps: int):
    """Batched decode of several sessions (issue 18): aggregate tokens/s of 1, 2 and 4
    sessions fed one token each per forward (``runner.feed_batch``), each with 16 cached
    frames and its own text. :returns: {'tokens_per_s': {n: ...}, 'cache_bytes_per_session'}."""
    out = {}
    enc = runner.encode_frames(frames[:16])
    s = runner.special
    for n in (1, 2, 4):
        sessions = runner.new_sessions(n)
        for i, session in enumerate(sessions):
            runner.start_session(session)
            for frame in enc:
                runner.feed(session, [s.silence, s.image], [(1, frame)])
            runner.feed(session, runner.question_ids(QUESTION)[:4 + i])  # unequal lengths
        tokens = [11] * n
        runner.feed_batch(sessions, tokens)  # warm-up
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            runner.feed_batch(sessions, tokens)
        sync(device)
        out[n] = n * steps / (time.perf_counter() - t0)
        row = sessions[0]
        per_session = (row.kv_cache.k.nbytes + row.kv_cache.v.nbytes
                       + row.vision_cache.k.nbytes + row.vision_cache.v.nbytes)
        del sessions
    return {'tokens_per_s': out, 'ratio_4_vs_1': out[4] / out[1],
            'cache_bytes_per_session': per_session}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--tiny', action='store_true',
                        help='the tiny config on the CPU (smoke run for CI)')
    parser.add_argument('--frames', type=int, default=256)
    parser.add_argument('--window', type=float, default=10.0, help='decode window, seconds')
    ns = parser.parse_args(argv)
    device = 'cpu' if ns.tiny or not torch.cuda.is_available() else 'cuda'
    if not ns.tiny and device == 'cpu':
        raise SystemExit('no CUDA device: use --tiny for the CPU smoke run')
    frames_n = min(ns.frames, 16) if ns.tiny else ns.frames
    window = min(ns.window, 2.0) if ns.tiny else ns.window
    dtype = torch.float32 if device == 'cpu' else torch.bfloat16
    t_start = time.monotonic()
    runner, model = build_runner(ns.tiny, device, dtype, max_frames=frames_n)
    print(f'built {"tiny" if ns.tiny else "11B"} model in {time.monotonic() - t_start:.0f} s '
          f'on {device} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params)',
          flush=True)
    px = runner.tile_px
    frames = images(min(frames_n, 64), px)
    frames = (frames * (frames_n // len(frames) + 1))[:frames_n]
    if device.startswith('cuda'):
        torch.cuda.reset_peak_memory_stats()
    report = {'machine': machine(), 'device': (torch.cuda.get_device_name()
                                               if device.startswith('cuda') else 'cpu'),
              'config': 'tiny' if ns.tiny else '11B', 'torch': torch.__version__,
              'attn_implementation': runner.attn_implementation}
    report['ours'] = bench_runner(runner, frames, device)
    print(f'  runner: {report["ours"]}', flush=True)
    report['ours'].update(bench_engine(runner, frames[:16], window, min(frames_n, 256)))
    if device.startswith('cuda'):
        report['ours']['peak_memory_bytes'] = torch.cuda.max_memory_allocated()
    print(f'  engine: {report["ours"]}', flush=True)
    report['sessions'] = bench_sessions(runner, frames, device, steps=8 if ns.tiny else 64)
    print(f'  sessions: {report["sessions"]}', flush=True)
    report['hf_generate'] = bench_hf_generate(runner, model, frames, device,
                                              new_tokens=8 if ns.tiny else 32)
    print(f'  transformers generate: {report["hf_generate"]}', flush=True)

    ours, hf = report['ours'], report['hf_generate']
    rows = [('frame encode (ms)', ours['frame_encode_s'] * 1e3, None),
            (f'TTFT, {ours["frames_cached"]} frames cached (s)', ours['ttft_s'],
             hf['ttft_s']),
            ('decode tokens/s, no frames', ours['tokens_per_s_0fps'], hf['tokens_per_s']),
            ('decode tokens/s, ingesting 1 fps', ours['tokens_per_s_1fps'], None)]
    rows += [(f'decode tokens/s, {n} sessions batched', v, None)
             for n, v in report['sessions']['tokens_per_s'].items()]
    if device.startswith('cuda'):
        name = report['device']
        bw, peak = next(((b, p) for key, b, p in DEVICE_LIMITS if key in name),
                        (float('nan'), float('nan')))
        text = model.model.language_model
        read = sum(p.numel() for n_, p in text.named_parameters()
                   if 'embed_tokens' not in n_ and '.cross_attn.k_proj' not in n_
                   and '.cross_attn.v_proj' not in n_) + model.lm_head.weight.numel()
        limits = {'decode_s_per_token': 2 * read / bw, 'frame_encode_s': FRAME_FLOPS_11B / peak}
        report['limits'] = limits
        report['ratios'] = {
            'decode_measured_over_floor': (1 / ours['tokens_per_s_1fps'])
            / limits['decode_s_per_token'],
            'encode_measured_over_floor': ours['frame_encode_s'] / limits['frame_encode_s']}
        report['targets'] = [
            {'target': 'TTFT with 256 cached <= 0.15 s', 'measured': ours['ttft_s'],
             'met': ours['ttft_s'] <= 0.15},
            {'target': 'decode >= 60 tokens/s (H100)', 'measured': ours['tokens_per_s_1fps'],
             'met': ours['tokens_per_s_1fps'] >= 60},
            {'target': 'frame encode <= 30 ms', 'measured': ours['frame_encode_s'],
             'met': ours['frame_encode_s'] <= 0.030},
            {'target': '4 sessions batched >= 2x the tokens/s of one',
             'measured': report['sessions']['ratio_4_vs_1'],
             'met': report['sessions']['ratio_4_vs_1'] >= 2.0}]
    report['wall_s'] = time.monotonic() - t_start
    print(f'\n{"metric":40s} {"mossv_ros":>12s} {"transformers":>14s}')
    for label, a, b in rows:
        print(f'{label:40s} {a:12.3f} {"" if b is None else f"{b:14.3f}"}')
    if hf['frames'] and hf['frames'] != ours['frames_cached']:
        print(f'(transformers baseline ran with {hf["frames"]} frames: out of memory above)')
    for t in report.get('targets', []):
        print(f'{verdict(t["met"])}  {t["target"]}: {t["measured"]:.4f}')
    for k, v in report.get('ratios', {}).items():
        print(f'{k}: {v:.2f}x')
    path = write_json('gpu_tiny.json' if ns.tiny else 'gpu.json', report)
    print(f'wrote {path} in {report["wall_s"]:.0f} s')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
