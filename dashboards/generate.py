"""Build the Grafana dashboards (``dashboards/*.json``) and the panel and metric tables in
``docs/operations.md`` from one description, so the three never drift apart.

    .venv/bin/python dashboards/generate.py          # rewrite the JSON and the doc tables
    .venv/bin/python dashboards/generate.py --check  # exit 1 if anything is out of date

Plain data and the standard library: no dashboard SDK. grafana-foundation-sdk is not
published on PyPI and grafanalib has not been released since 2024; the JSON model of
Grafana 11 (``schemaVersion`` 39) is small enough to write directly. The test suite
checks the files are current, that every metric a panel queries is one the service
exports, and (with a real Prometheus) that every query parses and returns data.

Conventions for queries: gauges computed from the database are exported identically by
every fleet replica, so panels take ``max()`` of them; event counters are per replica,
so panels ``sum()`` them. ``$__rate_interval`` is Grafana's; nothing else is templated.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
DOCS = ROOT.parent / "docs" / "operations.md"
DATASOURCE = {"type": "prometheus", "uid": "tillsyn-prometheus"}
SCHEMA_VERSION = 39
GREEN, AMBER, RED = "green", "orange", "red"

# The PromQL of the forged-token refusal reasons, shared with monitoring/alerts.yml.
FORGED = 'reason=~"unknown_key|bad_signature|bad_algorithm|wrong_issuer|wrong_audience"'


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str = ""


@dataclass(frozen=True)
class Panel:
    title: str
    kind: str  # stat | timeseries | bargauge
    queries: tuple[Query, ...]
    tells: str  # what it tells IT support: the panel description and the docs table
    unit: str = "short"
    width: int = 6
    height: int = 5
    # (value, colour) steps after the base colour; () = a neutral panel
    steps: tuple[tuple[float, str], ...] = ()
    base: str = GREEN
    mappings: tuple[tuple[str, str, str], ...] = ()  # (value, text, colour)
    decimals: int | None = None


@dataclass(frozen=True)
class Dashboard:
    uid: str
    title: str
    file: str
    intro: str
    panels: tuple[Panel, ...] = field(default_factory=tuple)


def q(expr: str, legend: str = "") -> Query:
    return Query(" ".join(expr.split()), legend)


def stat(title: str, expr: str, tells: str, **kw: Any) -> Panel:
    legend = kw.pop("legend", "")
    return Panel(title, "stat", (q(expr, legend),), tells, **kw)


def series(title: str, queries: list[Query], tells: str, **kw: Any) -> Panel:
    kw.setdefault("width", 12)
    kw.setdefault("height", 8)
    return Panel(title, "timeseries", tuple(queries), tells, **kw)


def bars(title: str, queries: list[Query], tells: str, **kw: Any) -> Panel:
    kw.setdefault("width", 12)
    kw.setdefault("height", 8)
    return Panel(title, "bargauge", tuple(queries), tells, **kw)


ALARM = ((1.0, RED),)  # anything above zero is red
WARN = ((1.0, AMBER),)
CONNECTED = (("1", "connected", GREEN), ("0", "DISCONNECTED", RED))

# --- the dashboards ---------------------------------------------------------------------

OVERVIEW = Dashboard(
    uid="tillsyn-overview",
    title="Tillsyn: fleet overview (tonight at a glance)",
    file="fleet-overview.json",
    intro="Open this first. Every red number is something to act on before the night.",
    panels=(
        stat(
            "Firing alerts",
            'count(ALERTS{alertstate="firing"}) or vector(0)',
            "Alerts firing now; each has a section in this runbook.",
            steps=ALARM,
        ),
        stat(
            "Camera armed past window end",
            "max(tillsyn_armed_past_window_end)",
            "Must be 0. Anything else is a privacy incident: see TillsynCameraArmedPastWindowEnd.",
            steps=ALARM,
        ),
        stat(
            "Devices at risk tonight",
            "max by (reason) (tillsyn_devices_at_risk)",
            "Devices with a window open or due within 12 h that are offline, have a camera "
            "fault or an unsynchronised clock. Fix them before the visit horizon (2 h).",
            legend="{{reason}}",
            steps=WARN,
            width=6,
        ),
        stat(
            "Open visits",
            "sum(max by (cause) (tillsyn_visits_open))",
            "Physical visits raised and not yet closed by staff.",
            steps=WARN,
        ),
        stat(
            "Devices online",
            'max(tillsyn_devices{connectivity="online"})',
            "Devices the fleet hears from (heartbeat within the offline threshold).",
            steps=(),
            base="blue",
            width=4,
        ),
        stat(
            "Devices offline",
            'max(tillsyn_devices{connectivity="offline"})',
            "Devices gone silent or whose Last Will arrived. Offline with no window due is "
            "not urgent; the 'at risk' panel says which matter tonight.",
            steps=WARN,
            width=4,
        ),
        stat(
            "Windows open now",
            "max(tillsyn_windows_open)",
            "Agreed windows open at this moment (devices that should be armed).",
            base="blue",
            width=4,
        ),
        stat(
            "Windows due (12 h)",
            'max(tillsyn_windows_upcoming{within="12h"})',
            "Windows starting within the next 12 hours: tonight's workload.",
            base="blue",
            width=4,
        ),
        stat(
            "Scheduler heartbeat age",
            "time() - max(tillsyn_scheduler_heartbeat_timestamp_seconds)",
            "Seconds since the scheduler last ran its liveness job. Over 60 s: "
            "TillsynSchedulerNotAlive.",
            unit="s",
            steps=((30.0, AMBER), (60.0, RED)),
            width=4,
            decimals=0,
        ),
        stat(
            "Broker connection",
            "min(tillsyn_mqtt_connected)",
            "Whether the fleet service is connected to the MQTT broker (all replicas).",
            mappings=CONNECTED,
            base=RED,
            steps=((1.0, GREEN),),
            width=4,
        ),
        series(
            "Devices by connectivity",
            [q("max by (connectivity) (tillsyn_devices)", "{{connectivity}}")],
            "A sudden step from online to offline across many devices is a broker or "
            "network outage (TillsynMassDisconnect), not device faults.",
        ),
        series(
            "Devices by lock state",
            [q("max by (state) (tillsyn_devices_lock_state)", "{{state}}")],
            "Reported lock states. ARMED should follow the agreed windows; VIEWING is a look "
            "in progress (at most the look cap).",
        ),
        series(
            "Window events per hour",
            [q("sum by (event) (increase(tillsyn_windows_total[1h]))", "{{event}}")],
            "opened = device confirmed armed; closed = device re-locked; missed = arming not "
            "confirmed in time (a visit was raised).",
        ),
        series(
            "Visits raised per hour by cause",
            [q("sum by (cause) (increase(tillsyn_visits_raised_total[1h]))", "{{cause}}")],
            "Why digital checks were replaced by physical visits.",
        ),
        series(
            "Platform incident",
            [
                q("max(tillsyn_platform_incident_active)", "open"),
                q(
                    "sum by (reason) (increase(tillsyn_platform_incidents_total[1h]))",
                    "opened per hour ({{reason}})",
                ),
            ],
            "1 while the fleet holds a platform incident open: many devices lost at once, or "
            "its own broker link down (TillsynPlatformIncident). One outage, one incident; "
            "each resident's visit is still raised.",
            width=24,
        ),
    ),
)

SCHEDULING = Dashboard(
    uid="tillsyn-scheduling",
    title="Tillsyn: scheduling and checks",
    file="scheduling-checks.json",
    intro="Is the unattended scheduler doing its job, and what happened to each check?",
    panels=(
        stat(
            "Scheduler heartbeat age",
            "time() - max(tillsyn_scheduler_heartbeat_timestamp_seconds)",
            "Seconds since the liveness job last ran on any replica.",
            unit="s",
            steps=((30.0, AMBER), (60.0, RED)),
            decimals=0,
            width=4,
        ),
        stat(
            "Schedulers running",
            "sum(tillsyn_scheduler_running)",
            "Replicas whose scheduler runs. Exactly 1 is right; 0 means nothing arms windows.",
            base=RED,
            steps=((1.0, GREEN), (2.0, AMBER)),
            width=4,
        ),
        stat(
            "Jobs scheduled",
            "max(tillsyn_scheduler_jobs_scheduled)",
            "Window-edge jobs plus the periodic jobs. Roughly the number of devices with "
            "windows plus 3.",
            base="blue",
            width=4,
        ),
        stat(
            "Missed jobs (24 h)",
            "sum(increase(tillsyn_scheduler_jobs_missed_total[24h]))",
            "Jobs that started too late to run. The sweep repairs the state; a steady "
            "number means the service is overloaded.",
            steps=WARN,
            decimals=0,
            width=4,
        ),
        stat(
            "Failed jobs (24 h)",
            "sum(increase(tillsyn_scheduler_jobs_failed_total[24h]))",
            "Jobs that raised. See the service log for the job id.",
            steps=WARN,
            decimals=0,
            width=4,
        ),
        stat(
            "Commands awaiting ack",
            "max(tillsyn_commands_pending)",
            "Signed commands sent and not yet acknowledged (re-sent until their deadline).",
            base="blue",
            width=4,
        ),
        series(
            "Scheduler lag",
            [
                q(
                    "histogram_quantile(0.5, sum by (le) "
                    "(rate(tillsyn_scheduler_lag_seconds_bucket[$__rate_interval])))",
                    "p50",
                ),
                q(
                    "histogram_quantile(0.99, sum by (le) "
                    "(rate(tillsyn_scheduler_lag_seconds_bucket[$__rate_interval])))",
                    "p99",
                ),
            ],
            "How late jobs start. Under a second is normal; tens of seconds mean the "
            "service is starved of CPU or blocked.",
            unit="s",
        ),
        series(
            "Job runs by type",
            [
                q(
                    "sum by (job_type) (rate(tillsyn_scheduler_jobs_run_total[$__rate_interval]))",
                    "{{job_type}}",
                )
            ],
            "Runs per second of each job type: edge (window starts and ends), sweep, "
            "liveness, resend. A flat zero for a periodic job means it stopped.",
            unit="ops",
        ),
        series(
            "Windows open and upcoming",
            [
                q("max(tillsyn_windows_open)", "open now"),
                q("max by (within) (tillsyn_windows_upcoming)", "starting within {{within}}"),
            ],
            "The night's shape: windows open now and about to open.",
        ),
        series(
            "Window events per hour",
            [q("sum by (event) (increase(tillsyn_windows_total[1h]))", "{{event}}")],
            "opened / closed / missed windows. Every missed window raised a visit.",
        ),
        series(
            "Checks by outcome per hour",
            [q("sum by (outcome) (increase(tillsyn_checks_total[1h]))", "{{outcome}}")],
            "Supervision checks: seen, not seen, something wrong (staff outcomes), device "
            "failed (no digital check possible), unrecorded (window ended with no outcome).",
        ),
        stat(
            "Rechecks (12 h)",
            "sum(increase(tillsyn_rechecks_total[12h]))",
            "Residents not seen at the first look and checked again 20 minutes later.",
            base="blue",
            decimals=0,
        ),
        stat(
            "Visits open",
            "sum(max by (cause) (tillsyn_visits_open))",
            "Physical visits not yet closed.",
            steps=WARN,
        ),
        series(
            "Commands by kind and outcome",
            [
                q(
                    "sum by (kind, outcome) (increase(tillsyn_commands_total[$__rate_interval]))",
                    "{{kind}} {{outcome}}",
                )
            ],
            "Commands issued, re-sent, applied, refused, expired, superseded. Expired arms "
            "mean a device did not receive its command before the window ended.",
        ),
        series(
            "Command round trip",
            [
                q(
                    "histogram_quantile(0.95, sum by (le, kind) "
                    "(rate(tillsyn_command_roundtrip_seconds_bucket[$__rate_interval])))",
                    "p95 {{kind}}",
                ),
                q("max(tillsyn_command_ack_timeout_seconds)", "resend after"),
            ],
            "From signing a command to the device's applied ack. Seconds are normal; "
            "minutes mean devices reconnect slowly or the broker queues. 'resend after': "
            "how long the ledger now waits for an ack before resending (learnt from the "
            "acks; it rises above resend_after_s when devices are slow to deliver).",
            unit="s",
        ),
        series(
            "Gauge refresh",
            [
                q("max(tillsyn_gauges_refresh_duration_seconds)", "gauge refresh took"),
                q("time() - max(tillsyn_gauges_refresh_timestamp_seconds)", "since last refresh"),
            ],
            "How long recomputing the dashboards' gauges from the database takes, and how "
            "long ago it last ran. Since-last-refresh above 5 minutes: TillsynGaugesStale.",
            unit="s",
        ),
        series(
            "Visits open by cause",
            [q("max by (cause) (tillsyn_visits_open)", "{{cause}}")],
            "Which causes make up the open visits.",
        ),
        series(
            "Outbox backlog",
            [
                q("max(tillsyn_outbox_pending)", "pending"),
                q("max(tillsyn_outbox_oldest_age_seconds)", "oldest (s)"),
            ],
            "Visit notifications waiting for the receiving system. A growing line: "
            "TillsynOutboxBacklogGrowing.",
        ),
        series(
            "Outbox deliveries",
            [
                q(
                    "sum by (outcome) "
                    "(increase(tillsyn_outbox_deliveries_total[$__rate_interval]))",
                    "{{outcome}}",
                )
            ],
            "Delivery attempts: delivered, retry (will try again), dead (gave up).",
        ),
    ),
)

DEVICES = Dashboard(
    uid="tillsyn-devices",
    title="Tillsyn: device health and connectivity",
    file="device-health.json",
    intro="The fleet's devices and the service's own connection and ingest.",
    panels=(
        stat(
            "Fleet service up",
            'min(up{job="tillsyn-fleet"})',
            "Whether Prometheus can scrape every fleet replica.",
            mappings=(("1", "up", GREEN), ("0", "DOWN", RED)),
            base=RED,
            steps=((1.0, GREEN),),
            width=4,
        ),
        stat(
            "Online",
            'max(tillsyn_devices{connectivity="online"})',
            "Devices heard from within the offline threshold.",
            base="blue",
            width=4,
        ),
        stat(
            "Offline",
            'max(tillsyn_devices{connectivity="offline"})',
            "Devices silent past the threshold or whose Last Will arrived.",
            steps=WARN,
            width=4,
        ),
        stat(
            "Never connected",
            'max(tillsyn_devices{connectivity="unknown"})',
            "Registered devices never heard from: not installed yet, or a pairing problem.",
            steps=WARN,
            width=4,
        ),
        stat(
            "Unhealthy",
            "max(tillsyn_devices_unhealthy)",
            "Devices whose camera is not ok or whose clock is unsynchronised; they refuse to arm.",
            steps=WARN,
            width=4,
        ),
        stat(
            "Oldest heartbeat (online)",
            "max(tillsyn_heartbeat_age_max_seconds)",
            "The longest silence among devices still counted online; near the offline "
            "threshold (90 s) it is about to be marked offline.",
            unit="s",
            steps=((60.0, AMBER), (90.0, RED)),
            decimals=0,
            width=4,
        ),
        series(
            "Devices by connectivity",
            [q("max by (connectivity) (tillsyn_devices)", "{{connectivity}}")],
            "Online, offline and never-connected devices over time.",
        ),
        series(
            "Disconnects by cause",
            [
                q(
                    "sum by (why) (increase(tillsyn_device_disconnects_total[$__rate_interval]))",
                    "{{why}}",
                )
            ],
            "last_will: the broker saw the connection drop; heartbeat_silence: the device "
            "stopped talking. Many at once: TillsynMassDisconnect.",
        ),
        series(
            "Heartbeat age",
            [
                q(
                    "histogram_quantile(0.5, sum by (le) "
                    "(rate(tillsyn_heartbeat_age_seconds_bucket[$__rate_interval])))",
                    "p50",
                ),
                q(
                    "histogram_quantile(0.99, sum by (le) "
                    "(rate(tillsyn_heartbeat_age_seconds_bucket[$__rate_interval])))",
                    "p99",
                ),
            ],
            "Time since the last contact of online devices. p50 near half the heartbeat "
            "interval is healthy; a rising p99 means a lossy network.",
            unit="s",
        ),
        series(
            "Unhealthy devices by reason",
            [q("max by (reason) (tillsyn_devices_unhealthy_by_reason)", "{{reason}}")],
            "camera_fault / camera_unplugged: send a technician; clock_unsynced: the "
            "device has no time source (NTP) and refuses every command.",
        ),
        series(
            "Device clock skew",
            [
                q(
                    "histogram_quantile(0.99, sum by (le) "
                    "(rate(tillsyn_device_clock_skew_seconds_bucket[$__rate_interval])))",
                    "p99 (heartbeats)",
                ),
                q("max(tillsyn_device_clock_skew_max_seconds)", "largest (online devices)"),
            ],
            "Device clock minus fleet clock, from heartbeats (includes network delay). "
            "Over a few seconds: the device's NTP is failing; tokens may be refused.",
            unit="s",
        ),
        bars(
            "Devices by firmware",
            [q("max by (version) (tillsyn_devices_firmware)", "{{version}}")],
            "Firmware versions in the field (the 20 most common; the rest as 'other'). "
            "Use it to follow a rollout.",
        ),
        series(
            "Lock-state mismatches",
            [q("max by (desired) (tillsyn_lock_state_mismatch)", "should be {{desired}}")],
            "Devices whose reported state differs from the desired one. Brief spikes at "
            "window edges are normal; a plateau is TillsynLockStateMismatch.",
        ),
        series(
            "Fleet broker connection",
            [
                q("min(tillsyn_mqtt_connected)", "connected"),
                q("sum(increase(tillsyn_mqtt_connects_total[1h]))", "connects per hour"),
            ],
            "The service's own MQTT connection; frequent reconnects point at the broker or "
            "network.",
        ),
        series(
            "Ingest rate by channel",
            [
                q(
                    "sum by (channel) (rate(tillsyn_ingest_messages_total[$__rate_interval]))",
                    "{{channel}}",
                )
            ],
            "Device messages per second. Heartbeats dominate: devices / heartbeat interval.",
            unit="ops",
        ),
        series(
            "Ingest lag",
            [q("max(tillsyn_ingest_lag_seconds)", "lag")],
            "How long broker data waits unread by the fleet; 0 when caught up. Offline "
            "detection waits this much longer (at most offline_after_s) before calling a "
            "device silent.",
            unit="s",
        ),
        series(
            "Rejected messages by reason",
            [
                q(
                    "sum by (why) (rate(tillsyn_ingest_rejected_total[$__rate_interval]))",
                    "{{why}}",
                )
            ],
            "Malformed, oversize or unknown-device messages. A steady stream from one "
            "firmware version is a bug; from unknown devices, a pairing mix-up.",
            unit="ops",
        ),
    ),
)

SECURITY = Dashboard(
    uid="tillsyn-security",
    title="Tillsyn: security (refusals, pairing, revocations, certificates)",
    file="security.json",
    intro="Who tries to command devices without the fleet's key, and what expires when.",
    panels=(
        stat(
            "Token refusals (24 h)",
            "sum(increase(tillsyn_token_refusals_total[24h]))",
            "Commands devices refused. Most are benign races (window over, replay of a "
            "re-sent command); see the breakdown.",
            steps=((20.0, AMBER),),
            decimals=0,
            width=4,
        ),
        stat(
            "Forged-token refusals (24 h)",
            f"sum(increase(tillsyn_token_refusals_total{{{FORGED}}}[24h]))",
            "Tokens not signed by the fleet for that device. Anything above 0 is "
            "TillsynForgedCommandTokens.",
            steps=ALARM,
            decimals=0,
            width=4,
        ),
        stat(
            "Revoked certificates",
            "max(tillsyn_certificates_revoked)",
            "Certificates on the CRL the broker enforces.",
            base="blue",
            width=4,
        ),
        stat(
            "CRL valid for",
            "(min(tillsyn_crl_next_update_timestamp_seconds > 0) - time()) / 86400",
            "Days until the CRL must be re-signed; when it lapses the broker refuses every device.",
            unit="d",
            base=RED,
            steps=((1.0, AMBER), (5.0, GREEN)),
            decimals=1,
            width=4,
        ),
        stat(
            "Soonest certificate expiry",
            "(min by (kind) (tillsyn_certificate_soonest_expiry_timestamp_seconds) - time())"
            " / 86400",
            "Days until the first certificate of each kind (device, fleet, ca) expires.",
            legend="{{kind}}",
            unit="d",
            base=RED,
            steps=((3.0, AMBER), (14.0, GREEN)),
            decimals=0,
            width=8,
        ),
        series(
            "Token refusals by reason",
            [
                q(
                    "sum by (reason) (increase(tillsyn_token_refusals_total[$__rate_interval]))",
                    "{{reason}}",
                )
            ],
            "unknown_key / bad_signature / wrong_audience: forgery or key mix-up; "
            "replayed / expired / window_over: delivery delays; clock_unsynced / "
            "camera_fault: device health.",
        ),
        series(
            "Pairings by outcome",
            [q("sum by (outcome) (increase(tillsyn_pairings_total[1h]))", "{{outcome}}")],
            "Pairing codes started, completed, expired and refused per hour. Many refused "
            "codes: someone is guessing.",
        ),
        series(
            "Revocations by reason",
            [q("sum by (reason) (increase(tillsyn_revocations_total[1h]))", "{{reason}}")],
            "Certificates revoked by the fleet: retired, swapped, compromised.",
        ),
        bars(
            "Certificates by kind",
            [
                q("max by (kind) (tillsyn_certificates)", "{{kind}} valid"),
                q(
                    "max by (kind) (tillsyn_certificates_expiring_within_30d)",
                    "{{kind}} expiring within 30 d",
                ),
            ],
            "Valid certificates and those expiring within 30 days, per kind.",
        ),
        series(
            "Messages from unknown devices or topics",
            [
                q(
                    'sum by (why) (rate(tillsyn_ingest_rejected_total{why=~"unknown_device'
                    '|bad_topic|unexpected"}[$__rate_interval]))',
                    "{{why}}",
                )
            ],
            "Messages the broker let through but the fleet does not know: a device not "
            "registered, or something publishing where it should not.",
            unit="ops",
        ),
    ),
)

DASHBOARDS = (OVERVIEW, SCHEDULING, DEVICES, SECURITY)

# --- JSON model -------------------------------------------------------------------------


def _layout(panels: tuple[Panel, ...]) -> list[tuple[Panel, dict[str, int]]]:
    out: list[tuple[Panel, dict[str, int]]] = []
    x = y = row_h = 0
    for panel in panels:
        if x + panel.width > 24:
            x, y, row_h = 0, y + row_h, 0
        out.append((panel, {"h": panel.height, "w": panel.width, "x": x, "y": y}))
        x += panel.width
        row_h = max(row_h, panel.height)
    return out


def _panel_json(pid: int, panel: Panel, pos: dict[str, int]) -> dict[str, Any]:
    steps: list[dict[str, Any]] = [{"color": panel.base, "value": None}]
    steps += [{"color": c, "value": v} for v, c in panel.steps]
    defaults: dict[str, Any] = {
        "unit": panel.unit,
        "color": {"mode": "thresholds" if panel.kind != "timeseries" else "palette-classic"},
        "thresholds": {"mode": "absolute", "steps": steps},
        "mappings": [
            {"type": "value", "options": {v: {"text": t, "color": c, "index": i}}}
            for i, (v, t, c) in enumerate(panel.mappings)
        ],
    }
    if panel.decimals is not None:
        defaults["decimals"] = panel.decimals
    options: dict[str, Any]
    if panel.kind == "stat":
        options = {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "background",
            "graphMode": "none",
            "textMode": "auto",
            "justifyMode": "auto",
            "orientation": "auto",
        }
    elif panel.kind == "bargauge":
        options = {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "orientation": "horizontal",
            "displayMode": "basic",
            "showUnfilled": True,
        }
    else:
        defaults["custom"] = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10}
        options = {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        }
    return {
        "id": pid,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.tells,
        "datasource": DATASOURCE,
        "gridPos": pos,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": options,
        "targets": [
            {
                "refId": chr(ord("A") + i),
                "datasource": DATASOURCE,
                "expr": query.expr,
                "legendFormat": query.legend or "__auto",
                "range": panel.kind == "timeseries",
                "instant": panel.kind != "timeseries",
            }
            for i, query in enumerate(panel.queries)
        ],
    }


def dashboard_json(board: Dashboard) -> dict[str, Any]:
    return {
        "uid": board.uid,
        "title": board.title,
        "description": board.intro,
        "tags": ["tillsyn"],
        "timezone": "Europe/Stockholm",
        "editable": False,
        "graphTooltip": 1,
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-12h", "to": "now"},
        "timepicker": {},
        "templating": {"list": []},
        "annotations": {"list": []},
        "links": [
            {
                "type": "dashboards",
                "tags": ["tillsyn"],
                "asDropdown": False,
                "title": "Tillsyn",
                "includeVars": False,
                "keepTime": True,
            }
        ],
        "panels": [
            _panel_json(i + 1, panel, pos) for i, (panel, pos) in enumerate(_layout(board.panels))
        ],
    }


# --- docs tables ------------------------------------------------------------------------


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def panel_table(board: Dashboard) -> str:
    rows = [
        f"Dashboard `{board.file}` (uid `{board.uid}`): {board.intro}",
        "",
        "| panel | what it tells IT support |",
        "|---|---|",
    ]
    rows += [f"| {_cell(p.title)} | {_cell(p.tells)} |" for p in board.panels]
    return "\n".join(rows)


def metric_table() -> str:
    sys.path.insert(0, str(ROOT.parent))
    from fleet.metrics import FleetMetrics

    rows = ["| metric | type | labels | fed by | meaning |", "|---|---|---|---|---|"]
    for info in FleetMetrics().catalogue:
        labels = ", ".join(f"`{label}`" for label in info.labels) or "-"
        rows.append(
            f"| `{info.name}` | {info.kind} | {labels} | {info.owner} | {_cell(info.help)} |"
        )
    return "\n".join(rows)


def _replace_block(text: str, name: str, body: str) -> str:
    begin, end = f"<!-- BEGIN generated:{name} -->", f"<!-- END generated:{name} -->"
    start, stop = text.find(begin), text.find(end)
    if start < 0 or stop < start:
        raise SystemExit(f"{DOCS}: markers for {name!r} are missing")
    return text[: start + len(begin)] + "\n" + body + "\n" + text[stop:]


def rendered() -> dict[Path, str]:
    """Every generated file and its expected content."""
    out = {
        ROOT / b.file: json.dumps(dashboard_json(b), indent=2, ensure_ascii=False) + "\n"
        for b in DASHBOARDS
    }
    doc = DOCS.read_text()
    for b in DASHBOARDS:
        doc = _replace_block(doc, b.uid, panel_table(b))
    out[DOCS] = _replace_block(doc, "metrics", metric_table())
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--check", action="store_true", help="fail if files are out of date")
    args = parser.parse_args()
    stale = []
    for path, content in rendered().items():
        current = path.read_text() if path.exists() else None
        if current != content:
            stale.append(path)
            if not args.check:
                path.write_text(content)
    verb = "out of date" if args.check else "written"
    for path in stale:
        print(f"{verb}: {path.relative_to(ROOT.parent)}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    raise SystemExit(main())
