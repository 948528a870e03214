# Copyright 2026 The mossv_ros authors
# SPDX-License-Identifier: Apache-2.0
"""GPU memory, proven on the CPU (issue 33): the streaming load (every layout, sharded or not,
fused and quantized layer by layer), the memory plan before loading (exact for weights and
caches, refused with the nearest configuration that fits), and nothing kept after a stop."""
import gc
import json
import weakref

import numpy as np
import pytest
import torch

from mossv_ros.engine import memory, quantize
from mossv_ros.engine.checkpoint import CheckpointError, load_hf_model
from mossv_ros.engine.config import EngineConfig
from mossv_ros.engine.fusion import FusedAway
from mossv_ros.engine.memory import MemoryPlanError
from mossv_ros.engine.moss_video import MossVideoModel
from mossv_ros.engine.runner import ModelRunner
from mossv_ros.engine.tiny import build_tiny_model, tiny_config_dict, write_tiny_checkpoint


def _logits(hf_model, frame_image):
    """A short stream through the MOSS forward: prefill, a frame, a question, decode."""
    from mossv_ros.engine import step
    from mossv_ros.engine.kv_cache import CachePool
    from mossv_ros.engine.runner import Session
    model = MossVideoModel(hf_model)
    pool = CachePool(1, len(model.self_layer_ids), len(model.cross_layer_ids),
                     model.num_kv_heads, model.head_dim, model.tokens_per_frame, 512, 4,
                     model.dtype, model.device)
    session = Session(pool.row(0))
    keys, values = model.encode_tiles(torch.from_numpy(frame_image[None]))
    out = [step.run(model, [session], [list(range(10, 30))])]
    session.next_pos = 20
    session.vision_cache.insert(0, model.finalize_keys(keys[:, 0], 20), values[:, 0], 20, 0)
    for ids in ([256 + 16], list(range(40, 50)), [77], [78]):
        out.append(step.run(model, [session], [ids]))
        session.next_pos += len(ids)
    return torch.cat(out)


@pytest.fixture(scope='module')
def reference():
    cfg = tiny_config_dict()
    model = build_tiny_model(cfg, seed=3)
    image = np.random.default_rng(0).integers(0, 255, (112, 112, 3), dtype=np.uint8)
    return cfg, model, image, _logits(model, image)


@pytest.mark.parametrize('layout', ['moss', 'mllama'])
@pytest.mark.parametrize('shard', [0, 40_000])
def test_every_layout_streams_in_and_computes_the_same(tmp_path, reference, layout, shard):
    cfg, model, image, want = reference
    path = write_tiny_checkpoint(tmp_path / 'ckpt', layout=layout, config_dict=cfg,
                                 model=model, max_shard_bytes=shard)
    assert (path / 'model.safetensors.index.json').is_file() == bool(shard)
    if shard:
        assert len(list(path.glob('model-*.safetensors'))) > 3
    loaded, _ = load_hf_model(path, torch.float32, 'cpu')
    torch.testing.assert_close(_logits(loaded, image), want, rtol=0, atol=0)


def test_fused_streaming_load_keeps_the_stock_weights_as_views(tmp_path, reference):
    cfg, model, image, want = reference
    path = write_tiny_checkpoint(tmp_path / 'ckpt', config_dict=cfg, model=model)
    loaded, _ = load_hf_model(path, torch.float32, 'cpu', fuse=True)
    attn = loaded.model.language_model.layers[0].self_attn
    assert attn.q_proj.weight.data_ptr() == attn.moss_qkv.weight.data_ptr()
    got = _logits(loaded, image)
    assert float((got - want).abs().max()) < 1e-4
    plain = quantize.weight_bytes(model)
    assert quantize.weight_bytes(loaded) == plain  # views: the fused bytes exist once


def test_int8_fused_streaming_load_quantizes_the_fused_layers(tmp_path, reference):
    """Quantized weights keep the fused GEMMs: the fused linears are what is quantized, the
    stock projections are gone, and the logits equal those of the unfused int8 model (per-row
    scales: the same values) up to float rounding."""
    pytest.importorskip('torchao')
    cfg, model, image, want = reference
    path = write_tiny_checkpoint(tmp_path / 'ckpt', config_dict=cfg, model=model)
    fused, _ = load_hf_model(path, torch.float32, 'cpu', quantization='int8', fuse=True)
    plain, _ = load_hf_model(path, torch.float32, 'cpu', quantization='int8')
    layer = fused.model.language_model.layers[0]
    assert isinstance(layer.self_attn.q_proj, FusedAway)
    assert isinstance(layer.mlp.up_proj, FusedAway)
    assert quantize.is_quantized(layer.self_attn.moss_qkv.weight)
    assert quantize.is_quantized(layer.mlp.moss_gate_up.weight)
    with pytest.raises(RuntimeError, match='fused into moss_qkv'):
        layer.self_attn.q_proj(torch.zeros(1, 64))
    a, b = _logits(fused, image), _logits(plain, image)
    assert float((a - b).abs().max()) < 1e-4
    assert torch.equal(a.argmax(-1), b.argmax(-1))
    assert abs(quantize.weight_bytes(fused) - quantize.weight_bytes(plain)) < 0.01 * \
        quantize.weight_bytes(plain)
    assert float((a - want).abs().max()) < 0.05 * float(want.abs().max())


def test_the_load_never_holds_more_than_one_linear_unquantized(tmp_path, reference,
                                                              monkeypatch):
    """Tensor by tensor: each time the loader quantizes, the float linear weights in the model
    are at most those of the module it quantizes (one linear layer), never a layer's or the
    model's."""
    pytest.importorskip('torchao')
    cfg, model, _, _ = reference
    path = write_tiny_checkpoint(tmp_path / 'ckpt', config_dict=cfg, model=model,
                                 max_shard_bytes=30_000)
    real, seen = quantize.apply, []

    def spy(module, mode):
        float_linears = [m for m in root[0].modules() if isinstance(m, torch.nn.Linear)
                         and not m.weight.is_meta and not quantize.is_quantized(m.weight)]
        seen.append((len(float_linears), sum(isinstance(m, torch.nn.Linear)
                                             for m in module.modules())))
        return real(module, mode)
    root = []
    from transformers import MllamaForConditionalGeneration
    init = MllamaForConditionalGeneration.__init__

    def remember(self, *args, **kwargs):
        init(self, *args, **kwargs)
        root.append(self)
    monkeypatch.setattr(MllamaForConditionalGeneration, '__init__', remember)
    monkeypatch.setattr(quantize, 'apply', spy)
    loaded, _ = load_hf_model(path, torch.float32, 'cpu', quantization='int8')
    assert len(seen) > 10
    assert all(floats <= in_group for floats, in_group in seen), seen
    assert quantize.count_quantized(loaded) == sum(
        isinstance(m, torch.nn.Linear) for m in loaded.modules())


def test_weights_of_the_wrong_shape_are_named(tmp_path, reference):
    cfg, model, _, _ = reference
    bad = json.loads(json.dumps(cfg))
    bad['text_config']['intermediate_size'] = 96
    path = write_tiny_checkpoint(tmp_path / 'ckpt', config_dict=cfg, model=model)
    (path / 'config.json').write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match=r'layers.0.mlp.down_proj.weight: shape \(64, 128\) '
                       r'in the checkpoint, \(64, 96\) expected'):
        load_hf_model(path, torch.float32, 'cpu')


# ---------------------------------------------------------------------- the plan
def test_the_plan_is_exact_for_weights_and_caches(tiny_checkpoint):
    """Planned weight and cache bytes equal what the runner then holds (float32 and int8)."""
    for mode in ('none', 'int8'):
        if mode != 'none':
            pytest.importorskip('torchao')
        config = EngineConfig(model_path=str(tiny_checkpoint), device='cpu', max_frames=12,
                              max_context_tokens=700, quantization=mode, cameras=('a', 'b'))
        runner = ModelRunner(config)
        plan = runner.memory_plan
        assert plan.weight_bytes == runner.weight_bytes, mode
        sessions = runner.new_sessions(2)
        assert plan.cache_bytes == sessions[0].pool.nbytes
        assert plan.activation_bytes > 0 and plan.workspace_bytes > 0


def test_the_11b_plan_matches_docs_model_8_1(tmp_path):
    """docs/model.md section 8.1: 10.67 B parameters; 3.16 MiB per frame and 128 KiB per
    token of cache at bfloat16; int8 weights about half of bfloat16's."""
    from mossv_ros.engine.tiny import moss_11b_config_dict
    (tmp_path / 'config.json').write_text(json.dumps(moss_11b_config_dict()))
    shape = memory.model_shape(tmp_path)
    assert round(shape.num_params / 1e9, 2) == 10.67
    per_frame = memory.cache_bytes_per_camera(shape, 2, 1023, 'bfloat16') - \
        memory.cache_bytes_per_camera(shape, 1, 1023, 'bfloat16')
    assert round(per_frame / memory.MIB, 2) == 3.16
    per_16_tokens = memory.cache_bytes_per_camera(shape, 1, 1039, 'bfloat16') - \
        memory.cache_bytes_per_camera(shape, 1, 1023, 'bfloat16')
    assert per_16_tokens == 16 * 128 * 1024
    bf16 = memory.plan(shape, 'none', 'bfloat16', 'cuda', 1, 256, 4096, 16 * memory.GIB)
    int8 = memory.plan(shape, 'int8', 'bfloat16', 'cuda', 1, 256, 4096, 16 * memory.GIB)
    assert not bf16.fits and int8.fits
    assert 0.5 < int8.weight_bytes / bf16.weight_bytes < 0.55
    assert memory.suggest(shape, bf16)[0] == 'model.quantization:=int8'


def test_a_plan_that_does_not_fit_is_refused_before_any_weight_is_read(tiny_checkpoint,
                                                                       monkeypatch):
    from mossv_ros.engine import runner as runner_module
    monkeypatch.setattr(runner_module, 'load_hf_model', lambda *a, **k: pytest.fail('read'))
    config = EngineConfig(model_path=str(tiny_checkpoint), device='cpu', max_frames=4000,
                          max_context_tokens=4096, cameras=('a', 'b', 'c'),
                          max_device_memory_bytes=1 << 26)
    with pytest.raises(MemoryPlanError) as caught:
        ModelRunner(config)
    text = str(caught.value)
    assert 'does NOT fit' in text and 'available: 64.0 MiB' in text
    fixes = caught.value.suggestions
    assert any(f.startswith('cache.max_frames:=') for f in fixes), fixes
    # each suggestion fits
    frames = int(next(f for f in fixes if f.startswith('cache.max_frames')).split('=')[1])
    plan = caught.value.plan
    shape = memory.model_shape(tiny_checkpoint)
    assert memory.plan(shape, plan.quantization, plan.dtype, 'cpu', 3, frames, 4096,
                       plan.available_bytes).fits
    assert not memory.plan(shape, plan.quantization, plan.dtype, 'cpu', 3, frames + 1, 4096,
                           plan.available_bytes).fits


def test_nothing_fits_says_so(tiny_checkpoint):
    shape = memory.model_shape(tiny_checkpoint)
    plan = memory.plan(shape, 'none', 'float32', 'cpu', 1, 8, 512, 1000)
    assert memory.suggest(shape, plan) == []
    assert 'nothing fits' in str(MemoryPlanError(plan, []))


# ---------------------------------------------------------------------- nothing kept
def _engine_parts(tiny_checkpoint, cameras=('a', 'b')):
    from mossv_ros.engine.engine import StreamingEngine
    from mossv_ros.engine.graphs import StepGraphs
    config = EngineConfig(model_path=str(tiny_checkpoint), device='cpu', max_frames=8,
                          max_context_tokens=2048, cameras=cameras)
    runner = ModelRunner(config)
    engine = StreamingEngine(config, runner=runner)
    engine.start()
    assert engine.wait_ready(60)
    # the CUDA-graph object as on a GPU (on the CPU it replays eagerly): it must not hold
    # the engine's memory either
    pool = engine.session.pool
    runner.graphs = StepGraphs(runner.model, pool)
    return engine, runner


def test_a_stopped_engine_is_freed_without_the_garbage_collector(tiny_checkpoint):
    """No reference cycle among the engine, its camera sessions, the cache pool and the
    graphs: with the collector off, dropping the engine frees the model, the pool and the
    graphs (a GPU reconfigure then never holds two models)."""
    from mossv_ros.engine.events import Frame
    engine, runner = _engine_parts(tiny_checkpoint)
    engine.submit_frame(Frame(image=np.zeros((60, 80, 3), np.uint8), stamp=1.0),
                        stamp_sec=1.0, camera='a')
    ok, _, why = engine.submit_question('what is there?', camera='b')
    assert ok, why
    engine.wait_idle(30)
    refs = {'model': weakref.ref(runner.model), 'hf_model': weakref.ref(runner.model.hf_model),
            'pool': weakref.ref(engine.session.pool), 'graphs': weakref.ref(runner.graphs),
            'runner': weakref.ref(runner), 'engine': weakref.ref(engine),
            'camera': weakref.ref(engine.cameras()[0])}
    assert engine.stop()
    engine.poll_events()
    gc.collect()
    gc.disable()
    try:
        del engine, runner
        alive = [name for name, ref in refs.items() if ref() is not None]
    finally:
        gc.enable()
    assert alive == []


def test_an_oom_at_graph_capture_is_counted_and_warned(tiny_checkpoint, monkeypatch):
    """A device OOM while capturing the CUDA graphs (forced here, as if on CUDA): the engine
    runs eagerly, Status's decode_path says why, the OOM is counted and /diagnostics WARNs."""
    import dataclasses

    from mossv_ros.engine import graphs
    from mossv_ros.engine.engine import StreamingEngine

    def out_of_memory(self):
        raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB')
    monkeypatch.setattr(graphs.StepGraphs, 'capture', out_of_memory)
    cfg = EngineConfig(model_path=str(tiny_checkpoint), max_frames=8, max_context_tokens=2048)
    runner = ModelRunner(cfg)
    runner.config = dataclasses.replace(runner.config, device='cuda')  # as if on a GPU
    engine = StreamingEngine(cfg, runner=runner)
    engine.start()
    try:
        assert engine.wait_ready(60)
        stats = engine.stats()
    finally:
        engine.stop()
    assert stats.decode_path.startswith('eager (capture failed: OutOfMemoryError')
    assert stats.num_oom_events == 1
    pytest.importorskip('diagnostic_msgs')
    from builtin_interfaces.msg import Time
    from diagnostic_msgs.msg import DiagnosticStatus

    from mossv_ros.ros.diagnostics import diagnostic_array
    array = diagnostic_array('n', Time(), {}, stats, [], 2.0, None)
    part = next(st for st in array.status if st.name == 'n: engine')
    assert part.level == DiagnosticStatus.WARN and 'capture failed' in part.message


def test_an_oom_in_decode_is_counted_and_warned():
    """A device OOM survived in decode (frames evicted) makes /diagnostics WARN with the
    count, though the engine stays ready."""
    pytest.importorskip('diagnostic_msgs')
    from builtin_interfaces.msg import Time
    from diagnostic_msgs.msg import DiagnosticStatus

    from mossv_ros.engine.events import EngineStats
    from mossv_ros.ros.diagnostics import diagnostic_array
    for count, level in ((0, DiagnosticStatus.OK), (2, DiagnosticStatus.WARN)):
        stats = EngineStats(state='ready', num_oom_events=count, decode_path='eager (cpu)')
        part = next(st for st in diagnostic_array('n', Time(), {}, stats, [], 2.0, None).status
                    if st.name == 'n: engine')
        assert part.level == level
        assert ('out of memory 2 time(s)' in part.message) == bool(count)
