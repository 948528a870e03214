"""The vision path of the MOSS forward: tiles -> cross-attention states -> raw cross K/V
(docs/model.md section 4.2), on the stock Mllama vision tower, projector and cross-attention
k/v projections. :class:`VisionPath` is a part of :class:`~.moss_video.MossVideoModel`, which
provides the sub-modules (``vision``, ``projector``, ``text``) and sizes it reads.
"""
import torch
from torch import nn
from torch.nn.attention import sdpa_kernel
import torch.nn.functional as F

from .attention import SDPA_BACKENDS
from .preprocess import normalize_tiles


class VisionPath:
    """How a frame becomes cross-attention K/V: MOSS's 1-tile vision tower with pads attended
    and the 4.46 intermediate layers, CLS + average pooling, the projector and the cross
    layers' k/v projections (docs/model.md section 4.2). Mixed into
    :class:`~.moss_video.MossVideoModel`.
    """

    def _tile_embedding(self, module: nn.Module) -> torch.Tensor:
        """Pre/post tile embedding of tile 0 of aspect-ratio id 1, gated: shape (hidden,)."""
        emb = module.embedding.weight[1].view(module.max_num_tiles, module.hidden_size)[0]
        return emb * module.gate.tanh() if module.is_gated else emb

    @torch.no_grad()
    def encode_vision(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Encode frames into cross-attention states (docs/model.md section 4.2).

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
            followed by the intermediate states interleaved per channel (docs/model.md
            section 4.2 step 4).
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
                states[i] = x  # index i = the input of local layer i (section 4.2 step 4)
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
    def encode_tiles(self, tiles: torch.Tensor):
        """Letterboxed uint8 tiles -> raw cross K/V of every cross layer: normalization
        (:func:`~.preprocess.normalize_tiles`), vision tower, pooling, projector and k/v
        projections, on the model's device with device arithmetic only (the encoder's CUDA
        graph captures it).

        :param tiles: uint8 (num_frames, image_size, image_size, 3), RGB, on the device.
        :returns: (keys, values) as :meth:`cross_kv`.
        """
        with sdpa_kernel(SDPA_BACKENDS):
            return self.cross_kv(self.encode_vision(normalize_tiles(tiles)))
