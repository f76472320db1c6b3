"""The executor's result sink: commit once, then report until it gets through."""

import asyncio
from dataclasses import replace

from actors.results import CommitThenReport
from scheduling.models import CommittedResults, FailureClass, Outcome, TaskStatus
from tests.unit.test_dispatcher import result
from tests.unit.test_pure_scheduling import spec


class Recorder:
    def __init__(self) -> None:
        self.committed: list[list[tuple[int, int]]] = []

    async def record(self, results):
        self.committed.append([r.key for r in results])
        return CommittedResults(
            outcomes=tuple(
                Outcome(result=r, status=TaskStatus.SUCCEEDED, schedule_id=None) for r in results
            )
        )


class Dispatcher:
    def __init__(self, fail: int) -> None:
        self.fail = fail
        self.reports: list[tuple[list, CommittedResults | None]] = []

    async def report_results(self, results, committed=None):
        if self.fail:
            self.fail -= 1
            raise ConnectionError("the dispatcher is restarting")
        self.reports.append((results, committed))


def test_a_failed_report_is_sent_again_without_committing_again():
    async def scenario():
        recorder, dispatcher = Recorder(), Dispatcher(fail=2)
        sink = CommitThenReport(recorder, dispatcher)
        first = result(spec(1), FailureClass.EXIT_CODE)
        first = replace(first, output_tail="a long tail")
        for _ in range(2):
            try:
                await sink.report_results([first])
            except ConnectionError:
                pass
        second = result(spec(2))
        await sink.report_results([first, second])  # the outbox's batch grew meanwhile
        assert recorder.committed == [[(1, 1)], [(2, 1)]]  # each committed once
        [(reported, committed)] = dispatcher.reports
        assert [r.key for r in reported] == [(1, 1), (2, 1)]
        assert all(r.output_tail == "" for r in reported)  # the dispatcher needs no output
        assert [o.result.key for o in committed.outcomes] == [(1, 1), (2, 1)]
        await sink.report_results([result(spec(3))])
        assert [o.result.key for o in dispatcher.reports[-1][1].outcomes] == [(3, 1)]

    asyncio.run(scenario())
