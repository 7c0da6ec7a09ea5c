"""Fleet metrics: bounded labels, zero-initialised vocabularies, gauges computed from the
database on the sweep, certificate expiry from the PKI files, and the event counters."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from prometheus_client import CollectorRegistry
from sqlalchemy import update
from sqlmodel import col

from broker.pki import init_pki, issue_device_cert, revoke
from fleet import signing
from fleet.core import FleetOps
from fleet.db import init_db, make_engine
from fleet.gauges import CertificateWatch
from fleet.metrics import FleetMetrics, job_type, set_labelled
from fleet.models import Connectivity, Device, VisitCause, Window
from fleet.reconcile import Policy
from tillsyn_protocol import (
    Ack,
    AckResult,
    CameraHealth,
    CommandKind,
    LockState,
    RefusalReason,
    StateReport,
    Status,
)

# 2026-11-23 22:00 Stockholm (CET, UTC+1) = 21:00 UTC
T22 = datetime(2026, 11, 23, 21, 0, tzinfo=UTC).timestamp()

# Every label the service may use. Adding one is a decision: it must have few values.
BOUNDED_LABELS = {
    "connectivity",
    "state",
    "reason",
    "version",
    "desired",
    "within",
    "cause",
    "channel",
    "why",
    "kind",
    "outcome",
    "event",
    "job_type",
}


def value(m: FleetMetrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, labels or None)


@pytest.fixture
def ops(tmp_path: Path, database_url: str) -> Iterator[FleetOps]:
    engine = make_engine(database_url)
    init_db(engine)
    key = signing.load_or_create(tmp_path / "key.pem")
    yield FleetOps(engine, key, FleetMetrics(), Policy(arm_confirm_s=60, visit_horizon_s=3600))
    engine.dispose()


def device(ops: FleetOps, device_id: str, window: str | None = None, length: int = 600) -> None:
    ops.register_device(Device(id=device_id, resident_id="res-1"), T22 - 7200, "test")
    if window:
        ops.add_window(
            Window(device_id=device_id, start_local=window, duration_s=length), T22 - 7200, "test"
        )


def set_fields(ops: FleetOps, device_id: str, **values: object) -> None:
    ops.run(lambda s: s.execute(update(Device).where(col(Device.id) == device_id).values(**values)))


# --- the registry -----------------------------------------------------------------------


def test_metrics_live_on_the_injected_registry() -> None:
    registry = CollectorRegistry()
    m = FleetMetrics(registry)
    assert m.registry is registry
    FleetMetrics()  # another instance on its own registry: no duplicate-name error
    assert registry.get_sample_value("tillsyn_build_info", {"version": "0.1.0"}) in (1.0, None)


def test_labels_are_bounded_and_never_identify_anyone() -> None:
    for info in FleetMetrics().catalogue:
        assert set(info.labels) <= BOUNDED_LABELS, info.name
        assert info.name.startswith("tillsyn_"), info.name


def test_known_label_values_start_at_zero() -> None:
    m = FleetMetrics()
    for reason in RefusalReason:
        assert value(m, "tillsyn_token_refusals_total", reason=reason.value) == 0
    for event in ("opened", "closed", "missed"):
        assert value(m, "tillsyn_windows_total", event=event) == 0
    for cause in VisitCause:
        assert value(m, "tillsyn_visits_raised_total", cause=cause.value) == 0
    assert value(m, "tillsyn_commands_total", kind="arm", outcome="expired") == 0


def test_job_ids_become_job_types_without_device_ids() -> None:
    assert job_type("edge:dev-abc123") == "edge"
    assert job_type("sweep") == "sweep"


def test_observe_many_is_observe_of_each() -> None:
    """The liveness run's bulk observe gives exactly what observing one by one gives
    (bucket edges included: a value equal to a bound falls in that bucket)."""
    ages = [0.0, 4.9, 5.0, 5.1, 15.0, 29.99, 30.0, 45.5, 89.0, 120.0, 299.0, 301.0, 1e6]
    one, many = FleetMetrics(CollectorRegistry()), FleetMetrics(CollectorRegistry())
    for age in ages:
        one.heartbeat_age.observe(age)
    many.heartbeat_age.observe_many(ages)
    many.heartbeat_age.observe_many([])
    name = "tillsyn_heartbeat_age_seconds"
    got = {s.name + str(s.labels): s.value for s in _samples(many.registry, name)}
    want = {s.name + str(s.labels): s.value for s in _samples(one.registry, name)}
    assert got == want
    assert got[name + "_count{}"] == len(ages)
    assert got[name + "_bucket{'le': '5.0'}"] == 3


def _samples(registry: CollectorRegistry, name: str) -> list[Any]:
    return [
        s
        for metric in registry.collect()
        if metric.name == name
        for s in metric.samples
        if not s.name.endswith("_created")
    ]


def test_set_labelled_drops_values_that_disappeared() -> None:
    m = FleetMetrics()
    known: set[str] = set()
    set_labelled(m.devices_firmware, "version", {"1.0": 2, "1.1": 1}, known)
    set_labelled(m.devices_firmware, "version", {"1.1": 3}, known)
    assert value(m, "tillsyn_devices_firmware", version="1.0") is None
    assert value(m, "tillsyn_devices_firmware", version="1.1") == 3


# --- gauges from the database -----------------------------------------------------------


def test_gauges_tell_tonight_at_a_glance(ops: FleetOps) -> None:
    device(ops, "dev-on", "22:00:00")  # window open, armed for it: fine
    device(ops, "dev-want", "21:55:00")  # window open, still locked: should be armed
    device(ops, "dev-off", "22:30:00")  # offline, window in 30 min: at risk
    device(ops, "dev-cam", "06:00:00")  # camera fault, window in 8 h: at risk
    device(ops, "dev-clock")  # clock unsynced, no window: unhealthy, not at risk
    device(ops, "dev-late")  # armed with its window long over: must never happen
    device(ops, "dev-new")  # registered, never heard from
    online = Connectivity.ONLINE
    set_fields(
        ops,
        "dev-on",
        connectivity=online,
        reported_state=LockState.ARMED,
        armed_until=T22 + 600,
        firmware="1.2.0",
        clock_synced=True,
        clock_skew_s=-0.4,
    )
    set_fields(ops, "dev-want", connectivity=online, firmware="1.2.0", clock_skew_s=2.5)
    set_fields(
        ops, "dev-off", connectivity=Connectivity.OFFLINE, firmware="1.1.0", clock_skew_s=99.0
    )  # offline: its skew does not count
    set_fields(ops, "dev-cam", connectivity=online, camera=CameraHealth.FAULT, firmware="1.2.0")
    set_fields(ops, "dev-clock", connectivity=online, clock_synced=False)
    set_fields(
        ops, "dev-late", connectivity=online, reported_state=LockState.ARMED, armed_until=T22 - 600
    )
    ops.reconcile(None, T22)  # arms dev-want, disarms dev-late, raises dev-off's visit

    ops.refresh_gauges(T22)
    m = ops.metrics
    assert value(m, "tillsyn_devices", connectivity="online") == 5
    assert value(m, "tillsyn_devices", connectivity="offline") == 1
    assert value(m, "tillsyn_devices", connectivity="unknown") == 1
    assert value(m, "tillsyn_devices_lock_state", state="ARMED") == 2
    assert value(m, "tillsyn_devices_lock_state", state="LOCKED") == 5
    assert value(m, "tillsyn_devices_unhealthy") == 2
    assert value(m, "tillsyn_devices_unhealthy_by_reason", reason="camera_fault") == 1
    assert value(m, "tillsyn_devices_unhealthy_by_reason", reason="clock_unsynced") == 1
    assert value(m, "tillsyn_devices_at_risk", reason="offline") == 1
    assert value(m, "tillsyn_devices_at_risk", reason="camera") == 1
    assert value(m, "tillsyn_devices_at_risk", reason="clock") == 0
    assert value(m, "tillsyn_lock_state_mismatch", desired="armed") == 1
    assert value(m, "tillsyn_lock_state_mismatch", desired="locked") == 1
    assert value(m, "tillsyn_armed_past_window_end") == 1
    assert value(m, "tillsyn_windows_open") == 2
    assert value(m, "tillsyn_windows_upcoming", within="1h") == 1
    assert value(m, "tillsyn_windows_upcoming", within="12h") == 2
    assert value(m, "tillsyn_devices_firmware", version="1.2.0") == 3
    assert value(m, "tillsyn_devices_firmware", version="1.1.0") == 1
    assert value(m, "tillsyn_devices_firmware", version="unknown") == 3
    assert value(m, "tillsyn_device_clock_skew_max_seconds") == 2.5
    assert value(m, "tillsyn_visits_open", cause="device_offline") == 1
    assert value(m, "tillsyn_visits_open", cause="camera_fault") == 0
    assert value(m, "tillsyn_commands_pending") == 2  # the arm and the disarm
    assert value(m, "tillsyn_gauges_refresh_timestamp_seconds") == T22

    # dev-late re-locks, dev-off's firmware is replaced: the gauges follow.
    set_fields(ops, "dev-late", reported_state=LockState.LOCKED, armed_until=None)
    set_fields(ops, "dev-off", firmware="1.2.0")
    ops.refresh_gauges(T22 + 1)
    assert value(m, "tillsyn_armed_past_window_end") == 0
    assert value(m, "tillsyn_lock_state_mismatch", desired="locked") == 0
    assert value(m, "tillsyn_devices_firmware", version="1.1.0") is None


def test_firmware_versions_are_capped(ops: FleetOps) -> None:
    for i in range(25):
        device(ops, f"dev-fw{i:02d}")
        set_fields(ops, f"dev-fw{i:02d}", firmware=f"9.{i}")
    ops.refresh_gauges(T22)
    samples = [
        s
        for f in ops.metrics.registry.collect()
        if f.name == "tillsyn_devices_firmware"
        for s in f.samples
    ]
    assert len(samples) == 21
    assert value(ops.metrics, "tillsyn_devices_firmware", version="other") == 5


# --- event counters ---------------------------------------------------------------------


def test_window_opened_closed_and_missed_are_counted(ops: FleetOps) -> None:
    device(ops, "dev-a1", "22:00:00")
    device(ops, "dev-b2", "22:00:00")
    ops.reconcile(None, T22)
    arm = ops.pending_commands("dev-a1")[0]
    ops.on_ack(
        "dev-a1",
        Ack(
            ts=T22,
            jti=arm.jti,
            seq=arm.seq,
            cmd=CommandKind.ARM,
            result=AckResult.APPLIED,
            state=LockState.ARMED,
        ),
        T22 + 1,
    )
    ops.on_state(
        "dev-a1",
        StateReport(
            ts=T22 + 1,
            state=LockState.ARMED,
            since=T22 + 1,
            armed_until=T22 + 600,
            last_seq=arm.seq,
        ),
        T22 + 1,
    )
    ops.reconcile(None, T22 + 61)  # dev-b2 never confirmed: missed
    ops.on_state(
        "dev-a1",
        StateReport(ts=T22 + 600, state=LockState.LOCKED, since=T22 + 600, last_seq=arm.seq),
        T22 + 600,
    )
    m = ops.metrics
    assert value(m, "tillsyn_windows_total", event="opened") == 1
    assert value(m, "tillsyn_windows_total", event="missed") == 1
    assert value(m, "tillsyn_windows_total", event="closed") == 1
    assert value(m, "tillsyn_command_roundtrip_seconds_count", kind="arm") == 1


def test_refusals_without_a_reason_and_disconnects_are_counted(ops: FleetOps) -> None:
    device(ops, "dev-a1")
    device(ops, "dev-b2")
    ops.on_ack("dev-a1", Ack(ts=T22, result=AckResult.REFUSED, state=LockState.LOCKED), T22)
    ops.on_status("dev-a1", Status(ts=T22, status="online", boot_id="b1"), T22)
    ops.on_status("dev-a1", Status(ts=T22, status="offline", boot_id="b1"), T22 + 1)
    ops.on_status("dev-b2", Status(ts=T22, status="online", boot_id="b2"), T22)
    ops.mark_silent([("dev-b2", T22)], T22 + 100)
    m = ops.metrics
    assert value(m, "tillsyn_token_refusals_total", reason="unlabelled") == 1
    assert value(m, "tillsyn_device_disconnects_total", why="last_will") == 1
    assert value(m, "tillsyn_device_disconnects_total", why="heartbeat_silence") == 1


# --- certificates -----------------------------------------------------------------------


def not_after(path: Path) -> float:
    return x509.load_pem_x509_certificate(path.read_bytes()).not_valid_after_utc.timestamp()


def test_certificate_expiry_from_the_pki_directory(tmp_path: Path) -> None:
    pki = init_pki(tmp_path / "pki")
    long_lived, _ = issue_device_cert(pki.directory, "dev-long")
    short, _ = issue_device_cert(pki.directory, "dev-short", days=10)
    gone, _ = issue_device_cert(pki.directory, "dev-gone", days=5)
    revoke(pki.directory, gone)
    m = FleetMetrics()
    watch = CertificateWatch(m, ca_file=pki.ca_cert, cert_file=pki.fleet_cert)
    now = datetime.now(UTC).timestamp()
    watch.refresh(now)

    assert value(m, "tillsyn_certificates", kind="device") == 2  # the revoked one is not
    assert value(m, "tillsyn_certificates_expiring_within_30d", kind="device") == 1
    soonest = value(m, "tillsyn_certificate_soonest_expiry_timestamp_seconds", kind="device")
    assert soonest == not_after(short) < not_after(long_lived)
    assert value(m, "tillsyn_certificate_soonest_expiry_timestamp_seconds", kind="fleet") == (
        not_after(pki.fleet_cert)
    )
    assert value(m, "tillsyn_certificates", kind="ca") == 1
    assert value(m, "tillsyn_certificates_revoked") == 1
    assert (value(m, "tillsyn_crl_next_update_timestamp_seconds") or 0) > now

    # Throttled: a new certificate shows on the next refresh after the interval.
    issue_device_cert(pki.directory, "dev-third")
    watch.refresh(now + 1)
    assert value(m, "tillsyn_certificates", kind="device") == 2
    watch.refresh(now + 1, force=True)
    assert value(m, "tillsyn_certificates", kind="device") == 3


def test_no_device_certificates_means_no_data_not_zero(tmp_path: Path) -> None:
    pki = init_pki(tmp_path / "pki")
    m = FleetMetrics()
    CertificateWatch(m, ca_file=pki.ca_cert, cert_file=pki.fleet_cert, pki_dir=tmp_path).refresh(
        datetime.now(UTC).timestamp()
    )
    assert value(m, "tillsyn_certificate_soonest_expiry_timestamp_seconds", kind="device") is None
    assert value(m, "tillsyn_certificate_soonest_expiry_timestamp_seconds", kind="ca") is not None
    assert value(m, "tillsyn_crl_next_update_timestamp_seconds") == 0  # no CRL there


def test_device_certificates_from_the_inventory_win_over_files(
    ops: FleetOps, tmp_path: Path
) -> None:
    from fleet.gauges import inventory_certificates
    from fleet.inventory import CertStatus, DeviceCertificate

    now = datetime.now(UTC).timestamp()
    assert ops.run(lambda s: inventory_certificates(s, now)) is None  # none recorded yet

    def cert(serial: str, status: CertStatus, days: float) -> DeviceCertificate:
        return DeviceCertificate(
            serial=serial,
            device_id="dev-a1",
            status=status,
            not_before=now - 86400,
            not_after=now + days * 86400,
            renew_after=now,
            issued_at=now - 86400,
            public_key_sha256="0" * 64,
            pem="-",
        )

    ops.run(
        lambda s: s.add_all(
            [
                cert("0a", CertStatus.ACTIVE, 200),
                cert("0b", CertStatus.PENDING, 20),
                cert("0c", CertStatus.REVOKED, 1),  # revoked: not counted
                cert("0d", CertStatus.ACTIVE, -1),  # expired: not valid
            ]
        )
    )
    summary = ops.run(lambda s: inventory_certificates(s, now))
    assert summary is not None
    assert (summary.valid, summary.expiring) == (2, 1)
    assert summary.soonest == pytest.approx(now + 20 * 86400)

    pki = init_pki(tmp_path / "pki")
    issue_device_cert(pki.directory, "dev-file")
    m = FleetMetrics()
    CertificateWatch(m, ca_file=pki.ca_cert, cert_file=pki.fleet_cert).refresh(
        now, inventory=summary
    )
    assert value(m, "tillsyn_certificates", kind="device") == 2
    assert value(m, "tillsyn_certificates_expiring_within_30d", kind="device") == 1


def test_outbox_backlog_gauges(ops: FleetOps) -> None:
    from fleet import outbox

    def fill(s):
        outbox.enqueue(s, kind="visit.raised", payload={"n": 1}, now=T22 - 300)
        outbox.enqueue(s, kind="visit.raised", payload={"n": 2}, now=T22 - 60)

    ops.run(fill)
    ops.refresh_gauges(T22)
    assert value(ops.metrics, "tillsyn_outbox_pending") == 2
    assert value(ops.metrics, "tillsyn_outbox_oldest_age_seconds") == 300


def test_care_plan_checks_count_as_windows_for_the_gauges(ops: FleetOps) -> None:
    """A check of a care plan arms the device like a window: the gauges see it too."""
    from datetime import date

    from fleet.plan_models import CarePlan, Check, CheckState

    device(ops, "dev-plan")
    set_fields(ops, "dev-plan", connectivity=Connectivity.ONLINE)

    def plan(s):
        p = CarePlan(
            resident_id="res-1",
            device_id="dev-plan",
            check_times="22:00",
            window_s=600,
            valid_from=date(2026, 11, 1),
            created_at=T22,
            updated_at=T22,
        )
        s.add(p)
        s.flush()
        for key, start, state in (
            ("a", T22 - 60, CheckState.OPEN),  # open now, device still locked
            ("b", T22 + 1800, CheckState.UPCOMING),  # in 30 minutes
            ("c", T22 + 3600 * 2, CheckState.SEEN),  # settled: arms nothing
        ):
            s.add(
                Check(
                    key=key,
                    plan_id=p.id,
                    device_id="dev-plan",
                    resident_id="res-1",
                    night=date(2026, 11, 23),
                    agreed="22:00",
                    start_at=start,
                    end_at=start + 600,
                    state=state,
                )
            )

    ops.run(plan)
    ops.refresh_gauges(T22)
    m = ops.metrics
    assert value(m, "tillsyn_windows_open") == 1
    assert value(m, "tillsyn_windows_upcoming", within="1h") == 1
    assert value(m, "tillsyn_lock_state_mismatch", desired="armed") == 1


def test_counter_and_histogram_children_are_looked_up_once() -> None:
    """labels() of counters and histograms is remembered per call shape (the storm paths
    call it per message); the children are prometheus_client's own, errors still raise."""
    m = FleetMetrics(CollectorRegistry())
    a = m.commands.labels(kind="arm", outcome="issued")
    assert m.commands.labels(kind="arm", outcome="issued") is a
    assert m.commands.labels("arm", "issued") is a  # positional: the same child
    a.inc()
    m.commands.labels(kind="arm", outcome="issued").inc(2)
    assert value(m, "tillsyn_commands_total", kind="arm", outcome="issued") == 3
    h = m.command_latency.labels(kind="arm")
    assert m.command_latency.labels(kind="arm") is h
    h.observe(1.5)
    assert (
        m.registry.get_sample_value("tillsyn_command_roundtrip_seconds_count", {"kind": "arm"}) == 1
    )
    with pytest.raises(ValueError, match="Incorrect label names"):
        m.commands.labels(kind="arm")
    with pytest.raises(ValueError, match="Incorrect label names"):
        m.commands.labels(kind="arm")  # not remembered as anything
