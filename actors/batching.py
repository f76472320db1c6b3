"""Turn many small calls into few large ones (actor hops and transactions
are the pipeline's cost, not the work inside them)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from scheduling.errors import Unavailable

log = logging.getLogger(__name__)

In = TypeVar("In")
Out = TypeVar("Out")


class GroupCommitter(Generic[In, Out]):
    """Callers submit items and wait for their own results; items that
    arrive while a write is in progress go together in the next write."""

    def __init__(
        self,
        write: Callable[[list[In]], Awaitable[Sequence[Out]]],
        *,
        max_batch: int = 2000,
        isolate: bool = True,
    ):
        self._write = write
        self._max_batch = max_batch
        self._isolate = isolate  # False where a failure says nothing about the items
        self._pending: list[tuple[In, asyncio.Future]] = []
        self._flushing = False

    async def submit(self, items: Sequence[In]) -> list[Out]:
        loop = asyncio.get_running_loop()
        futures = []
        for item in items:
            future = loop.create_future()
            self._pending.append((item, future))
            futures.append(future)
        if not self._flushing:
            self._flushing = True
            asyncio.ensure_future(self._flush())
        return list(await asyncio.gather(*futures))

    async def _flush(self) -> None:
        try:
            while self._pending:
                batch, self._pending = (
                    self._pending[: self._max_batch],
                    self._pending[self._max_batch :],
                )
                await self._write_isolated(batch)
        finally:
            self._flushing = False

    async def _write_isolated(self, batch: list[tuple[In, asyncio.Future]]) -> None:
        """Write the batch; if it fails for a reason of its own (not an
        outage), write each item alone, so a bad item fails only its caller."""
        try:
            results = await self._write([item for item, _ in batch])
            answered = list(zip(batch, results, strict=True))
        except Exception as exc:
            if self._isolate and len(batch) > 1 and not isinstance(exc, Unavailable):
                log.warning("a batch of %d failed (%r); writing each alone", len(batch), exc)
                for entry in batch:
                    await self._write_isolated([entry])
                return
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), result in answered:
            if not future.done():
                future.set_result(result)


class Outbox(Generic[In]):
    """Fire-and-forget items collected and sent in batches by one sender
    coroutine; a failed send is retried, so nothing queued is dropped."""

    def __init__(
        self,
        send: Callable[[list[In]], Awaitable[object]],
        *,
        max_batch: int = 2000,
        retry_s: float = 0.5,
        linger_s: float = 0.0,
        name: str = "outbox",
    ):
        self._send = send
        self._max_batch = max_batch
        self._retry_s = retry_s
        self._linger_s = linger_s  # an item waits this long for others to go with it
        self._name = name
        self._items: list[In] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    def put(self, items: Sequence[In]) -> None:
        self._items.extend(items)
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run())

    def __len__(self) -> int:
        return len(self._items)

    def pending(self) -> list[In]:
        """Items not yet sent successfully (including a batch being sent)."""
        return list(self._items)

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            if self._linger_s:
                await asyncio.sleep(self._linger_s)
            self._wake.clear()
            while self._items:
                batch = self._items[: self._max_batch]
                try:
                    await self._send(batch)
                except Exception:
                    log.warning(
                        "%s: send of %d items failed; retrying",
                        self._name,
                        len(batch),
                        exc_info=True,
                    )
                    await asyncio.sleep(self._retry_s)
                    continue
                del self._items[: len(batch)]
