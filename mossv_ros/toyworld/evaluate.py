"""``mossv-ros toyworld eval``: score a model on held-out toyworld episodes.

Episodes are streamed through :class:`~mossv_ros.engine.engine.StreamingEngine` as the node
does (frames at 1 fps with their stamps, questions between frames), paced so that each frame is
consumed before the next arrives; the resulting utterances are scored against the episode's
ground truth (:func:`~mossv_ros.toyworld.world.speech_frames`), StreamingBench-style: an update
counts only if it comes within ``WINDOW`` frames of the change.

Metrics (all fractions in [0, 1]):

* ``answer_accuracy[qtype]``: the first utterance after a question has the expected text and
  comes within the window of the frame it is due (for "tell me when" with the shape absent,
  staying silent until it appears is the answer);
* ``revision_recall``: changes relevant to the active question followed by the expected update
  within ``WINDOW`` frames; ``revision_latency_frames``: mean frames from change to update;
  ``revision_recall_by_change``: the same per kind of change (:func:`change_kind`);
* ``false_speak_rate``: quiet frames (nothing due at this or the ``WINDOW`` previous frames)
  where the model speaks; ``silence_recall``: frames where the truth is silent and the model is.
"""
from dataclasses import dataclass
import json
from pathlib import Path
from typing import Dict, Iterable, List, Sequence, Tuple

from .world import Episode, EVAL_SEED_BASE, make_episode, QTYPES, speech_frames

#: StreamingBench proactive-output window: an update counts within this many frames.
WINDOW = 2
EVAL_FRAMES = 40


@dataclass
class Utterance:
    """One thing the model said: ``frame`` = index of the newest frame it was conditioned on."""

    frame: int
    text: str


def utterances(answers: Iterable[Tuple[int, int, int, bool, str]]) -> List[Utterance]:
    """One :class:`Utterance` per thing said, from answers in emit order.

    :param answers: (frame, round_id, revision, is_final, text) per ``AnswerEvent`` or
        ``mossv_ros/Answer``. Empty texts are dropped, and so is a round's closing answer,
        which repeats its last revision (``is_final`` with a round and revision seen before).
    """
    out, seen = [], set()
    for frame, round_id, revision, is_final, text in answers:
        if not text or (is_final and (round_id, revision) in seen):
            continue
        seen.add((round_id, revision))
        out.append(Utterance(frame, text))
    return out


def eval_episodes(n: int, seed_base: int = EVAL_SEED_BASE,
                  num_frames: int = EVAL_FRAMES) -> List[Episode]:
    """Held-out, seeded episodes (no interruptions)."""
    return [make_episode(seed_base + i, num_frames=num_frames) for i in range(n)]


def change_kind(qtype: str, kind: str, state) -> str:
    """What a revision reports: ``'recolour'`` (the asked shape has a new colour),
    ``'gone'`` (the asked shape left), ``'count'`` or ``'appear'`` (a "tell me when")."""
    if qtype == 'colour':
        return 'recolour' if kind in state else 'gone'
    return 'count' if qtype == 'count' else 'appear'


def score(episodes: Sequence[Episode], said: Sequence[Sequence[Utterance]]) -> dict:
    """Score utterances per episode against the ground truth; see the module docstring."""
    answers = {q: [0, 0] for q in QTYPES}
    rev_hits, rev_total, latencies = 0, 0, []
    by_change: Dict[str, List[int]] = {}  # kind of change -> [hits, total]
    quiet, false_speak, silent_truth, silent_ok = 0, 0, 0, 0
    for ep, utts in zip(episodes, said):
        spoken: Dict[int, str] = {}
        for u in utts:
            spoken.setdefault(u.frame, u.text.strip())
        truth = dict(speech_frames(ep))
        questions = [q for q in ep.questions if not q.interrupt]
        for i, q in enumerate(questions):
            end = questions[i + 1].after_frame if i + 1 < len(questions) else ep.num_frames - 1
            due = [(t, text) for t, (qq, text, _) in sorted(truth.items()) if qq is q]
            first_said = next(((t, spoken[t]) for t in range(q.after_frame + 1, end + 1)
                               if t in spoken), None)
            answers[q.qtype][1] += 1
            if not due:  # e.g. the awaited shape never appeared: staying silent is right
                answers[q.qtype][0] += first_said is None
                continue
            t_due, text = due[0]
            ok = (first_said is not None and first_said[1] == text
                  and t_due <= first_said[0] <= t_due + WINDOW)
            answers[q.qtype][0] += ok
            for t_change, text in due[1:]:
                rev_total += 1
                hit = next((t for t in range(t_change, min(t_change + WINDOW, end) + 1)
                            if spoken.get(t) == text), None)
                tally = by_change.setdefault(change_kind(q.qtype, q.kind, ep.states[t_change]),
                                             [0, 0])
                tally[1] += 1
                if hit is not None:
                    rev_hits += 1
                    tally[0] += 1
                    latencies.append(hit - t_change)
        for t in range(ep.num_frames):
            if t not in truth:
                silent_truth += 1
                silent_ok += t not in spoken
            if not any(t - d in truth for d in range(WINDOW + 1)):
                quiet += 1
                false_speak += t in spoken
    total_q = sum(v[1] for v in answers.values())
    return {
        'episodes': len(episodes),
        'questions': total_q,
        'answer_accuracy': {k: (v[0] / v[1] if v[1] else None) for k, v in answers.items()},
        'answer_accuracy_all': sum(v[0] for v in answers.values()) / max(1, total_q),
        'revisions': rev_total,
        'revision_recall': rev_hits / rev_total if rev_total else None,
        'revision_latency_frames': (sum(latencies) / len(latencies)) if latencies else None,
        'revision_recall_by_change': {k: {'hits': h, 'changes': n}
                                      for k, (h, n) in sorted(by_change.items())},
        'quiet_frames': quiet,
        'false_speak_rate': false_speak / quiet if quiet else None,
        'silence_recall': silent_ok / silent_truth if silent_truth else None,
    }


def meets_targets(metrics: dict) -> Dict[str, bool]:
    """The issue's targets: answer accuracy >= 0.9, revisions within the window >= 0.9,
    false-speak rate <= 0.05."""
    return {'answer_accuracy': metrics['answer_accuracy_all'] >= 0.9,
            'revision_recall': (metrics['revision_recall'] or 0.0) >= 0.9,
            'false_speak_rate': (metrics['false_speak_rate'] or 0.0) <= 0.05}


def stream_episode(engine, episode: Episode, stamp_base: float = 0.0,
                   timeout: float = 30.0) -> List[Utterance]:
    """Stream one episode through a started engine (fresh session) and collect utterances.

    Frame t is stamped ``stamp_base + t`` seconds (1 fps); questions are submitted between
    frames. :raises RuntimeError: the engine did not become idle within ``timeout``.
    """
    camera = engine.config.cameras[0]
    return stream_episodes(engine, {camera: episode}, stamp_base, timeout)[camera]


def stream_episodes(engine, episodes: Dict[str, Episode], stamp_base: float = 0.0,
                    timeout: float = 30.0) -> Dict[str, List[Utterance]]:
    """Stream episodes at once, one per camera of a started engine (fresh sessions), and
    collect each camera's utterances: frame t of every camera arrives together
    (``submit_frames``), then the questions, each batch consumed before the next.

    :param episodes: {camera: episode}. Frame t is stamped ``stamp_base + t`` seconds.
    :raises RuntimeError: the engine did not become idle within ``timeout``, or a question
        was rejected.
    """
    from ..engine.events import AnswerEvent, Frame

    asked = {cam: {q.after_frame: q for q in ep.questions if not q.interrupt}
             for cam, ep in episodes.items()}
    answers = {cam: [] for cam in episodes}  # (frame, round_id, revision, is_final, text)

    def drain():
        for ev in engine.poll_events():
            # (a reset ends the previous episode's round: its closing event is older)
            if isinstance(ev, AnswerEvent) and ev.camera in answers \
                    and ev.source.stamp is not None and ev.source.stamp >= stamp_base:
                answers[ev.camera].append((int(round(ev.source.stamp - stamp_base)),
                                           ev.round_id, ev.revision, ev.is_final, ev.text))

    def idle():
        if not engine.wait_idle(timeout):
            raise RuntimeError(f'engine not idle after {timeout} s (state {engine.state})')

    for t in range(max(ep.num_frames for ep in episodes.values())):
        stamp = stamp_base + t
        engine.submit_frames([(Frame(ep.frame(t), stamp=stamp), stamp, cam)
                              for cam, ep in episodes.items() if t < ep.num_frames])
        idle()
        questions = [(cam, qs[t]) for cam, qs in asked.items() if t in qs]
        for cam, q in questions:
            ok, _, message = engine.submit_question(q.text, camera=cam)
            if not ok:
                raise RuntimeError(f'question rejected: {message}')
        if questions:
            idle()
        drain()
    drain()
    return {cam: utterances(a) for cam, a in answers.items()}


def evaluate(model_dir: Path, episodes: Sequence[Episode]) -> Tuple[dict, list]:
    """Load ``model_dir`` in an engine and score it on ``episodes``.

    :returns: (metrics, utterances per episode as lists of (frame, text)).
    """
    from ..engine.config import EngineConfig
    from ..engine.engine import StreamingEngine

    config = EngineConfig(model_path=str(model_dir), device='cpu', dtype='float32',
                          round_close_after_frames=0, round_close_after_sec=0.0)
    engine = StreamingEngine(config)
    engine.start()
    try:
        if not engine.wait_ready(120):
            raise RuntimeError(f'engine failed to start: {engine.stats().last_error}')
        said = []
        for i, ep in enumerate(episodes):
            if i:
                engine.reset('next episode')
                engine.wait_idle()
            said.append(stream_episode(engine, ep, stamp_base=1000.0 * (i + 1)))
    finally:
        engine.stop()
    metrics = score(episodes, said)
    return metrics, [[(u.frame, u.text) for u in s] for s in said]


def write_report(path: Path, metrics: dict, said) -> None:
    path.write_text(json.dumps({'metrics': metrics, 'targets': meets_targets(metrics),
                                'utterances': said}, indent=1))
