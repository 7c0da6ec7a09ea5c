"""Prometheus metrics of the fleet service, on an injectable registry.

Cardinality is bounded by construction: no label ever carries a device, resident, staff
or command id (per-device detail is in the API). Every label has a small, known set of
values; the ones known up front are initialised to zero so that ``increase()`` sees the
first event and dashboards show 0 rather than "no data".

Who feeds what (``owner`` in :data:`FleetMetrics.catalogue`):

- ``gauges``: recomputed from the database every sweep interval, by every replica
  and independently of the scheduler (``fleet/gauges.py``, ``FleetService._gauges``);
- ``liveness``: set from memory on the liveness job (``fleet/service.py``);
- ``certs``: read from the PKI files, throttled (``fleet/gauges.py``, ``CertificateWatch``);
- ``event``: counters and histograms incremented where the thing happens;
- ``plans`` / ``outbox`` / ``pairing``: defined here with their label vocabularies, fed
  by the care-plan (``fleet/checks.py``), outbox (``fleet/plan_service.py``) and pairing
  (``fleet/pairing.py``, ``fleet/lifecycle.py``) code; the outbox backlog is also
  recomputed with the other gauges.

The full list, with meaning, is in ``docs/operations.md`` (generated from the catalogue).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Literal, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

from tillsyn_protocol import CommandKind, LockState, RefusalReason

from .models import VisitCause

__all__ = [
    "CHECK_OUTCOMES",
    "OUTBOX_OUTCOMES",
    "PAIRING_OUTCOMES",
    "REVOCATION_REASONS",
    "WINDOW_EVENTS",
    "FleetMetrics",
    "MetricInfo",
    "job_type",
    "set_labelled",
]

Kind = Literal["counter", "gauge", "histogram"]
Owner = Literal["gauges", "liveness", "certs", "event", "plans", "outbox", "pairing"]
M = TypeVar("M", bound=MetricWrapperBase)


def _remembered(metric: MetricWrapperBase, values: tuple[Any, ...], kw: dict[str, Any]) -> Any:
    """``metric.labels(...)``, each child looked up once per call shape: prometheus_client
    checks the names, builds the value tuple and takes a lock on every call (a few us),
    and the storm paths call it per message. Counters and histograms only: their
    children are never removed (a gauge's are, which would leave a stale child here)."""
    memo: dict[Any, Any] = metric.__dict__.setdefault("_tillsyn_children", {})
    key = (values, tuple(kw.items()))
    child = memo.get(key)
    if child is None:
        child = memo[key] = MetricWrapperBase.labels(metric, *values, **kw)
    return child


class _Counter(Counter):
    def labels(self, *values: Any, **kw: Any) -> _Counter:
        return _remembered(self, values, kw)  # type: ignore[no-any-return]


class _Histogram(Histogram):
    def labels(self, *values: Any, **kw: Any) -> _Histogram:
        return _remembered(self, values, kw)  # type: ignore[no-any-return]

    def observe_many(self, amounts: Iterable[float]) -> None:
        """``observe`` of each amount, counted per bucket first: a bucket's lock once per
        call instead of once per amount. The liveness run observes every online device's
        heartbeat age, 250,000 every 2 s at a country's scale (0.7 us each one by one, a
        tenth of a core). Uses prometheus-client's own fields (pinned;
        ``tests/unit/test_metrics.py`` checks the result against ``observe``)."""
        self._raise_if_not_observable()  # type: ignore[no-untyped-call]
        bounds = self._upper_bounds
        counts = [0] * len(bounds)
        total = 0.0
        for amount in amounts:
            counts[bisect.bisect_left(bounds, amount)] += 1  # the first bound >= amount
            total += amount
        self._sum.inc(total)
        for bucket, n in zip(self._buckets, counts, strict=True):
            if n:
                bucket.inc(n)


_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300)

# Bounded label vocabularies. Other work must use these values (or extend them here).
WINDOW_EVENTS = ("opened", "closed", "missed")
COMMAND_OUTCOMES = ("issued", "resent", "applied", "refused", "expired", "superseded")
DISCONNECT_CAUSES = ("last_will", "heartbeat_silence")
UNHEALTHY_REASONS = ("camera_fault", "camera_unplugged", "clock_unsynced")
AT_RISK_REASONS = ("offline", "camera", "clock")
VISIT_CAUSES = tuple(c.value for c in VisitCause)
# seen / not_seen / something_wrong: what staff recorded; device_failed: the check could not
# happen digitally; unrecorded: the window ended with no outcome (fleet/checks.py).
CHECK_OUTCOMES = ("seen", "not_seen", "something_wrong", "device_failed", "unrecorded")
OUTBOX_OUTCOMES = ("delivered", "retry", "dead")
PAIRING_OUTCOMES = ("started", "completed", "expired", "refused")
# renewed: the old certificate retired after a confirmed renewal (fleet/renewal.py);
# returned: equipment back in stock (fleet/lifecycle.py).
REVOCATION_REASONS = ("retired", "swapped", "returned", "renewed", "compromised", "other")
CERT_KINDS = ("device", "fleet", "ca")
UPCOMING = ("1h", "12h")
# A refusal whose token was too broken to carry a reason.
UNLABELLED_REFUSAL = "unlabelled"


@dataclass(frozen=True, slots=True)
class MetricInfo:
    """One exported metric family, for docs and for checking dashboards and alerts."""

    name: str  # family name as exported (counters: with ``_total``)
    kind: Kind
    help: str
    labels: tuple[str, ...]
    owner: Owner

    @property
    def series_names(self) -> tuple[str, ...]:
        """The sample names Prometheus stores for this family."""
        if self.kind == "histogram":
            return tuple(f"{self.name}_{s}" for s in ("bucket", "count", "sum"))
        return (self.name,)


class FleetMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.catalogue: list[MetricInfo] = []

        # --- devices (sweep) ---------------------------------------------------------
        self.devices = self._gauge(
            "tillsyn_devices",
            "Devices by connectivity (unknown = registered, never heard from)",
            ("connectivity",),
            "gauges",
            init=[{"connectivity": c} for c in ("unknown", "online", "offline")],
        )
        self.devices_state = self._gauge(
            "tillsyn_devices_lock_state",
            "Devices by reported lock state",
            ("state",),
            "gauges",
            init=[{"state": s.value} for s in LockState],
        )
        self.devices_unhealthy = self._gauge(
            "tillsyn_devices_unhealthy",
            "Devices whose camera is not ok or whose clock is unsynchronised",
            (),
            "gauges",
        )
        self.devices_unhealthy_reason = self._gauge(
            "tillsyn_devices_unhealthy_by_reason",
            "Unhealthy devices by reason (a device may count under two reasons)",
            ("reason",),
            "gauges",
            init=[{"reason": r} for r in UNHEALTHY_REASONS],
        )
        self.devices_firmware = self._gauge(
            "tillsyn_devices_firmware",
            "Devices by reported firmware version (20 most common; the rest as 'other')",
            ("version",),
            "gauges",
        )
        self.devices_at_risk = self._gauge(
            "tillsyn_devices_at_risk",
            "Devices with a window open or due within 12 h that cannot carry it out, by reason",
            ("reason",),
            "gauges",
            init=[{"reason": r} for r in AT_RISK_REASONS],
        )
        self.lock_mismatch = self._gauge(
            "tillsyn_lock_state_mismatch",
            "Devices whose reported lock state differs from the desired one, by desired state",
            ("desired",),
            "gauges",
            init=[{"desired": d} for d in ("armed", "locked")],
        )
        self.armed_past_end = self._gauge(
            "tillsyn_armed_past_window_end",
            "Devices reported armed or viewing after their window end plus grace (must be 0)",
            (),
            "gauges",
        )
        self.device_clock_skew_max = self._gauge(
            "tillsyn_device_clock_skew_max_seconds",
            "Largest absolute device clock skew among online devices, from heartbeats",
            (),
            "gauges",
        )
        # --- windows, visits, commands (sweep) -----------------------------------------
        self.windows_open = self._gauge(
            "tillsyn_windows_open", "Agreed windows open now", (), "gauges"
        )
        self.windows_upcoming = self._gauge(
            "tillsyn_windows_upcoming",
            "Agreed windows starting within the next hour / 12 hours",
            ("within",),
            "gauges",
            init=[{"within": w} for w in UPCOMING],
        )
        self.visits_open = self._gauge(
            "tillsyn_visits_open",
            "Physical visits not yet closed, by cause",
            ("cause",),
            "gauges",
            init=[{"cause": c} for c in VISIT_CAUSES],
        )
        self.commands_pending = self._gauge(
            "tillsyn_commands_pending", "Signed commands awaiting an acknowledgement", (), "gauges"
        )
        self.gauges_refreshed = self._gauge(
            "tillsyn_gauges_refresh_timestamp_seconds",
            "When the database gauges were last recomputed",
            (),
            "gauges",
        )
        self.gauges_duration = self._gauge(
            "tillsyn_gauges_refresh_duration_seconds",
            "How long the last database gauge refresh took",
            (),
            "gauges",
        )

        # --- liveness (memory) ---------------------------------------------------------
        self.heartbeat_age = self._histogram(
            "tillsyn_heartbeat_age_seconds",
            "Age of the last contact of online devices, sampled on every liveness run",
            (),
            "liveness",
            buckets=(5, 15, 30, 45, 60, 90, 120, 300),
        )
        self.heartbeat_age_max = self._gauge(
            "tillsyn_heartbeat_age_max_seconds",
            "Oldest last contact among devices the fleet holds online",
            (),
            "liveness",
        )
        self.ingest_lag = self._gauge(
            "tillsyn_ingest_lag_seconds",
            "How long broker data has waited unread by the fleet (0: caught up)",
            (),
            "liveness",
        )
        self.command_ack_timeout = self._gauge(
            "tillsyn_command_ack_timeout_seconds",
            "How long the ledger waits for an ack before resending a command (learnt from"
            " acks, at least resend_after_s)",
            (),
            "event",
        )
        self.scheduler_heartbeat = self._gauge(
            "tillsyn_scheduler_heartbeat_timestamp_seconds",
            "Last time the scheduler's liveness job ran (scheduler liveness)",
            (),
            "liveness",
        )

        # --- events --------------------------------------------------------------------
        self.messages = self._counter(
            "tillsyn_ingest_messages",
            "Device messages received, by channel (rate = ingest rate)",
            ("channel",),
            "event",
            init=[{"channel": c} for c in ("status", "state", "hb", "ack", "event")],
        )
        self.ingest_errors = self._counter(
            "tillsyn_ingest_rejected",
            "Device messages rejected (malformed, oversize, unknown device...), by channel, why",
            ("channel", "why"),
            "event",
        )
        self.clock_skew = self._histogram(
            "tillsyn_device_clock_skew_seconds",
            "Absolute difference of device clock and fleet clock, per heartbeat",
            (),
            "event",
            buckets=(0.1, 0.5, 1, 2, 5, 30, 300),
        )
        self.device_disconnects = self._counter(
            "tillsyn_device_disconnects",
            "Devices the fleet marked offline, by cause",
            ("why",),
            "event",
            init=[{"why": w} for w in DISCONNECT_CAUSES],
        )
        self.commands = self._counter(
            "tillsyn_commands",
            "Commands by kind and outcome (issued, resent, applied, refused, expired...)",
            ("kind", "outcome"),
            "event",
            init=[{"kind": k.value, "outcome": o} for k in CommandKind for o in COMMAND_OUTCOMES],
        )
        self.command_latency = self._histogram(
            "tillsyn_command_roundtrip_seconds",
            "Command issue to applied acknowledgement, by kind",
            ("kind",),
            "event",
            buckets=_LATENCY_BUCKETS,
        )
        self.refusals = self._counter(
            "tillsyn_token_refusals",
            "Command tokens refused by devices, by reason the device reported",
            ("reason",),
            "event",
            init=[{"reason": r.value} for r in RefusalReason] + [{"reason": UNLABELLED_REFUSAL}],
        )
        self.windows = self._counter(
            "tillsyn_windows",
            "Window events: opened (device confirmed armed), closed (device re-locked), "
            "missed (arming not confirmed in time)",
            ("event",),
            "event",
            init=[{"event": e} for e in WINDOW_EVENTS],
        )
        self.visits_raised = self._counter(
            "tillsyn_visits_raised",
            "Physical visits raised, by cause",
            ("cause",),
            "event",
            init=[{"cause": c} for c in VISIT_CAUSES],
        )
        self.jobs_run = self._counter(
            "tillsyn_scheduler_jobs_run",
            "Scheduler jobs that ran, by job type (edge, sweep, liveness, ...)",
            ("job_type",),
            "event",
        )
        self.jobs_missed = self._counter(
            "tillsyn_scheduler_jobs_missed",
            "Scheduler jobs that missed their time, by job type",
            ("job_type",),
            "event",
        )
        self.jobs_failed = self._counter(
            "tillsyn_scheduler_jobs_failed",
            "Scheduler jobs that raised, by job type",
            ("job_type",),
            "event",
        )
        self.scheduler_lag = self._histogram(
            "tillsyn_scheduler_lag_seconds",
            "How late scheduled jobs start",
            (),
            "event",
            buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 30),
        )
        self.scheduler_running = self._gauge(
            "tillsyn_scheduler_running",
            "1 while this replica's scheduler runs (holds the scheduler role)",
            (),
            "event",
        )
        self.scheduler_jobs = self._gauge(
            "tillsyn_scheduler_jobs_scheduled",
            "Jobs currently scheduled (window edges plus periodic jobs)",
            (),
            "gauges",
        )
        self.mqtt_connected = self._gauge(
            "tillsyn_mqtt_connected",
            "1 while the service is connected to the broker",
            (),
            "event",
        )
        self.mqtt_connects = self._counter(
            "tillsyn_mqtt_connects",
            "Successful (re)connections of the service to the broker",
            (),
            "event",
        )
        # Platform incidents: many devices lost at once, or the broker link (fleet/incident.py).
        self.platform_incident_active = self._gauge(
            "tillsyn_platform_incident_active",
            "1 while a platform incident (mass disconnect, broker link down) is open",
            (),
            "liveness",
        )
        self.platform_incidents = self._counter(
            "tillsyn_platform_incidents",
            "Platform incidents opened, by reason (mass_disconnect, broker_link)",
            ("reason",),
            "liveness",
            init=[{"reason": r} for r in ("mass_disconnect", "broker_link")],
        )
        self.build_info = self._gauge(
            "tillsyn_build_info",
            "Always 1; the version of the fleet service",
            ("version",),
            "event",
        )
        self.build_info.labels(version=_version()).set(1)

        # --- care plans, checks (issue: care plans) ---------------------------------------
        self.checks = self._counter(
            "tillsyn_checks",
            "Supervision checks by outcome (staff outcomes, device_failed, unrecorded)",
            ("outcome",),
            "plans",
            init=[{"outcome": o} for o in CHECK_OUTCOMES],
        )
        self.rechecks = self._counter(
            "tillsyn_rechecks",
            "Rechecks scheduled because the resident was not seen at the first look",
            (),
            "plans",
        )
        # --- outbox (issue: care plans, visit notifications) -------------------------------
        self.outbox_pending = self._gauge(
            "tillsyn_outbox_pending", "Outbox messages not yet delivered", (), "outbox"
        )
        self.outbox_oldest_age = self._gauge(
            "tillsyn_outbox_oldest_age_seconds",
            "Age of the oldest undelivered outbox message (0 when empty)",
            (),
            "outbox",
        )
        self.outbox_deliveries = self._counter(
            "tillsyn_outbox_deliveries",
            "Outbox delivery attempts by outcome (delivered, retry, dead)",
            ("outcome",),
            "outbox",
            init=[{"outcome": o} for o in OUTBOX_OUTCOMES],
        )
        # --- certificates and pairing --------------------------------------------------
        self.cert_soonest_expiry = self._gauge(
            "tillsyn_certificate_soonest_expiry_timestamp_seconds",
            "Soonest notAfter among valid certificates, by kind (device, fleet, ca)",
            ("kind",),
            "certs",
        )
        self.certs_expiring = self._gauge(
            "tillsyn_certificates_expiring_within_30d",
            "Valid certificates that expire within 30 days, by kind",
            ("kind",),
            "certs",
        )
        self.certs_valid = self._gauge(
            "tillsyn_certificates",
            "Certificates known and not revoked, by kind",
            ("kind",),
            "certs",
        )
        self.certs_revoked = self._gauge(
            "tillsyn_certificates_revoked", "Certificates on the revocation list", (), "certs"
        )
        self.crl_next_update = self._gauge(
            "tillsyn_crl_next_update_timestamp_seconds",
            "When the CRL the broker uses must be re-signed by (nextUpdate)",
            (),
            "certs",
        )
        self.pairings = self._counter(
            "tillsyn_pairings",
            "Pairing attempts by outcome (started, completed, expired, refused)",
            ("outcome",),
            "pairing",
            init=[{"outcome": o} for o in PAIRING_OUTCOMES],
        )
        self.revocations = self._counter(
            "tillsyn_revocations",
            "Certificates revoked by the fleet, by reason",
            ("reason",),
            "pairing",
            init=[{"reason": r} for r in REVOCATION_REASONS],
        )

    # --- construction helpers ----------------------------------------------------------

    def _add(
        self,
        metric: M,
        name: str,
        kind: Kind,
        help_: str,
        labels: Sequence[str],
        owner: Owner,
        init: Iterable[Mapping[str, str]],
    ) -> M:
        self.catalogue.append(MetricInfo(name, kind, help_, tuple(labels), owner))
        for values in init:
            metric.labels(**values)
        return metric

    def _gauge(
        self,
        name: str,
        help_: str,
        labels: Sequence[str],
        owner: Owner,
        *,
        init: Iterable[Mapping[str, str]] = (),
    ) -> Gauge:
        metric = Gauge(name, help_, labels, registry=self.registry)
        return self._add(metric, name, "gauge", help_, labels, owner, init)

    def _counter(
        self,
        name: str,
        help_: str,
        labels: Sequence[str],
        owner: Owner,
        *,
        init: Iterable[Mapping[str, str]] = (),
    ) -> Counter:
        metric = _Counter(name, help_, labels, registry=self.registry)
        return self._add(metric, f"{name}_total", "counter", help_, labels, owner, init)

    def _histogram(
        self,
        name: str,
        help_: str,
        labels: Sequence[str],
        owner: Owner,
        *,
        buckets: Sequence[float],
    ) -> _Histogram:
        metric = _Histogram(name, help_, labels, buckets=buckets, registry=self.registry)
        return self._add(metric, name, "histogram", help_, labels, owner, ())

    # --- helpers for feeders -----------------------------------------------------------

    def init_jobs(self, job_types: Iterable[str]) -> None:
        """Zero the per-job counters of the job types known at start-up."""
        for job in job_types:
            for counter in (self.jobs_run, self.jobs_missed, self.jobs_failed):
                counter.labels(job_type=job)


def set_labelled(gauge: Gauge, label: str, values: Mapping[str, float], known: set[str]) -> None:
    """Set a gauge per label value and drop values no longer present (``known`` tracks them)."""
    for value, n in values.items():
        gauge.labels(**{label: value}).set(n)
    for gone in known - values.keys():
        gauge.remove(gone)
    known.clear()
    known.update(values)


def job_type(job_id: str) -> str:
    """``edge:dev-123`` -> ``edge``: job ids carry device ids, labels must not.

    (The label is ``job_type``, not ``job``: Prometheus reserves ``job`` for the target.)
    """
    return job_id.split(":", 1)[0][:32]


def _version() -> str:
    try:
        return metadata.version("tillsyn-fleet")
    except metadata.PackageNotFoundError:
        return "unknown"
