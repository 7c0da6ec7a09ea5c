"""APScheduler as the timer only: it says *when* to reconcile; the database says *what*.

Settings are explicit: every job coalesces (a backlog runs once), runs one instance at a
time, and has a misfire grace long enough that a late job still runs (reconciling late is
correct; not reconciling is not). A job that misses anyway is counted and logged, and the
periodic sweep repairs whatever it would have done.

**Leadership.** Every replica builds a scheduler, but only the holder of the scheduler lock
(``fleet/leader.py``) runs it; a standby keeps it paused and resumes it when it takes over.

**Time.** Instants are the service's (its injected clock); APScheduler runs on its own
``datetime.now()`` and monotonic timers. ``set_edges`` converts each instant to a delay on
the scheduler's clock when it schedules it, so the two never need to agree; when the
service's clock is stepped (NTP, or a test moving a simulated clock) the service
reconciles everything, which re-plans every edge (see ``FleetService._liveness``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from apscheduler.events import (
    EVENT_JOB_ERROR,
    EVENT_JOB_EXECUTED,
    EVENT_JOB_MAX_INSTANCES,
    EVENT_JOB_MISSED,
    JobEvent,
    JobExecutionEvent,
)
from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.date import DateTrigger
from apscheduler.triggers.interval import IntervalTrigger

from .metrics import FleetMetrics, job_type

log = logging.getLogger(__name__)

JOB_DEFAULTS = {"coalesce": True, "max_instances": 1, "misfire_grace_time": 3600}
# Edges are rounded *up* to this grid (ms), so edges a few ms apart share one job.
EDGE_TICK_MS = 50
# An instant with at least this many devices gets a job this long before it that lets the
# service prepare the edge's commands (sign its arms ahead: Ledger.presign). Useless once
# the instant is near, so it is dropped rather than run late.
PRESIGN_MIN_DEVICES = 50
PRESIGN_LEAD_S = 30.0
PRESIGN_GRACE_S = 10


class _OverlapAtDebug(logging.Filter):
    """APScheduler warns each time a periodic job finds its previous run still going:
    every 2 s for ``liveness`` while a window start keeps the database thread busy, a
    wall of warnings about nothing wrong. The listener below sees the same event; it
    alerts for an edge and logs a periodic job's overlap at debug level."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "maximum number of running instances reached" not in str(record.msg)


logging.getLogger("apscheduler.scheduler").addFilter(_OverlapAtDebug())


def _edge_job_id(instant_ms: int) -> str:
    return f"edge:@{instant_ms}"  # an instant (epoch ms), never a device id


def _presign_job_id(instant_ms: int) -> str:
    return f"presign:@{instant_ms}"


class FleetScheduler:
    def __init__(
        self,
        metrics: FleetMetrics,
        *,
        on_edge: Callable[[list[str]], Awaitable[None]],
        periodic: dict[str, tuple[float, Callable[[], Awaitable[None]]]],
        clock: Callable[[], float] = time.time,
        on_missed: Callable[[str, list[str] | None], None] | None = None,
        on_presign: Callable[[list[str], float], Awaitable[None]] | None = None,
    ) -> None:
        self._metrics = metrics
        self._on_edge = on_edge
        self._on_presign = on_presign
        self._periodic = periodic
        self._clock = clock
        self._on_missed = on_missed
        self._paused = False
        # Next edges on the service's clock, epoch ms: device -> instant -> devices.
        self._edge_of: dict[str, int] = {}
        self._edge_devices: dict[int, set[str]] = {}
        self._firing: set[int] = set()  # instants whose edge job is running now
        self.alerts: list[dict[str, Any]] = []  # the latest missed jobs, newest last
        self._sched = AsyncIOScheduler(timezone=UTC, job_defaults=JOB_DEFAULTS)
        self._sched.add_listener(
            self._listen,
            EVENT_JOB_MISSED | EVENT_JOB_ERROR | EVENT_JOB_EXECUTED | EVENT_JOB_MAX_INSTANCES,
        )

    @property
    def running(self) -> bool:
        return bool(self._sched.running)

    @property
    def leading(self) -> bool:
        """Running its jobs (not a paused standby)."""
        return self.running and not self._paused

    def pause(self) -> None:
        """Step down: keep the jobs, run none of them."""
        if self._sched.running and not self._paused:
            self._sched.pause()
        self._paused = True
        self._metrics.scheduler_running.set(0)

    def resume(self) -> None:
        """Take over: due jobs run now (coalesced), then on time."""
        if self._sched.running and self._paused:
            self._sched.resume()
        self._paused = False
        self._metrics.scheduler_running.set(1 if self._sched.running else 0)

    def wakeup(self) -> None:
        if self._sched.running and not self._paused:
            self._sched.wakeup()

    def start(self, *, paused: bool = False) -> None:
        for name, (every_s, fn) in self._periodic.items():
            self._sched.add_job(
                fn,
                IntervalTrigger(seconds=every_s),
                id=name,
                name=name,
                replace_existing=True,
                next_run_time=datetime.now(UTC),
            )
        self._sched.start(paused=paused)
        self._paused = paused
        presign = ["presign"] if self._on_presign is not None else []
        self._metrics.init_jobs([*self._periodic, "edge", *presign])
        self._metrics.scheduler_running.set(0 if paused else 1)

    def shutdown(self) -> None:
        if self._sched.running:
            self._sched.shutdown(wait=False)
        self._metrics.scheduler_running.set(0)

    def set_edges(self, edges: dict[str, float | None]) -> None:
        """(Re)schedule each device's next edge. Devices whose edges fall on the same
        instant share one job (``edge:@<epoch ms>``), so the 10,000 devices whose windows
        open at 22:00 are one reconcile call, not 10,000."""
        touched: set[int] = set()
        for device_id, at in edges.items():
            old = self._edge_of.pop(device_id, None)
            if old is not None and old in self._edge_devices:
                members = self._edge_devices[old]
                members.discard(device_id)
                if not members:
                    del self._edge_devices[old]
                    touched.discard(old)
                    for job_id in (_edge_job_id(old), _presign_job_id(old)):
                        with contextlib.suppress(JobLookupError):
                            self._sched.remove_job(job_id)
            if at is None:
                continue
            # Never early: an edge reconciled before its instant changes nothing.
            instant = math.ceil(at * 1000 / EDGE_TICK_MS) * EDGE_TICK_MS
            self._edge_of[device_id] = instant
            self._edge_devices.setdefault(instant, set()).add(device_id)
            touched.add(instant)
        now = self._clock()
        # Late-comers for an instant that is due and whose job is running join that job.
        joined = {i for i in touched & self._firing if i <= now * 1000}
        for instant in touched - joined:
            # The service's instant as a delay on the scheduler's own clock (re-done for
            # every instant touched, so a re-plan after a clock step moves the job).
            job_id = _edge_job_id(instant)
            self._sched.add_job(
                self._fire_edge,
                DateTrigger(run_date=datetime.now(UTC) + timedelta(seconds=instant / 1000 - now)),
                args=[instant],
                id=job_id,
                name=job_id,
                replace_existing=True,
            )
            self._plan_presign(instant, now)

    def _plan_presign(self, instant: int, now: float) -> None:
        """A presign job for a crowded instant far enough ahead (once per instant: its job
        is there until it runs, and after that the instant is nearer than the lead)."""
        if self._on_presign is None:
            return
        ahead = instant / 1000 - PRESIGN_LEAD_S - now
        if ahead <= 0 or len(self._edge_devices.get(instant, ())) < PRESIGN_MIN_DEVICES:
            return
        job_id = _presign_job_id(instant)
        if self._sched.get_job(job_id) is not None:
            return
        self._sched.add_job(
            self._fire_presign,
            DateTrigger(run_date=datetime.now(UTC) + timedelta(seconds=ahead)),
            args=[instant],
            id=job_id,
            name=job_id,
            replace_existing=True,
            misfire_grace_time=PRESIGN_GRACE_S,
        )

    async def _fire_presign(self, instant: int) -> None:
        devices = sorted(self._edge_devices.get(instant, ()))
        if devices and self._on_presign is not None and self._clock() * 1000 < instant:
            await self._on_presign(devices, instant / 1000)

    async def _fire_edge(self, instant: int) -> None:
        """Reconcile the devices of this instant, and any added to it while that runs: a
        reconcile that decided just before the instant (a sweep's part) plans its devices
        for it. A second job for the instant would find this one running and count as
        missed (an alert, at every big window start)."""
        self._firing.add(instant)
        try:
            devices = self._take_edge(instant)
            while devices:
                await self._on_edge(devices)
                # Only once the instant is due on the service's clock: a reconcile that ran
                # before it (a clock behind the scheduler's) re-plans its devices for it.
                due = instant <= self._clock() * 1000
                devices = self._take_edge(instant) if due else []
        finally:
            self._firing.discard(instant)

    def _take_edge(self, instant: int) -> list[str]:
        """The devices of this instant, no longer scheduled (their reconcile re-plans them)."""
        devices = sorted(self._edge_devices.pop(instant, ()))
        for device_id in devices:
            if self._edge_of.get(device_id) == instant:
                del self._edge_of[device_id]
        return devices

    @property
    def job_count(self) -> int:
        return len(self._sched.get_jobs())

    def jobs(self) -> list[dict[str, Any]]:
        out = []
        for j in self._sched.get_jobs():
            job = {"id": j.id, "next_run": j.next_run_time.isoformat() if j.next_run_time else None}
            if j.id.startswith(("edge:@", "presign:@")):
                job["devices"] = len(self._edge_devices.get(j.args[0], ()))
            out.append(job)
        return out

    def _listen(self, event: JobEvent) -> None:
        if event.code in (EVENT_JOB_MISSED, EVENT_JOB_MAX_INSTANCES):
            # A missed edge is an alert (metric, log, /api/scheduler) and is repaired at
            # once: the service reconciles what the job would have. A periodic job that
            # found its previous run still going is a debug line (it runs next time).
            family = job_type(event.job_id)
            missed = event.code == EVENT_JOB_MISSED
            if family == "presign":  # only an optimisation: the edge itself is on time
                log.info("scheduler job %s skipped (too late to be of use)", event.job_id)
                return
            if not missed and family != "edge":
                log.debug("scheduler job %s skipped: its previous run is still going", event.job_id)
            else:
                self._metrics.jobs_missed.labels(job_type=family).inc()
                self.alerts = [
                    *self.alerts[-49:],
                    {
                        "job": event.job_id,
                        "why": "missed" if missed else "previous run still going",
                        "at": self._clock(),
                    },
                ]
                log.error("scheduler job %s did not run at its time", event.job_id)
                if self._on_missed is not None:
                    # The devices of a missed edge (None: a periodic job, i.e. all).
                    devices = None
                    if family == "edge":
                        devices = self._take_edge(int(event.job_id.removeprefix("edge:@")))
                    self._on_missed(event.job_id, devices)
        elif event.code == EVENT_JOB_ERROR:
            assert isinstance(event, JobExecutionEvent)
            if isinstance(event.exception, asyncio.CancelledError):
                # The service is stopping and cancelled the running job: not a failure.
                log.info("scheduler job %s cancelled", event.job_id)
                return
            self._metrics.jobs_failed.labels(job_type=job_type(event.job_id)).inc()
            exc = event.exception
            # Class and a bounded message only: no traceback, no SQL parameters (db.py hides them).
            log.error(
                "scheduler job %s failed: %s: %s", event.job_id, type(exc).__name__, str(exc)[:200]
            )
        elif isinstance(event, JobExecutionEvent):
            self._metrics.jobs_run.labels(job_type=job_type(event.job_id)).inc()
            lag = (datetime.now(UTC) - event.scheduled_run_time).total_seconds()
            self._metrics.scheduler_lag.observe(max(0.0, lag))
