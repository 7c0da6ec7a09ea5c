"""APScheduler as the timer only: it says *when* to reconcile; the database says *what*.

Settings are explicit: every job coalesces (a backlog runs once), runs one instance at a
time, and has a misfire grace long enough that a late job still runs (reconciling late is
correct; not reconciling is not). A job that misses anyway is counted and logged, and the
periodic sweep repairs whatever it would have done.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from apscheduler.events import (
    EVENT_JOB_ERROR,
    EVENT_JOB_EXECUTED,
    EVENT_JOB_MISSED,
    JobEvent,
    JobExecutionEvent,
)
from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.date import DateTrigger
from apscheduler.triggers.interval import IntervalTrigger

from .metrics import FleetMetrics

log = logging.getLogger(__name__)

JOB_DEFAULTS = {"coalesce": True, "max_instances": 1, "misfire_grace_time": 3600}


class FleetScheduler:
    def __init__(
        self,
        metrics: FleetMetrics,
        *,
        on_edge: Callable[[str], Awaitable[None]],
        periodic: dict[str, tuple[float, Callable[[], Awaitable[None]]]],
    ) -> None:
        self._metrics = metrics
        self._on_edge = on_edge
        self._periodic = periodic
        self._sched = AsyncIOScheduler(timezone=UTC, job_defaults=JOB_DEFAULTS)
        self._sched.add_listener(
            self._listen, EVENT_JOB_MISSED | EVENT_JOB_ERROR | EVENT_JOB_EXECUTED
        )

    @property
    def running(self) -> bool:
        return bool(self._sched.running)

    def start(self) -> None:
        for name, (every_s, fn) in self._periodic.items():
            self._sched.add_job(
                fn,
                IntervalTrigger(seconds=every_s),
                id=name,
                name=name,
                replace_existing=True,
                next_run_time=datetime.now(UTC),
            )
        self._sched.start()

    def shutdown(self) -> None:
        if self._sched.running:
            self._sched.shutdown(wait=False)

    def set_edges(self, edges: dict[str, float | None]) -> None:
        """(Re)schedule each device's next window edge under a stable job id."""
        for device_id, at in edges.items():
            job_id = f"edge:{device_id}"
            if at is None:
                with contextlib.suppress(JobLookupError):
                    self._sched.remove_job(job_id)
                continue
            self._sched.add_job(
                self._on_edge,
                DateTrigger(run_date=datetime.fromtimestamp(at, UTC)),
                args=[device_id],
                id=job_id,
                name=job_id,
                replace_existing=True,
            )

    def jobs(self) -> list[dict[str, Any]]:
        return [
            {"id": j.id, "next_run": j.next_run_time.isoformat() if j.next_run_time else None}
            for j in self._sched.get_jobs()
        ]

    def _listen(self, event: JobEvent) -> None:
        if event.code == EVENT_JOB_MISSED:
            self._metrics.jobs_missed.inc()
            log.error(
                "scheduler job %s missed its run time %s", event.job_id, event.scheduled_run_time
            )
        elif event.code == EVENT_JOB_ERROR:
            assert isinstance(event, JobExecutionEvent)
            self._metrics.jobs_failed.inc()
            log.error("scheduler job %s failed: %r", event.job_id, event.exception)
        elif isinstance(event, JobExecutionEvent):
            lag = (datetime.now(UTC) - event.scheduled_run_time).total_seconds()
            self._metrics.scheduler_lag.observe(max(0.0, lag))
