#!/usr/bin/env bash
# Command 2: set everything up and run the whole test suite (lint, types, tests).
# Extra arguments go to pytest, e.g. scripts/test.sh -k broker
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
echo "== ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "== mypy"
.venv/bin/mypy
echo "== pytest"
.venv/bin/pytest "$@"
