"""A reset is a fresh start (issue 26 item 11): the same input after a session reset gives the
same output as after the engine started. A looped bag (stamps jump back each loop) replayed
three times into one engine gives three identical output sequences (greedy), frame for
frame; so does a ``reset()`` between two plays. And questions queue per camera (item 2).
"""
from mossv_ros.engine import events as ev
from mossv_ros.engine.config import DEFAULT_CAMERA, EngineConfig, SamplingConfig
from mossv_ros.engine.engine import StreamingEngine
from mossv_ros.model_dirs import default_model_dir
from mossv_ros.toyworld.evaluate import eval_episodes

#: a bag's camera runs at 3 fps; the engine takes 1 (frames.rate_hz)
BAG_FPS = 3
SECONDS = 14


def _engine(**overrides):
    cfg = EngineConfig(model_path=str(default_model_dir()), device='cpu', dtype='float32',
                       round_close_after_frames=3, round_close_after_sec=0.0, **overrides)
    engine = StreamingEngine(cfg)
    engine.start()
    assert engine.wait_ready(120), engine.stats().last_error
    return engine


def _play(engine, episode, stamp_base=0.0):
    """Play one loop of the 'bag': BAG_FPS frames per second of the episode (stamps from
    ``stamp_base``), the episode's questions after their frames. :returns: what came out,
    without round ids (they count on across loops): per Answer (text, revision, final, end
    reason, frame range, stamp seconds from ``stamp_base``); and the frames fed."""
    before = engine.stats().num_frames_received
    # (questions early enough for their rounds to close before the loop ends)
    asked = {q.after_frame: q for q in episode.questions
             if not q.interrupt and q.after_frame <= SECONDS - 6}
    for second in range(SECONDS):
        for k in range(BAG_FPS):
            stamp = stamp_base + second + k / BAG_FPS
            engine.submit_frame(ev.Frame(episode.frame(second), stamp=stamp), stamp_sec=stamp,
                                topic='/camera')
            assert engine.wait_idle(30)
        if second in asked:
            ok, _, why = engine.submit_question(asked[second].text)
            assert ok, why
            assert engine.wait_idle(30)
    out = [(e.text, e.revision, e.is_final, e.end_reason, e.first_frame_index,
            e.last_frame_index, round(e.source.stamp - stamp_base, 3))
           for e in engine.poll_events() if isinstance(e, ev.AnswerEvent)]
    return out, engine.stats().num_frames_received - before


def test_a_looped_bag_replays_identically():
    episode = eval_episodes(1)[0]
    assert any(q.after_frame <= SECONDS - 6 for q in episode.questions)
    engine = _engine()
    try:
        loops = [_play(engine, episode) for _ in range(3)]  # stamps jump back each loop
        resets = engine.stats().num_session_resets
    finally:
        engine.stop()
    first, fed = loops[0]
    assert fed == SECONDS  # one frame a second of stamps
    assert first, 'the episode gave no answer to compare'
    for answers, num_fed in loops[1:]:
        assert num_fed == fed  # the frame before the jump is not lost, none is added
        assert answers == first
    assert resets == 2


def _two_plays(**overrides):
    """An episode played, ``reset()``, played again. :returns: the two plays' outputs."""
    episode = eval_episodes(2)[1]
    engine = _engine(**overrides)
    try:
        one = _play(engine, episode, stamp_base=100.0)
        engine.reset('between plays')
        assert engine.wait_idle(30)
        engine.poll_events()
        two = _play(engine, episode, stamp_base=500.0)  # stamps go on: no jump, a reset
    finally:
        engine.stop()
    return one, two


def test_a_reset_between_two_plays_is_a_fresh_start():
    one, two = _two_plays()
    assert one == two


def test_with_sampling_a_reset_is_a_fresh_start_too():
    """Sampling on: a reset restarts the camera's random stream from ``sampling.seed``, so
    the replay draws as the first play did (before: the stream went on across the reset)."""
    one, two = _two_plays(sampling=SamplingConfig(temperature=2.5, top_k=20, seed=3))
    other, _ = _two_plays(sampling=SamplingConfig(temperature=2.5, top_k=20, seed=4))
    assert one[0], 'the episode gave no answer to compare'
    assert other != one  # sampling does change what is said: the comparison can fail
    assert one == two


def test_question_queue_is_per_camera_and_names_who_superseded(tiny_runner):
    """Six questions to camera b do not cancel camera a's waiting ones; past
    prompt.max_pending a camera's oldest is cancelled, naming the question that took its
    place (before: one queue for all cameras, 'superseded by a newer question')."""
    cfg = EngineConfig(model_path='in-memory', max_frames=8, max_context_tokens=2048,
                       cameras=('a', 'b'), max_pending_questions=2)
    engine = StreamingEngine(cfg, runner=tiny_runner)
    engine.start()
    try:
        assert engine.wait_ready(60)
        with engine.inbox.cv:  # the engine thread cannot take a question meanwhile
            a1 = engine.submit_question('first for a', 'a-1', camera='a')
            a2 = engine.submit_question('second for a', 'a-2', camera='a')
            b = [engine.submit_question(f'question {i} for b', f'b-{i}', camera='b')
                 for i in range(6)]
            cancelled = [e for e in engine.poll_events()
                         if isinstance(e, ev.RoundEvent) and e.kind == 'cancelled']
            a3 = engine.submit_question('third for a', 'a-3', camera='a')
            later = [e for e in engine.poll_events()
                     if isinstance(e, ev.RoundEvent) and e.kind == 'cancelled']
    finally:
        engine.stop()
    assert a1[0] and a2[0] and a3[0] and all(ok for ok, _, _ in b)
    assert [e.request_id for e in cancelled] == ['b-0', 'b-1', 'b-2', 'b-3']
    first = cancelled[0]
    assert f'superseded by round {b[2][1]}' in first.reason and "'b-2'" in first.reason
    assert "camera 'b'" in first.reason and 'prompt.max_pending=2' in first.reason
    assert [e.request_id for e in later] == ['a-1']
    assert f'superseded by round {a3[1]}' in later[0].reason


def test_a_huge_request_id_is_echoed_bounded():
    """What quotes a caller's input stays short (issue 26 item 3: a 10 MB request_id went
    whole into the log and the Answer)."""
    from mossv_ros.engine.policy import echo, MAX_ECHO_CHARS
    quoted = echo('x' * 10_000_000)
    assert len(quoted) < MAX_ECHO_CHARS + 40 and quoted.endswith('(10000000 characters)')
    assert echo('short') == 'short' and echo(None) == '<NoneType>'


def test_only_a_sampling_change_restarts_the_random_streams(tiny_runner):
    """A live change of another parameter (here round closing) leaves every camera's random
    stream where it is; a change of a sampling parameter starts them over."""
    import dataclasses
    cfg = EngineConfig(model_path='in-memory', max_frames=8, max_context_tokens=2048,
                       sampling=SamplingConfig(temperature=1.0))
    engine = StreamingEngine(cfg, runner=tiny_runner)
    engine.start()
    try:
        assert engine.wait_ready(60)
        sampler = engine.sampler
        drawn = sampler.generator(DEFAULT_CAMERA).get_state()
        cfg = dataclasses.replace(cfg, round_close_after_frames=5)
        engine.update_config(cfg)
        assert engine.sampler is sampler
        assert sampler.generator(DEFAULT_CAMERA).get_state().equal(drawn)
        engine.update_config(dataclasses.replace(cfg, sampling=SamplingConfig(temperature=1.0,
                                                                              seed=9)))
        assert engine.sampler is not sampler and engine.sampler.config.seed == 9
    finally:
        engine.stop()
