"""``~/overlay``: each frame the model took, with what it is saying drawn on it.

The picture is the frame as received (what the model saw before the 1-tile letterbox),
scaled to :data:`WIDTH_PX` wide, with a band below it: frame index, round and revision, the
round's question and the text being spoken (or "silent"). Rendering runs on a thread of its
own, latest frame wins, and only while someone subscribes: the engine thread never waits
for it and decoding pays nothing when nobody looks.
"""
from dataclasses import dataclass
import queue
import textwrap
import threading
from typing import Optional

import cv2
import numpy as np

#: width of the published overlay, pixels (the band's text stays legible for any camera)
WIDTH_PX = 640
_FONT = cv2.FONT_HERSHEY_SIMPLEX
_LINE_PX = 22


@dataclass
class OverlayText:
    """What the overlay says (a snapshot taken on the executor thread)."""

    frame_index: int = -1
    round_id: int = 0
    revision: int = 0
    question: str = ''
    text: str = ''  # the utterance being spoken or just finished; '' = silent


def render_overlay(rgb: np.ndarray, say: OverlayText) -> np.ndarray:
    """The overlay picture.

    :param rgb: the frame, RGB uint8 (H, W, 3).
    :param say: what to draw.
    :returns: RGB uint8 (H', WIDTH_PX, 3): the frame scaled to WIDTH_PX wide, then the band.
    """
    h, w = rgb.shape[:2]
    height = max(1, round(h * WIDTH_PX / w))
    frame = cv2.resize(np.ascontiguousarray(rgb), (WIDTH_PX, height),
                       interpolation=cv2.INTER_AREA if w > WIDTH_PX else cv2.INTER_LINEAR)
    chars = WIDTH_PX // 11
    head = f'frame {say.frame_index}'
    if say.round_id:
        head += f' | round {say.round_id} | ' + ('answer' if say.revision == 0
                                                 else f'revision {say.revision}')
    lines = [head]
    if say.question:
        lines += textwrap.wrap('Q: ' + say.question, chars)[:2]
    lines += textwrap.wrap('A: ' + say.text, chars)[:4] if say.text else ['(silent)']
    band = np.full((_LINE_PX * len(lines) + 12, WIDTH_PX, 3), 24, np.uint8)
    for i, line in enumerate(lines):
        color = (255, 220, 90) if i == 0 else (240, 240, 240)
        cv2.putText(band, line.encode('ascii', 'replace').decode(), (8, 20 + i * _LINE_PX),
                    _FONT, 0.55, color, 1, cv2.LINE_AA)
    return np.concatenate([frame, band], axis=0)


class OverlayState:
    """What ``~/overlay`` says, kept current from the engine's events (on the executor
    thread): the round's question, the text being spoken, the newest frame taken."""

    def __init__(self) -> None:
        self.say = OverlayText()
        self.frame = None  # the newest FrameEvent

    def update(self, event):
        """Follow one engine event. :returns: (frame event, a snapshot of the text) when a
        picture is due (a frame went into the cache, or an utterance ended), else None."""
        from ..engine import events as ev
        say = self.say
        if isinstance(event, ev.RoundEvent) and event.kind == 'started':
            self.say = say = OverlayText(say.frame_index, event.round_id, 0, event.question)
        elif isinstance(event, ev.TokenEvent):
            if event.revision != say.revision or event.round_id != say.round_id:
                say.text = ''
            say.round_id, say.revision = event.round_id, event.revision
            say.text += event.text
        elif isinstance(event, ev.SilenceEvent) and event.is_silent:
            say.text = ''
        elif isinstance(event, ev.RoundEvent) and event.kind == 'ended':
            self.say = say = OverlayText(say.frame_index)
        if isinstance(event, ev.FrameEvent):
            say.frame_index = event.source.frame_index
            self.frame = event
        if self.frame is not None and isinstance(event, (ev.FrameEvent, ev.AnswerEvent)):
            return self.frame, OverlayText(**vars(say))
        return None


class OverlayPublisher:
    """Renders and publishes overlay pictures on a thread of its own (latest wins).

    :param publisher: an rclpy publisher of ``sensor_msgs/Image`` (``~/overlay``).
    """

    def __init__(self, publisher) -> None:
        self._pub = publisher
        self._queue: 'queue.Queue' = queue.Queue(maxsize=1)
        self._stop = threading.Event()
        self.num_published = 0
        #: what the overlay shows: the newest frame and the round's text
        self.state = OverlayState()
        self._thread = threading.Thread(target=self._run, name='mossv-overlay', daemon=True)
        self._thread.start()

    def wanted(self) -> bool:
        """Someone subscribes (nothing is rendered otherwise)."""
        return self._pub.get_subscription_count() > 0

    def show(self, event) -> None:
        """An engine event of the default camera: a new picture when it changes what is
        shown and someone looks."""
        picture = self.state.update(event)
        if picture is not None and self.wanted():
            from .convert import header_of
            frame, say = picture
            self.submit(frame.image, header_of(frame.source), say)

    def submit(self, rgb: np.ndarray, header, say: OverlayText) -> None:
        """Queue a picture (replacing one not yet rendered); never blocks."""
        try:
            self._queue.get_nowait()
        except queue.Empty:
            pass
        try:
            self._queue.put_nowait((rgb, header, say))
        except queue.Full:
            pass

    def close(self, timeout: Optional[float] = 1.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        from sensor_msgs.msg import Image
        while not self._stop.is_set():
            try:
                rgb, header, say = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            picture = render_overlay(rgb, say)
            msg = Image(height=picture.shape[0], width=picture.shape[1], encoding='rgb8',
                        step=picture.shape[1] * 3, data=picture.tobytes())
            msg.header = header
            try:
                self._pub.publish(msg)
                self.num_published += 1
            except Exception:  # noqa: BLE001 - the context is shutting down
                return
