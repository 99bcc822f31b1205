"""Batching across callers by tokens, not by count.

Every request of a replica waits in one queue. A background task takes the oldest request and the
ones that arrive within `wait_timeout_s` of it, as long as their tokens fit `max_batch_tokens`, and
runs ONE inference call on all their items in a worker thread, so the event loop keeps accepting
and tokenizing requests meanwhile. The encoder sorts the batch by length and packs it without
padding, so a batch is sized by the work it holds: many short texts or a few long ones, where a
count-based batch would be too small for the first or too big for the second. Requests that queued
during the previous call have already waited their time and go at once.

A replica may run several calls at once (`calls_in_flight`), sharing its CPU threads: a batch that is
all there is runs alone on every thread; when more is queued than one call takes, or a call is
already running, calls run side by side on a share of the threads each, and the idle ones split the
queue between them. On CPU a small encoder's operators scale poorly over threads, so two one-thread
calls do more than one two-thread call under load, while a lone request still gets every thread.
Calls should be short (the replicas make one a forward of their device's budget): a long one-thread call
taken late in a burst keeps computing alone after the queue is empty, with the other lane idle.

If the call fails, each request of the batch is run again alone: one bad request fails only itself.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from ray.serve.metrics import Counter, Histogram

TOKEN_BUCKETS = [2.0 ** k for k in range(4, 18)]
SECOND_BUCKETS = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0]


@dataclass
class _Request:
    items: list
    tokens: int
    arrived: float
    future: asyncio.Future = field(repr=False)


class TokenBudgetBatcher:
    """`await submit(items, tokens)` -> `infer(items)`'s outputs for these items, computed with others' items."""

    def __init__(self, infer: Callable[[list], Sequence], max_batch_tokens: int, wait_timeout_s: float,
                 threads: int = 1, calls_in_flight: int = 1) -> None:
        self.infer = infer
        self.max_batch_tokens = max_batch_tokens
        self.wait_timeout_s = wait_timeout_s
        self.threads = threads
        self.calls_in_flight = calls_in_flight
        self.shared_threads = max(1, threads // calls_in_flight)  # a call's threads when calls run side by side
        self._threads_busy = 0
        self._calls_running = 0
        self._queue: deque[_Request] = deque()
        self._changed = asyncio.Event()  # a request arrived or a call ended
        self._workers: list[asyncio.Task | None] = [None] * calls_in_flight
        self._calls = Counter("granite_ray_inference_calls", "inference calls (batches)")
        self._batched = Counter("granite_ray_batched_requests", "requests computed in inference calls; "
                                "divided by the calls: requests per batch")
        self._batch_tokens = Histogram("granite_ray_batch_tokens", "tokens per inference call", boundaries=TOKEN_BUCKETS)
        self._queue_wait = Histogram("granite_ray_batch_wait_seconds", "time from a request's arrival to its "
                                     "inference call", boundaries=SECOND_BUCKETS)
        self._infer_seconds = Histogram("granite_ray_inference_seconds", "duration of an inference call",
                                        boundaries=SECOND_BUCKETS)
        self._failures = Counter("granite_ray_inference_failures", "inference calls that raised")

    async def submit(self, items: Sequence, tokens: int) -> Sequence:
        loop = asyncio.get_running_loop()
        # Started on the replica's own event loop; one that ended (it should not) is replaced.
        self._workers = [w if w is not None and not w.done() else loop.create_task(self._serve()) for w in self._workers]
        request = _Request(list(items), tokens, loop.time(), loop.create_future())
        self._queue.append(request)
        self._changed.set()
        return await request.future

    async def _serve(self) -> None:
        while True:
            batch, threads = await self._next_batch()
            if batch:
                self._threads_busy += threads
                self._calls_running += 1
                try:
                    await self._run(batch, threads)
                finally:
                    self._threads_busy -= threads
                    self._calls_running -= 1
                    self._changed.set()

    async def _wait_change(self, timeout: float | None = None) -> None:
        self._changed.clear()
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    def _room(self) -> bool:
        return self._threads_busy + self.shared_threads <= self.threads

    async def _next_batch(self) -> tuple[list[_Request], int]:
        """The next call's requests, and its threads."""
        loop = asyncio.get_running_loop()
        while not (self._queue and self._room()):
            await self._wait_change()
        deadline = self._queue[0].arrived + self.wait_timeout_s
        while sum(r.tokens for r in self._queue) < self.max_batch_tokens and (left := deadline - loop.time()) > 0:
            await self._wait_change(left)
        queued = sum(r.tokens for r in self._queue)
        if not self._room():  # another worker took the room meanwhile
            return [], 0
        if self._threads_busy == 0 and queued <= self.max_batch_tokens:
            budget, threads = self.max_batch_tokens, self.threads  # all there is: alone, on every thread
        else:
            free_calls = min((self.threads - self._threads_busy) // self.shared_threads,
                             self.calls_in_flight - self._calls_running)
            budget, threads = min(self.max_batch_tokens, math.ceil(queued / free_calls)), self.shared_threads
        batch: list[_Request] = []
        tokens = 0
        while self._queue and (not batch or tokens + self._queue[0].tokens <= budget):
            request = self._queue.popleft()
            if not request.future.done():  # a caller that went away is not computed
                batch.append(request)
                tokens += request.tokens
        now = loop.time()
        for request in batch:
            self._queue_wait.observe(now - request.arrived)
        return batch, threads

    async def _run(self, batch: list[_Request], threads: int) -> None:
        try:
            outputs = await asyncio.to_thread(self._call_model, [item for r in batch for item in r.items],
                                              sum(r.tokens for r in batch), len(batch), threads)
        except Exception as error:  # noqa: BLE001 - handed to the callers, the worker goes on
            self._failures.inc()
            if len(batch) == 1:
                if not batch[0].future.done():
                    batch[0].future.set_exception(error)
                return
            for request in batch:
                await self._run([request], threads)
            return
        start = 0
        for request in batch:
            if not request.future.done():
                request.future.set_result(outputs[start:start + len(request.items)])
            start += len(request.items)

    def _call_model(self, items: list, tokens: int, requests: int, threads: int) -> Sequence:
        torch.set_num_threads(threads)  # this worker thread's own (OpenMP's thread count is per thread)
        self._calls.inc()
        self._batched.inc(requests)
        self._batch_tokens.observe(tokens)
        start = time.perf_counter()
        outputs = self.infer(items)
        self._infer_seconds.observe(time.perf_counter() - start)
        if len(outputs) != len(items):
            raise RuntimeError(f"inference returned {len(outputs)} outputs for {len(items)} items")
        return outputs
