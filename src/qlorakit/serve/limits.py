"""Per-key rate limits over a sliding minute: requests per minute and tokens per minute.

Every authenticated request counts toward the request limit when it arrives (:meth:`admit`), valid
or not. Once its prompt is known it reserves ``prompt_tokens + max_tokens`` (the most it can use,
as OpenAI counts) with :meth:`reserve`, and settles to the real count when it ends
(:meth:`settle`), so a flood of long requests is stopped before it runs and short answers give
their unused tokens back.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["RateLimiter", "Reservation", "Denied"]

WINDOW_S = 60.0


@dataclass
class Reservation:
    key_id: str
    at: float
    tokens: int


@dataclass
class Denied:
    """Why a request was refused and when to try again."""

    reason: str  # "requests" | "tokens"
    limit: int
    retry_after_s: float


class RateLimiter:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._events: dict[str, deque[Reservation]] = {}

    def _window(self, key_id: str, now: float) -> deque[Reservation]:
        q = self._events.setdefault(key_id, deque())
        while q and q[0].at <= now - WINDOW_S:
            q.popleft()
        return q

    def admit(self, key_id: str, *, rpm: int) -> Reservation | Denied:
        """Count one request of ``key_id`` (no tokens yet), or say when it may retry."""
        with self._lock:
            now = self._clock()
            q = self._window(key_id, now)
            if len(q) >= rpm:
                # the window drops below the limit when the rpm-th newest request leaves it
                return Denied("requests", rpm, q[len(q) - rpm].at + WINDOW_S - now)
            res = Reservation(key_id, now, 0)
            q.append(res)
            return res

    def reserve(self, res: Reservation, tokens: int, *, tpm: int) -> Denied | None:
        """Reserve ``tokens`` for an admitted request, or say when enough will be free."""
        with self._lock:
            now = self._clock()
            q = self._window(res.key_id, now)
            used = sum(r.tokens for r in q if r is not res)
            if used + tokens <= tpm:
                res.tokens = tokens
                return None
            # the earliest time at which enough reserved tokens have left the window
            free, wait = tpm - used, WINDOW_S
            for r in q:
                if r is res:
                    continue
                free += r.tokens
                if free >= tokens:
                    wait = r.at + WINDOW_S - now
                    break
            return Denied("tokens", tpm, wait)

    def settle(self, res: Reservation, tokens: int) -> None:
        """Replace the reserved count with the tokens the request really used."""
        with self._lock:
            res.tokens = max(0, int(tokens))

    def usage(self, key_id: str) -> tuple[int, int]:
        """(requests, tokens) of ``key_id`` in the current window."""
        with self._lock:
            q = self._window(key_id, self._clock())
            return len(q), sum(r.tokens for r in q)
