"""Run Mosquitto with the production config, for dev and tests.

:func:`render_config` takes ``broker/mosquitto.conf`` (the file docker-compose uses)
and rewrites only the environment-specific directives listed in
:data:`ENVIRONMENT_DIRECTIVES`; every other line, in particular every security
directive, is kept as written. :class:`MosquittoProcess` writes the rendered file
into a work directory, starts ``mosquitto -c`` on it and waits until it serves.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import pwd
import random
import resource
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Final

from broker.errors import BrokerError, BrokerStartError
from broker.pki import PkiPaths

__all__ = [
    "ENVIRONMENT_DIRECTIVES",
    "PRODUCTION_ACL",
    "PRODUCTION_CONFIG",
    "MosquittoProcess",
    "config_directives",
    "find_mosquitto",
    "free_port",
    "render_config",
    "stop_by_pidfile",
]

logger = logging.getLogger(__name__)

PRODUCTION_CONFIG: Final = Path(__file__).parent / "mosquitto.conf"
PRODUCTION_ACL: Final = Path(__file__).parent / "acl.conf"

# The only directives render_config may change. "user" is added: started as root,
# Mosquitto would switch to the "mosquitto" user, which cannot read our 0600 keys.
ENVIRONMENT_DIRECTIVES: Final = frozenset(
    {
        "listener",
        "cafile",
        "certfile",
        "keyfile",
        "crlfile",
        "acl_file",
        "persistence_location",
        "log_dest",
        "user",
    }
)
_REQUIRED = ENVIRONMENT_DIRECTIVES - {"user"}

CONFIG_NAME: Final = "mosquitto.conf"
ACL_NAME: Final = "acl.conf"
LOG_NAME: Final = "mosquitto.log"
STDERR_NAME: Final = "mosquitto.stderr"
PID_NAME: Final = "mosquitto.pid"

_POLL = 0.02
_LOG_TAIL_LINES = 30
_running: set[MosquittoProcess] = set()


def find_mosquitto() -> Path:
    """Locate the ``mosquitto`` binary (``PATH``, then the usual sbin dirs)."""
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin", "/sbin"])
    found = shutil.which("mosquitto", path=search)
    if found is None:
        raise BrokerStartError("mosquitto executable not found (install mosquitto 2.0)")
    return Path(found)


_LOWEST_PICKED = 20_000


def _ephemeral_low() -> int:
    """The first port the kernel hands out as the source of outgoing connections."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768  # Linux's default


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now, for a server started a moment later.

    Chosen below the ephemeral range: a port from ``bind(0)`` is in it, and between its
    release and the server's bind, any outgoing connection (the test suite opens
    thousands) may take it as its source port ("address already in use", seen in a full
    run of the suite)."""
    high = _ephemeral_low() - 1
    if high > _LOWEST_PICKED:
        for _ in range(200):
            port = random.randint(_LOWEST_PICKED, high)
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                try:
                    sock.bind((host, port))
                except OSError:
                    continue  # taken (or in TIME_WAIT): another
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        found: int = sock.getsockname()[1]
        return found


def config_directives(text: str) -> list[tuple[str, str]]:
    """``(name, value)`` for every directive line of a Mosquitto config, in order."""
    directives = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, _, value = line.partition(" ")
        directives.append((name, value.strip()))
    return directives


def _value(path: Path | str) -> str:
    text = str(path)
    # A newline in a path would inject directives into the config.
    if "\n" in text or "\r" in text:
        raise BrokerError(f"refusing a config value containing a newline: {text!r}")
    return text


def render_config(
    *,
    pki: PkiPaths,
    workdir: Path,
    port: int,
    host: str = "127.0.0.1",
    acl_file: Path | None = None,
    template: Path = PRODUCTION_CONFIG,
    user: str | None = None,
) -> str:
    """Return ``template`` with only the environment-specific directives rewritten.

    ``acl_file`` defaults to ``workdir/acl.conf``; ``user`` to the current user.
    Raises :class:`BrokerError` if the template lacks one of those directives or has
    more than one listener (tests would then not exercise the production listener).
    """
    workdir = Path(workdir).absolute()
    replacements = {
        "listener": f"{port} {_value(host)}",
        "cafile": _value(pki.ca_cert),
        "certfile": _value(pki.broker_cert),
        "keyfile": _value(pki.broker_key),
        "crlfile": _value(pki.crl),
        "acl_file": _value(acl_file if acl_file is not None else workdir / ACL_NAME),
        # Same form as production (a directory with a trailing slash).
        "persistence_location": _value(workdir / "data") + "/",
        "log_dest": "file " + _value(workdir / LOG_NAME),
        # The effective user, not $USER: that is who owns (and can read) the keys.
        "user": _value(user if user is not None else pwd.getpwuid(os.geteuid()).pw_name),
    }
    try:
        source = template.read_text()
    except OSError as exc:
        raise BrokerError(f"cannot read broker config template {template}: {exc}") from exc

    seen: dict[str, int] = {}
    out = [f"# RENDERED by broker.launcher from {template}; do not edit.", ""]
    for line in source.splitlines():
        stripped = line.strip()
        name = stripped.partition(" ")[0]
        if not stripped or stripped.startswith("#") or name not in replacements:
            out.append(line)
            continue
        seen[name] = seen.get(name, 0) + 1
        if name == "log_dest" and seen[name] > 1:
            # Several log_dest lines collapse into the one log file.
            continue
        out.append(f"{name} {replacements[name]}")
    if seen.get("listener", 0) != 1 or any(n == "port" for n, _ in config_directives(source)):
        # "port" opens the legacy default listener; a second one could be plain TCP.
        raise BrokerError(f"{template} must define exactly one listener (and no 'port')")
    missing = sorted(_REQUIRED - seen.keys())
    if missing:
        raise BrokerError(f"{template} lacks directives: {', '.join(missing)}")
    if "user" not in seen:
        out += [
            "",
            "# Environment: keep running as the user who started us (as root, Mosquitto",
            "# would switch to 'mosquitto', which cannot read the 0600 keys).",
            f"user {replacements['user']}",
        ]
    return "\n".join(out) + "\n"


def _tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); /proc tells us it is gone.
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rpartition(")")[2].split()[0] != "Z"
    return True


def _raise_nofile(pid: int) -> None:
    """Let the broker use the hard limit of open files: one per client connection, and
    the usual soft limit (1024) would refuse connections long before 10,000 devices."""
    with contextlib.suppress(OSError, ValueError):
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (hard, hard))


class MosquittoProcess:
    """One Mosquitto running the rendered production config on ``host:port``.

    Usable as a context manager (``start`` on enter, ``stop`` on exit).
    """

    def __init__(
        self,
        *,
        pki: PkiPaths | Path,
        workdir: Path,
        port: int | None = None,
        host: str = "127.0.0.1",
        executable: Path | None = None,
        config_template: Path = PRODUCTION_CONFIG,
        acl_template: Path = PRODUCTION_ACL,
        start_timeout: float = 10.0,
        stop_timeout: float = 5.0,
    ) -> None:
        self.pki = pki if isinstance(pki, PkiPaths) else PkiPaths.for_directory(pki)
        self.workdir = Path(workdir).absolute()
        self._host = host
        self._port = port if port is not None else free_port(host)
        self._executable = executable
        self.config_template = config_template
        self.acl_template = acl_template
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._detached = False

    # ---------------------------------------------------------------- properties

    @property
    def host(self) -> str:
        """Address the listener is bound to."""
        return self._host

    @property
    def port(self) -> int:
        """TLS listener port (kept across restarts)."""
        return self._port

    @property
    def pid(self) -> int | None:
        """Process id while started, else None."""
        return self._proc.pid if self._proc is not None else None

    @property
    def log_path(self) -> Path:
        """The Mosquitto log file (log_dest of the rendered config)."""
        return self.workdir / LOG_NAME

    @property
    def config_path(self) -> Path:
        """The rendered config file."""
        return self.workdir / CONFIG_NAME

    @property
    def pid_path(self) -> Path:
        """Pid file written by detached starts."""
        return self.workdir / PID_NAME

    def is_running(self) -> bool:
        """True while the process exists and has not exited."""
        return self._proc is not None and self._proc.poll() is None

    # ----------------------------------------------------------------- lifecycle

    def render(self) -> str:
        """Render the config for this instance (nothing is written)."""
        return render_config(
            pki=self.pki,
            workdir=self.workdir,
            port=self._port,
            host=self._host,
            acl_file=self.workdir / ACL_NAME,
            template=self.config_template,
        )

    def _prepare(self) -> None:
        for required in (self.pki.ca_cert, self.pki.broker_cert, self.pki.broker_key):
            if not required.exists():
                raise BrokerStartError(
                    f"PKI incomplete: {required} is missing (run `tillsyn pki init`)",
                    port=self._port,
                )
        if not self.pki.crl.exists():
            raise BrokerStartError(f"PKI incomplete: {self.pki.crl} is missing", port=self._port)
        self.workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
        (self.workdir / "data").mkdir(mode=0o700, exist_ok=True)
        try:
            acl = self.acl_template.read_text()
        except OSError as exc:
            raise BrokerStartError(f"cannot read ACL {self.acl_template}: {exc}") from exc
        (self.workdir / ACL_NAME).write_text(acl)
        self.config_path.write_text(self.render())

    def start(self, *, detached: bool = False) -> MosquittoProcess:
        """Start Mosquitto and wait until it accepts TCP on its port.

        ``detached`` starts it in its own session (it survives our exit) and writes
        :attr:`pid_path`; stop it later with :func:`stop_by_pidfile`.
        Raises :class:`BrokerStartError` (with the log tail) if it does not come up.
        """
        if self.is_running():
            raise BrokerStartError("mosquitto is already running", port=self._port)
        executable = self._executable or find_mosquitto()
        self._prepare()
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        stderr: IO[bytes]
        with (self.workdir / STDERR_NAME).open("ab") as stderr:
            self._proc = subprocess.Popen(
                [str(executable), "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
                cwd=self.workdir,
                start_new_session=detached,
            )
        self._detached = detached
        _raise_nofile(self._proc.pid)
        logger.info(
            "started mosquitto pid=%d on %s:%d (workdir %s)",
            self._proc.pid,
            self._host,
            self._port,
            self.workdir,
        )
        try:
            self._wait_ready(log_offset)
        except BrokerStartError:
            self._terminate(signal.SIGKILL)
            raise
        if detached:
            self.pid_path.write_text(f"{self._proc.pid}\n")
        else:
            _running.add(self)
        return self

    def _new_log(self, offset: int) -> str:
        try:
            with self.log_path.open("rb") as fh:
                fh.seek(offset)
                return fh.read().decode(errors="replace")
        except OSError:
            return ""

    def _failure(self, reason: str) -> BrokerStartError:
        returncode = self._proc.poll() if self._proc is not None else None
        tail = "\n".join(t for t in (_tail(self.log_path), _tail(self.workdir / STDERR_NAME)) if t)
        return BrokerStartError(reason, port=self._port, returncode=returncode, log_tail=tail)

    def _wait_ready(self, log_offset: int) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise self._failure(
                    f"mosquitto exited with code {self._proc.returncode} during start-up"
                )
            # "running" in OUR part of the log rules out another process that
            # happens to listen on the same port.
            if " running" in self._new_log(log_offset) and _port_open(self._host, self._port):
                return
            time.sleep(_POLL)
        raise self._failure(
            f"mosquitto did not accept connections on {self._host}:{self._port} "
            f"within {self.start_timeout:.1f}s"
        )

    def _terminate(self, sig: signal.Signals) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
            try:
                proc.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                logger.warning("mosquitto pid=%d ignored %s, killing it", proc.pid, sig.name)
                proc.kill()
                proc.wait(timeout=self.stop_timeout)
        self._proc = None
        _running.discard(self)
        if self._detached:
            self.pid_path.unlink(missing_ok=True)

    def stop(self) -> None:
        """SIGTERM (Mosquitto saves its persistence db), then SIGKILL if it hangs."""
        if self._proc is not None:
            logger.info("stopping mosquitto pid=%d", self._proc.pid)
        self._terminate(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL, no clean shutdown (for chaos tests)."""
        if self._proc is not None:
            logger.info("killing mosquitto pid=%d", self._proc.pid)
        self._terminate(signal.SIGKILL)

    def restart(self) -> None:
        """Stop and start again on the same port (reloads everything, drops clients)."""
        detached = self._detached
        self.stop()
        self.start(detached=detached)

    def reload(self, *, wait: bool = True) -> None:
        """SIGHUP: Mosquitto re-reads the ACL and the TLS files (CRL included).

        With ``wait``, returns once the log shows the reload. Connections that are
        already established are NOT re-checked against a new CRL.
        """
        if not self.is_running():
            raise BrokerStartError("mosquitto is not running", port=self._port)
        assert self._proc is not None
        marker = "Reloading config."
        before = self._new_log(0).count(marker)
        self._proc.send_signal(signal.SIGHUP)
        if not wait:
            return
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._new_log(0).count(marker) > before:
                return
            if self._proc.poll() is not None:
                raise self._failure("mosquitto exited while reloading")
            time.sleep(_POLL)
        raise self._failure("mosquitto did not log a reload after SIGHUP")

    def __enter__(self) -> MosquittoProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"MosquittoProcess(host={self._host!r}, port={self._port}, pid={self.pid})"


def stop_by_pidfile(workdir: Path, *, timeout: float = 5.0) -> bool:
    """Stop a Mosquitto started with ``start(detached=True)`` in ``workdir``.

    Returns False if there was nothing to stop. The pid is only signalled if it is
    still a mosquitto using this workdir's config (pids get reused).
    """
    workdir = Path(workdir).absolute()
    pid_path = workdir / PID_NAME
    try:
        pid = int(pid_path.read_text().strip())
    except FileNotFoundError:
        return False
    except ValueError:
        pid_path.unlink(missing_ok=True)
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        cmdline = []
    if str(workdir / CONFIG_NAME).encode() not in cmdline:
        logger.info("pid %d from %s is not our mosquitto; removing stale pid file", pid, pid_path)
        pid_path.unlink(missing_ok=True)
        return False
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, timeout)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not _pid_alive(pid):
                pid_path.unlink(missing_ok=True)
                logger.info("stopped mosquitto pid=%d", pid)
                return True
            time.sleep(_POLL)
    raise BrokerStartError(f"mosquitto pid={pid} did not stop")


@atexit.register
def _stop_leftovers() -> None:
    # Non-detached brokers must not outlive the Python process that started them.
    for proc in list(_running):
        with contextlib.suppress(Exception):
            proc.kill()
