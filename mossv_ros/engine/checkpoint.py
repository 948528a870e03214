"""Load a MOSS-Video-Preview checkpoint from a local directory, and write tiny ones for tests.

Both the published MOSS layout (config ``model_type`` 'video_mllama', 4.46-era weight names
such as ``language_model.model.*``) and a plain transformers 5.x 'mllama' layout load into the
stock ``MllamaForConditionalGeneration``, with no ``trust_remote_code``
(docs/model.md sections 4.9 and 6.1).
"""
from dataclasses import dataclass
import json
import logging
from pathlib import Path
import re
from typing import Callable, Dict, Optional, Tuple

import torch

from . import prompt as grammar
from .reclaim import trim_host_heap

log = logging.getLogger(__name__)

DTYPE_MAP = {'bfloat16': torch.bfloat16, 'float16': torch.float16, 'float32': torch.float32}
MOSS_MODEL_TYPES = ('video_mllama', 'mllama')


class CheckpointError(ValueError):
    """The checkpoint directory is missing, incomplete or of another architecture."""


@dataclass
class SpecialTokenIds:
    """Vocabulary ids of the stream grammar's special tokens (docs/model.md section 5.1)."""

    bos: int
    start_header: int
    end_header: int
    eot: int
    silence: int
    ellipsis: int
    video: int
    image: int


def _rename_key(key: str) -> str:
    """Map 4.46-era Mllama weight names onto transformers 5.x names (section 4.9)."""
    if key.startswith('language_model.lm_head.'):
        return key[len('language_model.'):]
    if key.startswith('language_model.model.'):
        return 'model.language_model.' + key[len('language_model.model.'):]
    for prefix in ('vision_model.', 'multi_modal_projector.'):
        if key.startswith(prefix):
            return 'model.' + key
    return key


def _legacy_key(key: str) -> str:
    """Inverse of :func:`_rename_key` (used to write the published MOSS layout)."""
    if key.startswith('lm_head.'):
        return 'language_model.' + key
    if key.startswith('model.language_model.'):
        return 'language_model.model.' + key[len('model.language_model.'):]
    if key.startswith('model.'):
        return key[len('model.'):]
    return key


def read_config(path: Path):
    """Read ``config.json`` into an ``MllamaConfig`` plus MOSS extras.

    :returns: (MllamaConfig, dict with 'pool_stride', 'model_type').
    :raises CheckpointError: missing file, unparsable JSON or another architecture.
    """
    from transformers import MllamaConfig

    cfg_file = path / 'config.json'
    if not cfg_file.is_file():
        raise CheckpointError(f'{path}: no config.json (is this a checkpoint directory?)')
    try:
        data = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f'{cfg_file}: invalid JSON: {exc}') from exc
    model_type = data.get('model_type')
    if model_type not in MOSS_MODEL_TYPES:
        raise CheckpointError(
            f'{cfg_file}: model_type {model_type!r} is not a MOSS-Video-Preview checkpoint '
            f'(expected one of {MOSS_MODEL_TYPES})')
    if 'text_config' not in data or 'vision_config' not in data:
        raise CheckpointError(f'{cfg_file}: text_config and vision_config are required')
    if data.get('quantization_config'):
        method = data['quantization_config'].get('quant_method', '?') if isinstance(
            data['quantization_config'], dict) else '?'
        raise CheckpointError(
            f'{cfg_file}: a quantized checkpoint ({method}); mossv_ros quantizes at load: point '
            'model.path at the bfloat16 checkpoint and set model.quantization (int8, fp8, '
            'int4)')
    pool_mode = data.get('pool_mode', 'average')
    if pool_mode != 'average':
        raise CheckpointError(f'{cfg_file}: pool_mode {pool_mode!r} unsupported (average only)')
    config = MllamaConfig(text_config=data['text_config'], vision_config=data['vision_config'],
                          image_token_index=data.get('image_token_index', 128256))
    extras = {'pool_stride': int(data.get('pool_stride', 4)), 'model_type': model_type}
    return config, extras


def weight_index(path: Path) -> Dict[str, Tuple[Path, str]]:
    """Where each weight is: {transformers 5.x name: (safetensors file, name stored there)},
    from ``model.safetensors.index.json`` (sharded) or ``model.safetensors`` (one file).

    :raises CheckpointError: neither file, or a shard the index names is missing.
    """
    from safetensors import safe_open

    index = path / 'model.safetensors.index.json'
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())['weight_map']
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f'{index}: not a safetensors index ({exc})') from exc
        out = {_rename_key(k): (path / f, k) for k, f in weight_map.items()}
        missing = sorted({str(f) for f, _ in out.values() if not f.is_file()})
        if missing:
            raise CheckpointError(f'{index}: shards missing: {missing[:3]}')
        return out
    single = path / 'model.safetensors'
    if single.is_file():
        with safe_open(str(single), framework='pt', device='cpu') as handle:
            return {_rename_key(k): (single, k) for k in handle.keys()}
    raise CheckpointError(f'{path}: no model.safetensors or model.safetensors.index.json')


def _group_of(name: str) -> str:
    """The load group of a weight: its decoder or encoder layer ('...layers.N'), else the
    module that owns it (embeddings, norms, the LM head)."""
    match = _LAYER.match(name)
    return match.group(1) if match else name.rsplit('.', 1)[0]


_LAYER = re.compile(r'(.*\.layers\.\d+)\.')


def load_hf_model(path: Path, dtype: torch.dtype, device: str,
                  progress: Optional[Callable[[int, int], None]] = None,
                  quantization: str = 'none', fuse: bool = False):
    """Build the stock Mllama model on the meta device and stream its weights in.

    Weights go from the memory-mapped safetensors files to ``device`` one tensor at a time, a
    layer (decoder or encoder layer, or top-level module) after another; each linear layer is
    quantized (``quantization``, :func:`.quantize.apply`) as soon as its weight is in, before
    the next tensor is read. With ``fuse`` the q/k/v and gate/up projections of the text model
    are filled into their fused linears (:mod:`.fusion`) as they arrive and quantized once
    complete, so quantized weights keep the fused GEMMs. So the device holds at most the final
    weights plus one fused projection in the model dtype, and the host one tensor's file pages
    plus its converted copy (no host copy of the model: ``bench/bench_memory.py`` measures
    it). The MOSS 4.46 layout and the mllama
    layout load alike, sharded with an index or in one file (docs/model.md section 6.1).

    :param dtype: the model dtype (every weight is converted to it as it is read).
    :param progress: called as ``progress(done_layers, total_layers)``.
    :returns: (MllamaForConditionalGeneration in eval mode, MOSS extras dict).
    :raises CheckpointError: missing or unexpected weights (checked before any is read), a
        weight of the wrong shape, or a bad directory.
    :raises ValueError: torchao refused ``quantization`` here.
    """
    from safetensors import safe_open
    from transformers import MllamaForConditionalGeneration
    from transformers.models.mllama.modeling_mllama import MllamaRotaryEmbedding

    from . import fusion, quantize

    config, extras = read_config(path)
    where = weight_index(path)
    with torch.device('meta'):
        model = MllamaForConditionalGeneration(config)
    expected = dict(model.named_parameters())
    missing = sorted(set(expected) - set(where))
    unexpected = sorted(set(where) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f'{path}: weights do not match the Mllama architecture: '
                              f'missing {missing[:5]}, unexpected {unexpected[:5]}')
    text = model.model.language_model
    slots: Dict[str, Tuple[torch.Tensor, int, tuple]] = {}  # stock weight -> fused rows
    waiting: Dict[int, set] = {}  # fused linear -> the stock weights not read yet
    text_prefix = 'model.language_model.'
    for parent, fused, stock in (fusion.targets(text, config.text_config.cross_attention_layers)
                                 if fuse else ()):
        starts = fusion.empty_fused(parent, fused, stock, device, dtype)
        prefix = text_prefix + _module_name(text, parent)
        target = (parent, fused, stock)
        waiting[id(parent)] = set()
        for name, row in starts:
            slots[f'{prefix}.{name}.weight'] = (getattr(parent, fused).weight, row, target)
            waiting[id(parent)].add(f'{prefix}.{name}.weight')
    groups: Dict[str, list] = {}
    for name in sorted(where, key=lambda n: (str(where[n][0]), _natural(n))):
        groups.setdefault(_group_of(name), []).append(name)
    for done, (group, names) in enumerate(groups.items(), 1):
        for name in names:
            file, stored = where[name]
            # a handle per tensor: the file's pages stay mapped (and resident) only while
            # their tensor is converted, never the whole file
            with safe_open(str(file), framework='pt', device='cpu') as handle:
                complete = _place(model, name, handle.get_tensor(stored), expected[name],
                                  slots, waiting, device, dtype)
            if complete is not None:  # a linear layer complete: quantized before the next
                if isinstance(complete, tuple):  # a fused one
                    parent, fused, stock = complete
                    fusion.finish(parent, fused, stock, keep_stock=quantization == 'none')
                    complete = getattr(parent, fused)
                if quantize.apply(complete, quantization):
                    trim_host_heap()
        if progress:
            progress(done, len(groups))
    text.rotary_emb = MllamaRotaryEmbedding(config.text_config).to(device)  # float32 table
    leftovers = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
                 if t.is_meta]
    if leftovers:
        raise CheckpointError(f'{path}: tensors left uninitialized: {leftovers[:5]}')
    model.eval()
    return model, extras


def _natural(name: str):
    """Sort key: layer numbers as numbers (layer 2 before layer 10)."""
    return [int(p) if p.isdigit() else p for p in name.split('.')]


def _module_name(root, module) -> str:
    for name, m in root.named_modules():
        if m is module:
            return name
    raise KeyError('module not in the model')


def _place(model, name: str, tensor: torch.Tensor, meta: torch.Tensor, slots, waiting,
           device, dtype):
    """Put one tensor read from a file (a view of its memory map) where it belongs: rows of a
    fused weight, or a parameter of its own; converted to ``dtype`` on ``device`` (always a
    copy: the model never keeps a view of the file).

    :returns: what is now complete and may be quantized: a linear layer, a (parent, fused
        name, stock names) fusion whose rows have all arrived, or None.
    """
    if tuple(tensor.shape) != tuple(meta.shape):
        raise CheckpointError(f'{name}: shape {tuple(tensor.shape)} in the checkpoint, '
                              f'{tuple(meta.shape)} expected by config.json')
    slot = slots.get(name)
    if slot is not None:
        fused, row, target = slot
        with torch.no_grad():
            fused[row:row + tensor.shape[0]].copy_(tensor)
        left = waiting[id(target[0])]
        left.discard(name)
        return None if left else target
    module_name, _, attr = name.rpartition('.')
    module = model.get_submodule(module_name)
    module._parameters[attr] = torch.nn.Parameter(
        tensor.to(device=device, dtype=dtype, copy=True), requires_grad=False)
    return module if isinstance(module, torch.nn.Linear) and attr == 'weight' else None


def load_tokenizer(path: Path, trust_remote_code: bool = False):
    """Load the checkpoint's tokenizer.

    Llama-3 checkpoints ship a fast ``tokenizer.json``: it is loaded with
    ``PreTrainedTokenizerFast`` directly (AutoTokenizer would parse config.json and warn about
    the ``video_mllama`` model type). ``AutoTokenizer`` is used otherwise, and with
    ``trust_remote_code``.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if (path / 'tokenizer.json').is_file() and not trust_remote_code:
        return PreTrainedTokenizerFast.from_pretrained(str(path))
    if not (path / 'tokenizer.model').is_file() and not (path / 'tokenizer.json').is_file():
        raise CheckpointError(f'{path}: no tokenizer.json')
    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)


def resolve_special_ids(tokenizer) -> SpecialTokenIds:
    """Resolve the grammar's special tokens by name.

    :raises CheckpointError: naming every token the tokenizer does not know (the MOSS
        tokenizer renames reserved slots 128011/128012/128255, docs/model.md section 5.1).
    """
    ids, missing = {}, []
    unk = getattr(tokenizer, 'unk_token_id', None)
    for name in grammar.REQUIRED_SPECIAL_TOKENS:
        tid = tokenizer.convert_tokens_to_ids(name)
        if tid is None or (unk is not None and tid == unk):
            missing.append(name)
        ids[name] = tid
    if missing:
        raise CheckpointError(f'tokenizer lacks required special tokens: {missing}')
    return SpecialTokenIds(
        bos=ids[grammar.BOS], start_header=ids[grammar.START_HEADER],
        end_header=ids[grammar.END_HEADER], eot=ids[grammar.EOT], silence=ids[grammar.SILENCE],
        ellipsis=ids[grammar.ELLIPSIS], video=ids[grammar.VIDEO], image=ids[grammar.IMAGE])
