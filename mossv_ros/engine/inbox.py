"""The engine's inbox: every input queue, and the one lock and condition that guard them.

Pure Python (no torch). Any thread may put input in (camera callbacks, service handlers); the
encoder thread takes raw frames out and puts encoded ones back; the engine thread takes the
next item to act on. Frame admission lives here, with its state, per camera (one session
each): per-topic stamp checks (:class:`~.policy.StampPolicy`), then, on the one stamp of the
camera's last frame fed, subsampling to ``frames.rate_hz`` (:func:`~.policy.frame_due`) and the
camera-gap policy (``frames.reset_after_gap_sec``).

**Sessions are epochs.** Every frame carries its camera's session epoch. A new session is
decided in one place, :meth:`Inbox._new_epoch`: when a camera's stamps jump back (a looped
bag), after a camera gap, or when the engine resets the session (a service call). It restarts
the camera's admission exactly as a fresh start has it (no frame fed yet, frame indices from
0, nothing of the old timeline queued), and the engine resets the session itself when it
takes the first frame of a newer epoch. So the same input after a reset gives the same output
as after a start: a looped bag replays identically.
"""
from collections import deque
from dataclasses import dataclass, field
import enum
import logging
import math
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

from .config import EngineConfig
from .events import Frame, Question
from .policy import (
    frame_due,
    STAMP_HELD,
    STAMP_JUMPED_AHEAD,
    STAMP_JUMPED_BACK,
    StampPolicy,
)

log = logging.getLogger(__name__)


class Control(enum.Enum):
    """Control requests, acted on at the next token boundary before questions and frames."""

    RESET = 'reset'  # arg: reason
    END_ROUNDS = 'end_rounds'  # arg: reason
    CANCEL = 'cancel'  # arg: (round_id, reason)


@dataclass
class InboxCounts:
    """Input counters (Status totals), written under the inbox lock only."""

    num_frames_received: int = 0
    num_frames_encoded: int = 0
    num_dropped_frames: int = 0
    num_stamp_outliers: int = 0
    num_rounds_started: int = 0  # questions accepted
    num_questions_cancelled: int = 0  # waiting questions superseded or cancelled
    longest_frame_gap_sec: float = 0.0

    def add_frames(self, other: 'InboxCounts') -> None:
        """Add ``other``'s frame counters (a camera's) to these (the totals)."""
        for name in ('num_frames_received', 'num_frames_encoded', 'num_dropped_frames',
                     'num_stamp_outliers'):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.longest_frame_gap_sec = max(self.longest_frame_gap_sec,
                                         other.longest_frame_gap_sec)


#: :meth:`Inbox.admit` verdicts: feed the frame; hold it (its stamp is off the timeline: the
#: next frame tells whether it starts a new one); skip it (subsampled or unusable)
FEED, HOLD, SKIP = 'feed', 'hold', 'skip'


@dataclass
class _CameraInput:
    """Admission state of one camera."""

    stamps: StampPolicy = field(default_factory=StampPolicy)
    #: stamp of the last frame admitted, seconds: the rate limit and camera gaps use it (None:
    #: no frame fed in this session yet, the next one is due)
    last_fed_stamp: Optional[float] = None
    rate_free: bool = False  # the next frame is due whatever its stamp (a jump ahead)
    #: the session: a new one starts with the first frame of a higher epoch
    epoch: int = 0
    epoch_reason: str = ''  # why the current epoch started
    index_epoch: int = 0  # the epoch next_frame_index counts in
    next_frame_index: int = 0
    #: topic -> (frame, stamp) held while its stamp's verdict is open (StampPolicy)
    held: Dict[str, Tuple[Frame, float]] = field(default_factory=dict)
    counts: InboxCounts = field(default_factory=InboxCounts)


@dataclass
class Item:
    """What the engine thread acts on next: exactly one of the fields is set."""

    #: (kind, camera or None for every camera, arg)
    control: Optional[Tuple[Control, Optional[str], Any]] = None
    question: Optional[Question] = None
    frame: Optional[Tuple[Frame, Any]] = None  # (frame, its encoded frame from the runner)


def _drop_oldest(queue: deque, camera: str, frame_of, limit: int) -> bool:
    """With ``limit`` frames of ``camera`` in ``queue`` (``max_frame_queue``): drop its oldest.
    :returns: True when one was dropped."""
    mine = [x for x in queue if frame_of(x).camera == camera]
    if len(mine) < limit:
        return False
    queue.remove(mine[0])
    return True


class Inbox:
    """Input queues of one engine.

    :param config: the engine configuration (``cameras``, ``frame_rate_hz``,
        ``max_frame_queue`` (per camera), ``max_pending_questions``, ``reset_after_gap_sec``,
        ``reset_on_backwards_stamp``); :meth:`update_config` replaces it.
    """

    def __init__(self, config: EngineConfig) -> None:
        self.cv = threading.Condition()
        self.config = config
        self.counts = InboxCounts()  # questions; frame counters live per camera
        self._cams: Dict[str, _CameraInput] = {name: _CameraInput() for name in config.cameras}
        self._frames: deque = deque()  # raw frames, for the encoder
        self._ready: deque = deque()  # (frame, encoded), for the engine
        self._questions: deque = deque()
        self._controls: deque = deque()
        self._idle = False  # the engine thread waits with nothing to do
        self._encoding = 0  # frames the encoder thread holds
        self.closed = False

    def update_config(self, config: EngineConfig) -> None:
        with self.cv:
            self.config = config

    def close(self) -> None:
        """Wake every waiter for good (engine stopping)."""
        with self.cv:
            self.closed = True
            self.cv.notify_all()

    def open(self) -> None:
        with self.cv:
            self.closed = False

    # ------------------------------------------------------------------ frames in
    def admit(self, stamp_sec: float, topic: str, camera: str) -> str:
        """What to do with a frame of ``camera``'s ``topic`` stamped ``stamp_sec`` (seconds):
        :data:`FEED` (committed: hand the frame to :meth:`put_frame` with this verdict),
        :data:`HOLD` (its stamp is off the timeline; hand it over too: it is kept until the
        next frame tells whether it starts a new timeline) or :data:`SKIP`. Per-topic jump
        and outlier checks, then subsampling to ``frames.rate_hz``; a real jump back in time
        starts a new session when ``reset_on_backwards_stamp``."""
        with self.cv:
            return self._admit_locked(stamp_sec, topic, camera)

    def _admit_locked(self, stamp_sec: float, topic: str, camera: str) -> str:
        if not math.isfinite(stamp_sec):
            return SKIP
        cam = self._cams[camera]
        stamps, outliers = cam.stamps, cam.stamps.num_outliers
        verdict = stamps.check(topic, stamp_sec)
        held = cam.held.pop(topic, None)
        if stamps.num_outliers != outliers:
            cam.counts.num_stamp_outliers = stamps.num_outliers
            log.warning('dropped one frame of %r whose stamp was off its timeline (an outlier;'
                        ' %d so far)', topic, stamps.num_outliers)
        if verdict == STAMP_HELD:
            return HOLD
        if verdict in (STAMP_JUMPED_BACK, STAMP_JUMPED_AHEAD):
            if verdict == STAMP_JUMPED_BACK and self.config.reset_on_backwards_stamp:
                log.warning('stamps of %r jumped back in time: resetting the session', topic)
                self._new_epoch(cam, 'stamp jumped backwards', drop_queued=True)
            else:
                cam.rate_free = True
            if held is not None:  # the held frame was the first of the new timeline
                frame, held_stamp = held
                self._admit_due(cam, held_stamp)
                self._queue(cam, frame)
        return FEED if self._admit_due(cam, stamp_sec) else SKIP

    def _admit_due(self, cam: _CameraInput, stamp_sec: float) -> bool:
        """Subsampling to ``frames.rate_hz`` and the camera-gap policy; commits on True."""
        if not (cam.rate_free
                or frame_due(cam.last_fed_stamp, stamp_sec, 1.0 / self.config.frame_rate_hz)):
            return False
        last, cam.last_fed_stamp, cam.rate_free = cam.last_fed_stamp, stamp_sec, False
        if last is not None and stamp_sec > last:
            gap = stamp_sec - last
            c = cam.counts
            c.longest_frame_gap_sec = max(c.longest_frame_gap_sec, gap)
            limit = self.config.reset_after_gap_sec
            if limit and gap > limit:
                log.info('no frame for %.1f s (> frames.reset_after_gap_sec %.1f): new '
                         'session', gap, limit)
                # the frames queued ahead of this one still go to the old session
                self._new_epoch(cam, f'camera gap of {gap:.1f} s', drop_queued=False)
                cam.last_fed_stamp = stamp_sec
        return True

    def _new_epoch(self, cam: _CameraInput, reason: str, drop_queued: bool) -> int:
        """The one place a camera's new session is decided: its admission starts over as at a
        fresh start (no frame fed yet; frame indices from 0 once its frames are taken) and,
        with ``drop_queued``, its frames still waiting (queued or being encoded) are dropped
        and counted: they belong to the old session. :returns: the new epoch."""
        cam.epoch += 1
        cam.epoch_reason = reason
        cam.last_fed_stamp, cam.rate_free = None, False
        if drop_queued:
            for queue, frame_of in ((self._frames, lambda f: f),
                                    (self._ready, lambda item: item[0])):
                stale = [x for x in queue if frame_of(x).camera is not None
                         and self._cams.get(frame_of(x).camera) is cam]
                for x in stale:
                    queue.remove(x)
                cam.counts.num_dropped_frames += len(stale)
        return cam.epoch

    def put_frame(self, frame: Frame, stamp_sec: float, admitted=None, topic: str = '') -> bool:
        """Queue ``frame`` (its ``camera`` set) for the encoder.

        :param admitted: the verdict :meth:`admit` gave for it (:data:`FEED` or True,
            :data:`HOLD`); None: decide here (callers that have the frame already).
        :returns: True if queued now. The camera's oldest queued frame is dropped (and
            counted) past ``max_frame_queue``."""
        with self.cv:
            cam = self._cams[frame.camera]
            verdict = FEED if admitted is True else (
                admitted or self._admit_locked(stamp_sec, topic, frame.camera))
            if verdict == HOLD:
                cam.held[topic] = (frame, stamp_sec)
                return False
            if verdict != FEED:
                return False
            self._queue(cam, frame)
        return True

    def _queue(self, cam: _CameraInput, frame: Frame) -> None:
        frame.epoch = cam.epoch
        if _drop_oldest(self._frames, frame.camera, lambda f: f,
                        self.config.max_frame_queue):
            cam.counts.num_dropped_frames += 1
        self._frames.append(frame)
        cam.counts.num_frames_received += 1
        self.cv.notify_all()

    def topic_stamps(self) -> dict:
        """{topic: its newest stamp, seconds} of every camera topic seen."""
        with self.cv:
            out = {}
            for cam in self._cams.values():
                out.update(cam.stamps.topic_stamps())
            return out

    def last_stamp_sec(self, camera: Optional[str] = None) -> Optional[float]:
        """Newest image stamp admitted or checked, seconds, of ``camera`` (None: of any);
        None before any."""
        with self.cv:
            cams = self._cams.values() if camera is None else [self._cams[camera]]
            stamps = [s for s in (c.stamps.last_stamp_sec() for c in cams) if s is not None]
            return max(stamps) if stamps else None

    def reset_camera(self, camera: str, reason: str) -> int:
        """The engine restarts ``camera``'s session (a reset service call, the position
        limit): a new epoch, frames waiting from before dropped. :returns: the new epoch."""
        with self.cv:
            return self._new_epoch(self._cams[camera], reason, drop_queued=True)

    def epoch_of(self, camera: str) -> Tuple[int, str]:
        """(the camera's current epoch, why it started)."""
        with self.cv:
            cam = self._cams[camera]
            return cam.epoch, cam.epoch_reason

    # ------------------------------------------------------------------ encoder side
    def take_frames_to_encode(self, may_encode, max_frames: int) -> Optional[List[Tuple]]:
        """Block until raw frames are queued and ``may_encode()`` (sessions exist), then pop
        up to ``max_frames`` of them (frames that arrived together are encoded in one batch),
        each with its camera's next frame index. :returns: [(frame, index)], None once
        closed."""
        with self.cv:
            while not self.closed and not (self._frames and may_encode()):
                self.cv.wait(0.05)
            if self.closed:
                return None
            out = []
            while self._frames and len(out) < max_frames:
                frame = self._frames.popleft()
                cam = self._cams[frame.camera]
                if frame.epoch != cam.index_epoch:  # a new session counts frames from 0
                    cam.index_epoch, cam.next_frame_index = frame.epoch, 0
                out.append((frame, cam.next_frame_index))
                cam.next_frame_index += 1
            self._encoding = len(out)
            return out

    def put_encoded(self, frame: Frame, encoded) -> None:
        """The encoder's result for the engine (None: the frame could not be encoded)."""
        with self.cv:
            self._encoding = max(0, self._encoding - 1)
            cam = self._cams[frame.camera]
            counts = cam.counts
            if encoded is None or frame.epoch < cam.epoch:  # unencodable, or of an old session
                counts.num_dropped_frames += 1
            else:
                if _drop_oldest(self._ready, frame.camera, lambda item: item[0],
                                self.config.max_frame_queue):
                    counts.num_dropped_frames += 1
                self._ready.append((frame, encoded))
                counts.num_frames_encoded += 1
            self.cv.notify_all()

    # ------------------------------------------------------------------ questions, controls
    def put_question(self, question_of) -> Tuple[Question, Optional[Question]]:
        """Queue the question ``question_of()`` builds, under the lock (so round ids are
        queued in order). :returns: (question, the oldest waiting question of the same camera
        it superseded, or None: each camera's queue holds ``max_pending_questions``)."""
        with self.cv:
            question = question_of()
            self.counts.num_rounds_started += 1
            old = None
            mine = [q for q in self._questions if q.camera == question.camera]
            if len(mine) >= self.config.max_pending_questions:
                old = mine[0]
                self._questions.remove(old)
                self.counts.num_questions_cancelled += 1
            self._questions.append(question)
            self.cv.notify_all()
            return question, old

    def remove_question(self, round_id: int) -> Optional[Question]:
        """Take the waiting question of ``round_id`` out (counted as cancelled); None when it
        is not waiting (it started already, or ended)."""
        with self.cv:
            waiting = next((q for q in self._questions if q.round_id == round_id), None)
            if waiting is not None:
                self._questions.remove(waiting)
                self.counts.num_questions_cancelled += 1
            return waiting

    def take_questions(self, camera: Optional[str] = None) -> list:
        """Every waiting question (of ``camera``; None: of all), now removed (the caller
        cancels them)."""
        with self.cv:
            out = [q for q in self._questions if camera is None or q.camera == camera]
            for q in out:
                self._questions.remove(q)
            return out

    def put_control(self, kind: Control, camera: Optional[str], arg) -> None:
        """Queue a control for ``camera`` (None: every camera)."""
        with self.cv:
            self._controls.append((kind, camera, arg))
            self.cv.notify_all()

    # ------------------------------------------------------------------ engine side
    def next_item(self, wait: bool, timeout: float = 0.1) -> Item:
        """The next thing for the engine thread: a control, else a question, else an
        encoded frame. With ``wait`` (every session silent: nothing to decode) and nothing
        queued, the engine counts as idle and this waits up to ``timeout`` seconds.

        :returns: an :class:`Item`; all fields None when nothing came.
        """
        with self.cv:
            if self._controls:
                item = Item(control=self._controls.popleft())
            elif self._questions:
                item = Item(question=self._questions.popleft())
            elif self._ready:
                item = Item(frame=self._ready.popleft())
            else:
                item = Item()
                if wait and not self.closed:
                    self._idle = True
                    self.cv.notify_all()
                    self.cv.wait(timeout)
            self._idle = False
            return item

    def wait_idle(self, timeout: float) -> bool:
        """Block until every input was consumed and the engine waits for more.

        :returns: True when idle, False on timeout or once closed.
        """
        end = time.monotonic() + timeout
        with self.cv:
            while True:
                if (self._idle and not self._encoding
                        and not (self._frames or self._ready or self._questions
                                 or self._controls)):
                    return True
                left = end - time.monotonic()
                if left <= 0 or self.closed:
                    return False
                self.cv.wait(min(left, 0.05))

    def snapshot(self) -> Tuple[InboxCounts, Dict[str, InboxCounts]]:
        """(totals, {camera: its counters}), copies."""
        with self.cv:
            per = {name: InboxCounts(**vars(c.counts)) for name, c in self._cams.items()}
            total = InboxCounts(**vars(self.counts))
            for c in per.values():
                total.add_frames(c)
            return total, per
