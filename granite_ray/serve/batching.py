"""Batching across callers by tokens, not by count.

Every request of a replica waits in one queue. A background task takes the oldest request and the
ones that arrive within `wait_timeout_s` of it, as long as their tokens fit `max_batch_tokens`, and
runs ONE inference call on all their items in a worker thread, so the event loop keeps accepting
and tokenizing requests meanwhile. The encoder sorts the batch by length and packs it without
padding, so a batch is sized by the work it holds: many short texts or a few long ones, where a
count-based batch would be too small for the first or too big for the second. Requests that queued
during the previous call have already waited their time and go at once.

If the call fails, each request of the batch is run again alone: one bad request fails only itself.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

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

    def __init__(self, infer: Callable[[list], Sequence], max_batch_tokens: int, wait_timeout_s: float) -> None:
        self.infer = infer
        self.max_batch_tokens = max_batch_tokens
        self.wait_timeout_s = wait_timeout_s
        self._queue: deque[_Request] = deque()
        self._arrival: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
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
        if self._worker is None or self._worker.done():  # started on the replica's own event loop
            self._arrival = asyncio.Event()
            self._worker = loop.create_task(self._serve())
        request = _Request(list(items), tokens, loop.time(), loop.create_future())
        self._queue.append(request)
        self._arrival.set()
        return await request.future

    async def _serve(self) -> None:
        while True:
            batch = await self._next_batch()
            if batch:
                await self._run(batch)

    async def _next_batch(self) -> list[_Request]:
        loop = asyncio.get_running_loop()
        while not self._queue:
            self._arrival.clear()
            await self._arrival.wait()
        deadline = self._queue[0].arrived + self.wait_timeout_s
        while sum(r.tokens for r in self._queue) < self.max_batch_tokens and (left := deadline - loop.time()) > 0:
            self._arrival.clear()
            try:
                await asyncio.wait_for(self._arrival.wait(), left)
            except asyncio.TimeoutError:
                break
        batch: list[_Request] = []
        tokens = 0
        while self._queue and (not batch or tokens + self._queue[0].tokens <= self.max_batch_tokens):
            request = self._queue.popleft()
            if not request.future.done():  # a caller that went away is not computed
                batch.append(request)
                tokens += request.tokens
        now = loop.time()
        for request in batch:
            self._queue_wait.observe(now - request.arrived)
        return batch

    async def _run(self, batch: list[_Request]) -> None:
        try:
            outputs = await asyncio.to_thread(self._call_model, [item for r in batch for item in r.items],
                                              sum(r.tokens for r in batch), len(batch))
        except Exception as error:  # noqa: BLE001 - handed to the callers, the worker goes on
            self._failures.inc()
            if len(batch) == 1:
                if not batch[0].future.done():
                    batch[0].future.set_exception(error)
                return
            for request in batch:
                await self._run([request])
            return
        start = 0
        for request in batch:
            if not request.future.done():
                request.future.set_result(outputs[start:start + len(request.items)])
            start += len(request.items)

    def _call_model(self, items: list, tokens: int, requests: int) -> Sequence:
        self._calls.inc()
        self._batched.inc(requests)
        self._batch_tokens.observe(tokens)
        start = time.perf_counter()
        outputs = self.infer(items)
        self._infer_seconds.observe(time.perf_counter() - start)
        if len(outputs) != len(items):
            raise RuntimeError(f"inference returned {len(outputs)} outputs for {len(items)} items")
        return outputs
