"""Toyworld: a procedural streaming world and its real-time QA transcripts.

A few coloured shapes (at most one of each kind) on a plain background appear, disappear, move
and change colour, at 1 frame per second, 112x112 px RGB frames (the tiny configuration of
docs/model.md section 9). Everything is seeded and deterministic.

Questions are asked between frames. The ground truth follows the MOSS real-time grammar
(docs/model.md section 5.4): after a question the reply starts with ``<|silence|>`` and the
answer is spoken at the next frame; later, when the answer changes, the model speaks an update
("Now ...", a revision) at the frame that shows the change; every other frame gets
``<|silence|>``.
"""
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

#: Frame side in pixels (the tiny config's vision ``image_size``).
FRAME_PX = 112
KINDS = ('circle', 'square', 'triangle')
COLOURS: Dict[str, Tuple[int, int, int]] = {
    'red': (220, 40, 40), 'green': (40, 170, 60), 'blue': (40, 80, 230),
    'yellow': (235, 205, 30)}
#: Question types scored separately by the evaluation.
QTYPES = ('colour', 'count', 'when')
#: Cell centres: the four quadrants (one shape per quadrant, so shapes never overlap).
CELLS = ((28, 28), (84, 28), (28, 84), (84, 84))
NUMBERS = ('no', 'one', 'two', 'three')
#: Episode seeds >= this are held out for evaluation; training uses seeds below it.
EVAL_SEED_BASE = 1_000_000


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    cell: int
    dx: int = 0
    dy: int = 0
    size: int = 17


@dataclass
class QuestionAt:
    """A question asked right after frame ``after_frame``.

    :ivar interrupt: asked while the answer of frame ``after_frame`` is being spoken (training
        transcripts only): that utterance is cut and the new reply starts at once.
    """

    after_frame: int
    qtype: str
    kind: str = ''
    interrupt: bool = False

    @property
    def text(self) -> str:
        return question_text(self.qtype, self.kind)


@dataclass
class Episode:
    """States (one per frame) and questions of a seeded episode."""

    seed: int
    background: Tuple[int, int, int]
    states: List[Dict[str, Shape]]
    questions: List[QuestionAt] = field(default_factory=list)

    @property
    def num_frames(self) -> int:
        return len(self.states)

    def frame(self, t: int) -> np.ndarray:
        """Frame ``t`` as RGB uint8 (112, 112, 3)."""
        return render(self.states[t], self.background)

    def frames(self) -> List[np.ndarray]:
        return [self.frame(t) for t in range(self.num_frames)]


def camera_frames(num_frames: int, width: int = 320, height: int = 240, seed: int = 0):
    """``num_frames`` frames of a toyworld episode as a camera of ``width`` x ``height`` px
    would deliver them (RGB uint8 (height, width, 3), one world state per frame, scaled with
    nearest-neighbour so edges stay sharp): input of realistic size for the benchmarks and
    ``mossv-ros demo --scene``."""
    import cv2

    episode = make_episode(seed, num_frames=num_frames)
    return [cv2.resize(episode.frame(t), (width, height), interpolation=cv2.INTER_NEAREST)
            for t in range(num_frames)]


def question_text(qtype: str, kind: str = '') -> str:
    if qtype == 'colour':
        return f'What colour is the {kind}?'
    if qtype == 'count':
        return 'How many shapes are there?'
    if qtype == 'when':
        return f'Tell me when a {kind} appears.'
    raise ValueError(f'unknown question type {qtype!r}')


def render(state: Dict[str, Shape], background=(220, 220, 220)) -> np.ndarray:
    """Draw the shapes (opencv, no anti-aliasing) on a plain background. A shape of size r
    fills: square 2r x 2r, circle radius r, triangle base 2r and height 1.8r, so their areas
    differ (4, 3.1 and 1.8 r^2) as well as their outlines."""
    import cv2

    img = np.empty((FRAME_PX, FRAME_PX, 3), dtype=np.uint8)
    img[:] = background
    for shape in state.values():
        cx, cy = CELLS[shape.cell]
        cx, cy, r = cx + shape.dx, cy + shape.dy, shape.size
        colour = COLOURS[shape.colour]
        if shape.kind == 'circle':
            cv2.circle(img, (cx, cy), r, colour, -1)
        elif shape.kind == 'square':
            cv2.rectangle(img, (cx - r, cy - r), (cx + r, cy + r), colour, -1)
        else:
            pts = np.array([[cx, cy - r], [cx - r, cy + int(r * 0.8)],
                            [cx + r, cy + int(r * 0.8)]], np.int32)
            cv2.fillPoly(img, [pts], colour)
    return img


def _new_shape(rng, kind: str, cell: int, colour: Optional[str] = None) -> Shape:
    colour = colour or str(rng.choice(list(COLOURS)))
    return Shape(kind, colour, cell, int(rng.integers(-3, 4)), int(rng.integers(-3, 4)),
                 int(rng.integers(19, 23)))


def make_episode(seed: int, num_frames: int = 40, event_prob: float = 0.3,
                 question_gap: Tuple[int, int] = (5, 11), interrupt_prob: float = 0.0,
                 qtype_p: Optional[Tuple[float, float, float]] = None,
                 event_p: Optional[Tuple[float, float, float, float]] = None) -> Episode:
    """A seeded episode: per second, with ``event_prob``, one shape appears, disappears, moves
    or changes colour; questions every ``question_gap`` frames (uniform, inclusive).

    :param interrupt_prob: chance that a question lands while an answer is being spoken
        (training transcripts exercise interruptions; evaluation episodes use 0).
    :param qtype_p: probabilities of the question types in :data:`QTYPES` order (default
        uniform).
    :param event_p: relative weights (>= 0) of appear, disappear, move and recolour, among the
        events possible in the current state (uniform when all of those weigh 0); default:
        uniform (the evaluation episodes use the default).
    """
    rng = np.random.default_rng(seed)
    background = tuple(int(c) for c in rng.integers(200, 236, size=3))
    state: Dict[str, Shape] = {}
    free = list(range(4))
    for kind in rng.permutation(KINDS)[:int(rng.integers(1, 3))]:
        cell = free.pop(int(rng.integers(len(free))))
        state[str(kind)] = _new_shape(rng, str(kind), cell)
    states = [dict(state)]
    for _ in range(1, num_frames):
        if rng.random() < event_prob:
            state = _event(rng, dict(state), event_p)
        states.append(dict(state))
    episode = Episode(seed, background, states)
    t = int(rng.integers(1, 5))
    while t < num_frames - 2:
        qtype = str(rng.choice(QTYPES, p=qtype_p))
        kind = str(rng.choice(KINDS)) if qtype != 'count' else ''
        if qtype == 'when' and kind in states[t] and rng.random() < 0.7:
            absent = [k for k in KINDS if k not in states[t]]
            kind = str(rng.choice(absent)) if absent else kind
        episode.questions.append(QuestionAt(t, qtype, kind))
        t += int(rng.integers(question_gap[0], question_gap[1] + 1))
    if interrupt_prob:
        spoken = {frame for frame, _ in speech_frames(episode)}
        for q in episode.questions:
            if q.after_frame in spoken and rng.random() < interrupt_prob:
                q.interrupt = True
    return episode


EVENTS = ('appear', 'disappear', 'move', 'recolour')


def _event(rng, state: Dict[str, Shape], event_p=None) -> Dict[str, Shape]:
    present = list(state)
    absent = [k for k in KINDS if k not in state]
    options = (['appear'] * bool(absent)) + (['disappear', 'move', 'recolour'] * bool(present))
    if event_p is None:
        kind_of_event = str(rng.choice(options))
    else:
        w = np.array([event_p[EVENTS.index(o)] for o in options], float)
        if w.sum() <= 0:  # none of the weighted events is possible here: any possible one
            w = np.ones(len(options))
        kind_of_event = str(rng.choice(options, p=w / w.sum()))
    if kind_of_event == 'appear':
        kind = str(rng.choice(absent))
        used = {s.cell for s in state.values()}
        cell = int(rng.choice([c for c in range(4) if c not in used]))
        state[kind] = _new_shape(rng, kind, cell)
        return state
    kind = str(rng.choice(present))
    old = state[kind]
    if kind_of_event == 'disappear':
        del state[kind]
    elif kind_of_event == 'move':
        used = {s.cell for s in state.values()}
        cell = int(rng.choice([c for c in range(4) if c not in used]))
        state[kind] = _new_shape(rng, kind, cell, old.colour)
    else:
        colour = str(rng.choice([c for c in COLOURS if c != old.colour]))
        state[kind] = Shape(kind, colour, old.cell, old.dx, old.dy, old.size)
    return state


# ---------------------------------------------------------------- ground truth
def _value(qtype: str, kind: str, state: Dict[str, Shape]):
    if qtype == 'colour':
        return state[kind].colour if kind in state else None
    if qtype == 'count':
        return len(state)
    return kind in state


def answer_text(qtype: str, kind: str, state: Dict[str, Shape], revision: bool,
                was_present: bool = False) -> Optional[str]:
    """What the assistant says about ``state``; None = stay silent.

    :param revision: an update after a change ("Now ...") rather than the first answer.
    :param was_present: for 'when': the shape was already there when the question was asked.
    """
    now = 'Now t' if revision else 'T'
    if qtype == 'colour':
        if kind in state:
            return f'{now}he {kind} is {state[kind].colour}.'
        return f'{now}here is no {kind}.'
    if qtype == 'count':
        n = len(state)
        if n == 1:
            return f'{now}here is one shape.'
        return f'{now}here are {NUMBERS[n]} shapes.'
    if kind not in state:
        return None
    if was_present and not revision:
        return f'The {kind} is already here.'
    return f'A {kind} appeared.'


def speech_frames(episode: Episode):
    """Yield (frame, (question, text, is_revision)) for every frame where the assistant speaks.

    The answer to a question asked after frame a is spoken at frame a + 1 (the reply waits for
    the next frame, docs/model.md section 5.4); an interrupting question is answered at once,
    at frame a. Later frames where the answer's value changes get a revision.
    """
    by_frame = {q.after_frame: q for q in episode.questions}
    active: Optional[QuestionAt] = None
    answer_due = -1
    was_present = False
    for t, state in enumerate(episode.states):
        q = by_frame.get(t - 1)
        if q is not None and not q.interrupt:
            active, answer_due = q, t
            was_present = q.qtype == 'when' and q.kind in episode.states[t - 1]
        if active is None:
            continue
        if t == answer_due:
            text = answer_text(active.qtype, active.kind, state, False, was_present)
            if text:
                yield t, (active, text, False)
        elif _value(active.qtype, active.kind, state) != _value(
                active.qtype, active.kind, episode.states[t - 1]):
            text = answer_text(active.qtype, active.kind, state, True)
            if text:
                yield t, (active, text, True)
        q_now = by_frame.get(t)
        if q_now is not None and q_now.interrupt:
            active, answer_due = q_now, -1
            was_present = q_now.qtype == 'when' and q_now.kind in state
