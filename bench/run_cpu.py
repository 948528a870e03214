"""CPU benchmark suite (issue 5): TTFT vs cached frames against the offline baseline, decode
throughput while frames arrive, memory over a long stream, ROS overhead.

Every comparison is measured side by side in this one run, on the same model and machine;
medians over repeats, warm-up excluded. Prints tables, writes ``bench/results/cpu.json`` and
``bench/results/cpu_*.png``. Run with ``make bench`` (about 10 minutes on 2 cores).
"""
import argparse
import tempfile
import threading
import time

from common import (  # bench/ is on sys.path when run as a script
    assistant_node,
    count_params,
    decode_window,
    drain,
    machine,
    median,
    percentile,
    question_prefill_flops,
    RESULTS,
    rss_bytes,
    scene_images,
    speaking_engine,
    verdict,
    write_json,
    write_model,
)
import numpy as np
import torch

from mossv_ros.engine.config import EngineConfig, SamplingConfig
from mossv_ros.engine.engine import StreamingEngine
from mossv_ros.engine.events import Frame, TokenEvent
from mossv_ros.engine.offline import offline_generate
from mossv_ros.engine.runner import ModelRunner
from mossv_ros.engine.sampling import Sampler

QUESTION = 'What is the person in front of the camera holding right now?'


def make_runner(path, max_frames=256, **kw):
    return ModelRunner(EngineConfig(model_path=str(path), device='cpu', dtype='float32',
                                    max_frames=max_frames, max_context_tokens=8192, **kw))


def fill_stream(runner, session, encoded):
    """Put frames into a session as a quiet stream does: [<|silence|>, <|image|>] per frame."""
    s = runner.special
    for frame in encoded:
        runner.feed(session, [s.silence, s.image], [(1, frame)])


# ----------------------------------------------------------------------------- 1. TTFT
def bench_ttft(runner, sizes, repeats, offline_repeats):
    """Streaming TTFT (question prefill + first sample, frames already cached) vs offline TTFT
    (encode all frames after the question + prefill + first sample)."""
    images = scene_images(max(sizes))
    sampler = Sampler(SamplingConfig(temperature=0.0), runner.suppressed_ids(), runner.vocab_size)
    q_ids = runner.question_ids(QUESTION)
    encoded = []
    for i in range(0, len(images), 32):
        encoded += runner.encode_frames(images[i:i + 32])
    for i, frame in enumerate(encoded):
        frame.frame_index = i
    session = runner.new_session(max_frames=max(sizes), max_context_tokens=4096)
    runner.start_session(session)
    rows, cached = [], 0
    for n in sorted(sizes):
        fill_stream(runner, session, encoded[cached:n])
        cached = n
        saved = (session.kv_cache.length, session.next_pos)
        times = []
        for r in range(repeats + 1):
            t0 = time.perf_counter()
            sampler(runner.feed(session, q_ids))
            dt = time.perf_counter() - t0
            session.kv_cache.length, session.next_pos = saved  # roll the question back
            if r:
                times.append(dt)
        offline = []
        for r in range(offline_repeats + 1):
            res = offline_generate(runner, QUESTION, images[:n],
                                   SamplingConfig(temperature=0.0, max_new_tokens=1))
            if r:
                offline.append(res.ttft_s)
        rows.append({'frames': n, 'streaming_ttft_s': median(times),
                     'offline_ttft_s': median(offline),
                     'speedup': median(offline) / median(times),
                     'question_tokens': len(q_ids), 'context_tokens': saved[0],
                     'question_prefill_gflop': question_prefill_flops(
                         runner.model, len(q_ids), saved[0], n) / 1e9})
        print(f'    {n:4d} frames: streaming {median(times) * 1e3:8.1f} ms   offline '
              f'{median(offline) * 1e3:9.1f} ms   x{rows[-1]["speedup"]:.1f}', flush=True)
    return rows


# ----------------------------------------------------------------------------- 2. decode
def bench_decode(runner, fps_list, window_s, rounds):
    """Tokens/s of continuous speech with no frames vs frames arriving at ``fps`` during
    decoding, through the real engine (encoder thread + engine thread); frame latency =
    arrival -> inserted and used by a decode step."""
    cfg = EngineConfig(model_path='in-memory', device='cpu', dtype='float32',
                       frame_rate_hz=30.0, max_frames=64, max_context_tokens=4096,
                       max_frame_queue=8,
                       sampling=SamplingConfig(temperature=0.0, max_new_tokens=1_000_000))
    engine = speaking_engine(runner, cfg)
    images = scene_images(16)
    results = {fps: [] for fps in fps_list}
    latencies = {fps: [] for fps in fps_list}
    try:
        # Warm up to a stationary state: vision cache full (64 frames, evicting) and the text
        # context at its budget (evicting its middle), so no window is cheaper by position.
        deadline, i = time.monotonic() + 180, 0
        while time.monotonic() < deadline and (
                engine.stats().num_frames_cached < cfg.max_frames
                or engine.session.num_evicted_tokens == 0):
            if engine.stats().num_frames_cached < cfg.max_frames:
                engine.submit_frame(Frame(images[i % len(images)], stamp=i,
                                          arrival_ts=time.monotonic()))
                i += 1
            drain(engine)
            time.sleep(0.05)
        for r in range(rounds):
            for fps in fps_list[r % len(fps_list):] + fps_list[:r % len(fps_list)]:
                rate, lat = decode_window(engine, images, fps, window_s)
                results[fps].append(rate)
                latencies[fps] += lat
    finally:
        engine.stop()
    rows = []
    base = median(results[0])
    for fps in fps_list:
        rows.append({'fps': fps, 'tokens_per_s': median(results[fps]),
                     'ratio_to_no_frames': median(results[fps]) / base,
                     'frame_latency_p50_s': percentile(latencies[fps], 50),
                     'frame_latency_p95_s': percentile(latencies[fps], 95),
                     'frames_measured': len(latencies[fps])})
        r = rows[-1]
        print(f'    {fps} fps: {r["tokens_per_s"]:7.1f} tok/s ({r["ratio_to_no_frames"]:.2f}x)'
              f'  frame latency p50 {r["frame_latency_p50_s"] * 1e3:.1f} ms'
              f' p95 {r["frame_latency_p95_s"] * 1e3:.1f} ms', flush=True)
    return rows


# ----------------------------------------------------------------------------- 3. memory
def bench_memory(path, num_frames, budget):
    """RSS and cache bytes over a long stream at accelerated rate with the eviction budget on."""
    runner = make_runner(path, max_frames=budget)
    cfg = runner.config
    cfg.frame_rate_hz = 1.0
    cfg.max_context_tokens = 4096
    engine = StreamingEngine(cfg, runner=runner)
    engine.start()
    assert engine.wait_ready(60)
    images = scene_images(8)
    samples = []
    try:
        for i in range(num_frames):
            while engine.stats().num_frames_encoded < i - 2:  # accelerated, but drop nothing
                if engine.state == 'error':
                    raise RuntimeError(f'engine failed: {engine.stats().last_error}')
                time.sleep(0.001)
                drain(engine)
            engine.submit_frame(Frame(images[i % len(images)], stamp=i), stamp_sec=float(i))
            if i % 100 == 0 or i == num_frames - 1:
                drain(engine)
                st = engine.stats()
                samples.append({'frame': i, 'rss_bytes': rss_bytes(),
                                'cache_bytes': st.cache_bytes,
                                'frames_cached': st.num_frames_cached,
                                'context_tokens': st.num_context_tokens})
    finally:
        engine.stop()
    full = [s for s in samples if s['frames_cached'] >= budget]
    ref = full[0]['rss_bytes'] if full else samples[0]['rss_bytes']
    later = [s['rss_bytes'] for s in full[1:]] or [ref]
    growth = (max(later) - ref) / ref
    per_frame = engine.session.vision_cache.bytes_per_frame
    print(f'    {num_frames} frames, budget {budget}: RSS {samples[0]["rss_bytes"] / 2**20:.0f}'
          f' -> {samples[-1]["rss_bytes"] / 2**20:.0f} MiB, growth after the cache filled '
          f'{growth * 100:+.2f} %, cache max {max(s["cache_bytes"] for s in samples) / 2**20:.2f}'
          f' MiB', flush=True)
    return {'samples': samples, 'rss_growth_after_full': growth, 'budget_frames': budget,
            'vision_cache_bytes_per_frame': per_frame,
            'evicted': engine.stats().num_frames_evicted}


# ----------------------------------------------------------------------------- 4. ROS
def bench_ros(tiny_path, decode_step_s):
    """Per-image callback cost (1920x1080 rgb8 at 30 Hz, subsampled to 1 Hz) and per-token
    publish cost of the node, against the engine's decode step."""
    try:
        from rclpy.serialization import deserialize_message, serialize_message
        from sensor_msgs.msg import Image

        from mossv_ros.engine.events import FrameRef
    except ImportError as exc:
        print(f'    skipped: {exc}')
        return {'skipped': str(exc)}
    with assistant_node(tiny_path) as (node, _):
        frame = np.random.default_rng(0).integers(0, 255, (1080, 1920, 3), dtype=np.uint8)
        msg = Image(height=1080, width=1920, encoding='rgb8', step=1920 * 3,
                    data=frame.tobytes())
        msg.header.frame_id = 'cam'
        n, rate = 300, 30.0
        wall, cpu, admitted = [], [], []
        for i in range(n):
            t = 1000.0 + i / rate
            msg.header.stamp.sec, msg.header.stamp.nanosec = int(t), int((t % 1) * 1e9)
            before = node.engine.stats().num_frames_received
            w0, c0 = time.perf_counter(), time.thread_time()
            node._on_image(msg)
            wall.append(time.perf_counter() - w0)
            cpu.append(time.thread_time() - c0)
            admitted.append(node.engine.stats().num_frames_received > before)
        adm = [w for w, a in zip(wall, admitted) if a]
        skip = [w for w, a in zip(wall, admitted) if not a]
        raw = serialize_message(msg)
        deser = []
        for _ in range(20):
            t0 = time.perf_counter()
            deserialize_message(raw, Image)
            deser.append(time.perf_counter() - t0)
        event = TokenEvent(round_id=1, request_id='r', revision=0, token_index=0, token_id=42,
                           text='word', source=FrameRef(1, None, 'cam', 0.0),
                           emit_ts=time.monotonic())
        pub = []
        for _ in range(500):
            t0 = time.perf_counter()
            node._publish_event(event)
            pub.append(time.perf_counter() - t0)
    stream_s = n / rate
    out = {'image_callback_admitted_ms': median(adm) * 1e3,
           'image_callback_subsampled_ms': median(skip) * 1e3,
           'images_admitted': len(adm), 'images_subsampled': len(skip),
           'callback_cpu_share': sum(cpu) / stream_s,
           'rclpy_deserialize_1080p_ms': median(deser) * 1e3,
           'deserialize_cpu_share_30hz': median(deser) * rate,
           'token_publish_us': median(pub) * 1e6,
           'engine_decode_step_ms': decode_step_s * 1e3,
           'token_publish_vs_decode_step': median(pub) / decode_step_s}
    print(f'    1080p image callback: admitted {out["image_callback_admitted_ms"]:.2f} ms '
          f'({len(adm)}), subsampled {out["image_callback_subsampled_ms"] * 1e3:.1f} us '
          f'({len(skip)}); callback CPU share {out["callback_cpu_share"] * 100:.2f} % of one '
          f'core; rclpy deserialize {out["rclpy_deserialize_1080p_ms"]:.2f} ms/image '
          f'({out["deserialize_cpu_share_30hz"] * 100:.1f} % at 30 Hz)', flush=True)
    print(f'    token publish {out["token_publish_us"]:.0f} us vs decode step '
          f'{out["engine_decode_step_ms"]:.2f} ms ({out["token_publish_vs_decode_step"] * 100:.2f}'
          ' %)', flush=True)
    return out


def _stream_images(node, pub, frame, num_images, rate_hz):
    """Publish ``num_images`` RGB frames at ``rate_hz`` (a question every 40), stamps 1 s apart;
    returns the share the node took and its frame latency (arrival -> in cache)."""
    from sensor_msgs.msg import Image

    end = time.monotonic() + 10.0
    while not pub.get_subscription_count() and time.monotonic() < end:
        time.sleep(0.05)
    t0 = time.monotonic()
    for i in range(num_images):
        delay = t0 + i / rate_hz - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        if i % 40 == 5:
            node.engine.submit_question('What do you see?', f'bench-{i}')
        msg = Image(height=frame.shape[0], width=frame.shape[1], encoding='rgb8',
                    step=frame.shape[1] * 3, data=frame.tobytes())
        msg.header.stamp.sec, msg.header.frame_id = 1000 + i, 'cam'
        pub.publish(msg)
    time.sleep(1.0)
    lat = list(node.engine.frame_latencies)
    return {'images_taken_share': node.engine.stats().num_frames_received / num_images,
            'frame_latency_p50_s': percentile(lat, 50),
            'frame_latency_max_s': max(lat) if lat else float('nan')}


def bench_executor(tiny_path, num_images=400, rate_hz=100.0, repeats=2):
    """Images the node takes from a fast stream, and frame latency (arrival -> in cache), when
    the process is spun by the stock rclpy 9.x ``MultiThreadedExecutor`` vs
    ``mossv_ros.ros.executor.MultiThreadedExecutor`` (the ros2/rclpy#1452 busy loop), side by
    side, interleaved. Stamps are 1 s apart, so every image is admitted at 1 Hz."""
    try:
        import rclpy
        from rclpy.executors import MultiThreadedExecutor as StockExecutor
        from rclpy.parameter import Parameter
        from sensor_msgs.msg import Image

        from mossv_ros.ros.executor import MultiThreadedExecutor as FixedExecutor
    except ImportError as exc:
        print(f'    skipped: {exc}')
        return {'skipped': str(exc)}
    frame = np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)
    runs = {'rclpy': [], 'mossv_ros': []}
    for rep in range(repeats):
        for kind, cls in (('rclpy', StockExecutor), ('mossv_ros', FixedExecutor)):
            topic = f'/bench_image_{kind}_{rep}'
            with assistant_node(tiny_path, Parameter('topics.images', value=[topic]),
                                Parameter('qos.image_reliability', value='reliable')) \
                    as (node, ctx):
                cam = rclpy.create_node('bench_camera', context=ctx)
                pub = cam.create_publisher(Image, topic, 10)
                executor = cls(num_threads=4, context=ctx)
                executor.add_node(node)
                executor.add_node(cam)
                spinner = threading.Thread(target=executor.spin, daemon=True)
                spinner.start()
                try:
                    runs[kind].append(_stream_images(node, pub, frame, num_images, rate_hz))
                finally:
                    executor.shutdown(timeout_sec=1.0)
                    spinner.join(timeout=2.0)
                    cam.destroy_node()
    out = {'num_images': num_images, 'rate_hz': rate_hz, 'runs': runs}
    for kind, rs in runs.items():
        out[kind] = {k: median([r[k] for r in rs]) for k in rs[0]}
        print(f'    {kind:>9} executor: node took {out[kind]["images_taken_share"] * 100:5.1f} % '
              f'of {num_images} images at {rate_hz:g} Hz; frame latency p50 '
              f'{out[kind]["frame_latency_p50_s"] * 1e3:.0f} ms, max '
              f'{out[kind]["frame_latency_max_s"] * 1e3:.0f} ms', flush=True)
    out['images_taken_ratio'] = (out['mossv_ros']['images_taken_share'] /
                                 max(out['rclpy']['images_taken_share'], 1e-9))
    return out


def decode_step_time(runner, steps=30):
    session = runner.new_session(max_frames=8, max_context_tokens=4096)
    logits = runner.start_session(session)
    times = []
    token = int(torch.argmax(logits))
    for _ in range(steps):
        t0 = time.perf_counter()
        token = int(torch.argmax(runner.feed(session, [token])))
        times.append(time.perf_counter() - t0)
    return median(times[5:])


# ----------------------------------------------------------------------------- plots, main
def plot(report):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    for name, m in report['models'].items():
        xs = [r['frames'] for r in m['ttft']]
        ax.plot(xs, [r['streaming_ttft_s'] * 1e3 for r in m['ttft']], 'o-',
                label=f'{name}: streaming (cached)')
        ax.plot(xs, [r['offline_ttft_s'] * 1e3 for r in m['ttft']], 's--',
                label=f'{name}: offline (re-encode)')
    ax.set(xscale='log', yscale='log', xlabel='frames in context', ylabel='TTFT (ms)',
           title='TTFT vs frames (CPU)')
    ax.legend(fontsize=7)
    ax = axes[1]
    width = 0.38
    for k, (name, m) in enumerate(report['models'].items()):
        fps = [r['fps'] for r in m['decode']]
        ax.bar(np.arange(len(fps)) + k * width, [r['tokens_per_s'] for r in m['decode']],
               width, label=name)
    ax.set_xticks(np.arange(len(fps)) + width / 2, [f'{f} fps' for f in fps])
    ax.set(ylabel='tokens/s', title='decode while frames arrive (CPU)')
    ax.legend(fontsize=7)
    ax = axes[2]
    mem = report['memory']['samples']
    ax.plot([s['frame'] for s in mem], [s['rss_bytes'] / 2**20 for s in mem], label='RSS')
    ax.plot([s['frame'] for s in mem], [s['cache_bytes'] / 2**20 for s in mem],
            label='cache bytes')
    ax.set(xlabel='frames streamed', ylabel='MiB', title='memory over a long stream (tiny)')
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = RESULTS / 'cpu.png'
    fig.savefig(path, dpi=110)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--quick', action='store_true',
                        help='small sizes (a smoke run, seconds; numbers not meaningful)')
    ns = parser.parse_args(argv)
    sizes = [4, 8] if ns.quick else [8, 32, 128, 256]
    report = {'machine': machine(), 'torch': torch.__version__, 'quick': ns.quick,
              'models': {}}
    tmp = tempfile.TemporaryDirectory()
    from pathlib import Path
    t_start = time.monotonic()
    for kind in ('tiny', 'mid'):
        path = write_model(kind, Path(tmp.name))
        runner = make_runner(path)
        m = report['models'][kind] = {'params': count_params(runner),
                                      'tokens_per_frame': runner.model.tokens_per_frame,
                                      'torch_threads': torch.get_num_threads()}
        print(f'\n== {kind}: {m["params"] / 1e6:.2f} M params, {m["tokens_per_frame"]} '
              f'vision tokens/frame, {m["torch_threads"]} torch thread(s) per engine thread')
        print('  1. TTFT vs frames already cached (streaming) vs re-encoding them (offline)')
        m['ttft'] = bench_ttft(runner, sizes, repeats=3 if ns.quick else 7,
                               offline_repeats=1 if ns.quick else 3)
        m['decode_step_s'] = decode_step_time(runner)
        print(f'  2. decode throughput while frames arrive (engine threads; decode step '
              f'{m["decode_step_s"] * 1e3:.2f} ms)')
        m['decode'] = bench_decode(runner, [0, 1, 2, 4], window_s=1.5 if ns.quick else 6.0,
                                   rounds=1 if ns.quick else 3)
    print('\n  3. memory over a long stream (tiny model, eviction budget on)')
    report['memory'] = bench_memory(write_model('tiny', Path(tmp.name) / 'mem'),
                                    300 if ns.quick else 3600, 16 if ns.quick else 64)
    print('\n  4. ROS overhead (in-process node, tiny model)')
    report['ros'] = bench_ros(Path(tmp.name) / 'tiny', report['models']['mid']['decode_step_s'])
    print('  executor: a 100 Hz image stream into the node, stock rclpy vs ours')
    report['ros']['executor'] = bench_executor(Path(tmp.name) / 'tiny',
                                               num_images=100 if ns.quick else 400,
                                               repeats=1 if ns.quick else 2)
    report['wall_s'] = time.monotonic() - t_start

    targets = []
    for name, m in report['models'].items():
        t = {r['frames']: r for r in m['ttft']}
        lo, hi = min(t), max(t)
        d = {r['fps']: r for r in m['decode']}
        # What the arithmetic alone allows: question-prefill FLOPs at hi over those at lo.
        m['ttft_ratio_flop_floor'] = (t[hi]['question_prefill_gflop'] /
                                      t[lo]['question_prefill_gflop'])
        targets += [
            (f'{name}: TTFT {hi} cached <= 1.2x TTFT {lo} cached (prefill FLOPs alone grow '
             f'{m["ttft_ratio_flop_floor"]:.2f}x)',
             t[hi]['streaming_ttft_s'] / t[lo]['streaming_ttft_s'], 1.2, '<='),
            (f'{name}: offline/streaming TTFT at {hi} frames >= 10x', t[hi]['speedup'], 10.0,
             '>='),
            (f'{name}: tokens/s at 2 fps >= 0.9x no frames', d[2]['ratio_to_no_frames'], 0.9,
             '>='),
        ]
    targets.append(('memory flat within 5 % after the cache filled',
                    report['memory']['rss_growth_after_full'], 0.05, '<='))
    report['targets'] = [{'target': n, 'measured': v, 'limit': lim,
                          'met': v <= lim if op == '<=' else v >= lim}
                         for n, v, lim, op in targets]
    print('\n== targets (CPU, same run)')
    for t in report['targets']:
        print(f'  {verdict(t["met"])}  {t["target"]}: measured {t["measured"]:.3f}')
    if not ns.quick:
        write_json('cpu.json', report)
        print(f'\nwrote {RESULTS / "cpu.json"} and {plot(report)} in {report["wall_s"]:.0f} s')
    else:
        write_json('cpu_quick.json', report)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
