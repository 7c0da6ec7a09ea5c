"""The fleet service: one task group around the MQTT link, the scheduler and the HTTP API."""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import uvicorn
from fastapi import Request
from prometheus_client import CollectorRegistry
from sqlalchemy import text

from . import accounts, auth, heap, sessions, signing, snapshot
from .api import create_app
from .auth import Principal
from .config import FleetSettings
from .core import FleetOps, Reconciled
from .db import init_db, make_engine
from .gauges import CertificateWatch, inventory_certificates
from .incident import Detector, PlatformIncidents
from .ingest import Ingest
from .liveness import Liveness, confirm_silent
from .metrics import FleetMetrics
from .models import Device, Look, Window
from .mqtt import MqttLink
from .outbound import Publish
from .pairing import Pairing
from .plan_service import PlanRuntime
from .reconcile import Policy
from .scheduler import FleetScheduler

log = logging.getLogger(__name__)
T = TypeVar("T")

RECONCILE_PART = 1000  # devices per transaction when one edge concerns very many
# Background work (the sweep's full pass, the dashboards' gauges) after an edge waits
# until no device message has been queued for this long (its acks and state reports are
# in), a sweep interval at most: run among a 10,000-device window start's acks, the gauge
# refresh alone was 6 % of the fleet's storm CPU, and a sweep pass re-checked devices the
# edge had just reconciled while their acks waited behind it.
SETTLE_QUIET_S = 1.0


class FleetService:
    def __init__(
        self,
        settings: FleetSettings,
        *,
        clock: Callable[[], float] = time.time,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.metrics = FleetMetrics(registry)
        self.certs = CertificateWatch(
            self.metrics, ca_file=settings.ca_file, cert_file=settings.cert_file
        )
        self.engine = make_engine(settings.database_url)
        init_db(self.engine)
        self.key = signing.load_or_create(settings.signing_key_file)
        self.totp_box = accounts.SecretBox.load_or_create(settings.totp_key_path())
        policy = Policy(
            arm_confirm_s=settings.arm_confirm_s,
            visit_horizon_s=settings.visit_horizon_s,
            preflight_s=settings.preflight_s,
        )
        self.ops = FleetOps(self.engine, self.key, self.metrics, policy)
        self.liveness = Liveness(settings.offline_after_s)
        # One database thread: the loop never blocks on I/O and writes never race.
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="fleet-db")
        self.ingest = Ingest(
            self.ops,
            self.liveness,
            self.metrics,
            db=self.db,
            reconcile=self.reconcile,
            clock=clock,
            publish=self.publish,
            submit=self._submit,
        )
        self.link = MqttLink(
            settings,
            self.metrics,
            self.ingest.handle_batch,
            self._on_connect,
            fast=self.ingest.heartbeat_fast,  # heartbeats of online devices, in its thread
            clock=clock,
        )
        self.scheduler = FleetScheduler(
            self.metrics,
            on_edge=self._on_edge,
            periodic={
                "sweep": (settings.sweep_interval_s, self._sweep),
                "liveness": (settings.liveness_interval_s, self._liveness),
                "resend": (settings.resend_after_s, self._resend),
            },
            clock=clock,
            on_missed=self._on_missed,
            on_presign=self._on_presign,
        )
        # One platform incident when many devices drop at once (fleet/incident.py).
        self.incidents = PlatformIncidents(
            Detector(
                min_devices=settings.incident_min_devices,
                min_share=settings.incident_min_share,
                window_s=settings.incident_window_s,
                link_down_s=settings.offline_after_s,
                close_share=settings.incident_close_share,
                settle_s=settings.incident_settle_s,
            ),
            self.metrics,
            db=self.db,
            run=self.ops.run,
        )
        # Care plans: scheduler leadership, outbox sender, coverage (fleet/plan_service.py).
        self.plans = PlanRuntime(self)
        self.ops.leading = lambda: self.plans.leader
        # Pairing, device certificates, equipment lifecycle (fleet/pairing.py); needs the CA.
        self.pairing: Pairing | None = Pairing(self) if settings.pairing.enabled else None
        self._api: uvicorn.Server | None = None
        self._stopping = asyncio.Event()
        self._edges_running = 0  # edge reconciles in progress; a full pass waits for none
        self._no_edge = asyncio.Event()
        self._no_edge.set()
        self._edge_done = -math.inf  # monotonic time the last edge reconcile ended

    # --- plumbing --------------------------------------------------------------------

    async def db(self, fn: Callable[..., T], *args: Any) -> T:
        if self.ingest.inbound is not None:
            self.ingest.inbound.seal()  # queued device messages stay ahead of this job
        return await self._submit(functools.partial(fn, *args))

    def _submit(self, fn: Callable[[], T]) -> asyncio.Future[T]:
        """Put a job on the database thread now (FIFO with every job before it)."""
        return asyncio.get_running_loop().run_in_executor(self._executor, fn)

    async def publish(self, items: list[Publish]) -> None:
        if items:
            await self.link.publish(items)

    async def reconcile(
        self, device_ids: list[str] | None, *, edge: bool = False, background: bool = False
    ) -> None:
        """Reconcile these devices (``None``: all, the sweep's full pass); ``edge``: their
        scheduled instant (a window start), whose commands go before anything else;
        ``background`` (the periodic sweep): after an edge, wait until it has settled."""
        if not self.plans.leader:
            return  # only the scheduler leader issues lock commands; its sweep covers this
        if device_ids is None:
            # Every device, in parts like an edge: device messages queued for the database
            # thread meanwhile (a Last Will, acks) wait for one part, not for the whole
            # fleet (a 10,000-device pass in one transaction held them for seconds).
            # One deadline for the whole pass: it may wait at most a sweep interval in all.
            until = time.monotonic() + self.settings.sweep_interval_s if background else None
            if until is not None:
                await self._after_edges(until)
            publish, every = await self.db(self._at_now, self.ops.begin_full_pass)
            await self.publish(publish)
            await self._reconcile(every, full_pass=True, background_until=until)
        else:
            await self._reconcile(device_ids, edge=edge)

    def _at_now(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args, now)`` with ``now`` read when the database thread gets to it: a job
        queued behind a storm's parts and acks decides on the time it runs, not the time it
        was queued (a sweep part queued just before 22:00 and run after it would otherwise
        see no window open, send no arm and plan its devices for 22:00 again)."""
        return fn(*args, self.clock())

    async def _reconcile(
        self,
        device_ids: list[str],
        *,
        edge: bool = False,
        full_pass: bool = False,
        background_until: float | None = None,
    ) -> None:
        """In parts of ``RECONCILE_PART`` devices (10,000 windows opening at 22:00), a
        transaction each, each part's commands published as soon as it is done, so the
        first arms leave after one part's work, not after the whole fleet's.

        An edge queues every part on the database thread at once, ahead of the acks and
        state reports its first arms bring back (applied after the last part; their times
        are taken on arrival): one part at a time let each part wait for the previous
        part's acks, and the last arms of a 10,000-device start left seconds later.
        Anything else keeps one part ahead, so device messages queued meanwhile (a Last
        Will) wait for one part, not for all; a full pass (the sweep, a safety net) also
        waits while an edge is reconciled, whose arms matter more than its re-check (the
        periodic sweep's also until the edge has settled: :meth:`_after_edges`). A part
        that fails costs only its own devices (the sweep repairs them): the others' commands
        still go out, then its error is raised."""
        parts = [list(p) for p in snapshot.chunks(device_ids, RECONCILE_PART)]

        async def part(ids: list[str]) -> Reconciled:
            if background_until is not None:
                await self._after_edges(background_until)
            elif full_pass:
                await self._no_edge.wait()
            return await self.db(self._at_now, self.ops.reconcile, ids)

        ahead = len(parts) if edge else 1
        queued = collections.deque(asyncio.ensure_future(part(ids)) for ids in parts[:ahead])
        rest = iter(parts[ahead:])
        failed: Exception | None = None
        try:
            while queued:
                result: Reconciled | None = None
                try:
                    result = await queued.popleft()
                except Exception as exc:
                    failed = failed or exc
                nxt = next(rest, None)
                if nxt is not None:
                    queued.append(asyncio.ensure_future(part(nxt)))
                if result is not None:
                    await self.publish(result.publish)
                    self.scheduler.set_edges(result.next_edges)
        finally:  # stopping: parts not started yet are not started
            for future in queued:
                future.cancel()
        if failed is not None:
            raise failed

    # --- lifecycle -------------------------------------------------------------------

    async def run(self, *, api: bool = True) -> None:
        for device_id, last_seen, online, camera in await self.db(self.ops.known_devices):
            self.ingest.known.add(device_id)
            # Silence counts from start-up, so a restart never marks the fleet offline.
            at = max(last_seen or 0, self.clock())
            self.liveness.baseline(device_id, at, online=online, camera=camera)
        heap.settle()  # start-up's objects out of the GC's scans, and fewer collections
        try:
            async with asyncio.TaskGroup() as tg:
                tasks = [tg.create_task(self.link.run(), name="mqtt-link")]
                if api:
                    tasks.append(tg.create_task(self._serve_api(), name="http-api"))
                # Paused until this replica holds the scheduler lock; the leadership
                # task then resumes it and reconciles everything (start-up reconcile).
                self.scheduler.start(paused=True)
                tasks.append(tg.create_task(self.plans.run(), name="scheduler-leadership"))
                tasks.append(tg.create_task(self._gauges(), name="gauges"))
                tasks.append(tg.create_task(self._standby_liveness(), name="standby-liveness"))
                if self.pairing is not None:
                    tasks.append(tg.create_task(self.pairing.run(), name="pairing"))
                await self._stopping.wait()
                for task in tasks:
                    task.cancel()
        finally:
            if self.ingest.inbound is not None:
                # Device messages already taken off the wire (and acknowledged to the broker)
                # are applied before the database closes.
                try:
                    await asyncio.wait_for(self.ingest.inbound.drain(), 10)
                except (Exception, asyncio.CancelledError) as exc:
                    log.warning("queued device messages not applied: %s", type(exc).__name__)
            self.scheduler.shutdown()
            await self.plans.stop()
            self.plans.release()
            self._executor.shutdown(wait=True, cancel_futures=True)
            self.engine.dispose()
            log.info("fleet service stopped")

    def stop(self) -> None:
        self._stopping.set()
        if self._api is not None:
            self._api.should_exit = True

    async def _serve_api(self) -> None:
        config = uvicorn.Config(
            create_app(self),
            host=self.settings.api_host,
            port=self.settings.api_port,
            log_level="warning",
            lifespan="off",
            access_log=False,
        )
        self._api = uvicorn.Server(config)
        await self._api.serve()

    async def _on_connect(self) -> None:
        # A (re)connection may have lost in-flight messages either way: resync everything.
        # Only the scheduler leader sends commands (a standby re-sending the ledger would
        # race the leader's own resends); a standby that becomes leader reconciles then.
        if not self.plans.leader:
            return
        await self.reconcile(None)
        await self.publish(await self.db(self.ops.resend, self.clock(), 0.0))

    async def _on_edge(self, device_ids: list[str]) -> None:
        # Every device whose edge falls on this instant, in one reconcile (fleet/scheduler.py).
        self._edges_running += 1
        self._no_edge.clear()
        try:
            await self.reconcile(device_ids, edge=True)
        finally:
            self._edges_running -= 1
            if not self._edges_running:
                self._edge_done = time.monotonic()
                self._no_edge.set()

    async def _after_edges(self, until: float) -> None:
        """A turn for background work (the sweep's full pass, the gauges): no edge being
        reconciled, and within a sweep interval after one, its acks and state reports
        applied (no device message queued for ``SETTLE_QUIET_S``); past ``until``
        (monotonic) only the first, so a fleet whose edges and messages never pause still
        gets its sweep. Real time: this is about the machine's load, not the service's clock."""
        cap = self.settings.sweep_interval_s
        settle = min(SETTLE_QUIET_S, cap / 10)
        while True:
            await self._no_edge.wait()
            now = time.monotonic()
            inbound = self.ingest.inbound
            quiet = settle if inbound is None else inbound.quiet_for()
            if quiet >= settle or now >= until or now - self._edge_done >= cap:
                return
            await asyncio.sleep(min(until - now, settle - quiet))

    async def _on_presign(self, device_ids: list[str], at: float) -> None:
        """Sign a crowded edge's arms ahead (``Ledger.presign``), a part per database job
        like the edge itself, so device messages wait for one part at most. Only an
        optimisation: a failure here costs the edge the signing it would have done anyway."""
        if not self.plans.leader:
            return
        signed = 0
        try:
            for part in snapshot.chunks(device_ids, RECONCILE_PART):
                signed += await self.db(self.ops.presign, list(part), at)
        except Exception as exc:  # logged; the edge signs what is missing itself
            log.warning("signing ahead failed: %s: %s", type(exc).__name__, str(exc)[:200])
        log.info("signed %d of %d devices' arms ahead of their edge", signed, len(device_ids))

    def _on_missed(self, job_id: str, device_ids: list[str] | None) -> None:
        """A job that did not run at its time: reconcile now what it would have (an edge's
        devices; ``None``: everything)."""
        repair = self.reconcile(None) if device_ids is None else self._on_edge(device_ids)
        asyncio.get_running_loop().create_task(repair, name=f"repair-{job_id}"[:60])

    async def _sweep(self) -> None:
        await self.reconcile(None, background=True)
        await self.plans.on_sweep(self.clock())

    async def _standby_liveness(self) -> None:
        """A standby writes what it heard (last-seen, camera, clock) like the leader's
        liveness job does: with a shared subscription the leader hears only its share."""
        while True:
            await asyncio.sleep(self.settings.liveness_interval_s)
            if self.plans.leader:
                continue  # the liveness job does this and more
            try:
                seen, camera = self.liveness.drain(), self.liveness.drain_camera()
                await self.db(self.ops.flush_liveness, seen, camera, self.clock())
            except Exception as exc:  # the next round writes what is still dirty
                log.warning("standby liveness flush failed: %s", type(exc).__name__)

    async def _gauges(self) -> None:
        """Dashboard gauges from the database, on every replica (a standby too) and
        whatever the scheduler does: replicas export the same values, dashboards take max()."""
        while True:
            # A window start's arms and acks first; gauges can wait (a sweep interval at most).
            await self._after_edges(time.monotonic() + self.settings.sweep_interval_s)
            try:
                now = self.clock()
                await self.db(self.ops.refresh_gauges, now)
                self.metrics.scheduler_jobs.set(self.scheduler.job_count)
                inventory = await self.db(
                    self.ops.run, functools.partial(inventory_certificates, now=now)
                )
                await asyncio.to_thread(self.certs.refresh, now, inventory=inventory)
            except Exception as exc:  # stale gauges are alerted on (TillsynGaugesStale)
                log.warning("gauge refresh failed: %s", type(exc).__name__)
            # After a storm the C heap keeps its high-water mark; give the free part back.
            await asyncio.to_thread(heap.trim)
            await asyncio.sleep(self.settings.sweep_interval_s)

    async def _resend(self) -> None:
        await self.publish(
            await self.db(self.ops.resend, self.clock(), self.settings.resend_after_s)
        )

    async def _liveness(self) -> None:
        if self.plans.clock_step():  # (silence is monotonic time: liveness needs no shift)
            await self.reconcile(None)  # re-plans every edge on the scheduler's clock
        now = self.clock()
        self.metrics.scheduler_heartbeat.set(now)
        ages = self.liveness.ages()
        self.metrics.heartbeat_age.observe_many(ages)
        self.metrics.heartbeat_age_max.set(max(ages, default=0.0))
        # The fleet's own reading lag (a busy process, a burst) extends the threshold by as
        # much, up to the threshold itself: lagging longer than that, it is blind, and
        # blindness sends people (as a lost broker link does).
        lag = self.link.lag()
        self.metrics.ingest_lag.set(lag)
        silent = self.liveness.silent(min(lag, self.settings.offline_after_s))
        if silent and self.settings.shared_group:  # replicas: what the others heard counts
            confirm = functools.partial(confirm_silent, live=self.liveness, silent=silent, now=now)
            silent = await self.db(self.ops.run, confirm)
        touched = await self.db(self.ops.mark_silent, silent, now)
        touched += await self.db(
            self.ops.flush_liveness, self.liveness.drain(), self.liveness.drain_camera(), now
        )
        if touched:
            await self.reconcile(touched)
        await self.incidents.tick(
            mono=time.monotonic(),
            now=now,
            online=self.liveness.online_count(),
            fleet=len(self.ingest.known),
            link_up=self.link.connected.is_set(),
        )

    async def readiness(self) -> dict[str, bool]:
        def ping() -> bool:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            return True

        try:
            # Its own thread, not the DB worker: a long reconcile must not read as "DB down".
            db_ok = await asyncio.wait_for(asyncio.to_thread(ping), 5)
        except Exception:  # any failure means not ready
            db_ok = False
        return {
            "database": db_ok,
            "broker": self.link.connected.is_set(),
            "scheduler": self.scheduler.running,
            # This replica holds the scheduler lock (a standby is ready too: it serves
            # ingest and the API, and takes over when the leader goes).
            "scheduler_leader": self.plans.leader,
        }

    # --- API operations --------------------------------------------------------------

    async def register_device(self, device: Device, actor: str = "api") -> Device:
        created = await self.db(self.ops.register_device, device, self.clock(), actor)
        self.ingest.known.add(created.id)
        self.liveness.baseline(created.id, self.clock(), online=False)
        return created

    async def add_window(self, window: Window, actor: str = "api") -> Window:
        created = await self.db(self.ops.add_window, window, self.clock(), actor)
        await self.reconcile([created.device_id])
        return created

    async def remove_window(self, window_id: int, actor: str = "api") -> Window:
        window = await self.db(self.ops.remove_window, window_id, self.clock(), actor)
        await self.reconcile([window.device_id])
        return window

    async def start_look(self, device_id: str, staff_id: str, max_s: int | None) -> Look:
        cap = max_s or self.settings.look_default_s
        look, pub = await self.db(self.ops.start_look, device_id, staff_id, cap, self.clock())
        await self.publish([pub])
        return look

    async def authenticate(self, request: Request) -> Principal | None:
        """Bearer API token, else the session cookie of an interactive login -> principal."""
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return await sessions.authenticate(self, request)
        return await self.db(self.ops.run, lambda s: auth.principal_for_token(s, token.strip()))

    def device_json(self, device: Device) -> dict[str, Any]:
        data = device.model_dump(mode="json")
        data["online_in_memory"] = self.liveness.is_online(device.id)
        return data
