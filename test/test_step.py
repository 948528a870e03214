"""The static-shape step, proven graph-ready on the CPU (docs/model.md section 10).

* it reads nothing back to the host (a guard makes every tensor-to-host read raise);
* it equals a dynamic-length reference of the pre-graph engine (one session and three at
  different lengths, frames inserted between steps, frame eviction, text ``evict_middle``),
  for the eager shapes and for the padded full-capacity shapes a CUDA graph replays;
* traced by ``torch.compile(fullgraph=True)`` it runs at several cache lengths and after a
  frame insertion without recompiling: lengths are data, not shapes;
* the device sampler gives the same tokens as the host sampler it replaced.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers.models.mllama.modeling_mllama import repeat_kv

from mossv_ros.engine.config import SamplingConfig
from mossv_ros.engine.graphs import decode_batch_sizes, StepGraphs
from mossv_ros.engine.kv_cache import cumulative_visibility
from mossv_ros.engine.sampling import Sampler
from mossv_ros.engine.step import (
    build_metadata,
    forbid_host_reads,
    full_shape,
    HostReadError,
    RowInput,
)


# ----------------------------------------------------------------------------- the guard
def test_guard_refuses_every_host_read_and_restores_them():
    t = torch.arange(3)
    reads = [lambda: np.asarray(t, dtype=np.int64),  # what TextKVCache.commit did with the
             lambda: t.numpy(), lambda: t.tolist(),  # positions the forward had moved to
             lambda: t[0].item(), lambda: bool(t[0]),  # the device: a crash on CUDA
             lambda: int(t[0]), lambda: float(t[0]), lambda: [1, 2][t[0]]]
    with forbid_host_reads():
        for read in reads:
            with pytest.raises(HostReadError):
                read()
    assert np.asarray(t).tolist() == [0, 1, 2] and bool(t[1]) and [1, 2][t[1]] == 2


def test_steps_read_nothing_back(tiny_runner):
    """Prefill, a frame, decode of one session and a batch of three (gathered from a pool of
    four, and the whole pool), eager and padded full-capacity shapes, and device sampling:
    none reads a tensor on the host."""
    runner = tiny_runner
    s = runner.special
    frame = runner.encode_frames([np.full((40, 60, 3), 90, np.uint8)])[0]
    sampler = Sampler(SamplingConfig(temperature=0.7, top_k=5, top_p=0.9,
                                     repetition_penalty=1.3), runner.suppressed_ids(),
                      runner.vocab_size)
    for static in (False, True):
        sessions = runner.new_sessions(4)
        if static:
            runner.graphs = StepGraphs(runner.model, sessions[0].pool)
        for session in sessions:
            runner.start_session(session)
        with forbid_host_reads():
            runner.feed(sessions[1], [s.silence, s.image], [(1, frame)])
            runner.feed(sessions[2], list(range(30, 70)))  # a question-sized prefill
            logits = runner.feed_batch(sessions[:3], [11, 12, 13])
            logits = runner.feed_batch(sessions, [11, 12, 13, 14])
            ids = sampler.sample(logits, [[11, 40], [], [12], [13, 13]])
        assert ids.shape == (4,) and ids.dtype == torch.long


# ----------------------------------------------------------------------------- parity
class DynamicReference:
    """The engine's forward before the static step, written out: per session, a text KV
    cache that grows by concatenation and attention over exactly the used keys; cross layers
    over the used vision slots with a mask only where a row misses a frame, and skipped when
    no frame is cached; RoPE computed per call. Frames are read from the runner's vision cache
    (the same insertion code); text keys are its own."""

    def __init__(self, runner):
        self.mv = runner.model
        self.keys = {}  # session id -> [(k, v)] per self layer

    def start(self, session):
        self.keys[id(session)] = [None] * len(self.mv.self_layer_ids)

    def evict_middle(self, session, keep: int, num: int):
        cache = self.keys[id(session)]
        for i, (k, v) in enumerate(cache):
            cache[i] = (torch.cat([k[:, :, :keep], k[:, :, keep + num:]], 2),
                        torch.cat([v[:, :, :keep], v[:, :, keep + num:]], 2))

    @staticmethod
    def _attention(q, k, v, mask, scaling):
        rep = q.shape[1] // k.shape[1]
        w = (q @ repeat_kv(k, rep).transpose(2, 3)) * scaling
        if mask is not None:
            w = w.masked_fill(~mask, float('-inf'))
        return (F.softmax(w, -1) @ repeat_kv(v, rep)).transpose(1, 2)

    @torch.no_grad()
    def forward(self, session, ids, first_position):
        mv, cache = self.mv, self.keys[id(session)]
        n = len(ids)
        positions = torch.arange(first_position, first_position + n)
        x = mv.text.embed_tokens(torch.tensor([ids]))
        cos, sin = mv.text.rotary_emb(x, positions[None])
        vc = session.vision_cache
        if vc.num_frames:
            mask, sees = cumulative_visibility(torch.from_numpy(vc.frame_positions()),
                                               positions, mv.tokens_per_frame)
            mask = None if bool(mask.all()) else mask
            sees = None if bool(sees.all()) else sees[None]
        for layer_id, layer in enumerate(mv.text.layers):
            if layer_id in mv.cross_layer_ids:
                if not vc.num_frames:
                    continue
                slot = mv.cross_layer_ids.index(layer_id)
                end = vc.high_water * mv.tokens_per_frame

                def cross(q, slot=slot, end=end, layer=layer):
                    return self._attention(q, vc.k[slot][:, :, :end], vc.v[slot][:, :, :end],
                                           mask, layer.cross_attn.scaling)
                x = mv.cross_layer(layer, x, cos, sin, cross, sees)
            else:
                slot = mv.self_layer_ids.index(layer_id)

                def own(q, k, v, slot=slot, layer=layer):
                    old = cache[slot]
                    if old is not None:
                        k, v = torch.cat([old[0], k], 2), torch.cat([old[1], v], 2)
                    cache[slot] = (k, v)
                    total = k.shape[2]
                    causal = (torch.arange(total)[None, :]
                              <= torch.arange(total - n, total)[:, None])
                    return self._attention(q, k, v, causal, layer.self_attn.scaling)
                x = mv.self_layer(layer, x, cos, sin, own)[0]
        return mv.lm_head(mv.text.norm(x[:, -1])).float()[0]


class Mirror:
    """Drives the runner and the reference with the same operations; records the worst
    logit difference."""

    def __init__(self, runner, sessions):
        self.runner, self.sessions = runner, sessions
        self.ref = DynamicReference(runner)
        self.worst = 0.0
        self.evicted = [0] * len(sessions)

    def _check(self, i, logits, ids, first):
        session = self.sessions[i]
        if session.num_evicted_tokens != self.evicted[i]:  # the runner made room first
            self.ref.evict_middle(session, session.prefix_tokens,
                                  session.num_evicted_tokens - self.evicted[i])
            self.evicted[i] = session.num_evicted_tokens
        expected = self.ref.forward(session, ids, first)
        self.worst = max(self.worst, float((logits - expected).abs().max()))

    def start(self, i):
        session = self.sessions[i]
        logits = self.runner.start_session(session)
        self.ref.start(session)
        ids = self.runner.tokenize(_session_text())
        self._check(i, logits, ids, 0)

    def feed(self, i, ids, frames=()):
        first = self.sessions[i].next_pos
        logits = self.runner.feed(self.sessions[i], ids, frames)
        self._check(i, logits, ids, first)

    def batch(self, indices, tokens):
        sessions = [self.sessions[i] for i in indices]
        firsts = [s.next_pos for s in sessions]
        logits = self.runner.feed_batch(sessions, tokens)
        for i, row, token, first in zip(indices, logits, tokens, firsts):
            self._check(i, row, [token], first)


def _session_text():
    from mossv_ros.engine import prompt as grammar
    return grammar.session_start_text(grammar.REALTIME_SYSTEM_PROMPT)


@pytest.mark.parametrize('num_sessions', [1, 3])
@pytest.mark.parametrize('static', [False, True], ids=['eager-shapes', 'graph-shapes'])
def test_static_step_equals_dynamic_reference(tiny_runner, num_sessions, static):
    runner = tiny_runner
    s = runner.special
    rng = np.random.default_rng(num_sessions)
    prompt_len = len(runner.tokenize(_session_text()))
    # room for the prompt and a little more: questions force the middle of the text out
    sessions = runner.new_sessions(num_sessions, max_frames=3,
                                   max_context_tokens=prompt_len + 260)
    pool = sessions[0].pool
    if static:
        runner.graphs = StepGraphs(runner.model, pool)
    mirror = Mirror(runner, sessions)
    for i in range(num_sessions):
        mirror.start(i)
    images = [rng.integers(0, 255, (48, 64, 3), dtype=np.uint8) for _ in range(6)]
    frames = runner.encode_frames(images)
    for i, f in enumerate(frames):
        f.frame_index = i
    for step in range(60):
        i = int(rng.integers(num_sessions))
        if step % 4 == 2:  # a frame, fed as while silent: [<|silence|>, <|image|>]
            mirror.feed(i, [s.silence, s.image], [(1, frames[step % len(frames)])])
        elif step % 9 == 4:  # a question: a long prefill (chunked on the graph path)
            mirror.feed(i, [int(t) for t in rng.integers(0, 256, int(rng.integers(20, 150)))])
        elif num_sessions > 1:  # a decode step of two or three sessions together
            rows = sorted(rng.choice(num_sessions, int(rng.integers(2, num_sessions + 1)),
                                     replace=False).tolist())
            mirror.batch(rows, [int(t) for t in rng.integers(0, 256, len(rows))])
        else:
            mirror.feed(i, [int(rng.integers(0, 256))])
    assert sum(x.num_evicted_frames for x in sessions) > 0  # 3-frame caches overflowed
    assert sum(x.num_evicted_tokens for x in sessions) > 0  # evict_middle ran
    assert mirror.worst < 1e-5, mirror.worst


# ----------------------------------------------------------------------------- compile
def test_step_compiles_once_lengths_and_frames_are_data(tiny_runner):
    """The step as a CUDA graph replays it: traced whole (fullgraph: no graph break, so no
    host read and no data-dependent branch), then run at other cache lengths and after a
    frame insertion with recompiling forbidden (a length that were a shape would recompile)."""
    runner = tiny_runner
    s = runner.special
    sessions = runner.new_sessions(3)
    pool = sessions[0].pool
    for session in sessions:
        runner.start_session(session)
    shape = full_shape(pool, 2, 1)  # two of three rows: the gathered graph
    mv = runner.model
    compiled = torch.compile(lambda meta: mv.forward_step(pool, meta, shape), fullgraph=True,
                             backend='eager')

    def meta_for(tokens):
        inputs = [RowInput(x.row, [t], x.next_pos, x.kv_cache.write_indices(1),
                           x.vision_cache.frame_positions(pool.max_frames))
                  for x, t in zip(sessions[:2], tokens)]
        return torch.from_numpy(build_metadata(shape, pool, inputs)[0])

    def step(tokens):
        meta = meta_for(tokens)
        got = compiled(meta)
        want = mv.forward_step(pool, meta, shape)  # eager, same writes
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        for x in sessions[:2]:
            x.kv_cache.commit(1)
            x.next_pos += 1

    torch._dynamo.reset()
    step([11, 12])  # compiles
    frame = runner.encode_frames([np.full((40, 60, 3), 90, np.uint8)])[0]
    with torch.compiler.set_stance('fail_on_recompile'):
        for n in range(3):
            step([13 + n, 20 + n])
        runner.feed(sessions[0], list(range(40, 90)))  # another length, eagerly
        runner.feed(sessions[1], [s.silence, s.image], [(1, frame)])  # a frame
        assert sessions[1].vision_cache.num_frames == 1
        step([30, 31])
        step([32, 33])
    assert sessions[0].kv_cache.length != sessions[1].kv_cache.length


def test_fused_projections_give_the_same_logits(tiny_checkpoint):
    """The GPU kernels (one GEMM for q/k/v and for gate/up, F.rms_norm) compute the stock
    layers: the same streamed logits within float rounding; the weights are views (no copy)."""
    import copy

    from mossv_ros.engine.config import EngineConfig
    from mossv_ros.engine.runner import ModelRunner
    runner = ModelRunner(EngineConfig(model_path=str(tiny_checkpoint), max_frames=8,
                                      max_context_tokens=2048))
    plain = copy.copy(runner.model)
    runner.model.fuse_projections()
    layer = runner.model.text.layers[0]
    fused_weight = layer.self_attn.moss_qkv.weight
    assert layer.self_attn.q_proj.weight.data_ptr() == fused_weight.data_ptr()
    s = runner.special
    frame = runner.encode_frames([np.full((40, 60, 3), 70, np.uint8)])[0]
    streams = []
    for model in (runner.model, plain):
        runner.model = model
        session = runner.new_session()
        streams.append([runner.start_session(session),
                        runner.feed(session, [s.silence, s.image], [(1, frame)]),
                        runner.feed(session, list(range(20, 60))), runner.feed(session, [77])])
    worst = max(float((a - b).abs().max()) for a, b in zip(*streams))
    assert worst < 1e-5, worst


def test_failed_graph_capture_runs_eagerly_and_says_so(tiny_checkpoint, monkeypatch):
    """A capture that fails (here: forced, as if on CUDA) leaves eager steps with a warning;
    the engine starts, answers, and its stats say why it runs eagerly."""
    import dataclasses
    import logging

    from mossv_ros.engine import graphs
    from mossv_ros.engine.config import EngineConfig
    from mossv_ros.engine.engine import StreamingEngine
    from mossv_ros.engine.events import AnswerEvent, Frame
    from mossv_ros.engine.runner import ModelRunner

    def broken(self):
        raise RuntimeError('operation not permitted when stream is capturing')
    monkeypatch.setattr(graphs.StepGraphs, 'capture', broken)
    cfg = EngineConfig(model_path=str(tiny_checkpoint), max_frames=8, max_context_tokens=2048,
                       round_close_after_frames=1, sampling=SamplingConfig(max_new_tokens=4))
    runner = ModelRunner(cfg)
    runner.config = dataclasses.replace(runner.config, device='cuda')  # as if on a GPU
    engine = StreamingEngine(cfg, runner=runner)
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logging.getLogger('mossv_ros.engine.runner').addHandler(handler)
    try:
        engine.start()
        try:
            assert engine.wait_ready(60)
            path = engine.stats().decode_path
            ok, round_id, _ = engine.submit_question('What is there?')
            for i in range(3):
                engine.submit_frame(Frame(np.full((40, 60, 3), 20 * i, np.uint8)),
                                    stamp_sec=float(i))
                assert engine.wait_idle(30)
            finals = [e for e in engine.poll_events()
                      if isinstance(e, AnswerEvent) and e.is_final and e.round_id == round_id]
        finally:
            engine.stop()
    finally:
        logging.getLogger('mossv_ros.engine.runner').removeHandler(handler)
    assert path.startswith('eager (capture failed: RuntimeError') and ok
    assert len(finals) == 1
    assert any('CUDA graph capture failed' in r.getMessage() for r in records)
    assert engine.runner.frames.graph is None and engine.runner.graphs is None


def test_cpu_runs_eagerly_and_says_so(tiny_runner):
    assert tiny_runner.capture_graphs(tiny_runner.new_sessions(1)) == 'eager (cpu)'


def test_decode_graph_batch_sizes():
    assert decode_batch_sizes(1) == [1]
    assert decode_batch_sizes(4) == [1, 2, 4]
    assert decode_batch_sizes(6) == [1, 2, 4, 6]


# ----------------------------------------------------------------------------- sampling
class HostSampler:
    """The sampler the engine used before sampling moved to the device (host, one row)."""

    def __init__(self, config, suppress_ids, vocab_size):
        self.config = config
        self.suppress = sorted({i for i in suppress_ids if 0 <= i < vocab_size})
        self.generator = torch.Generator().manual_seed(config.seed)

    def __call__(self, logits, history=()):
        cfg = self.config
        logits = torch.nan_to_num(logits.detach().float().cpu(), nan=float('-inf'),
                                  posinf=torch.finfo(torch.float32).max)
        if self.suppress:
            logits[self.suppress] = float('-inf')
        if cfg.repetition_penalty != 1.0 and history:
            idx = torch.tensor(sorted(set(history)), dtype=torch.long)
            idx = idx[idx < logits.shape[0]]
            vals = logits[idx]
            logits[idx] = torch.where(vals > 0, vals / cfg.repetition_penalty,
                                      vals * cfg.repetition_penalty)
        if cfg.temperature == 0.0:
            return int(torch.argmax(logits))
        logits = (logits - logits.max()) / cfg.temperature
        if cfg.top_k > 0:
            kth = torch.topk(logits, min(cfg.top_k, logits.shape[0])).values[-1]
            logits[logits < kth] = float('-inf')
        probs = torch.softmax(logits, dim=-1)
        if cfg.top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)
            cum = torch.cumsum(sorted_p, dim=-1)
            sorted_p[cum - sorted_p > cfg.top_p] = 0.0
            probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
        return int(torch.multinomial(probs, 1, generator=self.generator))


@pytest.mark.parametrize('cfg', [
    SamplingConfig(),
    SamplingConfig(repetition_penalty=1.7),
    SamplingConfig(temperature=0.8, seed=3),
    SamplingConfig(temperature=1.3, top_k=20, seed=5),
    SamplingConfig(temperature=0.9, top_p=0.6, seed=7),
    SamplingConfig(temperature=1.1, top_k=50, top_p=0.9, repetition_penalty=1.2, seed=9),
], ids=['greedy', 'penalty', 'temperature', 'top-k', 'top-p', 'all'])
def test_device_sampler_equals_host_sampler(cfg):
    vocab, suppress = 300, [0, 7, 299, 400]
    new, old = Sampler(cfg, suppress, vocab), HostSampler(cfg, suppress, vocab)
    rng = torch.Generator().manual_seed(1)
    history = []
    for _ in range(60):
        logits = torch.randn(vocab, generator=rng) * 3
        logits[5] = float('nan')
        logits[9] = float('inf') if len(history) % 7 == 0 else logits[9]
        a, b = new(logits, history), old(logits, history)
        assert a == b
        assert a not in suppress
        history.append(a)


def test_batched_greedy_equals_each_row_and_hopeless_rows_fall_back():
    cfg = SamplingConfig(repetition_penalty=1.5)
    sampler = Sampler(cfg, [0, 1], 16)
    logits = torch.randn(3, 16, generator=torch.Generator().manual_seed(2))
    logits[2] = float('-inf')  # nothing finite to choose from
    histories = [[3, 4], [], [5]]
    ids = sampler.sample(logits, histories).tolist()
    assert ids[:2] == [sampler(logits[0], histories[0]), sampler(logits[1], histories[1])]
    assert ids[2] == 2  # the first id that is not suppressed


def test_named_streams_draw_independently_and_restart_from_their_seed():
    """A camera's draws are its own: row ``i`` of a batch draws from ``streams[i]`` as it
    would alone, and ``restart`` makes a stream draw again as after start."""
    cfg = SamplingConfig(temperature=1.0, seed=3)
    logits = torch.zeros(2, 50)  # uniform: every id is a draw of the stream itself
    sampler = Sampler(cfg, [], 50)
    together = [sampler.sample(logits, [[], []], ['head', 'wrist']).tolist() for _ in range(20)]
    alone = Sampler(cfg, [], 50)
    head = [alone(logits[0], stream='head') for _ in range(20)]
    assert [ids[0] for ids in together] == head
    assert [ids[0] for ids in together] != [ids[1] for ids in together]
    sampler.restart('head')
    assert [sampler(logits[0], stream='head') for _ in range(20)] == head
    assert sampler.stream_seed(None) == 3  # the unnamed stream: the seed itself
    assert len({sampler.stream_seed(s) for s in ('head', 'wrist', None)}) == 3
    assert Sampler(SamplingConfig(temperature=1.0, seed=4), [], 50).stream_seed('head') \
        != sampler.stream_seed('head')
    with pytest.raises(ValueError, match='1 streams for 2 rows'):
        sampler.sample(logits, [[], []], ['head'])


def test_flash_attention_2_only_where_it_can_run(monkeypatch):
    """Issue 37: 'auto' picks FlashAttention-2 only on CUDA in float16/bfloat16 and only when
    its real interface imports; flash-attn-4 alone (a bare ``flash_attn`` namespace package)
    and float32 fall back to SDPA; asking for it where it cannot run is refused with why."""
    import importlib
    import sys
    import types

    from mossv_ros.engine.runner import pick_attn_implementation
    real = importlib.import_module

    def fake(installed):
        def import_module(name, *args, **kwargs):
            if name.startswith('flash_attn'):
                if name in installed:
                    return types.ModuleType(name)
                raise ImportError(f'No module named {name!r}')
            return real(name, *args, **kwargs)
        return import_module
    namespace_only = {'flash_attn'}  # flash-attn-4: the package, not the FA2 interface
    full = {'flash_attn', 'flash_attn.flash_attn_interface'}
    monkeypatch.setitem(sys.modules, 'flash_attn', types.ModuleType('flash_attn'))
    monkeypatch.setattr(importlib, 'import_module', fake(namespace_only))
    assert pick_attn_implementation('auto', 'cuda', 'bfloat16') == 'sdpa'
    with pytest.raises(ValueError, match='flash_attn_interface'):
        pick_attn_implementation('flash_attention_2', 'cuda', 'bfloat16')
    monkeypatch.setattr(importlib, 'import_module', fake(full))
    assert pick_attn_implementation('auto', 'cuda', 'bfloat16') == 'flash_attention_2'
    assert pick_attn_implementation('auto', 'cuda', 'float16') == 'flash_attention_2'
    assert pick_attn_implementation('auto', 'cuda', 'float32') == 'sdpa'
    assert pick_attn_implementation('auto', 'cpu', 'bfloat16') == 'sdpa'
    with pytest.raises(ValueError, match='bfloat16 or float16'):
        pick_attn_implementation('flash_attention_2', 'cuda', 'float32')
    with pytest.raises(ValueError, match='needs CUDA'):
        pick_attn_implementation('flash_attention_2', 'cpu', 'bfloat16')
