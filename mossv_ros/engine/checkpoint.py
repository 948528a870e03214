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
from typing import Callable, Dict, Optional

import torch

from . import prompt as grammar

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


def _weight_files(path: Path):
    index = path / 'model.safetensors.index.json'
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())['weight_map'].values()))
        return [path / s for s in shards]
    single = path / 'model.safetensors'
    if single.is_file():
        return [single]
    raise CheckpointError(f'{path}: no model.safetensors or model.safetensors.index.json')


def load_hf_model(path: Path, dtype: torch.dtype, device: str,
                  progress: Optional[Callable[[int, int], None]] = None):
    """Instantiate the stock Mllama model on the meta device and load weights into it.

    :param progress: called as ``progress(done_files, total_files)``.
    :returns: (MllamaForConditionalGeneration in eval mode, MOSS extras dict).
    :raises CheckpointError: missing or unexpected weights, or a bad directory.
    """
    from safetensors import safe_open
    from transformers import MllamaForConditionalGeneration
    from transformers.models.mllama.modeling_mllama import MllamaRotaryEmbedding

    config, extras = read_config(path)
    files = _weight_files(path)
    with torch.device('meta'):
        model = MllamaForConditionalGeneration(config)
    state: Dict[str, torch.Tensor] = {}
    for i, file in enumerate(files):
        with safe_open(str(file), framework='pt', device='cpu') as handle:
            for key in handle.keys():
                state[_rename_key(key)] = handle.get_tensor(key).to(device=device, dtype=dtype)
        if progress:
            progress(i + 1, len(files))
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(f'{path}: weights do not match the Mllama architecture: '
                              f'missing {result.missing_keys[:5]}, '
                              f'unexpected {result.unexpected_keys[:5]}')
    text = model.model.language_model
    text.rotary_emb = MllamaRotaryEmbedding(config.text_config).to(device)  # float32 table
    leftovers = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
                 if t.is_meta]
    if leftovers:
        raise CheckpointError(f'{path}: tensors left uninitialized: {leftovers[:5]}')
    model.eval()
    return model, extras


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
