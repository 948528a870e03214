"""One camera's session: its caches and positions (a :class:`~.runner.Session`), its
:class:`~.dialogue.Dialogue`, and the operations on them (docs/model.md section 7.4).

Everything here runs on the engine thread; the engine (:mod:`.engine`) decides which camera
acts next and hands each operation the shared parts through itself (the runner, the inbox,
the memory budget, sampling and the event output).
"""
import logging
import time
from typing import List, Optional

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


class CameraSession:
    """A camera's session and dialogue, written by the engine thread only.

    :param name: the camera (``EngineConfig.cameras``).
    :param session: its :class:`~.runner.Session` (a row of the engine's cache pool).
    :param engine: the :class:`~.engine.StreamingEngine` (runner, inbox, budget, config,
        ``emit``, ``emit_all``, ``sample_rows``).
    """

    def __init__(self, name: str, session, engine) -> None:
        self.name = name
        self.session = session
        self.engine = engine
        runner = engine.runner

        def oldest() -> int:
            cached = session.vision_cache.frame_indices()
            return cached[0] if cached else -1
        self.dialogue = Dialogue(engine.config, runner.special.silence, runner.decode, oldest,
                                 camera=name)
        self.num_session_resets = 0
        self.epoch = 0  # the inbox epoch of the session (inbox.py: sessions are epochs)

    # ------------------------------------------------------------------ operations
    def prefill(self) -> None:
        """Run the session prefix (system prompt) and sample the first token."""
        engine = self.engine
        logits = engine.runner.start_session(self.session, engine.config.system_prompt)
        engine.emit_all(self.dialogue.on_token(self.sample(logits)))

    def sample(self, logits) -> int:
        return self.engine.sample_rows(logits[None], [self.dialogue.history], [self.name])[0]

    def decode(self, ready) -> None:
        """Feed the pending token and, when ``ready`` (frame, encoded) came, the frame's
        ``<|image|>``; sample the next token."""
        engine, dialogue = self.engine, self.dialogue
        tokens = dialogue.take_pending()
        frames = []
        if ready is not None:
            frames.append((len(tokens), ready[1]))
            tokens.append(engine.runner.special.image)
        if not tokens:
            return
        self.check_positions(len(tokens))
        logits = self.feed(tokens, frames)
        if ready is not None:
            frame, encoded = ready
            engine.frame_latencies.append(time.monotonic() - frame.arrival_ts)
            ref = FrameRef(encoded.frame_index, frame.stamp, frame.frame_id, frame.arrival_ts)
            dialogue.on_frame(ref)
            engine.emit(FrameEvent(image=frame.image, source=ref, camera=self.name))
            engine.runner.budget.fit_total(self.session,
                                           [c.session for c in engine.cameras()], engine.runner)
        engine.emit_all(dialogue.on_token(self.sample(logits), after_frame=ready is not None))

    def ask(self, question: Question) -> None:
        """A question: the open round ends, the question is prefilled, the answer begins."""
        engine, dialogue = self.engine, self.dialogue
        tokens = dialogue.take_pending()
        engine.emit_all(dialogue.start_round(question))
        tokens += list(question.token_ids)
        try:
            self.check_positions(len(tokens))
            logits = self.feed(tokens)
        except ValueError as exc:
            engine.emit(ErrorEvent(f'question rejected: {exc}', round_id=question.round_id,
                                   camera=self.name))
            engine.emit_all(dialogue.end_round(END_ERROR))
            self.reset('question did not fit the context')
            return
        engine.emit_all(dialogue.on_token(self.sample(logits)))

    def feed(self, tokens, frames=()):
        """``runner.feed`` on the session; a device OOM it survived (frames evicted) is
        counted and reported as a non-fatal error event."""
        before = self.session.num_oom_events
        logits = self.engine.runner.feed(self.session, tokens, frames)
        self.note_oom(before)
        return logits

    def note_oom(self, before: int) -> None:
        session = self.session
        if session.num_oom_events != before:
            self.engine.emit(ErrorEvent(
                f'device out of memory: evicted frames down to '
                f'{session.vision_cache.num_frames} cached ({session.cache_bytes} bytes, now '
                'the cap); continuing', round_id=self.dialogue.round.round_id,
                camera=self.name))

    def reset(self, reason: str, epoch: Optional[int] = None) -> None:
        """A fresh session: the round ends, the waiting questions are cancelled, the caches
        and the dialogue start over. ``epoch``: the inbox already started that session (a jump
        back in stamps, a camera gap); else the inbox starts one now (frames of the old session
        still waiting are dropped), so admission starts over too."""
        engine = self.engine
        self.num_session_resets += 1
        self.epoch = engine.inbox.reset_camera(self.name, reason) if epoch is None else epoch
        engine.emit_all(self.dialogue.reset())
        self.cancel_waiting(END_RESET)
        engine.emit(SessionResetEvent(reason=reason, camera=self.name))
        engine.restart_sampling(self.name)
        self.prefill()

    def end_everything(self, reason: str) -> None:
        """End the open round and cancel the waiting questions with ``reason``."""
        self.engine.emit_all(self.dialogue.end_round(reason))
        self.cancel_waiting(reason)

    def cancel_waiting(self, reason: str) -> None:
        for question in self.engine.inbox.take_questions(self.name):
            self.engine.emit_all(self.dialogue.cancel_question(question, reason))

    def check_positions(self, n: int) -> None:
        """Reset before the text positions reach the model's RoPE limit."""
        limit = self.engine.runner.max_positions
        if self.session.next_pos + n + 8 >= limit:
            log.warning('text positions of camera %r reached the model limit (%d): session '
                        'reset', self.name, limit)
            self.reset('position limit reached')


def decode_together(engine, cams: List[CameraSession]) -> None:
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
    logits = engine.runner.feed_batch([cam.session for cam in cams], tokens)
    for cam, n in zip(cams, before):
        cam.note_oom(n)
    ids = engine.sample_rows(logits, [cam.dialogue.history for cam in cams],
                             [cam.name for cam in cams])
    for cam, token in zip(cams, ids):
        engine.emit_all(cam.dialogue.on_token(token))


def sample_rows(sampler, logits, histories, streams) -> List[int]:
    """Token ids for each row of ``logits`` (batch, vocab): one device sample and one read
    back with a :class:`~.sampling.Sampler` (its ``sample``, row ``i`` drawing from the
    random stream ``streams[i]``, the camera's name); any other
    ``sampler(logits_row, history) -> int`` (scripted test samplers) is called per row."""
    batched = getattr(sampler, 'sample', None)
    if batched is not None:
        return batched(logits, histories, streams).tolist()
    return [int(sampler(row, list(h))) for row, h in zip(logits, histories)]
