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
import threading
from typing import Callable, Iterator, List, Optional

from .budget import CacheBudget
from .camera import CameraSession, decode_together, EngineParts, EventOutput
from .config import EngineConfig, LIVE_FIELDS, model_name
from .dialogue import Mode
from .encoder import run_encoder
from .events import (
    END_ERROR,
    END_SHUTDOWN,
    END_SILENCE,
    EngineState,
    EngineStats,
    ErrorEvent,
)
from .inbox import Control, Inbox, Item
from .inputs import EngineInputs
from .stats import collect

log = logging.getLogger(__name__)


class StreamingEngine(EngineInputs):
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
        config = config.validate()
        self.inbox = Inbox(config)
        #: the parts the cameras and the encoder thread are handed (none refers back here)
        self.parts = EngineParts(config, self.inbox, EventOutput(on_event))
        self.parts.runner = runner
        self.parts.sampler = sampler
        self._owns_sampler = sampler is None  # built from config.sampling (update_config)
        self._load_progress = load_progress
        #: camera name -> its session and dialogue, in ``config.cameras`` order (made once
        #: the runner is loaded)
        self._cams: dict = {}
        self._round_ids = round_ids if round_ids is not None else itertools.count(1)
        self._threads: List[threading.Thread] = []
        self._state_cv = threading.Condition()
        self._state = EngineState.UNLOADED
        self.model_name = 'none'
        self.decode_path = ''
        self.last_error = ''

    @property
    def config(self) -> EngineConfig:
        return self.parts.config

    @property
    def runner(self):
        """The :class:`~.runner.ModelRunner` (None until loaded)."""
        return self.parts.runner

    @property
    def frame_latencies(self) -> deque:
        """Seconds from a frame's arrival to its insertion in the vision cache, newest last
        (bounded; read by benchmarks)."""
        return self.parts.frame_latencies

    @property
    def sampler(self):
        """The sampler in force (:class:`~.sampling.Sampler`, or the one given)."""
        return self.parts.sampler

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

    @property
    def state(self) -> EngineState:
        return self._state

    def _set_state(self, state: EngineState, error: str = '') -> None:
        with self._state_cv:
            self._state = state
            if error:
                self.last_error = error
            self._state_cv.notify_all()

    def start(self) -> None:
        """Start the engine and encoder threads (loads the model first if needed)."""
        if any(t.is_alive() for t in self._threads):
            return
        self.inbox.open()
        self._set_state(EngineState.LOADING)  # READY once the session prefill is done
        self._threads = [threading.Thread(target=self._engine_main, name='mossv-engine',
                                          daemon=True),
                         threading.Thread(target=run_encoder, args=(self.parts,),
                                          name='mossv-encoder', daemon=True)]
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
        return self.parts.output.drain(timeout)

    # ------------------------------------------------------------------ inputs
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
        sampling_changed = config.sampling != self.config.sampling
        self.parts.config = config
        self.inbox.update_config(config)
        for cam in self._cams.values():
            cam.dialogue.config = config
        if self._owns_sampler and self.runner is not None and sampling_changed:
            self.parts.sampler = self._new_sampler()  # every camera's stream starts over

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
            self.last_error = ''
            self._threads = [t for t in self._threads if t.is_alive()]
            self.start()

    def stats(self) -> EngineStats:
        """A snapshot of counters, totals and per camera (cheap; safe from any thread;
        writes nothing): :func:`.stats.collect`."""
        return collect(self)

    def cameras(self) -> list:
        """The cameras' :class:`~.camera.CameraSession` objects (read-only outside the
        engine thread; empty before the model loads)."""
        return list(self._cams.values())

    # ------------------------------------------------------------------ threads
    def emit(self, event) -> None:
        """Queue an output event (and tell ``on_event``)."""
        self.parts.emit(event)

    def emit_all(self, events) -> None:
        self.parts.emit_all(events)

    def _new_sampler(self):
        from .sampling import Sampler
        return Sampler(self.config.sampling, self.runner.suppressed_ids(),
                       self.runner.vocab_size)

    def _make_cameras(self) -> None:
        """A session per camera (the rows of one cache pool), the CUDA graphs over them when
        ``engine.cuda_graphs`` allows, and a :class:`~.camera.CameraSession` per camera."""
        runner, names, cfg = self.runner, self.config.cameras, self.config
        # the engine's configuration sets the budget its sessions live under
        runner.budget = CacheBudget(cfg.max_memory_bytes, cfg.max_total_memory_bytes)
        sessions = runner.new_sessions(len(names))
        self.decode_path = runner.capture_graphs(sessions)
        log.info('text step: %s', self.decode_path)
        self.parts.sessions = list(sessions)
        self._cams = {name: CameraSession(name, session, self.parts)
                      for name, session in zip(names, sessions)}

    def _engine_main(self) -> None:
        try:
            if self.runner is None:
                from .runner import ModelRunner
                self.parts.runner = ModelRunner(self.config, self._load_progress)
            if self.parts.sampler is None:
                self.parts.sampler = self._new_sampler()
            self.model_name = model_name(self.config.model_path)
            if not self._cams:
                self._make_cameras()
            for cam in self._cams.values():
                cam.prefill()
            self._set_state(EngineState.READY)
            while not self.inbox.closed:
                self.step()
            for cam in self._cams.values():
                cam.end_everything(END_SHUTDOWN)
        except Exception as exc:  # noqa: BLE001 - top of the engine loop: report, stop cleanly
            log.exception('engine thread failed')
            self._set_state(EngineState.ERROR, f'{type(exc).__name__}: {exc}')
            round_id = 0
            for cam in self._cams.values():
                round_id = round_id or cam.dialogue.round.round_id
                cam.end_everything(END_ERROR)
            self.emit(ErrorEvent(self.last_error, fatal=True, round_id=round_id))
            self.inbox.close()

    # ------------------------------------------------------------------ scheduling
    def step(self) -> None:
        """One scheduling decision (runs on the engine thread): a control, a question or a
        frame for one camera (a frame of a new session resets it first), else one batched
        decode step of every camera that is speaking."""
        cams = list(self._cams.values())
        silent = all(cam.dialogue.mode is Mode.SILENT for cam in cams)
        item: Item = self.inbox.next_item(wait=silent)
        if item.control is not None:
            self._control(*item.control)
        elif item.question is not None:
            self._cams[item.question.camera].ask(item.question)
        elif item.frame is not None:
            cam = self._cams[item.frame[0].camera]
            if item.frame[0].epoch > cam.epoch:  # the first frame of a new session
                epoch, reason = self.inbox.epoch_of(cam.name)
                cam.reset(reason, epoch=item.frame[0].epoch)
            cam.decode(item.frame)
        else:
            speaking = [cam for cam in cams if cam.dialogue.mode is Mode.SPEAKING]
            if len(speaking) == 1:
                speaking[0].decode(None)
            elif speaking:
                decode_together(self.parts, speaking)
        for cam in cams:  # a silent round with no frame for round.close_after_sec ends
            if cam.dialogue.quiet_too_long():
                self.emit_all(cam.dialogue.end_round(END_SILENCE))

    def _control(self, kind: Control, camera: Optional[str], arg) -> None:
        """A control request, for ``camera`` (None: every camera)."""
        cams = list(self._cams.values())
        targets = cams if camera is None else [self._cams[camera]]
        if kind is Control.END_ROUNDS:
            for cam in targets:
                self.emit_all(cam.dialogue.end_rounds(arg))
                cam.cancel_waiting(arg)
        elif kind is Control.CANCEL:
            round_id, reason = arg
            for cam in cams:
                if cam.dialogue.round.round_id == round_id:
                    self.emit_all(cam.dialogue.end_rounds(f'cancelled: {reason}'))
        else:
            for cam in targets:
                cam.reset(arg)
