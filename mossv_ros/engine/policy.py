"""Pure scheduling helpers (no torch, no rclpy): frame subsampling and prompt validation."""
import math
from typing import Optional, Tuple
import unicodedata


class FrameRateLimiter:
    """Keep frames at most ``rate_hz`` apart in stamp time (moss-model.md section 7.3).

    Uses the frames' own stamps (camera or sim time), so a bag replayed faster than real time
    is subsampled exactly as live. A stamp that jumps backwards restarts the limiter.
    """

    def __init__(self, rate_hz: float, tolerance: float = 0.05) -> None:
        self.period_sec = 1.0 / rate_hz
        self.tolerance = tolerance
        self.last_sec: Optional[float] = None

    def accept(self, stamp_sec: float) -> bool:
        """True if a frame stamped ``stamp_sec`` (seconds) should be fed to the model."""
        if not math.isfinite(stamp_sec):
            return False
        if self.last_sec is None or stamp_sec < self.last_sec:
            self.last_sec = stamp_sec
            return True
        if stamp_sec - self.last_sec >= self.period_sec * (1.0 - self.tolerance):
            self.last_sec = stamp_sec
            return True
        return False

    def reset(self) -> None:
        self.last_sec = None


def validate_prompt(text, max_chars: int) -> Tuple[bool, str, str]:
    """Check a user question.

    :returns: (ok, cleaned text, reason). Control characters other than newline and tab are
        removed; empty or whitespace-only prompts and prompts over ``max_chars`` characters
        are rejected (never truncated, so nothing the user asked is silently lost).
    """
    if not isinstance(text, str):
        return False, '', f'prompt must be a string, got {type(text).__name__}'
    cleaned = ''.join(ch for ch in text if ch in '\n\t' or (ord(ch) >= 32 and ord(ch) != 127))
    cleaned = cleaned.strip()
    # zero-width and other format characters (Unicode category Cf) say nothing either
    if not any(not ch.isspace() and unicodedata.category(ch) != 'Cf' for ch in cleaned):
        return False, '', 'prompt is empty or whitespace only'
    if len(cleaned) > max_chars:
        return False, '', f'prompt has {len(cleaned)} characters, limit is {max_chars}'
    return True, cleaned, 'accepted'


#: Longest accepted ``request_id``, characters: it is echoed on every Token of the round.
MAX_REQUEST_ID_CHARS = 256


def validate_request_id(request_id) -> Tuple[bool, str]:
    """Check a caller's ``request_id``. :returns: (ok, reason)."""
    if not isinstance(request_id, str):
        return False, f'request_id must be a string, got {type(request_id).__name__}'
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        return False, (f'request_id has {len(request_id)} characters, limit is '
                       f'{MAX_REQUEST_ID_CHARS} (it is echoed on every Token)')
    return True, 'accepted'
