"""Dynamic batching for the engine, in asyncio: concurrent requests that arrive within
``batch_wait_s`` of each other (up to ``max_batch_size``) run as one ``Engine.generate`` call in a
worker thread, and each request gets its text back as a stream of events. The queue is bounded:
past ``max_queue`` waiting requests, ``submit`` raises ``Overloaded`` at once (HTTP 503) rather
than letting latency grow without limit. Pure asyncio: tested without Ray or HTTP."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from pipeline.serve.engine import Engine, Generation, SamplingParams


class Overloaded(Exception):
    """The request queue is full."""


@dataclass
class Event:
    delta: str = ""
    finished: bool = False
    generation: Generation | None = None  # set on the final event
    batch_size: int = 0
    queued_s: float = 0.0
    error: BaseException | None = None


@dataclass
class _Pending:
    prompt_ids: list[int]
    params: SamplingParams
    queue: asyncio.Queue
    enqueued: float = field(default_factory=time.perf_counter)
    cancelled: bool = False  # the consumer stopped reading (client gone): stop generating for it
    stream: bool = True  # text deltas as they come; else only the final event (no per-token wake-ups)


class DynamicBatcher:
    def __init__(self, engine: Engine, *, max_batch_size: int = 8, batch_wait_s: float = 0.01, max_queue: int = 64,
                 use_cache: bool = True, on_batch: Callable[[int], None] | None = None) -> None:
        self.engine = engine
        self.max_batch_size = min(max_batch_size, engine.max_batch_size)
        self.batch_wait_s = batch_wait_s
        self.max_queue = max_queue
        self.use_cache = use_cache
        self.on_batch = on_batch
        self.batch_sizes: list[int] = []  # every batch run, for tests and metrics
        self._waiting: asyncio.Queue | None = None
        self._loop_task: asyncio.Task | None = None

    def _ensure_started(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._waiting = asyncio.Queue()
            self._loop_task = asyncio.get_running_loop().create_task(self._run())

    async def submit(self, prompt_ids: list[int], params: SamplingParams, *, stream: bool = True) -> AsyncIterator[Event]:
        """Queue one request; yields its events: text deltas (``stream``), then one final event.
        Without ``stream`` the engine thread never wakes the event loop for this request before it
        ends, which matters at high concurrency: the wake-ups compete for the GIL with decoding."""
        self.engine.check_fits(len(prompt_ids), params.max_tokens)  # ValueError before queueing
        self._ensure_started()
        if self._waiting.qsize() >= self.max_queue:
            raise Overloaded(f"{self._waiting.qsize()} requests are already waiting (max_queue={self.max_queue})")
        pending = _Pending(prompt_ids, params, asyncio.Queue(), stream=stream)
        self._waiting.put_nowait(pending)
        return self._events(pending)

    @staticmethod
    async def _events(pending: _Pending) -> AsyncIterator[Event]:
        finished = False
        try:
            while True:
                event = await pending.queue.get()
                if event.error is not None:
                    raise event.error
                finished = event.finished
                yield event
                if event.finished:
                    return
        finally:
            if not finished:  # closed or cancelled before the end
                pending.cancelled = True

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._waiting.get()]
            deadline = loop.time() + self.batch_wait_s
            while len(batch) < self.max_batch_size:
                timeout = deadline - loop.time()
                if timeout <= 0 and self._waiting.empty():
                    break
                try:
                    batch.append(await asyncio.wait_for(self._waiting.get(), max(timeout, 0)))
                except asyncio.TimeoutError:
                    break
            batch = [p for p in batch if not p.cancelled]
            if not batch:
                continue
            self.batch_sizes.append(len(batch))
            if self.on_batch is not None:
                self.on_batch(len(batch))
            started = time.perf_counter()

            def on_event(row: int, delta: str, finished: bool, batch=batch) -> None:
                # final events are sent below, with the whole generation; a last delta goes first
                if batch[row].stream and delta:
                    loop.call_soon_threadsafe(batch[row].queue.put_nowait, Event(delta=delta))

            try:
                any_stream = any(p.stream for p in batch)
                gens = await loop.run_in_executor(
                    None, lambda: self.engine.generate([(p.prompt_ids, p.params) for p in batch],
                                                       use_cache=self.use_cache,
                                                       on_event=on_event if any_stream else None,
                                                       cancelled=lambda row: batch[row].cancelled))
            except Exception as e:  # the batch failed: every request in it hears why
                for p in batch:
                    p.queue.put_nowait(Event(finished=True, error=e))
                continue
            for p, g in zip(batch, gens):
                p.queue.put_nowait(Event(finished=True, generation=g, batch_size=len(batch),
                                         queued_s=started - p.enqueued))
