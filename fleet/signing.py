"""The command signing key: created on first run, private file with mode 0600."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tillsyn_protocol import SigningKey

from .errors import ConfigError

log = logging.getLogger(__name__)


def public_key_path(private_path: Path) -> Path:
    return private_path.with_name(private_path.stem + ".pub.pem")


def load_or_create(path: Path) -> SigningKey:
    """Load the Ed25519 signing key, creating it (0600, never world-readable) if absent."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        # O_EXCL: two processes starting at once never overwrite each other's key.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
        signing = SigningKey.from_private(key)
        public_key_path(path).write_bytes(signing.public_pem())
        log.info("created command signing key kid=%s", signing.kid)
        return signing
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise ConfigError("signing_key_file", f"{path} is readable by others (mode {mode:o})")
    try:
        loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except ValueError:
        raise ConfigError("signing_key_file", f"{path} is not a PEM private key") from None
    if not isinstance(loaded, Ed25519PrivateKey):
        raise ConfigError("signing_key_file", f"{path} is not an Ed25519 key")
    signing = SigningKey.from_private(loaded)
    pub = public_key_path(path)
    if not pub.exists():
        pub.write_bytes(signing.public_pem())
    return signing
