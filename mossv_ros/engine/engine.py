"""The streaming engine loop: speak-while-watching decode (docs/model.md section 7).

Three pieces, one job each:

* :class:`~.inbox.Inbox` owns every input queue and the one lock (frame admission by stamp,
  questions, controls);
* :class:`~.dialogue.Dialogue` owns rounds, utterances, silence and revisions (pure Python);
* :class:`StreamingEngine` (here) owns the two threads and ``step()``: next item ->
  ``runner.feed`` -> sample -> dialogue -> events.

Each camera of ``EngineConfig.cameras`` has a session of its own (caches, positions, a
dialogue); the weights and both threads are shared. Sessions that speak at the same time are
decoded together, one batch row each (``runner.feed_batch``); a frame or a question is fed to
its session alone between two batched steps.

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

from .config import EngineConfig, LIVE_FIELDS, model_name
from .dialogue import cancelled_round, Dialogue, Mode
from .events import (
    CameraStats,
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
from .policy import echo, validate_prompt, validate_request_id

log = logging.getLogger(__name__)


def _sample_rows(sampler, logits, histories) -> List[int]:
    """Token ids for each row of ``logits`` (batch, vocab): one device sample and one read
    back with a :class:`~.sampling.Sampler` (its ``sample``); any other
    ``sampler(logits_row, history) -> int`` (scripted test samplers) is called per row."""
    batched = getattr(sampler, 'sample', None)
    if batched is not None:
        return batched(logits, histories).tolist()
    return [int(sampler(row, list(h))) for row, h in zip(logits, histories)]


class _Camera:
    """One camera's session: the runner's caches and positions, and its dialogue (both
    written by the engine thread only)."""

    def __init__(self, name: str, session, dialogue: Dialogue) -> None:
        self.name = name
        self.session = session
        self.dialogue = dialogue
        self.num_session_resets = 0
        self.epoch = 0  # the inbox epoch of the session (inbox.py: sessions are epochs)


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
        #: camera name -> its session and dialogue, in ``config.cameras`` order (made once
        #: the runner is loaded)
        self._cams: dict = {}
        self._round_ids = round_ids if round_ids is not None else itertools.count(1)
        self._threads: List[threading.Thread] = []
        self._state_cv = threading.Condition()
        self._state = EngineState.UNLOADED
        self._model_name = 'none'
        self._decode_path = ''
        self._last_error = ''
        self._num_oom_events = 0
        #: seconds from a frame's arrival to its insertion in the vision cache, newest last
        #: (bounded; read by benchmarks)
        self.frame_latencies: deque = deque(maxlen=4096)

    # ------------------------------------------------------------------ state
    @property
    def session(self):
        """The default camera's :class:`~.runner.Session` (caches, positions); read-only
        outside the engine thread (None before the model loads)."""
        cam = self._cams.get(self.config.cameras[0])
        return cam.session if cam is not None else None

    def sessions(self) -> dict:
        """{camera: its :class:`~.runner.Session`} (read-only outside the engine thread)."""
        return {name: cam.session for name, cam in self._cams.items()}

    def camera_of(self, camera: str) -> Optional[str]:
        """The camera ``camera`` names ('' = the default one), or None when unknown."""
        if not camera:
            return self.config.cameras[0]
        return camera if camera in self.config.cameras else None

    def _known(self) -> str:
        return ', '.join(self.config.cameras)

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
    def admit(self, stamp_sec: float, topic: str = '', camera: str = '') -> str:
        """What to do with a frame of ``camera``'s ``topic`` stamped ``stamp_sec`` (seconds):
        ``'feed'``, ``'hold'`` or ``'skip'`` (:meth:`.inbox.Inbox.admit`). Callers that must
        convert an image first (the ROS image callback) ask here before converting, skip on
        ``'skip'``, and otherwise call :meth:`submit_frame` with ``admitted`` = the verdict.

        :raises ValueError: an unknown camera (a configuration error, not input)."""
        return self.inbox.admit(stamp_sec, topic, self._camera_or_raise(camera))

    def _camera_or_raise(self, camera: str) -> str:
        name = self.camera_of(camera)
        if name is None:
            raise ValueError(f'unknown camera {echo(camera)!r} (known: {self._known()})')
        return name

    def topic_stamps(self) -> dict:
        """{topic: its newest stamp, seconds} of every camera topic seen."""
        return self.inbox.topic_stamps()

    def last_stamp_sec(self, camera: Optional[str] = None) -> Optional[float]:
        """Newest image stamp admitted or checked, seconds, of ``camera`` (None: of any
        camera); None before any."""
        return self.inbox.last_stamp_sec(None if camera is None
                                         else self._camera_or_raise(camera))

    def submit_frame(self, frame: Frame, stamp_sec: Optional[float] = None,
                     admitted=None, camera: str = '', topic: str = '') -> bool:
        """Queue a frame (RGB uint8 (H, W, 3)) of ``camera`` ('' = the default) unless
        rate-limited.

        :param stamp_sec: the frame's stamp in seconds, for subsampling to ``frames.rate_hz``;
            None uses ``frame.arrival_ts``.
        :param admitted: the verdict :meth:`admit` gave for this frame ('feed', 'hold'); None:
            decide here.
        :param topic: the camera topic it came on (per-topic stamp checks).
        :returns: True if queued now. The camera's oldest queued frame is dropped (and
            counted) on overflow. :raises ValueError: an unknown camera.
        """
        frame.camera = self._camera_or_raise(camera)
        if not frame.arrival_ts:
            frame.arrival_ts = time.monotonic()
        t = frame.arrival_ts if stamp_sec is None else stamp_sec
        return self.inbox.put_frame(frame, t, admitted, topic)

    def submit_frames(self, frames) -> list:
        """Queue frames that arrived together (cameras with synchronized shutters): the
        encoder takes them as one batch.

        :param frames: (frame, stamp_sec, camera) triples, as for :meth:`submit_frame`.
        :returns: whether each was queued. :raises ValueError: an unknown camera.
        """
        with self.inbox.cv:  # (re-entrant): the encoder wakes once all are queued
            return [self.submit_frame(frame, stamp, camera=camera)
                    for frame, stamp, camera in frames]

    def submit_question(self, text: str, request_id: str = '', camera: str = ''):
        """Queue a question about ``camera`` ('' = the default camera).

        :returns: (accepted, round_id, message); never raises on input (an unknown camera is
            refused with the known ones).
        """
        ok, cleaned, reason = validate_prompt(text, self.config.max_prompt_chars)
        if ok:
            ok, reason = validate_request_id(request_id)
        if not ok:
            return False, 0, reason
        name = self.camera_of(camera) if isinstance(camera, str) else None
        if name is None:
            return False, 0, f'unknown camera {echo(camera)!r} (known: {self._known()})'
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
            cleaned, request_id, next(self._round_ids), time.monotonic(), token_ids=ids,
            camera=name))
        if old is not None:
            self._emit(cancelled_round(old, (
                f'superseded by round {question.round_id} (request_id '
                f'{echo(question.request_id, 64)!r}): camera {name!r} had '
                f'prompt.max_pending={self.config.max_pending_questions} questions waiting')))
        return True, question.round_id, f'accepted as round {question.round_id}'

    def max_question_tokens(self) -> int:
        """Longest question in tokens: half of the text context left after the session
        prefix (the other half holds the answer and the frames' tokens around it)."""
        session = self.session
        prefix = session.prefix_tokens if session is not None else 0
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
        for cam in self._cams.values():
            cam.dialogue.config = config
        if self._owns_sampler and self.runner is not None:
            self._sampler = self._new_sampler()

    def end_rounds(self, reason: str) -> None:
        """End the open round and cancel the waiting questions at the next token boundary,
        each with a final Answer (``end_reason`` = ``reason``); the session and its frames
        stay (a lifecycle deactivate). Every camera."""
        self.inbox.put_control(Control.END_ROUNDS, None, reason)

    def cancel_round(self, round_id: int, reason: str) -> None:
        """Cancel round ``round_id``: a waiting question is dropped (a cancelled RoundEvent);
        the open round ends at the next token boundary with ``end_reason`` 'cancelled:
        <reason>'; a round that already ended is left alone."""
        waiting = self.inbox.remove_question(round_id)
        if waiting is not None:
            self._emit(cancelled_round(waiting, reason))
        else:
            self.inbox.put_control(Control.CANCEL, None, (round_id, reason))

    def reset(self, reason: str = 'requested', camera: Optional[str] = None) -> None:
        """Clear vision cache and dialogue of ``camera`` (None: of every camera) at the next
        token boundary; recovers from ERROR. :raises ValueError: an unknown camera."""
        self.inbox.put_control(Control.RESET, None if camera is None
                               else self._camera_or_raise(camera), reason)
        if self._state is EngineState.ERROR:
            # the failed engine thread closed the inbox: let the encoder finish exiting
            for t in self._threads:
                if t is not threading.current_thread():
                    t.join(2.0)
            self._last_error = ''
            self._threads = [t for t in self._threads if t.is_alive()]
            self.start()

    def stats(self) -> EngineStats:
        """A snapshot of counters, totals and per camera (cheap; safe from any thread;
        writes nothing)."""
        totals, per = self.inbox.snapshot()
        s = EngineStats(state=self._state, model_name=self._model_name,
                        num_frames_received=totals.num_frames_received,
                        num_dropped_frames=totals.num_dropped_frames,
                        num_frames_encoded=totals.num_frames_encoded,
                        num_rounds_started=totals.num_rounds_started,
                        num_rounds_cancelled=totals.num_questions_cancelled,
                        num_oom_events=self._num_oom_events,
                        longest_frame_gap_sec=totals.longest_frame_gap_sec,
                        num_stamp_outliers=totals.num_stamp_outliers,
                        last_error=self._last_error, decode_path=self._decode_path)
        for name in self.config.cameras:
            counts = per.get(name)
            cs = CameraStats(name=name, num_frames_received=counts.num_frames_received,
                             num_dropped_frames=counts.num_dropped_frames,
                             last_stamp_sec=self.inbox.last_stamp_sec(name))
            cam = self._cams.get(name)
            if cam is not None:
                session, dialogue = cam.session, cam.dialogue
                cs.num_frames_cached = session.vision_cache.num_frames
                cs.cache_bytes = session.cache_bytes
                cs.num_context_tokens = session.kv_cache.length
                cs.num_session_resets = cam.num_session_resets
                cs.current_round_id = dialogue.round.round_id
                cs.last_metrics = dialogue.last_metrics
                cs.newest_frame = dialogue.newest
                c = dialogue.counts
                s.num_rounds_answered += c.num_rounds_answered
                s.num_rounds_cancelled += c.num_rounds_cancelled
                s.num_rounds_failed += c.num_rounds_failed
                s.num_frames_cached += cs.num_frames_cached
                s.cache_bytes += cs.cache_bytes
                s.num_context_tokens += cs.num_context_tokens
                s.num_frames_evicted += session.num_evicted_frames
                s.num_session_resets += cam.num_session_resets
            s.cameras.append(cs)
        default = s.cameras[0]
        s.current_round_id = default.current_round_id
        s.newest_frame = default.newest_frame
        ended = [c.last_metrics for c in s.cameras if c.last_metrics is not None]
        if ended:  # the round that ended last, of any camera
            s.last_metrics = max(ended, key=lambda m: m.end_ts)
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
            taken = inbox.take_frames_to_encode(lambda: bool(self._cams),
                                                max_frames=len(self.config.cameras))
            if taken is None:
                return
            if len(taken) == 1:
                encoded = [self._encode_one(*taken[0])]
            else:
                try:  # frames that arrived together: one batch through the vision tower
                    encoded = self.runner.encode_frames([frame.image for frame, _ in taken])
                except Exception:  # noqa: BLE001 - a bad frame in the batch: each alone
                    encoded = [self._encode_one(frame, index) for frame, index in taken]
            for (frame, index), enc in zip(taken, encoded):
                if enc is not None:
                    enc.frame_index = index
                inbox.put_encoded(frame, enc)

    def _encode_one(self, frame: Frame, index: int):
        """Encode one frame; a bad frame is reported (an ErrorEvent) and gives None."""
        try:
            return self.runner.encode_frames([frame.image])[0]
        except Exception as exc:  # noqa: BLE001 - bad frame: count, report, keep going
            self._emit(ErrorEvent(f'frame {index} could not be encoded: {exc}',
                                  camera=frame.camera))
            return None

    def _new_sampler(self):
        from .sampling import Sampler
        return Sampler(self.config.sampling, self.runner.suppressed_ids(),
                       self.runner.vocab_size)

    def _make_cameras(self) -> None:
        """A session per camera (the rows of one cache pool), the CUDA graphs over them when
        ``engine.cuda_graphs`` allows, and a dialogue per camera."""
        runner, names = self.runner, self.config.cameras
        sessions = runner.new_sessions(len(names))
        self._decode_path = runner.capture_graphs(sessions)
        log.info('text step: %s', self._decode_path)
        cams = {}
        for name, session in zip(names, sessions):
            def oldest(session=session) -> int:
                cached = session.vision_cache.frame_indices()
                return cached[0] if cached else -1
            cams[name] = _Camera(name, session, Dialogue(
                self.config, runner.special.silence, runner.decode, oldest, camera=name))
        self._cams = cams

    def _engine_main(self) -> None:
        try:
            if self.runner is None:
                from .runner import ModelRunner
                self.runner = ModelRunner(self.config, self._load_progress)
            if self._sampler is None:
                self._sampler = self._new_sampler()
            self._model_name = model_name(self.config.model_path)
            if not self._cams:
                self._make_cameras()
            for cam in self._cams.values():
                self._prefill(cam)
            self._set_state(EngineState.READY)
            while not self.inbox.closed:
                self.step()
            for cam in self._cams.values():
                self._end_everything(cam, END_SHUTDOWN)
        except Exception as exc:  # noqa: BLE001 - top of the engine loop: report, stop cleanly
            log.exception('engine thread failed')
            self._set_state(EngineState.ERROR, f'{type(exc).__name__}: {exc}')
            round_id = 0
            for cam in self._cams.values():
                round_id = round_id or cam.dialogue.round.round_id
                self._end_everything(cam, END_ERROR)
            self._emit(ErrorEvent(self._last_error, fatal=True, round_id=round_id))
            self.inbox.close()

    # ------------------------------------------------------------------ scheduling
    def step(self) -> None:
        """One scheduling decision and at most one forward (runs on the engine thread): a
        control, a question or a frame for one session, else one batched decode step of
        every session that is speaking."""
        cams = list(self._cams.values())
        silent = all(cam.dialogue.mode is Mode.SILENT for cam in cams)
        item: Item = self.inbox.next_item(wait=silent)
        if item.control is not None:
            kind, camera, arg = item.control
            targets = cams if camera is None else [self._cams[camera]]
            if kind is Control.END_ROUNDS:
                for cam in targets:
                    self._emit_all(cam.dialogue.end_rounds(arg))
                self._cancel_waiting(arg, camera)
            elif kind is Control.CANCEL:
                round_id, reason = arg
                for cam in cams:
                    if cam.dialogue.round.round_id == round_id:
                        self._emit_all(cam.dialogue.end_rounds(f'cancelled: {reason}'))
            else:
                for cam in targets:
                    self._reset(cam, arg)
        elif item.question is not None:
            self._ask(self._cams[item.question.camera], item.question)
        elif item.frame is not None:
            cam = self._cams[item.frame[0].camera]
            if item.frame[0].epoch > cam.epoch:  # the first frame of a new session
                epoch, reason = self.inbox.epoch_of(cam.name)
                self._reset(cam, reason, epoch=item.frame[0].epoch)
            self._decode(cam, item.frame)
        else:
            speaking = [cam for cam in cams if cam.dialogue.mode is Mode.SPEAKING]
            if len(speaking) == 1:
                self._decode(speaking[0], None)
            elif speaking:
                self._decode_together(speaking)
        for cam in cams:  # a silent round with no frame for round.close_after_sec ends
            if cam.dialogue.quiet_too_long():
                self._emit_all(cam.dialogue.end_round(END_SILENCE))

    def _prefill(self, cam: _Camera) -> None:
        """Run the session prefix (system prompt) and sample the first token."""
        logits = self.runner.start_session(cam.session, self.config.system_prompt)
        self._emit_all(cam.dialogue.on_token(self._sample(cam, logits)))

    def _sample(self, cam: _Camera, logits) -> int:
        return _sample_rows(self._sampler, logits[None], [cam.dialogue.history])[0]

    def _decode(self, cam: _Camera, ready) -> None:
        """Feed the camera's pending token and, when ``ready`` (frame, encoded) came, the
        frame's ``<|image|>``; sample the next token."""
        dialogue = cam.dialogue
        tokens = dialogue.take_pending()
        frames = []
        if ready is not None:
            frames.append((len(tokens), ready[1]))
            tokens.append(self.runner.special.image)
        if not tokens:
            return
        self._check_positions(cam, len(tokens))
        logits = self._feed(cam, tokens, frames)
        if ready is not None:
            frame, encoded = ready
            self.frame_latencies.append(time.monotonic() - frame.arrival_ts)
            ref = FrameRef(encoded.frame_index, frame.stamp, frame.frame_id, frame.arrival_ts)
            dialogue.on_frame(ref)
            self._emit(FrameEvent(image=frame.image, source=ref, camera=cam.name))
            self._fit_total_budget(cam)
        self._emit_all(dialogue.on_token(self._sample(cam, logits),
                                         after_frame=ready is not None))

    def _decode_together(self, cams: List[_Camera]) -> None:
        """One forward for every speaking session, a batch row each; then each samples and
        its dialogue goes on."""
        for cam in list(cams):
            self._check_positions(cam, 1)
        # (a position reset re-ran a session's prefix: it speaks again only after a frame)
        cams = [cam for cam in cams
                if cam.dialogue.mode is Mode.SPEAKING and cam.dialogue.pending is not None]
        if not cams:
            return
        tokens = [cam.dialogue.take_pending()[0] for cam in cams]
        sessions = [cam.session for cam in cams]
        before = [s.num_oom_events for s in sessions]
        logits = self.runner.feed_batch(sessions, tokens)
        for cam, n in zip(cams, before):
            self._note_oom(cam, n)
        ids = _sample_rows(self._sampler, logits, [cam.dialogue.history for cam in cams])
        for cam, token in zip(cams, ids):
            self._emit_all(cam.dialogue.on_token(token))

    def _feed(self, cam: _Camera, tokens, frames=()):
        """``runner.feed`` on the camera's session; a device OOM it survived (frames
        evicted) is counted and reported as a non-fatal error event."""
        before = cam.session.num_oom_events
        logits = self.runner.feed(cam.session, tokens, frames)
        self._note_oom(cam, before)
        return logits

    def _note_oom(self, cam: _Camera, before: int) -> None:
        session = cam.session
        if session.num_oom_events != before:
            self._num_oom_events += session.num_oom_events - before
            self._emit(ErrorEvent(f'device out of memory: evicted frames down to '
                                  f'{session.vision_cache.num_frames} cached '
                                  f'({session.cache_bytes} bytes, now the cap); continuing',
                                  round_id=cam.dialogue.round.round_id, camera=cam.name))

    def _fit_total_budget(self, cam: _Camera) -> None:
        """``max_total_memory_bytes``: the session that just grew gives frames back until
        every session together fits (it keeps one frame)."""
        budget = self.config.max_total_memory_bytes
        if not budget:
            return
        while (sum(c.session.cache_bytes for c in self._cams.values()) > budget
               and cam.session.vision_cache.num_frames > 1):
            self.runner.evict_one(cam.session)  # (eviction policy order)

    def _ask(self, cam: _Camera, question: Question) -> None:
        dialogue = cam.dialogue
        tokens = dialogue.take_pending()
        self._emit_all(dialogue.start_round(question))
        tokens += list(question.token_ids)
        try:
            self._check_positions(cam, len(tokens))
            logits = self._feed(cam, tokens)
        except ValueError as exc:
            self._emit(ErrorEvent(f'question rejected: {exc}', round_id=question.round_id,
                                  camera=cam.name))
            self._emit_all(dialogue.end_round(END_ERROR))
            self._reset(cam, 'question did not fit the context')
            return
        self._emit_all(dialogue.on_token(self._sample(cam, logits)))

    def _reset(self, cam: _Camera, reason: str, epoch: Optional[int] = None) -> None:
        """A fresh session for ``cam``: its round ends, its waiting questions are cancelled,
        the caches and dialogue start over. ``epoch``: the inbox already started that session
        (a jump back in stamps, a camera gap); else the inbox starts one now (frames of the
        old session still waiting are dropped), so admission starts over too."""
        cam.num_session_resets += 1
        cam.epoch = self.inbox.reset_camera(cam.name, reason) if epoch is None else epoch
        self._emit_all(cam.dialogue.reset())
        self._cancel_waiting(END_RESET, cam.name)
        self._emit(SessionResetEvent(reason=reason, camera=cam.name))
        self._prefill(cam)

    def _end_everything(self, cam: _Camera, reason: str) -> None:
        """End the camera's open round and cancel its waiting questions with ``reason``."""
        self._emit_all(cam.dialogue.end_round(reason))
        self._cancel_waiting(reason, cam.name)

    def _cancel_waiting(self, reason: str, camera: Optional[str] = None) -> None:
        for question in self.inbox.take_questions(camera):
            self._emit_all(self._cams[question.camera].dialogue.cancel_question(question,
                                                                                reason))

    def _check_positions(self, cam: _Camera, n: int) -> None:
        if cam.session.next_pos + n + 8 >= self.runner.max_positions:
            log.warning('text positions of camera %r reached the model limit (%d): session '
                        'reset', cam.name, self.runner.max_positions)
            self._reset(cam, 'position limit reached')
