"""Fleet service settings: environment (TILLSYN_*) and an optional TOML file, validated at start."""

from __future__ import annotations

import os
import re
import socket
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .errors import ConfigError
from .pairing_config import PairingSettings


class FleetSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TILLSYN_", extra="forbid")

    env: Literal["dev", "prod"] = "dev"
    database_url: str = "sqlite:///var/fleet/fleet.db"

    broker_host: str = "127.0.0.1"
    broker_port: int = Field(default=8883, ge=1, le=65535)
    ca_file: Path = Path("var/pki/ca.crt")
    cert_file: Path = Path("var/pki/fleet.crt")
    key_file: Path = Path("var/pki/fleet.key")
    # Unset: derived per process (tillsyn-fleet-<host>-<pid>) with a session that ends with
    # the connection; set (distinct per replica, stable across its restarts): a persistent
    # session that keeps what arrives while the replica restarts. docs/scaling.md.
    mqtt_client_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_-]{1,64}$")
    shared_group: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_-]{1,32}$")

    signing_key_file: Path = Path("var/fleet/command-signing-key.pem")

    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8080, ge=0, le=65535)

    tz: str = "Europe/Stockholm"
    offline_after_s: float = Field(default=90.0, gt=0)  # heartbeat silence threshold
    visit_horizon_s: float = Field(default=7200.0, ge=0)  # raise visits for windows due this soon
    arm_confirm_s: float = Field(default=60.0, gt=0)  # window start -> armed ack deadline
    resend_after_s: float = Field(default=10.0, gt=0)
    sweep_interval_s: float = Field(default=30.0, gt=0)
    liveness_interval_s: float = Field(default=2.0, gt=0)
    look_default_s: int = Field(default=60, ge=1, le=600)
    # Care plans, checks, scheduler lock, visit outbox (docs/architecture.md, "Care plans").
    preflight_s: float = Field(default=1800.0, ge=0)  # device readiness checked this early
    scheduler_lock_retry_s: float = Field(default=5.0, gt=0)  # a standby retries this often
    webhook_url: str | None = Field(default=None, pattern=r"^https?://")  # unset: disabled
    webhook_timeout_s: float = Field(default=10.0, gt=0)
    webhook_backoff_s: float = Field(default=2.0, gt=0)  # first retry; doubles up to the max
    webhook_backoff_max_s: float = Field(default=600.0, gt=0)
    coverage_after_s: float = Field(default=300.0, ge=0)  # report a night this long after noon
    # Platform incidents (fleet/incident.py): this many devices, or this share of the online
    # fleet, lost within the window opens one incident for IT support; it closes when
    # close_share of them are back for settle_s. The broker link down longer than
    # offline_after_s opens one too.
    incident_min_devices: int = Field(default=20, ge=1)
    incident_min_share: float = Field(default=0.2, gt=0, le=1)
    incident_window_s: float = Field(default=300.0, gt=0)
    incident_close_share: float = Field(default=0.8, gt=0, le=1)
    incident_settle_s: float = Field(default=60.0, ge=0)
    # Pairing, device certificates and the equipment lifecycle (fleet/pairing_config.py).
    pairing: PairingSettings = PairingSettings()

    # Staff accounts and the audit log (docs/architecture.md, "Staff, sessions, audit").
    # Encrypts TOTP secrets at rest; default: totp-secrets.key beside the signing key.
    totp_key_file: Path | None = None
    login_max_failures: int = Field(default=5, ge=1, le=100)  # then the account locks
    login_lockout_s: float = Field(default=900.0, gt=0)
    session_idle_s: float = Field(default=3600.0, gt=0)  # no request for this long: logged out
    session_max_s: float = Field(default=12 * 3600.0, gt=0)  # a night shift, then log in again
    cookie_secure: Literal["auto", "always", "never"] = "auto"  # auto: Secure when https
    audit_retention_days: int = Field(default=5 * 365, ge=30)
    metrics_public: bool = True  # /metrics readable without a token (loopback/scraper only)

    def client_id(self) -> str:
        """The MQTT client id: configured, or unique to this process (two replicas with the
        same config file must not take each other's session over)."""
        if self.mqtt_client_id:
            return self.mqtt_client_id
        host = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:32] or "host"
        return f"tillsyn-fleet-{host}-{os.getpid()}"

    def persistent_session(self) -> bool:
        """Only a configured (stable) client id keeps its session across reconnects: a
        derived one changes on every restart, and a session nobody resumes would go on
        taking its share of a shared subscription's messages until it expired."""
        return self.mqtt_client_id is not None

    def totp_key_path(self) -> Path:
        return self.totp_key_file or self.signing_key_file.with_name("totp-secrets.key")

    @field_validator("tz")
    @classmethod
    def _known_tz(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r}") from None
        return value

    @model_validator(mode="after")
    def _safe_in_prod(self) -> FleetSettings:
        # Dev defaults that are unsafe in production refuse to run there.
        if self.env == "prod":
            if self.database_url == "sqlite:///var/fleet/fleet.db":
                raise ValueError("database_url: set an explicit database for env=prod")
            if "dev" in self.ca_file.parts or "var" in self.ca_file.parts:
                raise ValueError("ca_file: the dev PKI must not be used with env=prod")
            if self.cookie_secure == "never":
                raise ValueError("cookie_secure: session cookies must be Secure with env=prod")
        return self


def load_settings(path: Path | None = None, **overrides: Any) -> FleetSettings:
    """Settings from TOML (if given), then environment, then explicit overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError("config", f"file not found: {path}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("config", f"{path}: {exc}") from None
    data.update(overrides)
    # Docker secrets: one file per setting (e.g. /run/secrets/tillsyn_database_url).
    secrets_dir = os.environ.get("TILLSYN_SECRETS_DIR")
    if secrets_dir:
        data.setdefault("_secrets_dir", secrets_dir)
    try:
        # Init kwargs win over env in pydantic-settings; pass only what the file/overrides set.
        return FleetSettings(**data)
    except ValidationError as exc:
        err = exc.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(p) for p in err["loc"]) or "settings"
        raise ConfigError(where, err["msg"]) from None
