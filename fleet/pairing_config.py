"""Settings of pairing, device certificates and the equipment lifecycle (``[pairing]``).

Pairing is off unless ``pki_dir`` names the fleet CA: without the CA key the fleet can
neither issue nor revoke device certificates. In a TOML settings file::

    [pairing]
    pki_dir = "/var/lib/tillsyn/pki"
    enroll_port = 8443
    verification_uri = "https://fleet.example.org/pair"
    broker_pid_file = "/run/mosquitto/mosquitto.pid"
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = ["PairingSettings"]


class PairingSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # The CA that signs device certificates and the CRL the broker reads.
    pki_dir: Path | None = None

    # HTTPS enrollment listener for devices (None: off). Its certificate comes from
    # enroll_cert_file/enroll_key_file, or is issued from pki_dir for enroll_hosts.
    enroll_host: str = "127.0.0.1"
    enroll_port: Annotated[int, Field(ge=0, le=65535)] | None = None
    enroll_hosts: Annotated[list[str], Field(min_length=1, max_length=16)] = [
        "localhost",
        "127.0.0.1",
    ]
    enroll_cert_file: Path | None = None
    enroll_key_file: Path | None = None
    # Where the technician enters the code: shown by the device next to it.
    verification_uri: Annotated[str, Field(min_length=1, max_length=400)] = (
        "http://127.0.0.1:8080/pair"
    )
    # The broker address handed to devices (default: the fleet's own broker_host/port).
    broker_public_host: str | None = None
    broker_public_port: Annotated[int, Field(ge=1, le=65535)] | None = None

    # Device certificates: short-lived, renewed by the device at renew_share of their life.
    cert_lifetime_s: Annotated[int, Field(ge=30, le=825 * 86400)] = 30 * 86400
    renew_share: Annotated[float, Field(ge=0.05, le=0.95)] = 2 / 3
    renew_min_interval_s: Annotated[float, Field(ge=0)] = 60.0
    expiry_warning_days: Annotated[int, Field(ge=1, le=365)] = 30

    # RFC 8628 codes.
    code_ttl_s: Annotated[int, Field(ge=30, le=86400)] = 600
    poll_interval_s: Annotated[int, Field(ge=1, le=60)] = 5
    max_pending_enrollments: Annotated[int, Field(ge=1)] = 1000
    # Wrong user codes tolerated per technician and in total per guess_window_s.
    guess_limit_per_staff: Annotated[int, Field(ge=1)] = 5
    guess_limit_global: Annotated[int, Field(ge=1)] = 50
    guess_window_s: Annotated[float, Field(gt=0)] = 600.0

    # Optional factory identity: devices must prove their serial with a key whose
    # certificate this CA issued.
    factory_ca_file: Path | None = None

    # Commissioning test after pairing.
    commissioning_connect_s: Annotated[float, Field(gt=0)] = 180.0
    commissioning_step_s: Annotated[float, Field(gt=0)] = 30.0
    commissioning_look_s: Annotated[int, Field(ge=1, le=60)] = 3

    # Making Mosquitto re-read the CRL: SIGHUP to the pid in broker_pid_file, or run
    # broker_reload_command (e.g. "docker kill -s HUP mosquitto").
    broker_pid_file: Path | None = None
    broker_reload_command: str | None = None
    # How long to wait for the new CRL to refuse a probe certificate.
    crl_confirm_s: Annotated[float, Field(gt=0)] = 10.0

    @field_validator("broker_reload_command")
    @classmethod
    def _command(cls, value: str | None) -> str | None:
        if value is not None and not shlex.split(value):
            raise ValueError("must name a program")
        return value

    @model_validator(mode="after")
    def _pairs(self) -> PairingSettings:
        if (self.enroll_cert_file is None) != (self.enroll_key_file is None):
            raise ValueError("enroll_cert_file and enroll_key_file go together")
        if self.enroll_port is not None and self.pki_dir is None:
            raise ValueError("enroll_port needs pki_dir (the CA that signs device certificates)")
        return self

    @property
    def enabled(self) -> bool:
        return self.pki_dir is not None
