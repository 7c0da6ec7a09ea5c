"""Coalescing: edges due at one instant are one job and one reconcile call; device messages
queued for the database thread go in one batch, in order, behind every job before them."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from apscheduler.events import EVENT_JOB_MISSED, JobEvent
from prometheus_client import CollectorRegistry

from fleet.batch import Applied, Inbound, InboundQueue
from fleet.metrics import FleetMetrics
from fleet.scheduler import FleetScheduler
from tillsyn_protocol import LockState, StateReport


def _scheduler(
    calls: list[list[str]], missed: list[tuple[str, list[str] | None]], clock: Any = time.time
) -> FleetScheduler:
    async def on_edge(devices: list[str]) -> None:
        calls.append(devices)

    return FleetScheduler(
        FleetMetrics(CollectorRegistry()),
        on_edge=on_edge,
        periodic={},
        clock=clock,
        on_missed=lambda job, devices: missed.append((job, devices)),
    )


async def test_edges_at_one_instant_are_one_job_and_one_reconcile() -> None:
    calls: list[list[str]] = []
    sched = _scheduler(calls, [])
    sched.start()
    try:
        soon = math.floor((time.time() + 0.3) * 20) / 20 + 0.001  # just past a 50 ms tick
        devices = [f"dev-s{i:04d}" for i in range(2000)]
        sched.set_edges({d: soon + (i % 3) * 0.01 for i, d in enumerate(devices)})  # one tick
        sched.set_edges({"dev-late": soon + 3600, "dev-none": None})
        assert sched.job_count == 2
        # A device's edge moves: it leaves its old instant; an emptied instant has no job.
        sched.set_edges({"dev-late": soon + 7200})
        assert sched.job_count == 2
        assert [j.get("devices") for j in sched.jobs()] == [2000, 1]
        for _ in range(100):
            if calls:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.1)
        assert len(calls) == 1 and sorted(calls[0]) == devices
        assert sched.job_count == 1
        # Re-planned from the reconcile: the instant is scheduled afresh.
        sched.set_edges({devices[0]: time.time() + 0.1})
        await asyncio.sleep(0.5)
        assert calls[-1] == [devices[0]]
    finally:
        sched.shutdown()


async def test_an_edge_is_never_early_and_a_missed_one_is_repaired_with_its_devices() -> None:
    missed: list[tuple[str, list[str] | None]] = []
    sched = _scheduler([], missed)
    sched.start(paused=True)  # a standby: jobs kept, none run
    try:
        at = time.time() + 60.001
        sched.set_edges({"dev-m1": at, "dev-m2": at})
        (job,) = sched.jobs()
        instant_ms = int(job["id"].removeprefix("edge:@"))
        assert instant_ms >= at * 1000 and instant_ms - at * 1000 < 50
        sched._listen(JobEvent(EVENT_JOB_MISSED, job["id"], None))
        sched._listen(JobEvent(EVENT_JOB_MISSED, "sweep", None))
        assert missed == [(job["id"], ["dev-m1", "dev-m2"]), ("sweep", None)]
    finally:
        sched.shutdown()


async def test_devices_planned_for_an_instant_whose_edge_is_running_join_it() -> None:
    """A reconcile that decided just before an instant (a sweep's part) plans its devices
    for that instant while the instant's edge job is already running: they are reconciled
    by that job once its first call returns, and no job counts as missed."""
    calls: list[list[str]] = []
    missed: list[tuple[str, list[str] | None]] = []
    release = asyncio.Event()
    metrics = FleetMetrics(CollectorRegistry())

    async def on_edge(devices: list[str]) -> None:
        calls.append(devices)
        await release.wait()

    sched = FleetScheduler(
        metrics,
        on_edge=on_edge,
        periodic={},
        on_missed=lambda job, devices: missed.append((job, devices)),
    )
    sched.start()
    try:
        at = time.time() + 0.2
        sched.set_edges({"dev-j1": at, "dev-j2": at})
        while not calls:
            await asyncio.sleep(0.02)
        sched.set_edges({"dev-j3": at, "dev-j1": at})  # late-comers for the same instant
        assert sched.job_count == 0  # no second job: the running one takes them
        release.set()
        for _ in range(100):
            if len(calls) == 2:
                break
            await asyncio.sleep(0.02)
        assert calls == [["dev-j1", "dev-j2"], ["dev-j1", "dev-j3"]]
        assert missed == []
        assert metrics.jobs_missed.labels(job_type="edge")._value.get() == 0
        # Once it is done, the instant is an ordinary (past-due) instant again.
        sched.set_edges({"dev-j4": at})
        for _ in range(100):
            if len(calls) == 3:
                break
            await asyncio.sleep(0.02)
        assert calls[-1] == ["dev-j4"]
    finally:
        sched.shutdown()


async def test_late_comers_for_an_instant_not_yet_due_on_the_service_clock_wait_for_it() -> None:
    """The service's clock behind the scheduler's (a test's simulated clock): a reconcile
    that ran before the instant plans its devices for it again. They get a job of their
    own instead of being taken at once by the running one, which would spin."""
    calls: list[list[str]] = []
    release = asyncio.Event()
    service_now = time.time()  # frozen: the instant never becomes due on this clock

    async def on_edge(devices: list[str]) -> None:
        calls.append(devices)
        await release.wait()

    sched = FleetScheduler(
        FleetMetrics(CollectorRegistry()),
        on_edge=on_edge,
        periodic={},
        clock=lambda: service_now,
    )
    sched.start()
    try:
        at = service_now + 0.2
        sched.set_edges({"dev-k1": at})
        while not calls:
            await asyncio.sleep(0.02)
        sched.set_edges({"dev-k1": at})  # re-planned by a reconcile that ran too early
        assert sched.job_count == 1  # its own job, not taken by the running one
        release.set()
        await asyncio.sleep(0.6)
        assert 2 <= len(calls) <= 3 and all(c == ["dev-k1"] for c in calls)
    finally:
        sched.shutdown()


def _state(n: int) -> StateReport:
    return StateReport(ts=n, state=LockState.LOCKED, since=n, last_seq=n)


async def test_queued_messages_are_one_batch_in_order_and_stay_behind_other_jobs() -> None:
    executor = ThreadPoolExecutor(1)
    loop = asyncio.get_running_loop()
    order: list[str] = []
    batches: list[list[int]] = []
    gate = threading.Event()

    def apply(items: list[Inbound]) -> Applied:
        batches.append([int(i.now) for i in items])
        order.extend(f"msg{int(i.now)}" for i in items)
        return Applied(touched=[i.device_id for i in items])

    done: list[Applied] = []

    async def finished(items: list[Inbound], result: Applied) -> None:
        done.append(result)

    def submit(fn: Any) -> asyncio.Future[Any]:
        return loop.run_in_executor(executor, fn)

    queue = InboundQueue(apply, submit=submit, done=finished, max_batch=3)
    blocker = submit(gate.wait)  # the database thread is busy
    for n in range(1, 6):
        queue.add(Inbound("dev-q1", _state(n), n))
    queue.seal()  # another job goes to the database thread now
    other = submit(lambda: order.append("other"))
    queue.add(Inbound("dev-q1", _state(6), 6))
    gate.set()
    await blocker
    await other
    await queue.drain()
    assert batches == [[1, 2, 3], [4, 5], [6]]
    assert order == ["msg1", "msg2", "msg3", "msg4", "msg5", "other", "msg6"]
    assert [len(r.touched) for r in done] == [3, 2, 1]
    executor.shutdown()


async def test_an_idle_database_thread_waits_briefly_for_the_rest_of_a_burst() -> None:
    """Messages trickling in to an idle database thread are one transaction, not one each;
    a job submitted behind the batch (seal) ends the wait at once."""
    executor = ThreadPoolExecutor(1)
    loop = asyncio.get_running_loop()
    batches: list[list[int]] = []

    def apply(items: list[Inbound]) -> Applied:
        batches.append([int(i.now) for i in items])
        return Applied()

    async def finished(items: list[Inbound], result: Applied) -> None:
        pass

    def submit(fn: Any) -> asyncio.Future[Any]:
        return loop.run_in_executor(executor, fn)

    queue = InboundQueue(apply, submit=submit, done=finished, linger_s=0.5)
    for n in range(1, 4):  # a trickle: the thread is idle when each arrives
        queue.add(Inbound("dev-q2", _state(n), n))
        await asyncio.sleep(0.05)
    await queue.drain()
    assert batches == [[1, 2, 3]]

    t0 = time.monotonic()
    queue.add(Inbound("dev-q2", _state(4), 4))
    await asyncio.sleep(0.05)
    queue.seal()
    await submit(lambda: None)  # the sealing job runs right after the batch, not 0.5 s later
    await queue.drain()
    assert batches == [[1, 2, 3], [4]] and time.monotonic() - t0 < 0.4
    executor.shutdown()


def test_a_periodic_job_overlapping_itself_is_no_warning(caplog: Any) -> None:
    """APScheduler's own warning for a periodic job whose previous run is still going
    (every 2 s for liveness in a window start) is dropped; the listener logs it at debug
    level, and an edge that overlaps is still an error and an alert."""
    import logging

    from apscheduler.events import EVENT_JOB_MAX_INSTANCES

    missed: list[tuple[str, list[str] | None]] = []
    sched = _scheduler([], missed)
    with caplog.at_level(logging.DEBUG):
        logging.getLogger("apscheduler.scheduler").warning(
            'Execution of job "%s" skipped: maximum number of running instances reached (%d)',
            "liveness",
            1,
        )
        logging.getLogger("apscheduler.scheduler").warning("something else")
        sched._listen(JobEvent(EVENT_JOB_MAX_INSTANCES, "liveness", None))
        sched._listen(JobEvent(EVENT_JOB_MAX_INSTANCES, "edge:@1000", None))
    levels = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert ("WARNING", "something else") in levels
    assert not any("maximum number" in m for _, m in levels)
    assert ("DEBUG", "scheduler job liveness skipped: its previous run is still going") in levels
    assert ("ERROR", "scheduler job edge:@1000 did not run at its time") in levels
    assert [job for job, _ in missed] == ["edge:@1000"]


def test_a_job_cancelled_at_shutdown_is_not_a_failure(caplog: Any) -> None:
    """Stopping cancels a running sweep: logged at info, not counted as a failed job."""
    import logging
    from datetime import UTC, datetime

    from apscheduler.events import EVENT_JOB_ERROR, JobExecutionEvent

    metrics = FleetMetrics(CollectorRegistry())
    sched = FleetScheduler(metrics, on_edge=lambda devices: asyncio.sleep(0), periodic={})
    when = datetime.now(UTC)
    with caplog.at_level(logging.INFO):
        sched._listen(
            JobExecutionEvent(
                EVENT_JOB_ERROR, "sweep", None, when, exception=asyncio.CancelledError()
            )
        )
        sched._listen(
            JobExecutionEvent(EVENT_JOB_ERROR, "sweep", None, when, exception=RuntimeError("x"))
        )
    levels = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert ("INFO", "scheduler job sweep cancelled") in levels
    assert ("ERROR", "scheduler job sweep failed: RuntimeError: x") in levels
    assert metrics.jobs_failed.labels(job_type="sweep")._value.get() == 1


async def test_quiet_for_counts_from_the_last_message_once_all_are_applied() -> None:
    """What background work after a window start waits for (``FleetService._after_edges``)."""
    executor = ThreadPoolExecutor(1)
    loop = asyncio.get_running_loop()
    gate = threading.Event()

    async def finished(items: list[Inbound], result: Applied) -> None:
        pass

    def submit(fn: Any) -> asyncio.Future[Any]:
        return loop.run_in_executor(executor, fn)

    queue = InboundQueue(lambda items: Applied(), submit=submit, done=finished, linger_s=0)
    assert queue.quiet_for() == math.inf  # nothing ever queued
    blocker = submit(gate.wait)  # the database thread is busy
    queue.add(Inbound("dev-q3", _state(1), 1))
    await asyncio.sleep(0.1)
    assert queue.quiet_for() == 0.0  # queued, not applied yet
    gate.set()
    await blocker
    await queue.drain()
    quiet = queue.quiet_for()
    assert 0.1 <= quiet < 5
    await asyncio.sleep(0.05)
    assert queue.quiet_for() > quiet
    executor.shutdown()
