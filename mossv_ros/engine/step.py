"""One step of the text model, with static shapes: host metadata in one place, one copy in.

A step feeds ``tokens`` new tokens to each of ``batch`` rows of a :class:`~.kv_cache.CachePool`
(one decode step of several sessions, or one chunk of one session's prefill). Everything the
step needs to know about the rows (token ids, text positions, the cache slots the new keys are
written to, which pool rows, each row's frame positions) is assembled here, on the host, as
one int64 array (:func:`build_metadata`), and reaches the device in one copy
(:func:`to_device`; pinned memory, ``non_blocking``). The forward
(:meth:`~.moss_video.MossVideoModel.forward_step`) turns it into masks with device arithmetic
only: lengths and frame positions are data, never shapes, so a step can be captured once as a
CUDA graph (:mod:`.graphs`) and replayed (docs/model.md section 10).

Layout of the metadata, one row per batch row, int64 (batch, 3 * tokens + 1 + frame_span):
``[token ids (tokens) | positions (tokens) | write slots (tokens) | pool row | frame
positions (frame_span)]``.
"""
import contextlib
from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch

from .kv_cache import CachePool, FREE_SLOT_POS

#: eager steps attend to the used part of the caches rounded up to these multiples (fewer
#: shapes; a captured step attends to the full capacity)
TEXT_SPAN_ROUND = 64
FRAME_SPAN_ROUND = 8


@dataclass(frozen=True)
class StepShape:
    """The static part of a step: everything that is a tensor shape or a Python branch.

    :ivar batch: rows of the step (b).
    :ivar tokens: tokens per row (q); padding tokens come first.
    :ivar text_span: text-cache slots attended per row (the pool's ``text_slots`` for a full
        step; a used prefix for an eager one).
    :ivar frame_span: vision-cache slots attended per row; 0: no row has a frame, the cross
        layers are skipped (the skip rule, decided on the host before the step).
    :ivar gather: the batch rows are pool rows chosen by the metadata (gathered); False when
        the batch is the whole pool in row order (read as views).
    :ivar last_only: logits of the last token of each row only (else of every token).
    """

    batch: int
    tokens: int
    text_span: int
    frame_span: int
    gather: bool
    last_only: bool = True

    @property
    def width(self) -> int:
        """Columns of the metadata array."""
        return 3 * self.tokens + 1 + self.frame_span


class RowInput(NamedTuple):
    """One session's part of a step (host values only).

    :ivar row: the session's pool row.
    :ivar token_ids: the new tokens (at most ``StepShape.tokens``).
    :ivar first_position: text position of the first new token.
    :ivar write_indices: int64 (len(token_ids),) cache slots of the new tokens
        (:meth:`~.kv_cache.TextKVCache.write_indices`).
    :ivar frame_positions: int64 (frame_span,) ``<|image|>`` position of each vision slot
        (:meth:`~.kv_cache.VisionCache.frame_positions`).
    """

    row: int
    token_ids: Sequence[int]
    first_position: int
    write_indices: np.ndarray
    frame_positions: np.ndarray


class StepTensors(NamedTuple):
    """Device views of the metadata of one step (see the module docstring)."""

    input_ids: torch.Tensor  # (batch, tokens)
    positions: torch.Tensor  # (batch, tokens)
    write_index: torch.Tensor  # (batch, tokens)
    rows: torch.Tensor  # (batch,)
    frame_positions: torch.Tensor  # (batch, frame_span)


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step


def eager_shape(pool: CachePool, inputs: Sequence[RowInput], high_water: int,
                last_only: bool = True) -> StepShape:
    """The smallest shape for ``inputs`` (no padding): spans cover what the rows use.

    :param high_water: the largest vision-cache high water mark of the rows.
    """
    q = max(len(r.token_ids) for r in inputs)
    end = max(int(r.write_indices[-1]) + 1 for r in inputs)
    text_span = min(pool.text_slots, _round_up(end, TEXT_SPAN_ROUND))
    frame_span = min(pool.max_frames, _round_up(high_water, FRAME_SPAN_ROUND))
    gather = sorted(r.row for r in inputs) != list(range(pool.rows))
    return StepShape(len(inputs), q, text_span, frame_span, gather, last_only)


def full_shape(pool: CachePool, batch: int, tokens: int,
               frame_span: Optional[int] = None) -> StepShape:
    """The shape of a captured step: ``batch`` rows (gathered unless the whole pool) of
    ``tokens`` tokens over the full text capacity and ``frame_span`` vision slots (default
    all of them)."""
    return StepShape(batch, tokens, pool.text_slots,
                     pool.max_frames if frame_span is None else frame_span, batch != pool.rows)


def build_metadata(shape: StepShape, pool: CachePool,
                   inputs: Sequence[RowInput]) -> Tuple[np.ndarray, List[int]]:
    """The step's metadata (the one place it is assembled) and where each input's row is.

    Rows with fewer tokens than ``shape.tokens`` are padded on the left with tokens that write
    to the pool's scratch slot (never visible to a real row), so the last token of a row is
    always its last column. Batch rows without an input are dummy rows (another pool row
    writing only to its scratch slot, seeing no frame). Without ``shape.gather`` the batch is
    the pool in row order.

    :returns: (int64 array (shape.batch, shape.width), the batch row of each input).
    :raises ValueError: more inputs or tokens than the shape holds, or a row used twice.
    """
    b, q = shape.batch, shape.tokens
    rows = [r.row for r in inputs]
    if len(inputs) > b or len(set(rows)) != len(rows) or b > pool.rows:
        raise ValueError(f'{len(inputs)} rows {rows} do not fit a step of {b} rows over a '
                         f'pool of {pool.rows}')
    meta = np.zeros((b, shape.width), dtype=np.int64)
    meta[:, 2 * q:3 * q] = pool.scratch_index  # padding and dummy rows write to scratch
    meta[:, 3 * q + 1:] = FREE_SLOT_POS  # and see no frame
    if shape.gather:
        order = rows + [r for r in range(pool.rows) if r not in rows][:b - len(rows)]
    else:
        order = list(range(b))
    meta[:, 3 * q] = order
    where = []
    for item in inputs:
        i = order.index(item.row)
        n = len(item.token_ids)
        if n > q or n == 0:
            raise ValueError(f'{n} tokens do not fit a step of {q}')
        meta[i, q - n:q] = item.token_ids
        meta[i, 2 * q - n:2 * q] = np.arange(item.first_position, item.first_position + n)
        meta[i, 2 * q:3 * q] = pool.scratch_index
        meta[i, 3 * q - n:3 * q] = item.write_indices
        meta[i, q:2 * q - n] = item.first_position  # padding tokens: any position
        meta[i, 3 * q + 1:] = item.frame_positions[:shape.frame_span]
        where.append(i)
    return meta, where


def to_device(meta: np.ndarray, device: torch.device) -> torch.Tensor:
    """The one host-to-device copy of a step's metadata (pinned, ``non_blocking`` on CUDA;
    the caching host allocator keeps the pinned block until the copy has run)."""
    host = torch.from_numpy(meta)
    if device.type != 'cuda':
        return host
    return host.pin_memory().to(device, non_blocking=True)


def unpack(meta: torch.Tensor, shape: StepShape) -> StepTensors:
    """Device views of the metadata columns (no copy)."""
    q = shape.tokens
    return StepTensors(meta[:, :q], meta[:, q:2 * q], meta[:, 2 * q:3 * q], meta[:, 3 * q],
                       meta[:, 3 * q + 1:])



def run(model, sessions: Sequence, tokens: Sequence[Sequence[int]],
        all_logits: bool = False, graphs=None) -> torch.Tensor:
    """Run one text step for ``sessions`` (:class:`~.runner.Session` rows of one pool, a token
    list each): a graph of ``graphs`` (:class:`~.graphs.StepGraphs` captured over that pool)
    when one fits, else eagerly with ``model`` (:meth:`~.moss_video.MossVideoModel.
    forward_step`). Commits the written rows (each session's text-cache length moves only
    here, after a full forward).

    :returns: float32 logits (len(sessions), vocab), or (len(sessions), tokens, vocab) with
        ``all_logits``, on the model device.
    """
    pool = sessions[0].pool
    if graphs is not None and graphs.pool is not pool:
        graphs = None  # captured over another pool
    if graphs is not None and not all_logits:
        if all(len(t) == 1 for t in tokens):
            shape = graphs.decode_shape(len(sessions), max(
                s.vision_cache.high_water for s in sessions))
            if shape is not None:
                return _replay(graphs, shape, sessions, tokens)
        elif len(sessions) == 1 and graphs.prefill_shape(len(tokens[0])) is not None:
            ids, out, done = tokens[0], None, 0
            while done < len(ids):  # chunks of the longest captured length, padded
                shape = graphs.prefill_shape(len(ids) - done)
                chunk = ids[done:done + shape.tokens]
                out = _replay(graphs, shape, sessions, [chunk], offset=done)
                done += len(chunk)
            return out
    inputs = _row_inputs(sessions, tokens)
    high_water = max(s.vision_cache.high_water for s in sessions)
    shape = eager_shape(pool, inputs, high_water, last_only=not all_logits)
    meta, where = build_metadata(shape, pool, inputs)
    out = model.forward_step(pool, to_device(meta, pool.device), shape)
    return _commit(sessions, tokens, out, where, copy=False)


def _replay(graphs, shape: StepShape, sessions, tokens, offset: int = 0) -> torch.Tensor:
    meta, where = build_metadata(shape, sessions[0].pool, _row_inputs(sessions, tokens, offset))
    return _commit(sessions, tokens, graphs.replay(shape, meta), where, copy=True)


def _row_inputs(sessions, tokens, offset: int = 0) -> List[RowInput]:
    """Each session's part of a step whose tokens start ``offset`` tokens after its next
    position (a later chunk of a prefill)."""
    return [RowInput(s.row, ids, s.next_pos + offset, s.kv_cache.write_indices(len(ids)),
                     s.vision_cache.frame_positions(s.vision_cache.capacity))
            for s, ids in zip(sessions, tokens)]


def _commit(sessions, tokens, out: torch.Tensor, where: List[int], copy: bool) -> torch.Tensor:
    """Advance each session's cache length; the rows of ``out`` in session order (with
    ``copy`` a new tensor: a graph's output buffer is overwritten by its next replay)."""
    for session, ids in zip(sessions, tokens):
        session.kv_cache.commit(len(ids))
    first = where[0]
    if not copy and where == list(range(first, first + len(where))):
        return out[first:first + len(where)]
    return torch.stack([out[i] for i in where])

#: what reads a tensor's values back to the host
_HOST_READS = ('__array__', 'numpy', 'item', 'tolist', '__bool__', '__int__', '__float__',
               '__index__')


class HostReadError(RuntimeError):
    """A tensor was read back to the host where no read is allowed (inside a step)."""


@contextlib.contextmanager
def forbid_host_reads():
    """Make every read of tensor values on the host raise :class:`HostReadError` (tests and
    the CPU smoke bench). On the CPU such reads silently work; on CUDA they synchronize, and
    converting a CUDA tensor with numpy crashes: the guard catches both on any device. On a
    GPU, ``torch.cuda.set_sync_debug_mode('error')`` is the stronger check (docs/model.md
    section 10.2)."""
    saved = {name: getattr(torch.Tensor, name) for name in _HOST_READS}

    def refuse(name):
        def read(self, *args, **kwargs):
            raise HostReadError(f'Tensor.{name} inside a step: a device value read on the host')
        return read

    try:
        for name in _HOST_READS:
            setattr(torch.Tensor, name, refuse(name))
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)
