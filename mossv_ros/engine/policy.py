"""Pure admission rules (no torch, no rclpy): stamps, frame subsampling, prompt validation."""
import math
from typing import Optional, Tuple
import unicodedata


def frame_due(last_sec: Optional[float], stamp_sec: float, period_sec: float,
              tolerance: float = 0.05) -> bool:
    """Is a frame stamped ``stamp_sec`` due, the last fed one being stamped ``last_sec``?
    Frames are kept at least ``period_sec`` (1 / ``frames.rate_hz``, docs/model.md section
    7.3) apart in stamp time, less ``tolerance`` of a period for jitter.

    Uses the frames' own stamps (camera or sim time), so a bag replayed faster than real time
    is subsampled exactly as live. A stamp before the last one is too soon (another camera's
    frame a few ms earlier, jitter); a real jump back in time is :class:`StampPolicy`'s to
    decide. :param last_sec: None when no frame was fed since the session (re)started.
    """
    if not math.isfinite(stamp_sec):
        return False
    return last_sec is None or stamp_sec - last_sec >= period_sec * (1.0 - tolerance)


def validate_prompt(text, max_chars: int) -> Tuple[bool, str, str]:
    """Check a user question.

    :returns: (ok, cleaned text, reason). Control characters other than newline and tab are
        removed; empty or whitespace-only prompts and prompts over ``max_chars`` characters
        are rejected (never truncated, so nothing the user asked is silently lost).
    """
    if not isinstance(text, str):
        return False, '', f'prompt must be a string, got {type(text).__name__}'
    if '\x00' in text:  # (over ROS the text was cut there: only what came before arrives)
        return False, '', ('prompt contains a NUL character: a ROS string ends at its first '
                           'NUL, so what follows it would never arrive; remove it')
    cleaned = ''.join(ch for ch in text if ch in '\n\t' or (ord(ch) >= 32 and ord(ch) != 127))
    cleaned = cleaned.strip()
    # zero-width and other format characters (Unicode category Cf) say nothing either
    if not any(not ch.isspace() and unicodedata.category(ch) != 'Cf' for ch in cleaned):
        return False, '', ('prompt is empty or whitespace only (over ROS a string ends at its '
                           'first NUL character: a question that starts with one arrives '
                           'empty)')
    if len(cleaned) > max_chars:
        return False, '', f'prompt has {len(cleaned)} characters, limit is {max_chars}'
    return True, cleaned, 'accepted'


#: Longest accepted ``request_id``, characters: it is echoed on every Token of the round.
MAX_REQUEST_ID_CHARS = 256
#: Most characters of a caller's text (a question, a camera name) quoted back in a log line or
#: a message; longer text is cut there, and the cut is said.
MAX_ECHO_CHARS = 200


def echo(text, limit: int = MAX_ECHO_CHARS) -> str:
    """``text`` as a log line or a reply may quote it: at most ``limit`` characters, and a
    longer text cut with its length said (``'abc... (10485760 characters)'``), so bad input
    never makes a log line or a message as large as itself. Anything not a string is shown by
    its type name."""
    if not isinstance(text, str):
        return f'<{type(text).__name__}>'
    if len(text) <= limit:
        return text
    return f'{text[:limit]}... ({len(text)} characters)'


def validate_request_id(request_id) -> Tuple[bool, str]:
    """Check a caller's ``request_id``. :returns: (ok, reason)."""
    if not isinstance(request_id, str):
        return False, f'request_id must be a string, got {type(request_id).__name__}'
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        return False, (f'request_id has {len(request_id)} characters, limit is '
                       f'{MAX_REQUEST_ID_CHARS} (it is echoed on every Token)')
    return True, 'accepted'


#: :meth:`StampPolicy.check` verdicts for the frame checked
STAMP_OK, STAMP_HELD, STAMP_JUMPED_BACK, STAMP_JUMPED_AHEAD = (
    'ok', 'held', 'jumped_back', 'jumped_ahead')


class StampPolicy:
    """Per-topic checks of image stamps before admission: jitter, outliers, real jumps.

    Each topic (camera) keeps its own last stamp, so two cameras whose stamps interleave a
    few ms apart never look like a stamp going backwards. A stamp more than ``jitter_sec``
    before that topic's last one, or more than ``max_jump_sec`` after it, is *held* (not
    admitted) until the topic's next frame tells which it was:

    * the next frame is back on the old timeline: the held stamp was an outlier (one frame
      stamped an hour ahead), counted in :attr:`num_outliers` and dropped; the stream goes on;
    * the next frame is off the old timeline too: a real jump (a looped bag, a camera
      restarted after a long gap, a clock step): :data:`STAMP_JUMPED_BACK` or
      :data:`STAMP_JUMPED_AHEAD` for that frame, which starts the new timeline (the held frame
      is lost: one frame per real jump).

    Pure and single-threaded: the engine calls it under its lock.

    :param jitter_sec: how far a stamp may go back on one topic before it counts as a jump.
    :param max_jump_sec: how far ahead a stamp may go before it is held (camera gaps below
        this are ordinary gaps).
    """

    def __init__(self, jitter_sec: float = 0.5, max_jump_sec: float = 300.0) -> None:
        self.jitter_sec = jitter_sec
        self.max_jump_sec = max_jump_sec
        self._last = {}
        self._held = {}
        self.num_outliers = 0

    def check(self, topic: str, stamp_sec: float) -> str:
        """Verdict for a frame of ``topic`` stamped ``stamp_sec`` (seconds): admit it on
        :data:`STAMP_OK` and on a jump (after a session reset for a jump back, where the
        caller is configured to); skip it on :data:`STAMP_HELD`."""
        last, held = self._last.get(topic), self._held.pop(topic, None)
        if last is None:
            self._last[topic] = stamp_sec
            return STAMP_OK
        on_timeline = last - self.jitter_sec <= stamp_sec <= last + self.max_jump_sec
        if held is not None:
            if on_timeline:
                self.num_outliers += 1
            else:
                self._last[topic] = stamp_sec
                return STAMP_JUMPED_BACK if stamp_sec < last else STAMP_JUMPED_AHEAD
        elif not on_timeline:
            self._held[topic] = stamp_sec
            return STAMP_HELD
        self._last[topic] = max(last, stamp_sec)
        return STAMP_OK

    def topic_stamps(self) -> dict:
        """{topic: its newest stamp, seconds} (a copy)."""
        return dict(self._last)

    def last_stamp_sec(self) -> Optional[float]:
        """Newest stamp of any topic (None before the first frame)."""
        return max(self._last.values()) if self._last else None

    def reset(self) -> None:
        self._last.clear()
        self._held.clear()
