"""Typed, validated engine configuration: the single source of truth.

Pure module (no torch, no rclpy). ROS parameters, the YAML file and the CLI are adapters that
build :class:`EngineConfig`; validation raises :class:`ValueError` naming the field, the value
and the allowed range.
"""
from dataclasses import dataclass, field, fields
import math
import os
from typing import Any, Mapping, Tuple

DTYPES = ('auto', 'bfloat16', 'float16', 'float32')
#: the camera of the single-camera configuration
DEFAULT_CAMERA = 'default'
#: most cameras (sessions) one engine serves
MAX_CAMERAS = 16
ATTN_IMPLEMENTATIONS = ('auto', 'eager', 'sdpa', 'flash_attention_2')
CUDA_GRAPHS = ('auto', 'on', 'off')
#: engine.compile values: the text step compiled by torch.compile (inductor)
COMPILE_MODES = ('auto', 'off', 'inductor')
#: model.quantization values (engine/quantize.py)
QUANTIZATIONS = ('none', 'int8', 'fp8', 'int4')
EVICTION_POLICIES = ('sink_window', 'fifo')


#: EngineConfig fields that may change while the engine runs (``StreamingEngine.update_config``,
#: the node's live parameters); every other field needs a new configure.
LIVE_FIELDS = ('frame_rate_hz', 'max_prompt_chars', 'max_pending_questions',
               'round_close_after_frames', 'round_close_after_sec', 'reset_on_backwards_stamp',
               'sampling')


def model_name(model_path: str) -> str:
    """The name a model is reported by (Status.model_name, /diagnostics): its checkpoint
    directory's name; 'none' without a path."""
    return os.path.basename(os.path.normpath(model_path)) if model_path else 'none'


def resolve_device_dtype(device: str, dtype: str, cuda_available: bool) -> Tuple[str, str, str]:
    """The one rule for where and in what precision the model runs (node, CLI, launch, bench).

    * ``device`` 'auto': CUDA when available, else the CPU; an explicit 'cuda' / 'cuda:N'
      without CUDA falls back to the CPU with a note (the caller logs it as a warning);
    * ``dtype`` 'auto': bfloat16 on CUDA (the checkpoint's dtype), float32 on the CPU (CPU
      bfloat16 matmuls are slow and lose precision); an explicit dtype is always kept.

    :param device: 'auto', 'cpu', 'cuda', 'cuda:N' (validated by :meth:`EngineConfig.validate`).
    :param dtype: one of :data:`DTYPES`.
    :param cuda_available: ``torch.cuda.is_available()`` (a parameter, so this stays pure).
    :returns: (device, dtype, note): concrete names and '' or a sentence why the device changed.
    """
    note = ''
    if device == 'auto':
        device = 'cuda' if cuda_available else 'cpu'
    elif device.startswith('cuda') and not cuda_available:
        note = f'engine.device={device!r} but CUDA is not available: using cpu'
        device = 'cpu'
    if dtype == 'auto':
        dtype = 'bfloat16' if device.startswith('cuda') else 'float32'
    return device, dtype, note


def resolve_compile(compile_mode: str, device: str, quantization: str) -> bool:
    """Whether the text step is compiled (``engine.compile``): 'auto' compiles on CUDA with
    quantized weights, where the eager step converts each weight in a kernel of its own per
    call (torchao without compilation: docs/model.md section 10.3); bfloat16 keeps the eager
    step captured as CUDA graphs (measured on an H200), and the CPU stays eager."""
    if compile_mode == 'auto':
        return device.startswith('cuda') and quantization != 'none'
    return compile_mode == 'inductor'


def _check(cond: bool, name: str, value: Any, allowed: str) -> None:
    if not cond:
        raise ValueError(f'{name}={value!r} is invalid: expected {allowed}')


@dataclass
class SamplingConfig:
    """Sampling of the next token (docs/model.md section 6.2 defaults: do_sample, top_k 50).

    ``temperature`` 0 means greedy decoding.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    max_new_tokens: int = 256
    seed: int = 0

    def validate(self) -> None:
        _check(self.temperature == 0.0 or 0.01 <= self.temperature <= 100.0,
               'sampling.temperature', self.temperature, '0 (greedy) or a float in [0.01, 100]')
        _check(self.top_k >= 0, 'sampling.top_k', self.top_k, 'an int >= 0 (0 = off)')
        _check(0.0 < self.top_p <= 1.0, 'sampling.top_p', self.top_p, 'a float in (0, 1]')
        _check(0.1 <= self.repetition_penalty <= 10.0, 'sampling.repetition_penalty',
               self.repetition_penalty, 'a float in [0.1, 10] (1 = off)')
        _check(1 <= self.max_new_tokens <= 1_000_000, 'sampling.max_new_tokens',
               self.max_new_tokens, 'an int in [1, 1000000]')


@dataclass
class EngineConfig:
    """Everything the streaming engine needs; see ``config/assistant.yaml`` for the ROS names.

    :ivar model_path: local checkpoint directory ('' = no model; the node then reports UNLOADED).
    :ivar dtype: weights/activations dtype, one of :data:`DTYPES` ('auto': see
        :func:`resolve_device_dtype`).
    :ivar device: 'auto' or a torch device string ('cpu', 'cuda', 'cuda:1'); resolved by
        :func:`resolve_device_dtype` when the model loads.
    :ivar attn_implementation: text self-attention and vision tower kernel; 'auto' picks
        FlashAttention-2 on CUDA in bfloat16/float16 when its interface
        (``flash_attn.flash_attn_interface``) imports, SDPA otherwise.
    :ivar quantization: weight-only quantization of the model's linear layers at load
        ('none', 'int8', 'fp8' (CUDA, compute capability 8.9+), 'int4' (CUDA); torchao),
        see :mod:`.quantize`.
    :ivar cuda_graphs: capture the text step and the frame encoder as CUDA graphs ('auto' =
        on with CUDA; 'on' warns and runs eagerly without CUDA; a failed capture runs eagerly
        with a warning and says so in Status).
    :ivar compile_mode: ``engine.compile``: 'inductor' compiles the text step with
        ``torch.compile`` (inductor, whole graph, static shapes; then captured as the CUDA
        graphs): quantized weights' conversion fuses into the step instead of a kernel of its
        own per layer; 'auto' = inductor on CUDA with quantized weights, off otherwise
        (:func:`resolve_compile`); 'off' never.
    :ivar cpu_threads: torch intra-op threads on the CPU (0 = half the cores, so the encoder
        and decode threads do not oversubscribe them).
    :ivar trust_remote_code: allow the checkpoint's own code (off; executes code from disk).
    :ivar frame_rate_hz: frames per second fed to the model (training distribution: 1.0,
        docs/model.md section 7.3).
    :ivar max_frames: vision-cache budget in frames (3.16 MiB/frame at 11B bf16, section 8.1).
    :ivar num_sink_frames: oldest frames always kept by the 'sink_window' eviction policy.
    :ivar max_context_tokens: text KV-cache budget in tokens; when full, the middle of the
        dialogue is evicted (system prompt and a recent window kept).
    :ivar max_prompt_chars: longest accepted question, characters.
    :ivar max_pending_questions: bounded question queue per camera; the camera's oldest
        pending question is cancelled (its final Answer names the one that superseded it).
    :ivar max_frame_queue: frames waiting to be encoded; the oldest is dropped and counted.
    :ivar round_close_after_frames: a round (question) ends after this many silent frames
        following its last utterance; later utterances until then are revisions.
    :ivar round_close_after_sec: a silent round also ends after this many seconds (wall
        clock) with no frame and no token, so a question to a camera that sends nothing still
        gets its final answer (0 = off).
    :ivar max_memory_bytes: optional cap on vision + text cache bytes (0 = off); on overflow
        frames are evicted (simulates device OOM handling on the CPU).
    :ivar reset_on_backwards_stamp: a camera's stamps jumping back in time (a looped bag;
        checked per topic, jitter and single outliers tolerated: ``policy.StampPolicy``)
        start a fresh session.
    :ivar reset_after_gap_sec: start a fresh session when consecutive frame stamps are more
        than this many seconds apart (the camera stopped; 0 = keep the session).
    :ivar cameras: the cameras, one session each (vision cache, text KV cache, positions,
        dialogue), sharing the weights and the threads; the first is the default for frames
        and questions that name none. Names: letters, digits and '_'.
    :ivar max_total_memory_bytes: optional bound on the cache bytes of all sessions together
        (0 = off); past it, frames of the session that just grew are evicted.
    :ivar max_device_memory_bytes: the memory the node may use on its device (0 = all that is
        free): the memory plan (:mod:`.memory`) must fit it before any weight is read, and on
        CUDA it is enforced with ``torch.cuda.set_per_process_memory_fraction`` (a share of a
        GPU that other nodes use too).
    """

    model_path: str = ''
    dtype: str = 'auto'
    device: str = 'auto'
    attn_implementation: str = 'auto'
    cuda_graphs: str = 'auto'
    compile_mode: str = 'auto'
    quantization: str = 'none'
    trust_remote_code: bool = False
    cpu_threads: int = 0
    frame_rate_hz: float = 1.0
    max_frames: int = 256
    num_sink_frames: int = 4
    eviction_policy: str = 'sink_window'
    max_context_tokens: int = 4096
    max_prompt_chars: int = 2000
    max_pending_questions: int = 4
    max_frame_queue: int = 4
    max_memory_bytes: int = 0
    round_close_after_frames: int = 30
    round_close_after_sec: float = 10.0
    reset_after_gap_sec: float = 0.0
    reset_on_backwards_stamp: bool = True
    system_prompt: str = ''
    cameras: Tuple[str, ...] = (DEFAULT_CAMERA,)
    max_total_memory_bytes: int = 0
    max_device_memory_bytes: int = 0
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    def validate(self) -> 'EngineConfig':
        """Check every field; return self. :raises ValueError: on the first invalid field."""
        _check(self.dtype in DTYPES, 'engine.dtype', self.dtype, f'one of {DTYPES}')
        dev = self.device.split(':')[0]
        _check(dev in ('auto', 'cpu', 'cuda', 'mps', 'xpu'), 'engine.device', self.device,
               "'auto', 'cpu', 'cuda' or 'cuda:N'")
        if ':' in self.device:
            _check(dev != 'auto' and self.device.split(':', 1)[1].isdigit(), 'engine.device',
                   self.device, "'cuda:N' with N an integer")
        _check(self.attn_implementation in ATTN_IMPLEMENTATIONS, 'engine.attn_implementation',
               self.attn_implementation, f'one of {ATTN_IMPLEMENTATIONS}')
        _check(self.quantization in QUANTIZATIONS, 'model.quantization', self.quantization,
               f'one of {QUANTIZATIONS}')
        _check(self.cuda_graphs in CUDA_GRAPHS, 'engine.cuda_graphs', self.cuda_graphs,
               f'one of {CUDA_GRAPHS}')
        _check(self.compile_mode in COMPILE_MODES, 'engine.compile', self.compile_mode,
               f'one of {COMPILE_MODES}')
        _check(0 <= self.cpu_threads <= 256, 'engine.cpu_threads', self.cpu_threads,
               'an int in [0, 256] (0 = auto)')
        _check(math.isfinite(self.frame_rate_hz) and 0.01 <= self.frame_rate_hz <= 30.0,
               'frames.rate_hz', self.frame_rate_hz,
               'a float in [0.01, 30] (frames per second; below one frame in 100 s the camera '
               'would look dead)')
        _check(1 <= self.max_frames <= 100_000, 'cache.max_frames', self.max_frames,
               'an int in [1, 100000]')
        _check(0 <= self.num_sink_frames < self.max_frames, 'cache.num_sink_frames',
               self.num_sink_frames, f'an int in [0, cache.max_frames={self.max_frames})')
        _check(self.eviction_policy in EVICTION_POLICIES, 'cache.eviction_policy',
               self.eviction_policy, f'one of {EVICTION_POLICIES}')
        _check(512 <= self.max_context_tokens <= 131_072, 'cache.max_context_tokens',
               self.max_context_tokens, 'an int in [512, 131072]')
        _check(1 <= self.max_prompt_chars <= 100_000, 'prompt.max_chars', self.max_prompt_chars,
               'an int in [1, 100000]')
        _check(1 <= self.max_pending_questions <= 1000, 'prompt.max_pending',
               self.max_pending_questions, 'an int in [1, 1000]')
        _check(1 <= self.max_frame_queue <= 1000, 'frames.max_queue', self.max_frame_queue,
               'an int in [1, 1000]')
        _check(self.max_memory_bytes >= 0, 'cache.max_memory_bytes', self.max_memory_bytes,
               'an int >= 0 (0 = off)')
        _check(self.round_close_after_frames >= 0, 'round.close_after_frames',
               self.round_close_after_frames, 'an int >= 0 (0 = rounds stay open)')
        _check(self.round_close_after_sec == 0.0 or 0.5 <= self.round_close_after_sec <= 3600.0,
               'round.close_after_sec', self.round_close_after_sec,
               '0 (off) or a float in [0.5, 3600] (seconds)')
        _check(math.isfinite(self.reset_after_gap_sec) and self.reset_after_gap_sec >= 0.0,
               'frames.reset_after_gap_sec', self.reset_after_gap_sec,
               'a float >= 0 (0 = off)')
        _check(isinstance(self.cameras, tuple) and 1 <= len(self.cameras) <= MAX_CAMERAS
               and len(set(self.cameras)) == len(self.cameras)
               and all(isinstance(n, str) and n and n.replace('_', '').isalnum()
                       and n.isascii() for n in self.cameras),
               'cameras.names', self.cameras,
               f'1 to {MAX_CAMERAS} distinct names of letters, digits and _')
        _check(self.max_total_memory_bytes >= 0, 'cache.max_total_memory_bytes',
               self.max_total_memory_bytes, 'an int >= 0 (0 = off)')
        _check(self.max_device_memory_bytes == 0 or self.max_device_memory_bytes >= 1 << 26,
               'engine.max_device_memory_bytes', self.max_device_memory_bytes,
               '0 (all that is free) or an int >= 67108864 (64 MiB)')
        self.sampling.validate()
        return self

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> 'EngineConfig':
        """Build from a flat or nested mapping of field names; unknown keys raise ValueError."""
        values = dict(values)
        sampling = values.pop('sampling', {}) or {}
        known = {f.name for f in fields(cls)} - {'sampling'}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f'unknown engine config keys: {unknown}')
        s_known = {f.name for f in fields(SamplingConfig)}
        s_unknown = sorted(set(sampling) - s_known)
        if s_unknown:
            raise ValueError(f'unknown sampling config keys: {s_unknown}')
        if 'cameras' in values and isinstance(values['cameras'], list):
            values['cameras'] = tuple(values['cameras'])
        return cls(sampling=SamplingConfig(**sampling), **values).validate()
