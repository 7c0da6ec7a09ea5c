#!/usr/bin/env bash
# Command 1: set everything up and run a local fleet: Mosquitto with TLS and the production
# config, the fleet service on SQLite, and N simulated devices (real agents). Prints where to look.
#   scripts/dev-up.sh [--devices N]        stop with: .venv/bin/tillsyn dev down
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
if [ -f var/dev/stack.json ]; then
  echo "dev-up: stopping the previous dev stack"
  .venv/bin/tillsyn dev down || true
fi
exec .venv/bin/tillsyn dev up "$@"
