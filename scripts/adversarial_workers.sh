#!/usr/bin/env bash
# The adversarial suite (tests/adversarial) against `neonpoly serve --workers N` as a
# subprocess (N = $WORKERS, default 2), hits counted by its admin console over every worker.
# One serve per test file, purged between cases (tests/adversarial/conftest.py). About 30 min
# on a loaded 2-core machine, so `.ci/run` runs one file of it; this runs all of them.
#   scripts/adversarial_workers.sh [pytest args, e.g. -x -k hidden]
set -euo pipefail
cd "$(dirname "$0")/.."
NEONPOLY_TEST_WORKERS="${WORKERS:-2}" exec .venv/bin/pytest -q tests/adversarial "$@"
