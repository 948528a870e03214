"""Tokenization and the special-token defence: grammar text and users' text to token ids.

The grammar's strings (headers, ``<|eot_id|>``, ``<|image|>``) become their special ids; a
user's text never does, whatever it contains (a typed ``<|image|>`` or header stays plain text),
so no one can forge a turn or an image slot (docs/model.md sections 5.1-5.2).
"""
import threading
from typing import Callable, List, Sequence

from . import prompt as grammar
from .checkpoint import resolve_special_ids


class TokenCodec:
    """Token ids in and text out for one tokenizer; thread-safe (the callers' threads and the
    engine thread share it: transformers' fast tokenizer sets backend state per call).

    :param tokenizer: the checkpoint's tokenizer (``transformers.PreTrainedTokenizerFast``).
    :raises CheckpointError: a special token of the grammar is missing (from
        :func:`~.checkpoint.resolve_special_ids`).
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        #: the grammar's special ids (``special.image``, ``special.silence``, ...)
        self.special = resolve_special_ids(tokenizer)
        self._lock = threading.Lock()
        #: ids of every special token (Llama-3 reserves 256), which user text must not yield
        self._special_ids = set(tokenizer.all_special_ids) | {
            i for i, tok in tokenizer.added_tokens_decoder.items() if tok.special}

    def tokenize(self, text: str) -> List[int]:
        """Token ids of grammar text: special-token strings in it become special ids.
        Never for user text alone (see :meth:`question_ids`)."""
        with self._lock:
            return list(self.tokenizer.encode(text, add_special_tokens=False))

    def question_ids(self, question: str) -> List[int]:
        """Token ids of a mid-stream user turn (docs/model.md section 7.4 step 5); see
        :meth:`user_text_ids`."""
        return self.user_text_ids(grammar.question_text, question)

    def user_text_ids(self, build: Callable[[str], str], user_text: str) -> List[int]:
        """Token ids of ``build(user_text)``, grammar text around a user's text, in which the
        user's text never yields a special token.

        Text without special-token strings is tokenized as one string, exactly as in
        training; text with them in three parts (grammar, the user's text with special
        tokens split into plain text, grammar).

        :param build: ``user_text -> full text``; must contain ``user_text`` once.
        """
        with self._lock:
            user = self.tokenizer.encode(user_text, add_special_tokens=False)
        if not self._special_ids.intersection(user):
            return self.tokenize(build(user_text))
        before, after = build('\0').split('\0')
        with self._lock:  # split_special_tokens flips the shared backend's state
            plain = self.tokenizer.encode(user_text, add_special_tokens=False,
                                          split_special_tokens=True)
        return self.tokenize(before) + list(plain) + self.tokenize(after)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``, special tokens written out."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def suppressed_ids(self) -> List[int]:
        """Ids never sampled in real-time mode (docs/model.md section 7.4 step 2): the
        grammar's structural tokens, ``<|eot_id|>`` (never a real-time target) and every other
        special added token (Llama-3's reserved slots), all but ``<|silence|>``."""
        s = self.special
        ids = {s.video, s.image, s.bos, s.start_header, s.end_header, s.eot, s.ellipsis}
        added = getattr(self.tokenizer, 'added_tokens_decoder', {}) or {}
        ids |= {int(i) for i, tok in added.items() if getattr(tok, 'special', False)}
        ids.discard(s.silence)
        return sorted(ids)
