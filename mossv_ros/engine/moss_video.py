"""The MOSS-Video-Preview forward on top of transformers' stock Mllama modules.

Everything MOSS changes relative to stock Llama-3.2-Vision lives here and in the vision path
(:mod:`.vision`) (docs/model.md section 4): one 560x560 tile per frame, a vision tower with full
unmasked attention over the padded tokens and 4.46 intermediate-layer semantics, CLS + 4x4
average pooling (101 tokens per frame at 11B), RoPE on cross-attention (query at its text
position, key at the frame's ``<|image|>`` position, q normed then rotated, k rotated then
normed), cumulative visibility, and rows with no visible frame skipping the cross layers. The
weights and sub-modules (Linear, RMSNorm, MLP, rotary table, vision encoder layers) are the
stock ``MllamaForConditionalGeneration`` ones.
"""
from typing import Optional

import torch
from torch import nn
import torch.nn.functional as F

from .quantize import quiet_torchao

with quiet_torchao():  # (transformers' model code imports torchao when it is installed)
    from transformers.models.mllama.modeling_mllama import rotate_half

from . import fusion
from .attention import attend, SDPA_BACKENDS
from .kv_cache import CachePool, cumulative_visibility
from .step import StepShape, unpack
from .vision import VisionPath


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


def rotate_rolled(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """:func:`rotate` in four kernels: ``rotate_half(x) * sin`` is ``roll(x, head_dim / 2) *
    signed_sin`` with ``signed_sin = cat(-sin[:half], sin[half:])`` (the same products, the
    sign moved from ``x`` to ``sin``: bit-identical)."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


def normed_cross_keys(cross_attn: nn.Module, keys: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor) -> torch.Tensor:
    """Cross keys rotated to their frame's ``<|image|>`` position, then k_norm (section 4.3).

    :param keys: raw ``k_proj`` keys (..., head_dim); cos/sin broadcast to them.
    """
    return cross_attn.k_norm(rotate(keys, cos, sin))


class MossVideoModel(VisionPath, nn.Module):
    """MOSS forward driving the sub-modules of a stock ``MllamaForConditionalGeneration``.

    :param hf_model: a loaded ``MllamaForConditionalGeneration`` (weights, dtype, device set).
    :param attn_implementation: 'eager', 'sdpa' or 'flash_attention_2'. The vision tower runs
        it as transformers does; the text step (self- and cross-attention, always with an
        explicit mask) runs 'eager' as matmuls and anything else through SDPA without cuDNN
        (:func:`attend`; docs/model.md sections 4.6 and 10.3).
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
        #: fused q/k/v and gate/up GEMMs and RMSNorm kernels (:meth:`fuse_projections`; a
        #: model the streaming load fused comes fused)
        self.fused = fusion.is_fused(self.text)
        #: SDPA backends of the text step, in order of preference
        self.sdpa_backends = SDPA_BACKENDS
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

    def rope_table(self):
        """(cos, sin), each (max_position_embeddings, head_dim) in the model dtype on its
        device: the stock rotary embedding evaluated once at every position (the same values
        it computes per call), so a step looks its rows up instead of recomputing them."""
        if getattr(self, '_rope', None) is None:
            positions = torch.arange(self.text_config.max_position_embeddings,
                                     device=self.device)[None]
            probe = torch.empty(0, dtype=self.dtype, device=self.device)
            cos, sin = self.text.rotary_emb(probe, positions)
            half = sin.shape[-1] // 2
            signed = torch.cat([-sin[0, :, :half], sin[0, :, half:]], dim=-1)
            self._rope = (cos[0], sin[0], signed)
        return self._rope

    def rope(self, positions: torch.Tensor):
        """cos and sin at ``positions`` (int64 (...)): each (..., head_dim); with
        :attr:`fused` the sine comes signed for :func:`rotate_rolled`."""
        cos, sin, signed = self.rope_table()
        return cos[positions], (signed if self.fused else sin)[positions]

    @torch.no_grad()
    def finalize_keys(self, keys: torch.Tensor, position: int) -> torch.Tensor:
        """Rotate raw cross keys to the frame's ``<|image|>`` position, then k_norm.

        :param keys: (num_cross_layers, num_kv_heads, tokens_per_frame, head_dim) for one frame.
        :param position: text position ``p_f`` of the frame's ``<|image|>`` token (a host int:
            the table row is a view, nothing is copied to the device).
        :returns: keys of the same shape, post-RoPE, post-k_norm (section 4.3).
        """
        cos_table, sin_table, _ = self.rope_table()
        cos, sin = cos_table[position], sin_table[position]  # (head_dim,)
        out = [normed_cross_keys(self.text.layers[layer_id].cross_attn, keys[i], cos, sin)
               for i, layer_id in enumerate(self.cross_layer_ids)]
        return torch.stack(out)

    # ------------------------------------------------------------------ text path
    @torch.no_grad()
    def forward_step(self, pool: CachePool, meta: torch.Tensor,
                     shape: StepShape) -> torch.Tensor:
        """One static-shape step of the text model over rows of a cache pool: decode (one
        token for each of several sessions) and prefill (a chunk of one session) alike
        (docs/model.md section 10.1).

        Each row writes its new keys and values at its write slots, attends to the text-cache
        slots up to its own (a length mask over ``shape.text_span`` slots) and, in the cross
        layers, to the vision-cache slots whose ``<|image|>`` position is at or before its
        position (:func:`~.kv_cache.cumulative_visibility` over ``shape.frame_span`` slots;
        free slots are never visible); rows that see no frame keep their input, and with no
        frame in any row (``frame_span`` 0) the cross layers are skipped (section 4.5).
        No Python branch depends on data and nothing is read back to the host, so the step
        can be captured as a CUDA graph and replayed with new metadata.

        :param pool: the cache pool (rows chosen by ``meta``).
        :param meta: int64 device tensor (shape.batch, shape.width): the step's metadata
            (:func:`~.step.build_metadata`).
        :returns: float32 logits (batch, vocab_size), or (batch, tokens, vocab_size) when not
            ``shape.last_only``.
        """
        t = unpack(meta, shape)
        x = self.text.embed_tokens(t.input_ids)  # (b, q, hidden)
        cos, sin = self.rope(t.positions)  # (b, q, head_dim)
        slots = torch.arange(shape.text_span, device=x.device)
        text_mask = (slots[None, None, :] <= t.write_index[:, :, None])[:, None]  # (b,1,q,S)
        if shape.frame_span:
            cross_mask, sees = cumulative_visibility(t.frame_positions, t.positions,
                                                     self.tokens_per_frame)
            cross_mask = cross_mask[:, None]  # (b, 1, q, frame_span * T)
        vision_end = shape.frame_span * self.tokens_per_frame
        impl = self.attn_implementation
        for layer_id, layer in enumerate(self.text.layers):
            if layer_id in self.cross_layer_ids:
                if not shape.frame_span:
                    continue  # skip rule: no row has a frame (section 4.5)
                slot = self.cross_layer_ids.index(layer_id)

                def cross_attention(q, slot=slot, layer=layer):
                    keys = _rows(pool.vision_k[slot], t.rows, vision_end, shape.gather)
                    values = _rows(pool.vision_v[slot], t.rows, vision_end, shape.gather)
                    return attend(q, keys, values, cross_mask, impl, layer.cross_attn.scaling,
                                  self.sdpa_backends)
                x = self.cross_layer(layer, x, cos, sin, cross_attention, sees)
            else:
                slot = self.self_layer_ids.index(layer_id)

                def self_attention(q, k, v, slot=slot, layer=layer):
                    # the one write path of the text cache: (b, q, kv_heads, head_dim) rows
                    pool.text_k[slot][t.rows[:, None], :, t.write_index] = k.transpose(1, 2)
                    pool.text_v[slot][t.rows[:, None], :, t.write_index] = v.transpose(1, 2)
                    keys = _rows(pool.text_k[slot], t.rows, shape.text_span, shape.gather)
                    values = _rows(pool.text_v[slot], t.rows, shape.text_span, shape.gather)
                    return attend(q, keys, values, text_mask, impl, layer.self_attn.scaling,
                                  self.sdpa_backends)
                x = self.self_layer(layer, x, cos, sin, self_attention)[0]
        x = x[:, -1] if shape.last_only else x
        return self.lm_head(self._norm(self.text.norm, x)).float()

    # ------------------------------------------------------------------ fused kernels
    def fuse_projections(self, keep_stock: bool = True) -> None:
        """Inference kernels with fewer launches (docs/model.md section 10.3): q/k/v of every
        self-attention layer and gate/up of every MLP as one GEMM each (:mod:`.fusion`; with
        ``keep_stock`` the stock linears' weights become views of the fused weight: no extra
        memory; without, they are dropped so a quantizer sees the fused layers only), and
        RMSNorm through ``F.rms_norm`` (one kernel where PyTorch fuses it). The same function:
        logits within float rounding of the unfused layers (``test_step.py``). Training keeps
        the stock modules (it never calls this). A model loaded fused by the streaming load
        (:func:`~.checkpoint.load_hf_model`) is fused already."""
        fusion.fuse_in_memory(self.text, self.cross_layer_ids, keep_stock)
        self.fused = True

    def _norm(self, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """A stock RMSNorm (float32 statistics, weight times the input-dtype result)."""
        if not self.fused:
            return norm(x)
        # one kernel where PyTorch fuses it; statistics in float32 as the stock norm, the
        # weight applied before the one rounding to the input dtype (the stock norm rounds
        # twice: a difference in the last bit of a bfloat16)
        return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.variance_epsilon)

    def _mlp(self, mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The stock gated MLP: down(act(gate(x)) * up(x))."""
        if not self.fused:
            return mlp(x)
        gate, up = mlp.moss_gate_up(x).chunk(2, dim=-1)
        return mlp.down_proj(mlp.act_fn(gate) * up)

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
        h = self._norm(layer.input_layernorm, x)
        heads, kv_heads = self.num_heads, self.num_kv_heads
        if self.fused:  # one GEMM for q, k and v; q and k rotated together (signed sin)
            qkv = attn.moss_qkv(h).view(b, q_len, heads + 2 * kv_heads, -1)
            qk = rotate_rolled(qkv[:, :, :heads + kv_heads], cos[:, :, None], sin[:, :, None])
            q, k = qk[:, :, :heads].transpose(1, 2), qk[:, :, heads:].transpose(1, 2)
            v = qkv[:, :, heads + kv_heads:].transpose(1, 2)
        else:
            q = attn.q_proj(h).view(b, q_len, heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(h).view(b, q_len, kv_heads, self.head_dim).transpose(1, 2)
            v = attn.v_proj(h).view(b, q_len, kv_heads, self.head_dim).transpose(1, 2)
            q, k = rotate_heads(q, cos, sin), rotate_heads(k, cos, sin)
        x = x + attn.o_proj(attention(q, k, v).reshape(b, q_len, -1))
        return x + self._mlp(layer.mlp, self._norm(layer.post_attention_layernorm, x)), k, v

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
        h = self._norm(layer.input_layernorm, x)
        q = self._norm(attn.q_norm, attn.q_proj(h).view(b, q_len, self.num_heads, -1))
        if self.fused:
            q = rotate_rolled(q, cos[:, :, None], sin[:, :, None]).transpose(1, 2)
        else:
            q = rotate_cross_query(q.transpose(1, 2), cos, sin)
        y = x + attn_gate(layer) * attn.o_proj(attention(q).reshape(b, q_len, -1))
        y = y + mlp_gate(layer) * self._mlp(layer.mlp, self._norm(layer.post_attention_layernorm,
                                                                  y))
        if row_sees_frame is not None:
            y = torch.where(row_sees_frame[..., None], y, x)
        return y


def _rows(cache: torch.Tensor, rows: torch.Tensor, end: int, gather: bool) -> torch.Tensor:
    """The first ``end`` slots of the batch's rows of one layer's cache (rows, kv_heads,
    slots, head_dim): a view when the batch is the whole pool, else gathered by ``rows``."""
    part = cache[:, :, :end]
    return part.index_select(0, rows) if gather else part


def attn_gate(layer) -> torch.Tensor:
    """tanh of the cross-attention gate of a stock cross decoder layer."""
    return layer.cross_attn_attn_gate.tanh()


def mlp_gate(layer) -> torch.Tensor:
    """tanh of the MLP gate of a stock cross decoder layer."""
    return layer.cross_attn_mlp_gate.tanh()
