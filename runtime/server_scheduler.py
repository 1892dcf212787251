"""Who runs when in `dzc serve`: a pool of executors, one per running request, and a FIFO queue for the rest.

A running request owns one executor (so its own KV cache) and one worker thread from start to end; the
event loop never runs model code. There are at most `max_concurrency` running requests, so at most that
many executors, created the first time they are needed and reused afterwards (reset, their caches emptied).
A request that finds every slot busy waits in a first-come-first-served queue; a finishing request hands its
slot straight to the oldest waiter, so later arrivals cannot overtake it. The queue is bounded
(`max_queue`); beyond it the server answers 503 at once.

Cancellation is cooperative: `Job.cancel()` sets a flag that the worker reads after every generated token,
so a client that goes away frees its slot within one decode step (a prefill in progress finishes first).
This is one sequence per executor, not continuous batching: running requests share the CPU (or device)
rather than a batched forward pass.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

from dzc.runtime.executor import ModelExecutor
from dzc.runtime.generate import StreamEvent
from dzc.runtime.sampling import SamplingParams

log = logging.getLogger("dzc.serve")

GenerateFn = Callable[[ModelExecutor, Sequence[int], SamplingParams], Iterator[StreamEvent]]


class ServerBusy(Exception):
    """The wait queue is full."""


@dataclass(frozen=True)
class _End:
    error: BaseException | None = None


class Job:
    """One generation: created and read on the event loop, run on a worker thread.

    Events arrive in order through `next()`; the last StreamEvent has finish_reason set, after which `next()`
    returns None. An exception raised by the generation (including the input checks `generate` makes before
    its first token) is raised by `next()` instead.
    """

    def __init__(self, request_id: str, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        self.id = request_id
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.queue_position = 0  # place in the queue on arrival (1 = next in line; 0 = started at once)
        self.queue_wait = 0.0  # seconds spent waiting for a slot
        self.generated = 0  # tokens generated so far (written by the worker)
        self._events: asyncio.Queue[StreamEvent | _End] = asyncio.Queue()
        self._cancel = threading.Event()

    def cancel(self) -> None:
        """Stop generating after the current token and give the slot back. Safe to call at any time, twice."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    async def next(self) -> StreamEvent | None:
        item = await self._events.get()
        if isinstance(item, _End):
            self._events.put_nowait(item)  # the end stays visible to later calls
            if item.error is not None:
                raise item.error
            return None
        return item


class Scheduler:
    def __init__(self, make_executor: Callable[[], ModelExecutor], generate: GenerateFn, max_concurrency: int,
                 max_queue: int) -> None:
        if max_concurrency < 1 or max_queue < 0:
            raise ValueError("max_concurrency must be >= 1 and max_queue >= 0")
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self._make_executor = make_executor
        self._generate = generate
        self._threads = ThreadPoolExecutor(max_concurrency, thread_name_prefix="dzc-slot")
        # Event-loop side: slots in use, waiters in arrival order, jobs running.
        self._running = 0
        self._waiting: deque[asyncio.Future[None]] = deque()
        self._jobs: set[Job] = set()
        self.counts = {"completed": 0, "cancelled": 0, "failed": 0}
        # Worker side: the executors, under a lock.
        self._lock = threading.Lock()
        self._idle: list[ModelExecutor] = []
        self._created = 0

    # ---- event loop ---------------------------------------------------------------------------------------
    async def start(self, job: Job) -> None:
        """Wait for a slot (FIFO) and start `job` on a worker thread. Raises ServerBusy when the queue is full.
        If the caller is cancelled while waiting, the job leaves the queue (or gives back a slot just handed
        to it) and never runs."""
        loop = asyncio.get_running_loop()
        if self._running < self.max_concurrency and not self._queued():
            self._running += 1
        else:
            if self._queued() >= self.max_queue:
                raise ServerBusy(f"{self._running} requests are running and {self._queued()} waiting "
                                 f"(--max-concurrency {self.max_concurrency}, --max-queue {self.max_queue})")
            turn: asyncio.Future[None] = loop.create_future()
            self._waiting.append(turn)
            job.queue_position = self._queued()
            log.info("%s waits for a slot: %d in the queue, %d running (--max-concurrency %d)",
                     job.id, job.queue_position, self._running, self.max_concurrency)
            since = time.monotonic()
            try:
                await turn
            except asyncio.CancelledError:
                if turn.done() and not turn.cancelled():
                    self._release()  # the slot came as we were cancelled: pass it on
                elif turn in self._waiting:
                    self._waiting.remove(turn)
                raise
            job.queue_wait = time.monotonic() - since
        self._jobs.add(job)
        try:
            self._threads.submit(self._work, job, loop)
        except RuntimeError:  # shutting down
            self._jobs.discard(job)
            self._release()
            raise ServerBusy("the server is shutting down") from None

    def stats(self) -> dict[str, int]:
        with self._lock:
            executors, idle = self._created, len(self._idle)
        return {"running": self._running, "queued": self._queued(), "max_concurrency": self.max_concurrency,
                "executors": executors, "idle_executors": idle, **self.counts}

    def cancel_all(self) -> None:
        """Cancel every running job and every waiter. Call on the event loop."""
        for job in list(self._jobs):
            job.cancel()
        for turn in self._waiting:
            turn.cancel()

    def join(self) -> None:
        """Wait for the worker threads to end (a cancelled job stops within one token). Blocks: call it
        off the event loop when jobs may still be running."""
        self._threads.shutdown(wait=True, cancel_futures=True)

    def close(self) -> None:
        self.cancel_all()
        self.join()

    def _queued(self) -> int:
        return sum(1 for turn in self._waiting if not turn.done())

    def _release(self) -> None:
        while self._waiting:
            turn = self._waiting.popleft()
            if not turn.done():
                turn.set_result(None)  # the slot passes to the oldest waiter
                return
        self._running -= 1

    def _finished(self, job: Job, outcome: str) -> None:
        self._jobs.discard(job)
        self.counts[outcome] += 1
        self._release()
        log.info("%s %s: %d prompt + %d generated tokens, queued %.3f s", job.id, outcome, len(job.prompt_ids),
                 job.generated, job.queue_wait)

    # ---- worker thread ------------------------------------------------------------------------------------
    def _work(self, job: Job, loop: asyncio.AbstractEventLoop) -> None:
        executor: ModelExecutor | None = None
        end, outcome = _End(), "completed"
        try:
            if job.cancelled:
                outcome = "cancelled"
            else:
                executor = self._take_executor()
                events = self._generate(executor, job.prompt_ids, job.params)
                try:
                    for event in events:
                        job.generated += 1
                        loop.call_soon_threadsafe(job._events.put_nowait, event)
                        if job.cancelled and event.finish_reason is None:
                            outcome = "cancelled"
                            break
                finally:
                    events.close()
        except BaseException as e:  # reported to the request; the worker and the server carry on
            end, outcome = _End(e), "failed"
        finally:
            if executor is not None:
                self._give_back(executor)
            try:
                loop.call_soon_threadsafe(job._events.put_nowait, end)
                loop.call_soon_threadsafe(self._finished, job, outcome)
            except RuntimeError:  # the event loop is closed: the server has stopped
                pass

    def _take_executor(self) -> ModelExecutor:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        executor = self._make_executor()  # may be slow (allocates a KV cache); outside the lock
        with self._lock:
            self._created += 1
        log.info("created executor %d of at most %d", self._created, self.max_concurrency)
        return executor

    def _give_back(self, executor: ModelExecutor) -> None:
        try:
            executor.reset()  # empty the cache now, not when the next request starts
        except Exception:
            log.exception("an executor failed to reset; dropping it")
            with self._lock:
                self._created -= 1
            return
        with self._lock:
            self._idle.append(executor)
