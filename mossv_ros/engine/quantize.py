"""Weight-only quantization of the text model's linear layers at load (``model.quantization``).

Decode reads every text weight once per token (docs/model.md section 8.2): smaller weights
mean less memory and, where the kernels allow, faster steps. The package quantizes with
torchao, PyTorch's own quantization library (imported only when a mode asks for it):

* ``int8``: int8 weights with a scale per output row (``Int8WeightOnlyConfig``), CPU and CUDA;
* ``fp8``: float8 (e4m3) weights with a scale per row, activations quantized per row at run
  time (``Float8DynamicActivationFloat8WeightConfig``): a real fp8 GEMM, CUDA of compute
  capability 8.9 or newer (Ada, Hopper);
* ``int4``: int4 weights in groups of 128 (``Int4WeightOnlyConfig``, ``tile_packed_to_4d``
  packing: PyTorch's own int4 kernel), CUDA only.

What is quantized: every linear layer, whose weights are 94 % of the 11B model's 10.67 B
parameters: the text decoder's self- and cross-attention projections and MLPs (8.72 B), the
vision tower's (0.79 B), the projector and the LM head (0.53 B). The text decoder alone would
not be enough: in int8 the model would still hold 12.6 GB (its other 1.95 B parameters in
bfloat16), in int4 8.5 GB, and the goal is the model and one camera's caches in a 16 GB GPU
(int8 <= 12 GB, int4 <= 7 GB; docs/model.md section 8.1). What stays in the model's dtype:
the token embeddings (a lookup of one row per token: their 1.05 GB are read a row at a time),
the patch convolution, position and tile embeddings, norms and gates (small, and the vision
path's first and most sensitive steps). Measured on the toyworld model in int8: the same
utterances as float32 on held-out episodes (``test_quantize.py``, ``bench_quantization.py``).
"""
import contextlib
from typing import Optional, Tuple

#: ``model.quantization`` values
QUANTIZATIONS = ('none', 'int8', 'fp8', 'int4')
#: where torchao comes from (the version the package is tested with)
TORCHAO_HINT = 'pip install torchao==0.18.0'


def check(mode: str, device: str, capability: Optional[Tuple[int, int]] = None) -> None:
    """Refuse a combination that cannot run, before any weight is read.

    :param mode: one of :data:`QUANTIZATIONS`.
    :param device: the resolved device ('cpu', 'cuda', 'cuda:N').
    :param capability: the CUDA device's compute capability (major, minor); None on the CPU.
    :raises ValueError: naming ``model.quantization``, why, and what would work.
    """
    if mode == 'none':
        return
    if mode not in QUANTIZATIONS:
        raise ValueError(f'model.quantization={mode!r} is invalid: expected one of '
                         f'{QUANTIZATIONS}')
    cuda = device.startswith('cuda')
    if mode in ('int4', 'fp8') and not cuda:
        raise ValueError(f'model.quantization={mode} needs CUDA (torchao has no {mode} '
                         f'weight-only kernels for the CPU; the model runs on {device}): use '
                         'int8 or none')
    if mode == 'fp8' and capability is not None and tuple(capability) < (8, 9):
        raise ValueError(f'model.quantization=fp8 needs a GPU of compute capability 8.9 or '
                         f'newer (Ada, Hopper); this one is {capability[0]}.{capability[1]}: '
                         'use int8 (or int4)')
    try:
        _import_torchao()
    except ImportError as exc:
        raise ValueError(f'model.quantization={mode} needs torchao, which is not installed '
                         f'({TORCHAO_HINT}); or set model.quantization:=none') from exc


@contextlib.contextmanager
def quiet_torchao():
    """While transformers or torchao is imported: torchao, when installed, is imported by
    transformers' model code too, and logs the optional kernel libraries this machine cannot
    load (CUDA-only ones on the CPU), and torch deprecation notes about its enums; neither is
    an error of ours, so a user never reads them."""
    import logging
    loggers = [logging.getLogger(name) for name in ('torchao', 'torch.utils._pytree')]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)


def _import_torchao():
    with quiet_torchao():
        import torchao
    return torchao


def is_quantized_layer(name: str) -> bool:
    """Every linear layer is quantized (the module docstring says why); ``name`` is the
    layer's module name (kept for the filter's signature and the tests)."""
    return bool(name)


def _config(mode: str):
    """torchao's configuration for ``mode``: int8 weight-only per output row (gpt-fast's int8
    path: the conversion fuses into the GEMM when the step is compiled); fp8 weights and
    activations per row, served by a real fp8 GEMM (``torch._scaled_mm``, row-wise scales,
    compute capability 8.9+); int4 in groups of 128 packed as ``tile_packed_to_4d``, served
    by PyTorch's own ``_weight_int4pack_mm`` (torchao's default packing needs the ``mslk``
    package, which does not install here)."""
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Int4WeightOnlyConfig,
        Int8WeightOnlyConfig,
        PerRow,
    )
    if mode == 'int8':
        return Int8WeightOnlyConfig()
    if mode == 'fp8':
        return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    return Int4WeightOnlyConfig(group_size=128, int4_packing_format='tile_packed_to_4d')


def is_quantized(tensor) -> bool:
    """True for a torchao weight (a tensor subclass holding quantized data and scales)."""
    import torch
    return type(tensor) not in (torch.Tensor, torch.nn.Parameter) and hasattr(
        tensor, '__tensor_flatten__')


def apply(module, mode: str) -> int:
    """Quantize the linear layers of ``module`` (a whole model, or one layer during the
    streaming load) in place; weights on their device already, layers quantized before are
    left as they are. :returns: the number of layers quantized now.

    :raises ValueError: torchao refused the mode here (e.g. int4 without its kernels), with
        torchao's reason.
    """
    if mode == 'none':
        return 0
    import torch
    _import_torchao()
    from torchao.quantization import quantize_
    chosen = []

    def wanted(sub, name: str) -> bool:
        ok = (isinstance(sub, torch.nn.Linear) and is_quantized_layer(name or 'root')
              and not sub.weight.is_meta and not is_quantized(sub.weight))
        if ok:
            chosen.append(name)
        return ok
    try:
        with quiet_torchao():
            quantize_(module, _config(mode), filter_fn=wanted)
    except Exception as exc:  # noqa: BLE001 - torchao's refusal, said as ours
        raise ValueError(f'model.quantization={mode}: torchao could not quantize the model '
                         f'here ({type(exc).__name__}: {exc}); use int8 or none') from exc
    return len(chosen)


def count_quantized(module) -> int:
    """Linear layers of ``module`` whose weights are quantized."""
    import torch
    return sum(1 for m in module.modules()
               if isinstance(m, torch.nn.Linear) and is_quantized(m.weight))


def stored_bytes(tensor) -> int:
    """Bytes a parameter holds on its device: a torchao tensor's inner tensors (quantized
    data, scales, zero points), or the tensor's own bytes."""
    if is_quantized(tensor):
        names, _ = tensor.__tensor_flatten__()
        return sum(stored_bytes(getattr(tensor, n)) for n in names
                   if getattr(tensor, n, None) is not None)
    return tensor.numel() * tensor.element_size()


def weight_bytes(module) -> int:
    """Bytes of ``module``'s weights as stored (quantized ones at their quantized size; a
    storage that several parameters view, such as a fused projection's, counted once)."""
    total, seen = 0, set()
    for p in module.parameters():
        if is_quantized(p):
            total += stored_bytes(p)
            continue
        storage = p.untyped_storage()
        key = (storage.data_ptr(), p.device)
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total
