"""Next-token sampling on the logits' device: greedy, temperature, top-k, top-p, repetition
penalty, suppressed ids, for a batch of rows at once.

Every decision is tensor arithmetic on the device (no branch on values), so a decode step
reads back only the sampled ids: one ``.tolist()`` per step (docs/model.md section 10.2).
"""
from typing import Iterable, Sequence

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
        self._device_state = {}  # device -> (suppressed ids tensor, generator)

    def _state(self, device: torch.device):
        if device not in self._device_state:
            generator = torch.Generator(device=device).manual_seed(self.config.seed)
            ids = torch.tensor(self.suppress, dtype=torch.long).to(device)
            self._device_state[device] = (ids, generator)
        return self._device_state[device]

    @property
    def generator(self) -> torch.Generator:
        """The CPU generator (seeded with ``config.seed``)."""
        return self._state(torch.device('cpu'))[1]

    def __call__(self, logits: torch.Tensor, history: Sequence[int] = ()) -> int:
        """One row. :param logits: float tensor (vocab,). :param history: ids of the current
        round (repetition penalty). :returns: the token id."""
        return int(self.sample(logits[None], [history])[0])

    @torch.no_grad()
    def sample(self, logits: torch.Tensor, histories: Sequence[Sequence[int]]) -> torch.Tensor:
        """Sample every row on the logits' device.

        :param logits: float tensor (batch, vocab).
        :param histories: each row's ids of its current round (used by the repetition
            penalty; copied to the device only when the penalty is on).
        :returns: int64 tensor (batch,) on the same device: read it once (``.tolist()``).
        """
        cfg = self.config
        suppress, generator = self._state(logits.device)
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
            ids = self._draw(logits, generator)
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

    def _draw(self, logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
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
        return torch.multinomial(probs, 1, generator=generator)

