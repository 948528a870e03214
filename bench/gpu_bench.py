"""GPU benchmark (issue 24): the 11B configuration with random bf16 weights on one GPU.

Stages, each written to the JSON as soon as it ends (a later failure keeps the earlier
figures), measured side by side in one run on the same model:

1. ``correctness``: the tiny model's streamed logits on the GPU (fp32 and bf16, CUDA graphs)
   against the CPU in fp32; held-out toyworld episodes streamed through the engine in bf16 on
   the GPU against fp32 on the CPU (greedy: the same utterances); the device normalization
   against the host's; which step parts run under ``torch.cuda.set_sync_debug_mode('error')``
   (no hidden synchronisation).
2. ``step``: one decode step with ``--frames`` frames cached, eager and replayed as a CUDA
   graph: wall ms, GPU ms (CUDA events), kernel launches and summed kernel ms per step
   (``torch.profiler``); SDPA and matmul attention; TTFT of a question (graph and eager).
   With ``--inductor`` also the step compiled by ``torch.compile`` (inductor: fused
   elementwise kernels) and then captured, for one shape, beside the others: its compile
   seconds, speed and logits against the eager step's (not what the engine runs: an
   experiment toward the 150 tok/s stretch goal).
3. ``encode``: a frame's host letterbox, its device encode (graph and eager), and the whole
   ``runner.encode_frames``.
4. ``engine``: decode tokens/s through the engine threads, idle and while ingesting 1 fps,
   against the bare graph step's rate.
5. ``sessions``: batched decode of 1, 2 and 4 sessions (CUDA graphs per batch size).
6. ``hf_generate`` (``--hf``): stock transformers ``generate`` with every frame re-encoded.

Speed does not depend on weight values, so random weights of the real shapes are used
(docs/model.md sections 3 and 8). Prints one table and writes ``gpu.json`` (``--out``).

    python bench/gpu_bench.py --out DIR     # 11B on cuda (about 4 minutes on an H200)
    python bench/gpu_bench.py --tiny        # the section 9 tiny model on the CPU (CI smoke)
"""
import argparse
import copy
import json
from pathlib import Path
import tempfile
import time
import traceback

from common import (  # bench/ is on sys.path when run as a script
    decode_window,
    drain,
    machine,
    median,
    RESULTS,
    speaking_engine,
    verdict,
)
import numpy as np
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
    write_tiny_checkpoint,
    write_tokenizer,
)

QUESTION = 'What is the person in front of the camera holding right now?'
#: HBM bandwidth (bytes/s) and dense bf16 peak (FLOP/s) by device name (vendor datasheets).
DEVICE_LIMITS = [('H200', 4.8e12, 989e12), ('H100 NVL', 3.9e12, 835e12),
                 ('H100 PCIe', 2.0e12, 756e12), ('H100', 3.35e12, 989e12),
                 ('A100', 2.0e12, 312e12), ('L40S', 0.864e12, 362e12)]
FRAME_FLOPS_11B = 3.08e12  # docs/model.md section 8.2


def sync(device):
    if device.startswith('cuda'):
        torch.cuda.synchronize()


class Report(dict):
    """The JSON report, rewritten after every stage."""

    def __init__(self, path: Path, **kw):
        super().__init__(**kw)
        self.path = path

    def stage(self, name, fn, *args, **kw):
        t0 = time.monotonic()
        print(f'== {name}', flush=True)
        try:
            self[name] = fn(*args, **kw)
        except Exception as exc:  # noqa: BLE001 - keep the other stages' figures
            traceback.print_exc()
            self[name] = {'error': f'{type(exc).__name__}: {exc}'}
        self[name]['stage_s'] = time.monotonic() - t0
        self.save()
        print(f'   {json.dumps(self[name], default=float)[:1500]}', flush=True)
        return self[name]

    def save(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self, indent=2, default=float))


# ----------------------------------------------------------------------------- models
def build_runner(tiny: bool, device: str, dtype, max_frames: int, cuda_graphs='auto',
                 quantization='none'):
    """A runner over random weights of the tiny or 11B shapes (in memory, no checkpoint)."""
    from transformers import MllamaConfig, MllamaForConditionalGeneration, PreTrainedTokenizerFast

    cfg = tiny_config_dict(max_positions=131072) if tiny else moss_11b_config_dict()
    folder = tempfile.mkdtemp()
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
                              frame_rate_hz=30.0, max_frame_queue=8, cuda_graphs=cuda_graphs,
                              quantization=quantization)
    return ModelRunner.from_model(engine_cfg, model, tokenizer), model


def images(n, px):
    from mossv_ros.toyworld.world import camera_frames
    return camera_frames(n, 1280 if px > 200 else 320, 720 if px > 200 else 240)


def fill(runner, session, encoded, n):
    """``n`` frames into a session as a quiet stream puts them: [<|silence|>, <|image|>]."""
    s = runner.special
    for i in range(n):
        frame = encoded[i % len(encoded)]
        frame.frame_index = i
        runner.feed(session, [s.silence, s.image], [(1, frame)])


# ----------------------------------------------------------------------------- 1. correctness
def stage_correctness(device: str, num_episodes: int):
    """Tiny model: streamed logits on ``device`` (fp32, bf16) vs the CPU in fp32; toyworld
    episodes through the engine (bf16 on the device vs fp32 on the CPU); normalization; which
    parts of a step run with synchronisation forbidden."""
    from mossv_ros.engine.preprocess import normalize_tiles
    out = {}
    folder = write_tiny_checkpoint(Path(tempfile.mkdtemp()) / 'tiny', seed=0)
    rng = np.random.default_rng(0)
    pictures = [rng.integers(0, 255, (90, 120, 3), dtype=np.uint8) for _ in range(4)]

    def stream(dev, dtype):
        runner = ModelRunner(EngineConfig(model_path=str(folder), device=dev, dtype=dtype,
                                          max_frames=8, max_context_tokens=2048))
        sessions = runner.new_sessions(2)
        path = runner.capture_graphs(sessions)
        s, rows = runner.special, []
        encoded = runner.encode_frames(pictures)
        for session in sessions:
            rows.append(runner.start_session(session).float().cpu())
        for i, frame in enumerate(encoded):
            frame.frame_index = i
            rows.append(runner.feed(sessions[0], [s.silence, s.image], [(1, frame)]).cpu())
            rows.append(runner.feed(sessions[0], list(range(30, 30 + 20 * i + 3))).cpu())
            rows.extend(runner.feed_batch(sessions, [40 + i, 50 + i]).cpu())
        return torch.stack(rows).float(), path

    ref, _ = stream('cpu', 'float32')
    for dtype in ('float32', 'bfloat16'):
        got, path = stream(device, dtype)
        out[f'tiny_{dtype}'] = {
            'rows': len(ref), 'max_abs_dlogit': float((got - ref).abs().max()),
            'argmax_equal': int((got.argmax(-1) == ref.argmax(-1)).sum()),
            'decode_path': path}
    out['tiny_greedy'] = greedy_parity(folder, device, pictures)
    tiles = torch.from_numpy(np.stack([np.asarray(p[:80, :80]) for p in pictures]))
    out['normalize_equal'] = bool(torch.equal(normalize_tiles(tiles.to(device)).cpu(),
                                              normalize_tiles(tiles)))
    out['toyworld'] = toyworld_parity(device, num_episodes)
    out['sync_free'] = sync_checks(device, folder)
    return out


def greedy_parity(folder, device, pictures, steps: int = 48):
    """The tiny model generating greedily from its own tokens (a frame every 12) on the CPU
    in fp32 and on ``device`` in fp32 and bf16: how many tokens agree with the CPU's."""
    out = {}
    runs = {}
    for dev, dtype in (('cpu', 'float32'), (device, 'float32'), (device, 'bfloat16')):
        runner = ModelRunner(EngineConfig(model_path=str(folder), device=dev, dtype=dtype,
                                          max_frames=8, max_context_tokens=2048))
        session = runner.new_session()
        runner.capture_graphs([session])
        sampler = Sampler(SamplingConfig(), runner.suppressed_ids(), runner.vocab_size)
        s = runner.special
        encoded = runner.encode_frames(pictures)
        logits = runner.start_session(session)
        tokens = []
        for i in range(steps):
            token = int(sampler.sample(logits[None], [tokens[-8:]])[0])
            tokens.append(token)
            feed = [token]
            frames = []
            if i % 12 == 11:
                frames = [(1, encoded[(i // 12) % len(encoded)])]
                frames[0][1].frame_index = i
                feed.append(s.image)
            logits = runner.feed(session, feed, frames)
        runs[f'{dev}_{dtype}'] = tokens
    ref = runs['cpu_float32']
    for key, tokens in runs.items():
        same = next((i for i, (a, b) in enumerate(zip(tokens, ref)) if a != b), len(ref))
        out[key] = {'tokens': len(tokens), 'equal_prefix': same, 'equal': tokens == ref}
    return out


def toyworld_parity(device: str, num_episodes: int = 3):
    """Held-out toyworld episodes (greedy) on the CPU in fp32 and on ``device`` in bf16 and
    fp32 (CUDA graphs): the utterances, compared."""
    from mossv_ros.engine.engine import StreamingEngine
    from mossv_ros.model_dirs import default_model_dir
    from mossv_ros.toyworld.evaluate import eval_episodes, stream_episode

    episodes = eval_episodes(num_episodes)
    said = {}
    for dev, dtype in (('cpu', 'float32'), (device, 'float32'), (device, 'bfloat16')):
        engine = StreamingEngine(EngineConfig(model_path=str(default_model_dir()), device=dev,
                                              dtype=dtype, round_close_after_frames=0,
                                              round_close_after_sec=0.0))
        engine.start()
        try:
            assert engine.wait_ready(120), engine.stats().last_error
            runs = []
            for i, ep in enumerate(episodes):
                if i:
                    engine.reset('next episode')
                    engine.wait_idle()
                runs.append([(u.frame, u.text) for u in
                             stream_episode(engine, ep, stamp_base=1000.0 * (i + 1))])
            said[f'{dev}_{dtype}'] = (runs, engine.stats().decode_path)
        finally:
            engine.stop()
    ref = said['cpu_float32'][0]

    def first_difference(runs):
        for e, (got, want) in enumerate(zip(runs, ref)):
            if got != want:
                i = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b),
                         min(len(got), len(want)))
                return {'episode': e, 'utterance': i, 'got': got[i:i + 2],
                        'cpu_fp32': want[i:i + 2]}
        return None
    return {key: {'decode_path': path, 'utterances': sum(len(r) for r in runs),
                  'equal_to_cpu_fp32': runs == ref, 'first_difference': first_difference(runs)}
            for key, (runs, path) in said.items()}


def sync_checks(device: str, folder):
    """Run each part of a step with every synchronising CUDA call made an error."""
    if not device.startswith('cuda'):
        return {'skipped': 'no CUDA'}
    runner = ModelRunner(EngineConfig(model_path=str(folder), device=device, max_frames=8,
                                      max_context_tokens=2048))
    s = runner.special
    out = {}
    graphed = runner.new_sessions(3)
    runner.capture_graphs(graphed)
    eager = runner.new_sessions(3)
    frame = runner.encode_frames([np.full((60, 80, 3), 99, np.uint8)])[0]
    for session in graphed + eager:
        runner.start_session(session)
    greedy = Sampler(SamplingConfig(), runner.suppressed_ids(), runner.vocab_size)
    sampling = Sampler(SamplingConfig(temperature=0.8, top_k=20, top_p=0.9,
                                      repetition_penalty=1.2), runner.suppressed_ids(),
                       runner.vocab_size)
    torch.cuda.synchronize()
    checks = {
        'graph_decode_batch': lambda: runner.feed_batch(graphed, [11, 12, 13]),
        'graph_decode_one_of_three': lambda: runner.feed(graphed[1], [14]),
        'graph_prefill_chunks': lambda: runner.feed(graphed[0], list(range(20, 170))),
        'frame_insert_and_step': lambda: runner.feed(graphed[2], [s.silence, s.image],
                                                     [(1, frame)]),
        'eager_decode_batch': lambda: runner.feed_batch(eager, [11, 12, 13]),
        'eager_prefill': lambda: runner.feed(eager[0], list(range(20, 90))),
        'sample_greedy': lambda: greedy.sample(torch.randn(3, runner.vocab_size,
                                                           device=device), [[], [], []]),
        'sample_top_k_top_p_penalty': lambda: sampling.sample(
            torch.randn(3, runner.vocab_size, device=device), [[5, 6], [], [7]]),
        'sample_a_stream_per_camera': lambda: sampling.sample(
            torch.randn(3, runner.vocab_size, device=device), [[5, 6], [], [7]],
            ['head', 'wrist', 'rear']),
    }
    for name, fn in checks.items():
        fn()  # once unguarded (first-use allocations, generator set-up)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode('error')
        try:
            fn()
            out[name] = 'no sync'
        except RuntimeError as exc:
            out[name] = f'SYNC: {str(exc).splitlines()[0][:160]}'
        finally:
            torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()
    return out


# ----------------------------------------------------------------------------- 2. step
def profile_steps(step, n, device):
    """(kernel launches per step, summed kernel ms per step) of ``n`` steps."""
    if not device.startswith('cuda'):
        return float('nan'), float('nan')
    from torch.profiler import profile, ProfilerActivity
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events()
               if str(getattr(e, 'device_type', '')).endswith('CUDA')
               and not e.name.startswith(('Memcpy', 'Memset'))]
    total_us = sum(e.time_range.elapsed_us() for e in kernels)
    return len(kernels) / n, total_us / 1e3 / n


def time_steps(step, n, device):
    """(median wall ms, median GPU ms by CUDA events) of ``n`` steps, each synchronised."""
    walls, gpus = [], []
    for _ in range(n):
        sync(device)
        if device.startswith('cuda'):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(
                enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        step()
        if device.startswith('cuda'):
            end.record()
        sync(device)
        walls.append((time.perf_counter() - t0) * 1e3)
        if device.startswith('cuda'):
            gpus.append(start.elapsed_time(end))
    return median(walls), median(gpus) if gpus else float('nan')


def rolled_back(session, fn):
    """``fn`` made repeatable: each call leaves the session's context length and next position
    as they were (the step's cache writes land in the same slots every time).
    :returns: a function returning what ``fn`` returns."""
    def run():
        length, pos = session.kv_cache.length, session.next_pos
        try:
            return fn()
        finally:
            session.kv_cache.length, session.next_pos = length, pos
    return run


def inductor_model(model):
    """A shallow copy of ``model`` (the same modules and weights) whose text step is compiled
    by ``torch.compile`` (inductor, whole graph, static shapes: one compile per step shape)."""
    variant = copy.copy(model)
    variant.forward_step = torch.compile(model.forward_step, fullgraph=True, dynamic=False)
    return variant


def inductor_variant(runner, pool, session, device, out):
    """The step of :func:`inductor_model` over ``pool`` for its one full-span decode shape
    (captured on CUDA; on the CPU replayed eagerly). Writes ``out['graph_inductor']``:
    compile seconds and the largest logit difference from the eager step.
    :returns: the variant's :class:`~mossv_ros.engine.graphs.StepGraphs`, or None (the error
    is in ``out``)."""
    from mossv_ros.engine.graphs import StepGraphs

    def logits_with(graphs):
        runner.graphs = graphs
        return rolled_back(session, lambda: runner.feed(session, [11]).float().clone())()

    saved = runner.graphs
    try:
        t0 = time.perf_counter()
        variant = StepGraphs(inductor_model(runner.model), pool, prefill_tokens=())
        variant.decode_shapes = [variant.decode_shape(1, pool.max_frames)]
        if device.startswith('cuda'):
            variant.capture()  # compiles in the warm-up runs
        compiled = logits_with(variant)  # (on the CPU: compiles here)
        out['graph_inductor'] = {'compile_s': time.perf_counter() - t0}
        eager = logits_with(None)
        out['graph_inductor']['max_abs_dlogit_vs_eager'] = float((compiled - eager).abs().max())
        out['graph_inductor']['argmax_equal'] = bool(compiled.argmax() == eager.argmax())
        return variant
    except Exception as exc:  # noqa: BLE001 - an experiment that cannot run: say so
        out['graph_inductor'] = {'error': f'{type(exc).__name__}: {exc}'[:300]}
        return None
    finally:
        runner.graphs = saved


def stage_step(runner, frames, device, n_frames, inductor=False):
    """Decode step and TTFT with ``n_frames`` cached: eager vs CUDA graph, SDPA vs matmul
    (``inductor``: and the step compiled by inductor, :func:`inductor_variant`)."""
    from mossv_ros.engine.graphs import StepGraphs

    out = {'frames_cached': n_frames}
    session = runner.new_session(max_frames=n_frames, max_context_tokens=4096)
    pool = session.pool
    out['decode_path'] = runner.capture_graphs([session])
    graphs = runner.graphs
    runner.start_session(session)
    encoded = runner.encode_frames(frames[:16])
    fill(runner, session, encoded, n_frames)
    sampler = Sampler(SamplingConfig(), runner.suppressed_ids(), runner.vocab_size)
    out['context_tokens'] = session.kv_cache.length

    def decode():
        logits = runner.feed(session, [11])
        return sampler.sample(logits[None], [[]]).tolist()

    def rollback(fn):
        return rolled_back(session, fn)

    variants = {'graph_sdpa': graphs}
    if device.startswith('cuda') and graphs is not None:
        from torch.nn.attention import SDPBackend
        others = {'graph_matmul_attention': {'attn_implementation': 'eager'},
                  'graph_unfused': {'fused': False},
                  'graph_cudnn_first': {'sdpa_backends': [SDPBackend.CUDNN_ATTENTION]
                                        + list(runner.model.sdpa_backends)}}
        for name, attrs in others.items():
            model = copy.copy(runner.model)  # the same modules, another kernel choice
            for key, value in attrs.items():
                setattr(model, key, value)
            try:
                variant = StepGraphs(model, pool, prefill_tokens=())
                variant.capture()
                variants[name] = variant
            except Exception as exc:  # noqa: BLE001 - a variant that cannot run: say so
                out[name] = {'error': f'{type(exc).__name__}: {exc}'[:300]}
    if inductor:
        variant = inductor_variant(runner, pool, session, device, out)
        if variant is not None:
            variants['graph_inductor'] = variant
    variants['eager_sdpa'] = None
    for name, variant in variants.items():
        runner.graphs = variant
        step = rollback(decode)
        step()
        n = 30 if variant is None or not device.startswith('cuda') else 200
        wall, gpu = time_steps(step, n, device)
        launches, kernel_ms = profile_steps(step, 5, device)
        out[name] = {**out.get(name, {}), 'wall_ms': wall, 'gpu_ms': gpu,
                     'kernel_launches': launches, 'kernel_ms': kernel_ms,
                     'tokens_per_s': 1e3 / wall}
        print(f'   {name}: {out[name]}', flush=True)
    # (the best of what the engine runs: the inductor step is an experiment beside them)
    best = min((k for k in out if k.startswith('graph') and k != 'graph_inductor'
                and 'wall_ms' in out[k]), key=lambda k: out[k]['wall_ms'], default='eager_sdpa')
    out['best'] = best
    q_ids = runner.question_ids(QUESTION)
    out['question_tokens'] = len(q_ids)

    def ask():
        sampler.sample(runner.feed(session, q_ids)[None], [[]]).tolist()
    ttft_variants = [('ttft_graph', graphs), ('ttft_eager', None)]
    if device.startswith('cuda') and graphs is not None:
        model = copy.copy(runner.model)  # matmul attention for the prefill chunk too
        model.attn_implementation = 'eager'
        matmul = StepGraphs(model, pool)
        matmul.capture()
        ttft_variants.append(('ttft_graph_matmul_attention', matmul))
    for name, variant in ttft_variants:
        runner.graphs = variant
        rollback(ask)()
        out[name + '_s'] = time_steps(rollback(ask), 6, device)[0] / 1e3
    runner.graphs = graphs
    return out


# ----------------------------------------------------------------------------- 3. encode
def stage_encode(runner, frames, device):
    from mossv_ros.engine.preprocess import letterbox
    out = {}
    picture = frames[0]
    host = []
    for i in range(10):
        t0 = time.perf_counter()
        letterbox(frames[i % len(frames)], runner.tile_px)
        host.append(time.perf_counter() - t0)
    out['host_letterbox_ms'] = median(host) * 1e3
    tile = letterbox(picture, runner.tile_px)
    graph = runner.frames.graph
    if graph is not None:  # on the encoder stream: wall time of a synchronised replay
        stream = runner.frames.stream
        with torch.cuda.stream(stream):
            graph.encode(tile)
        out['device_encode_graph_ms'] = time_steps(
            lambda: _on(stream, lambda: graph.encode(tile)), 20, device)[0]
    tiles = torch.from_numpy(tile[None]).to(runner.model.device)
    runner.model.encode_tiles(tiles)
    wall, gpu = time_steps(lambda: runner.model.encode_tiles(tiles), 10, device)
    out['device_encode_eager_ms'] = wall
    out['device_encode_eager_gpu_ms'] = gpu
    out['encode_frames_ms'] = time_steps(lambda: runner.encode_frames([picture]), 10,
                                         device)[0]
    out['encode_frames_4_ms_per_frame'] = time_steps(
        lambda: runner.encode_frames(frames[:4]), 5, device)[0] / 4
    return out


def _on(stream, fn):
    with torch.cuda.stream(stream):
        return fn()


# ----------------------------------------------------------------------------- 4. engine
def stage_engine(runner, frames, window_s, fill_frames):
    """Decode tokens/s through the engine threads: no frames vs ingesting 1 fps."""
    cfg = runner.config
    cfg.sampling = SamplingConfig(temperature=0.0, max_new_tokens=1_000_000)
    engine = speaking_engine(runner, cfg)
    out = {'decode_path': engine.stats().decode_path}
    try:
        i, deadline = 0, time.monotonic() + 120
        while engine.stats().num_frames_cached < fill_frames and time.monotonic() < deadline:
            engine.submit_frame(Frame(frames[i % len(frames)], stamp=i,
                                      arrival_ts=time.monotonic()))
            i += 1
            time.sleep(0.01)
            drain(engine)
        out['frames_cached_before'] = engine.stats().num_frames_cached
        out['host_split'] = engine_host_split(engine, window_s)
        for fps in (0, 1):
            rate, lat = decode_window(engine, frames, fps, window_s, stamp_base=i + 1)
            i += 1 + int(window_s * fps) + 1
            out[f'tokens_per_s_{fps}fps'] = rate
            out[f'frame_latency_p50_s_{fps}fps'] = median(lat) if lat else float('nan')
        stats = engine.stats()
        out['frames_cached_during_decode'] = stats.num_frames_cached
        out['num_session_resets'] = stats.num_session_resets
    finally:
        engine.stop()
    return out


def engine_host_split(engine, window_s):
    """Where an engine step's time goes (idle, speaking): mean ms per step in the step, in
    ``runner.feed`` (the replay and its host work), in sampling (it waits for the GPU)."""
    runner, sampler = engine.runner, engine.sampler
    spent = {'step': 0.0, 'feed': 0.0, 'sample': 0.0}
    counts = dict.fromkeys(spent, 0)

    def timed(name, fn):
        def run(*args, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                spent[name] += time.perf_counter() - t0
                counts[name] += 1
        return run
    saved = engine.step, runner.feed, sampler.sample
    engine.step, runner.feed = timed('step', engine.step), timed('feed', runner.feed)
    sampler.sample = timed('sample', sampler.sample)
    try:
        time.sleep(window_s / 2)
    finally:
        engine.step, runner.feed, sampler.sample = saved
    drain(engine)
    return {f'{k}_ms': 1e3 * v / max(1, counts[k]) for k, v in spent.items()} | {
        'steps': counts['step']}


# ----------------------------------------------------------------------------- 5. sessions
@torch.no_grad()
def stage_sessions(runner, frames, device, steps: int):
    """Batched decode of several sessions: aggregate tokens/s of 1, 2 and 4 sessions fed one
    token each per step (``runner.feed_batch``, a CUDA graph per batch size), each with 16
    cached frames and its own text."""
    out = {}
    enc = runner.encode_frames(frames[:16])
    sampler = Sampler(SamplingConfig(), runner.suppressed_ids(), runner.vocab_size)
    for n in (1, 2, 4):
        sessions = runner.new_sessions(n)
        path = runner.capture_graphs(sessions)
        for i, session in enumerate(sessions):
            runner.start_session(session)
            fill(runner, session, enc, 16)
            runner.feed(session, runner.question_ids(QUESTION)[:4 + i])  # unequal lengths
        tokens = [11] * n

        def step():
            sampler.sample(runner.feed_batch(sessions, tokens), [[]] * n).tolist()
        step()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        out[n] = n * steps / (time.perf_counter() - t0)
        out[f'decode_path_{n}'] = path
        out['cache_bytes_per_session'] = sessions[0].pool.nbytes // n
        sessions = step = None  # free the pool and its graphs
        if device.startswith('cuda'):
            torch.cuda.empty_cache()
    return {'tokens_per_s': {k: v for k, v in out.items() if isinstance(k, int)},
            'ratio_4_vs_1': out[4] / out[1],
            **{k: v for k, v in out.items() if not isinstance(k, int)}}


# ----------------------------------------------------------------------------- 6. quantized
def stage_quantization(tiny: bool, device: str, frames, modes, n_frames: int = 64):
    """Each ``model.quantization`` on a fresh model of the same shapes: the weights' bytes,
    one decode step (CUDA graph where captured) with ``n_frames`` cached, a frame encode, the
    peak memory; a mode that cannot run says why."""
    import gc
    out = {}
    dtype = torch.float32 if device == 'cpu' else torch.bfloat16
    for mode in modes:
        runner = model = session = None
        gc.collect()
        if device.startswith('cuda'):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            runner, model = build_runner(tiny, device, dtype, n_frames, quantization=mode)
            session = runner.new_session(max_frames=n_frames, max_context_tokens=4096)
            path = runner.capture_graphs([session])
            runner.start_session(session)
            encoded = runner.encode_frames(frames[:16])
            fill(runner, session, encoded, n_frames)
            sampler = Sampler(SamplingConfig(), runner.suppressed_ids(), runner.vocab_size)

            def step():
                length, pos = session.kv_cache.length, session.next_pos
                sampler.sample(runner.feed(session, [11])[None], [[]]).tolist()
                session.kv_cache.length, session.next_pos = length, pos
            step()
            wall = time_steps(step, 10 if tiny else 100, device)[0]
            encode = time_steps(lambda: runner.encode_frames(frames[:1]), 5, device)[0]
            out[mode] = {'weight_bytes': runner.weight_bytes,
                         'quantized_layers': runner.num_quantized_layers,
                         'decode_path': path, 'decode_ms': wall, 'tokens_per_s': 1e3 / wall,
                         'encode_frames_ms': encode}
            if device.startswith('cuda'):
                out[mode]['peak_memory_bytes'] = torch.cuda.max_memory_allocated()
        except Exception as exc:  # noqa: BLE001 - a mode that cannot run here: why
            out[mode] = {'error': f'{type(exc).__name__}: {exc}'[:400]}
        print(f'   {mode}: {out[mode]}', flush=True)
    return out


# ----------------------------------------------------------------------------- 7. memory
def write_random_checkpoint(tiny: bool, device: str, folder: Path) -> Path:
    """A checkpoint on disk in the MOSS layout with random weights of the tiny or 11B shapes
    (11B: bfloat16, made on the GPU, written shard by shard of 5 GB with an index, as
    published checkpoints are laid out)."""
    from safetensors.torch import save_file

    from mossv_ros.engine.checkpoint import _legacy_key
    if tiny:
        return write_tiny_checkpoint(folder / 'tiny', seed=0, max_shard_bytes=40_000)
    _, model = build_runner(False, device, torch.bfloat16, 8, cuda_graphs='off')
    path = folder / '11b'
    path.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    shard, size, weight_map = {}, 0, {}

    def flush():
        save_file(shard, str(path / f'part{len(set(weight_map.values())) + 1}.safetensors'))
    for key, tensor in state.items():
        if shard and size + tensor.nbytes > 5 << 30:
            flush()
            weight_map.update({k: f'part{len(set(weight_map.values())) + 1}.safetensors'
                               for k in shard})
            shard, size = {}, 0
        shard[_legacy_key(key)] = tensor.detach().to('cpu').contiguous()
        size += tensor.nbytes
    flush()
    weight_map.update({k: f'part{len(set(weight_map.values())) + 1}.safetensors'
                       for k in shard})
    (path / 'model.safetensors.index.json').write_text(json.dumps({'weight_map': weight_map}))
    (path / 'config.json').write_text(json.dumps(moss_11b_config_dict()))
    write_tokenizer(path, MOSS_SPECIAL_TOKENS)
    del model, state
    torch.cuda.empty_cache()
    return path


def stage_memory(tiny: bool, device: str, frames, cases=(('int8', 16), ('none', 24),
                                                         ('int8', 24))):
    """The streaming load of a checkpoint on disk under a memory cap (``engine.
    max_device_memory_bytes``, enforced on CUDA with ``set_per_process_memory_fraction``: a
    robot's 16 or 24 GiB card simulated on a larger one): per (mode, cap GiB) the plan, the
    peak device memory during the load and after capture and decode, the final weights, and
    decode tok/s with 256 frames cached. Goals (issue 33): int8 + 1 camera loads and decodes
    under 16 GiB, bf16 under 24; load peak <= final + 1 GiB; plan within 10 % of the peak."""
    import gc
    folder = write_random_checkpoint(tiny, device, Path(tempfile.mkdtemp()))
    cuda = device.startswith('cuda')
    n_frames = 16 if tiny else 256
    out = {}
    for mode, cap_gib in cases:
        name = f'{mode}_{cap_gib}gib'
        runner = session = None
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            cfg = EngineConfig(model_path=str(folder), device=device, quantization=mode,
                               max_device_memory_bytes=cap_gib << 30, max_frames=n_frames,
                               max_context_tokens=4096, frame_rate_hz=30.0)
            t0 = time.perf_counter()
            runner = ModelRunner(cfg)
            res = {'load_s': time.perf_counter() - t0,
                   'plan_bytes': runner.memory_plan.total_bytes,
                   'plan_weight_bytes': runner.memory_plan.weight_bytes,
                   'weight_bytes': runner.weight_bytes}
            if cuda:
                res['load_peak_bytes'] = torch.cuda.max_memory_allocated()
                res['after_load_bytes'] = torch.cuda.memory_allocated()
            session = runner.new_session()
            res['decode_path'] = runner.capture_graphs([session])
            runner.start_session(session)
            fill(runner, session, runner.encode_frames(frames[:16]), n_frames)

            def step():
                rolled_back(session, lambda: runner.feed(session, [11]))()
            step()
            wall = time_steps(step, 10 if tiny else 100, device)[0]
            res.update(decode_ms=wall, tokens_per_s=1e3 / wall)
            if cuda:
                peak = torch.cuda.max_memory_allocated()
                res.update(peak_bytes=peak, plan_over_peak=res['plan_bytes'] / peak)
                res['goals'] = {
                    f'loads and decodes under {cap_gib} GiB': verdict(peak <= cap_gib << 30),
                    'load peak <= final + 1 GiB': verdict(
                        res['load_peak_bytes'] <= res['after_load_bytes'] + (1 << 30)),
                    'plan within 10 % of the peak': verdict(
                        abs(res['plan_bytes'] - peak) <= 0.1 * peak)}
            out[name] = res
        except Exception as exc:  # noqa: BLE001 - a case that cannot run: why
            out[name] = {'error': f'{type(exc).__name__}: {exc}'[:600]}
        finally:
            runner = session = None
            if cuda:
                torch.cuda.set_per_process_memory_fraction(1.0)
        print(f'   {name}: {out[name]}', flush=True)
    return out


# ----------------------------------------------------------------------------- 8. baseline
def stage_hf_generate(runner, model, frames, device, new_tokens):
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


# ----------------------------------------------------------------------------- report
def targets(report):
    """The issue's goals, PASS/MISS with the measured value."""
    step, eng = report.get('step', {}), report.get('engine', {})
    enc, ses = report.get('encode', {}), report.get('sessions', {})
    cor = report.get('correctness', {})
    best = step.get(step.get('best', ''), {})
    bare = best.get('tokens_per_s', float('nan'))
    idle, ingest = eng.get('tokens_per_s_0fps', float('nan')), eng.get('tokens_per_s_1fps',
                                                                        float('nan'))
    encode_ms = enc.get('device_encode_graph_ms', enc.get('device_encode_eager_ms',
                                                          float('nan')))
    fp32 = cor.get('tiny_float32', {}).get('max_abs_dlogit', float('nan'))
    bf16_equal = any(k.endswith('bfloat16') and v.get('equal')
                     for k, v in cor.get('tiny_greedy', {}).items())
    rows = [('decode through the engine >= 100 tok/s (stretch 150)', ingest, ingest >= 100),
            ('engine tok/s >= 0.9 x bare graph step', idle / bare, idle / bare >= 0.9),
            ('decode ingesting 1 fps >= 0.95 x idle', ingest / idle, ingest / idle >= 0.95),
            ('TTFT <= 30 ms (s)', step.get('ttft_graph_s', float('nan')),
             step.get('ttft_graph_s', 1) <= 0.030),
            ('frame encode on the device <= 10 ms', encode_ms, encode_ms <= 10),
            ('4 sessions batched >= 3.5x one', ses.get('ratio_4_vs_1', float('nan')),
             ses.get('ratio_4_vs_1', 0) >= 3.5),
            ('CUDA fp32 logits vs CPU fp32 <= 1e-4', fp32, fp32 <= 1e-4),
            ('bf16 greedy tokens = fp32 greedy tokens (tiny model)', float(bf16_equal),
             bf16_equal)]
    return [{'target': t, 'measured': m, 'met': bool(ok)} for t, m, ok in rows]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--tiny', action='store_true',
                        help='the tiny config on the CPU (smoke run for CI)')
    parser.add_argument('--frames', type=int, default=256)
    parser.add_argument('--window', type=float, default=5.0, help='decode window, seconds')
    parser.add_argument('--hf', action='store_true', help='also run transformers generate')
    parser.add_argument('--out', type=Path, default=RESULTS, help='folder of the JSON')
    parser.add_argument('--skip', default='', help='comma-separated stages to skip')
    parser.add_argument('--only', default='', help='run just these stages (comma-separated)')
    parser.add_argument('--quantization', default='none,int8,fp8,int4',
                        help='modes of the quantization stage')
    parser.add_argument('--inductor', action='store_true',
                        help='step stage: also the step compiled by torch.compile (inductor) '
                             'and captured (compiling the 11B step takes minutes)')
    ns = parser.parse_args(argv)
    device = 'cpu' if ns.tiny or not torch.cuda.is_available() else 'cuda'
    if not ns.tiny and device == 'cpu':
        raise SystemExit('no CUDA device: use --tiny for the CPU smoke run')
    skip = set(filter(None, ns.skip.split(',')))
    stages = ('correctness', 'step', 'encode', 'engine', 'sessions', 'quantization', 'memory')
    if ns.only:
        skip |= set(stages) - set(ns.only.split(','))
    frames_n = min(ns.frames, 16) if ns.tiny else ns.frames
    window = min(ns.window, 2.0) if ns.tiny else ns.window
    dtype = torch.float32 if device == 'cpu' else torch.bfloat16
    t_start = time.monotonic()
    report = Report(ns.out / ('gpu_tiny.json' if ns.tiny else 'gpu.json'),
                    machine=machine(), config='tiny' if ns.tiny else '11B',
                    torch=torch.__version__,
                    device=torch.cuda.get_device_name() if device == 'cuda' else 'cpu')
    import transformers
    report['transformers'] = transformers.__version__
    if 'correctness' not in skip:
        report.stage('correctness', stage_correctness, device, 1 if ns.tiny else 3)
    if set(stages) - {'quantization', 'memory'} <= skip:  # memory and quantization alone
        report.path = ns.out / ('gpu_memory_tiny.json' if ns.tiny else 'gpu_memory.json')
        frames = images(16, 112 if ns.tiny else 560)
        if 'memory' not in skip:
            report.stage('memory', stage_memory, ns.tiny, device, frames,
                         [(m, g // 8 if ns.tiny else g) for m, g in (('int8', 16), ('none', 24),
                                                                     ('int8', 24))])
        if 'quantization' not in skip:
            report.stage('quantization', stage_quantization, ns.tiny, device, frames,
                         ns.quantization.split(','), 16 if ns.tiny else 64)
        report['wall_s'] = time.monotonic() - t_start
        report.save()
        print(f'wrote {report.path} in {report["wall_s"]:.0f} s')
        return 0
    runner, model = build_runner(ns.tiny, device, dtype, max_frames=frames_n)
    report['build_s'] = time.monotonic() - t_start
    report['attn_implementation'] = runner.attn_implementation
    print(f'built {report["config"]} model on {device} '
          f'({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params)', flush=True)
    frames = images(min(frames_n, 64), runner.tile_px)
    if device == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    if 'step' not in skip:
        report.stage('step', stage_step, runner, frames, device, frames_n, ns.inductor)
    if 'encode' not in skip:
        report.stage('encode', stage_encode, runner, frames, device)
    if 'engine' not in skip:
        report.stage('engine', stage_engine, runner, frames[:16], window, frames_n)
    if 'sessions' not in skip:
        report.stage('sessions', stage_sessions, runner, frames, device,
                     steps=8 if ns.tiny else 100)
    if ns.hf:
        report.stage('hf_generate', stage_hf_generate, runner, model, frames[:frames_n],
                     device, new_tokens=8 if ns.tiny else 32)
    if device == 'cuda':
        report['peak_memory_bytes'] = torch.cuda.max_memory_allocated()
        bw, peak = next(((b, p) for key, b, p in DEVICE_LIMITS if key in report['device']),
                        (float('nan'), float('nan')))
        text = model.model.language_model
        read = sum(p.numel() for n_, p in text.named_parameters()
                   if 'embed_tokens' not in n_ and '.cross_attn.k_proj' not in n_
                   and '.cross_attn.v_proj' not in n_) + model.lm_head.weight.numel()
        report['limits'] = {'decode_s_per_token': 2 * read / bw,
                            'frame_encode_s': FRAME_FLOPS_11B / peak}
    report['targets'] = targets(report)
    report['wall_s'] = time.monotonic() - t_start
    report.save()
    step = report.get('step', {})
    print(f'\n{"measure":48s} {"value":>12s}')
    for key in ('eager_sdpa', 'graph_sdpa', 'graph_matmul_attention', 'graph_unfused',
                'graph_cudnn_first', 'graph_inductor'):
        if key in step and 'wall_ms' in step[key]:
            v = step[key]
            print(f'{"decode step " + key + " wall/gpu ms":48s} {v["wall_ms"]:12.2f} '
                  f'{v["gpu_ms"]:8.2f}  kernels {v["kernel_launches"]:.0f} '
                  f'({v["kernel_ms"]:.2f} ms)')
    for key in ('ttft_graph_s', 'ttft_eager_s'):
        if key in step:
            print(f'{"TTFT " + key + " (s)":48s} {step[key]:12.4f}')
    for key, v in report.get('encode', {}).items():
        if key.endswith('ms'):
            print(f'{"encode " + key:48s} {v:12.2f}')
    eng = report.get('engine', {})
    for key in ('tokens_per_s_0fps', 'tokens_per_s_1fps'):
        if key in eng:
            print(f'{"engine decode " + key:48s} {eng[key]:12.1f}')
    for n, v in report.get('sessions', {}).get('tokens_per_s', {}).items():
        print(f'{f"decode tokens/s, {n} sessions batched":48s} {v:12.1f}')
    hf = report.get('hf_generate')
    if hf:
        print(f'{"transformers generate TTFT (s) / tok/s":48s} {hf["ttft_s"]:12.3f} '
              f'{hf["tokens_per_s"]:8.1f} ({hf["frames"]} frames)')
    for t in report['targets']:
        print(f'{verdict(t["met"])}  {t["target"]}: {t["measured"]:.4f}')
    print(f'wrote {report.path} in {report["wall_s"]:.0f} s')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
