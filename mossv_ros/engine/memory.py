# Copyright 2026 The mossv_ros authors
# SPDX-License-Identifier: Apache-2.0
"""The memory plan: every byte the model and its caches will hold, added up before a weight is
read, and compared with what the node may use (docs/model.md section 8.1).

From ``config.json`` alone (the model is built on PyTorch's meta device: shapes, no storage)
and the engine configuration:

* **weights** by ``model.quantization``: every linear layer at its quantized size (the
  formulas of :data:`LINEAR_BYTES`), every other parameter in the model dtype;
* **caches**: each camera's preallocated cache pool row, exactly as
  :class:`~.kv_cache.CachePool` allocates it (text slots rounded up to 16 plus the scratch
  slot, ``cache.max_frames`` x tokens per frame vision slots);
* **activations**: the largest text step (a 128-token prefill chunk, the LM head's logits, the
  attention scores where the kernel materialises them) and one frame through the vision tower;
  on CUDA the graph pools keep these reserved for good (an estimate: marked so in the plan);
* **workspace**: cuBLAS workspaces and allocator slack, 256 MiB (16 MiB on the CPU) + 5 % (an
  estimate).

The check and the nearest configuration that fits (:func:`suggest`) are pure arithmetic on a
:class:`ModelShape`; only :func:`model_shape` imports torch and transformers.
"""
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

GIB = 1 << 30
MIB = 1 << 20
#: bytes per element of the model dtypes
DTYPE_BYTES = {'float32': 4, 'bfloat16': 2, 'float16': 2}
#: the longest captured prefill chunk (graphs.PREFILL_TOKENS[-1]); eager prefills of longer
#: questions are cut the same way on CUDA
PREFILL_CHUNK = 128
#: cuBLAS workspaces (one per stream, two streams) and the CUDA caching allocator's rounding
WORKSPACE_FIXED = 256 * MIB
#: the same on the CPU (no cuBLAS; the allocator's rounding only)
WORKSPACE_FIXED_CPU = 16 * MIB
WORKSPACE_SHARE = 0.05


def _linear_bytes(mode: str, out_features: int, in_features: int, dtype_bytes: int) -> int:
    """Bytes of one bias-free linear layer's weight as stored in ``mode`` (torchao 0.18):

    * none: ``n k`` elements of the model dtype;
    * int8 (``Int8WeightOnlyConfig``, per output row): ``n k`` int8 + ``n`` float32 scales +
      ``n`` int8 zero points (read off torchao's ``Int8Tensor``: ``test_memory.py``);
    * fp8 (``Float8DynamicActivationFloat8WeightConfig``, per row): ``n k`` float8 + ``n``
      float32 scales;
    * int4 (``Int4WeightOnlyConfig``, groups of 128, ``tile_packed_to_4d``): ``n k / 2`` bytes
      + a bfloat16 scale and zero point per group of 128 (``n k / 32`` bytes).
    """
    n, k = out_features, in_features
    if mode == 'int8':
        return n * k + 5 * n
    if mode == 'fp8':
        return n * k + 4 * n
    if mode == 'int4':
        return n * k // 2 + 4 * n * (-(-k // 128))
    return n * k * dtype_bytes


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs to know of a checkpoint (read from ``config.json``).

    :ivar linears: (out_features, in_features) of every linear layer's weight.
    :ivar other_params: elements of every other parameter (embeddings, norms, gates, ...).
    :ivar linear_bias: elements of linear biases (kept in the model dtype).
    :ivar self_layers, cross_layers, kv_heads, heads, head_dim, hidden, intermediate, vocab:
        the text model's sizes.
    :ivar tokens_per_frame: vision tokens per frame (docs/model.md section 4.2 step 5).
    :ivar vision_tokens, vision_hidden, vision_heads, vision_intermediate: the tower's sizes
        (patches + CLS, padded to a multiple of 8).
    """

    linears: Tuple[Tuple[int, int], ...]
    other_params: int
    linear_bias: int
    self_layers: int
    cross_layers: int
    kv_heads: int
    heads: int
    head_dim: int
    hidden: int
    intermediate: int
    vocab: int
    tokens_per_frame: int
    vision_tokens: int
    vision_hidden: int
    vision_heads: int
    vision_intermediate: int

    @property
    def num_params(self) -> int:
        return sum(n * k for n, k in self.linears) + self.other_params + self.linear_bias

    def weight_bytes(self, mode: str, dtype: str) -> int:
        """Bytes of the weights as stored in ``mode`` with the rest in ``dtype``."""
        d = DTYPE_BYTES[dtype]
        return (sum(_linear_bytes(mode, n, k, d) for n, k in self.linears)
                + (self.other_params + self.linear_bias) * d)

    def largest_tensor_bytes(self, dtype: str) -> int:
        """Bytes of the largest single tensor in ``dtype`` (a streaming load holds at most a
        layer group of these at once before quantizing)."""
        d = DTYPE_BYTES[dtype]
        return max(n * k for n, k in self.linears) * d


def model_shape(path) -> ModelShape:
    """Read ``path``/config.json and count every parameter on PyTorch's meta device (no
    storage: the 11B model counts in a few seconds and no bytes).

    :raises CheckpointError: (from :func:`~.checkpoint.read_config`) a bad directory.
    """
    import torch

    from .checkpoint import read_config
    from .quantize import quiet_torchao
    with quiet_torchao():
        from transformers import MllamaForConditionalGeneration
    config, extras = read_config(Path(path))
    with torch.device('meta'):
        model = MllamaForConditionalGeneration(config)
    linears, other, bias = [], 0, 0
    linear_params = set()
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            linears.append(tuple(module.weight.shape))
            linear_params.add(id(module.weight))
            if module.bias is not None:
                bias += module.bias.numel()
                linear_params.add(id(module.bias))
    other = sum(p.numel() for p in model.parameters() if id(p) not in linear_params)
    tc, vc = config.text_config, config.vision_config
    grid = vc.image_size // vc.patch_size
    stride = extras['pool_stride']
    return ModelShape(
        linears=tuple(linears), other_params=other, linear_bias=bias,
        self_layers=tc.num_hidden_layers - len(tc.cross_attention_layers),
        cross_layers=len(tc.cross_attention_layers), kv_heads=tc.num_key_value_heads,
        heads=tc.num_attention_heads, head_dim=tc.hidden_size // tc.num_attention_heads,
        hidden=tc.hidden_size, intermediate=tc.intermediate_size, vocab=tc.vocab_size,
        tokens_per_frame=1 + (grid // stride) ** 2,
        vision_tokens=-(-(grid * grid + 1) // 8) * 8, vision_hidden=vc.hidden_size,
        vision_heads=vc.attention_heads, vision_intermediate=vc.intermediate_size)


def cache_bytes_per_camera(shape: ModelShape, max_frames: int, max_context_tokens: int,
                           dtype: str) -> int:
    """Bytes of one camera's cache pool row, as :class:`~.kv_cache.CachePool` allocates it:
    text K and V over ``max_context_tokens`` + 1 scratch slot rounded up to 16, vision K and V
    over ``max_frames`` x tokens per frame (docs/model.md section 8.1: 3.16 MiB a frame and
    128 KiB a token at 11B bfloat16)."""
    d = DTYPE_BYTES[dtype]
    text_slots = -(-(max_context_tokens + 1) // 16) * 16
    per_slot = 2 * shape.kv_heads * shape.head_dim * d
    return per_slot * (shape.self_layers * text_slots
                       + shape.cross_layers * max_frames * shape.tokens_per_frame)


def activation_bytes(shape: ModelShape, max_frames: int, max_context_tokens: int,
                     num_cameras: int, dtype: str, device: str) -> int:
    """An estimate of the transient bytes of the largest step and one frame's encode.

    Text: a :data:`PREFILL_CHUNK`-token prefill (hidden states and the MLP's intermediate
    activations of one layer, float32 logits of one row per camera, and, on the CPU where
    SDPA materialises them, float32 attention scores over the text and vision caches). Vision:
    one tile through the tower (hidden states of the kept intermediate layers and one layer's
    attention scores). Decode steps of every camera together are smaller than either.
    """
    d = DTYPE_BYTES[dtype]
    q = PREFILL_CHUNK
    text = q * (4 * shape.hidden + 3 * shape.intermediate) * d
    text += 4 * shape.vocab * max(q if device == 'cpu' else 1, num_cameras)
    keys = max_context_tokens + max_frames * shape.tokens_per_frame
    if device == 'cpu':
        text += 4 * shape.heads * q * keys
    else:  # decode rows take the matmul path: heads x cameras rows of scores
        text += 4 * shape.heads * num_cameras * keys
    n = shape.vision_tokens
    vision = n * (8 * shape.vision_hidden + 2 * shape.vision_intermediate) * d
    vision += shape.vision_heads * n * n * 4
    return text + vision


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes a configuration will hold, and the memory it may use.

    :ivar available_bytes: what the node may use (0 = unknown: no check).
    """

    quantization: str
    dtype: str
    device: str
    num_cameras: int
    max_frames: int
    max_context_tokens: int
    weight_bytes: int
    cache_bytes_per_camera: int
    activation_bytes: int
    workspace_bytes: int
    available_bytes: int = 0
    num_params: int = 0
    largest_tensor_bytes: int = 0

    @property
    def cache_bytes(self) -> int:
        return self.cache_bytes_per_camera * self.num_cameras

    @property
    def total_bytes(self) -> int:
        return (self.weight_bytes + self.cache_bytes + self.activation_bytes
                + self.workspace_bytes)

    @property
    def fits(self) -> bool:
        return not self.available_bytes or self.total_bytes <= self.available_bytes

    def rows(self) -> List[Tuple[str, int, str]]:
        """(what, bytes, how it was found) of each part, for tables and Status."""
        return [
            (f'weights ({self.quantization}, rest {self.dtype})', self.weight_bytes,
             'exact'),
            (f'caches ({self.num_cameras} camera(s) x {self.max_frames} frames + '
             f'{self.max_context_tokens} tokens)', self.cache_bytes, 'exact'),
            ('activations and graph pools', self.activation_bytes, 'estimate'),
            ('workspace (cuBLAS, allocator slack)', self.workspace_bytes, 'estimate'),
        ]

    def describe(self) -> str:
        """A few lines for logs, errors and the ``mossv-ros plan`` command."""
        count = (f'{self.num_params / 1e9:.2f} B' if self.num_params >= 1e9
                 else f'{self.num_params / 1e6:.2f} M')
        lines = [f'memory plan for {self.device} ({count} parameters):']
        for what, n, how in self.rows():
            lines.append(f'  {what}: {gib(n)} ({how})')
        lines.append(f'  total: {gib(self.total_bytes)}')
        if self.available_bytes:
            verdict = 'fits' if self.fits else 'does NOT fit'
            lines.append(f'  available: {gib(self.available_bytes)}: {verdict}')
        return '\n'.join(lines)


def gib(n: int) -> str:
    """Bytes for people: GiB with two decimals, MiB below 1 GiB."""
    return f'{n / GIB:.2f} GiB' if n >= GIB else f'{n / MIB:.1f} MiB'


def plan(shape: ModelShape, quantization: str, dtype: str, device: str, num_cameras: int,
         max_frames: int, max_context_tokens: int, available_bytes: int = 0) -> MemoryPlan:
    """The plan of one configuration (see the module docstring for each part).

    :param dtype: the resolved model dtype ('bfloat16', 'float16', 'float32').
    :param device: 'cpu' or 'cuda[:N]' (activations are counted as its kernels hold them).
    :param available_bytes: the memory the node may use (0 = unknown).
    """
    kind = 'cpu' if device == 'cpu' else 'cuda'
    weights = shape.weight_bytes(quantization, dtype)
    caches = cache_bytes_per_camera(shape, max_frames, max_context_tokens, dtype)
    act = activation_bytes(shape, max_frames, max_context_tokens, num_cameras, dtype, kind)
    fixed = WORKSPACE_FIXED_CPU if kind == 'cpu' else WORKSPACE_FIXED
    work = int(fixed + WORKSPACE_SHARE * (weights + caches * num_cameras + act))
    return MemoryPlan(quantization, dtype, device, num_cameras, max_frames, max_context_tokens,
                      weights, caches, act, work, available_bytes, shape.num_params,
                      shape.largest_tensor_bytes(dtype))


def _options(device: str) -> Tuple[str, ...]:
    """Quantization modes that can run on ``device`` (quantize.check's rules, no probe)."""
    return ('int8', 'int4', 'fp8') if device != 'cpu' else ('int8',)


def suggest(shape: ModelShape, wanted: MemoryPlan) -> List[str]:
    """The nearest configurations that fit ``wanted.available_bytes``: each single change that
    is enough (a quantization mode, the most frames, the most context tokens, the most
    cameras), else int8 or int4 with the most frames that then fit.

    :returns: parameter assignments such as ``'model.quantization:=int8'``; empty when
        nothing fits (the model alone is too large).
    """
    def with_(**kw) -> MemoryPlan:
        args = dict(quantization=wanted.quantization, dtype=wanted.dtype, device=wanted.device,
                    num_cameras=wanted.num_cameras, max_frames=wanted.max_frames,
                    max_context_tokens=wanted.max_context_tokens,
                    available_bytes=wanted.available_bytes)
        args.update(kw)
        return plan(shape, **args)

    def most(field: str, low: int, high: int, **kw) -> Optional[int]:
        if high < low or not with_(**{field: low}, **kw).fits:
            return None
        while low < high:  # the largest value that fits (the plan grows with each field)
            mid = (low + high + 1) // 2
            low, high = (mid, high) if with_(**{field: mid}, **kw).fits else (low, mid - 1)
        return low

    out = []
    for mode in _options(wanted.device):
        if mode != wanted.quantization and with_(quantization=mode).fits:
            out.append(f'model.quantization:={mode}')
            break
    frames = most('max_frames', 8, wanted.max_frames - 1)
    if frames:
        out.append(f'cache.max_frames:={frames}')
    tokens = most('max_context_tokens', 512, wanted.max_context_tokens - 1)
    if tokens:
        out.append(f'cache.max_context_tokens:={tokens}')
    cams = most('num_cameras', 1, wanted.num_cameras - 1)
    if cams:
        out.append(f'{cams} camera(s) in cameras.names')
    if out:
        return out
    for mode in _options(wanted.device):
        frames = most('max_frames', 8, wanted.max_frames, quantization=mode)
        if frames:
            return [f'model.quantization:={mode} and cache.max_frames:={frames}']
    return []


class MemoryPlanError(ValueError):
    """The configuration does not fit the memory the node may use; the message holds the
    plan and the nearest configurations that fit."""

    def __init__(self, plan: MemoryPlan, suggestions: List[str]) -> None:
        self.plan = plan
        self.suggestions = suggestions
        fix = ('; would fit: ' + ' | '.join(suggestions) if suggestions
               else '; nothing fits: the model alone is larger than the memory available')
        super().__init__(f'the configuration needs {gib(plan.total_bytes)} but '
                         f'{gib(plan.available_bytes)} is available{fix}\n{plan.describe()}')


class LoadOutOfMemoryError(MemoryPlanError):
    """The device ran out of memory while the weights loaded although the plan fit (another
    process took memory meanwhile, or an estimate was short); the message holds the plan."""

    def __init__(self, plan: MemoryPlan, error: str) -> None:
        self.plan = plan
        self.suggestions = []
        ValueError.__init__(self, f'device out of memory while loading the weights ({error}); '
                            'the plan fit when configure began: free memory was taken '
                            'meanwhile, or set engine.max_device_memory_bytes lower to leave '
                            f'headroom\n{plan.describe()}')


#: memory of a CUDA card that the node cannot have: the CUDA context (kernels, handles) of
#: its process, about 0.5 GiB (an estimate; ``torch.cuda.mem_get_info`` on a robot reads it)
CUDA_CONTEXT = 512 * MIB


def fit_table(shape: ModelShape, dtype: str, card_gib=(16, 24, 32, 80), cameras=(1, 2, 4),
              modes=('none', 'int8', 'fp8', 'int4'), max_frames: int = 256,
              max_context_tokens: int = 4096) -> Dict[str, Dict[str, str]]:
    """{'<mode>, <n> camera(s): <total>': {'<g> GiB': 'yes' / 'no'}} at the given cache
    sizes, a card of ``g`` GiB offering ``g`` GiB less :data:`CUDA_CONTEXT`; for the README's
    table and ``mossv-ros plan --table``."""
    table = {}
    for mode in modes:
        for n in cameras:
            p = plan(shape, mode, dtype, 'cuda', n, max_frames, max_context_tokens)
            row = {}
            for g in card_gib:
                row[f'{g} GiB'] = 'yes' if p.total_bytes <= g * GIB - CUDA_CONTEXT else 'no'
            table[f'{mode}, {n} camera(s): {gib(p.total_bytes)}'] = row
    return table


def device_budget(device: str, max_device_memory_bytes: int) -> Tuple[int, int]:
    """(bytes the node may use, the device's total bytes): on CUDA the free memory
    (``torch.cuda.mem_get_info``) capped at ``engine.max_device_memory_bytes``; on the CPU the
    host's available memory (``MemAvailable``) capped likewise; (cap, 0) where neither can be
    read."""
    if device.startswith('cuda'):
        import torch
        free, total = torch.cuda.mem_get_info(device)
        return (min(free, max_device_memory_bytes) if max_device_memory_bytes else free), total
    avail = _host_available()
    if max_device_memory_bytes:
        return (min(avail, max_device_memory_bytes) if avail else max_device_memory_bytes), avail
    return avail, avail


def _host_available() -> int:
    try:
        with open('/proc/meminfo') as f:
            for line in f:
                if line.startswith('MemAvailable:'):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
