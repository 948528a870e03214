"""Shared helpers of the benchmark scripts (not part of the package)."""
import contextlib
import json
import os
from pathlib import Path
import platform
import statistics
import sys
import time

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / 'bench' / 'results'

#: A mid-size random model of the MOSS architecture (tens of millions of parameters) so that
#: model compute, not Python overhead, dominates on the CPU (issue 5, item 5): 224 px frames ->
#: 17 vision tokens per frame, 8 text layers (2 cross), 8 + 2 vision layers.
MID_CONFIG = dict(image_size=224, vision_hidden=256, text_hidden=512, text_layers=8,
                  cross_layers=(3, 7), intermediate=2048, vision_layers=8, global_layers=2,
                  heads=8, kv_heads=2, vision_heads=4, max_positions=131072)
TINY_CONFIG = dict(max_positions=131072)  # the section 9 tiny model; long streams allowed


def write_model(kind: str, folder: Path) -> Path:
    """Write the 'tiny' or 'mid' random checkpoint into ``folder`` (MOSS layout)."""
    from mossv_ros.engine.tiny import tiny_config_dict, write_tiny_checkpoint
    cfg = tiny_config_dict(**(MID_CONFIG if kind == 'mid' else TINY_CONFIG))
    return write_tiny_checkpoint(folder / kind, seed=0, config_dict=cfg)


def question_prefill_flops(model, num_query: int, context_tokens: int, num_frames: int) -> float:
    """FLOPs (2 per multiply-add) of prefilling ``num_query`` question tokens on top of
    ``context_tokens`` text tokens and ``num_frames`` cached frames: q/k/v/o projections and
    MLPs of every layer (cross layers take K/V from the vision cache), self-attention over the
    text context, cross-attention over every cached vision token (all query heads), the LM head
    for the last row. The arithmetic of docs/model.md section 8.2 applied to the question.

    :param model: a ``MossVideoModel`` (reads its text config and layer layout).
    :returns: FLOPs as a float.
    """
    tc = model.text_config
    h, inter = tc.hidden_size, tc.intermediate_size
    kv = model.num_kv_heads * model.head_dim
    vision_tokens = num_frames * model.tokens_per_frame
    keys = context_tokens + num_query / 2  # causal: the question also attends to itself
    self_layer = 2 * (2 * h * h + 2 * h * kv) + 6 * h * inter + 4 * keys * h
    cross_layer = 2 * (2 * h * h) + 6 * h * inter + 4 * vision_tokens * h
    per_token = len(model.self_layer_ids) * self_layer + len(model.cross_layer_ids) * cross_layer
    return num_query * per_token + 2 * h * tc.vocab_size


def median(xs):
    return float(statistics.median(xs)) if xs else float('nan')


def percentile(xs, q):
    return float(np.percentile(np.asarray(xs), q)) if len(xs) else float('nan')


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc), bytes."""
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith('VmRSS:'):
                return int(line.split()[1]) * 1024
    return 0


def machine() -> dict:
    return {'platform': platform.platform(), 'python': platform.python_version(),
            'cpu_count': os.cpu_count(), 'processor': platform.processor() or 'unknown',
            'time': time.strftime('%Y-%m-%d %H:%M:%S')}


def count_params(runner) -> int:
    return sum(p.numel() for p in runner.model.hf_model.parameters())


def scene_images(n: int, width: int = 320, height: int = 240):
    """``n`` camera frames of a toyworld episode, one world state per frame."""
    from mossv_ros.toyworld.world import camera_frames
    return camera_frames(n, width, height)


def write_json(name: str, data: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps(data, indent=2, default=float))
    return path


def verdict(ok: bool) -> str:
    return 'PASS' if ok else 'MISS'


def drain(engine):
    """Take every queued engine event."""
    return engine.poll_events()


def speaking_engine(runner, cfg):
    """A started engine that speaks continuously (greedy, ``<|silence|>`` suppressed), for
    decode-throughput measurements."""
    from mossv_ros.engine.engine import StreamingEngine
    from mossv_ros.engine.sampling import Sampler
    runner.config = cfg
    sampler = Sampler(cfg.sampling, runner.suppressed_ids() + [runner.special.silence],
                      runner.vocab_size)
    engine = StreamingEngine(cfg, runner=runner, sampler=sampler)
    engine.start()
    assert engine.wait_ready(300), engine.stats().last_error
    return engine


def decode_window(engine, images, fps: float, window_s: float, stamp_base: float = 0.0):
    """Count tokens emitted during ``window_s`` seconds while a feeder thread submits frames at
    ``fps`` (0 = none), stamped ``stamp_base``, ``stamp_base + 1``, ... (after earlier frames:
    past their stamps, or the camera's stamps jump back and reset the session).
    :returns: (tokens per second, frame latencies of the window, s)."""
    import threading

    from mossv_ros.engine.events import Frame, TokenEvent
    stop = threading.Event()

    def feeder():
        i = 0
        while not stop.wait(1.0 / fps):
            engine.submit_frame(Frame(images[i % len(images)], stamp=stamp_base + i,
                                      arrival_ts=time.monotonic()))
            i += 1
    drain(engine)
    n_lat = len(engine.frame_latencies)
    thread = threading.Thread(target=feeder) if fps else None
    t0 = time.monotonic()
    if thread:
        thread.start()
    time.sleep(window_s)
    stop.set()
    if thread:
        thread.join()
    tokens = [e for e in drain(engine) if isinstance(e, TokenEvent)
              and t0 <= e.emit_ts <= t0 + window_s]
    return len(tokens) / window_s, list(engine.frame_latencies)[n_lat:]


@contextlib.contextmanager
def assistant_node(tiny_path, *parameters):
    """An activated in-process ``AssistantNode`` on the tiny model (CPU, float32) in its own
    rclpy context, plus ``parameters`` (``rclpy.parameter.Parameter``); yields (node, context)
    and stops the engine, destroys the node and shuts the context down afterwards."""
    import rclpy
    from rclpy.parameter import Parameter

    from mossv_ros.ros.node import AssistantNode
    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    node = AssistantNode(context=ctx, parameter_overrides=[
        Parameter('model.path', value=str(tiny_path)), Parameter('engine.device', value='cpu'),
        Parameter('engine.dtype', value='float32'), *parameters])
    try:
        node.trigger_configure()
        node.trigger_activate()
        yield node, ctx
    finally:
        node._close_io()
        node._stop_engine()
        node.destroy_node()
        rclpy.try_shutdown(context=ctx)
