"""The engine's front door: frames, questions and controls in, checked and queued.

Any thread may call these (camera callbacks, service handlers); they validate, then hand over
to the engine's :class:`~.inbox.Inbox`, and never wait for the model. :class:`EngineInputs`
is the part of :class:`~.engine.StreamingEngine` that does it; the threads and ``step()`` are
the rest of that class.
"""
import time
from typing import Optional

from .dialogue import cancelled_round
from .events import EngineState, Frame, Question
from .inbox import Control
from .policy import echo, validate_prompt, validate_request_id


class EngineInputs:
    """The input API of :class:`~.engine.StreamingEngine` (which provides ``config``,
    ``inbox``, ``runner``, ``state``, ``last_error``, ``session``, ``emit`` and the round
    ids)."""

    def camera_of(self, camera: str) -> Optional[str]:
        """The camera ``camera`` names ('' = the default one), or None when unknown."""
        if not camera:
            return self.config.cameras[0]
        return camera if camera in self.config.cameras else None

    def _known(self) -> str:
        return ', '.join(self.config.cameras)

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
            detail = f': {self.last_error}' if state is EngineState.ERROR else ''
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
            self.emit(cancelled_round(old, (
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
            self.emit(cancelled_round(waiting, reason))
        else:
            self.inbox.put_control(Control.CANCEL, None, (round_id, reason))
