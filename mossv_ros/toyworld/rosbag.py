"""Toyworld episodes as a rosbag2, and scoring of the assistant's published Answers.

Episode i's frame t is stamped ``start + i * (frames + EPISODE_GAP_SEC) + t`` seconds (1 fps);
a question asked after frame t is stamped 0.9 s later (just before frame t + 1, so a
node that keeps up has finished speaking about frame t). The gap between episodes makes a
node run with ``frames.reset_after_gap_sec`` < ``EPISODE_GAP_SEC`` start a fresh session for
each episode, as the in-process evaluation does.
"""
from typing import List, Sequence, Tuple

from ..bag import BagSummary, from_frames
from .evaluate import Utterance, utterances
from .world import Episode

#: Seconds of camera silence between two episodes in a bag.
EPISODE_GAP_SEC = 6.0
#: The first frame's stamp (ns): a fixed, recognisable epoch (2026-01-01T00:00:00Z).
START_NS = 1_767_225_600 * 1_000_000_000


def episode_starts(episodes: Sequence[Episode]) -> List[float]:
    """Seconds from the bag start to each episode's frame 0."""
    starts, t = [], 0.0
    for ep in episodes:
        starts.append(t)
        t += ep.num_frames + EPISODE_GAP_SEC
    return starts


def write_episodes_bag(episodes: Sequence[Episode], out_bag: str, storage: str = 'mcap',
                       image_topic: str = '/image',
                       question_topic: str = '/mossv_assistant/question') -> BagSummary:
    """Write the episodes' frames (bgr8 Image) and questions to a new bag."""
    starts = episode_starts(episodes)

    def frames():
        for start, ep in zip(starts, episodes):
            for t in range(ep.num_frames):
                yield start + t, ep.frame(t)[:, :, ::-1]  # RGB -> BGR (bgr8)

    questions = [(start + q.after_frame + 0.9, q.text) for start, ep in zip(starts, episodes)
                 for q in ep.questions if not q.interrupt]
    return from_frames(frames(), out_bag, questions, storage=storage, image_topic=image_topic,
                       question_topic=question_topic, frame_id='toyworld',
                       start_ns=START_NS)


def utterances_from_answers(episodes: Sequence[Episode],
                            answers: Sequence[Tuple[int, int, int, bool, str]]
                            ) -> List[List[Utterance]]:
    """Map published Answers to (episode, frame) utterances.

    :param answers: (stamp ns, round_id, revision, is_final, text) per ``mossv_ros/Answer``,
        in publish order; the stamp is the newest frame's (copied from the input image).
    :returns: utterances per episode (:func:`.evaluate.utterances`), as the in-process
        evaluation collects them.
    """
    starts = episode_starts(episodes)
    per_episode: List[list] = [[] for _ in episodes]
    for stamp_ns, round_id, revision, is_final, text in answers:
        sec = (stamp_ns - START_NS) * 1e-9
        index = max(i for i, s in enumerate(starts) if s <= sec + 1e-6)
        frame = int(round(sec - starts[index]))
        per_episode[index].append((frame, round_id, revision, is_final, text))
    return [utterances(a) for a in per_episode]
