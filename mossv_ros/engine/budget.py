"""The cache memory budget: the one owner of how many bytes the sessions' caches may hold.

Three limits, all in bytes of cache in use (text KV cache + vision cache, docs/model.md
section 8.1): ``cache.max_memory_bytes`` per session, the cap a device out-of-memory error
taught a session (the size it had when the device could not hold more), and
``cache.max_total_memory_bytes`` for every session together. The runner asks
:meth:`CacheBudget.session_cap` when it inserts a frame and :meth:`CacheBudget.check_start`
when a session starts, and tells :meth:`CacheBudget.learn_oom` after an OOM; the engine asks
:meth:`CacheBudget.fit_total` when a session grew. Pure Python over the sessions' counters.
"""
from typing import Dict, Sequence


class CacheBudget:
    """:param max_session_bytes: ``cache.max_memory_bytes`` (0 = no limit).
    :param max_total_bytes: ``cache.max_total_memory_bytes`` (0 = no limit).
    """

    def __init__(self, max_session_bytes: int = 0, max_total_bytes: int = 0) -> None:
        self.max_session_bytes = max_session_bytes
        self.max_total_bytes = max_total_bytes
        self._oom_caps: Dict[object, int] = {}  # session -> bytes (kept across its resets)

    def session_cap(self, session) -> int:
        """The most cache bytes ``session`` may hold now (0 = no limit)."""
        caps = [c for c in (self.max_session_bytes, self._oom_caps.get(session, 0)) if c]
        return min(caps) if caps else 0

    def learn_oom(self, session) -> int:
        """The device ran out of memory with ``session`` at its present size (after the
        caller evicted): that size is its cap from now on. :returns: the cap."""
        self._oom_caps[session] = session.cache_bytes
        return session.cache_bytes

    def check_start(self, prompt_tokens: int, free_tokens: int, bytes_per_token: int,
                    bytes_per_frame: int) -> None:
        """A session can start under the per-session cap: its prompt, ``free_tokens`` more
        and one frame fit. :raises ValueError: naming the parameter and what would work."""
        need = (prompt_tokens + free_tokens) * bytes_per_token + bytes_per_frame
        cap = self.max_session_bytes
        if cap and cap < need:
            raise ValueError(f'cache.max_memory_bytes={cap} is too small: the session prompt, '
                             f'{free_tokens} free tokens and one frame need {need} bytes; '
                             'use at least that, or 0 (off)')

    def fit_total(self, grown, sessions: Sequence, runner) -> int:
        """``cache.max_total_memory_bytes``: the session that just grew gives frames back (in
        eviction-policy order, keeping one) until every session together fits.
        :returns: frames evicted."""
        if not self.max_total_bytes:
            return 0
        evicted = 0
        while (sum(s.cache_bytes for s in sessions) > self.max_total_bytes
               and grown.vision_cache.num_frames > 1):
            runner.evict_one(grown)
            evicted += 1
        return evicted
