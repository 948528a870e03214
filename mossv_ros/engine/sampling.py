"""Next-token sampling on the logits' device: greedy, temperature, top-k, top-p, repetition
penalty, suppressed ids, for a batch of rows at once.

Every decision is tensor arithmetic on the device (no branch on values), so a decode step
reads back only the sampled ids: one ``.tolist()`` per step (docs/model.md section 10.2).

Random draws come from named streams, one per camera: each is a generator of its own, seeded
from ``SamplingConfig.seed`` and the stream's name (:meth:`Sampler.stream_seed`), so what one
camera draws never depends on the others, and :meth:`Sampler.restart` (a session reset) makes
a stream draw again exactly as after start.
"""
import hashlib
from typing import Iterable, Optional, Sequence

import numpy as np
import torch

from .config import SamplingConfig


class Sampler:
    """Pick the next token of each row from last-row logits.

    :param config: sampling settings (temperature 0 = greedy).
    :param suppress_ids: ids the model must never emit (``<|video|>``, headers, BOS, ...,
        docs/model.md section 7.4 step 2); ids >= vocab are ignored.
    :param vocab_size: rows of the LM head.
    """

    def __init__(self, config: SamplingConfig, suppress_ids: Iterable[int],
                 vocab_size: int) -> None:
        self.config = config
        self.suppress = sorted({i for i in suppress_ids if 0 <= i < vocab_size})
        allowed = sorted(set(range(vocab_size)) - set(self.suppress))
        #: the answer when no allowed logit is finite (the first allowed id)
        self.fallback_id = allowed[0] if allowed else 0
        self._suppress_ids = {}  # device -> suppressed ids tensor
        self._generators = {}  # (stream, device) -> generator

    def stream_seed(self, stream: Optional[str]) -> int:
        """The seed of a named stream: ``config.seed`` itself for the unnamed stream (None),
        else the first 63 bits of SHA-256 of ``"<seed>:<stream>"`` (distinct per name, the
        same on every run and machine)."""
        if stream is None:
            return self.config.seed
        digest = hashlib.sha256(f'{self.config.seed}:{stream}'.encode()).digest()
        return int.from_bytes(digest[:8], 'little') >> 1

    def generator(self, stream: Optional[str] = None,
                  device='cpu') -> torch.Generator:
        """The generator of ``stream`` on ``device`` (a torch device or its name; made and
        seeded on first use)."""
        key = (stream, torch.device(device))
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=key[1]).manual_seed(
                self.stream_seed(stream))
        return self._generators[key]

    def restart(self, stream: Optional[str] = None) -> None:
        """Start ``stream`` over from its seed on every device (a session reset: the same
        input then draws the same tokens as after start)."""
        for key in [k for k in self._generators if k[0] == stream]:
            del self._generators[key]

    def _suppressed(self, device: torch.device) -> torch.Tensor:
        if device not in self._suppress_ids:
            self._suppress_ids[device] = torch.tensor(self.suppress,
                                                      dtype=torch.long).to(device)
        return self._suppress_ids[device]

    def __call__(self, logits: torch.Tensor, history: Sequence[int] = (),
                 stream: Optional[str] = None) -> int:
        """One row. :param logits: float tensor (vocab,). :param history: ids of the current
        round (repetition penalty). :param stream: the random stream (None: the unnamed
        one). :returns: the token id."""
        return int(self.sample(logits[None], [history], [stream])[0])

    @torch.no_grad()
    def sample(self, logits: torch.Tensor, histories: Sequence[Sequence[int]],
               streams: Optional[Sequence[Optional[str]]] = None) -> torch.Tensor:
        """Sample every row on the logits' device.

        :param logits: float tensor (batch, vocab).
        :param histories: each row's ids of its current round (used by the repetition
            penalty; copied to the device only when the penalty is on).
        :param streams: each row's random stream (a camera's name); None: every row draws
            from the unnamed stream, in row order.
        :returns: int64 tensor (batch,) on the same device: read it once (``.tolist()``).
        :raises ValueError: ``streams`` not one per row.
        """
        cfg = self.config
        if streams is not None and len(streams) != logits.shape[0]:
            raise ValueError(f'{len(streams)} streams for {logits.shape[0]} rows')
        suppress = self._suppressed(logits.device)
        # A NaN or +inf from the model must not reach softmax: NaN never wins, +inf is the
        # largest finite value (issue 16 item 11: "probability tensor contains inf/nan").
        logits = torch.nan_to_num(logits.detach().float(), nan=float('-inf'),
                                  posinf=torch.finfo(torch.float32).max)
        if self.suppress:
            logits = logits.index_fill(1, suppress, float('-inf'))
        hopeless = ~torch.isfinite(logits).any(-1, keepdim=True)  # (batch, 1)
        logits = logits.masked_fill(hopeless, 0.0)  # sampled, then replaced by fallback_id
        if cfg.repetition_penalty != 1.0 and any(histories):
            logits = self._penalize(logits, histories)
        if cfg.temperature == 0.0:
            ids = torch.argmax(logits, dim=-1, keepdim=True)
        else:
            generators = [self.generator(stream, logits.device)
                          for stream in (streams if streams is not None else [None])]
            ids = self._draw(logits, generators)
        return torch.where(hopeless, self.fallback_id, ids)[:, 0]

    def _penalize(self, logits: torch.Tensor, histories) -> torch.Tensor:
        """Repetition penalty (CTRL, as transformers applies it) on each row's seen ids."""
        pairs = np.array([(row, i) for row, seen in enumerate(histories)
                          for i in sorted(set(seen)) if 0 <= i < logits.shape[1]],
                         dtype=np.int64).reshape(-1, 2)
        index = torch.from_numpy(pairs.T.copy())
        if logits.is_cuda:
            index = index.pin_memory().to(logits.device, non_blocking=True)
        rows, ids = index[0], index[1]
        penalty = self.config.repetition_penalty
        vals = logits[rows, ids]
        logits = logits.clone()
        logits[rows, ids] = torch.where(vals > 0, vals / penalty, vals * penalty)
        return logits

    def _draw(self, logits: torch.Tensor, generators) -> torch.Tensor:
        """Draw one id per row: with one generator, all rows in one call; else row ``i``
        from ``generators[i]`` (a kernel per row, at most the number of cameras)."""
        cfg = self.config
        logits = (logits - logits.amax(-1, keepdim=True)) / cfg.temperature  # max 0: no overflow
        if cfg.top_k > 0:
            kth = torch.topk(logits, min(cfg.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float('-inf'))
        probs = torch.softmax(logits, dim=-1)
        if cfg.top_p < 1.0:
            sorted_p, order = torch.sort(probs, dim=-1, descending=True)
            cum = torch.cumsum(sorted_p, dim=-1)
            sorted_p = sorted_p.masked_fill(cum - sorted_p > cfg.top_p, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        if len(generators) == 1:
            return torch.multinomial(probs, 1, generator=generators[0])
        return torch.cat([torch.multinomial(row[None], 1, generator=generator)
                          for row, generator in zip(probs, generators)])

