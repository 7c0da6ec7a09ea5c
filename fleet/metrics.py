"""Prometheus metrics on an injectable registry. No per-device labels: detail is in the API."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300)


class FleetMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.devices = Gauge(
            "tillsyn_devices", "Devices by connectivity", ["connectivity"], registry=r
        )
        self.devices_state = Gauge(
            "tillsyn_devices_lock_state", "Devices by reported lock state", ["state"], registry=r
        )
        self.lock_mismatch = Gauge(
            "tillsyn_lock_state_mismatch",
            "Devices whose reported lock state differs from the desired one",
            registry=r,
        )
        self.armed_past_end = Gauge(
            "tillsyn_armed_past_window_end",
            "Devices reported armed after their window end plus grace (must be 0)",
            registry=r,
        )
        self.heartbeat_age = Histogram(
            "tillsyn_heartbeat_age_seconds",
            "Age of the last contact of online devices",
            buckets=(5, 15, 30, 45, 60, 90, 120, 300),
            registry=r,
        )
        self.messages = Counter(
            "tillsyn_ingest_messages", "Device messages received", ["channel"], registry=r
        )
        self.ingest_errors = Counter(
            "tillsyn_ingest_rejected",
            "Device messages rejected (malformed, oversize, unknown device...)",
            ["channel", "why"],
            registry=r,
        )
        self.commands = Counter(
            "tillsyn_commands", "Commands by kind and outcome", ["kind", "outcome"], registry=r
        )
        self.command_latency = Histogram(
            "tillsyn_command_roundtrip_seconds",
            "Command issue to applied ack",
            ["kind"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.refusals = Counter(
            "tillsyn_token_refusals",
            "Command refusals reported by devices",
            ["reason"],
            registry=r,
        )
        self.visits_raised = Counter(
            "tillsyn_visits_raised", "Physical visits raised", ["cause"], registry=r
        )
        self.visits_open = Gauge("tillsyn_visits_open", "Visits not yet closed", registry=r)
        self.windows = Counter("tillsyn_windows", "Window edges handled", ["edge"], registry=r)
        self.jobs_missed = Counter(
            "tillsyn_scheduler_jobs_missed", "Scheduler jobs that missed their time", registry=r
        )
        self.jobs_failed = Counter(
            "tillsyn_scheduler_jobs_failed", "Scheduler jobs that raised", registry=r
        )
        self.scheduler_heartbeat = Gauge(
            "tillsyn_scheduler_heartbeat_timestamp_seconds",
            "Last time the scheduler's own heartbeat job ran",
            registry=r,
        )
        self.scheduler_lag = Histogram(
            "tillsyn_scheduler_lag_seconds",
            "How late scheduled jobs start",
            buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 30),
            registry=r,
        )
        self.mqtt_connected = Gauge(
            "tillsyn_mqtt_connected", "1 while the service is connected to the broker", registry=r
        )
        self.clock_skew = Histogram(
            "tillsyn_device_clock_skew_seconds",
            "Device clock minus fleet clock (absolute)",
            buckets=(0.1, 0.5, 1, 2, 5, 30, 300),
            registry=r,
        )
