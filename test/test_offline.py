"""Offline mode (docs/model.md sections 4.7, 5.2, 6.3): chunked encoding, frame sampling."""
import numpy as np
import pytest
import torch

from mossv_ros.engine.config import SamplingConfig
from mossv_ros.engine.moss_video import MossVideoModel
from mossv_ros.engine.offline import (
    offline_generate,
    offline_prompt_text,
    read_video,
    sample_indices,
)

from .conftest import shared_videos
from .test_moss_model import reference_forward


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (90, 160, 3), dtype=np.uint8) for _ in range(n)]


def test_offline_first_logits_equal_dense_forward_for_any_chunk_size(tiny_runner):
    images = _images(12)
    question = 'What changed?'
    mv = MossVideoModel(tiny_runner.model.hf_model, 'eager')
    ids = tiny_runner.tokenize(offline_prompt_text(question, len(images)))
    image_pos = [i for i, t in enumerate(ids) if t == tiny_runner.special.image]
    assert len(image_pos) == 12 and image_pos == list(range(image_pos[0], image_pos[0] + 12))
    ref = reference_forward(mv, torch.tensor([ids]),
                            mv.encode_vision(tiny_runner.pixel_values(images)), image_pos)[-1]
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=6)
    results = [offline_generate(tiny_runner, question, images, sampling, chunk_frames=c)
               for c in (1, 5, 64)]
    for res in results:
        assert res.num_frames == 12
        torch.testing.assert_close(res.first_logits, ref, atol=2e-5, rtol=1e-4)
        assert res.token_ids == results[0].token_ids
        assert 0 < res.encode_s <= res.ttft_s <= res.total_s
    # the frames matter: other images give other logits
    other = offline_generate(tiny_runner, question, _images(12, seed=1), sampling)
    assert (other.first_logits - ref).abs().max() > 1e-4


def test_offline_stops_at_max_new_tokens_or_stop_token(tiny_runner):
    res = offline_generate(tiny_runner, 'Describe.', _images(2),
                           SamplingConfig(temperature=0.0, max_new_tokens=3))
    assert len(res.token_ids) <= 3
    if len(res.token_ids) < 3:
        assert res.stop_reason in ('eot', 'silence')
    else:
        assert res.stop_reason == 'max_new_tokens'
    specials = set(tiny_runner.suppressed_ids()) - {tiny_runner.special.eot}
    assert not specials & set(res.token_ids)


def test_offline_text_only_and_single_image(tiny_runner):
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=2)
    assert offline_generate(tiny_runner, 'Hello?', [], sampling).num_frames == 0
    assert offline_generate(tiny_runner, 'What is this?', _images(1), sampling).num_frames == 1


@pytest.mark.parametrize('question', ['', '   \n', 'x' * 5000])
def test_offline_rejects_bad_questions(tiny_runner, question):
    with pytest.raises(ValueError, match='prompt'):
        offline_generate(tiny_runner, question, _images(1))


def test_offline_rejects_zero_chunk(tiny_runner):
    with pytest.raises(ValueError, match='chunk_frames'):
        offline_generate(tiny_runner, 'ok', _images(1), chunk_frames=0)


@pytest.mark.parametrize('n,fps,expect', [
    (300, 30.0, 10),     # 10 s at 1 fps
    (60, 30.0, 8),       # 2 s: clamped up to min_frames
    (5, 30.0, 5),        # fewer frames than min_frames: all of them
    (30 * 600, 30.0, 256),  # 10 min: clamped to max_frames, spread uniformly
])
def test_sample_indices(n, fps, expect):
    idx = sample_indices(n, fps)
    assert len(idx) == expect
    assert idx == sorted(set(idx)) and idx[0] == 0 and idx[-1] == n - 1
    gaps = np.diff(idx)
    assert gaps.max() - gaps.min() <= 1


def test_sample_indices_errors():
    with pytest.raises(ValueError):
        sample_indices(0, 30.0)
    with pytest.raises(ValueError):
        sample_indices(10, 0.0)


@pytest.mark.skipif(not shared_videos(), reason='../shared/data/videos not present')
def test_read_real_video_and_answer(tiny_runner):
    frames, times = read_video(str(shared_videos()[0]), video_fps=1.0, max_frames=16)
    assert 1 <= len(frames) <= 16
    assert all(f.dtype == np.uint8 and f.ndim == 3 and f.shape[2] == 3 for f in frames)
    assert times == sorted(times) and times[0] == 0.0
    res = offline_generate(tiny_runner, 'What happens in the video?', frames,
                           SamplingConfig(temperature=0.0, max_new_tokens=4), chunk_frames=4)
    assert res.num_frames == len(frames)


def test_read_video_missing_file(tmp_path):
    with pytest.raises(ValueError, match='cannot open'):
        read_video(str(tmp_path / 'nope.mp4'))
