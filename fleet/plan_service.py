"""The service side of care plans: scheduler leadership, the webhook sender, the nightly
coverage report, and the plan/check operations the API and CLI call.

One :class:`PlanRuntime` per :class:`~fleet.service.FleetService`. Its ``run()`` task is the
leadership loop: try the scheduler lock; on success resume the scheduler, reconcile
everything and start the outbox sender; while leading, make sure the lock is still held
(a PostgreSQL session can be lost) and step down at once if not.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING, Any, TypeVar

from sqlmodel import Session, select

from . import checks, coverage, leader, outbox, plans
from .errors import Conflict
from .outbound import Publish
from .plan_models import CarePlan, Outcome, PlanOptOut, StepResult
from .plan_rules import load_tz, night_at, night_bounds

if TYPE_CHECKING:
    from .auth import Principal
    from .models import Look
    from .service import FleetService

log = logging.getLogger(__name__)
T = TypeVar("T")

CLOCK_STEP_S = 1.0  # a jump of the service clock against the scheduler's larger than this

Mutation = Callable[[Session, checks.Ctx, float], tuple[T, list[Publish], set[str]]]


class PlanRuntime:
    def __init__(self, service: FleetService) -> None:
        self._s = service
        settings = service.settings
        self.lock = leader.lock_for(settings.database_url, service.engine)
        self.leader = False
        self._offset: float | None = None
        self._sender_task: asyncio.Task[None] | None = None
        self.sender: outbox.WebhookSender | None = None
        if settings.webhook_url:
            self.sender = outbox.WebhookSender(
                url=settings.webhook_url,
                db=service.db,
                run=service.ops.run,
                clock=service.clock,
                timeout_s=settings.webhook_timeout_s,
                backoff_s=settings.webhook_backoff_s,
                backoff_max_s=settings.webhook_backoff_max_s,
                on_result=self._delivered,
            )

    # --- leadership ----------------------------------------------------------------------

    async def run(self) -> None:
        """The leadership loop (a task for the service's lifetime)."""
        every = self._s.settings.scheduler_lock_retry_s
        while True:
            try:
                if not self.leader:
                    if await self._s.db(self.lock.try_acquire):
                        await self._take_over()
                elif not await self._s.db(self.lock.still_held):
                    self._step_down("lock lost")
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a database hiccup: try again next round
                log.error("scheduler lock: %s", type(exc).__name__)
            await asyncio.sleep(every)

    async def _take_over(self) -> None:
        self.leader = True
        log.info("scheduler leader (%s)", self.lock.where)
        self._s.scheduler.resume()
        await self._s.reconcile(None)
        if self.sender is not None:
            self._sender_task = asyncio.create_task(self.sender.run(), name="outbox-sender")

    def _step_down(self, why: str) -> None:
        log.error("scheduler leadership lost (%s): standing by", why)
        self.leader = False
        self._s.scheduler.pause()
        if self._sender_task is not None:
            self._sender_task.cancel()
            self._sender_task = None

    async def stop(self) -> None:
        if self._sender_task is not None:
            self._sender_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sender_task
        self.leader = False

    def release(self) -> None:
        try:
            self.lock.release()
        except Exception as exc:  # shutting down anyway; the OS/server drops it
            log.warning("releasing the scheduler lock: %s", type(exc).__name__)

    # --- time ----------------------------------------------------------------------------

    def clock_step(self) -> float:
        """How far the service clock jumped against the scheduler's since the last call."""
        offset = self._s.clock() - time.time()
        previous, self._offset = self._offset, offset
        if previous is not None and abs(offset - previous) > CLOCK_STEP_S:
            log.warning("service clock stepped by %.1f s: re-planning", offset - previous)
            return offset - previous
        return 0.0

    # --- periodic ------------------------------------------------------------------------

    async def on_sweep(self, now: float) -> None:
        await self._s.db(self._coverage_due, now)
        count, oldest = await self._s.db(self._s.ops.run, outbox.backlog)
        m = self._s.metrics
        m.outbox_pending.set(count)
        m.outbox_oldest_age.set(max(0.0, now - oldest) if oldest is not None else 0.0)
        if self.sender is not None and count:
            self.sender.wake.set()

    def _coverage_due(self, now: float) -> None:
        tz = load_tz(self._s.settings.tz)
        night = night_at(datetime.fromtimestamp(now, UTC), tz).toordinal() - 1
        last = date.fromordinal(night)
        if now < night_bounds(last, tz)[1].timestamp() + self._s.settings.coverage_after_s:
            return
        with self._s.ops.session() as session:
            if session.exec(_any_plan()).first() is None:
                return
            coverage.store(session, last, now)

    def _delivered(self, ok: bool) -> None:
        self._s.metrics.outbox_deliveries.labels(outcome="delivered" if ok else "retry").inc()

    # --- operations (API and CLI) --------------------------------------------------------

    async def mutate(self, fn: Mutation[T]) -> T:
        """Run one change in one transaction, then publish and reconcile what it touched."""
        now = self._s.clock()
        ops = self._s.ops

        def run() -> tuple[T, list[Publish], set[str]]:
            with ops.session() as session:
                return fn(session, ops.check_ctx, now)

        result, pubs, devices = await self._s.db(run)
        await self._s.publish(pubs)
        if devices:
            await self._s.reconcile(sorted(devices))
        if self.sender is not None:
            self.sender.wake.set()
        return result

    async def create_plan(
        self, values: dict[str, Any], who: Principal, reason: str, activate: bool
    ) -> dict[str, Any]:
        def fn(s: Session, ctx: checks.Ctx, now: float) -> Any:
            plan, pubs = plans.create(
                s, ctx, values, actor=who.staff_id, reason=reason, now=now, activate=activate
            )
            return plans.plan_json(s, plan), pubs, _devices(plan)

        return await self.mutate(fn)

    async def update_plan(
        self, plan_id: int, changes: dict[str, Any], who: Principal, reason: str
    ) -> dict[str, Any]:
        def fn(s: Session, ctx: checks.Ctx, now: float) -> Any:
            before = _devices(plans.get(s, plan_id))
            plan, pubs = plans.update(
                s, ctx, plan_id, changes, actor=who.staff_id, reason=reason, now=now
            )
            return plans.plan_json(s, plan), pubs, before | _devices(plan)

        return await self.mutate(fn)

    async def plan_action(
        self, plan_id: int, action: str, who: Principal, reason: str
    ) -> dict[str, Any]:
        change = {"activate": plans.activate, "end": plans.end}[action]

        def fn(s: Session, ctx: checks.Ctx, now: float) -> Any:
            plan, pubs = change(s, ctx, plan_id, actor=who.staff_id, reason=reason, now=now)
            return plans.plan_json(s, plan), pubs, _devices(plan)

        return await self.mutate(fn)

    async def pause(
        self,
        plan_id: int,
        start_at: float | None,
        end_at: float | None,
        kind: str,
        who: Principal,
        reason: str,
    ) -> dict[str, Any]:
        def fn(s: Session, ctx: checks.Ctx, now: float) -> Any:
            pause, pubs = plans.add_pause(
                s,
                ctx,
                plan_id,
                start_at=now if start_at is None else start_at,
                end_at=end_at,
                kind=kind,
                actor=who.staff_id,
                reason=reason,
                now=now,
            )
            return pause.model_dump(mode="json"), pubs, _devices(plans.get(s, plan_id))

        return await self.mutate(fn)

    async def resume(
        self, plan_id: int, pause_id: int, at: float | None, who: Principal, reason: str
    ) -> dict[str, Any]:
        def fn(s: Session, ctx: checks.Ctx, now: float) -> Any:
            pause, pubs = plans.end_pause(
                s, ctx, plan_id, pause_id, at=at, actor=who.staff_id, reason=reason, now=now
            )
            return pause.model_dump(mode="json"), pubs, _devices(plans.get(s, plan_id))

        return await self.mutate(fn)

    async def opt_out(
        self, plan_id: int, night: date, who: Principal, reason: str, withdraw: bool = False
    ) -> dict[str, Any]:
        def fn(s: Session, ctx: checks.Ctx, now: float) -> Any:
            kw: dict[str, Any] = {"actor": who.staff_id, "reason": reason, "now": now}
            if withdraw:
                pubs = plans.remove_opt_out(s, ctx, plan_id, night, **kw)
                row: PlanOptOut | None = None
            else:
                row, pubs = plans.add_opt_out(s, ctx, plan_id, night, **kw)
            data = {"plan_id": plan_id, "night": night.isoformat(), "opted_out": row is not None}
            return data, pubs, _devices(plans.get(s, plan_id))

        return await self.mutate(fn)

    async def look(self, check_id: int, who: Principal) -> dict[str, Any]:
        """Start a look for a check whose window is open (signed token naming the staff)."""
        now = self._s.clock()
        ops = self._s.ops

        def run() -> tuple[Look, Publish]:
            with ops.session() as s:
                check = checks.get_check(s, check_id)
                if check.device_id is None:
                    raise Conflict(f"check {check_id} has no device")
                if not check.start_at <= now < check.end_at or check.outcome is not None:
                    raise Conflict(f"check {check_id} is not open ({check.state.value})")
                plan = plans.get(s, check.plan_id)
                device = ops._device(s, check.device_id)
                return ops.start_look_in(s, device, who.staff_id, plan.look_s, now)

        look, pub = await self._s.db(run)
        await self._s.publish([pub])
        return look.model_dump(mode="json")

    async def outcome(self, check_id: int, outcome: Outcome, who: Principal) -> dict[str, Any]:
        def fn(s: Session, ctx: checks.Ctx, now: float) -> Any:
            check, pubs = checks.record_outcome(
                s, ctx, check_id, outcome, staff=who.staff_id, now=now
            )
            return checks.check_json(check), pubs, {check.device_id} - {None}

        return await self.mutate(fn)

    async def complete_step(
        self, step_id: int, result: StepResult, who: Principal
    ) -> dict[str, Any]:
        def fn(s: Session, ctx: checks.Ctx, now: float) -> Any:
            step, pubs = checks.complete_step(s, ctx, step_id, result, staff=who.staff_id, now=now)
            return checks.step_json(step), pubs, set()

        return await self.mutate(fn)

    async def query(self, fn: Callable[[Session], T]) -> T:
        return await self._s.db(self._s.ops.run, fn)


def _devices(plan: CarePlan) -> set[str]:
    return {plan.device_id} if plan.device_id else set()


def _any_plan() -> Any:
    return select(CarePlan.id).limit(1)
