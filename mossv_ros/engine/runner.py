"""Model runner: owns the model, tokenizer, device and dtype; exposes encode/prefill/decode.

A :class:`Session` holds one stream's caches (text KV cache, vision cache) and its next text
position; the runner's methods act on a session. No threads here (see :mod:`.engine`).
"""
import dataclasses
import logging
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from . import fusion, memory, quantize, step
from . import prompt as grammar
from .budget import CacheBudget
from .checkpoint import (
    CheckpointError,
    DTYPE_MAP,
    load_hf_model,
    load_tokenizer,
    read_config,
)
from .config import EngineConfig, resolve_compile, resolve_device_dtype
from .frames import EncodedFrame, FrameEncoder
from .kv_cache import CachePool
from .memory import MemoryPlan
from .moss_video import MossVideoModel
from .tokens import TokenCodec

log = logging.getLogger(__name__)
#: Text-context tokens that must stay free after the session prompt (questions, answers).
MIN_FREE_CONTEXT = 256


class Session:
    """Caches and positions of one stream (docs/model.md section 7.1).

    :param caches: (text KV cache, vision cache) of a :class:`~.kv_cache.CachePool` row
        (:meth:`ModelRunner.new_sessions`).
    """

    def __init__(self, caches) -> None:
        self.kv_cache, self.vision_cache = caches
        self.next_pos = 0
        self.prefix_tokens = 0  # tokens never evicted from the text cache (session prefix)
        self.num_evicted_frames = 0
        self.num_evicted_tokens = 0
        self.num_oom_events = 0

    @property
    def pool(self) -> CachePool:
        return self.kv_cache.pool_row[0]

    @property
    def row(self) -> int:
        return self.kv_cache.pool_row[1]

    def clear(self) -> None:
        self.kv_cache.clear()
        self.vision_cache.clear()
        self.next_pos = 0
        self.prefix_tokens = 0

    @property
    def cache_bytes(self) -> int:
        return self.kv_cache.used_bytes + self.vision_cache.used_bytes


def flash_attention_2_available() -> bool:
    """FlashAttention-2's real interface imports (``flash_attn.flash_attn_interface``, what
    transformers calls): flash-attn-4 alone makes a bare ``import flash_attn`` succeed as a
    namespace package without it."""
    import importlib
    try:
        importlib.import_module('flash_attn.flash_attn_interface')
    except ImportError:
        return False
    return True


def pick_attn_implementation(requested: str, device: str, dtype: str = 'bfloat16') -> str:
    """Resolve 'auto': FlashAttention-2 on CUDA in float16 or bfloat16 (its kernels take
    nothing else) when its interface imports, else SDPA.

    :raises ValueError: 'flash_attention_2' asked for where it cannot run (not installed, not
        CUDA, float32), with why.
    """
    if requested == 'flash_attention_2':
        if not flash_attention_2_available():
            raise ValueError("engine.attn_implementation=flash_attention_2 but flash_attn's "
                             'FlashAttention-2 interface (flash_attn.flash_attn_interface) is '
                             'not installed')
        if not device.startswith('cuda'):
            raise ValueError('engine.attn_implementation=flash_attention_2 needs CUDA')
        if dtype not in ('bfloat16', 'float16'):
            raise ValueError(f'engine.attn_implementation=flash_attention_2 needs '
                             f'engine.dtype bfloat16 or float16 (not {dtype}): use sdpa')
    if requested != 'auto':
        return requested
    if device.startswith('cuda') and dtype in ('bfloat16', 'float16') and \
            flash_attention_2_available():
        return 'flash_attention_2'
    return 'sdpa'


def _capability(device: str):
    """The CUDA device's compute capability, or None (the CPU)."""
    if not device.startswith('cuda'):
        return None
    return torch.cuda.get_device_capability(device)


def _fuses(config: EngineConfig) -> bool:
    """Fused q/k/v and gate/up projections (fewer, larger kernels per step, docs/model.md
    section 10.3) on CUDA, quantized or not; the CPU keeps the stock layers."""
    return config.device.startswith('cuda')


def check_memory(config: EngineConfig) -> MemoryPlan:
    """The memory plan of ``config`` (device and dtype resolved) against the memory the node
    may use (``engine.max_device_memory_bytes``, or what is free), before any weight is read;
    on CUDA the cap is enforced for the process
    (``torch.cuda.set_per_process_memory_fraction``).

    :raises MemoryPlanError: it does not fit; the message holds the plan and the nearest
        configurations that fit.
    """
    shape = memory.model_shape(config.model_path)
    available, total = memory.device_budget(config.device, config.max_device_memory_bytes)
    plan = memory.plan(shape, config.quantization, config.dtype, config.device,
                       len(config.cameras), config.max_frames, config.max_context_tokens,
                       available)
    if not plan.fits:
        raise memory.MemoryPlanError(plan, memory.suggest(shape, plan))
    if config.device.startswith('cuda') and config.max_device_memory_bytes and total:
        torch.cuda.set_per_process_memory_fraction(
            min(1.0, config.max_device_memory_bytes / total), torch.device(config.device))
    log.info('%s', plan.describe())
    return plan


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
        impl = pick_attn_implementation(config.attn_implementation, config.device,
                                        config.dtype)
        read_config(path)  # architecture check first: the clearest error for a wrong folder
        quantize.check(config.quantization, config.device, _capability(config.device))
        #: the memory plan, checked before any weight is read (:mod:`.memory`)
        self.memory_plan = check_memory(config)
        tokenizer = load_tokenizer(path, config.trust_remote_code)
        try:
            hf_model, extras = load_hf_model(path, dtype, config.device, progress,
                                             config.quantization, fuse=_fuses(config))
        except torch.OutOfMemoryError as exc:  # (from None: the traceback would hold the
            raise memory.LoadOutOfMemoryError(self.memory_plan, str(exc)) from None  # model)
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
        quantize.check(config.quantization, config.device, _capability(config.device))
        impl = pick_attn_implementation(config.attn_implementation, config.device,
                                        config.dtype)
        self.memory_plan = None
        if _fuses(config):  # fused before quantizing: quantized runners keep the fused GEMMs
            fusion.fuse_in_memory(text, text.config.cross_attention_layers,
                                  keep_stock=config.quantization == 'none')
        self._setup(hf_model, tokenizer, impl, pool_stride)
        return self

    def _setup(self, hf_model, tokenizer, impl: str, pool_stride: int) -> None:
        config = self.config
        #: tokenization and the special-token defence (:mod:`.tokens`); the runner's
        #: ``tokenize``, ``question_ids``, ``user_text_ids``, ``decode`` and
        #: ``suppressed_ids`` are its methods
        self.codec = codec = TokenCodec(tokenizer)
        self.tokenizer, self.special = tokenizer, codec.special
        self.tokenize, self.question_ids = codec.tokenize, codec.question_ids
        self.user_text_ids, self.decode = codec.user_text_ids, codec.decode
        self.suppressed_ids = codec.suppressed_ids
        #: the one owner of the cache memory budget (:mod:`.budget`)
        self.budget = CacheBudget(config.max_memory_bytes, config.max_total_memory_bytes)
        #: ``model.quantization`` in use, and the bytes of the weights as stored
        self.quantization = config.quantization
        quantize.apply(hf_model, config.quantization)  # (the streaming load did it already)
        self.num_quantized_layers = quantize.count_quantized(hf_model)
        self.weight_bytes = quantize.weight_bytes(hf_model)
        self.model = MossVideoModel(hf_model, impl, pool_stride)  # fused: see _fuses
        self.attn_implementation = impl
        #: the text step's CUDA graphs over the engine's cache pool (:meth:`capture_graphs`;
        #: None: eager steps)
        self.graphs = None
        #: device out-of-memory errors while capturing (the step then runs eagerly)
        self.num_capture_ooms = 0
        #: the text step compiled by inductor (``engine.compile``, :func:`~.config.
        #: resolve_compile`); seconds its compile and capture took
        self.compiled = resolve_compile(config.compile_mode, config.device,
                                        config.quantization)
        self.compile_seconds = 0.0
        #: frames into cross-attention K/V (:mod:`.frames`); ``tiles``, ``pixel_values``
        #: and ``encode_frames`` are its methods
        self.frames = FrameEncoder(self.model, config.device)
        self.tile_px = self.frames.tile_px
        self.tiles, self.pixel_values = self.frames.tiles, self.frames.pixel_values
        self.encode_frames = self.frames.encode
        self.vocab_size = self.model.text_config.vocab_size
        self.max_positions = self.model.text_config.max_position_embeddings
        if self.special.image < self.vocab_size:
            log.warning('<|image|> id %d is generable (vocab %d)', self.special.image,
                        self.vocab_size)

    def new_session(self, max_frames: Optional[int] = None,
                    max_context_tokens: Optional[int] = None) -> Session:
        """One session: a cache pool of one row."""
        return self.new_sessions(1, max_frames, max_context_tokens)[0]

    def new_sessions(self, n: int, max_frames: Optional[int] = None,
                     max_context_tokens: Optional[int] = None) -> List[Session]:
        """``n`` sessions whose caches are the rows of one :class:`~.kv_cache.CachePool`, so
        :meth:`feed_batch` decodes them together; each costs what a session of its own does
        (``max_frames`` frames, ``max_context_tokens`` tokens; default the config's)."""
        m, cfg = self.model, self.config
        pool = CachePool(n, len(m.self_layer_ids), len(m.cross_layer_ids), m.num_kv_heads,
                         m.head_dim, m.tokens_per_frame,
                         max_context_tokens or cfg.max_context_tokens,
                         max_frames or cfg.max_frames, m.dtype, m.device)
        return [Session(pool.row(r)) for r in range(n)]

    def measured_bytes(self, pool: CachePool) -> int:
        """Bytes this runner holds, measured: on CUDA the allocator's peak
        (``torch.cuda.max_memory_allocated``: weights, caches, graph pools and every
        transient); on the CPU the weights as stored plus ``pool``'s caches."""
        if pool.device.type == 'cuda':
            return int(torch.cuda.max_memory_allocated(pool.device))
        return self.weight_bytes + pool.nbytes

    # ------------------------------------------------------------------ CUDA graphs
    def capture_graphs(self, sessions: Sequence[Session]) -> str:
        """Capture the text step over the sessions' pool and the frame encoder as CUDA graphs
        (:mod:`.graphs`), when ``engine.cuda_graphs`` and the device allow. A capture that
        fails is logged as a warning and leaves eager steps: the engine goes on.

        :returns: what runs now, for Status: 'cuda graphs (N steps + encoder)[, compiled
            (inductor, S s with capture)]', 'compiled (inductor, S s), not captured (<why>)',
            'eager (cuda_graphs off)', 'eager (cpu)' or 'eager (capture failed: <why>)'.
        """
        from .graphs import prepare_step
        cfg = self.config
        if cfg.cuda_graphs == 'on' and not cfg.device.startswith('cuda'):
            log.warning('engine.cuda_graphs=on needs CUDA; running eagerly on %s', cfg.device)
        done = prepare_step(self.model, self.frames, sessions[0].pool, cfg.device,
                            cfg.cuda_graphs, self.compiled)
        self.graphs, self.compile_seconds = done.graphs, done.compile_seconds
        if done.failure:
            self.num_capture_ooms += int(done.out_of_memory)
            log.warning('%s failed, running eagerly: %s', done.failure, done.reason)
        return done.decode_path

    # ------------------------------------------------------------------ vision cache
    def insert_frame(self, session: Session, frame: EncodedFrame, position: int,
                     frame_index: int) -> Optional[int]:
        """Put an encoded frame into the vision cache at ``<|image|>`` position ``position``.

        Evicts per ``cache.eviction_policy`` when the cache (or ``max_memory_bytes``) is full.
        :returns: the evicted frame index, or None.
        """
        if frame.keys.is_cuda:  # made on the encoder stream, read on this one
            stream = torch.cuda.current_stream()
            frame.keys.record_stream(stream)
            frame.values.record_stream(stream)
        cache = session.vision_cache
        evicted = None
        slot = cache.free_slot()
        if slot is None:
            slot, evicted = self._evict_one(session)
        cache.insert(slot, self.model.finalize_keys(frame.keys, position), frame.values,
                     position, frame_index)
        cap = self.budget.session_cap(session)
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
        """Feed tokens to one session (a prefill when many, a decode step when one).

        :param token_ids: ids to append; ``<|image|>`` tokens listed in ``frames`` carry frames.
        :param frames: (offset into ``token_ids``, encoded frame) pairs; each offset must hold
            the ``<|image|>`` id. Frames are inserted before the forward with ``p_f`` = that
            token's position (docs/model.md section 7.2); rows before it do not see them.
        :returns: float32 logits (vocab,) of the last row, or (len, vocab) with ``all_logits``,
            on the model device.
        """
        n = len(token_ids)
        self._make_room(session, n)
        start = session.next_pos
        for offset, frame in frames:
            if token_ids[offset] != self.special.image:
                raise ValueError(f'token {offset} is not <|image|>')
            self.insert_frame(session, frame, start + offset, frame.frame_index)
        try:
            logits = step.run(self.model, [session], [list(token_ids)], all_logits,
                              self.graphs)
        except torch.OutOfMemoryError:
            # Nothing was committed (the KV cache length moves only after a full forward):
            # evict frames, cap the cache below where it failed, retry once.
            self._recover_from_oom(session)
            logits = step.run(self.model, [session], [list(token_ids)], all_logits,
                              self.graphs)
        session.next_pos += n
        return logits[0]

    @torch.no_grad()
    def feed_batch(self, sessions: Sequence[Session], token_ids: Sequence[int]) -> torch.Tensor:
        """Feed one token to each of several sessions in one step (batched decode).

        :param sessions: sessions of one :meth:`new_sessions` pool (one row each).
        :param token_ids: the token of each session (never ``<|image|>``: frames go through
            :meth:`feed`).
        :returns: float32 logits (len(sessions), vocab) on the model device; row i equals
            what :meth:`feed` would give session i alone, up to the rounding of batched kernels.
        :raises ValueError: sessions of different pools, or an ``<|image|>`` token.
        """
        if self.special.image in token_ids:
            raise ValueError('feed_batch takes no <|image|> token (frames go through feed)')
        if any(s.pool is not sessions[0].pool for s in sessions):
            raise ValueError('batched decode needs sessions of one cache pool')
        for session in sessions:
            self._make_room(session, 1)
        try:
            logits = step.run(self.model, list(sessions), [[t] for t in token_ids],
                              graphs=self.graphs)
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
        cap = self.budget.learn_oom(session)
        if self.config.device.startswith('cuda'):
            torch.cuda.empty_cache()
        log.warning('device out of memory: evicted to %d frames; cache capped at %d bytes',
                    cache.num_frames, cap)

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
        """Prefill BOS + system prompt + empty user turn + assistant header (docs/model.md
        section 7.4 step 1)."""
        session.clear()
        ids = self.tokenize(grammar.session_start_text(system_prompt
                                                       or grammar.REALTIME_SYSTEM_PROMPT))
        if len(ids) + MIN_FREE_CONTEXT > session.kv_cache.capacity:
            raise ValueError(f'cache.max_context_tokens={session.kv_cache.capacity} is too '
                             f'small: the session prompt alone is {len(ids)} tokens; use at '
                             f'least {len(ids) + MIN_FREE_CONTEXT}')
        self.budget.check_start(len(ids), MIN_FREE_CONTEXT, session.kv_cache.bytes_per_token,
                                session.vision_cache.bytes_per_frame)
        logits = self.feed(session, ids)
        session.prefix_tokens = len(ids)
        return logits
