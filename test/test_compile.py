# Copyright 2026 The mossv_ros authors
# SPDX-License-Identifier: Apache-2.0
"""The text step compiled by inductor (``engine.compile``, issue 33), proven on the CPU: with
int8 weights it computes the eager int8 step's logits, every shape compiles once (no
recompile after warm-up), the generated code writes the caches in place (no copy of a whole
cache per step), and an engine that runs it says the same greedy words as the eager one.

Compilation is slow on the CPU (tens of seconds): one small compiled runner serves the tests
of this module."""
import math
import re

import numpy as np
import pytest
import torch

from mossv_ros.engine.config import EngineConfig, resolve_compile

pytest.importorskip('torchao')
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope='module')
def compiled(tiny_checkpoint):
    """(runner, its sessions, compiled StepGraphs) of the tiny model in int8, float32."""
    from mossv_ros.engine.runner import ModelRunner
    runner = ModelRunner(EngineConfig(model_path=str(tiny_checkpoint), device='cpu',
                                      dtype='float32', quantization='int8', max_frames=8,
                                      max_context_tokens=2048, compile_mode='inductor',
                                      cameras=('a', 'b')))
    sessions = runner.new_sessions(2)
    path = runner.capture_graphs(sessions)
    assert path.startswith('compiled (inductor') and 'not captured (cpu)' in path, path
    return runner, sessions, runner.graphs


def _stream(runner, sessions, graphs):
    """Logits of a stream over both sessions: prefills, a frame, a question, batched decode."""
    s = runner.special
    runner.graphs = graphs
    frame = runner.encode_frames([np.full((60, 80, 3), 90, np.uint8)])[0]
    frame.frame_index = 0
    out = [runner.start_session(x) for x in sessions]
    out.append(runner.feed(sessions[0], [s.silence, s.image], [(1, frame)]))
    out.append(runner.feed(sessions[1], runner.question_ids('How many shapes are there?')))
    for t in (40, 41, 42):
        out += list(runner.feed_batch(sessions, [t, t + 1]))
    out.append(runner.feed(sessions[0], [43]))
    return torch.stack(out)


def test_auto_compiles_quantized_weights_on_cuda_only():
    assert resolve_compile('auto', 'cuda', 'int8') and resolve_compile('auto', 'cuda:1', 'fp8')
    assert not resolve_compile('auto', 'cuda', 'none')
    assert not resolve_compile('auto', 'cpu', 'int8')
    assert resolve_compile('inductor', 'cpu', 'none') and not resolve_compile('off', 'cuda',
                                                                              'int8')


def test_compiled_int8_step_equals_the_eager_int8_step(compiled):
    runner, sessions, graphs = compiled
    eager = _stream(runner, sessions, None)
    fast = _stream(runner, sessions, graphs)
    runner.graphs = graphs
    worst = float((fast - eager).abs().max())
    print(f'compiled vs eager int8: max |dlogit| {worst:.2e}')
    assert worst < 1e-4
    assert torch.equal(fast.argmax(-1), eager.argmax(-1))


def test_no_recompile_after_warm_up(compiled):
    """Every captured shape was compiled at configure: a stream that uses them compiles
    nothing more (``fail_on_recompile``)."""
    runner, sessions, graphs = compiled
    with torch.compiler.set_stance('fail_on_recompile'):
        _stream(runner, sessions, graphs)
        graphs.warm_up()


def _allocations(code: str):
    """Shapes of the buffers inductor's generated code allocates."""
    found = re.findall(r'empty_strided_(?:cpu|cuda)\(\(([^)]*)\)', code)
    return [tuple(int(x) for x in f.split(',') if x.strip()) for f in found]


def _copies_a_cache(code: str, cache_shape) -> bool:
    """The code allocates a buffer of cache slots (last dims: slots, head_dim) as large as a
    whole layer's cache, or copies into one (a clone of the cache and a copy back). The rows a
    gathered step reads are fewer than the pool's: not a copy of the cache."""
    return (any(s[-2:] == tuple(cache_shape[-2:]) and math.prod(s) >= math.prod(cache_shape)
                for s in _allocations(code))
            or bool(re.search(r'aten\.copy_|\.copy_\(', code)))


def test_the_generated_step_writes_the_caches_in_place(compiled):
    from torch._inductor.utils import run_and_get_code

    from mossv_ros.engine.step import build_metadata, to_device
    runner, sessions, graphs = compiled
    pool = sessions[0].pool
    cache_shape = pool.text_k[0].shape
    for shape in (graphs.decode_shape(2, 1), graphs.prefill_shape(30)):
        meta, _ = build_metadata(shape, pool, [])
        torch._dynamo.reset()  # (compile again, to read the code)
        fn = torch.compile(runner.model.forward_step, fullgraph=True, dynamic=False)
        _, codes = run_and_get_code(fn, pool, to_device(meta, pool.device), shape)
        code = '\n'.join(codes)
        assert 'index_put' in code  # the cache write is in there
        assert not _copies_a_cache(code, cache_shape), shape
    torch._dynamo.reset()
    graphs.warm_up()  # (the module's compiled step again, for the tests after this one)


def test_the_copy_detector_sees_a_mutated_view_copied():
    """The check above can fail: a write into a view of one stacked cache tensor (the layout
    before issue 33) makes inductor clone and copy back the whole tensor."""
    from torch._inductor.utils import run_and_get_code
    stacked = torch.zeros(3, 1, 2, 64, 8)

    def write(cache, rows, k):
        cache[1][rows[:, None], :, torch.tensor([5])] = k
        return cache[1].sum()
    fn = torch.compile(write, fullgraph=True, dynamic=False)
    _, codes = run_and_get_code(fn, stacked, torch.tensor([0]), torch.ones(1, 1, 2, 8))
    assert _copies_a_cache('\n'.join(codes), stacked[0].shape)
    torch._dynamo.reset()


def test_an_engine_on_the_compiled_int8_step_says_what_the_eager_one_says():
    """Greedy words of the toyworld model in int8, compiled against eager, on a held-out
    episode through the engine threads."""
    from mossv_ros.engine.engine import StreamingEngine
    from mossv_ros.model_dirs import default_model_dir
    from mossv_ros.toyworld.evaluate import eval_episodes, stream_episodes
    episode = eval_episodes(1)[0]
    said = {}
    for mode in ('off', 'inductor'):
        engine = StreamingEngine(EngineConfig(
            model_path=str(default_model_dir()), device='cpu', dtype='float32',
            quantization='int8', compile_mode=mode, max_frames=32, max_context_tokens=2048,
            round_close_after_frames=0, round_close_after_sec=0.0))
        engine.start()
        try:
            assert engine.wait_ready(600), engine.stats().last_error
            if mode == 'inductor':
                assert engine.stats().decode_path.startswith('compiled (inductor')
            out = stream_episodes(engine, {'default': episode}, stamp_base=1000.0)
        finally:
            engine.stop()
        said[mode] = [(u.frame, u.text) for u in out['default']]
    assert said['off'], 'the episode gave nothing to compare'
    assert said['inductor'] == said['off']
