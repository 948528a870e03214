"""The streaming engine loop: speak-while-watching decode (moss-model.md section 7).

Three pieces, one job each:

* :class:`~.inbox.Inbox` owns every input queue and the one lock (frame admission by stamp,
  questions, controls);
* :class:`~.dialogue.Dialogue` owns rounds, utterances, silence and revisions (pure Python);
* :class:`StreamingEngine` (here) owns the two threads and ``step()``: next item ->
  ``runner.feed`` -> sample -> dialogue -> events.

The **encoder thread** turns incoming frames into cross-attention K/V as soon as they arrive (on
CUDA on its own stream), so perception never waits for generation; the **engine thread** owns
the session (caches, positions) and runs ``step()``. An encoded frame is inserted at the next
token boundary, mid-sentence as in training; decoding never waits for an encode. Outputs are
events, read with :meth:`StreamingEngine.poll_events`.
"""
from collections import deque
import dataclasses
import itertools
import logging
import queue
import threading
import time
from typing import Callable, Iterator, List, Optional

from .config import EngineConfig, LIVE_FIELDS
from .dialogue import cancelled_round, Dialogue, Mode
from .events import (
    END_ERROR,
    END_RESET,
    END_SHUTDOWN,
    END_SILENCE,
    EngineState,
    EngineStats,
    ErrorEvent,
    Frame,
    FrameEvent,
    FrameRef,
    Question,
    SessionResetEvent,
)
from .inbox import Control, Inbox, Item
from .policy import validate_prompt, validate_request_id

log = logging.getLogger(__name__)


class StreamingEngine:
    """Speak-while-watching engine over a :class:`~.runner.ModelRunner`.

    :param config: validated engine configuration.
    :param runner: a loaded runner; when None, :meth:`start` loads one from
        ``config.model_path`` on the engine thread (state LOADING meanwhile).
    :param sampler: ``sampler(logits, history) -> token id``; default from ``config.sampling``.
    :param on_event: called (from engine threads) after each event is queued; must not block.
    :param round_ids: iterator of round ids (default ``itertools.count(1)``; a node passes one
        counter to every engine it creates, so two rounds never share an id across configures).
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
        self._events: 'queue.Queue' = queue.Queue()
        self.inbox = Inbox(self.config)
        self.dialogue: Optional[Dialogue] = None  # made once the runner is loaded
        self._round_ids = round_ids if round_ids is not None else itertools.count(1)
        self._threads: List[threading.Thread] = []
        self._state_cv = threading.Condition()
        self._state = EngineState.UNLOADED
        self._model_name = 'none'
        self._last_error = ''
        self._num_session_resets = 0
        self._num_oom_events = 0
        self._session = None
        #: seconds from a frame's arrival to its insertion in the vision cache, newest last
        #: (bounded; read by benchmarks)
        self.frame_latencies: deque = deque(maxlen=4096)

    # ------------------------------------------------------------------ state
    @property
    def session(self):
        """The :class:`~.runner.Session` (caches, positions); read-only outside the engine
        thread (None before the model loads)."""
        return self._session

    @property
    def state(self) -> EngineState:
        return self._state

    def _set_state(self, state: EngineState, error: str = '') -> None:
        with self._state_cv:
            self._state = state
            if error:
                self._last_error = error
            self._state_cv.notify_all()

    def start(self) -> None:
        """Start the engine and encoder threads (loads the model first if needed)."""
        if any(t.is_alive() for t in self._threads):
            return
        self.inbox.open()
        self._set_state(EngineState.LOADING)  # READY once the session prefill is done
        self._threads = [threading.Thread(target=self._engine_main, name='mossv-engine',
                                          daemon=True),
                         threading.Thread(target=self._encoder_main, name='mossv-encoder',
                                          daemon=True)]
        for t in self._threads:
            t.start()

    def stop(self, timeout: float = 2.0) -> bool:
        """Stop both threads; end the open round with 'shutdown'. :returns: True if joined."""
        self.inbox.close()
        with self._state_cv:
            self._state_cv.notify_all()
        ok = True
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout)
                ok = ok and not t.is_alive()
        return ok

    def wait_ready(self, timeout: float = 60.0) -> bool:
        """Block until the session is started (or the engine failed). :returns: True when
        READY."""
        with self._state_cv:
            self._state_cv.wait_for(lambda: self._state in (EngineState.READY, EngineState.ERROR)
                                    or self.inbox.closed, timeout)
            return self._state is EngineState.READY

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Block until every submitted frame, question and control has been consumed and
        the model is silent, waiting for input (evaluation and tests pace a stream with it).

        :returns: True when idle, False on timeout or if the engine stopped.
        """
        return self.inbox.wait_idle(timeout)

    def poll_events(self, timeout: float = 0.0) -> list:
        """Every event queued so far, oldest first; when none is queued, wait up to
        ``timeout`` seconds for the first. The one way to read the engine's output (the node,
        the benchmarks, the toyworld evaluation and the tests all use it)."""
        out = []
        try:
            out.append(self._events.get(timeout=timeout) if timeout > 0
                       else self._events.get_nowait())
        except queue.Empty:
            return out
        while True:
            try:
                out.append(self._events.get_nowait())
            except queue.Empty:
                return out

    # ------------------------------------------------------------------ inputs
    def admit(self, stamp_sec: float, topic: str = '') -> bool:
        """Should a frame of ``topic`` stamped ``stamp_sec`` (seconds) be fed? Commits on True
        (see :meth:`.inbox.Inbox.admit`). Callers that must convert an image first (the ROS
        image callback) ask here before converting, then call :meth:`submit_frame` with
        ``admitted=True``."""
        return self.inbox.admit(stamp_sec, topic)

    def topic_stamps(self) -> dict:
        """{topic: its newest stamp, seconds} of every camera topic seen."""
        return self.inbox.topic_stamps()

    def last_stamp_sec(self) -> Optional[float]:
        """Newest image stamp admitted or checked, seconds (None before any)."""
        return self.inbox.last_stamp_sec()

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
        return self.inbox.put_frame(frame, t, admitted)

    def submit_question(self, text: str, request_id: str = ''):
        """Queue a question. :returns: (accepted, round_id, message); never raises on input."""
        ok, cleaned, reason = validate_prompt(text, self.config.max_prompt_chars)
        if ok:
            ok, reason = validate_request_id(request_id)
        if not ok:
            return False, 0, reason
        state = self._state
        if state is not EngineState.READY:
            detail = f': {self._last_error}' if state is EngineState.ERROR else ''
            return False, 0, f'engine not ready (state {state}){detail}'
        ids = tuple(self.runner.question_ids(cleaned))
        num_tokens, limit = len(ids), self.max_question_tokens()
        if num_tokens > limit:  # checked here: in the session it would wipe everyone's rounds
            return False, 0, (f'question has {num_tokens} tokens, limit is {limit} (the text '
                              'context cache.max_context_tokens must also hold the answer)')
        question, old = self.inbox.put_question(lambda: Question(
            cleaned, request_id, next(self._round_ids), time.monotonic(), token_ids=ids))
        if old is not None:
            self._emit(cancelled_round(old, 'superseded by a newer question (queue full)'))
        return True, question.round_id, f'accepted as round {question.round_id}'

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
        self.config = config
        self.inbox.update_config(config)
        if self.dialogue is not None:
            self.dialogue.config = config
        if self._owns_sampler and self.runner is not None:
            self._sampler = self._new_sampler()

    def end_rounds(self, reason: str) -> None:
        """End the open round and cancel the waiting questions at the next token boundary,
        each with a final Answer (``end_reason`` = ``reason``); the session and its frames
        stay (a lifecycle deactivate)."""
        self.inbox.put_control(Control.END_ROUNDS, reason)

    def cancel_round(self, round_id: int, reason: str) -> None:
        """Cancel round ``round_id``: a waiting question is dropped (a cancelled RoundEvent);
        the open round ends at the next token boundary with ``end_reason`` 'cancelled:
        <reason>'; a round that already ended is left alone."""
        waiting = self.inbox.remove_question(round_id)
        if waiting is not None:
            self._emit(cancelled_round(waiting, reason))
        else:
            self.inbox.put_control(Control.CANCEL, (round_id, reason))

    def reset(self, reason: str = 'requested') -> None:
        """Clear vision cache and dialogue at the next token boundary; recovers from ERROR."""
        self.inbox.put_control(Control.RESET, reason)
        if self._state is EngineState.ERROR:
            # the failed engine thread closed the inbox: let the encoder finish exiting
            for t in self._threads:
                if t is not threading.current_thread():
                    t.join(2.0)
            self._last_error = ''
            self._threads = [t for t in self._threads if t.is_alive()]
            self.start()

    def stats(self) -> EngineStats:
        """A snapshot of counters (cheap; safe from any thread; writes nothing)."""
        counts = self.inbox.snapshot()
        s = EngineStats(state=self._state, model_name=self._model_name,
                        num_frames_received=counts.num_frames_received,
                        num_dropped_frames=counts.num_dropped_frames,
                        num_frames_encoded=counts.num_frames_encoded,
                        num_rounds_started=counts.num_rounds_started,
                        num_rounds_cancelled=counts.num_questions_cancelled,
                        num_session_resets=self._num_session_resets,
                        num_oom_events=self._num_oom_events,
                        longest_frame_gap_sec=counts.longest_frame_gap_sec,
                        num_stamp_outliers=counts.num_stamp_outliers,
                        last_error=self._last_error)
        session = self._session
        if session is not None:
            s.num_frames_cached = session.vision_cache.num_frames
            s.cache_bytes = session.cache_bytes
            s.num_context_tokens = session.kv_cache.length
            s.num_frames_evicted = session.num_evicted_frames
        dialogue = self.dialogue
        if dialogue is not None:
            c = dialogue.counts
            s.num_rounds_answered = c.num_rounds_answered
            s.num_rounds_cancelled += c.num_rounds_cancelled
            s.num_rounds_failed = c.num_rounds_failed
            s.last_metrics = dialogue.last_metrics
            s.current_round_id = dialogue.round.round_id
            s.newest_frame = dialogue.newest
        return s

    # ------------------------------------------------------------------ threads
    def _emit(self, event) -> None:
        self._events.put(event)
        if self.on_event is not None:
            try:
                self.on_event(event)
            except Exception:  # noqa: BLE001 - a consumer's bug must not kill the engine
                log.exception('on_event callback failed')

    def _emit_all(self, events) -> None:
        for event in events:
            self._emit(event)

    def _encoder_main(self) -> None:
        inbox = self.inbox
        while True:
            taken = inbox.take_frame_to_encode(lambda: self._session is not None)
            if taken is None:
                return
            frame, index = taken
            try:
                encoded = self.runner.encode_frames([frame.image])[0]
            except Exception as exc:  # noqa: BLE001 - bad frame: count, report, keep going
                inbox.put_encoded(frame, None)
                self._emit(ErrorEvent(f'frame {index} could not be encoded: {exc}'))
                continue
            encoded.frame_index = index
            inbox.put_encoded(frame, encoded)

    def _new_sampler(self):
        from .sampling import Sampler
        return Sampler(self.config.sampling, self.runner.suppressed_ids(),
                       self.runner.vocab_size)

    def _engine_main(self) -> None:
        try:
            if self.runner is None:
                from .runner import ModelRunner
                self.runner = ModelRunner(self.config, self._load_progress)
            if self._sampler is None:
                self._sampler = self._new_sampler()
            self._model_name = self.config.model_path.rstrip('/').split('/')[-1]
            if self._session is None:
                self._session = self.runner.new_session()
            if self.dialogue is None:
                self.dialogue = Dialogue(self.config, self.runner.special.silence,
                                         self.runner.decode, self._oldest_frame_index)
            self._prefill()
            self._set_state(EngineState.READY)
            while not self.inbox.closed:
                self.step()
            self._end_everything(END_SHUTDOWN)
        except Exception as exc:  # noqa: BLE001 - top of the engine loop: report, stop cleanly
            log.exception('engine thread failed')
            self._set_state(EngineState.ERROR, f'{type(exc).__name__}: {exc}')
            round_id = 0
            if self.dialogue is not None:
                round_id = self.dialogue.round.round_id
                self._end_everything(END_ERROR)
            self._emit(ErrorEvent(self._last_error, fatal=True, round_id=round_id))
            self.inbox.close()

    # ------------------------------------------------------------------ scheduling
    def step(self) -> None:
        """One scheduling decision and at most one forward (runs on the engine thread)."""
        dialogue = self.dialogue
        item: Item = self.inbox.next_item(wait=dialogue.mode is Mode.SILENT)
        if item.control is not None:
            kind, arg = item.control
            if kind is Control.END_ROUNDS:
                self._emit_all(dialogue.end_rounds(arg))
                self._cancel_waiting(arg)
            elif kind is Control.CANCEL:
                round_id, reason = arg
                if dialogue.round.round_id == round_id:
                    self._emit_all(dialogue.end_rounds(f'cancelled: {reason}'))
            else:
                self._reset(arg)
        elif item.question is not None:
            self._ask(item.question)
        elif item.frame is not None:
            if item.frame[0].reset_reason:
                self._reset(item.frame[0].reset_reason)
            self._decode(item.frame)
        elif dialogue.mode is Mode.SPEAKING:
            self._decode(None)
        elif dialogue.quiet_too_long():
            self._emit_all(dialogue.end_round(END_SILENCE))  # no frame for close_after_sec

    def _prefill(self) -> None:
        """Run the session prefix (system prompt) and sample the first token."""
        logits = self.runner.start_session(self._session, self.config.system_prompt)
        self._emit_all(self.dialogue.on_token(self._sample(logits)))

    def _sample(self, logits) -> int:
        return int(self._sampler(logits, list(self.dialogue.history)))

    def _decode(self, ready) -> None:
        """Feed the pending token and, when ``ready`` (frame, encoded) came, the frame's
        ``<|image|>``; sample the next token."""
        dialogue = self.dialogue
        tokens = dialogue.take_pending()
        frames = []
        if ready is not None:
            frames.append((len(tokens), ready[1]))
            tokens.append(self.runner.special.image)
        if not tokens:
            return
        self._check_positions(len(tokens))
        logits = self._feed(tokens, frames)
        if ready is not None:
            frame, encoded = ready
            self.frame_latencies.append(time.monotonic() - frame.arrival_ts)
            ref = FrameRef(encoded.frame_index, frame.stamp, frame.frame_id, frame.arrival_ts)
            dialogue.on_frame(ref)
            self._emit(FrameEvent(image=frame.image, source=ref))
        self._emit_all(dialogue.on_token(self._sample(logits), after_frame=ready is not None))

    def _feed(self, tokens, frames=()):
        """``runner.feed`` on the session; a device OOM it survived (frames evicted) is
        counted and reported as a non-fatal error event."""
        session = self._session
        before = session.num_oom_events
        logits = self.runner.feed(session, tokens, frames)
        if session.num_oom_events != before:
            self._num_oom_events += session.num_oom_events - before
            self._emit(ErrorEvent(f'device out of memory: evicted frames down to '
                                  f'{session.vision_cache.num_frames} cached '
                                  f'({session.cache_bytes} bytes, now the cap); continuing',
                                  round_id=self.dialogue.round.round_id))
        return logits

    def _ask(self, question: Question) -> None:
        dialogue = self.dialogue
        tokens = dialogue.take_pending()
        self._emit_all(dialogue.start_round(question))
        tokens += list(question.token_ids)
        try:
            self._check_positions(len(tokens))
            logits = self._feed(tokens)
        except ValueError as exc:
            self._emit(ErrorEvent(f'question rejected: {exc}', round_id=question.round_id))
            self._emit_all(dialogue.end_round(END_ERROR))
            self._reset('question did not fit the context')
            return
        self._emit_all(dialogue.on_token(self._sample(logits)))

    def _reset(self, reason: str) -> None:
        self._num_session_resets += 1
        self._emit_all(self.dialogue.reset())
        self._cancel_waiting(END_RESET)
        self.inbox.reset_rate_limit()
        self._emit(SessionResetEvent(reason))
        self._prefill()

    def _end_everything(self, reason: str) -> None:
        """End the open round and cancel every waiting question with ``reason``."""
        self._emit_all(self.dialogue.end_round(reason))
        self._cancel_waiting(reason)

    def _cancel_waiting(self, reason: str) -> None:
        for question in self.inbox.take_questions():
            self._emit_all(self.dialogue.cancel_question(question, reason))

    def _check_positions(self, n: int) -> None:
        if self._session.next_pos + n + 8 >= self.runner.max_positions:
            log.warning('text positions reached the model limit (%d): session reset',
                        self.runner.max_positions)
            self._reset('position limit reached')

    def _oldest_frame_index(self) -> int:
        cached = self._session.vision_cache.frame_indices() if self._session else []
        return cached[0] if cached else -1
