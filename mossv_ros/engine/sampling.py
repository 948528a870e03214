"""Next-token sampling: greedy, temperature, top-k, top-p, repetition penalty, suppressed ids."""
from typing import Iterable, Sequence

import torch

from .config import SamplingConfig


class Sampler:
    """Pick the next token from last-row logits.

    :param config: sampling settings (temperature 0 = greedy).
    :param suppress_ids: ids the model must never emit (``<|video|>``, headers, BOS, ...,
        moss-model.md section 7.4 step 2); ids >= vocab are ignored.
    """

    def __init__(self, config: SamplingConfig, suppress_ids: Iterable[int],
                 vocab_size: int) -> None:
        self.config = config
        self.suppress = sorted({i for i in suppress_ids if 0 <= i < vocab_size})
        self.generator = torch.Generator().manual_seed(config.seed)

    def __call__(self, logits: torch.Tensor, history: Sequence[int] = ()) -> int:
        """:param logits: float tensor (vocab,). :param history: ids of the current round."""
        cfg = self.config
        # A NaN or +inf from the model must not reach softmax: NaN never wins, +inf is the
        # largest finite value (issue 16 item 11: "probability tensor contains inf/nan").
        logits = torch.nan_to_num(logits.detach().float().cpu(), nan=float('-inf'),
                                  posinf=torch.finfo(torch.float32).max)
        if self.suppress:
            logits[self.suppress] = float('-inf')
        if not torch.isfinite(logits).any():  # nothing left to choose from: first allowed id
            allowed = torch.ones_like(logits, dtype=torch.bool)
            allowed[self.suppress] = False
            return int(torch.nonzero(allowed)[0]) if allowed.any() else 0
        if cfg.repetition_penalty != 1.0 and history:
            idx = torch.tensor(sorted(set(history)), dtype=torch.long)
            idx = idx[idx < logits.shape[0]]
            vals = logits[idx]
            logits[idx] = torch.where(vals > 0, vals / cfg.repetition_penalty,
                                      vals * cfg.repetition_penalty)
        if cfg.temperature == 0.0:
            return int(torch.argmax(logits))
        logits = (logits - logits.max()) / cfg.temperature  # max 0: exp never overflows
        if cfg.top_k > 0:
            kth = torch.topk(logits, min(cfg.top_k, logits.shape[0])).values[-1]
            logits[logits < kth] = float('-inf')
        probs = torch.softmax(logits, dim=-1)
        if cfg.top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)
            cum = torch.cumsum(sorted_p, dim=-1)
            drop = cum - sorted_p > cfg.top_p
            sorted_p[drop] = 0.0
            probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
        return int(torch.multinomial(probs, 1, generator=self.generator))
