"""Several sessions on one model: caches as rows of one pool, decoded together in a batch."""
import numpy as np
import pytest
import torch


def _alone_and_pooled(tiny_runner, n):
    alone = [tiny_runner.new_session() for _ in range(n)]
    pooled = tiny_runner.new_sessions(n)
    for s in alone + pooled:
        tiny_runner.start_session(s)
    return alone, pooled


@pytest.mark.parametrize('n', [2, 3])
def test_batched_decode_equals_each_session_alone(tiny_runner, n):
    """Sessions at different lengths, with different frames: every batched step gives each
    row the logits of that session fed alone."""
    runner = tiny_runner
    rng = np.random.default_rng(n)
    alone, pooled = _alone_and_pooled(runner, n)
    images = [rng.integers(0, 255, (48, 64, 3), dtype=np.uint8) for _ in range(4)]
    frames = runner.encode_frames(images)
    # desynchronize: different prefixes and frames per session
    for i in range(n):
        extra = [int(t) for t in rng.integers(10, 200, size=3 * i + 1)]
        for s in (alone[i], pooled[i]):
            runner.feed(s, extra)
            if i % 2 == 0:
                runner.feed(s, [runner.special.silence, runner.special.image],
                            [(1, frames[i])])
    assert len({s.next_pos for s in pooled}) == n
    worst = 0.0
    for step in range(12):
        tokens = [int(t) for t in rng.integers(10, 200, size=n)]
        batch = runner.feed_batch(pooled, tokens)
        for i in range(n):
            ref = runner.feed(alone[i], [tokens[i]])
            worst = max(worst, float((batch[i] - ref).abs().max()))
        if step == 5:  # a frame for session 1 mid-stream, fed alone as the engine does
            for s in (alone[1], pooled[1]):
                runner.feed(s, [runner.special.image], [(0, frames[3])])
    assert worst < 1e-4, worst
    assert [s.next_pos for s in pooled] == [s.next_pos for s in alone]
    assert [s.vision_cache.num_frames for s in pooled] == [s.vision_cache.num_frames
                                                           for s in alone]


def test_rows_of_a_pool_do_not_touch_each_other(tiny_runner):
    runner = tiny_runner
    a, b = runner.new_sessions(2)
    runner.start_session(a)
    before = torch.stack(a.kv_cache.k)[:, :, :, :a.kv_cache.length].clone()
    runner.start_session(b)
    runner.feed(b, list(range(20, 60)))
    torch.testing.assert_close(torch.stack(a.kv_cache.k)[:, :, :, :a.kv_cache.length], before,
                               rtol=0, atol=0)
    assert a.cache_bytes < b.cache_bytes


def test_feed_batch_refuses_sessions_of_different_pools_and_images(tiny_runner):
    runner = tiny_runner
    s1, s2 = runner.new_session(), runner.new_session()
    for s in (s1, s2):
        runner.start_session(s)
    with pytest.raises(ValueError, match='one cache pool'):
        runner.feed_batch([s1, s2], [11, 12])
    p1, p2 = runner.new_sessions(2)
    with pytest.raises(ValueError, match='image'):
        runner.feed_batch([p1, p2], [runner.special.image, 12])
