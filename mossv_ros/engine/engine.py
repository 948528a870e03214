"""The streaming engine: speak-while-watching decode (moss-model.md section 7).

Two threads share the model's read-only weights:

* the **encoder thread** turns incoming frames into cross-attention K/V as soon as they
  arrive (on CUDA on its own stream), so perception never waits for generation;
* the **engine thread** owns the session (caches, positions) and runs ``step()``: schedule
  (question? ready frame?), execute one forward, sample, emit events. An encoded frame is
  inserted at the next token boundary, mid-sentence as in training; decoding never waits for an
  encode.

Inputs are queued (frames, questions, reset, stop); outputs are events in :attr:`events`.
"""
from collections import deque
import dataclasses
from dataclasses import dataclass, field
import itertools
import logging
import math
import queue
import threading
import time
from typing import Callable, Iterator, List, Optional

from .config import EngineConfig, LIVE_FIELDS
from .events import (
    AnswerEvent,
    END_ERROR,
    END_INTERRUPTED,
    END_MAX_TOKENS,
    END_RESET,
    END_SHUTDOWN,
    END_SILENCE,
    EngineStats,
    ErrorEvent,
    Frame,
    FrameEvent,
    FrameRef,
    Question,
    RoundEvent,
    RoundMetrics,
    SessionResetEvent,
    SilenceEvent,
    TokenEvent,
)
from .policy import (
    FrameRateLimiter,
    STAMP_HELD,
    STAMP_JUMPED_AHEAD,
    STAMP_JUMPED_BACK,
    StampPolicy,
    validate_prompt,
    validate_request_id,
)

log = logging.getLogger(__name__)

SPEAKING = 'speaking'
SILENT = 'silent'


@dataclass
class _Round:
    round_id: int = 0
    request_id: str = ''
    question: str = ''
    submit_ts: float = 0.0
    num_utterances: int = 0
    num_tokens: int = 0
    last_text: str = ''
    silent_frames: int = 0
    first_token_ts: float = 0.0
    last_token_ts: float = 0.0
    first_frame_index: int = -1
    quiet_since_ts: float = 0.0  # monotonic time of the round's last token or frame


@dataclass
class _Utterance:
    index: int
    ids: List[int] = field(default_factory=list)
    prefix_offset: int = 0  # incremental detokenization window (ids[prefix:read] shown)
    read_offset: int = 0
    first_frame_index: int = -1


class StreamingEngine:
    """Speak-while-watching engine over a :class:`~.runner.ModelRunner`.

    :param config: validated engine configuration.
    :param runner: a loaded runner; when None, :meth:`start` loads one from
        ``config.model_path`` on the engine thread (state 'loading' meanwhile).
    :param sampler: ``sampler(logits, history) -> token id``; default from ``config.sampling``.
    :param on_event: called (from engine threads) after each event is queued; must not block.
    :param round_ids: iterator of round ids (default ``itertools.count(1)``).
    """

    def __init__(self, config: EngineConfig, runner=None, sampler=None,
                 on_event: Optional[Callable[[object], None]] = None,
                 load_progress: Optional[Callable[[int, int], None]] = None,
                 round_ids: Optional[Iterator[int]] = None) -> None:
        self.config = config.validate()
        self.runner = runner
        self._sampler = sampler
        self._owns_sampler = sampler is None  # built from config.sampling (update_config)
        self.on_event = on_event
        self._load_progress = load_progress
        self.events: 'queue.Queue' = queue.Queue()
        self._cv = threading.Condition()
        self._frames: deque = deque()
        self._ready: deque = deque()
        self._questions: deque = deque()
        self._controls: deque = deque()
        self._stop = threading.Event()
        self._threads: List[threading.Thread] = []
        self._limiter = FrameRateLimiter(config.frame_rate_hz)
        self._stamps = StampPolicy()
        #: round ids, unique for the owner's lifetime (a node passes one counter to every
        #: engine it creates, so two rounds never share an id across configures)
        self._round_ids = round_ids if round_ids is not None else itertools.count(1)
        self._next_frame_index = 0
        self.stats_data = EngineStats(state='unloaded')
        self._session = None
        #: seconds from a frame's arrival to its insertion in the vision cache, newest last
        #: (bounded; read by benchmarks and Status)
        self.frame_latencies: deque = deque(maxlen=4096)
        self._idle = False  # engine thread waiting with nothing to do (guarded by _cv)
        self._encoding = False  # encoder thread holds a popped frame (guarded by _cv)
        self._last_fed_stamp: Optional[float] = None
        self._reset_state()

    # ------------------------------------------------------------------ public API
    @property
    def state(self) -> str:
        return self.stats_data.state

    def start(self) -> None:
        """Start the engine and encoder threads (loads the model first if needed)."""
        if any(t.is_alive() for t in self._threads):
            return
        self._stop.clear()
        self.stats_data.state = 'loading'  # 'ready' once the session prefill is done
        self._threads = [threading.Thread(target=self._engine_main, name='mossv-engine',
                                          daemon=True),
                         threading.Thread(target=self._encoder_main, name='mossv-encoder',
                                          daemon=True)]
        for t in self._threads:
            t.start()

    def stop(self, timeout: float = 2.0) -> bool:
        """Stop both threads; end the open round with 'shutdown'. :returns: True if joined."""
        with self._cv:
            self._stop.set()
            self._cv.notify_all()
        ok = True
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout)
                ok = ok and not t.is_alive()
        return ok

    def wait_ready(self, timeout: float = 60.0) -> bool:
        """Block until the session is started (or error). :returns: True when ready."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.state == 'error':
                return False
            if self.state == 'ready' and self._session is not None:
                return True
            time.sleep(0.01)
        return False

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Block until every submitted frame, question and control has been consumed and
        the model is silent, waiting for input (evaluation and tests pace a stream with it).

        :returns: True when idle, False on timeout or if the engine stopped.
        """
        end = time.monotonic() + timeout
        with self._cv:
            while True:
                if (self._idle and not self._encoding and self._mode == SILENT
                        and not (self._frames or self._ready or self._questions
                                 or self._controls)):
                    return True
                left = end - time.monotonic()
                if left <= 0 or self._stop.is_set():
                    return False
                self._cv.wait(min(left, 0.05))

    def admit(self, stamp_sec: float, topic: str = '') -> bool:
        """Should a frame of ``topic`` stamped ``stamp_sec`` (seconds) be fed? Commits on True.

        The one owner of stamps: per-topic jump and outlier checks (:class:`StampPolicy`: a
        real jump back in time resets the session when ``reset_on_backwards_stamp``), then
        subsampling to ``frames.rate_hz``. Callers that must convert an image first (the ROS
        image callback) ask here before converting, then call :meth:`submit_frame` with
        ``admitted=True``.
        """
        with self._cv:
            return self._admit_locked(stamp_sec, topic)

    def _admit_locked(self, stamp_sec: float, topic: str) -> bool:
        if not math.isfinite(stamp_sec):
            return False
        stamps, outliers = self._stamps, self._stamps.num_outliers
        verdict = stamps.check(topic, stamp_sec)
        if stamps.num_outliers != outliers:
            self.stats_data.num_stamp_outliers = stamps.num_outliers
            log.warning('dropped one frame of %r whose stamp was off its timeline (an outlier;'
                        ' %d so far)', topic, stamps.num_outliers)
        if verdict == STAMP_HELD:
            return False
        if verdict in (STAMP_JUMPED_BACK, STAMP_JUMPED_AHEAD):
            self._limiter.reset()
            if verdict == STAMP_JUMPED_BACK and self.config.reset_on_backwards_stamp:
                log.warning('stamps of %r jumped back in time: resetting the session', topic)
                self._controls.append(('reset', 'stamp jumped backwards'))
                self._cv.notify_all()
        return self._limiter.accept(stamp_sec)

    def topic_stamps(self) -> dict:
        """{topic: its newest stamp, seconds} of every camera topic seen."""
        with self._cv:
            return self._stamps.topic_stamps()

    def last_stamp_sec(self) -> Optional[float]:
        """Newest image stamp admitted or checked, seconds (None before any)."""
        with self._cv:
            return self._stamps.last_stamp_sec()

    def submit_frame(self, frame: Frame, stamp_sec: Optional[float] = None,
                     admitted: bool = False) -> bool:
        """Queue a frame (RGB uint8 (H, W, 3)) unless rate-limited.

        :param stamp_sec: the frame's stamp in seconds, for subsampling to ``frames.rate_hz``;
            None uses ``frame.arrival_ts``.
        :param admitted: :meth:`admit` already accepted this frame.
        :returns: True if queued. The oldest queued frame is dropped (and counted) on overflow.
        """
        if not frame.arrival_ts:
            frame.arrival_ts = time.monotonic()
        t = frame.arrival_ts if stamp_sec is None else stamp_sec
        with self._cv:
            if not admitted and not self._admit_locked(t, ''):
                return False
            frame.reset_reason = self._note_gap(t)
            if len(self._frames) >= self.config.max_frame_queue:
                self._frames.popleft()
                self.stats_data.num_dropped_frames += 1
            self._frames.append(frame)
            self.stats_data.num_frames_received += 1
            self._cv.notify_all()
        return True

    def _note_gap(self, t: float) -> str:
        """Track the gap between fed frames (stamp seconds). :returns: a reset reason when
        the gap exceeds ``reset_after_gap_sec`` (the session restarts right before this
        frame, after the frames queued ahead of it), else ''. Holds ``_cv``."""
        last, self._last_fed_stamp = self._last_fed_stamp, t
        if last is None or t <= last:
            return ''
        gap = t - last
        s = self.stats_data
        s.longest_frame_gap_sec = max(s.longest_frame_gap_sec, gap)
        limit = self.config.reset_after_gap_sec
        if limit and gap > limit:
            log.info('no frame for %.1f s (> frames.reset_after_gap_sec %.1f): new session',
                     gap, limit)
            return f'camera gap of {gap:.1f} s'
        return ''

    def submit_question(self, text: str, request_id: str = ''):
        """Queue a question. :returns: (accepted, round_id, message); never raises on input."""
        ok, cleaned, reason = validate_prompt(text, self.config.max_prompt_chars)
        if ok:
            ok, reason = validate_request_id(request_id)
        if not ok:
            return False, 0, reason
        if self.state != 'ready':
            detail = f': {self.stats_data.last_error}' if self.state == 'error' else ''
            return False, 0, f'engine not ready (state {self.state}){detail}'
        ids = tuple(self.runner.question_ids(cleaned))
        num_tokens, limit = len(ids), self.max_question_tokens()
        if num_tokens > limit:  # checked here: in the session it would wipe everyone's rounds
            return False, 0, (f'question has {num_tokens} tokens, limit is {limit} (the text '
                              'context cache.max_context_tokens must also hold the answer)')
        with self._cv:
            round_id = next(self._round_ids)
            if len(self._questions) >= self.config.max_pending_questions:
                old = self._questions.popleft()
                self._cancel(old, 'superseded by a newer question (queue full)')
            self._questions.append(Question(cleaned, request_id, round_id, time.monotonic(),
                                            token_ids=ids))
            self.stats_data.num_rounds_started += 1
            self._cv.notify_all()
        return True, round_id, f'accepted as round {round_id}'

    def max_question_tokens(self) -> int:
        """Longest question in tokens: half of the text context left after the session
        prefix (the other half holds the answer and the frames' tokens around it)."""
        prefix = self._session.prefix_tokens if self._session is not None else 0
        return max(1, (self.config.max_context_tokens - prefix) // 2)

    def update_config(self, config: EngineConfig) -> None:
        """Apply a new configuration while running; only :data:`~.config.LIVE_FIELDS` may
        differ (sampling, prompt limits, round closing, frame rate). Takes effect at the next
        frame, question or token.

        :raises ValueError: an invalid config, or a change to a field that needs a new engine.
        """
        config.validate()
        fixed = [f.name for f in dataclasses.fields(config) if f.name not in LIVE_FIELDS
                 and getattr(config, f.name) != getattr(self.config, f.name)]
        if fixed:
            raise ValueError(f'cannot change {fixed} while the engine runs (new engine needed)')
        with self._cv:
            self.config = config
            self._limiter.period_sec = 1.0 / config.frame_rate_hz
            if self._owns_sampler and self.runner is not None:
                from .sampling import Sampler
                self._sampler = Sampler(config.sampling, self.runner.suppressed_ids(),
                                        self.runner.vocab_size)

    def end_rounds(self, reason: str) -> None:
        """End the open round and cancel the waiting questions at the next token boundary,
        each with a final Answer (``end_reason`` = ``reason``); the session and its frames
        stay (a lifecycle deactivate)."""
        with self._cv:
            self._controls.append(('end_rounds', reason))
            self._cv.notify_all()

    def cancel_round(self, round_id: int, reason: str) -> None:
        """Cancel round ``round_id``: a waiting question is dropped (a cancelled RoundEvent);
        the open round ends at the next token boundary with ``end_reason`` 'cancelled:
        <reason>'; a round that already ended is left alone."""
        with self._cv:
            waiting = next((q for q in self._questions if q.round_id == round_id), None)
            if waiting is not None:
                self._questions.remove(waiting)
            else:
                self._controls.append(('cancel', (round_id, reason)))
                self._cv.notify_all()
        if waiting is not None:
            self._cancel(waiting, reason)

    def reset(self, reason: str = 'requested') -> None:
        """Clear vision cache and dialogue at the next token boundary; recovers from ERROR."""
        with self._cv:
            self._controls.append(('reset', reason))
            self._cv.notify_all()
        if self.state == 'error':
            # the failed engine thread set the stop flag: let the encoder finish exiting
            for t in self._threads:
                if t is not threading.current_thread():
                    t.join(2.0)
            self.stats_data.last_error = ''
            self._threads = [t for t in self._threads if t.is_alive()]
            self.start()

    def stats(self) -> EngineStats:
        """A snapshot of counters (cheap; safe from any thread)."""
        s = self.stats_data
        session = self._session
        if session is not None:
            s.num_frames_cached = session.vision_cache.num_frames
            s.cache_bytes = session.cache_bytes
            s.num_context_tokens = session.kv_cache.length
            s.num_frames_evicted = session.num_evicted_frames
        s.current_round_id = self._round.round_id
        return EngineStats(**vars(s))

    # ------------------------------------------------------------------ threads
    def _emit(self, event) -> None:
        self.events.put(event)
        if self.on_event is not None:
            try:
                self.on_event(event)
            except Exception:  # noqa: BLE001 - a consumer's bug must not kill the engine
                log.exception('on_event callback failed')

    def _encoder_main(self) -> None:
        while not self._stop.is_set():
            with self._cv:
                while not self._frames and not self._stop.is_set():
                    self._cv.wait(0.2)
                if self._stop.is_set():
                    return
                if self.runner is None or self._session is None:
                    self._cv.wait(0.05)
                    continue
                frame = self._frames.popleft()
                index = self._next_frame_index
                self._next_frame_index += 1
                self._encoding = True
            try:
                encoded = self.runner.encode_frames([frame.image])[0]
            except Exception as exc:  # noqa: BLE001 - bad frame: count, report, keep going
                self.stats_data.num_dropped_frames += 1
                with self._cv:
                    self._encoding = False
                    self._cv.notify_all()
                self._emit(ErrorEvent(f'frame {index} could not be encoded: {exc}'))
                continue
            encoded.frame_index = index
            with self._cv:
                self._encoding = False
                if len(self._ready) >= self.config.max_frame_queue:
                    self._ready.popleft()
                    self.stats_data.num_dropped_frames += 1
                self._ready.append((frame, encoded))
                self.stats_data.num_frames_encoded += 1
                self._cv.notify_all()

    def _engine_main(self) -> None:
        try:
            if self.runner is None:
                from .runner import ModelRunner
                self.runner = ModelRunner(self.config, self._load_progress)
            if self._sampler is None:
                from .sampling import Sampler
                self._sampler = Sampler(self.config.sampling, self.runner.suppressed_ids(),
                                        self.runner.vocab_size)
            self.stats_data.model_name = self.config.model_path.rstrip('/').split('/')[-1]
            self._start_session()
            self.stats_data.state = 'ready'
            while not self._stop.is_set():
                self.step()
            self._end_round(END_SHUTDOWN)
            self._cancel_pending(END_SHUTDOWN)
        except Exception as exc:  # noqa: BLE001 - top of the engine loop: report, stop cleanly
            log.exception('engine thread failed')
            self.stats_data.state = 'error'
            self.stats_data.last_error = f'{type(exc).__name__}: {exc}'
            self._end_round(END_ERROR)
            self._cancel_pending(END_ERROR)
            self._emit(ErrorEvent(self.stats_data.last_error, fatal=True,
                                  round_id=self._round.round_id))
            self._stop.set()
            with self._cv:
                self._cv.notify_all()

    # ------------------------------------------------------------------ scheduling
    def step(self) -> None:
        """One scheduling decision and at most one forward (runs on the engine thread)."""
        with self._cv:
            control = self._controls.popleft() if self._controls else None
            question = None if control else (self._questions.popleft()
                                             if self._questions else None)
            ready, quiet = None, False
            if control is None and question is None:
                if self._mode == SILENT and not self._ready:
                    self._idle = True
                    self._cv.notify_all()
                    self._cv.wait(0.1)
                    if not self._round_quiet_too_long():
                        return
                    quiet = True
                else:
                    ready = self._ready.popleft() if self._ready else None
            self._idle = False
        if quiet:
            self._end_round(END_SILENCE)  # silent, no frame for round.close_after_sec
        elif control is not None and control[0] == 'end_rounds':
            self._do_end_rounds(control[1])
        elif control is not None and control[0] == 'cancel':
            round_id, reason = control[1]
            if self._round.round_id == round_id:
                self._do_end_rounds(f'cancelled: {reason}', cancel_waiting=False)
        elif control is not None:
            self._do_reset(control[1])
        elif question is not None:
            self._do_question(question)
        else:
            if ready is not None and ready[0].reset_reason:
                self._do_reset(ready[0].reset_reason)
            self._do_step(ready)

    def _round_quiet_too_long(self) -> bool:
        """An open round, silent with no frame and no token for ``round_close_after_sec``
        (a camera that never sent or stopped): it ends as if its silent frames had come."""
        limit = self.config.round_close_after_sec
        rnd = self._round
        return bool(limit and rnd.round_id and self._utterance is None
                    and time.monotonic() - rnd.quiet_since_ts >= limit)

    def _reset_state(self) -> None:
        self._mode = SILENT
        self._mode_since = time.monotonic()
        self._pending: Optional[int] = None
        self._round = _Round()
        self._utterance: Optional[_Utterance] = None
        self._newest = FrameRef()
        self._history: deque = deque(maxlen=64)

    def _start_session(self) -> None:
        runner = self.runner
        if self._session is None:
            self._session = runner.new_session()
        logits = runner.start_session(self._session, self.config.system_prompt)
        self._on_token(self._sample(logits))

    def _sample(self, logits) -> int:
        return int(self._sampler(logits, list(self._history)))

    def _do_step(self, ready) -> None:
        special = self.runner.special
        tokens = [] if self._pending is None else [self._pending]
        frames = []
        if ready is not None:
            frame, encoded = ready
            frames.append((len(tokens), encoded))
            tokens.append(special.image)
        if not tokens:
            return
        self._check_positions(len(tokens))
        logits = self._feed(tokens, frames)
        self._pending = None
        if ready is not None:
            frame, encoded = ready
            self.frame_latencies.append(time.monotonic() - frame.arrival_ts)
            self._newest = FrameRef(encoded.frame_index, frame.stamp, frame.frame_id,
                                    frame.arrival_ts)
            self._emit(FrameEvent(frame.image, self._newest))
            if self._round.first_frame_index < 0:
                self._round.first_frame_index = encoded.frame_index
            self._round.quiet_since_ts = time.monotonic()
        token = self._sample(logits)
        if ready is not None and token == special.silence and self._mode == SILENT:
            self._count_silent_frame()
        self._on_token(token)

    def _feed(self, tokens, frames=()):
        """``runner.feed`` on the session; a device OOM it survived (frames evicted) is
        counted and reported as a non-fatal error event."""
        session = self._session
        before = session.num_oom_events
        logits = self.runner.feed(session, tokens, frames)
        if session.num_oom_events != before:
            self.stats_data.num_oom_events += session.num_oom_events - before
            self._emit(ErrorEvent(f'device out of memory: evicted frames down to '
                                  f'{session.vision_cache.num_frames} cached '
                                  f'({session.cache_bytes} bytes, now the cap); continuing',
                                  round_id=self._round.round_id))
        return logits

    def _do_question(self, question: Question) -> None:
        tokens = [] if self._pending is None else [self._pending]
        self._end_round(END_INTERRUPTED if self._utterance else END_SILENCE)
        self._set_mode(SILENT)
        tokens += list(question.token_ids)
        self._round = _Round(question.round_id, question.request_id, question.text,
                             question.submit_ts, quiet_since_ts=time.monotonic())
        self._emit(RoundEvent(question.round_id, question.request_id, 'started',
                              question=question.text))
        try:
            self._check_positions(len(tokens))
            logits = self._feed(tokens)
        except ValueError as exc:
            self._pending = None
            self._emit(ErrorEvent(f'question rejected: {exc}', round_id=question.round_id))
            self._end_round(END_ERROR)
            self._do_reset('question did not fit the context')
            return
        self._pending = None
        self._history.clear()
        self._on_token(self._sample(logits))

    def _do_end_rounds(self, reason: str, cancel_waiting: bool = True) -> None:
        if self._mode == SPEAKING:  # stop mid-utterance: yield to silence, as at max tokens
            self._pending = self.runner.special.silence
        self._end_round(reason)
        if cancel_waiting:
            self._cancel_pending(reason)
        self._set_mode(SILENT)

    def _do_reset(self, reason: str) -> None:
        self.stats_data.num_session_resets += 1
        self._end_round(END_RESET)
        self._cancel_pending(END_RESET)
        self._reset_state()
        with self._cv:
            self._limiter.reset()
        self._emit(SessionResetEvent(reason))
        logits = self.runner.start_session(self._session, self.config.system_prompt)
        self._on_token(self._sample(logits))

    def _check_positions(self, n: int) -> None:
        if self._session.next_pos + n + 8 >= self.runner.max_positions:
            log.warning('text positions reached the model limit (%d): session reset',
                        self.runner.max_positions)
            self._do_reset('position limit reached')

    # ------------------------------------------------------------------ tokens and rounds
    def _on_token(self, token: int) -> None:
        special = self.runner.special
        if token == special.silence:
            if self._utterance is not None:
                self._finish_utterance(END_SILENCE, is_final=False)
            self._set_mode(SILENT)
            self._pending = token
            return
        if self._mode == SILENT:
            self._set_mode(SPEAKING)
        if self._utterance is None:
            self._utterance = _Utterance(self._round.num_utterances,
                                         first_frame_index=self._oldest_frame_index())
            self._round.silent_frames = 0
        self._pending = token
        self._history.append(token)
        utt = self._utterance
        utt.ids.append(token)
        delta = self._text_delta(utt)
        now = time.monotonic()
        rnd = self._round
        if rnd.num_tokens == 0:
            rnd.first_token_ts = now
        rnd.last_token_ts = rnd.quiet_since_ts = now
        self._emit(TokenEvent(rnd.round_id, rnd.request_id, utt.index, rnd.num_tokens, token,
                              delta, self._newest, now))
        rnd.num_tokens += 1
        limit = self.config.sampling.max_new_tokens
        if len(utt.ids) >= limit or (rnd.round_id and rnd.num_tokens >= limit):
            self._pending = special.silence  # forced: yield until the next frame
            if rnd.round_id:
                self._end_round(END_MAX_TOKENS)
            else:
                self._finish_utterance(END_MAX_TOKENS, is_final=False)
            self._set_mode(SILENT)

    def _text_delta(self, utt: '_Utterance') -> str:
        """New text of the utterance's last token, decoding a short window only (O(1) per
        token, not O(length)): ids[prefix:read] were shown; an incomplete UTF-8 sequence
        (U+FFFD at the end) is held back until its remaining bytes arrive."""
        shown = self.runner.decode(utt.ids[utt.prefix_offset:utt.read_offset])
        text = self.runner.decode(utt.ids[utt.prefix_offset:])
        if len(text) <= len(shown) or text.endswith('\ufffd'):
            return ''
        utt.prefix_offset, utt.read_offset = utt.read_offset, len(utt.ids)
        return text[len(shown):]

    def _set_mode(self, mode: str) -> None:
        if mode == self._mode:
            return
        now = time.monotonic()
        self._emit(SilenceEvent(self._round.round_id, mode == SILENT, self._newest.frame_index,
                                now - self._mode_since, self._newest))
        self._mode, self._mode_since = mode, now

    def _oldest_frame_index(self) -> int:
        cached = self._session.vision_cache.frame_indices() if self._session else []
        return cached[0] if cached else -1

    def _finish_utterance(self, reason: str, is_final: bool) -> None:
        utt, rnd = self._utterance, self._round
        self._utterance = None
        text = self.runner.decode(utt.ids)
        rnd.num_utterances += 1
        rnd.last_text = text
        self._emit(AnswerEvent(rnd.round_id, rnd.request_id, utt.index, rnd.question, text,
                               is_final, reason, utt.first_frame_index,
                               self._newest.frame_index, self._newest))

    def _count_silent_frame(self) -> None:
        rnd = self._round
        if rnd.round_id == 0:
            return
        rnd.silent_frames += 1
        limit = self.config.round_close_after_frames
        if limit and rnd.silent_frames >= limit:
            self._end_round(END_SILENCE)

    def _end_round(self, reason: str) -> None:
        rnd = self._round
        if rnd.round_id == 0:
            if self._utterance is not None:
                self._finish_utterance(reason, is_final=False)
            return
        if self._utterance is not None:
            self._finish_utterance(reason, is_final=True)
        else:
            revision = max(rnd.num_utterances - 1, 0)
            self._emit(AnswerEvent(rnd.round_id, rnd.request_id, revision, rnd.question,
                                   rnd.last_text, True, reason, self._oldest_frame_index(),
                                   self._newest.frame_index, self._newest))
        self._record_metrics(rnd)
        s = self.stats_data
        if reason in (END_ERROR,):
            s.num_rounds_failed += 1
        elif rnd.num_utterances or reason in (END_SILENCE, END_MAX_TOKENS, END_INTERRUPTED):
            s.num_rounds_answered += 1
        else:
            s.num_rounds_cancelled += 1
        self._emit(RoundEvent(rnd.round_id, rnd.request_id, 'ended', reason, rnd.question))
        self._round = _Round()

    def _record_metrics(self, rnd: _Round) -> None:
        m = RoundMetrics(rnd.round_id, num_tokens=rnd.num_tokens)
        if rnd.num_tokens:
            m.ttft_sec = rnd.first_token_ts - rnd.submit_ts
            if rnd.num_tokens > 1:
                m.itl_sec = (rnd.last_token_ts - rnd.first_token_ts) / (rnd.num_tokens - 1)
            if self._newest.arrival_ts:
                m.frame_lag_sec = rnd.last_token_ts - self._newest.arrival_ts
        self.stats_data.last_metrics = m

    def _cancel(self, question: Question, reason: str) -> None:
        self.stats_data.num_rounds_cancelled += 1
        self._emit(RoundEvent(question.round_id, question.request_id, 'cancelled', reason,
                              question.text))

    def _cancel_pending(self, reason: str) -> None:
        with self._cv:
            pending = list(self._questions)
            self._questions.clear()
        for q in pending:
            self._cancel(q, reason)
