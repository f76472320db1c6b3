"""Committing run results. The executor that ran an attempt commits its
result itself (the update is conditional on the attempt and its epoch, so
any writer is safe): no restarting dispatcher or shard stands between a
script's exit and its row. The dispatcher then frees the slots and tells
the shards what the commit decided (outcomes to count, retries to time)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import Protocol

from chronoray.settings import Settings
from scheduling.clock import Clock, SystemClock
from scheduling.errors import Unavailable
from scheduling.models import CommittedResults, Outcome, RunResult
from storage.repository import FiringStore

log = logging.getLogger(__name__)

UNSTORABLE = "(the output could not be stored)"


class ResultRecorder:
    """Commits results through the repository. A batch the database refuses
    for one item's sake is written item by item, and an item refused on its
    own is recorded as its task's failure without its output: no bad item
    holds up the others, and no batch is retried forever. An outage
    (``Unavailable``) is raised: the caller keeps the results and retries."""

    def __init__(
        self, repo: FiringStore, settings: Settings, *, name: str, clock: Clock | None = None
    ) -> None:
        self._repo = repo
        self._settings = settings
        self._name = name
        self._clock = clock or SystemClock()

    async def record(self, results: Sequence[RunResult]) -> CommittedResults:
        results = list(results)
        try:
            return await self._record(results)
        except Unavailable:
            raise
        except Exception:
            if len(results) == 1:
                return await self._record_stripped(results[0])
            log.exception("%s: a batch of %d results failed; one by one", self._name, len(results))
        committed = CommittedResults()
        for result in results:
            committed += await self.record([result])
        return committed

    async def _record_stripped(self, result: RunResult) -> CommittedResults:
        log.exception("%s: result of %s refused; stored without output", self._name, result.key)
        try:
            return await self._record([replace(result, output_tail=UNSTORABLE)])
        except Unavailable:
            raise
        except Exception:
            log.exception("%s: result of %s dropped", self._name, result.key)
            return CommittedResults()

    async def _record(self, results: list[RunResult]) -> CommittedResults:
        # The repository reports outcomes inside its transaction; they count
        # only once it committed, so a batch retried item by item counts once.
        outcomes: list[Outcome] = []
        watch = await asyncio.to_thread(
            self._repo.record_results,
            results,
            policy=self._settings.retry,
            now=self._clock.now(),
            tiers=self._settings.tiers,
            on_outcome=lambda result, status, schedule_id: outcomes.append(
                Outcome(
                    result=replace(result, output_tail=""), status=status, schedule_id=schedule_id
                )
            ),
        )
        return CommittedResults(outcomes=tuple(outcomes), watch=tuple(watch))


class CommittedReport(Protocol):
    async def report_results(
        self, results: list[RunResult], committed: CommittedResults | None = None
    ) -> None:
        """Returns once the shards have taken ``committed`` in."""


class CommitThenReport:
    """An executor's result sink: commit first, then report. A report that
    fails is sent again without committing again (the second commit would
    match no row and decide nothing), so what the commit decided reaches the
    shards once it gets through."""

    def __init__(self, recorder: ResultRecorder, dispatcher: CommittedReport) -> None:
        self._recorder = recorder
        self._dispatcher = dispatcher
        self._committed: set[tuple[int, int]] = set()  # committed, report not yet through
        self._decided = CommittedResults()

    async def report_results(self, results: list[RunResult]) -> None:
        fresh = [r for r in results if r.key not in self._committed]
        if fresh:
            self._decided += await self._recorder.record(fresh)
            self._committed.update(r.key for r in fresh)
        # The dispatcher needs keys, shards and times, not the output again.
        await self._dispatcher.report_results(
            [replace(r, output_tail="") for r in results], self._decided
        )
        self._committed.difference_update(r.key for r in results)
        self._decided = CommittedResults()
