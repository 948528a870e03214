"""Quantized weights (issue 27): ``model.quantization`` int8 on the CPU gives the float model's
stream on held-out toyworld episodes (one camera and two), stores the linear layers at a
quarter of their float32 bytes plus their scales, and every combination that
cannot run is refused before a weight is read, with the reason and what would work."""
import json
import shutil

import numpy as np
import pytest
import torch

from mossv_ros.engine import quantize
from mossv_ros.engine.checkpoint import CheckpointError
from mossv_ros.engine.config import EngineConfig
from mossv_ros.engine.engine import StreamingEngine
from mossv_ros.engine.runner import ModelRunner
from mossv_ros.model_dirs import default_model_dir
from mossv_ros.toyworld.evaluate import eval_episodes, stream_episodes

pytest.importorskip('torchao')


def _config(**kw):
    return EngineConfig(model_path=str(default_model_dir()), device='cpu', dtype='float32',
                        round_close_after_frames=0, round_close_after_sec=0.0, **kw)


def _stream(quantization, cameras, episodes):
    engine = StreamingEngine(_config(quantization=quantization, cameras=cameras))
    engine.start()
    try:
        assert engine.wait_ready(60), engine.stats().last_error
        said = stream_episodes(engine, dict(zip(cameras, episodes)), stamp_base=1000.0)
        stats = engine.stats()
    finally:
        engine.stop()
    return {cam: [(u.frame, u.text) for u in utts] for cam, utts in said.items()}, stats


@pytest.mark.parametrize('cameras', [('default',), ('a', 'b')])
def test_int8_streams_held_out_episodes_as_float32_does(cameras):
    episodes = eval_episodes(2)[:len(cameras)]
    want, plain = _stream('none', cameras, episodes)
    got, stats = _stream('int8', cameras, episodes)
    assert any(want.values()), 'the episodes gave nothing to compare'
    assert got == want
    assert stats.quantization == 'int8' and plain.quantization == 'none'
    assert stats.weight_bytes < plain.weight_bytes


def test_int8_logits_stay_close_to_float32():
    """The stream's logits, measured: a prefill, frames, a question, decode steps."""
    rows = []
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (112, 112, 3), dtype=np.uint8) for _ in range(3)]
    for mode in ('none', 'int8'):
        runner = ModelRunner(_config(quantization=mode))
        s = runner.special
        session = runner.new_session()
        out = [runner.start_session(session)]
        for i, frame in enumerate(runner.encode_frames(images)):
            frame.frame_index = i
            out.append(runner.feed(session, [s.silence, s.image], [(1, frame)]))
        out.append(runner.feed(session, runner.question_ids('How many shapes are there?')))
        out += [runner.feed(session, [t]) for t in (40, 41, 42)]
        rows.append(torch.stack(out))
    diff = (rows[0] - rows[1]).abs().max().item()
    spread = rows[0].abs().max().item()
    print(f'int8 vs float32: max |dlogit| {diff:.4f} of logits up to {spread:.1f}')
    assert diff < 0.05 * spread
    assert torch.equal(rows[0].argmax(-1), rows[1].argmax(-1))


def test_weight_bytes_fall_by_the_expected_ratio():
    """int8: a linear layer of n x k float32 weights (4 n k bytes) becomes n k int8 weights,
    n float32 scales and n int8 zero points; nothing else changes."""
    plain = ModelRunner(_config())
    text_linears = [(name, m.weight.shape) for name, m in plain.model.hf_model.named_modules()
                    if isinstance(m, torch.nn.Linear) and quantize.is_quantized_layer(name)]
    saved = sum(4 * n * k - (n * k + 4 * n + n) for _, (n, k) in text_linears)
    int8 = ModelRunner(_config(quantization='int8'))
    assert int8.num_quantized_layers == len(text_linears) > 0
    assert int8.weight_bytes == plain.weight_bytes - saved
    others = plain.weight_bytes - sum(4 * n * k for _, (n, k) in text_linears)
    print(f'weights {plain.weight_bytes} -> {int8.weight_bytes} bytes ({others} not quantized: '
          'embeddings, convolution, norms, gates, biases)')


@pytest.mark.parametrize('mode,device,capability,reason', [
    ('int4', 'cpu', None, 'model.quantization=int4 needs CUDA'),
    ('fp8', 'cpu', None, 'model.quantization=fp8 needs CUDA'),
    ('fp8', 'cuda', (8, 6), 'compute capability 8.9 or newer (Ada, Hopper); this one is 8.6'),
    ('int3', 'cpu', None, "model.quantization='int3' is invalid"),
])
def test_combinations_that_cannot_run_are_refused(mode, device, capability, reason):
    with pytest.raises(ValueError, match=reason.replace('(', r'\(').replace(')', r'\)')):
        quantize.check(mode, device, capability)
    quantize.check('fp8', 'cuda', (9, 0))  # an H100 / H200: fine


def test_a_cpu_runner_refuses_int4_before_reading_weights(monkeypatch):
    from mossv_ros.engine import runner as runner_module
    monkeypatch.setattr(runner_module, 'load_hf_model', lambda *a, **k: pytest.fail('read'))
    with pytest.raises(ValueError, match='int4 needs CUDA.*use int8 or none'):
        ModelRunner(_config(quantization='int4'))


def test_missing_torchao_is_refused_with_the_install_line(monkeypatch):
    import builtins
    real = builtins.__import__

    def no_torchao(name, *args, **kwargs):
        if name == 'torchao' or name.startswith('torchao.'):
            raise ImportError('No module named torchao')
        return real(name, *args, **kwargs)
    monkeypatch.setattr(builtins, '__import__', no_torchao)
    with pytest.raises(ValueError, match=r'needs torchao.*pip install torchao==0\.18\.0'):
        quantize.check('int8', 'cpu')


def test_an_already_quantized_checkpoint_is_refused(tmp_path):
    folder = tmp_path / 'quantized'
    shutil.copytree(default_model_dir(), folder)
    config = json.loads((folder / 'config.json').read_text())
    config['quantization_config'] = {'quant_method': 'bitsandbytes', 'load_in_8bit': True}
    (folder / 'config.json').write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match='a quantized checkpoint .bitsandbytes.*'
                       'model.quantization'):
        ModelRunner(EngineConfig(model_path=str(folder), device='cpu'))


def test_int8_runs_the_static_step_a_cuda_graph_replays():
    """The padded full-capacity steps of the CUDA graphs (graphs.StepGraphs, replayed eagerly
    on the CPU) give the eager shapes' logits with int8 weights, for one session and a batch
    of two: quantization and the GPU decode path work together."""
    from mossv_ros.engine.graphs import StepGraphs
    runner = ModelRunner(_config(quantization='int8'))
    s = runner.special
    frame = runner.encode_frames([np.full((60, 80, 3), 90, np.uint8)])[0]
    results = []
    for static in (False, True):
        sessions = runner.new_sessions(2)
        if static:
            runner.graphs = StepGraphs(runner.model, sessions[0].pool)
        out = [runner.start_session(x) for x in sessions]
        out.append(runner.feed(sessions[0], [s.silence, s.image], [(1, frame)]))
        out.append(runner.feed(sessions[1], runner.question_ids('How many shapes are there?')))
        out += list(runner.feed_batch(sessions, [40, 41]))
        results.append(torch.stack(out))
    torch.testing.assert_close(results[0], results[1], atol=1e-4, rtol=1e-4)


def test_fp8_and_int4_take_the_kernels_that_run_fast():
    """Issue 33: fp8 quantizes activations and weights per row (torchao's dynamic float8
    config: a real fp8 GEMM, ``torch._scaled_mm`` with row-wise scales), not weight-only
    (dequantized in full every call); int4 packs for PyTorch's own int4 kernel
    (``tile_packed_to_4d``), not the default packing that needs the ``mslk`` package. Both run
    on CUDA only: here their configurations are checked."""
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Int4WeightOnlyConfig,
        PerRow,
    )
    fp8 = quantize._config('fp8')
    assert isinstance(fp8, Float8DynamicActivationFloat8WeightConfig)
    assert isinstance(fp8.granularity, (PerRow, list, tuple))
    grans = fp8.granularity if isinstance(fp8.granularity, (list, tuple)) else [fp8.granularity]
    assert all(isinstance(g, PerRow) for g in grans)
    int4 = quantize._config('int4')
    assert isinstance(int4, Int4WeightOnlyConfig) and int4.group_size == 128
    assert str(getattr(int4.int4_packing_format, 'value', int4.int4_packing_format)) == \
        'tile_packed_to_4d'
