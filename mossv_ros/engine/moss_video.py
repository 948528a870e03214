"""The MOSS-Video-Preview forward on top of transformers' stock Mllama modules.

Everything MOSS changes relative to stock Llama-3.2-Vision lives here (moss-model.md section 4):
one 560x560 tile per frame, a vision tower with full unmasked attention over the padded tokens
and 4.46 intermediate-layer semantics, CLS + 4x4 average pooling (101 tokens per frame at 11B),
RoPE on cross-attention (query at its text position, key at the frame's ``<|image|>``
position, q normed then rotated, k rotated then normed), cumulative visibility, and rows with no
visible frame skipping the cross layers. The weights and sub-modules (Linear, RMSNorm, MLP,
rotary table, vision encoder layers) are the stock ``MllamaForConditionalGeneration`` ones.
"""
from typing import Optional

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F
from transformers.models.mllama.modeling_mllama import (
    repeat_kv,
    rotate_half,
)

from .kv_cache import cumulative_visibility, TextKVCache, VisionCache


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE: ``x * cos + rotate_half(x) * sin``, cos/sin broadcast to ``x`` (..., head_dim)."""
    return x * cos + rotate_half(x) * sin


def rotate_heads(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on ``x`` of shape (batch, heads, len, head_dim) with cos/sin (batch, len, head_dim)."""
    return rotate(x, cos.unsqueeze(1), sin.unsqueeze(1))


def rotate_cross_query(q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The cross-attention query, already q-normed, rotated at its text position: on every
    row, prefill and decode alike (section 4.3; upstream skips it on cache-only steps)."""
    return rotate_heads(q, cos, sin)


def normed_cross_keys(cross_attn: nn.Module, keys: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor) -> torch.Tensor:
    """Cross keys rotated to their frame's ``<|image|>`` position, then k_norm (section 4.3).

    :param keys: raw ``k_proj`` keys (..., head_dim); cos/sin broadcast to them.
    """
    return cross_attn.k_norm(rotate(keys, cos, sin))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
           impl: str, scaling: float, causal: bool = False) -> torch.Tensor:
    """Multi-head attention with grouped KV heads.

    :param q: (batch, num_heads, q_len, head_dim).
    :param k: (batch, num_kv_heads, k_len, head_dim); ``v`` likewise.
    :param mask: bool (q_len, k_len) or (batch, 1, q_len, k_len), True = attend; None = all
        visible (unless ``causal``).
    :param impl: 'eager' (fp32 softmax, reference), 'sdpa' or 'flash_attention_2'.
    :param causal: bottom-right aligned causal mask (new rows at the end of the keys).
    :returns: (batch, q_len, num_heads, head_dim).
    """
    n_rep = q.shape[1] // k.shape[1]
    q_len, k_len = q.shape[2], k.shape[2]
    if causal and q_len > 1 and impl != 'flash_attention_2':
        rows = torch.arange(q_len, device=q.device)[:, None] + (k_len - q_len)
        causal_mask = torch.arange(k_len, device=q.device)[None, :] <= rows
        mask = causal_mask if mask is None else mask & causal_mask
    if impl == 'flash_attention_2' and mask is None:
        from flash_attn import flash_attn_func  # noqa: PLC0415 (optional CUDA dependency)
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                              softmax_scale=scaling, causal=causal and q_len > 1)
        return out
    if impl == 'eager':
        k = repeat_kv(k, n_rep)
        v = repeat_kv(v, n_rep)
        weights = torch.matmul(q, k.transpose(2, 3)) * scaling  # (1, H, q_len, k_len)
        if mask is not None:
            weights = weights.masked_fill(~mask, torch.finfo(weights.dtype).min)
        weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(weights, v).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling,
                                         enable_gqa=n_rep > 1)
    return out.transpose(1, 2)


class MossVideoModel(nn.Module):
    """MOSS forward driving the sub-modules of a stock ``MllamaForConditionalGeneration``.

    :param hf_model: a loaded ``MllamaForConditionalGeneration`` (weights, dtype, device set).
    :param attn_implementation: 'eager', 'sdpa' or 'flash_attention_2' for text self-attention
        and the vision tower; cross-attention always uses SDPA/eager with an explicit mask
        (moss-model.md section 4.6).
    :param pool_stride: average-pool kernel and stride over the patch grid (section 4.2 step 5).
    """

    def __init__(self, hf_model: nn.Module, attn_implementation: str = 'sdpa',
                 pool_stride: int = 4) -> None:
        super().__init__()
        self.hf_model = hf_model
        model = hf_model.model
        self.vision = model.vision_model
        self.text = model.language_model
        self.projector = model.multi_modal_projector
        self.lm_head = hf_model.lm_head
        self.text_config = hf_model.config.text_config
        self.vision_config = hf_model.config.vision_config
        self.attn_implementation = attn_implementation
        self.cross_attn_implementation = 'eager' if attn_implementation == 'eager' else 'sdpa'
        self.pool_stride = pool_stride
        self.cross_layer_ids = list(self.text_config.cross_attention_layers)
        self.self_layer_ids = [i for i in range(self.text_config.num_hidden_layers)
                               if i not in self.cross_layer_ids]
        tc = self.text_config
        self.num_heads = tc.num_attention_heads
        self.num_kv_heads = tc.num_key_value_heads
        self.head_dim = tc.hidden_size // tc.num_attention_heads
        grid = self.vision_config.image_size // self.vision_config.patch_size
        if grid % pool_stride:
            raise ValueError(f'patch grid {grid} is not divisible by pool_stride {pool_stride}')
        self.patch_grid = grid
        #: vision tokens per frame: CLS + pooled grid (101 at 11B, 5 for the tiny config).
        self.tokens_per_frame = 1 + (grid // pool_stride) ** 2
        # The vision tower attends to every token, pads included (section 4.2 step 3): stock
        # SDPA would otherwise assume a causal mask when no mask is given.
        for layer in list(self.vision.transformer.layers) + list(
                self.vision.global_transformer.layers):
            layer.self_attn.is_causal = False
        self.vision_config._attn_implementation = attn_implementation

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    # ------------------------------------------------------------------ vision path
    def _tile_embedding(self, module: nn.Module) -> torch.Tensor:
        """Pre/post tile embedding of tile 0 of aspect-ratio id 1, gated: shape (hidden,)."""
        emb = module.embedding.weight[1].view(module.max_num_tiles, module.hidden_size)[0]
        return emb * module.gate.tanh() if module.is_gated else emb

    @torch.no_grad()
    def encode_vision(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Encode frames into cross-attention states (moss-model.md section 4.2).

        :param pixel_values: float tensor (num_frames, 3, image_size, image_size), RGB,
            CLIP-normalized, one tile per frame.
        :returns: ``cross_attention_states`` of shape (num_frames, tokens_per_frame, hidden),
            model dtype.
        """
        return self.projector(self.pool(self.vision_features(pixel_values)))

    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Vision tower with MOSS semantics: 1 tile, pads attended, 4.46 intermediates.
        Differentiable (toyworld training); inference goes through :meth:`encode_vision`.

        :returns: (num_frames, num_patches + 1, vision_output_dim): the global encoder output
            followed by the intermediate states interleaved per channel (section 4.2.4).
        """
        vm = self.vision
        x = vm.patch_embedding(pixel_values.to(self.device, vm.patch_embedding.weight.dtype))
        x = x.flatten(2).transpose(1, 2)  # (N, P, D)
        x = x + self._tile_embedding(vm.pre_tile_positional_embedding)
        x = vm.apply_class_embedding(x)  # (N, P + 1, D)
        pos = vm.gated_positional_embedding
        gate = pos.gate.tanh()
        tile_pos = pos.tile_embedding.weight[1].view(pos.max_num_tiles, pos.num_patches, -1)[0]
        x = x + (1 - gate) * pos.embedding + gate * tile_pos
        x = vm.layernorm_pre(x)
        num_tokens = x.shape[1]
        num_pad = (8 - num_tokens % 8) % 8
        x = F.pad(x, (0, 0, 0, num_pad))  # zero pads after layernorm_pre, attended (no mask)
        wanted = list(vm.intermediate_layers_indices)
        states = {}
        for i, layer in enumerate(vm.transformer.layers):
            if i in wanted:
                states[i] = x  # 4.46 semantics: index i = input of local layer i (section 4.2.4)
            x = layer(x, attention_mask=None)
        if len(vm.transformer.layers) in wanted:
            states[len(vm.transformer.layers)] = x
        x = vm.layernorm_post(x)
        x = x + self._tile_embedding(vm.post_tile_positional_embedding)
        for layer in vm.global_transformer.layers:
            x = layer(x, attention_mask=None)
        x = x[:, :num_tokens]  # drop pads: (N, P + 1, D)
        inter = torch.stack([states[i] for i in wanted], dim=-1)[:, :num_tokens]  # (N,P+1,D,k)
        return torch.cat([x, inter.flatten(2)], dim=-1)  # (N, P + 1, D * (1 + k))

    def pool(self, feats: torch.Tensor) -> torch.Tensor:
        """CLS + average pool (kernel = stride) of the patch grid, row-major, CLS first.

        :param feats: (N, grid * grid + 1, C). :returns: (N, tokens_per_frame, C).
        """
        num_frames, _, channels = feats.shape
        cls, patches = feats[:, :1], feats[:, 1:]
        grid = self.patch_grid
        patches = patches.reshape(num_frames, grid, grid, channels).permute(0, 3, 1, 2)
        pooled = F.avg_pool2d(patches, self.pool_stride)  # (N, C, grid/s, grid/s)
        pooled = pooled.flatten(2).transpose(1, 2)  # (N, (grid/s)^2, C), row-major
        return torch.cat([cls, pooled], dim=1)

    @torch.no_grad()
    def cross_kv(self, cross_attention_states: torch.Tensor):
        """Project vision states into per-layer cross K/V, before RoPE and k_norm.

        :param cross_attention_states: (num_frames, tokens_per_frame, hidden).
        :returns: (keys, values), each (num_cross_layers, num_frames, num_kv_heads,
            tokens_per_frame, head_dim).
        """
        n, t, _ = cross_attention_states.shape
        keys, values = [], []
        for layer_id in self.cross_layer_ids:
            attn = self.text.layers[layer_id].cross_attn
            k = attn.k_proj(cross_attention_states).view(n, t, self.num_kv_heads, self.head_dim)
            v = attn.v_proj(cross_attention_states).view(n, t, self.num_kv_heads, self.head_dim)
            keys.append(k.transpose(1, 2))
            values.append(v.transpose(1, 2))
        return torch.stack(keys), torch.stack(values)

    @torch.no_grad()
    def finalize_keys(self, keys: torch.Tensor, position: int) -> torch.Tensor:
        """Rotate raw cross keys to the frame's ``<|image|>`` position, then k_norm.

        :param keys: (num_cross_layers, num_kv_heads, tokens_per_frame, head_dim) for one frame.
        :param position: text position ``p_f`` of the frame's ``<|image|>`` token.
        :returns: keys of the same shape, post-RoPE, post-k_norm (section 4.3).
        """
        pos = torch.tensor([[position]], device=keys.device)
        cos, sin = self.text.rotary_emb(keys, pos)  # (1, 1, head_dim)
        out = []
        for i, layer_id in enumerate(self.cross_layer_ids):
            k = normed_cross_keys(self.text.layers[layer_id].cross_attn, keys[i][None],
                                  cos.unsqueeze(1), sin.unsqueeze(1))  # (1, kv_heads, T, hd)
            out.append(k[0])
        return torch.stack(out)

    # ------------------------------------------------------------------ text path
    @torch.no_grad()
    def forward_text(self, input_ids: torch.Tensor, positions: torch.Tensor,
                     kv_cache: TextKVCache, vision_cache: VisionCache,
                     all_logits: bool = False) -> torch.Tensor:
        """Feed text tokens (``<|image|>`` included) at the given positions; extend the KV cache.

        Frames whose ``<|image|>`` token is among ``input_ids`` must already be in
        ``vision_cache`` with that position. A row at position p sees exactly the frames with
        ``p_f <= p`` (cumulative mask, section 5.5); rows that see no frame skip the cross
        layers (section 4.5).

        :param input_ids: long tensor (1, q_len).
        :param positions: long tensor (q_len,), increasing, continuing the cache.
        :returns: float32 logits (1, q_len or 1, vocab_size).
        """
        x = self.text.embed_tokens(input_ids.to(self.device))  # (1, q, H)
        positions = positions.to(self.device)
        cos, sin = self.text.rotary_emb(x, positions[None])  # (1, q, head_dim)
        vis_mask, row_sees_frame = vision_cache.visibility(positions)
        start = kv_cache.length
        q_len = input_ids.shape[1]
        for layer_id, layer in enumerate(self.text.layers):
            if layer_id in self.cross_layer_ids:
                if vision_cache.num_frames == 0:
                    continue  # skip rule: no frame cached and none brought
                x = self._cross_layer(layer, self.cross_layer_ids.index(layer_id), x, cos, sin,
                                      vision_cache, vis_mask, row_sees_frame)
            else:
                x = self._self_layer(layer, self.self_layer_ids.index(layer_id), x, cos, sin,
                                     kv_cache, start)
        kv_cache.commit(q_len, positions)
        x = x if all_logits else x[:, -1:]
        return self.lm_head(self.text.norm(x)).float()

    @torch.no_grad()
    def forward_decode_batch(self, input_ids: torch.Tensor, positions, kv_caches,
                             vision_caches) -> torch.Tensor:
        """One token for each of several sessions, decoded together as the rows of a batch.

        The sessions' caches are rows of one :class:`~.kv_cache.CachePool`; each row writes
        its token at its own cache length and position and attends to its own keys (a key mask
        per row) and to the frames it sees (:func:`~.kv_cache.cumulative_visibility` per row).
        Row b gives the logits :meth:`forward_text` would give for that session alone, up to
        floating-point rounding of the batched kernels.

        :param input_ids: long (batch, 1). :param positions: host ints (batch,), each row's
            text position (continuing its cache).
        :param kv_caches: a :class:`TextKVCache` per row; ``vision_caches`` likewise.
        :returns: float32 logits (batch, vocab_size).
        """
        pool = kv_caches[0].pool_row and kv_caches[0].pool_row[0]
        if pool is None or any(c.pool_row is None or c.pool_row[0] is not pool
                               for c in list(kv_caches) + list(vision_caches)):
            raise ValueError('batched decode needs sessions of one cache pool')
        rows = [c.pool_row[1] for c in kv_caches]
        device = self.device
        x = self.text.embed_tokens(input_ids.to(device))  # (b, 1, hidden)
        pos = torch.as_tensor(np.asarray(positions, np.int64))
        cos, sin = self.text.rotary_emb(x, pos[:, None].to(device))  # (b, 1, head_dim)
        lengths = torch.as_tensor([c.length for c in kv_caches])
        end = int(lengths.max()) + 1
        key_mask = (torch.arange(end)[None, :] <= lengths[:, None])[:, None, None].to(device)
        row_index = torch.as_tensor(rows, device=device)
        write_at = lengths.to(device)
        has_frames = any(v.num_frames for v in vision_caches)
        if has_frames:
            hw = max(v.high_water for v in vision_caches)
            frame_pos = np.stack([v.frame_positions(hw) for v in vision_caches])  # (b, hw)
            t = self.tokens_per_frame
            mask, sees = cumulative_visibility(torch.from_numpy(frame_pos), pos[:, None], t)
            cross_mask = mask[:, None].to(device)  # (b, 1, 1, hw * T)
            row_sees = None if bool(sees.all()) else sees.to(device)
        for layer_id, layer in enumerate(self.text.layers):
            if layer_id in self.cross_layer_ids:
                if not has_frames:
                    continue  # skip rule: no row has a frame cached
                slot = self.cross_layer_ids.index(layer_id)

                def cross_attention(q, slot=slot, layer=layer):
                    keys = pool.select(pool.vision_k, slot, rows, hw * t)
                    values = pool.select(pool.vision_v, slot, rows, hw * t)
                    return attend(q, keys, values, cross_mask, self.cross_attn_implementation,
                                  layer.cross_attn.scaling)
                x = self.cross_layer(layer, x, cos, sin, cross_attention, row_sees)
            else:
                slot = self.self_layer_ids.index(layer_id)

                def self_attention(q, k, v, slot=slot, layer=layer):
                    pool.text_k[slot][row_index, :, write_at] = k[:, :, 0]
                    pool.text_v[slot][row_index, :, write_at] = v[:, :, 0]
                    keys = pool.select(pool.text_k, slot, rows, end)
                    values = pool.select(pool.text_v, slot, rows, end)
                    return attend(q, keys, values, key_mask, self.attn_implementation,
                                  layer.self_attn.scaling)
                x = self.self_layer(layer, x, cos, sin, self_attention)[0]
        for cache, p in zip(kv_caches, pos.tolist()):
            cache.commit(1, [p])
        return self.lm_head(self.text.norm(x[:, -1])).float()

    def _self_layer(self, layer, slot: int, x, cos, sin, kv_cache: TextKVCache, start: int):
        def attention(q, k, v):  # the new rows attend to the cache and to themselves
            keys, values = kv_cache.write(slot, start, k, v)  # (1, kv_heads, start + q, hd)
            return attend(q, keys, values, None, self.attn_implementation,
                          layer.self_attn.scaling, causal=True)
        return self.self_layer(layer, x, cos, sin, attention)[0]

    def _cross_layer(self, layer, slot: int, x, cos, sin, vision_cache: VisionCache,
                     vis_mask: Optional[torch.Tensor], row_sees_frame: Optional[torch.Tensor]):
        def attention(q):
            keys, values = vision_cache.layer_kv(slot)  # (1, kv_heads, slots * T, head_dim)
            return attend(q, keys, values, vis_mask, self.cross_attn_implementation,
                          layer.cross_attn.scaling)
        sees = None if row_sees_frame is None else row_sees_frame[None]
        return self.cross_layer(layer, x, cos, sin, attention, sees)

    # ------------------------------------------------------------------ layers (batched)
    def self_layer(self, layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   attention):
        """One self-attention decoder layer (stock Llama math), batch-aware and differentiable;
        the streaming forward and the toyworld trainer both run it.

        :param x: (batch, q_len, hidden). :param cos: (batch, q_len, head_dim); ``sin`` too.
        :param attention: ``attention(q, k, v) -> (batch, q_len, heads, head_dim)`` over the
            rows' rotated q, k and v (batch, heads, q_len, head_dim): attends to whatever
            keys come before (a KV cache, a shared prefix) and to the rows causally.
        :returns: (x, k, v): the layer output and this chunk's rotated keys and values.
        """
        attn = layer.self_attn
        b, q_len, _ = x.shape
        h = layer.input_layernorm(x)
        q = attn.q_proj(h).view(b, q_len, self.num_heads, self.head_dim).transpose(1, 2)
        k = attn.k_proj(h).view(b, q_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = attn.v_proj(h).view(b, q_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = rotate_heads(q, cos, sin), rotate_heads(k, cos, sin)
        x = x + attn.o_proj(attention(q, k, v).reshape(b, q_len, -1))
        return x + layer.mlp(layer.post_attention_layernorm(x)), k, v

    def cross_layer(self, layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    attention, row_sees_frame: Optional[torch.Tensor]) -> torch.Tensor:
        """One gated cross-attention decoder layer with MOSS RoPE (sections 4.3-4.5),
        batch-aware and differentiable; the streaming forward and the trainer both run it.

        The query is q-normed, then ALWAYS rotated at its text position; keys come rotated
        and k-normed (:func:`normed_cross_keys`) inside ``attention``.

        :param attention: ``attention(q) -> (batch, q_len, heads, head_dim)`` over the frames
            each row sees (cumulative mask, :func:`~.kv_cache.cumulative_visibility`).
        :param row_sees_frame: bool (batch, q_len); rows that see no frame skip the layer
            (None: every row sees one).
        """
        attn = layer.cross_attn
        b, q_len, _ = x.shape
        h = layer.input_layernorm(x)
        q = attn.q_proj(h).view(b, q_len, self.num_heads, self.head_dim).transpose(1, 2)
        q = rotate_cross_query(attn.q_norm(q), cos, sin)
        y = x + attn_gate(layer) * attn.o_proj(attention(q).reshape(b, q_len, -1))
        y = y + mlp_gate(layer) * layer.mlp(layer.post_attention_layernorm(y))
        if row_sees_frame is not None:
            y = torch.where(row_sees_frame[..., None], y, x)
        return y


def attn_gate(layer) -> torch.Tensor:
    """tanh of the cross-attention gate of a stock cross decoder layer."""
    return layer.cross_attn_attn_gate.tanh()


def mlp_gate(layer) -> torch.Tensor:
    """tanh of the MLP gate of a stock cross decoder layer."""
    return layer.cross_attn_mlp_gate.tanh()
