"""MOSS forward: the streaming path equals a full-sequence forward (docs/model.md 7.6), and
the section 9 unit tests of the vision path and cross-attention."""
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers.models.mllama.modeling_mllama import repeat_kv, rotate_half

from mossv_ros.engine import moss_video
from mossv_ros.engine.kv_cache import CachePool, cumulative_visibility, FREE_SLOT_POS
from mossv_ros.engine.moss_video import MossVideoModel
from mossv_ros.engine.step import build_metadata, eager_shape, full_shape, RowInput


def _rot(x, cos, sin):
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


def reference_forward(mv: MossVideoModel, ids, vision_states, image_positions):
    """Dense full-sequence forward with training semantics, written independently of the
    runtime: no caches, expanded (all-head) cross K/V, dense cumulative mask; rows that see no
    frame skip the cross layers (the inference convention of section 4.5)."""
    text = mv.text
    seq = ids.shape[1]
    pos = torch.arange(seq)
    x = text.embed_tokens(ids)
    cos, sin = text.rotary_emb(x, pos[None])
    heads, kvh, hd = mv.num_heads, mv.num_kv_heads, mv.head_dim
    n_frames, t, _ = vision_states.shape
    frame_pos = torch.tensor(image_positions)
    visible = frame_pos[None, :] <= pos[:, None]  # (seq, frames)
    sees = visible.any(1)
    mask = visible.repeat_interleave(t, dim=1)  # (seq, frames * T)
    causal = torch.tril(torch.ones(seq, seq, dtype=torch.bool))
    for i, layer in enumerate(text.layers):
        if i in mv.cross_layer_ids:
            a = layer.cross_attn
            h = layer.input_layernorm(x)
            q = a.q_proj(h).view(1, seq, heads, hd).transpose(1, 2)
            q = _rot(a.q_norm(q), cos, sin)
            k = a.k_proj(vision_states).view(n_frames, t, kvh, hd).transpose(1, 2)
            fcos, fsin = text.rotary_emb(k, frame_pos[:, None])  # (F, 1, hd)
            k = a.k_norm(_rot(k, fcos, fsin))  # rotated, then normed
            v = a.v_proj(vision_states).view(n_frames, t, kvh, hd).transpose(1, 2)
            k = repeat_kv(k.transpose(0, 1).reshape(1, kvh, n_frames * t, hd), heads // kvh)
            v = repeat_kv(v.transpose(0, 1).reshape(1, kvh, n_frames * t, hd), heads // kvh)
            w = (q @ k.transpose(2, 3)) * a.scaling
            w = w.masked_fill(~mask, float('-inf')).nan_to_num(neginf=-1e30)
            o = (F.softmax(w.double(), -1).float() @ v).transpose(1, 2).reshape(1, seq, -1)
            y = x + layer.cross_attn_attn_gate.tanh() * a.o_proj(o)
            y = y + layer.cross_attn_mlp_gate.tanh() * layer.mlp(layer.post_attention_layernorm(y))
            x = torch.where(sees[None, :, None], y, x)
        else:
            a = layer.self_attn
            h = layer.input_layernorm(x)
            q = a.q_proj(h).view(1, seq, heads, hd).transpose(1, 2)
            k = a.k_proj(h).view(1, seq, kvh, hd).transpose(1, 2)
            v = a.v_proj(h).view(1, seq, kvh, hd).transpose(1, 2)
            q, k = _rot(q, cos, sin), _rot(k, cos, sin)
            k, v = repeat_kv(k, heads // kvh), repeat_kv(v, heads // kvh)
            w = ((q @ k.transpose(2, 3)) * a.scaling).masked_fill(~causal, float('-inf'))
            o = (F.softmax(w, -1) @ v).transpose(1, 2).reshape(1, seq, -1)
            x = x + a.o_proj(o)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
    return mv.lm_head(text.norm(x)).float()[0]


def _script(runner, n_frames=3, seed=0):
    """A token stream with a frame-less prefix, frames mid-text and silence tokens."""
    rng = np.random.default_rng(seed)
    s = runner.special
    ids, image_pos = [s.bos] + list(rng.integers(0, 256, 5)), []
    for _ in range(n_frames):
        image_pos.append(len(ids))
        ids.append(s.image)
        ids += list(rng.integers(0, 256, 3)) + [s.silence]
    images = [rng.integers(0, 255, (90, 120, 3), dtype=np.uint8) for _ in range(n_frames)]
    return ids, image_pos, images


def _stream(mv, ids, image_pos, encoded, chunks, full=False):
    """Feed ``ids`` in the given chunk sizes through the step, frames inserted at their
    <|image|> tokens; ``full``: the static shape a CUDA graph replays (full capacity, chunks
    padded to 8 tokens), else the smallest eager shape."""
    pool = CachePool(1, len(mv.self_layer_ids), len(mv.cross_layer_ids), mv.num_kv_heads,
                     mv.head_dim, mv.tokens_per_frame, 256, 8, torch.float32, 'cpu')
    kv, vc = pool.row(0)
    out, start = [], 0
    for size in chunks:
        for j, p in enumerate(image_pos):
            if start <= p < start + size:
                vc.insert(j, mv.finalize_keys(encoded[0][:, j], p), encoded[1][:, j], p, j)
        row = RowInput(0, ids[start:start + size], start, kv.write_indices(size),
                       vc.frame_positions(pool.max_frames))
        shape = (full_shape(pool, 1, -(-size // 8) * 8) if full
                 else eager_shape(pool, [row], vc.high_water))
        shape = dataclasses.replace(shape, last_only=False)
        meta, _ = build_metadata(shape, pool, [row])
        out.append(mv.forward_step(pool, torch.from_numpy(meta), shape)[0, -size:])
        kv.commit(size)
        start += size
    return torch.cat(out)


@pytest.mark.parametrize('impl', ['eager', 'sdpa'])
def test_streaming_equals_full_forward(tiny_runner, impl):
    mv = MossVideoModel(tiny_runner.model.hf_model, impl)
    ids, image_pos, images = _script(tiny_runner)
    states = mv.encode_vision(tiny_runner.pixel_values(images))
    ref = reference_forward(mv, torch.tensor([ids]), states, image_pos)
    encoded = mv.cross_kv(states)
    for full in (False, True):
        token_by_token = _stream(mv, ids, image_pos, encoded, [1] * len(ids), full)
        torch.testing.assert_close(token_by_token, ref, atol=2e-5, rtol=1e-4)
        chunked = _stream(mv, ids, image_pos, encoded, [7, 5, 1, 1, 4, len(ids) - 18], full)
        torch.testing.assert_close(chunked, ref, atol=2e-5, rtol=1e-4)
    assert (ref[image_pos[0]:] - ref[image_pos[0]:].mean()).abs().max() > 1e-3  # not constant


def test_query_must_be_rotated_on_cache_only_steps(tiny_runner, monkeypatch):
    """The oracle catches the upstream bug: skipping the query RoPE on decode steps."""
    mv = MossVideoModel(tiny_runner.model.hf_model, 'eager')
    ids, image_pos, images = _script(tiny_runner)
    states = mv.encode_vision(tiny_runner.pixel_values(images))
    ref = reference_forward(mv, torch.tensor([ids]), states, image_pos)
    real_rotate = moss_video.rotate_cross_query

    def no_query_rotation(q, cos, sin):  # the upstream bug: decode rows (q_len 1) unrotated
        return q if q.shape[2] == 1 else real_rotate(q, cos, sin)
    monkeypatch.setattr(moss_video, 'rotate_cross_query', no_query_rotation)
    buggy = _stream(mv, ids, image_pos, mv.cross_kv(states), [1] * len(ids))
    assert (buggy[image_pos[0]:] - ref[image_pos[0]:]).abs().max() > 1e-4


def test_cumulative_mask_and_own_frame():
    frame_pos = torch.tensor([10, 20, FREE_SLOT_POS])  # two frames and a free slot
    mask, sees = cumulative_visibility(frame_pos, torch.tensor([5, 10, 19, 20, 21]), 5)
    assert sees.tolist() == [False, True, True, True, True]
    frames_seen = mask.view(5, 3, 5)[:, :, 0]
    assert frames_seen[1:].tolist() == [[True, False, False], [True, False, False],
                                        [True, True, False], [True, True, False]]
    assert mask[0].all()  # a row that sees nothing: all-True (finite softmax), then skipped
    assert mask.view(5, 3, 5).eq(mask.view(5, 3, 5)[..., :1]).all()  # a frame's tokens alike


def test_intermediate_features_are_layer_inputs(tiny_runner):
    mv = tiny_runner.model
    captured = {}
    hooks = [layer.register_forward_pre_hook(
        lambda mod, args, i=i: captured.__setitem__(i, args[0].clone()))
        for i, layer in enumerate(mv.vision.transformer.layers)]
    px = tiny_runner.pixel_values([np.full((64, 64, 3), 120, np.uint8)])
    feats = mv.vision_features(px)
    for h in hooks:
        h.remove()
    d = mv.vision_config.hidden_size
    n_tok = feats.shape[1]
    inter = feats[0, :, d:].view(n_tok, d, 2)  # channel-major: the 2 layer values adjacent
    torch.testing.assert_close(inter[..., 0], captured[1][0, :n_tok])  # input of layer 1
    torch.testing.assert_close(inter[..., 1], captured[3][0, :n_tok])  # input of layer 3
    assert not torch.allclose(inter[..., 1], captured[2][0, :n_tok])


def test_pooling_keeps_cls_first_and_averages_row_major(tiny_runner):
    mv = tiny_runner.model
    grid = mv.patch_grid  # 8
    feats = torch.arange(1 + grid * grid, dtype=torch.float32)[None, :, None].repeat(1, 1, 3)
    pooled = mv.pool(feats)
    assert pooled.shape == (1, 5, 3)
    assert pooled[0, 0, 0] == 0  # CLS first
    patch = torch.arange(1, 1 + grid * grid, dtype=torch.float32).view(grid, grid)
    assert pooled[0, 1, 0] == patch[:4, :4].mean()  # top-left block
    assert pooled[0, 2, 0] == patch[:4, 4:].mean()  # top-right block (row-major order)


def test_vision_pads_are_attended(tiny_runner):
    mv = tiny_runner.model
    px = tiny_runner.pixel_values([np.random.default_rng(1).integers(0, 255, (112, 112, 3),
                                                                       dtype=np.uint8)])
    attended = mv.vision_features(px)
    layers = list(mv.vision.transformer.layers) + list(mv.vision.global_transformer.layers)
    n_tok, padded = 65, 72
    key_mask = torch.zeros(1, 1, padded, padded)
    key_mask[..., n_tok:] = float('-inf')  # what stock Mllama does with the pads
    originals = [layer.forward for layer in layers]
    try:
        for layer, orig in zip(layers, originals):
            layer.forward = lambda x, attention_mask=None, orig=orig: orig(x, key_mask)
        masked = mv.vision_features(px)
    finally:
        for layer, orig in zip(layers, originals):
            layer.forward = orig
    assert attended.shape == masked.shape == (1, n_tok, 96)
    assert (attended - masked).abs().max() > 1e-4


def test_vision_cache_stores_kv_heads_only(tiny_runner):
    mv = tiny_runner.model
    session = tiny_runner.new_session(max_frames=4)
    per_frame = session.vision_cache.bytes_per_frame
    # 2 cross layers x (K, V) x 2 KV heads x 5 tokens x 16 dims x 4 bytes
    assert per_frame == 2 * 2 * mv.num_kv_heads * 5 * 16 * 4


def test_build_tiny_model_leaves_the_callers_config_alone():
    import copy

    from mossv_ros.engine.tiny import build_tiny_model, tiny_config_dict
    config = tiny_config_dict()
    before = copy.deepcopy(config)
    model = build_tiny_model(config)
    assert config == before  # transformers 5 adds rope_theta to the rope_scaling it is given
    assert model.config.text_config.rope_scaling['rope_type'] == 'llama3'
