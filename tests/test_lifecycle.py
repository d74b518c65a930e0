"""The job state machine: each transition from each state it allows, and nothing else."""

from __future__ import annotations

import itertools

import pytest

from sd_rest.endpoints import ENDPOINTS
from sd_rest.state import lifecycle
from sd_rest.state.jobs import ImageRecord, Job, Status
from sd_rest.state.lifecycle import Change, IllegalTransition, Transition

ALLOWED = {
    Transition.START: {Status.QUEUED},
    Transition.PUBLISH: {Status.IN_PROGRESS},
    Transition.COMPLETE: {Status.QUEUED, Status.IN_PROGRESS},
    Transition.FAIL: {Status.QUEUED, Status.IN_PROGRESS},
    Transition.CANCEL: {Status.QUEUED, Status.IN_PROGRESS},
    Transition.REQUEUE: {Status.QUEUED, Status.IN_PROGRESS},
    Transition.RETRY: {Status.FAILED, Status.CANCELED},
}


def job(status: Status, images: int = 0, total: int = 2) -> Job:
    params = {**ENDPOINTS["text-to-image"].defaults, "prompt": "x", "iterations": total}
    return Job(
        id="0" * 32,
        endpoint="text-to-image",
        params=params,  # type: ignore[arg-type]
        checkpoint="/m.ckpt",
        uploads={},
        inputs={},
        seq=1,
        status=status,
        images=tuple(ImageRecord(n, 42, n, "ab") for n in range(1, images + 1)),
    )


def change_for(transition: Transition, subject: Job) -> Change:
    record = ImageRecord(len(subject.images) + 1, 42, 1, "cd")
    return {
        Transition.START: lifecycle.start(subject, 123, 10.0),
        Transition.PUBLISH: lifecycle.publish(subject, record),
        Transition.COMPLETE: lifecycle.complete(10.0),
        Transition.FAIL: lifecycle.fail("boom", 10.0),
        Transition.CANCEL: lifecycle.cancel(10.0),
        Transition.REQUEUE: lifecycle.requeue(),
        Transition.RETRY: lifecycle.retry(99),
    }[transition]


def images_needed(transition: Transition) -> int:
    return 2 if transition is Transition.COMPLETE else 0


def test_the_table_covers_every_transition() -> None:
    assert set(ALLOWED) == set(Transition)
    assert {t: set(t.sources) for t in Transition} == ALLOWED


@pytest.mark.parametrize(
    ("transition", "status"), list(itertools.product(Transition, Status)), ids=str
)
def test_each_transition_from_each_state(transition: Transition, status: Status) -> None:
    subject = job(status, images=images_needed(transition))
    change = change_for(transition, subject)
    if status in ALLOWED[transition]:
        after = lifecycle.applied(subject, change, now=5.0)
        assert after.status is transition.target
        assert after.updated_at == 5.0
        for name, value in change.fields.items():
            assert getattr(after, name) == value
        assert subject.status is status and subject.updated_at == 0.0  # untouched
    else:
        with pytest.raises(IllegalTransition, match=f"a {status.value} job"):
            lifecycle.applied(subject, change)


def test_complete_needs_every_image() -> None:
    with pytest.raises(IllegalTransition, match="1 of 2 images"):
        lifecycle.applied(job(Status.IN_PROGRESS, images=1), lifecycle.complete(1.0))


def test_images_are_published_in_order() -> None:
    subject = job(Status.IN_PROGRESS, images=1)
    skipped = Change(Transition.PUBLISH, {"images": (*subject.images, ImageRecord(3, 42, 2, "ef"))})
    with pytest.raises(IllegalTransition, match="image 3 out of order"):
        lifecycle.applied(subject, skipped)
    after = lifecycle.applied(subject, lifecycle.publish(subject, ImageRecord(2, 42, 2, "ef")))
    assert [image.n for image in after.images] == [1, 2]


def test_what_each_transition_sets() -> None:
    queued = job(Status.QUEUED)
    started = lifecycle.applied(queued, lifecycle.start(queued, 77, 3.0))
    assert (started.pid, started.attempts, started.started_at, started.error) == (77, 1, 3.0, None)
    failed = lifecycle.applied(started, lifecycle.fail("it broke", 4.0))
    assert (failed.pid, failed.error, failed.finished_at) == (None, "it broke", 4.0)
    again = lifecycle.applied(failed, lifecycle.retry(500))
    assert (again.status, again.seq, again.error, again.finished_at) == (
        Status.QUEUED,
        500,
        None,
        None,
    )
    requeued = lifecycle.applied(started, lifecycle.requeue(images=()))
    assert (requeued.status, requeued.pid, requeued.images) == (Status.QUEUED, None, ())
