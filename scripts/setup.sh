#!/usr/bin/env bash
# Install what is missing, idempotently: Debian packages (Mosquitto, venv), then the
# project and its pinned Python dependencies into .venv. Safe to run again and again.
#   scripts/setup.sh          what running the stack needs
#   scripts/setup.sh --test   also what the test suite needs
set -euo pipefail
cd "$(dirname "$0")/.."

want_test=0
[ "${1:-}" = "--test" ] && want_test=1

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

# Debian packages: "command-to-look-for:package". Test-only tools go in TEST_PKGS.
RUN_PKGS=(mosquitto:mosquitto)
# prometheus: promtool for the alert-rule tests, prometheus for the real-Prometheus test.
TEST_PKGS=(chromium:chromium promtool:prometheus)
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/usr/bin/$1" ]; }
pkgs=()
wanted=("${RUN_PKGS[@]}")
[ "$want_test" -eq 1 ] && wanted+=("${TEST_PKGS[@]}")
for entry in "${wanted[@]}"; do
  have "${entry%%:*}" || pkgs+=("${entry#*:}")
done
python3 -c 'import ensurepip, venv' 2>/dev/null || pkgs+=(python3-venv)
if [ "${#pkgs[@]}" -gt 0 ]; then
  echo "setup: installing Debian packages: ${pkgs[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
  if [[ " ${pkgs[*]} " == *" prometheus "* ]] && command -v systemctl >/dev/null 2>&1; then
    # The tests start their own Prometheus on free ports; the packaged service is not wanted.
    as_root systemctl disable --now prometheus >/dev/null 2>&1 || true
  fi
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  python3 -m venv .venv
fi
stamp=".venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "setup: installing Python packages into .venv (log: .venv/pip.log)"
  if ! { .venv/bin/python -m pip install --upgrade pip \
         && .venv/bin/python -m pip install -e '.[dev]'; } >.venv/pip.log 2>&1; then
    tail -20 .venv/pip.log
    echo "setup: pip install failed (full log: .venv/pip.log)" >&2
    exit 1
  fi
  rm -f .venv/.installed-*
  touch "$stamp"
fi

if [ "$want_test" -eq 1 ]; then
  # The database tests run on SQLite and on PostgreSQL at 127.0.0.1:5432 as user postgres
  # without a password (TILLSYN_TEST_PG overrides). A machine without PostgreSQL gets
  # Debian's, with loopback trust for that user only: a throwaway test server.
  if [ -z "${TILLSYN_TEST_PG:-}" ] && ! command -v pg_lsclusters >/dev/null 2>&1; then
    echo "setup: installing PostgreSQL for the database tests"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >/dev/null
    for hba in /etc/postgresql/*/main/pg_hba.conf; do
      as_root sed -i '1i host all postgres 127.0.0.1/32 trust' "$hba"
      ver="$(basename "$(dirname "$(dirname "$hba")")")"
      as_root pg_ctlcluster --skip-systemctl-redirect "$ver" main reload >/dev/null 2>&1 || true
    done
  fi
  # The machine's PostgreSQL is used by the database tests: start it if it is down.
  if command -v pg_lsclusters >/dev/null 2>&1; then
    pg_lsclusters -h | while read -r ver cluster _port status _rest; do
      if [ "$status" != "online" ]; then
        echo "setup: starting PostgreSQL $ver/$cluster"
        as_root pg_ctlcluster --skip-systemctl-redirect "$ver" "$cluster" start || true
      fi
    done
  fi
fi
