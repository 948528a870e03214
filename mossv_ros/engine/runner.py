"""Model runner: owns the model, tokenizer, device and dtype; exposes encode/prefill/decode.

A :class:`Session` holds one stream's caches (text KV cache, vision cache) and its next text
position; the runner's methods act on a session. No threads here (see :mod:`.engine`).
"""
import dataclasses
from dataclasses import dataclass
import logging
from pathlib import Path
import threading
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from . import prompt as grammar
from .checkpoint import (
    CheckpointError,
    DTYPE_MAP,
    load_hf_model,
    load_tokenizer,
    read_config,
    resolve_special_ids,
)
from .config import EngineConfig, resolve_device_dtype
from .kv_cache import CachePool, TextKVCache, VisionCache
from .moss_video import MossVideoModel
from .preprocess import to_pixel_values

log = logging.getLogger(__name__)
#: Text-context tokens that must stay free after the session prompt (questions, answers).
MIN_FREE_CONTEXT = 256


@dataclass
class EncodedFrame:
    """A frame after the vision tower, projector and cross k/v projections.

    :ivar keys: (num_cross_layers, num_kv_heads, T, head_dim), before RoPE and k_norm.
    :ivar values: same shape.
    :ivar ready_event: CUDA event recorded on the encoder stream (None on CPU).
    """

    keys: torch.Tensor
    values: torch.Tensor
    frame_index: int = -1
    ready_event: object = None


class Session:
    """Caches and positions of one stream (moss-model.md section 7.1).

    :param caches: (text KV cache, vision cache) of a :class:`~.kv_cache.CachePool` row
        (:meth:`ModelRunner.new_sessions`); None allocates caches of its own.
    """

    def __init__(self, runner: 'ModelRunner', max_frames: int, max_context_tokens: int,
                 caches=None):
        model = runner.model
        if caches is None:
            caches = (TextKVCache(len(model.self_layer_ids), model.num_kv_heads,
                                  model.head_dim, max_context_tokens, model.dtype,
                                  model.device),
                      VisionCache(len(model.cross_layer_ids), model.num_kv_heads,
                                  model.tokens_per_frame, model.head_dim, max_frames,
                                  model.dtype, model.device))
        self.kv_cache, self.vision_cache = caches
        self.next_pos = 0
        self.prefix_tokens = 0  # tokens never evicted from the text cache (session prefix)
        self.num_evicted_frames = 0
        self.num_evicted_tokens = 0
        self.num_oom_events = 0
        self.oom_cap_bytes = 0  # cache-bytes cap learned from a device OOM (0 = none); kept
        # across clear(): the device did not grow

    def clear(self) -> None:
        self.kv_cache.clear()
        self.vision_cache.clear()
        self.next_pos = 0
        self.prefix_tokens = 0

    @property
    def cache_bytes(self) -> int:
        return self.kv_cache.used_bytes + self.vision_cache.used_bytes


def pick_attn_implementation(requested: str, device: str) -> str:
    """Resolve 'auto': FlashAttention-2 with CUDA and ``flash_attn`` installed, else SDPA."""
    if requested != 'auto':
        if requested == 'flash_attention_2':
            try:
                import flash_attn  # noqa: F401
            except ImportError as exc:
                raise ValueError('engine.attn_implementation=flash_attention_2 but the '
                                 'flash_attn package is not installed') from exc
            if not device.startswith('cuda'):
                raise ValueError('engine.attn_implementation=flash_attention_2 needs CUDA')
        return requested
    if device.startswith('cuda'):
        try:
            import flash_attn  # noqa: F401
            return 'flash_attention_2'
        except ImportError:
            pass
    return 'sdpa'


def _resolved(config: EngineConfig) -> EngineConfig:
    """A validated copy of ``config`` with a concrete device and dtype (the one rule:
    :func:`~.config.resolve_device_dtype`); the fallback from CUDA is logged as a warning."""
    config.validate()
    device, dtype, note = resolve_device_dtype(config.device, config.dtype,
                                               torch.cuda.is_available())
    if note:
        log.warning(note)
    return dataclasses.replace(config, device=device, dtype=dtype)


class ModelRunner:
    """Loads a checkpoint and runs the MOSS forward for sessions.

    :param config: engine config; ``model_path`` must be a checkpoint directory. The runner
        keeps a copy in :attr:`config` with the device and dtype resolved ('auto' and the CUDA
        fallback, :func:`~.config.resolve_device_dtype`).
    :param progress: optional ``progress(done, total)`` callback for weight loading.
    :raises CheckpointError: invalid checkpoint directory (clear message).
    :raises ValueError: invalid device or attention implementation.
    """

    def __init__(self, config: EngineConfig,
                 progress: Optional[Callable[[int, int], None]] = None) -> None:
        config = _resolved(config)
        path = Path(config.model_path)
        if not config.model_path or not path.is_dir():
            raise CheckpointError(f'model.path {config.model_path!r} is not a directory')
        if config.trust_remote_code:
            log.warning('trust_remote_code is on: the tokenizer may execute code from %s',
                        path)
        self.config = config
        if config.device == 'cpu':
            # Two threads (encoder, decode) run torch ops at once; one OpenMP team each.
            import os
            torch.set_num_threads(config.cpu_threads or max(1, (os.cpu_count() or 2) // 2))
        dtype = DTYPE_MAP[config.dtype]
        impl = pick_attn_implementation(config.attn_implementation, config.device)
        read_config(path)  # architecture check first: the clearest error for a wrong folder
        tokenizer = load_tokenizer(path, config.trust_remote_code)
        self.special = resolve_special_ids(tokenizer)
        hf_model, extras = load_hf_model(path, dtype, config.device, progress)
        self._setup(hf_model, tokenizer, impl, extras['pool_stride'])

    @classmethod
    def from_model(cls, config: EngineConfig, hf_model, tokenizer,
                   pool_stride: int = 4) -> 'ModelRunner':
        """A runner over an in-memory ``MllamaForConditionalGeneration`` (already on
        ``config.device`` in ``config.dtype``), e.g. random 11B weights for the GPU benchmark
        (speed does not depend on weight values). No checkpoint directory is read."""
        from transformers.models.mllama.modeling_mllama import MllamaRotaryEmbedding

        config = _resolved(config)
        text = hf_model.model.language_model
        text.rotary_emb = MllamaRotaryEmbedding(text.config).to(config.device)  # float32 table
        self = cls.__new__(cls)
        self.config = config
        self.special = resolve_special_ids(tokenizer)
        impl = pick_attn_implementation(config.attn_implementation, config.device)
        self._setup(hf_model, tokenizer, impl, pool_stride)
        return self

    def _setup(self, hf_model, tokenizer, impl: str, pool_stride: int) -> None:
        config = self.config
        self.tokenizer = tokenizer
        # one encode at a time: callers' threads (submit) and the engine thread share it, and
        # transformers' fast tokenizer sets backend state (split_special_tokens) per call
        self._encode_lock = threading.Lock()
        #: ids of every special token (Llama-3 reserves 256), which user text must not yield
        self._special_ids = set(tokenizer.all_special_ids) | {
            i for i, tok in tokenizer.added_tokens_decoder.items() if tok.special}
        self.model = MossVideoModel(hf_model, impl, pool_stride)
        self.attn_implementation = impl
        self.tile_px = self.model.vision_config.image_size
        self.vocab_size = self.model.text_config.vocab_size
        self.max_positions = self.model.text_config.max_position_embeddings
        self.encoder_stream = (torch.cuda.Stream(device=config.device)
                               if config.device.startswith('cuda') else None)
        if self.special.image < self.vocab_size:
            log.warning('<|image|> id %d is generable (vocab %d)', self.special.image,
                        self.vocab_size)

    # ------------------------------------------------------------------ text helpers
    def tokenize(self, text: str) -> List[int]:
        """Token ids of grammar text: special-token strings in it become special ids.
        Never for user text alone (see :meth:`question_ids`). Thread-safe."""
        with self._encode_lock:
            return list(self.tokenizer.encode(text, add_special_tokens=False))

    def question_ids(self, question: str) -> List[int]:
        """Token ids of a mid-stream user turn (moss-model.md section 7.4 step 5); see
        :meth:`user_text_ids`."""
        return self.user_text_ids(grammar.question_text, question)

    def user_text_ids(self, build: Callable[[str], str], user_text: str) -> List[int]:
        """Token ids of ``build(user_text)``, grammar text around a user's text, in which the
        user's text never yields a special token: ``<|image|>``, ``<|eot_id|>`` or a header
        typed into a question stay plain text, so no one can forge turns or image slots.

        Text without special-token strings is tokenized as one string, exactly as in
        training; text with them in three parts (grammar, the user's text with special
        tokens split into plain text, grammar).

        :param build: ``user_text -> full text``; must contain ``user_text`` once.
        """
        with self._encode_lock:
            user = self.tokenizer.encode(user_text, add_special_tokens=False)
        if not self._special_ids.intersection(user):
            return self.tokenize(build(user_text))
        before, after = build('\0').split('\0')
        with self._encode_lock:  # split_special_tokens flips the shared backend's state
            plain = self.tokenizer.encode(user_text, add_special_tokens=False,
                                          split_special_tokens=True)
        return self.tokenize(before) + list(plain) + self.tokenize(after)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def suppressed_ids(self) -> List[int]:
        """Ids never sampled in real-time mode (moss-model.md section 7.4 step 2): the grammar's
        structural tokens, ``<|eot_id|>`` (never a real-time target) and every other special
        added token (Llama-3's reserved slots), all but ``<|silence|>``."""
        s = self.special
        ids = {s.video, s.image, s.bos, s.start_header, s.end_header, s.eot, s.ellipsis}
        added = getattr(self.tokenizer, 'added_tokens_decoder', {}) or {}
        ids |= {int(i) for i, tok in added.items() if getattr(tok, 'special', False)}
        ids.discard(s.silence)
        return sorted(ids)

    def new_session(self, max_frames: Optional[int] = None,
                    max_context_tokens: Optional[int] = None) -> Session:
        return Session(self, max_frames or self.config.max_frames,
                       max_context_tokens or self.config.max_context_tokens)

    def new_sessions(self, n: int) -> List[Session]:
        """``n`` sessions whose caches are the rows of one :class:`~.kv_cache.CachePool`, so
        :meth:`feed_batch` decodes them together; each costs what a session of its own does
        (``cache.max_frames`` frames, ``cache.max_context_tokens`` tokens)."""
        m, cfg = self.model, self.config
        pool = CachePool(n, len(m.self_layer_ids), len(m.cross_layer_ids), m.num_kv_heads,
                         m.head_dim, m.tokens_per_frame, cfg.max_context_tokens,
                         cfg.max_frames, m.dtype, m.device)
        return [Session(self, cfg.max_frames, cfg.max_context_tokens, caches=pool.row(r))
                for r in range(n)]

    # ------------------------------------------------------------------ vision
    def pixel_values(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """RGB uint8 images -> float tensor (N, 3, tile, tile) on the model device."""
        arr = np.stack([to_pixel_values(im, self.tile_px) for im in images])
        return torch.from_numpy(arr).to(self.model.device, self.model.dtype)

    @torch.no_grad()
    def encode_frames(self, images: Sequence[np.ndarray]) -> List[EncodedFrame]:
        """Vision tower + pooling + projector + cross k/v for a chunk of frames.

        On CUDA this runs on the runner's encoder stream and records an event, so it overlaps
        with decoding on the default stream (moss-model.md section 7.3).
        """
        if self.encoder_stream is None:
            return self._encode(images)
        with torch.cuda.stream(self.encoder_stream):
            frames = self._encode(images)
            for frame in frames:
                frame.ready_event = torch.cuda.Event()
                frame.ready_event.record(self.encoder_stream)
        return frames

    def _encode(self, images):
        states = self.model.encode_vision(self.pixel_values(images))  # (N, T, hidden)
        keys, values = self.model.cross_kv(states)  # (L, N, kv_heads, T, head_dim)
        return [EncodedFrame(keys[:, i].contiguous(), values[:, i].contiguous())
                for i in range(states.shape[0])]

    def insert_frame(self, session: Session, frame: EncodedFrame, position: int,
                     frame_index: int) -> Optional[int]:
        """Put an encoded frame into the vision cache at ``<|image|>`` position ``position``.

        Evicts per ``cache.eviction_policy`` when the cache (or ``max_memory_bytes``) is full.
        :returns: the evicted frame index, or None.
        """
        if frame.ready_event is not None:
            torch.cuda.current_stream().wait_event(frame.ready_event)
        cache = session.vision_cache
        evicted = None
        slot = cache.free_slot()
        if slot is None:
            slot, evicted = self._evict_one(session)
        cache.insert(slot, self.model.finalize_keys(frame.keys, position), frame.values,
                     position, frame_index)
        cap = self.config.max_memory_bytes
        if session.oom_cap_bytes:
            cap = min(cap, session.oom_cap_bytes) if cap else session.oom_cap_bytes
        while cap and session.cache_bytes > cap and cache.num_frames > 1:
            _, evicted = self._evict_one(session)
        return evicted

    def evict_one(self, session: Session) -> int:
        """Evict one frame per ``cache.eviction_policy``. :returns: its frame index."""
        return self._evict_one(session)[1]

    def _evict_one(self, session: Session) -> Tuple[int, int]:
        """Evict per ``cache.eviction_policy``; return (freed slot, evicted frame index)."""
        cache = session.vision_cache
        slot = cache.choose_victim(self.config.eviction_policy, self.config.num_sink_frames)
        session.num_evicted_frames += 1
        return slot, cache.evict(slot)

    # ------------------------------------------------------------------ text
    @torch.no_grad()
    def feed(self, session: Session, token_ids: Sequence[int],
             frames: Sequence[Tuple[int, EncodedFrame]] = (),
             all_logits: bool = False) -> torch.Tensor:
        """Feed tokens (prefill when many, a decode step when one or two).

        :param token_ids: ids to append; ``<|image|>`` tokens listed in ``frames`` carry frames.
        :param frames: (offset into ``token_ids``, encoded frame) pairs; each offset must hold
            the ``<|image|>`` id. Frames are inserted before the forward with ``p_f`` = that
            token's position (moss-model.md section 7.2).
        :returns: float32 logits (vocab,) of the last row, or (len, vocab) with ``all_logits``.
        """
        n = len(token_ids)
        self._make_room(session, n)
        start = session.next_pos
        for offset, frame in frames:
            if token_ids[offset] != self.special.image:
                raise ValueError(f'token {offset} is not <|image|>')
            self.insert_frame(session, frame, start + offset, frame.frame_index)
        ids = torch.tensor([list(token_ids)], dtype=torch.long)
        positions = torch.arange(start, start + n, dtype=torch.long)
        try:
            logits = self.model.forward_text(ids, positions, session.kv_cache,
                                             session.vision_cache, all_logits=all_logits)
        except torch.OutOfMemoryError:
            # Nothing was committed (the KV cache length moves only after a full forward):
            # evict frames, cap the cache below where it failed, retry once.
            self._recover_from_oom(session)
            logits = self.model.forward_text(ids, positions, session.kv_cache,
                                             session.vision_cache, all_logits=all_logits)
        session.next_pos += n
        return logits[0] if all_logits else logits[0, -1]

    @torch.no_grad()
    def feed_batch(self, sessions: Sequence[Session], token_ids: Sequence[int]) -> torch.Tensor:
        """Feed one token to each of several sessions in one forward (batched decode).

        :param sessions: sessions of one :meth:`new_sessions` pool (one row each).
        :param token_ids: the token of each session (never ``<|image|>``: frames go through
            :meth:`feed`).
        :returns: float32 logits (len(sessions), vocab); row i equals what :meth:`feed` would
            give session i alone, up to the rounding of batched kernels.
        """
        if self.special.image in token_ids:
            raise ValueError('feed_batch takes no <|image|> token (frames go through feed)')
        if len(sessions) == 1:
            return self.feed(sessions[0], token_ids)[None]
        for session in sessions:
            self._make_room(session, 1)
        ids = torch.tensor([[t] for t in token_ids], dtype=torch.long)
        positions = [s.next_pos for s in sessions]
        try:
            logits = self.model.forward_decode_batch(ids, positions,
                                                     [s.kv_cache for s in sessions],
                                                     [s.vision_cache for s in sessions])
        except torch.OutOfMemoryError:
            # nothing was committed: each session alone, with its own OOM recovery
            return torch.stack([self.feed(s, [t]) for s, t in zip(sessions, token_ids)])
        for session in sessions:
            session.next_pos += 1
        return logits

    def _recover_from_oom(self, session: Session) -> None:
        """Device out of memory during a forward: evict half the cached frames (eviction
        policy order, the newest kept), free the allocator cache, and cap cache bytes at the
        new size for the rest of the session. :raises torch.OutOfMemoryError: nothing left
        to evict."""
        cache = session.vision_cache
        if cache.num_frames < 2:
            raise torch.OutOfMemoryError('device out of memory with one frame cached')
        for _ in range(cache.num_frames // 2):
            self._evict_one(session)
        session.num_oom_events += 1
        session.oom_cap_bytes = session.cache_bytes
        if self.config.device.startswith('cuda'):
            torch.cuda.empty_cache()
        log.warning('device out of memory: evicted to %d frames; cache capped at %d bytes',
                    cache.num_frames, session.oom_cap_bytes)

    def _make_room(self, session: Session, n: int) -> None:
        cache = session.kv_cache
        if cache.length + n <= cache.capacity:
            return
        if session.prefix_tokens + n > cache.capacity - 16:
            raise ValueError(f'{n} tokens do not fit the text context budget '
                             f'({cache.capacity} tokens)')
        want = max(n, (cache.capacity - session.prefix_tokens) // 4)
        session.num_evicted_tokens += cache.evict_middle(session.prefix_tokens, want)

    def start_session(self, session: Session, system_prompt: str = '') -> torch.Tensor:
        """Prefill BOS + system prompt + empty user turn + assistant header (section 7.4.1)."""
        session.clear()
        ids = self.tokenize(grammar.session_start_text(system_prompt
                                                       or grammar.REALTIME_SYSTEM_PROMPT))
        if len(ids) + MIN_FREE_CONTEXT > session.kv_cache.capacity:
            raise ValueError(f'cache.max_context_tokens={session.kv_cache.capacity} is too '
                             f'small: the session prompt alone is {len(ids)} tokens; use at '
                             f'least {len(ids) + MIN_FREE_CONTEXT}')
        cap = self.config.max_memory_bytes
        need = ((len(ids) + MIN_FREE_CONTEXT) * session.kv_cache.bytes_per_token
                + session.vision_cache.bytes_per_frame)
        if cap and cap < need:  # below the prompt and one frame: it could not be honoured
            raise ValueError(f'cache.max_memory_bytes={cap} is too small: the session prompt, '
                             f'{MIN_FREE_CONTEXT} free tokens and one frame need {need} bytes; '
                             'use at least that, or 0 (off)')
        logits = self.feed(session, ids)
        session.prefix_tokens = len(ids)
        return logits
