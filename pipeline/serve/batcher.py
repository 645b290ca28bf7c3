"""Continuous batching for the engine: requests join the batch in flight between decode steps
and leave it when they finish, so a request that arrives while others decode waits one step,
not a whole batch. When the engine is idle, the first requests gather for ``batch_wait_s`` (or
until ``max_batch_size`` are waiting) before the prefill. Decoding runs in a worker thread; each
request gets its text back as a stream of asyncio events. The queue is bounded: past ``max_queue``
waiting requests, ``submit`` raises ``Overloaded`` at once (HTTP 503) rather than letting latency
grow without limit. Tested without Ray or HTTP."""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from pipeline.serve.engine import Engine, Generation, SamplingParams


class Overloaded(Exception):
    """The request queue is full."""


@dataclass
class Event:
    delta: str = ""
    # with params.logprobs, streamed: the generation's log-probability entries sampled since the
    # previous event (the engine's (token id, log-probability, alternatives))
    logprobs: list | None = None
    # on a request's first streamed event, with params.prompt_logprobs: the prompt's entries (echo)
    prompt_logprobs: list | None = None
    finished: bool = False
    generation: Generation | None = None  # set on the final event
    batch_size: int = 0  # the largest batch this request decoded in
    queued_s: float = 0.0
    error: BaseException | None = None


@dataclass(eq=False)  # compared by identity
class _Pending:
    prompt_ids: list[int]
    params: SamplingParams
    queue: asyncio.Queue
    enqueued: float = field(default_factory=time.perf_counter)
    cancelled: bool = False  # the consumer stopped reading (client gone): stop generating for it
    stream: bool = True  # text deltas as they come; else only the final event (no per-token wake-ups)
    started: float = 0.0
    batch_size: int = 0
    logprobs_sent: int = 0  # entries of the generation's logprobs already in a streamed event
    streamed: bool = False  # a delta event went out (the first one carries the prompt's logprobs)


class DynamicBatcher:
    def __init__(self, engine: Engine, *, max_batch_size: int = 8, batch_wait_s: float = 0.01, max_queue: int = 64,
                 use_cache: bool = True, on_batch: Callable[[int], None] | None = None) -> None:
        self.engine = engine
        self.max_batch_size = min(max_batch_size, engine.max_batch_size)
        self.batch_wait_s = batch_wait_s
        self.max_queue = max_queue
        self.use_cache = use_cache
        self.on_batch = on_batch  # called (in the event loop) with the batch size at every admission
        self.batch_sizes: list[int] = []  # the batch size after every admission, for tests and metrics
        self._waiting: collections.deque[_Pending] = collections.deque()
        self._lock = threading.Lock()  # guards _waiting and _driving across the loop and the engine thread
        self._driving = False  # a worker thread owns the engine
        self._gathered: asyncio.Event | None = None

    async def submit(self, prompt_ids: list[int], params: SamplingParams, *, stream: bool = True) -> AsyncIterator[Event]:
        """Queue one request; yields its events: text deltas (``stream``), then one final event.
        Without ``stream`` the engine thread never wakes the event loop for this request before it
        ends, which matters at high concurrency: the wake-ups compete for the GIL with decoding."""
        self.engine.check_fits(len(prompt_ids), params.max_tokens)  # ValueError before queueing
        pending = _Pending(prompt_ids, params, asyncio.Queue(), stream=stream)
        with self._lock:
            if len(self._waiting) >= self.max_queue:
                raise Overloaded(f"{len(self._waiting)} requests are already waiting (max_queue={self.max_queue})")
            self._waiting.append(pending)
            start, self._driving = not self._driving, True
            full = len(self._waiting) >= self.max_batch_size
        if start:
            self._gathered = asyncio.Event()
            asyncio.get_running_loop().create_task(self._drive_when_gathered())
        if full and self._gathered is not None:
            self._gathered.set()
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

    async def _drive_when_gathered(self) -> None:
        """The engine was idle: let concurrent arrivals gather for the first prefill, then decode
        in a worker thread until no request is left."""
        gathered = self._gathered
        try:
            await asyncio.wait_for(gathered.wait(), self.batch_wait_s)
        except asyncio.TimeoutError:
            pass
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._drive, loop)

    def _take(self, n: int) -> list[_Pending]:
        out = []
        with self._lock:
            while self._waiting and len(out) < n:
                p = self._waiting.popleft()
                if not p.cancelled:  # its client left while it waited
                    out.append(p)
        return out

    def _drive(self, loop: asyncio.AbstractEventLoop) -> None:
        """Worker thread: the batch in flight. Between steps, waiting requests are prefilled and
        merged in (up to ``max_batch_size`` rows) and finished ones leave with their final event.
        Returns when no request is running or waiting."""
        engine, run = self.engine, None

        def on_event(p: _Pending, delta: str, finished: bool, g: Generation) -> None:
            # final events follow from compact(); a last delta goes first (same FIFO)
            if p.stream and delta:
                new = None
                if g.logprobs is not None:
                    new, p.logprobs_sent = g.logprobs[p.logprobs_sent:], len(g.logprobs)
                prompt = None if p.streamed else g.prompt_logprobs
                p.streamed = True
                loop.call_soon_threadsafe(p.queue.put_nowait, Event(delta=delta, logprobs=new, prompt_logprobs=prompt))

        def cancelled(p: _Pending) -> bool:
            return p.cancelled

        def fail(rows: list[_Pending], e: BaseException) -> None:
            for p in rows:
                loop.call_soon_threadsafe(p.queue.put_nowait, Event(finished=True, error=e))

        while True:
            admitted = self._take(self.max_batch_size - (len(run) if run is not None else 0))
            if not admitted and (run is None or not len(run)):
                with self._lock:  # nothing runs: stop, unless a request slipped in meanwhile
                    if not self._waiting:
                        self._driving = False
                        return
                continue
            try:
                if admitted:
                    now = time.perf_counter()
                    for p in admitted:
                        p.started = now
                    new = engine.begin([(p.prompt_ids, p.params) for p in admitted], owners=admitted)
                    engine.step(new, use_cache=self.use_cache, on_event=on_event, cancelled=cancelled)  # prefill
                    run = new if run is None or not len(run) else engine.merge(run, new)
                    size = len(run)
                    for p in run.owners:
                        p.batch_size = max(p.batch_size, size)
                    self.batch_sizes.append(size)
                    if self.on_batch is not None:
                        loop.call_soon_threadsafe(self.on_batch, size)
                else:
                    engine.step(run, use_cache=self.use_cache, on_event=on_event, cancelled=cancelled)
                for p, g in engine.compact(run):
                    loop.call_soon_threadsafe(p.queue.put_nowait, Event(
                        finished=True, generation=g, batch_size=p.batch_size, queued_s=p.started - p.enqueued))
            except Exception as e:  # the batch failed: every request in it hears why
                fail(list(run.owners) if run is not None else [], e)
                fail([p for p in admitted if run is None or all(p is not q for q in run.owners)], e)
                run = None
