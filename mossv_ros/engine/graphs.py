"""CUDA graphs: the text step and the frame encoder, captured once and replayed.

A decode step of the 11B model launches about 1,900 small kernels; launched one by one from
Python the GPU idles most of the step (docs/model.md section 10). A CUDA graph records the
launches once and replays them with one call. What changes between replays is data in
persistent device buffers: the step's metadata (:mod:`.step`) for the text step, the
letterboxed tile for the encoder. As nano-vllm does, one graph is captured per batch size
(1, 2, 4, ... up to the cameras) and, for prefills, per padded chunk length; all text-step
graphs share one memory pool (they never run at the same time), the encoder graph has its own
(it runs on the encoder stream beside decoding).

Capture needs CUDA; on the CPU the same step runs eagerly (tests prove it graph-ready:
``test/test_step.py``).
"""
from dataclasses import dataclass
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from .kv_cache import CachePool
from .step import build_metadata, full_shape, StepShape, to_device

#: padded prefill chunk lengths (one session per chunk); a longer prefill is cut into chunks
PREFILL_TOKENS = (2, 8, 32, 128)
#: decode graphs attend to max_frames / f vision slots for each f, the smallest that holds
#: the rows' frames: a row reads its whole span of the vision cache every step (847 MB at 256
#: frames at 11B), so young sessions read less (and one more graph with no vision slots skips
#: the cross layers while no row has a frame)
FRAME_SPAN_DIVISORS = (8, 4, 2, 1)
#: eager runs of each step before its capture (lazy initialisation, cuBLAS workspaces)
WARMUP_RUNS = 2


def decode_batch_sizes(rows: int) -> List[int]:
    """1, 2, 4, ... below ``rows``, then ``rows`` (the whole pool, read without a gather)."""
    sizes, b = [], 1
    while b < rows:
        sizes.append(b)
        b *= 2
    return sizes + [rows]


class _Captured:
    def __init__(self, graph, meta: torch.Tensor, out: torch.Tensor) -> None:
        self.graph, self.meta, self.out = graph, meta, out


def _capture(fn, static_inputs: Sequence[torch.Tensor], pool_handle):
    """Warm ``fn`` up on a side stream, then capture it. :returns: (graph, outputs)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(WARMUP_RUNS):
            fn(*static_inputs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool_handle, capture_error_mode='thread_local'):
        out = fn(*static_inputs)
    return graph, out


class StepGraphs:
    """The text step (:meth:`~.moss_video.MossVideoModel.forward_step`) captured over one
    :class:`~.kv_cache.CachePool`: decode graphs for every batch size of
    :func:`decode_batch_sizes` and vision span of :data:`FRAME_SPAN_DIVISORS`, and prefill
    graphs (one row) for every chunk length of :data:`PREFILL_TOKENS`, each over the full text
    capacity (prefills: and the full vision cache).

    Capturing runs each step on dummy rows that write only to the pool's scratch slot, so the
    sessions' caches are untouched. Without :meth:`capture` (on the CPU) :meth:`replay` runs
    the same shapes eagerly: the tests drive exactly the padded, full-capacity steps a GPU
    replays.

    :raises RuntimeError: (from :meth:`capture`) a step could not be captured; the caller
        runs eagerly.
    """

    def __init__(self, model, pool: CachePool,
                 prefill_tokens: Sequence[int] = PREFILL_TOKENS, forward=None) -> None:
        self.model = model
        #: the step function: ``model.forward_step``, or its compiled form (one function for
        #: every shape: :func:`compile_step`)
        self.forward = forward if forward is not None else model.forward_step
        self.pool = pool
        limit = pool.capacity
        spans = sorted({0} | {-(-pool.max_frames // d) for d in FRAME_SPAN_DIVISORS})
        self.decode_shapes = [full_shape(pool, b, 1, span)
                              for b in decode_batch_sizes(pool.rows) for span in spans]
        self.prefill_shapes = [full_shape(pool, 1, q) for q in prefill_tokens if q <= limit]
        self._graphs: Dict[StepShape, _Captured] = {}

    @torch.no_grad()
    def warm_up(self) -> None:
        """Run every shape once on dummy rows (they write only to the scratch slot): a
        compiled step compiles here, not inside the first real step (under ``no_grad`` as the
        steps run: grad mode is part of what a compiled function is specialised on)."""
        for shape in self.decode_shapes + self.prefill_shapes:
            meta_host, _ = build_metadata(shape, self.pool, [])
            self.forward(self.pool, to_device(meta_host, self.pool.device), shape)

    @torch.no_grad()
    def capture(self) -> None:
        """Capture every shape, largest first (the later, smaller ones reuse its memory)."""
        handle = torch.cuda.graph_pool_handle()
        shapes = sorted(self.decode_shapes + self.prefill_shapes,
                        key=lambda s: s.batch * s.tokens, reverse=True)
        for shape in shapes:
            meta_host, _ = build_metadata(shape, self.pool, [])  # dummy rows: scratch only
            meta = torch.from_numpy(meta_host).to(self.pool.device)

            def step(meta, shape=shape):
                return self.forward(self.pool, meta, shape)
            graph, out = _capture(step, [meta], handle)
            self._graphs[shape] = _Captured(graph, meta, out)
        torch.cuda.synchronize()

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    @property
    def num_shapes(self) -> int:
        """Step shapes: decode and prefill, captured or not."""
        return len(self.decode_shapes) + len(self.prefill_shapes)

    def decode_shape(self, batch: int, high_water: int) -> Optional[StepShape]:
        """The smallest captured decode shape of at least ``batch`` rows whose vision span
        holds ``high_water`` slots (None: none)."""
        return next((s for s in self.decode_shapes
                     if s.batch >= batch and s.frame_span >= high_water), None)

    def prefill_shape(self, tokens: int) -> Optional[StepShape]:
        """The smallest captured one-row shape of at least ``tokens`` tokens, else the
        longest (the caller cuts the prefill into chunks of its length)."""
        if not self.prefill_shapes:
            return None
        return next((s for s in self.prefill_shapes if s.tokens >= tokens),
                    self.prefill_shapes[-1])

    def replay(self, shape: StepShape, meta: np.ndarray) -> torch.Tensor:
        """Copy ``meta`` into the graph's buffer (pinned, ``non_blocking``) and replay.

        :returns: the graph's output logits (batch, vocab_size), overwritten by the next
            replay of this pool's graphs: read or copy them first."""
        captured = self._graphs.get(shape)
        if captured is None:  # not captured: the same step, uncaptured
            return self.forward(self.pool, to_device(meta, self.pool.device), shape)
        captured.meta.copy_(torch.from_numpy(meta).pin_memory(), non_blocking=True)
        captured.graph.replay()
        return captured.out


@dataclass
class PreparedStep:
    """What :func:`prepare_step` made of the text step.

    :ivar graphs: the :class:`StepGraphs` to run steps through, or None (eager steps).
    :ivar decode_path: how steps run, for Status ('cuda graphs (N steps + encoder)[,
        compiled (inductor, S s)]', 'compiled (inductor, S s), not captured (<device>)',
        'eager (<why>)').
    :ivar compile_seconds: seconds compiling and capturing took (0 without compilation).
    :ivar failure: '' or what failed ('CUDA graph capture', 'compilation of the step').
    :ivar reason: the error's type and message (text only: no traceback is kept, it would
        hold the half-captured graphs).
    :ivar out_of_memory: the failure was a device out-of-memory error.
    """

    graphs: Optional['StepGraphs']
    decode_path: str
    compile_seconds: float = 0.0
    failure: str = ''
    reason: str = ''
    out_of_memory: bool = False


def prepare_step(model, frames, pool: CachePool, device: str, cuda_graphs: str,
                 compiled: bool) -> PreparedStep:
    """Make the text step ready to run over ``pool``: compiled by inductor when ``compiled``
    (:func:`compile_step`, every shape compiled now), captured as CUDA graphs with the frame
    encoder (``frames``, a :class:`~.frames.FrameEncoder`) when ``cuda_graphs`` and
    ``device`` allow. A failure leaves eager steps and says why: the engine goes on.
    """
    cuda = device.startswith('cuda')
    capture = cuda and cuda_graphs != 'off'
    if not capture and not compiled:
        why = 'cuda_graphs off' if cuda_graphs == 'off' else device
        return PreparedStep(None, f'eager ({why})')
    t0 = time.monotonic()
    try:
        graphs = StepGraphs(model, pool)
        if compiled:  # one compiled function for every shape of the pool's graphs
            graphs.forward = compile_step(model, graphs.num_shapes)
        if capture:
            graphs.capture()
            frames.capture_graph()
        else:  # compiled, not captured: every shape compiled now, not in a step
            graphs.warm_up()
    except Exception as exc:  # noqa: BLE001 - any failure: eager steps, and why
        graphs = None
        if cuda:
            torch.cuda.empty_cache()  # the failed capture's graph pool
        what = 'capture' if capture else 'compilation'
        return PreparedStep(
            None, f'eager ({what} failed: {type(exc).__name__}: {exc})'[:200],
            failure='CUDA graph capture' if capture else 'compilation of the step',
            reason=f'{type(exc).__name__}: {exc}',
            out_of_memory=isinstance(exc, torch.OutOfMemoryError))
    seconds = time.monotonic() - t0 if compiled else 0.0
    done = f'compiled (inductor, {seconds:.0f} s)'
    if not capture:
        return PreparedStep(graphs, f'{done}, not captured ({device})', seconds)
    return PreparedStep(graphs, f'cuda graphs ({graphs.num_graphs} steps + encoder)'
                        + (f', {done}' if compiled else ''), seconds)


def compile_step(model, num_shapes: int):
    """``model.forward_step`` compiled by ``torch.compile`` (inductor, whole graph, static
    shapes: one compile per step shape, ``num_shapes`` of them, each compiled once). The
    RoPE table is built first (the step looks rows up in it; built inside a trace it would be
    recomputed in the first shape's graph). The caches are written in place: a tensor per
    layer (:class:`~.kv_cache.CachePool`), so the generated code copies no cache
    (``test_compile.py`` reads it).

    :returns: the compiled step, called as ``forward_step`` is.
    """
    import torch._dynamo

    model.rope_table()
    config = torch._dynamo.config
    for name in ('recompile_limit', 'cache_size_limit'):  # (the name differs by version)
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), num_shapes + 4))
    if hasattr(config, 'accumulated_recompile_limit'):
        config.accumulated_recompile_limit = max(config.accumulated_recompile_limit,
                                                 4 * num_shapes + 64)
    return torch.compile(model.forward_step, fullgraph=True, dynamic=False)


class EncoderGraph:
    """The frame encoder (:meth:`~.moss_video.MossVideoModel.encode_tiles`) for one tile,
    captured on its own memory pool; replayed on the caller's stream (the encoder stream).

    :raises RuntimeError: (from the constructor) the encoder could not be captured.
    """

    def __init__(self, model, tile_px: int) -> None:
        self.tiles = torch.zeros((1, tile_px, tile_px, 3), dtype=torch.uint8,
                                 device=model.device)
        self.graph, self.out = _capture(model.encode_tiles, [self.tiles],
                                        torch.cuda.graph_pool_handle())
        torch.cuda.synchronize()

    def encode(self, tile: np.ndarray):
        """One letterboxed uint8 tile (tile_px, tile_px, 3) -> (keys, values) of
        :meth:`~.moss_video.MossVideoModel.cross_kv` for it, copied out of the graph's
        buffers on the current stream."""
        self.tiles.copy_(torch.from_numpy(tile[None]).pin_memory(), non_blocking=True)
        self.graph.replay()
        keys, values = self.out
        return keys.clone(), values.clone()
