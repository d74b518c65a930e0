"""Where each waiting job stands: after any mix of submissions, cancels and starts, every job's
position is its place in submission order (1 = next), 0 once a worker took it, and `on_moved`
has told each job its current position."""

from __future__ import annotations

import asyncio

from hypothesis import given
from hypothesis import strategies as st

from sd_rest.endpoints import ENDPOINTS
from sd_rest.jobs.queue import JobQueue
from sd_rest.state.jobs import Job, Status

OPERATIONS = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.integers(0, 30)),
        st.tuples(st.just("remove"), st.integers(0, 30)),
        st.tuples(st.just("take"), st.just(0)),
        st.tuples(st.just("ask"), st.integers(0, 30)),
    ),
    max_size=60,
)


def job(number: int) -> Job:
    params = {**ENDPOINTS["text-to-image"].defaults, "prompt": f"job {number}"}
    return Job(
        id=f"{number:032x}",
        endpoint="text-to-image",
        params=params,  # type: ignore[arg-type]
        checkpoint="/m.ckpt",
        uploads={},
        inputs={},
        seq=number,
        status=Status.QUEUED,
    )


@given(OPERATIONS)
def test_positions_follow_submission_order_through_any_changes(
    operations: list[tuple[str, int]],
) -> None:
    async def scenario() -> None:
        started: list[Job] = []
        gate = asyncio.Event()

        async def run(taken: Job) -> None:
            started.append(taken)
            await gate.wait()

        queue = JobQueue(1, 1000, run)
        told: dict[str, int] = {}
        queue.on_moved = lambda moved: told.update((j.id, n) for j, n in moved)
        jobs = {n: job(n) for n in range(31)}
        waiting: list[Job] = []  # the model: submission order
        queue.start()
        for operation, n in operations:
            if operation == "put" and jobs[n] not in queue and jobs[n] not in started:
                await queue.put(jobs[n], queue.reserve())
                waiting.append(jobs[n])
            elif operation == "remove":
                assert queue.remove(jobs[n]) == (jobs[n] in waiting)
                if jobs[n] in waiting:
                    waiting.remove(jobs[n])
            elif operation == "take" and not started and waiting:
                for _ in range(100):  # the single worker takes the first waiting job
                    await asyncio.sleep(0)
                    if started:
                        break
                assert started == [waiting.pop(0)]
            elif operation == "ask":
                queue.position(jobs[n])  # a position asked between changes is cached
            for place, waiting_job in enumerate(waiting, 1):
                assert queue.position(waiting_job) == place
                assert told[waiting_job.id] == place
            for taken in started:
                assert queue.position(taken) == 0 and told[taken.id] == 0
        gate.set()
        await queue.close()

    asyncio.run(scenario())
