"""One camera's session: its caches and positions (a :class:`~.runner.Session`), its
:class:`~.dialogue.Dialogue`, and the operations on them (docs/model.md section 7.4).

Everything here runs on the engine thread; the engine (:mod:`.engine`) decides which camera
acts next. A camera is handed the shared parts it uses (:class:`EngineParts`: the runner, the
inbox, sampling, the event output, the pool's sessions), never the engine: nothing here refers
back to the object that holds it, so a stopped engine is freed by reference counting alone.
"""
from collections import deque
import logging
import queue
import time
from typing import Callable, List, Optional

from .dialogue import Dialogue, Mode
from .events import (
    END_ERROR,
    END_RESET,
    ErrorEvent,
    FrameEvent,
    FrameRef,
    Question,
    SessionResetEvent,
)

log = logging.getLogger(__name__)


class EventOutput:
    """The engine's output: a queue of events, read with :meth:`drain`, and an optional
    ``on_event(event)`` told after each (from engine threads; must not block)."""

    def __init__(self, on_event: Optional[Callable[[object], None]] = None) -> None:
        self.queue: 'queue.Queue' = queue.Queue()
        self.on_event = on_event

    def emit(self, event) -> None:
        """Queue an output event (and tell ``on_event``)."""
        self.queue.put(event)
        if self.on_event is not None:
            try:
                self.on_event(event)
            except Exception:  # noqa: BLE001 - a consumer's bug must not kill the engine
                log.exception('on_event callback failed')

    def emit_all(self, events) -> None:
        for event in events:
            self.emit(event)

    def drain(self, timeout: float = 0.0) -> list:
        """Every event queued so far, oldest first; when none is queued, wait up to
        ``timeout`` seconds for the first."""
        out = []
        try:
            out.append(self.queue.get(timeout=timeout) if timeout > 0
                       else self.queue.get_nowait())
        except queue.Empty:
            return out
        while True:
            try:
                out.append(self.queue.get_nowait())
            except queue.Empty:
                return out


class EngineParts:
    """The parts a camera's operations and the encoder thread use, handed to them by the
    engine (which owns them): none refers back to the engine.

    :ivar config: the engine configuration in force (replaced by ``update_config``).
    :ivar inbox: the :class:`~.inbox.Inbox`.
    :ivar output: the :class:`EventOutput`.
    :ivar runner: the :class:`~.runner.ModelRunner` (None until loaded).
    :ivar sampler: the sampler in force (:class:`~.sampling.Sampler` or a test's callable).
    :ivar sessions: every camera's :class:`~.runner.Session` (the rows of the cache pool).
    :ivar frame_latencies: seconds from a frame's arrival to its insertion in the vision
        cache, newest last (bounded; read by benchmarks).
    """

    def __init__(self, config, inbox, output: EventOutput) -> None:
        self.config = config
        self.inbox = inbox
        self.output = output
        self.runner = None
        self.sampler = None
        self.sessions: list = []
        self.frame_latencies: deque = deque(maxlen=4096)

    def emit(self, event) -> None:
        self.output.emit(event)

    def emit_all(self, events) -> None:
        self.output.emit_all(events)

    def sample_rows(self, logits, histories, cameras) -> List[int]:
        """The next token of each row of ``logits`` (batch, vocab) by the sampler, row ``i``
        from camera ``cameras[i]``'s random stream."""
        return sample_rows(self.sampler, logits, histories, cameras)

    def restart_sampling(self, camera: str) -> None:
        """A session reset: ``camera``'s random stream starts over from its seed."""
        restart = getattr(self.sampler, 'restart', None)
        if restart is not None:
            restart(camera)


class CameraSession:
    """A camera's session and dialogue, written by the engine thread only.

    :param name: the camera (``EngineConfig.cameras``).
    :param session: its :class:`~.runner.Session` (a row of the engine's cache pool).
    :param parts: the engine's :class:`EngineParts` (runner, inbox, config, sampling, output).
    """

    def __init__(self, name: str, session, parts: EngineParts) -> None:
        self.name = name
        self.session = session
        self.parts = parts
        runner = parts.runner

        def oldest() -> int:
            cached = session.vision_cache.frame_indices()
            return cached[0] if cached else -1
        self.dialogue = Dialogue(parts.config, runner.special.silence, runner.decode, oldest,
                                 camera=name)
        self.num_session_resets = 0
        self.epoch = 0  # the inbox epoch of the session (inbox.py: sessions are epochs)

    # ------------------------------------------------------------------ operations
    def prefill(self) -> None:
        """Run the session prefix (system prompt) and sample the first token."""
        parts = self.parts
        logits = parts.runner.start_session(self.session, parts.config.system_prompt)
        parts.emit_all(self.dialogue.on_token(self.sample(logits)))

    def sample(self, logits) -> int:
        return self.parts.sample_rows(logits[None], [self.dialogue.history], [self.name])[0]

    def decode(self, ready) -> None:
        """Feed the pending token and, when ``ready`` (frame, encoded) came, the frame's
        ``<|image|>``; sample the next token."""
        parts, dialogue = self.parts, self.dialogue
        tokens = dialogue.take_pending()
        frames = []
        if ready is not None:
            frames.append((len(tokens), ready[1]))
            tokens.append(parts.runner.special.image)
        if not tokens:
            return
        self.check_positions(len(tokens))
        logits = self.feed(tokens, frames)
        if ready is not None:
            frame, encoded = ready
            parts.frame_latencies.append(time.monotonic() - frame.arrival_ts)
            ref = FrameRef(encoded.frame_index, frame.stamp, frame.frame_id, frame.arrival_ts)
            dialogue.on_frame(ref)
            parts.emit(FrameEvent(image=frame.image, source=ref, camera=self.name))
            parts.runner.budget.fit_total(self.session, parts.sessions, parts.runner)
        parts.emit_all(dialogue.on_token(self.sample(logits), after_frame=ready is not None))

    def ask(self, question: Question) -> None:
        """A question: the open round ends, the question is prefilled, the answer begins."""
        parts, dialogue = self.parts, self.dialogue
        tokens = dialogue.take_pending()
        parts.emit_all(dialogue.start_round(question))
        tokens += list(question.token_ids)
        try:
            self.check_positions(len(tokens))
            logits = self.feed(tokens)
        except ValueError as exc:
            parts.emit(ErrorEvent(f'question rejected: {exc}', round_id=question.round_id,
                                   camera=self.name))
            parts.emit_all(dialogue.end_round(END_ERROR))
            self.reset('question did not fit the context')
            return
        parts.emit_all(dialogue.on_token(self.sample(logits)))

    def feed(self, tokens, frames=()):
        """``runner.feed`` on the session; a device OOM it survived (frames evicted) is
        counted and reported as a non-fatal error event."""
        before = self.session.num_oom_events
        logits = self.parts.runner.feed(self.session, tokens, frames)
        self.note_oom(before)
        return logits

    def note_oom(self, before: int) -> None:
        session = self.session
        if session.num_oom_events != before:
            self.parts.emit(ErrorEvent(
                f'device out of memory: evicted frames down to '
                f'{session.vision_cache.num_frames} cached ({session.cache_bytes} bytes, now '
                'the cap); continuing', round_id=self.dialogue.round.round_id,
                camera=self.name))

    def reset(self, reason: str, epoch: Optional[int] = None) -> None:
        """A fresh session: the round ends, the waiting questions are cancelled, the caches
        and the dialogue start over. ``epoch``: the inbox already started that session (a jump
        back in stamps, a camera gap); else the inbox starts one now (frames of the old session
        still waiting are dropped), so admission starts over too."""
        parts = self.parts
        self.num_session_resets += 1
        self.epoch = parts.inbox.reset_camera(self.name, reason) if epoch is None else epoch
        parts.emit_all(self.dialogue.reset())
        self.cancel_waiting(END_RESET)
        parts.emit(SessionResetEvent(reason=reason, camera=self.name))
        parts.restart_sampling(self.name)
        self.prefill()

    def end_everything(self, reason: str) -> None:
        """End the open round and cancel the waiting questions with ``reason``."""
        self.parts.emit_all(self.dialogue.end_round(reason))
        self.cancel_waiting(reason)

    def cancel_waiting(self, reason: str) -> None:
        for question in self.parts.inbox.take_questions(self.name):
            self.parts.emit_all(self.dialogue.cancel_question(question, reason))

    def check_positions(self, n: int) -> None:
        """Reset before the text positions reach the model's RoPE limit."""
        limit = self.parts.runner.max_positions
        if self.session.next_pos + n + 8 >= limit:
            log.warning('text positions of camera %r reached the model limit (%d): session '
                        'reset', self.name, limit)
            self.reset('position limit reached')


def decode_together(parts, cams: List[CameraSession]) -> None:
    """One step for every speaking camera, a batch row each; then each samples and its
    dialogue goes on."""
    for cam in list(cams):
        cam.check_positions(1)
    # (a position reset re-ran a session's prefix: it speaks again only after a frame)
    cams = [cam for cam in cams
            if cam.dialogue.mode is Mode.SPEAKING and cam.dialogue.pending is not None]
    if not cams:
        return
    tokens = [cam.dialogue.take_pending()[0] for cam in cams]
    before = [cam.session.num_oom_events for cam in cams]
    logits = parts.runner.feed_batch([cam.session for cam in cams], tokens)
    for cam, n in zip(cams, before):
        cam.note_oom(n)
    ids = parts.sample_rows(logits, [cam.dialogue.history for cam in cams],
                             [cam.name for cam in cams])
    for cam, token in zip(cams, ids):
        parts.emit_all(cam.dialogue.on_token(token))


def sample_rows(sampler, logits, histories, streams) -> List[int]:
    """Token ids for each row of ``logits`` (batch, vocab): one device sample and one read
    back with a :class:`~.sampling.Sampler` (its ``sample``, row ``i`` drawing from the
    random stream ``streams[i]``, the camera's name); any other
    ``sampler(logits_row, history) -> int`` (scripted test samplers) is called per row."""
    batched = getattr(sampler, 'sample', None)
    if batched is not None:
        return batched(logits, histories, streams).tolist()
    return [int(sampler(row, list(h))) for row, h in zip(logits, histories)]
