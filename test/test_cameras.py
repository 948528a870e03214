"""Several cameras, one model: a session per camera, decoded together in one batch (engine)."""
import time

import numpy as np
import pytest

from mossv_ros.engine.config import EngineConfig, SamplingConfig
from mossv_ros.engine.engine import StreamingEngine
from mossv_ros.engine.events import AnswerEvent, Frame, RoundEvent, TokenEvent
from mossv_ros.toyworld import evaluate as tw_eval
from mossv_ros.toyworld import shipped_model_dir
from mossv_ros.toyworld.world import make_episode


def _engine(cameras, **kw):
    kw = {'round_close_after_frames': 0, 'round_close_after_sec': 0.0, **kw}
    config = EngineConfig(model_path=str(shipped_model_dir()), device='cpu', dtype='float32',
                          cameras=tuple(cameras), **kw)
    engine = StreamingEngine(config)
    engine.start()
    assert engine.wait_ready(120), engine.stats().last_error
    return engine


def test_two_episodes_on_two_cameras_equal_each_run_alone(monkeypatch):
    """Two toyworld episodes streamed at once on two cameras, questions to each: every
    camera's utterances (and so its scores) equal those of its episode alone."""
    # (held-out episodes whose answers are due at 5 of the same frames: both sessions speak
    # at once there, world.speech_frames)
    episodes = {'head': make_episode(1_000_020, num_frames=24),
                'wrist': make_episode(1_000_028, num_frames=24)}
    alone = {}
    for cam, ep in episodes.items():
        engine = _engine(['default'])
        try:
            alone[cam] = tw_eval.stream_episode(engine, ep, stamp_base=1000.0)
        finally:
            engine.stop()
    engine = _engine(list(episodes))
    batch_sizes = []
    feed_batch = engine.runner.feed_batch
    monkeypatch.setattr(engine.runner, 'feed_batch', lambda sessions, tokens: (
        batch_sizes.append(len(sessions)), feed_batch(sessions, tokens))[1])
    try:
        together = tw_eval.stream_episodes(engine, episodes, stamp_base=1000.0)
        stats = engine.stats()
    finally:
        engine.stop()
    for cam in episodes:
        assert [(u.frame, u.text) for u in together[cam]] == \
            [(u.frame, u.text) for u in alone[cam]], cam
        assert alone[cam], 'the episode must say something'
    assert max(batch_sizes) == 2  # the two sessions did speak at the same time, batched
    assert [c.name for c in stats.cameras] == ['head', 'wrist']
    assert all(c.num_frames_received == 24 for c in stats.cameras)
    scores = {cam: tw_eval.score([episodes[cam]], [together[cam]]) for cam in episodes}
    assert scores == {cam: tw_eval.score([episodes[cam]], [alone[cam]]) for cam in episodes}


def test_with_sampling_each_camera_draws_as_if_alone():
    """Sampling on (temperature > 0): a camera's random stream is its own (seeded from
    ``sampling.seed`` and its name), so what it says does not depend on what the other
    cameras say or when they speak (before: one generator for every camera, so each draw
    moved the others' streams and two cameras together spoke differently from each alone)."""
    episodes = {'head': make_episode(1_000_020, num_frames=16),
                'wrist': make_episode(1_000_028, num_frames=16)}

    def sampling(seed):
        return {'sampling': SamplingConfig(temperature=2.5, top_k=20, seed=seed)}

    def alone(seed):
        said = {}
        for cam, ep in episodes.items():
            engine = _engine([cam], **sampling(seed))
            try:
                said[cam] = [(u.frame, u.text)
                             for u in tw_eval.stream_episode(engine, ep, stamp_base=1000.0)]
            finally:
                engine.stop()
        return said

    by_itself = alone(seed=3)
    assert alone(seed=4) != by_itself  # sampling does change what is said: this can fail
    engine = _engine(list(episodes), **sampling(3))
    try:
        together = tw_eval.stream_episodes(engine, episodes, stamp_base=1000.0)
    finally:
        engine.stop()
    assert {cam: [(u.frame, u.text) for u in said] for cam, said in together.items()} \
        == by_itself


def test_questions_name_their_camera_and_every_output_says_which():
    engine = _engine(['head', 'wrist'])
    try:
        ok, _, message = engine.submit_question('What colour is the circle?', camera='rear')
        assert not ok and 'rear' in message and 'head, wrist' in message
        with pytest.raises(ValueError, match='known: head, wrist'):
            engine.submit_frame(Frame(np.zeros((8, 8, 3), np.uint8)), camera='rear')
        ep = make_episode(1_000_005, num_frames=3)
        engine.submit_frame(Frame(ep.frame(0), stamp=5.0, frame_id='wrist_link'), 5.0,
                            camera='wrist')
        assert engine.wait_idle(30)
        ok, rid_w, _ = engine.submit_question('How many shapes are there?', 'w', 'wrist')
        ok2, rid_d, _ = engine.submit_question('How many shapes are there?', 'd')  # default
        assert ok and ok2 and rid_w != rid_d
        assert engine.wait_idle(30)
        engine.submit_frame(Frame(ep.frame(1), stamp=6.0, frame_id='wrist_link'), 6.0,
                            camera='wrist')
        assert engine.wait_idle(30)
        events = engine.poll_events()
    finally:
        engine.stop()
    tokens = [e for e in events if isinstance(e, TokenEvent) and e.round_id == rid_w]
    assert tokens and all(t.camera == 'wrist' for t in tokens)
    assert all(t.source.frame_id == 'wrist_link' for t in tokens)
    started = {e.round_id: e.camera for e in events
               if isinstance(e, RoundEvent) and e.kind == 'started'}
    assert started == {rid_w: 'wrist', rid_d: 'head'}
    # the head camera never sent a frame: its answer comes from text, no frame behind it
    head = [e for e in events if isinstance(e, AnswerEvent) and e.round_id == rid_d]
    assert all(a.camera == 'head' and a.source.frame_index == -1 for a in head)


def test_a_camera_that_stops_still_ends_its_rounds_and_the_other_goes_on():
    engine = _engine(['head', 'wrist'], round_close_after_sec=1.0, round_close_after_frames=2)
    ep_h, ep_w = make_episode(1_000_001, num_frames=12), make_episode(1_000_002, num_frames=12)
    try:
        for t in range(3):
            for cam, ep in (('head', ep_h), ('wrist', ep_w)):
                engine.submit_frame(Frame(ep.frame(t), stamp=float(t)), float(t), camera=cam)
            assert engine.wait_idle(30)
        ok, rid_h, _ = engine.submit_question('How many shapes are there?', camera='head')
        ok2, rid_w, _ = engine.submit_question('How many shapes are there?', camera='wrist')
        assert ok and ok2
        for t in range(3, 12):  # the head camera stopped: only the wrist sends
            engine.submit_frame(Frame(ep_w.frame(t), stamp=float(t)), float(t),
                                camera='wrist')
            assert engine.wait_idle(30)
        end = time.monotonic() + 10
        events = []
        while time.monotonic() < end and not any(
                isinstance(e, RoundEvent) and e.kind == 'ended' and e.round_id == rid_h
                for e in events):
            events += engine.poll_events(timeout=0.1)
        events += engine.poll_events()
        stats = engine.stats()
    finally:
        engine.stop()
    ends = {e.round_id: e for e in events if isinstance(e, RoundEvent) and e.kind == 'ended'}
    assert ends[rid_h].camera == 'head' and ends[rid_h].reason == 'silence'  # on time
    assert ends[rid_w].camera == 'wrist'  # after its silent frames
    finals = [e for e in events if isinstance(e, AnswerEvent) and e.is_final]
    assert sorted(e.round_id for e in finals) == sorted([rid_h, rid_w])
    head, wrist = stats.cameras
    assert head.num_frames_received == 3 and wrist.num_frames_received == 12
    assert wrist.num_frames_cached == 12 and head.num_frames_cached == 3


def test_total_memory_budget_bounds_every_session_together():
    probe = _engine(['default'])
    try:
        per_frame = probe.session.vision_cache.bytes_per_frame
        text = probe.session.cache_bytes
    finally:
        probe.stop()
    budget = 2 * text + 7 * per_frame  # two prompts and seven frames in all
    engine = _engine(['head', 'wrist'], max_total_memory_bytes=budget)
    ep = make_episode(1_000_004, num_frames=10)
    try:
        for t in range(10):
            for cam in ('head', 'wrist'):
                engine.submit_frame(Frame(ep.frame(t), stamp=float(t)), float(t), camera=cam)
            assert engine.wait_idle(30)
        stats = engine.stats()
    finally:
        engine.stop()
    assert stats.cache_bytes <= budget + 2 * 64 * 1024  # (answer tokens grow the text caches)
    assert all(c.num_frames_cached >= 1 for c in stats.cameras)
    assert sum(c.num_frames_cached for c in stats.cameras) <= 7
    assert stats.num_frames_evicted >= 20 - 7
