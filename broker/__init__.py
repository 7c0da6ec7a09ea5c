"""Mosquitto broker for Tillsyn Fleet: production config, ACL, dev PKI and launcher.

- ``broker/mosquitto.conf``, ``broker/acl.conf``: the production configuration.
- :mod:`broker.pki`: development CA, broker/fleet/device certificates, CRL.
- :mod:`broker.launcher`: run Mosquitto with the production config (dev, tests).
- :mod:`broker.cli`: the ``tillsyn pki`` and ``tillsyn broker`` click groups.
"""

from broker.errors import BrokerError, BrokerStartError, InvalidDeviceIdError, PkiError
from broker.launcher import MosquittoProcess, free_port, render_config
from broker.pki import PkiPaths

__all__ = [
    "BrokerError",
    "BrokerStartError",
    "InvalidDeviceIdError",
    "MosquittoProcess",
    "PkiError",
    "PkiPaths",
    "free_port",
    "render_config",
]
