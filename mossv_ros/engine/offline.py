"""Offline mode: answer one question about a whole video file or a set of images.

What upstream's ``offline_generate`` does (docs/model.md section 6.3), without its memory
blow-up: frames are sampled at ``video_fps`` (clamped to ``[min_frames, max_frames]``, uniform
when the count falls outside, section 5.2), encoded ``chunk_frames`` at a time (section 4.7) and
only the 8-head cross K/V of each frame is kept (section 3). The prompt is the offline SFT
format (section 5.2): BOS + system block + user turn ``<|image|>`` x N + question + assistant
header; each ``<|image|>`` token's position is its frame's RoPE position (section 4.4).

This is also the "re-encode everything after the question" baseline of the benchmarks.
"""
from dataclasses import dataclass, field
import time
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from . import prompt as grammar
from .config import SamplingConfig
from .sampling import Sampler

#: Offline system prompt used by upstream's benchmark script (docs/model.md section 5.2).
OFFLINE_SYSTEM_PROMPT = ('You are a helpful AI assistant specializing in video analysis. '
                         "Respond to the user's request based on the provided video content.")


@dataclass
class OfflineResult:
    """Outcome of :func:`offline_generate`.

    :ivar text: the answer, special tokens removed.
    :ivar token_ids: generated ids (the stop token excluded).
    :ivar stop_reason: ``'eot'``, ``'silence'`` or ``'max_new_tokens'``.
    :ivar num_frames: frames the prompt carried.
    :ivar encode_s: seconds spent in the vision path (all chunks).
    :ivar ttft_s: seconds from the call to the first sampled token (encode + prefill + sample).
    :ivar total_s: seconds for the whole call.
    """

    text: str
    token_ids: List[int]
    stop_reason: str
    num_frames: int
    encode_s: float
    ttft_s: float
    total_s: float
    first_logits: Optional[torch.Tensor] = field(default=None, repr=False)


def sample_indices(num_source: int, source_fps: float, video_fps: float = 1.0,
                   min_frames: int = 8, max_frames: int = 256) -> List[int]:
    """Indices of the frames to keep from a clip of ``num_source`` frames at ``source_fps``.

    ``round(duration * video_fps)`` frames, clamped to ``[min_frames, max_frames]`` and never
    more than the clip has, spread uniformly over the clip (docs/model.md section 5.2,
    ``mm_plugin.py:99-139``).

    :raises ValueError: an empty clip or non-positive rates.
    """
    if num_source <= 0:
        raise ValueError('the video has no frames')
    if source_fps <= 0 or video_fps <= 0:
        raise ValueError(f'frame rates must be positive (source {source_fps}, '
                         f'sample {video_fps})')
    wanted = int(round(num_source / source_fps * video_fps))
    count = max(1, min(num_source, max(min_frames, min(max_frames, wanted))))
    return np.linspace(0, num_source - 1, count).round().astype(int).tolist()


def read_video(path: str, video_fps: float = 1.0, min_frames: int = 8,
               max_frames: int = 256) -> Tuple[List[np.ndarray], List[float]]:
    """Decode a video file with OpenCV and sample frames per :func:`sample_indices`.

    Two passes, so memory is bounded by the sampled frames whatever the clip's length: the
    first counts the frames (``grab()``, nothing kept: the container's frame count is
    unreliable), the second keeps only the sampled ones (``retrieve()``).

    :returns: (RGB uint8 frames of shape (H, W, 3), their times in seconds).
    :raises ValueError: the file cannot be opened or has no frames.
    """
    import cv2

    def open_capture():
        cap = cv2.VideoCapture(str(path))
        if not cap.isOpened():
            raise ValueError(f'cannot open video {path}')
        return cap

    cap = open_capture()
    try:
        source_fps = cap.get(cv2.CAP_PROP_FPS) or 30.0
        num_source = 0
        while cap.grab():
            num_source += 1
    finally:
        cap.release()
    keep = sample_indices(num_source, source_fps, video_fps, min_frames, max_frames)
    wanted, frames = set(keep), []
    cap = open_capture()
    try:
        for index in range(keep[-1] + 1):
            if not cap.grab():
                break
            if index in wanted:
                ok, bgr = cap.retrieve()
                if ok:
                    frames.append((index, np.ascontiguousarray(bgr[:, :, ::-1])))
    finally:
        cap.release()
    if not frames:
        raise ValueError(f'no frame of {path} could be decoded')
    return [f for _, f in frames], [i / source_fps for i, _ in frames]


def offline_prompt_text(question: str, num_frames: int,
                        system_prompt: str = OFFLINE_SYSTEM_PROMPT) -> str:
    """The offline SFT prompt with ``num_frames`` ``<|image|>`` tokens (section 5.2)."""
    system = (grammar.header_text('system') + system_prompt + grammar.EOT
              if system_prompt else '')
    return (grammar.BOS + system + grammar.header_text('user') + grammar.IMAGE * num_frames
            + question + grammar.EOT + grammar.header_text('assistant'))


@torch.no_grad()
def offline_generate(runner, question: str, images: Sequence[np.ndarray],
                     sampling: Optional[SamplingConfig] = None, chunk_frames: int = 64,
                     system_prompt: str = OFFLINE_SYSTEM_PROMPT,
                     on_token: Optional[Callable[[str], None]] = None) -> OfflineResult:
    """Answer ``question`` about ``images`` (video frames in order, or still images).

    :param runner: a :class:`~mossv_ros.engine.runner.ModelRunner`.
    :param images: RGB uint8 arrays (H, W, 3); 0 images is a text-only question.
    :param sampling: defaults to greedy with the runner config's ``max_new_tokens``.
    :param chunk_frames: frames per vision forward (section 4.7); bounds activation memory.
    :param on_token: called with each decoded token's text as it is generated.
    :raises ValueError: the question is empty, ``chunk_frames`` < 1, or the prompt does not fit
        the text context budget.
    """
    from .policy import validate_prompt

    ok, question, reason = validate_prompt(question, runner.config.max_prompt_chars)
    if not ok:
        raise ValueError(reason)
    if chunk_frames < 1:
        raise ValueError('chunk_frames must be >= 1')
    sampling = sampling or SamplingConfig(temperature=0.0,
                                          max_new_tokens=runner.config.sampling.max_new_tokens)
    special = runner.special
    t0 = time.perf_counter()
    encoded = []
    for start in range(0, len(images), chunk_frames):
        encoded.extend(runner.encode_frames(images[start:start + chunk_frames]))
    _sync(runner)
    encode_s = time.perf_counter() - t0

    ids = runner.user_text_ids(
        lambda text: offline_prompt_text(text, len(images), system_prompt), question)
    image_offsets = [i for i, t in enumerate(ids) if t == special.image]
    if len(image_offsets) != len(encoded):
        raise ValueError(f'prompt has {len(image_offsets)} <|image|> tokens for '
                         f'{len(encoded)} frames')
    session = runner.new_session(max_frames=max(1, len(encoded)),
                                 max_context_tokens=len(ids) + sampling.max_new_tokens + 8)
    for index, frame in enumerate(encoded):
        frame.frame_index = index
    logits = runner.feed(session, ids, list(zip(image_offsets, encoded)))
    first_logits = logits.detach().float().cpu()
    sampler = Sampler(sampling, [i for i in runner.suppressed_ids() if i != special.eot],
                      runner.vocab_size)
    stops = {special.eot: 'eot', special.silence: 'silence'}
    out: List[int] = []
    ttft = None
    reason = 'max_new_tokens'
    for _ in range(sampling.max_new_tokens):
        token = sampler(logits, out)
        if ttft is None:
            ttft = time.perf_counter() - t0
        if token in stops:
            reason = stops[token]
            break
        out.append(token)
        if on_token is not None:
            on_token(runner.decode([token]))
        logits = runner.feed(session, [token])
    _sync(runner)
    total = time.perf_counter() - t0
    return OfflineResult(text=runner.tokenizer.decode(out, skip_special_tokens=True),
                         token_ids=out, stop_reason=reason, num_frames=len(encoded),
                         encode_s=encode_s, ttft_s=ttft if ttft is not None else total,
                         total_s=total, first_logits=first_logits)


def _sync(runner) -> None:
    if runner.config.device.startswith('cuda'):
        torch.cuda.synchronize(runner.config.device)
