"""Checkpoint loading (both layouts, clear errors) and a real video through the engine."""
import json
import time

import numpy as np
import pytest
import torch

from mossv_ros.engine import events as ev
from mossv_ros.engine.checkpoint import CheckpointError, load_tokenizer, resolve_special_ids
from mossv_ros.engine.config import EngineConfig
from mossv_ros.engine.engine import StreamingEngine
from mossv_ros.engine.runner import ModelRunner
from mossv_ros.engine.tiny import build_tiny_model, tiny_config_dict, write_tiny_checkpoint

from .conftest import shared_videos


def test_both_layouts_load_the_same_weights(tmp_path):
    model = build_tiny_model(tiny_config_dict(), seed=3)
    moss = write_tiny_checkpoint(tmp_path / 'moss', layout='moss', model=model)
    plain = write_tiny_checkpoint(tmp_path / 'plain', layout='mllama', model=model)
    assert json.loads((moss / 'config.json').read_text())['model_type'] == 'video_mllama'
    from safetensors import safe_open
    with safe_open(str(moss / 'model.safetensors'), 'pt') as f:
        assert any(k.startswith('language_model.model.') for k in f.keys())
    a = ModelRunner(EngineConfig(model_path=str(moss)))
    b = ModelRunner(EngineConfig(model_path=str(plain)))
    for (na, ta), (nb, tb) in zip(a.model.hf_model.state_dict().items(),
                                  b.model.hf_model.state_dict().items()):
        assert na == nb and torch.equal(ta, tb)


def test_clear_errors_for_bad_checkpoints(tmp_path, tiny_checkpoint):
    with pytest.raises(CheckpointError, match='not a directory'):
        ModelRunner(EngineConfig(model_path=str(tmp_path / 'missing')))
    other = tmp_path / 'other'
    other.mkdir()
    (other / 'config.json').write_text(json.dumps({'model_type': 'llava'}))
    with pytest.raises(CheckpointError, match="model_type 'llava'"):
        ModelRunner(EngineConfig(model_path=str(other)))
    broken = write_tiny_checkpoint(tmp_path / 'broken')
    tok = json.loads((broken / 'tokenizer.json').read_text())
    tok['added_tokens'] = [t for t in tok['added_tokens'] if t['content'] != '<|silence|>']
    del tok['model']['vocab']['<|silence|>']
    (broken / 'tokenizer.json').write_text(json.dumps(tok))
    with pytest.raises(CheckpointError, match='silence'):
        resolve_special_ids(load_tokenizer(broken))
    with pytest.raises(ValueError, match='engine.dtype'):
        EngineConfig(model_path=str(tiny_checkpoint), dtype='float8').validate()
    with pytest.raises(ValueError, match='engine.device'):
        EngineConfig(device='gpu0').validate()


@pytest.mark.slow
@pytest.mark.skipif(not shared_videos(), reason='no videos in ../shared/data/videos')
def test_real_video_frames_through_the_engine(tiny_checkpoint):
    import cv2
    video = shared_videos()[0]
    cap = cv2.VideoCapture(str(video))
    fps = cap.get(cv2.CAP_PROP_FPS) or 30.0
    cfg = EngineConfig(model_path=str(tiny_checkpoint), max_frames=16, max_frame_queue=64)
    cfg.sampling.max_new_tokens = 6
    engine = StreamingEngine(cfg)
    engine.start()
    assert engine.wait_ready(30)
    stamps = []
    i = 0
    while i < int(fps * 8):
        ok, bgr = cap.read()
        if not ok:
            break
        t = i / fps
        if engine.submit_frame(ev.Frame(np.ascontiguousarray(bgr[:, :, ::-1]), stamp=t,
                                        frame_id='video'), stamp_sec=t):
            stamps.append(t)
        if i == int(fps * 2):
            assert engine.submit_question('What is happening?', 'v')[0]
        i += 1
    cap.release()
    end = time.monotonic() + 30
    while engine.stats().num_frames_encoded < len(stamps) and time.monotonic() < end:
        time.sleep(0.05)
    time.sleep(0.3)
    engine.stop()
    events = engine.poll_events()
    assert len(stamps) >= 6 and engine.stats().num_frames_encoded == len(stamps)
    sourced = [e.source for e in events if isinstance(e, (ev.TokenEvent, ev.AnswerEvent))
               and e.source.frame_index >= 0]
    assert sourced, 'no output conditioned on a frame'
    assert all(s.stamp in stamps and s.frame_id == 'video' for s in sourced)
    assert all(s.stamp == stamps[s.frame_index] for s in sourced)
