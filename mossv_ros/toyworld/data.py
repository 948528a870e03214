"""Toyworld tokenizer and training transcripts in the MOSS real-time stream grammar.

Stream layout (docs/model.md section 5.4): session prefix (BOS, real-time system prompt, empty
user turn, assistant header), then ``<|silence|> <|image|>`` per quiet second; a question is a
user turn (``<|eot_id|>`` + header + text + ``<|eot_id|>`` + assistant header) after which the
reply starts with ``<|silence|>`` and the answer follows the next ``<|image|>``; an answer that
is cut by a question (interruption) is followed by the new reply at once.

Targets are the assistant's tokens (words and ``<|silence|>``); ``<|image|>``, ``<|eot_id|>``
and prompt tokens are never targets (section 4.8).
"""
from dataclasses import dataclass
import json
from pathlib import Path
from typing import Dict, List

import numpy as np

from ..engine import prompt as grammar
from ..engine.tiny import special_token_layout, write_tokenizer
from .world import (
    answer_text,
    COLOURS,
    Episode,
    KINDS,
    NUMBERS,
    question_text,
    speech_frames,
)

#: Upper bound on the regular (BPE) vocabulary; the trainer stops when the corpus has no more
#: merges (681 tokens), and the special tokens follow the regular ones.
BPE_VOCAB_SIZE = 768


def corpus() -> List[str]:
    """Every text the toyworld speaks or asks, plus the real-time system prompt."""
    texts = [grammar.REALTIME_SYSTEM_PROMPT]
    for kind in KINDS:
        texts += [question_text('colour', kind), question_text('when', kind),
                  f'The {kind} is already here.', f'A {kind} appeared.']
        for colour in COLOURS:
            texts += [f'The {kind} is {colour}.', f'Now the {kind} is {colour}.']
        texts += [f'There is no {kind}.', f'Now there is no {kind}.']
    texts.append(question_text('count'))
    for n in NUMBERS:
        texts += [f'There are {n} shapes.', f'Now there are {n} shapes.']
    texts += ['There is one shape.', 'Now there is one shape.']
    return texts


def build_tokenizer():
    """Byte-level BPE trained on :func:`corpus` (``tokenizers``), special tokens appended in
    the real vocabulary's layout (``<|video|>`` = vocab - 1, ``<|image|>`` = vocab).

    :returns: (tokenizers.Tokenizer, special-token ids by name).
    """
    from tokenizers import AddedToken, decoders, models, pre_tokenizers, Tokenizer, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB_SIZE, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = corpus()
    tok.train_from_iterator(texts * 20, trainer)
    model = json.loads(tok.to_str())['model']
    vocab: Dict[str, int] = dict(model['vocab'])
    specials = special_token_layout(len(vocab))
    vocab.update(specials)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(' ')) for m in model['merges']]
    out = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    out.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    out.decoder = decoders.ByteLevel()
    out.add_special_tokens([AddedToken(name, special=True, normalized=False)
                            for name in sorted(specials, key=specials.get)])
    return out, specials


def save_tokenizer(tok, path: Path) -> None:
    """tokenizer.json + tokenizer_config.json, loadable by ``AutoTokenizer``."""
    write_tokenizer(path, tokenizer=tok)


@dataclass
class Transcript:
    """One episode as a training sequence.

    :ivar ids: int64 (seq,) token ids.
    :ivar weights: float32 (seq,), loss weight of predicting ``ids[i]`` from ``ids[:i]``;
        0 = not a target.
    :ivar frame_positions: text position of each frame's ``<|image|>`` token (frame t at
        index t).
    """

    ids: np.ndarray
    weights: np.ndarray
    frame_positions: np.ndarray


def transcript(episode: Episode, tok, specials: Dict[str, int], silence_weight: float = 1.0,
               seed: int = 0, revision_weight: float = 1.0) -> Transcript:
    """Token sequence, loss weights and frame positions of ``episode``.

    :param silence_weight: loss weight of ``<|silence|>`` targets (docs/model.md section 4.8,
        ``ForCausalLMLossWithSilence``); words weigh 1.
    :param revision_weight: loss weight of the first word token of a revision (the decision
        to speak up at the frame that shows a change); 1 = a word like any other.
    """
    rng = np.random.default_rng(seed)
    sil, img = specials[grammar.SILENCE], specials[grammar.IMAGE]

    def enc(text):
        return tok.encode(text, add_special_tokens=False).ids

    ids: List[int] = list(enc(grammar.session_start_text()))
    weights: List[float] = [0.0] * len(ids)

    def add(tokens, weight):
        ids.extend(tokens)
        weights.extend([weight] * len(tokens))

    add([sil], silence_weight)
    speech = dict(speech_frames(episode))
    by_frame = {q.after_frame: q for q in episode.questions}
    frame_positions = []
    for t, state in enumerate(episode.states):
        frame_positions.append(len(ids))
        add([img], 0.0)
        q = by_frame.get(t)
        said = speech.get(t)
        if said is not None and q is not None and q.interrupt:
            words = enc(said[1])
            cut = int(rng.integers(1, max(2, len(words))))
            add(words[:cut], 1.0)
            add(enc(grammar.question_text(q.text)), 0.0)
            reply = answer_text(q.qtype, q.kind, state, False, q.kind in state)
            if reply:
                add(enc(reply), 1.0)
            add([sil], silence_weight)
            continue
        if said is not None:
            words = enc(said[1])
            if said[2]:  # a revision: its first token is the decision to speak up
                add(words[:1], revision_weight)
                words = words[1:]
            add(words, 1.0)
        add([sil], silence_weight)
        if q is not None:
            add(enc(grammar.question_text(q.text)), 0.0)
            add([sil], silence_weight)
    return Transcript(np.asarray(ids, np.int64), np.asarray(weights, np.float32),
                      np.asarray(frame_positions, np.int64))


