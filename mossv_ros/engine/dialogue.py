"""The dialogue: rounds, utterances, silence and revisions (docs/model.md sections 6-7).

Pure Python (no torch, no threads, no locks): the engine thread feeds it what happened (a
sampled token, a frame that went into the vision cache, a question, a reset) and it returns the
events that follow. Every rule of the stream grammar above the model lives here:

* **silence**: the model is silent when it samples ``<|silence|>``; a silent frame of an open
  round counts towards ``round_close_after_frames`` (:meth:`Dialogue.on_token` with
  ``after_frame``), and a round with no token and no frame for ``round_close_after_sec`` ends
  too (:meth:`Dialogue.quiet_too_long`);
* **revisions**: each utterance of a round is one revision, numbered from 0 in
  :meth:`Dialogue._open_utterance` (``revision`` on both the Token and the Answer);
* **final answers**: a round ends exactly once (:meth:`Dialogue.end_round`), with one final
  :class:`~.events.AnswerEvent`;
* **metrics**: TTFT and inter-token latency per round (:class:`~.events.RoundMetrics`).

The engine feeds the model :attr:`Dialogue.pending` (the token sampled last, or a forced
``<|silence|>``) before anything else at the next step.
"""
from collections import deque
from dataclasses import dataclass, field
import enum
import time
from typing import Callable, List, Optional

from .config import EngineConfig
from .events import (
    AnswerEvent,
    END_ERROR,
    END_INTERRUPTED,
    END_MAX_TOKENS,
    END_RESET,
    END_SILENCE,
    FrameRef,
    Question,
    RoundEvent,
    RoundMetrics,
    SilenceEvent,
    TokenEvent,
)


def cancelled_round(question: Question, reason: str) -> RoundEvent:
    """The event of a question cancelled before its round started."""
    return RoundEvent(round_id=question.round_id, request_id=question.request_id,
                      kind='cancelled', reason=reason, question=question.text,
                      camera=question.camera)


class Mode(enum.Enum):
    """What the model is doing between two tokens."""

    SILENT = 'silent'
    SPEAKING = 'speaking'


@dataclass
class Round:
    """The open round (question); ``round_id`` 0 = observing, no question asked."""

    round_id: int = 0
    request_id: str = ''
    question: str = ''
    submit_ts: float = 0.0
    num_revisions: int = 0  # utterances finished so far; the next one is this revision
    num_tokens: int = 0
    last_text: str = ''
    silent_frames: int = 0
    first_token_ts: float = 0.0
    last_token_ts: float = 0.0
    quiet_since_ts: float = 0.0  # monotonic time of the round's last token or frame


@dataclass
class Utterance:
    """The utterance being spoken: one revision of the round's answer."""

    revision: int
    ids: List[int] = field(default_factory=list)
    prefix_offset: int = 0  # incremental detokenization window (ids[prefix:read] shown)
    read_offset: int = 0
    first_frame_index: int = -1


@dataclass
class DialogueCounts:
    """Rounds ended by the dialogue, by outcome (Status totals)."""

    num_rounds_answered: int = 0
    num_rounds_cancelled: int = 0
    num_rounds_failed: int = 0


class Dialogue:
    """Round / utterance / silence state machine of one session.

    :param config: the engine configuration (read live: ``sampling.max_new_tokens``,
        ``round_close_after_frames``, ``round_close_after_sec``); replace :attr:`config` to
        change it.
    :param silence_id: token id of ``<|silence|>`` (docs/model.md section 3).
    :param decode: ``decode(token_ids) -> str`` (the tokenizer's decode; special tokens are
        written out, but an utterance holds only the words it spoke: ``<|silence|>`` ends it
        and never enters it).
    :param oldest_frame_index: ``() -> int``, index of the oldest frame in the vision cache
        (-1 when empty): an answer is grounded from there.
    :param clock: monotonic seconds (``time.monotonic``; tests pass a fake clock).
    :param camera: the camera (session) this dialogue belongs to, named on every event.
    """

    def __init__(self, config: EngineConfig, silence_id: int,
                 decode: Callable[[List[int]], str],
                 oldest_frame_index: Callable[[], int] = lambda: -1,
                 clock: Callable[[], float] = time.monotonic, camera: str = '') -> None:
        self.config = config
        self.camera = camera
        self.silence_id = silence_id
        self._decode = decode
        self._oldest_frame_index = oldest_frame_index
        self._clock = clock
        self.counts = DialogueCounts()
        #: metrics of the round that ended last
        self.last_metrics: Optional[RoundMetrics] = None
        self.clear()

    def clear(self) -> None:
        """Forget the session's dialogue (after :meth:`reset` ended the round)."""
        self.mode = Mode.SILENT
        self._mode_since = self._clock()
        #: the token to feed the model next (None: nothing pending)
        self.pending: Optional[int] = None
        self.round = Round()
        self.utterance: Optional[Utterance] = None
        #: the newest frame that went into the vision cache (conditions every output)
        self.newest = FrameRef()
        #: recent answer tokens, for the sampler's repetition penalty
        self.history: deque = deque(maxlen=64)

    # ------------------------------------------------------------------ inputs
    def take_pending(self) -> List[int]:
        """The pending token as a list (empty when none), now consumed."""
        tokens = [] if self.pending is None else [self.pending]
        self.pending = None
        return tokens

    def on_frame(self, ref: FrameRef) -> None:
        """A frame went into the vision cache; later outputs carry its ``ref``."""
        self.newest = ref
        self.round.quiet_since_ts = self._clock()

    def on_token(self, token: int, after_frame: bool = False) -> list:
        """The model sampled ``token`` (after an ``<|image|>`` when ``after_frame``).

        :returns: the events that follow (tokens, silence changes, answers, round ends).
        """
        out: list = []
        if token == self.silence_id:
            if after_frame and self.mode is Mode.SILENT:
                self._count_silent_frame(out)
            if self.utterance is not None:
                self._finish_utterance(END_SILENCE, False, out)
            self._set_mode(Mode.SILENT, out)
            self.pending = token
            return out
        self._set_mode(Mode.SPEAKING, out)
        if self.utterance is None:
            self._open_utterance()
        self.pending = token
        self.history.append(token)
        utt, rnd = self.utterance, self.round
        utt.ids.append(token)
        now = self._clock()
        if rnd.num_tokens == 0:
            rnd.first_token_ts = now
        rnd.last_token_ts = rnd.quiet_since_ts = now
        out.append(TokenEvent(round_id=rnd.round_id, request_id=rnd.request_id,
                              revision=utt.revision, token_index=rnd.num_tokens,
                              token_id=token, text=self._text_delta(utt), source=self.newest,
                              emit_ts=now, camera=self.camera))
        rnd.num_tokens += 1
        limit = self.config.sampling.max_new_tokens
        if len(utt.ids) >= limit or (rnd.round_id and rnd.num_tokens >= limit):
            self.pending = self.silence_id  # forced: yield until the next frame
            if rnd.round_id:
                out += self.end_round(END_MAX_TOKENS)
            else:
                self._finish_utterance(END_MAX_TOKENS, False, out)
            self._set_mode(Mode.SILENT, out)
        return out

    def start_round(self, question: Question) -> list:
        """A question: the open round ends (interrupted when mid-utterance) and a new one
        starts. The caller feeds :meth:`take_pending` (taken before) and the question's
        tokens, then :meth:`on_token` with the first answer token."""
        out = self.end_round(END_INTERRUPTED if self.utterance else END_SILENCE)
        self._set_mode(Mode.SILENT, out)
        self.round = Round(question.round_id, question.request_id, question.text,
                           question.submit_ts, quiet_since_ts=self._clock())
        self.history.clear()
        out.append(RoundEvent(round_id=question.round_id, request_id=question.request_id,
                              kind='started', question=question.text, camera=self.camera))
        return out

    def end_rounds(self, reason: str) -> list:
        """Stop now (deactivate, cancel): mid-utterance the model is made to yield to
        silence, as at max tokens; the open round ends with ``reason``."""
        if self.mode is Mode.SPEAKING:
            self.pending = self.silence_id
        out = self.end_round(reason)
        self._set_mode(Mode.SILENT, out)
        return out

    def reset(self) -> list:
        """The session restarts: the open round ends ('reset') and the dialogue is cleared."""
        out = self.end_round(END_RESET)
        self.clear()
        return out

    def quiet_too_long(self) -> bool:
        """An open round, silent with no frame and no token for ``round_close_after_sec``
        (a camera that never sent or stopped): it should end as if its silent frames came."""
        limit = self.config.round_close_after_sec
        rnd = self.round
        return bool(limit and rnd.round_id and self.utterance is None
                    and self._clock() - rnd.quiet_since_ts >= limit)

    def cancel_question(self, question: Question, reason: str) -> list:
        """A question that never started is cancelled (counted as a cancelled round)."""
        self.counts.num_rounds_cancelled += 1
        return [cancelled_round(question, reason)]

    # ------------------------------------------------------------------ round end
    def end_round(self, reason: str) -> list:
        """End the open round with ``reason`` (one of the ``END_*`` strings): its final
        Answer (the utterance being spoken, or the last revision repeated) and 'ended'.
        Outside a round only an open utterance is closed (not final)."""
        out: list = []
        rnd = self.round
        if rnd.round_id == 0:
            if self.utterance is not None:
                self._finish_utterance(reason, False, out)
            return out
        if self.utterance is not None:
            self._finish_utterance(reason, True, out)
        else:
            out.append(self._answer(max(rnd.num_revisions - 1, 0), rnd.last_text, True, reason,
                                    self._oldest_frame_index()))
        self._record_metrics(rnd)
        c = self.counts
        if reason == END_ERROR:
            c.num_rounds_failed += 1
        elif rnd.num_revisions or reason in (END_SILENCE, END_MAX_TOKENS, END_INTERRUPTED):
            c.num_rounds_answered += 1
        else:
            c.num_rounds_cancelled += 1
        out.append(RoundEvent(round_id=rnd.round_id, request_id=rnd.request_id, kind='ended',
                              reason=reason, question=rnd.question, camera=self.camera))
        self.round = Round()
        return out

    # ------------------------------------------------------------------ internals
    def _open_utterance(self) -> None:
        """The one place a revision is numbered: the round's utterances count from 0."""
        self.utterance = Utterance(self.round.num_revisions,
                                   first_frame_index=self._oldest_frame_index())
        self.round.silent_frames = 0

    def _count_silent_frame(self, out: list) -> None:
        rnd = self.round
        if rnd.round_id == 0:
            return
        rnd.silent_frames += 1
        limit = self.config.round_close_after_frames
        if limit and rnd.silent_frames >= limit:
            out += self.end_round(END_SILENCE)

    def _finish_utterance(self, reason: str, is_final: bool, out: list) -> None:
        utt, rnd = self.utterance, self.round
        self.utterance = None
        text = self._decode(utt.ids)
        rnd.num_revisions += 1
        rnd.last_text = text
        out.append(self._answer(utt.revision, text, is_final, reason, utt.first_frame_index))

    def _answer(self, revision: int, text: str, is_final: bool, reason: str,
                first_frame_index: int) -> AnswerEvent:
        rnd = self.round
        return AnswerEvent(round_id=rnd.round_id, request_id=rnd.request_id, revision=revision,
                           question=rnd.question, text=text, is_final=is_final,
                           end_reason=reason, first_frame_index=first_frame_index,
                           last_frame_index=self.newest.frame_index, source=self.newest,
                           camera=self.camera)

    def _set_mode(self, mode: Mode, out: list) -> None:
        if mode is self.mode:
            return
        now = self._clock()
        out.append(SilenceEvent(round_id=self.round.round_id, is_silent=mode is Mode.SILENT,
                                frame_index=self.newest.frame_index,
                                previous_duration_sec=now - self._mode_since,
                                source=self.newest, camera=self.camera))
        self.mode, self._mode_since = mode, now

    def _text_delta(self, utt: Utterance) -> str:
        """New text of the utterance's last token, decoding a short window only (O(1) per
        token, not O(length)): ids[prefix:read] were shown; an incomplete UTF-8 sequence
        (U+FFFD at the end) is held back until its remaining bytes arrive."""
        shown = self._decode(utt.ids[utt.prefix_offset:utt.read_offset])
        text = self._decode(utt.ids[utt.prefix_offset:])
        if len(text) <= len(shown) or text.endswith('\ufffd'):
            return ''
        utt.prefix_offset, utt.read_offset = utt.read_offset, len(utt.ids)
        return text[len(shown):]

    def _record_metrics(self, rnd: Round) -> None:
        m = RoundMetrics(rnd.round_id, num_tokens=rnd.num_tokens, end_ts=self._clock())
        if rnd.num_tokens:
            m.ttft_sec = rnd.first_token_ts - rnd.submit_ts
            if rnd.num_tokens > 1:
                m.itl_sec = (rnd.last_token_ts - rnd.first_token_ts) / (rnd.num_tokens - 1)
            if self.newest.arrival_ts:
                m.frame_lag_sec = rnd.last_token_ts - self.newest.arrival_ts
        self.last_metrics = m
