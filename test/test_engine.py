"""Engine behaviour with scripted token choices over the real tiny model (plain pytest)."""
import time

import numpy as np
import pytest

from mossv_ros.engine import events as ev
from mossv_ros.engine.config import EngineConfig
from mossv_ros.engine.engine import StreamingEngine
from mossv_ros.engine.runner import ModelRunner


class ScriptedSampler:
    """Returns ``speak`` tokens while ``talking`` is set, else ``<|silence|>``."""

    def __init__(self, runner, talking=False, word=97):  # 'a'
        self.silence = runner.special.silence
        self.talking = talking
        self.word = word
        self.calls = 0

    def __call__(self, logits, history):
        self.calls += 1
        assert logits.shape[-1] == 272
        return self.word if self.talking else self.silence


class FeedLog:
    """Wraps ``runner.feed`` to record what was fed."""

    def __init__(self, runner):
        self.calls = []
        self._feed = runner.feed
        runner.feed = self

    def __call__(self, session, token_ids, frames=(), all_logits=False):
        self.calls.append((list(token_ids), [f.frame_index for _, f in frames]))
        return self._feed(session, token_ids, frames, all_logits)


def make(tiny_checkpoint, talking=False, **overrides):
    cfg = EngineConfig(model_path=str(tiny_checkpoint), max_frames=overrides.pop('max_frames', 8),
                       max_context_tokens=2048, **overrides)
    runner = ModelRunner(cfg)
    sampler = ScriptedSampler(runner, talking)
    log = FeedLog(runner)
    engine = StreamingEngine(cfg, runner=runner, sampler=sampler)
    engine.start()
    assert engine.wait_ready(30)
    return engine, runner, sampler, log


def frame(i, h=48, w=64):
    rng = np.random.default_rng(i)
    return ev.Frame(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), stamp=(i, 0),
                    frame_id='cam')


def wait_for(cond, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return False


def drain(engine):
    return engine.poll_events()


def test_silence_waits_for_a_frame(tiny_checkpoint):
    engine, runner, sampler, log = make(tiny_checkpoint)
    try:
        time.sleep(0.3)
        assert len(log.calls) == 1  # only the session prefill: silence -> no decoding
        engine.submit_frame(frame(0), stamp_sec=0.0)
        assert wait_for(lambda: len(log.calls) == 2)
        s = runner.special
        assert log.calls[1] == ([s.silence, s.image], [0])  # one <|silence|> + <|image|>
        time.sleep(0.2)
        assert len(log.calls) == 2
    finally:
        assert engine.stop()


def test_question_interrupts_at_token_boundary(tiny_checkpoint):
    engine, runner, sampler, log = make(tiny_checkpoint)
    try:
        engine.submit_frame(frame(0), stamp_sec=0.0)
        assert wait_for(lambda: len(log.calls) >= 2)
        sampler.talking = True  # the model starts a spontaneous utterance
        engine.submit_frame(frame(1), stamp_sec=1.0)
        assert wait_for(lambda: len(log.calls) >= 20)
        ok, round_id, msg = engine.submit_question('What colour is it?', 'req-1')
        assert ok and round_id == 1, msg
        s = runner.special

        def is_question(call):  # the session prefill (starting with BOS) has headers too
            return s.start_header in call[0] and call[0][0] != s.bos
        assert wait_for(lambda: any(is_question(c) for c in log.calls))
        q_call = next(c for c in log.calls if is_question(c))
        assert q_call[0][:2] == [ord('a'), s.eot]  # pending word fed, then the turn closes
        assert q_call[0][-1] == ord('\n')  # ends with the assistant header's blank line
    finally:
        engine.stop()
    events = drain(engine)
    answers = [e for e in events if isinstance(e, ev.AnswerEvent)]
    assert answers[0].round_id == 0 and answers[0].end_reason == ev.END_INTERRUPTED
    started = [e for e in events if isinstance(e, ev.RoundEvent) and e.kind == 'started']
    assert [(e.round_id, e.request_id) for e in started] == [(1, 'req-1')]
    tokens = [e for e in events if isinstance(e, ev.TokenEvent) and e.round_id == 1]
    assert tokens and all(t.request_id == 'req-1' for t in tokens)
    assert [t.token_index for t in tokens] == list(range(len(tokens)))


def test_frames_during_decoding_are_inserted_in_order(tiny_checkpoint):
    engine, runner, sampler, log = make(tiny_checkpoint, talking=True, max_frame_queue=16,
                                        max_frames=16)
    sampler.talking = True
    try:
        for i in range(6):
            assert engine.submit_frame(frame(i), stamp_sec=float(i))
        assert wait_for(lambda: engine.stats().num_frames_cached == 6)
    finally:
        engine.stop()
    inserted = [i for _, frames in log.calls for i in frames]
    assert inserted == list(range(6))
    for tokens, frames in log.calls:
        if frames:  # mid-sentence: [pending word, <|image|>]
            assert tokens == [ord('a'), runner.special.image]
    assert engine.stats().num_dropped_frames == 0


def test_eviction_keeps_memory_within_budget(tiny_checkpoint):
    engine, runner, sampler, log = make(tiny_checkpoint, max_frames=3, num_sink_frames=1)
    try:
        for i in range(10):
            engine.submit_frame(frame(i), stamp_sec=float(i))
            assert wait_for(lambda: engine.stats().num_frames_encoded == i + 1)
        assert wait_for(lambda: sum(len(f) for _, f in log.calls) == 10)
        stats = engine.stats()
        cache = engine.session.vision_cache
        assert stats.num_frames_cached == 3 and stats.num_frames_evicted == 7
        assert cache.frame_indices() == [0, 8, 9]  # sink frame + recent window
        assert stats.cache_bytes <= 3 * cache.bytes_per_frame + \
            engine.session.kv_cache.used_bytes
    finally:
        engine.stop()


def test_every_accepted_question_ends_in_answer_or_cancel(tiny_checkpoint):
    engine, runner, sampler, log = make(tiny_checkpoint, max_pending_questions=2)
    sampler.talking = True
    accepted = []
    try:
        for i in range(6):
            ok, rid, _ = engine.submit_question(f'question {i}', f'r{i}')
            assert ok
            accepted.append(rid)
        assert engine.submit_question('   ', 'blank')[0] is False
        assert engine.submit_question('x' * 5000)[2].startswith('prompt has 5000')
        time.sleep(0.5)
    finally:
        engine.stop()
    events = drain(engine)
    ended = {e.round_id for e in events if isinstance(e, ev.AnswerEvent) and e.is_final}
    cancelled = {e.round_id for e in events if isinstance(e, ev.RoundEvent)
                 and e.kind == 'cancelled'}
    assert set(accepted) == ended | cancelled
    assert cancelled  # the bounded queue cancelled some, explicitly


def test_model_exception_surfaces_and_reset_recovers(tiny_checkpoint):
    engine, runner, sampler, log = make(tiny_checkpoint)
    real_feed = log._feed

    def broken(*args, **kwargs):
        raise RuntimeError('simulated device fault')
    log._feed = broken
    ok, rid, _ = engine.submit_question('hello?')
    assert ok
    assert wait_for(lambda: engine.state == 'error')
    assert wait_for(lambda: not any(t.is_alive() for t in engine._threads))
    events = drain(engine)
    fatal = [e for e in events if isinstance(e, ev.ErrorEvent) and e.fatal]
    assert fatal and 'simulated device fault' in fatal[0].message
    assert any(isinstance(e, ev.AnswerEvent) and e.round_id == rid and e.is_final
               and e.end_reason == ev.END_ERROR for e in events)
    assert engine.submit_question('again?')[0] is False
    log._feed = real_feed
    engine.reset('recover')
    assert engine.wait_ready(10) and engine.submit_question('again?')[0]
    engine.stop()


def test_rate_limit_subsamples_by_stamp(tiny_checkpoint):
    engine, runner, sampler, log = make(tiny_checkpoint)
    try:
        accepted = [engine.submit_frame(frame(i), stamp_sec=i / 10) for i in range(30)]
        assert sum(accepted) == 3  # 30 frames at 10 Hz over 3 s -> 1 Hz
    finally:
        engine.stop()


@pytest.mark.parametrize('text,ok', [('', False), ('\x00\x01', False), ('¿Qué ves? 看', True)])
def test_prompt_validation(text, ok):
    from mossv_ros.engine.policy import validate_prompt
    good, cleaned, reason = validate_prompt(text, 100)
    assert good is ok and reason


class TextSampler:
    """Speaks the UTF-8 bytes of ``text`` (byte tokenizer: id = byte), then stays silent."""

    def __init__(self, runner, text):
        self.ids = list(text.encode('utf-8'))
        self.silence = runner.special.silence
        self.talking = False

    def __call__(self, logits, history):
        return self.ids.pop(0) if self.talking and self.ids else self.silence


def test_streamed_token_texts_add_up_to_the_answer_with_multibyte_utf8(tiny_checkpoint):
    text = 'héllo wörld ✓ 日本 ' * 8  # 208 bytes < max_new_tokens
    cfg = EngineConfig(model_path=str(tiny_checkpoint), max_frames=8, max_context_tokens=2048)
    runner = ModelRunner(cfg)
    sampler = TextSampler(runner, text)
    engine = StreamingEngine(cfg, runner=runner, sampler=sampler)
    engine.start()
    try:
        assert engine.wait_ready(30)
        sampler.talking = True
        ok, rid, _ = engine.submit_question('Say it.')
        assert ok
        assert wait_for(lambda: not sampler.ids, 30)
        engine.submit_frame(frame(0), stamp_sec=0.0)
        events = []
        assert wait_for(lambda: events.extend(drain(engine)) or any(
            isinstance(e, ev.AnswerEvent) and e.round_id == rid for e in events), 30)
    finally:
        engine.stop()
    tokens = [e for e in events if isinstance(e, ev.TokenEvent) and e.round_id == rid]
    answer = [e for e in events if isinstance(e, ev.AnswerEvent) and e.round_id == rid][0]
    assert len(tokens) == len(text.encode('utf-8'))
    assert ''.join(t.text for t in tokens) == answer.text == text
    assert all('\ufffd' not in t.text for t in tokens)


def _events(engine):
    return engine.poll_events()


def test_device_oom_evicts_frames_and_continues(tiny_checkpoint):
    """A simulated device OOM (the forward raises torch.OutOfMemoryError once more than 6
    frames are cached, like a device with room for 6) evicts frames, caps the cache, reports
    a non-fatal error and keeps going: later frames are fed and a question is answered."""
    import torch
    engine, runner, sampler, _ = make(tiny_checkpoint, max_frames=32)
    model = runner.model
    real = model.forward_step

    def small_device(pool, meta, shape):
        if engine.session.vision_cache.num_frames > 6:
            raise torch.OutOfMemoryError('CUDA out of memory (simulated)')
        return real(pool, meta, shape)

    model.forward_step = small_device
    try:
        for i in range(20):
            assert engine.submit_frame(frame(i), stamp_sec=float(i))
            assert engine.wait_idle(10)
        ok, rid, _ = engine.submit_question('Still watching?')
        assert ok and engine.wait_idle(10)
        assert engine.submit_frame(frame(20), stamp_sec=20.0) and engine.wait_idle(10)
        stats = engine.stats()
        evs = _events(engine)
    finally:
        engine.stop()
    assert stats.state == 'ready' and stats.num_oom_events >= 1
    assert 1 <= stats.num_frames_cached <= 6
    assert stats.num_frames_encoded == 21  # nothing dropped
    ooms = [e for e in evs if isinstance(e, ev.ErrorEvent) and 'out of memory' in e.message]
    assert ooms and not any(e.fatal for e in ooms)
    assert not any(isinstance(e, ev.ErrorEvent) and e.fatal for e in evs)
    assert any(isinstance(e, ev.RoundEvent) and e.kind == 'started' and e.round_id == rid
               for e in evs)


def test_camera_gap_resets_session_when_configured(tiny_checkpoint):
    """Frames stop for 30 s of stamp time and resume: with reset_after_gap_sec 10 the session
    restarts (one reset, cache holds only new frames); with 0 it continues; both record it."""
    for limit, resets in ((10.0, 1), (0.0, 0)):
        engine, runner, _, _ = make(tiny_checkpoint, max_frames=32, reset_after_gap_sec=limit)
        try:
            for i, t in enumerate([0.0, 1.0, 2.0, 32.0, 33.0]):
                assert engine.submit_frame(frame(i), stamp_sec=t)
                assert engine.wait_idle(10)
            stats = engine.stats()
            evs = _events(engine)
        finally:
            engine.stop()
        assert stats.longest_frame_gap_sec == pytest.approx(30.0)
        assert stats.num_session_resets == resets
        assert stats.num_frames_cached == (2 if resets else 5)
        reasons = [e.reason for e in evs if isinstance(e, ev.SessionResetEvent)]
        assert reasons == (['camera gap of 30.0 s'] if resets else [])


def test_question_while_loading_is_refused_with_a_reason(tiny_checkpoint):
    import threading
    gate = threading.Event()
    cfg = EngineConfig(model_path=str(tiny_checkpoint))
    engine = StreamingEngine(cfg, load_progress=lambda done, total: gate.wait(10))
    engine.start()
    try:
        ok, rid, message = engine.submit_question('Are you there?')
        assert not ok and rid == 0 and 'not ready' in message and 'loading' in message
        gate.set()
        assert engine.wait_ready(30)
        assert engine.submit_question('Are you there?')[0]
    finally:
        gate.set()
        engine.stop()


def test_a_frame_rate_that_would_stop_the_camera_is_refused():
    """Issue 36 item 6: frames.rate_hz:=1e-300 was accepted, and the node silently stopped
    taking frames."""
    for bad in (1e-300, 0.0, -1.0, float('nan'), 31.0):
        with pytest.raises(ValueError, match=r'frames.rate_hz=.* is invalid: expected a float '
                           r'in \[0.01, 30\]'):
            EngineConfig(frame_rate_hz=bad).validate()
    EngineConfig(frame_rate_hz=0.01).validate()


def test_a_nul_in_a_question_is_named_as_such():
    """Issue 36 item 6: a question with a NUL was refused as 'empty or whitespace only'; over
    ROS the string ends at the NUL, and the reason says so either way."""
    from mossv_ros.engine.policy import validate_prompt
    ok, _, reason = validate_prompt('\x00What is there?', 100)
    assert not ok and 'NUL character' in reason and 'ends at its first NUL' in reason
    ok, _, reason = validate_prompt('What\x00 is there?', 100)
    assert not ok and 'NUL character' in reason
    ok, _, reason = validate_prompt('', 100)  # what ROS delivers of '\x00What...'
    assert not ok and reason.startswith('prompt is empty') and 'first NUL' in reason
