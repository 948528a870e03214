"""Preallocated caches: the text KV cache and the per-frame cross-attention vision cache.

Slot metadata (positions, frame indices) is mirrored on the host, so building masks never
synchronizes with the device.
"""
from typing import List, Optional, Tuple

import numpy as np
import torch

#: text position given to a free vision-cache slot: beyond any row, so never visible
FREE_SLOT_POS = np.iinfo(np.int64).max


def cumulative_visibility(frame_pos: torch.Tensor, row_pos: torch.Tensor,
                          tokens_per_frame: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The cumulative cross-attention mask (moss-model.md section 5.5): a row at text position
    p sees exactly the frames whose ``<|image|>`` position ``p_f <= p``. The streaming forward
    (one row batch over the vision cache) and the toyworld trainer (a batch of episodes) both
    build their masks here.

    :param frame_pos: int64 (..., frames), each frame's ``<|image|>`` position (a slot or
        padding frame that no row may see gets a position beyond every row).
    :param row_pos: int64 (..., rows), the rows' text positions (same leading dims).
    :param tokens_per_frame: vision tokens per frame (101 at 11B).
    :returns: (mask, sees): bool (..., rows, frames * tokens_per_frame), True = attend, and
        bool (..., rows), the row sees at least one frame. A row that sees nothing gets an
        all-True mask row (softmax stays finite); the caller skips the layer for it.
    """
    visible = frame_pos[..., None, :] <= row_pos[..., :, None]  # (..., rows, frames)
    sees = visible.any(-1)
    mask = visible.repeat_interleave(tokens_per_frame, dim=-1) | ~sees[..., None]
    return mask, sees


class CacheFullError(RuntimeError):
    """Raised when a write would exceed a cache's preallocated capacity."""


class TextKVCache:
    """Self-attention K/V of the text layers, append-only with middle eviction.

    Keys are stored post-RoPE at absolute positions, so evicting tokens needs no re-rotation.

    :param num_layers: number of self-attention layers (32 at 11B).
    :param capacity: tokens (``max_context_tokens``).
    :param storage: (k, v) views into a :class:`CachePool` row; None allocates its own.
    Storage: k, v of shape (num_layers, 1, num_kv_heads, capacity, head_dim).
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device, storage=None) -> None:
        shape = (num_layers, 1, num_kv_heads, capacity, head_dim)
        if storage is None:
            storage = (torch.zeros(shape, dtype=dtype, device=device),
                       torch.zeros(shape, dtype=dtype, device=device))
        self.k, self.v = storage
        self.capacity = capacity
        self.length = 0
        self.positions = np.full(capacity, -1, dtype=np.int64)
        self.pool_row = None  # (CachePool, row) when the storage is a pool's row
        self.bytes_per_token = 2 * num_layers * num_kv_heads * head_dim * self.k.element_size()

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor):
        """Write new rows for one layer at ``start``; return keys/values up to the new end.

        :param k: (1, num_kv_heads, n, head_dim). :raises CacheFullError: past capacity.
        """
        end = start + k.shape[2]
        if end > self.capacity:
            raise CacheFullError(f'text KV cache full: {end} > {self.capacity} tokens')
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def commit(self, n: int, positions) -> None:
        """Advance the length by ``n`` rows written at ``positions`` (host values)."""
        self.positions[self.length:self.length + n] = np.asarray(positions, dtype=np.int64)
        self.length += n

    def evict_middle(self, keep_prefix: int, num_evict: int) -> int:
        """Drop ``num_evict`` tokens after the first ``keep_prefix``; return how many went."""
        num_evict = max(0, min(num_evict, self.length - keep_prefix))
        if num_evict == 0:
            return 0
        src = slice(keep_prefix + num_evict, self.length)
        dst = slice(keep_prefix, self.length - num_evict)
        self.k[:, :, :, dst] = self.k[:, :, :, src].clone()
        self.v[:, :, :, dst] = self.v[:, :, :, src].clone()
        self.positions[dst] = self.positions[src].copy()
        self.length -= num_evict
        return num_evict

    def clear(self) -> None:
        self.length = 0

    @property
    def used_bytes(self) -> int:
        return self.length * self.bytes_per_token


class VisionCache:
    """Cross-attention K/V per frame for all cross layers, stored with the KV heads only.

    Each frame occupies one slot of ``tokens_per_frame`` rows; keys are post-RoPE (at the
    frame's ``<|image|>`` position ``p_f``) and post-k_norm (moss-model.md sections 4.3, 7.1).
    Attention is order-free over keys, so an evicted slot is simply reused.

    Storage: k, v of shape (num_cross_layers, 1, num_kv_heads, capacity * T, head_dim);
    3.16 MiB per frame at 11B bf16 (section 8.1). :param storage: (k, v) views into a
    :class:`CachePool` row; None allocates its own.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, tokens_per_frame: int,
                 head_dim: int, capacity: int, dtype: torch.dtype, device,
                 storage=None) -> None:
        shape = (num_layers, 1, num_kv_heads, capacity * tokens_per_frame, head_dim)
        if storage is None:
            storage = (torch.zeros(shape, dtype=dtype, device=device),
                       torch.zeros(shape, dtype=dtype, device=device))
        self.k, self.v = storage
        self.tokens_per_frame = tokens_per_frame
        self.capacity = capacity
        self.slot_pos = np.full(capacity, -1, dtype=np.int64)  # p_f per slot, -1 = free
        self.slot_frame_index = np.full(capacity, -1, dtype=np.int64)
        self.high_water = 0
        self.num_frames = 0
        self.bytes_per_frame = (2 * num_layers * num_kv_heads * tokens_per_frame * head_dim
                                * self.k.element_size())
        self.device = device
        self.pool_row = None  # (CachePool, row) when the storage is a pool's row

    def free_slot(self) -> Optional[int]:
        """A free slot index, or None when the cache is full."""
        free = np.flatnonzero(self.slot_pos[:self.high_water] < 0)
        if free.size:
            return int(free[0])
        if self.high_water < self.capacity:
            return self.high_water
        return None

    def choose_victim(self, policy: str, num_sinks: int) -> int:
        """Slot to evict: the oldest frame, sparing the first ``num_sinks`` for 'sink_window'."""
        used = np.flatnonzero(self.slot_pos[:self.high_water] >= 0)
        if used.size == 0:
            raise CacheFullError('no frame to evict')
        order = used[np.argsort(self.slot_frame_index[used])]
        if policy == 'sink_window' and order.size > num_sinks:
            return int(order[num_sinks])
        return int(order[0])

    def insert(self, slot: int, keys: torch.Tensor, values: torch.Tensor, position: int,
               frame_index: int) -> None:
        """Store one frame.

        :param keys: (num_cross_layers, num_kv_heads, T, head_dim), finalized (RoPE + k_norm).
        """
        t = self.tokens_per_frame
        rows = slice(slot * t, (slot + 1) * t)
        self.k[:, 0, :, rows] = keys
        self.v[:, 0, :, rows] = values
        if self.slot_pos[slot] < 0:
            self.num_frames += 1
        self.slot_pos[slot] = position
        self.slot_frame_index[slot] = frame_index
        self.high_water = max(self.high_water, slot + 1)

    def evict(self, slot: int) -> int:
        """Free a slot; return the evicted frame index."""
        frame_index = int(self.slot_frame_index[slot])
        if self.slot_pos[slot] >= 0:
            self.num_frames -= 1
        self.slot_pos[slot] = -1
        self.slot_frame_index[slot] = -1
        return frame_index

    def clear(self) -> None:
        self.slot_pos[:] = -1
        self.slot_frame_index[:] = -1
        self.high_water = 0
        self.num_frames = 0

    def frame_indices(self) -> List[int]:
        """Cached frame indices, oldest first."""
        used = self.slot_frame_index[self.slot_pos >= 0]
        return sorted(int(i) for i in used)

    def layer_kv(self, layer: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Keys/values of one cross layer over the used slots: (1, kv_heads, slots*T, hd)."""
        end = self.high_water * self.tokens_per_frame
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def frame_positions(self, num_slots: Optional[int] = None) -> np.ndarray:
        """int64 (num_slots,) ``<|image|>`` position of each slot (default: up to the high
        water mark); free slots get :data:`FREE_SLOT_POS` (never visible)."""
        out = np.full(self.high_water if num_slots is None else num_slots, FREE_SLOT_POS,
                      dtype=np.int64)
        used = self.slot_pos[:self.high_water]
        out[:self.high_water] = np.where(used >= 0, used, FREE_SLOT_POS)
        return out

    def visibility(self, positions) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Cumulative cross-attention mask for text rows (moss-model.md section 5.5).

        A row at position p sees the cached frames with ``p_f <= p``.

        :param positions: host sequence of the rows' text positions.
        :returns: (mask, row_sees_frame): bool (rows, slots*T) with True = attend (None when
            every row sees every used slot) and bool (rows,) (None when every row sees a frame).
            Rows that see nothing get an all-True mask row; the caller skips them.
        """
        if self.num_frames == 0:
            return None, None
        mask, sees = cumulative_visibility(torch.from_numpy(self.frame_positions()),
                                           torch.as_tensor(np.asarray(positions, np.int64)),
                                           self.tokens_per_frame)
        if bool(sees.all()) and bool(mask.all()):
            return None, None
        row_sees = None if bool(sees.all()) else sees.to(self.device)
        return mask.to(self.device), row_sees

    @property
    def used_bytes(self) -> int:
        return self.num_frames * self.bytes_per_frame


class CachePool:
    """The caches of several sessions as rows of shared, preallocated tensors, so that one
    forward can decode them together (a batch row per session, each with its own length,
    positions and frames).

    Text K/V: (num_self_layers, rows, num_kv_heads, capacity, head_dim); vision K/V:
    (num_cross_layers, rows, num_kv_heads, max_frames * T, head_dim). Each row is handed out
    as a :class:`TextKVCache` and a :class:`VisionCache` over views of its row, so everything
    a single session does (writes, middle eviction, slot reuse) works on it unchanged; a row
    costs exactly what a session of its own would.
    """

    def __init__(self, rows: int, num_self_layers: int, num_cross_layers: int,
                 num_kv_heads: int, head_dim: int, tokens_per_frame: int, capacity: int,
                 max_frames: int, dtype: torch.dtype, device) -> None:
        text = (num_self_layers, rows, num_kv_heads, capacity, head_dim)
        vision = (num_cross_layers, rows, num_kv_heads, max_frames * tokens_per_frame, head_dim)
        self.text_k = torch.zeros(text, dtype=dtype, device=device)
        self.text_v = torch.zeros(text, dtype=dtype, device=device)
        self.vision_k = torch.zeros(vision, dtype=dtype, device=device)
        self.vision_v = torch.zeros(vision, dtype=dtype, device=device)
        self.rows = rows
        self._args = (num_self_layers, num_cross_layers, num_kv_heads, head_dim,
                      tokens_per_frame, capacity, max_frames, dtype, device)

    def row(self, r: int) -> Tuple[TextKVCache, VisionCache]:
        """The text and vision caches of row ``r`` (views of the pool's tensors)."""
        n_self, n_cross, kvh, hd, t, capacity, max_frames, dtype, device = self._args
        text = TextKVCache(n_self, kvh, hd, capacity, dtype, device,
                           storage=(self.text_k[:, r:r + 1], self.text_v[:, r:r + 1]))
        vision = VisionCache(n_cross, kvh, t, hd, max_frames, dtype, device,
                             storage=(self.vision_k[:, r:r + 1], self.vision_v[:, r:r + 1]))
        text.pool_row = vision.pool_row = (self, r)
        return text, vision

    def select(self, tensor: torch.Tensor, layer: int, rows, end: int) -> torch.Tensor:
        """``tensor[layer, rows, :, :end]``: a view when ``rows`` are consecutive, else a
        gathered copy. :returns: (len(rows), num_kv_heads, end, head_dim)."""
        lo = rows[0]
        if list(rows) == list(range(lo, lo + len(rows))):
            return tensor[layer, lo:lo + len(rows), :, :end]
        index = torch.as_tensor(list(rows), device=tensor.device)
        return tensor[layer, :, :, :end].index_select(0, index)
