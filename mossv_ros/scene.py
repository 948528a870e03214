"""A procedurally generated camera clip, so the demo needs nothing outside the package.

Coloured shapes on a plain background that appear, move and change colour; seeded and
deterministic. Frames are RGB uint8 (height, width, 3).
"""
import numpy as np

COLOURS = {'red': (220, 40, 40), 'green': (40, 180, 60), 'blue': (40, 80, 220),
           'yellow': (230, 210, 40)}


def render_frame(t_sec: float, width: int = 320, height: int = 240, seed: int = 0) -> np.ndarray:
    """The scene at time ``t_sec`` (seconds): a circle and, after 4 s, a square."""
    import cv2

    rng = np.random.default_rng(seed)
    background = tuple(int(c) for c in rng.integers(200, 240, size=3))
    frame = np.full((height, width, 3), background, dtype=np.uint8)
    names = list(COLOURS)
    circle_colour = COLOURS[names[int(t_sec // 6) % len(names)]]
    cx = int(width * (0.2 + 0.6 * (0.5 + 0.5 * np.sin(t_sec * 0.7))))
    cv2.circle(frame, (cx, height // 2), height // 6, circle_colour, -1)
    if t_sec >= 4.0:
        side = height // 5
        x = int(width * 0.7)
        cv2.rectangle(frame, (x, 20), (x + side, 20 + side), COLOURS['blue'], -1)
    return frame


def scene_clip(duration_sec: float, fps: float = 10.0, **kwargs):
    """Yield (t_sec, frame) pairs for ``duration_sec`` seconds at ``fps``."""
    n = int(duration_sec * fps)
    for i in range(n):
        t = i / fps
        yield t, render_frame(t, **kwargs)
