"""Tiny checkpoints of the MOSS architecture, written to disk like a real one.

The configuration is docs/model.md section 9: 112 px frames (7 pad tokens, as at 11B), 4x4
pooling to 5 tokens per frame, GQA group 2, llama3 RoPE scaling, cross layers [1, 3], and the
special-token ids laid out like the real vocabulary (``<|video|>`` = vocab - 1,
``<|image|>`` = vocab, embeddable but not generable).
"""
import json
from pathlib import Path
from typing import Dict

import torch

from . import prompt as grammar
from .checkpoint import _legacy_key


def special_token_layout(base: int) -> Dict[str, int]:
    """Special-token ids after ``base`` regular tokens, laid out like the real vocabulary
    (docs/model.md sections 5.1 and 9): bos, end_of_text, pad, headers, eot, silence,
    ``<|...|>``, reserved slots, then ``<|video|>`` = vocab - 1 and ``<|image|>`` = vocab,
    where vocab (lm_head rows) = ``base + 16``."""
    return {
        grammar.BOS: base,
        '<|end_of_text|>': base + 1,
        '<|finetune_right_pad_id|>': base + 2,
        grammar.START_HEADER: base + 3,
        grammar.END_HEADER: base + 4,
        grammar.EOT: base + 5,
        grammar.SILENCE: base + 6,
        grammar.ELLIPSIS: base + 7,
        **{f'<|reserved_special_token_{i}|>': base + 4 + i for i in range(4, 11)},
        grammar.VIDEO: base + 15,
        grammar.IMAGE: base + 16,
    }


#: Special-token ids of the tiny vocabulary (docs/model.md section 9); 0-255 are bytes.
TINY_SPECIAL_TOKENS: Dict[str, int] = special_token_layout(256)
TINY_VOCAB_SIZE = 272  # lm_head rows; embeddings have vocab + 8 rows


def tiny_config_dict(image_size: int = 112, vision_hidden: int = 32, text_hidden: int = 64,
                     text_layers: int = 5, cross_layers=(1, 3), intermediate: int = 128,
                     vision_layers: int = 4, global_layers: int = 2, heads: int = 4,
                     kv_heads: int = 2, vision_heads: int = 2,
                     max_positions: int = 4096, rope_theta: float = 500000.0,
                     special_tokens: Dict[str, int] = TINY_SPECIAL_TOKENS) -> dict:
    """config.json contents in the published MOSS layout (model_type 'video_mllama').

    :param rope_theta: RoPE base (docs/model.md section 9 uses the 11B's 500000).
    :param special_tokens: ids by name (:func:`special_token_layout`); the vocabulary size is
        the ``<|image|>`` id.
    """
    ids = special_tokens
    inter_idx = [1, 3] if vision_layers >= 4 else [1]
    return {
        'architectures': ['VideoMllamaForConditionalGeneration'],
        'model_type': 'video_mllama',
        'pool_mode': 'average',
        'pool_stride': 4,
        'image_token_index': ids[grammar.IMAGE],
        'silence_token_id': ids[grammar.SILENCE],
        'torch_dtype': 'float32',
        'text_config': {
            'model_type': 'mllama_text_model',
            'vocab_size': ids[grammar.IMAGE], 'hidden_size': text_hidden,
            'num_attention_heads': heads, 'num_key_value_heads': kv_heads,
            'intermediate_size': intermediate, 'num_hidden_layers': text_layers,
            'cross_attention_layers': list(cross_layers), 'rms_norm_eps': 1e-5,
            'rope_theta': float(rope_theta),
            'rope_scaling': {'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0,
                             'high_freq_factor': 4.0, 'original_max_position_embeddings': 64},
            'max_position_embeddings': max_positions,
            'bos_token_id': ids[grammar.BOS],
            'eos_token_id': ids[grammar.EOT],
            'pad_token_id': ids['<|finetune_right_pad_id|>'],
            'tie_word_embeddings': False,
        },
        'vision_config': {
            'model_type': 'mllama_vision_model',
            'hidden_size': vision_hidden, 'attention_heads': vision_heads,
            'intermediate_size': 2 * vision_hidden, 'num_hidden_layers': vision_layers,
            'num_global_layers': global_layers, 'image_size': image_size, 'patch_size': 14,
            'max_num_tiles': 4, 'intermediate_layers_indices': inter_idx,
            'vision_output_dim': vision_hidden * (1 + len(inter_idx)), 'norm_eps': 1e-5,
        },
    }


#: Special-token ids of the real 11B vocabulary (docs/model.md sections 3 and 5.1).
MOSS_SPECIAL_TOKENS: Dict[str, int] = {
    grammar.BOS: 128000, '<|end_of_text|>': 128001, '<|finetune_right_pad_id|>': 128004,
    grammar.START_HEADER: 128006, grammar.END_HEADER: 128007, grammar.EOT: 128009,
    grammar.SILENCE: 128011, grammar.ELLIPSIS: 128012, grammar.VIDEO: 128255,
    grammar.IMAGE: 128256,
}


def moss_11b_config_dict() -> dict:
    """config.json of the 11B model in the MOSS layout (docs/model.md section 3), for random
    weights of the real shapes (benchmarks: speed does not depend on weight values)."""
    cfg = tiny_config_dict(image_size=560, vision_hidden=1280, text_hidden=4096,
                           text_layers=40, cross_layers=(3, 8, 13, 18, 23, 28, 33, 38),
                           intermediate=14336, vision_layers=32, global_layers=8, heads=32,
                           kv_heads=8, vision_heads=16, max_positions=131072)
    cfg['image_token_index'] = MOSS_SPECIAL_TOKENS[grammar.IMAGE]
    cfg['silence_token_id'] = MOSS_SPECIAL_TOKENS[grammar.SILENCE]
    cfg['torch_dtype'] = 'bfloat16'
    text = cfg['text_config']
    text.update(vocab_size=128256, bos_token_id=128000, eos_token_id=128009,
                pad_token_id=128004)
    text['rope_scaling']['original_max_position_embeddings'] = 8192
    vision = cfg['vision_config']
    vision.update(intermediate_size=5120, intermediate_layers_indices=[3, 7, 15, 23, 30],
                  vision_output_dim=7680)
    return cfg


def _bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's reversible byte -> printable-unicode table used by byte-level BPE."""
    bs = (list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1))
          + list(range(ord('®'), ord('ÿ') + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def build_byte_tokenizer(special_tokens: Dict[str, int] = TINY_SPECIAL_TOKENS):
    """A byte-level tokenizer (``tokenizers`` library): id = byte value for 0-255, then the
    special tokens at the ids given."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers, Tokenizer

    table = _bytes_to_unicode()
    vocab = {table[b]: b for b in range(256)}
    vocab.update(special_tokens)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(name, special=True, normalized=False)
                            for name in sorted(special_tokens, key=special_tokens.get)])
    return tok


def write_tokenizer(path: Path, special_tokens: Dict[str, int] = TINY_SPECIAL_TOKENS,
                    tokenizer=None) -> None:
    """Write tokenizer.json and tokenizer_config.json loadable by ``AutoTokenizer``.

    :param tokenizer: a ``tokenizers.Tokenizer`` to save (default: the byte-level one built
        from ``special_tokens``).
    """
    path.mkdir(parents=True, exist_ok=True)
    (tokenizer or build_byte_tokenizer(special_tokens)).save(str(path / 'tokenizer.json'))
    (path / 'tokenizer_config.json').write_text(json.dumps({
        'tokenizer_class': 'PreTrainedTokenizerFast',
        'bos_token': grammar.BOS, 'eos_token': grammar.EOT,
        'pad_token': '<|finetune_right_pad_id|>', 'model_max_length': 4096,
        'clean_up_tokenization_spaces': False,
    }, indent=2))


def build_tiny_model(config_dict: dict, seed: int = 0, gate_value: float = 0.5,
                     init_std: float = 0.02):
    """A randomly initialized stock ``MllamaForConditionalGeneration`` (float32).

    Stock init sets every gate to zero, which hides cross-attention bugs; all gates are set to
    ``gate_value`` (docs/model.md section 9, test hygiene).

    :param config_dict: a config.json mapping (:func:`tiny_config_dict`); left unchanged
        (transformers 5 writes ``rope_theta`` into the ``rope_scaling`` it is given, so it
        gets a copy).
    """
    import copy

    from transformers import MllamaConfig, MllamaForConditionalGeneration

    config_dict = copy.deepcopy(config_dict)
    config = MllamaConfig(text_config=config_dict['text_config'],
                          vision_config=config_dict['vision_config'],
                          image_token_index=config_dict['image_token_index'])
    config.text_config.initializer_range = init_std
    config.vision_config.initializer_range = init_std
    torch.manual_seed(seed)
    model = MllamaForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(('gate', 'gate_attn', 'gate_ffn', 'cross_attn_attn_gate',
                              'cross_attn_mlp_gate')) and param.numel() == 1:
                param.fill_(gate_value)
    return model


def write_tiny_checkpoint(path, seed: int = 0, layout: str = 'moss',
                          config_dict: dict = None, model=None,
                          max_shard_bytes: int = 0) -> Path:
    """Write a tiny checkpoint directory: config.json, model.safetensors, tokenizer.

    :param layout: 'moss' (model_type 'video_mllama', 4.46 weight names) or 'mllama'
        (transformers 5.x names and model_type).
    :param model: weights to save (e.g. a trained toy model); random when None.
    :param max_shard_bytes: > 0: shards of at most this size (a tensor larger than it gets a
        shard of its own), ``model-0000i-of-0000n.safetensors`` with
        ``model.safetensors.index.json``, as checkpoints on the hub are laid out.
    :returns: the directory.
    """
    from safetensors.torch import save_file

    if layout not in ('moss', 'mllama'):
        raise ValueError(f'layout={layout!r}: expected moss or mllama')
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config_dict = dict(config_dict or tiny_config_dict())
    if model is None:
        model = build_tiny_model(config_dict, seed=seed)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    if layout == 'moss':
        state = {_legacy_key(k): v for k, v in state.items()}
    else:
        config_dict['model_type'] = 'mllama'
        config_dict['architectures'] = ['MllamaForConditionalGeneration']
    if max_shard_bytes > 0:
        _save_sharded(state, path, max_shard_bytes)
    else:
        save_file(state, str(path / 'model.safetensors'), metadata={'format': 'pt'})
    (path / 'config.json').write_text(json.dumps(config_dict, indent=2))
    write_tokenizer(path)
    return path


def _save_sharded(state: Dict[str, torch.Tensor], path: Path, max_shard_bytes: int) -> None:
    """``state`` in shards of at most ``max_shard_bytes`` plus the index (the layout of
    ``model.safetensors.index.json``: ``metadata.total_size`` and ``weight_map``)."""
    from safetensors.torch import save_file

    shards, size = [{}], 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f'model-{i:05d}-of-{len(shards):05d}.safetensors'
        save_file(shard, str(path / name), metadata={'format': 'pt'})
        weight_map.update({key: name for key in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    (path / 'model.safetensors.index.json').write_text(json.dumps(
        {'metadata': {'total_size': total}, 'weight_map': weight_map}, indent=2))
