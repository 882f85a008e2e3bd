"""One generation at a time, taken round-robin across API keys.

The model (one base, adapters switched per request) is used by a single worker thread, so an
adapter switch can never happen under a running generation and memory stays that of one request.
Waiting requests sit in one queue per key; the worker takes the next request from the next key in
turn, so a client that sends a hundred requests delays another client by at most one request per
turn, not by a hundred. Queues are bounded: :class:`QueueFull` says which bound and when to retry.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["FairScheduler", "QueueFull"]


class QueueFull(Exception):
    def __init__(self, scope: str, limit: int, retry_after_s: float) -> None:
        super().__init__(f"the {scope} queue is full ({limit} waiting requests)")
        self.scope = scope  # "server" | "key"
        self.limit = limit
        self.retry_after_s = retry_after_s


@dataclass
class _Job:
    key_id: str
    fn: Callable[[], Any]
    future: concurrent.futures.Future[Any] = field(default_factory=concurrent.futures.Future)
    enqueued_at: float = field(default_factory=time.monotonic)


class FairScheduler:
    """A bounded, per-key round-robin queue in front of one worker thread."""

    def __init__(self, max_queue: int, max_queue_per_key: int, name: str = "qlorakit-generate") -> None:
        self.max_queue = max_queue
        self.max_queue_per_key = max_queue_per_key
        self._queues: dict[str, deque[_Job]] = {}
        self._ring: deque[str] = deque()  # keys with waiting jobs, in serving order
        self._waiting = 0
        self._cond = threading.Condition()
        self._closed = False
        self._recent: deque[float] = deque(maxlen=32)  # seconds per finished job, for Retry-After
        self.busy = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------------------------------
    def typical_job_s(self) -> float:
        return sum(self._recent) / len(self._recent) if self._recent else 1.0

    def waiting(self, key_id: str | None = None) -> int:
        with self._cond:
            return self._waiting if key_id is None else len(self._queues.get(key_id, ()))

    def submit(self, key_id: str, fn: Callable[[], Any]) -> concurrent.futures.Future[Any]:
        """Queue ``fn`` (run in the worker thread); its result or exception lands in the future."""
        with self._cond:
            if self._closed:
                raise RuntimeError("the scheduler is closed")
            mine = self._queues.setdefault(key_id, deque())
            if self._waiting >= self.max_queue:
                raise QueueFull("server", self.max_queue, self._waiting * self.typical_job_s())
            if len(mine) >= self.max_queue_per_key:
                # this key's next turn comes after one job of every other waiting key
                raise QueueFull("key", self.max_queue_per_key, len(self._ring) * self.typical_job_s())
            job = _Job(key_id, fn)
            if not mine:
                self._ring.append(key_id)
            mine.append(job)
            self._waiting += 1
            self._cond.notify()
            return job.future

    def _take(self) -> _Job | None:
        with self._cond:
            while not self._ring and not self._closed:
                self._cond.wait()
            if self._closed and not self._ring:
                return None
            key = self._ring.popleft()
            q = self._queues[key]
            job = q.popleft()
            if q:
                self._ring.append(key)
            else:
                del self._queues[key]
            self._waiting -= 1
            return job

    def _run(self) -> None:
        while True:
            job = self._take()
            if job is None:
                return
            if not job.future.set_running_or_notify_cancel():
                continue  # the client went away while waiting
            self.busy = True
            t0 = time.monotonic()
            try:
                result = job.fn()
            except BaseException as e:  # handed to the waiting request, which answers with it
                job.future.set_exception(e)
            else:
                job.future.set_result(result)
            finally:
                self._recent.append(time.monotonic() - t0)
                self.busy = False

    def close(self, timeout: float | None = 30.0) -> None:
        """Cancel waiting jobs, let the running one finish, stop the worker."""
        with self._cond:
            self._closed = True
            for q in self._queues.values():
                for job in q:
                    job.future.cancel()
            self._queues.clear()
            self._ring.clear()
            self._waiting = 0
            self._cond.notify_all()
        self._thread.join(timeout)
