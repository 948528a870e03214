"""The caches: one preallocated storage (:class:`CachePool`) with host metadata per session.

Every session is a row of a :class:`CachePool`, alone (a pool of one row) or beside other
cameras' sessions; the text KV cache and the vision cache of a row are host objects
(:class:`TextKVCache`, :class:`VisionCache`) that keep the row's metadata (lengths, slot
positions, frame indices) as Python ints and numpy arrays over views of the pool's tensors.
The step (:mod:`.step`) reads that metadata on the host, copies it to the device once and
writes the new tokens' keys and values itself; nothing here reads a device tensor back
(docs/model.md section 10.2).
"""
from typing import List, Optional, Tuple

import numpy as np
import torch

#: text position given to a free vision-cache slot: beyond any row, so never visible
FREE_SLOT_POS = np.iinfo(np.int64).max


def cumulative_visibility(frame_pos: torch.Tensor, row_pos: torch.Tensor,
                          tokens_per_frame: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The cumulative cross-attention mask (docs/model.md section 5.5): a row at text position
    p sees exactly the frames whose ``<|image|>`` position ``p_f <= p``. The step (decode and
    prefill, every row of a batch) and the toyworld trainer both build their masks here.
    Pure tensor arithmetic with static shapes: safe inside a CUDA graph.

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
    shape = visible.shape[:-1] + (visible.shape[-1] * tokens_per_frame,)
    mask = visible[..., None].expand(visible.shape + (tokens_per_frame,)).reshape(shape)
    return mask | ~sees[..., None], sees


class CacheFullError(RuntimeError):
    """Raised when a write would exceed a cache's preallocated capacity."""


class CachePool:
    """The caches of ``rows`` sessions as rows of shared, preallocated tensors: the one
    storage of every session, so that one step can decode several sessions together (a batch
    row per session, each with its own length, positions and frames).

    Text K/V: one tensor per self-attention layer, (rows, num_kv_heads, text_slots,
    head_dim), with ``text_slots`` = capacity + 1 rounded up to 16: slot ``capacity`` of each row
    (:attr:`scratch_index`) is a scratch slot that padding rows of a static-shape step write
    to, and no real row ever sees it or the slots after it (:attr:`text_slots` is a
    full-capacity step's span). Vision K/V: one tensor per cross layer, (rows, num_kv_heads,
    max_frames * T, head_dim). Zero-filled: a masked key contributes exactly 0, never NaN.
    A tensor of its own per layer (not a view of one stacked tensor) so a compiled step writes
    the new keys in place: inductor copies a whole base tensor when a view of it is mutated
    (docs/model.md section 10.3). The CUDA graphs captured over a pool refer to it, never the
    other way (:attr:`.runner.ModelRunner.graphs`).
    """

    def __init__(self, rows: int, num_self_layers: int, num_cross_layers: int,
                 num_kv_heads: int, head_dim: int, tokens_per_frame: int, capacity: int,
                 max_frames: int, dtype: torch.dtype, device) -> None:
        # capacity + the scratch slot, rounded up to 16 (the alignment the memory-efficient
        # SDPA kernel wants of a mask's last dimension; the extra slots are never visible)
        self.text_slots = -(-(capacity + 1) // 16) * 16
        text = (rows, num_kv_heads, self.text_slots, head_dim)
        vision = (rows, num_kv_heads, max_frames * tokens_per_frame, head_dim)

        def layers(n, shape):
            return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n)]
        #: per layer: text K and V (rows, kv_heads, text_slots, head_dim), vision K and V
        #: (rows, kv_heads, max_frames * T, head_dim)
        self.text_k, self.text_v = layers(num_self_layers, text), layers(num_self_layers, text)
        self.vision_k = layers(num_cross_layers, vision)
        self.vision_v = layers(num_cross_layers, vision)
        self.rows = rows
        self.capacity = capacity
        self.max_frames = max_frames
        self.tokens_per_frame = tokens_per_frame
        self.device = torch.device(device)
        self._args = (num_self_layers, num_cross_layers, num_kv_heads, head_dim,
                      tokens_per_frame, capacity, max_frames, dtype)

    @property
    def scratch_index(self) -> int:
        """The text-cache slot that padding rows write to (never visible to a real row)."""
        return self.capacity

    def row(self, r: int) -> Tuple['TextKVCache', 'VisionCache']:
        """The text and vision caches of row ``r`` (views of the pool's tensors)."""
        n_self, n_cross, kvh, hd, t, capacity, max_frames, dtype = self._args
        text = TextKVCache(self, r, n_self, kvh, hd, capacity)
        vision = VisionCache(self, r, n_cross, kvh, t, hd, max_frames)
        return text, vision

    @property
    def nbytes(self) -> int:
        """Bytes of the preallocated tensors."""
        return sum(t.nbytes for part in (self.text_k, self.text_v, self.vision_k, self.vision_v)
                   for t in part)


class TextKVCache:
    """Self-attention K/V of one session's text (a :class:`CachePool` row), append-only with
    middle eviction. Keys are stored post-RoPE at absolute positions, so evicting tokens needs
    no re-rotation. The step writes row ``length + i`` for the i-th new token
    (:meth:`write_indices`); :meth:`commit` advances the length once the step has run.

    :ivar k: per layer, a view (1, num_kv_heads, text_slots, head_dim) of the pool row;
        ``v`` likewise.
    """

    def __init__(self, pool: CachePool, row: int, num_layers: int, num_kv_heads: int,
                 head_dim: int, capacity: int) -> None:
        self.k = [t[row:row + 1] for t in pool.text_k]
        self.v = [t[row:row + 1] for t in pool.text_v]
        self.pool_row = (pool, row)
        self.capacity = capacity
        self.length = 0
        self.bytes_per_token = (2 * num_layers * num_kv_heads * head_dim
                                * pool.text_k[0].element_size())

    def write_indices(self, n: int) -> np.ndarray:
        """int64 (n,): the cache slots the next ``n`` tokens are written to.

        :raises CacheFullError: past capacity."""
        end = self.length + n
        if end > self.capacity:
            raise CacheFullError(f'text KV cache full: {end} > {self.capacity} tokens')
        return np.arange(self.length, end, dtype=np.int64)

    def commit(self, n: int) -> None:
        """Advance the length by the ``n`` rows a step has written."""
        self.length += n

    def evict_middle(self, keep_prefix: int, num_evict: int) -> int:
        """Drop ``num_evict`` tokens after the first ``keep_prefix``; return how many went."""
        num_evict = max(0, min(num_evict, self.length - keep_prefix))
        if num_evict == 0:
            return 0
        src = slice(keep_prefix + num_evict, self.length)
        dst = slice(keep_prefix, self.length - num_evict)
        for layer in self.k + self.v:
            layer[:, :, dst] = layer[:, :, src].clone()
        self.length -= num_evict
        return num_evict

    def clear(self) -> None:
        self.length = 0

    @property
    def used_bytes(self) -> int:
        return self.length * self.bytes_per_token


class VisionCache:
    """Cross-attention K/V per frame for all cross layers of one session (a
    :class:`CachePool` row), stored with the KV heads only.

    Each frame occupies one slot of ``tokens_per_frame`` rows; keys are post-RoPE (at the
    frame's ``<|image|>`` position ``p_f``) and post-k_norm (docs/model.md sections 4.3, 7.1).
    Attention is order-free over keys, so an evicted slot is simply reused. Slot positions are
    host metadata (:meth:`frame_positions`); the step turns them into the cumulative mask on
    the device. 3.16 MiB per frame at 11B bf16 (docs/model.md section 8.1).

    :ivar k: per cross layer, a view (1, num_kv_heads, capacity * T, head_dim); ``v`` too.
    """

    def __init__(self, pool: CachePool, row: int, num_layers: int, num_kv_heads: int,
                 tokens_per_frame: int, head_dim: int, capacity: int) -> None:
        self.k = [t[row:row + 1] for t in pool.vision_k]
        self.v = [t[row:row + 1] for t in pool.vision_v]
        self.pool_row = (pool, row)
        self.tokens_per_frame = tokens_per_frame
        self.capacity = capacity
        self.slot_pos = np.full(capacity, -1, dtype=np.int64)  # p_f per slot, -1 = free
        self.slot_frame_index = np.full(capacity, -1, dtype=np.int64)
        self.high_water = 0
        self.num_frames = 0
        self.bytes_per_frame = (2 * num_layers * num_kv_heads * tokens_per_frame * head_dim
                                * pool.vision_k[0].element_size())

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
        """Store one frame: the one write path into the vision cache.

        :param keys: (num_cross_layers, num_kv_heads, T, head_dim), finalized (RoPE + k_norm).
        """
        t = self.tokens_per_frame
        rows = slice(slot * t, (slot + 1) * t)
        for layer, (k, v) in enumerate(zip(self.k, self.v)):
            k[0, :, rows] = keys[layer]
            v[0, :, rows] = values[layer]
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

    def frame_positions(self, num_slots: Optional[int] = None) -> np.ndarray:
        """int64 (num_slots,) ``<|image|>`` position of each slot (default: up to the high
        water mark); free slots get :data:`FREE_SLOT_POS` (never visible).

        :raises ValueError: ``num_slots`` below the high water mark."""
        num_slots = self.high_water if num_slots is None else num_slots
        if num_slots < self.high_water:
            raise ValueError(f'{num_slots} slots do not cover the {self.high_water} in use')
        out = np.full(num_slots, FREE_SLOT_POS, dtype=np.int64)
        used = self.slot_pos[:self.high_water]
        out[:self.high_water] = np.where(used >= 0, used, FREE_SLOT_POS)
        return out

    @property
    def used_bytes(self) -> int:
        return self.num_frames * self.bytes_per_frame
