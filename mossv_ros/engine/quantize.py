"""Weight-only quantization of the text model's linear layers at load (``model.quantization``).

Decode reads every text weight once per token (docs/model.md section 8.2): smaller weights
mean less memory and, where the kernels allow, faster steps. The package quantizes with
torchao, PyTorch's own quantization library (imported only when a mode asks for it):

* ``int8``: int8 weights with a scale per output row (``Int8WeightOnlyConfig``), CPU and CUDA;
* ``fp8``: float8 (e4m3) weights (``Float8WeightOnlyConfig``), CUDA of compute capability
  8.9 or newer (Ada, Hopper);
* ``int4``: int4 weights in groups of 128 (``Int4WeightOnlyConfig``), CUDA only.

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


def apply(hf_model, mode: str) -> int:
    """Quantize the linear layers of ``hf_model`` in place (weights on their device
    already). :returns: the number of layers quantized.

    :raises ValueError: torchao refused the mode here (e.g. int4 without its kernels), with
        torchao's reason.
    """
    if mode == 'none':
        return 0
    import torch
    _import_torchao()
    from torchao.quantization import (
        Float8WeightOnlyConfig,
        Int4WeightOnlyConfig,
        Int8WeightOnlyConfig,
        quantize_,
    )
    config = {'int8': Int8WeightOnlyConfig, 'fp8': Float8WeightOnlyConfig,
              'int4': lambda: Int4WeightOnlyConfig(group_size=128)}[mode]()
    chosen = []

    def wanted(module, name: str) -> bool:
        ok = isinstance(module, torch.nn.Linear) and is_quantized_layer(name)
        if ok:
            chosen.append(name)
        return ok
    try:
        quantize_(hf_model, config, filter_fn=wanted)
    except Exception as exc:  # noqa: BLE001 - torchao's refusal, said as ours
        raise ValueError(f'model.quantization={mode}: torchao could not quantize the model '
                         f'here ({type(exc).__name__}: {exc}); use int8 or none') from exc
    return len(chosen)


def stored_bytes(tensor) -> int:
    """Bytes a parameter holds on its device: a torchao tensor's inner tensors (quantized
    data, scales, zero points), or the tensor's own bytes."""
    import torch
    if type(tensor) not in (torch.Tensor, torch.nn.Parameter) and hasattr(
            tensor, '__tensor_flatten__'):
        names, _ = tensor.__tensor_flatten__()
        return sum(stored_bytes(getattr(tensor, n)) for n in names
                   if getattr(tensor, n, None) is not None)
    return tensor.numel() * tensor.element_size()


def weight_bytes(module) -> int:
    """Bytes of ``module``'s weights as stored (quantized ones at their quantized size)."""
    return sum(stored_bytes(p) for p in module.parameters())
