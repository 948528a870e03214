"""The dialogue state machine alone: scripted tokens, no model, no torch, no threads.

Token ids: 0 is ``<|silence|>``; every other id decodes to one character of :data:`CHARS`
(id 99 decodes to an incomplete UTF-8 sequence, U+FFFD, until id 98 follows it).
"""
from hypothesis import given, settings
from hypothesis import strategies as st

from mossv_ros.engine.config import EngineConfig, SamplingConfig
from mossv_ros.engine.dialogue import Dialogue, Mode
from mossv_ros.engine.events import (
    AnswerEvent,
    FrameRef,
    Question,
    RoundEvent,
    SilenceEvent,
    TokenEvent,
)

SILENCE = 0
CHARS = ' abcdefghijklmnopqrstuvwxyz'


def decode(ids):
    out = ''
    for i, t in enumerate(ids):
        if t == 99:
            out += 'é' if i + 1 < len(ids) and ids[i + 1] == 98 else '\ufffd'
        elif t != 98:
            out += CHARS[t % len(CHARS)]
    return out


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def make(close_after_frames=3, close_after_sec=0.0, max_new_tokens=50, clock=None):
    cfg = EngineConfig(round_close_after_frames=close_after_frames,
                       round_close_after_sec=close_after_sec,
                       sampling=SamplingConfig(max_new_tokens=max_new_tokens))
    return Dialogue(cfg, SILENCE, decode, oldest_frame_index=lambda: 7,
                    clock=clock or Clock())


def ids(text):
    return [CHARS.index(c) for c in text]


def speak(d, text, after_frame=False):
    out = []
    for i, t in enumerate(ids(text) + [SILENCE]):
        out += d.on_token(t, after_frame=after_frame and i == 0)
    return out


def frame(d, index):
    d.on_frame(FrameRef(index, stamp=float(index), frame_id='cam'))
    return d.on_token(SILENCE, after_frame=True)


def of(events, kind):
    return [e for e in events if isinstance(e, kind)]


def test_observing_speech_has_round_zero_and_is_never_final():
    d = make()
    events = speak(d, 'ab')
    tokens = of(events, TokenEvent)
    assert [(t.round_id, t.revision, t.token_index, t.text) for t in tokens] == \
        [(0, 0, 0, 'a'), (0, 0, 1, 'b')]
    [answer] = of(events, AnswerEvent)
    assert (answer.round_id, answer.text, answer.is_final) == (0, 'ab', False)
    assert [s.is_silent for s in of(events, SilenceEvent)] == [False, True]
    assert d.mode is Mode.SILENT and d.pending == SILENCE


def test_round_answer_then_revision_then_one_final_after_silent_frames():
    d = make(close_after_frames=2)
    events = d.start_round(Question('what?', 'req', 5, 100.0))
    assert of(events, RoundEvent)[0].kind == 'started'
    events = speak(d, 'red')
    events += frame(d, 1)  # one silent frame: the round stays open
    events += speak(d, 'blue', after_frame=True)  # the scene changed: a revision
    events += frame(d, 2)
    assert not any(isinstance(e, RoundEvent) and e.kind == 'ended' for e in events)
    events += frame(d, 3)  # second silent frame after the revision: the round ends
    answers = of(events, AnswerEvent)
    assert [(a.revision, a.text, a.is_final) for a in answers] == \
        [(0, 'red', False), (1, 'blue', False), (1, 'blue', True)]
    assert [t.revision for t in of(events, TokenEvent)] == [0] * 3 + [1] * 4
    assert all(a.request_id == 'req' and a.round_id == 5 for a in answers)
    assert answers[-1].source.frame_index == 3 and answers[-1].first_frame_index == 7
    [ended] = [e for e in events if isinstance(e, RoundEvent) and e.kind == 'ended']
    assert ended.reason == 'silence' and d.round.round_id == 0
    assert d.counts.num_rounds_answered == 1


def test_a_question_mid_utterance_interrupts_the_round():
    d = make()
    d.start_round(Question('one', '', 1))
    events = []
    for t in ids('abc'):
        events += d.on_token(t)
    events += d.start_round(Question('two', '', 2))
    [final] = of(events, AnswerEvent)
    assert (final.round_id, final.text, final.is_final, final.end_reason) == \
        (1, 'abc', True, 'interrupted')
    assert [(e.round_id, e.kind) for e in of(events, RoundEvent)] == [(1, 'ended'),
                                                                     (2, 'started')]
    assert d.mode is Mode.SILENT and d.round.round_id == 2 and not d.history


def test_max_new_tokens_forces_silence_and_ends_the_round():
    d = make(max_new_tokens=3)
    d.start_round(Question('q', '', 4))
    events = []
    for t in ids('abcdef'):
        events += d.on_token(t)
        if d.round.round_id == 0:
            break
    assert d.pending == SILENCE and d.mode is Mode.SILENT
    [final] = of(events, AnswerEvent)
    assert (final.text, final.is_final, final.end_reason) == ('abc', True, 'max_new_tokens')


def test_round_closes_on_time_when_no_frame_comes():
    clock = Clock()
    d = make(close_after_frames=30, close_after_sec=10.0, clock=clock)
    d.start_round(Question('q', '', 3, submit_ts=clock.now))
    clock.now += 0.5
    speak(d, 'hi')
    clock.now += 9.0
    assert not d.quiet_too_long()
    clock.now += 1.5
    assert d.quiet_too_long()
    events = d.end_round('silence')
    [final] = of(events, AnswerEvent)
    assert (final.text, final.is_final, final.revision) == ('hi', True, 0)


def test_ttft_and_inter_token_latency_from_the_clock():
    clock = Clock()
    d = make(clock=clock)
    d.start_round(Question('q', '', 1, submit_ts=clock.now))
    clock.now += 0.25
    d.on_token(ids('a')[0])
    clock.now += 0.1
    d.on_token(ids('b')[0])
    clock.now += 0.1
    d.on_token(ids('c')[0])
    d.end_round('silence')
    m = d.last_metrics
    assert abs(m.ttft_sec - 0.25) < 1e-9 and abs(m.itl_sec - 0.1) < 1e-9 and m.num_tokens == 3


def test_end_rounds_mid_utterance_yields_to_silence():
    d = make()
    d.start_round(Question('q', '', 9))
    d.on_token(ids('a')[0])
    events = d.end_rounds('deactivated')
    assert d.pending == SILENCE and d.mode is Mode.SILENT
    [final] = of(events, AnswerEvent)
    assert final.is_final and final.end_reason == 'deactivated'


def test_a_round_without_an_utterance_repeats_nothing_and_counts_as_cancelled():
    d = make()
    d.start_round(Question('q', '', 2))
    events = d.end_round('reset')
    [final] = of(events, AnswerEvent)
    assert (final.text, final.revision, final.is_final) == ('', 0, True)
    assert d.counts.num_rounds_cancelled == 1 and d.counts.num_rounds_answered == 0


def test_a_split_utf8_character_is_held_back_until_complete():
    d = make()
    deltas = [e.text for t in (ids('a')[0], 99, 98, ids('b')[0]) for e in d.on_token(t)
              if isinstance(e, TokenEvent)]
    assert deltas == ['a', '', 'é', 'b']
    assert ''.join(deltas) == decode([ids('a')[0], 99, 98, ids('b')[0]])


def test_reset_ends_the_round_and_clears_the_dialogue():
    d = make()
    d.start_round(Question('q', '', 6))
    d.on_frame(FrameRef(4))
    d.on_token(ids('a')[0])
    events = d.reset()
    assert [e.reason for e in of(events, RoundEvent)] == ['reset']
    assert of(events, AnswerEvent)[0].is_final
    assert d.round.round_id == 0 and d.newest.frame_index == -1 and d.pending is None


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(['frame', 'question', 'silence', 'end_rounds',
                                          'reset']),
                          st.integers(1, 26)), max_size=80))
def test_every_round_ends_exactly_once_with_one_final_answer(script):
    d = make(close_after_frames=2, max_new_tokens=5)
    events, next_id, started = [], 1, []
    for step in script:
        if step == 'frame':
            d.on_frame(FrameRef(len(events)))
            events += d.on_token(SILENCE, after_frame=True)
        elif step == 'question':
            events += d.start_round(Question('q', '', next_id))
            started.append(next_id)
            next_id += 1
        elif step == 'silence':
            events += d.on_token(SILENCE)
        elif step == 'end_rounds':
            events += d.end_rounds('deactivated')
        elif step == 'reset':
            events += d.reset()
        else:
            events += d.on_token(step)
    events += d.end_round('shutdown')
    for rid in started:
        finals = [e for e in events if isinstance(e, AnswerEvent) and e.round_id == rid
                  and e.is_final]
        ends = [e for e in events if isinstance(e, RoundEvent) and e.round_id == rid
                and e.kind == 'ended']
        assert len(finals) == 1 and len(ends) == 1, (rid, script)
        assert events.index(finals[0]) < events.index(ends[0])
        revisions = [e.revision for e in events if isinstance(e, AnswerEvent)
                     and e.round_id == rid and not e.is_final]
        assert revisions == list(range(len(revisions)))
    assert not any(isinstance(e, AnswerEvent) and e.is_final and e.round_id == 0
                   for e in events)


def test_realtime_system_prompt_is_byte_exact():
    """The prompt the real-time checkpoint was trained with, byte for byte (its sha256)."""
    import hashlib

    from mossv_ros.engine import prompt
    digest = hashlib.sha256(prompt.REALTIME_SYSTEM_PROMPT.encode('utf-8')).hexdigest()
    assert digest == prompt.REALTIME_SYSTEM_PROMPT_SHA256
    assert len(prompt.REALTIME_SYSTEM_PROMPT) == 1221
