#!/usr/bin/env bash
# Opt-in: compile the request path (the session's layers, the cache it asks, the codec and the
# stats) with mypyc, in place, into the venv's editable install. The pure-Python modules stay
# the default; `scripts/build_compiled.sh --clean` removes the compiled ones again.
# benchmarks/RESULTS.md ("Stop 22: mypyc, measured") says what it gains and what it costs.
#   scripts/build_compiled.sh            # ~5 min on 2 cores; needs gcc and Python's headers
#   scripts/build_compiled.sh --clean
# Verify: `.venv/bin/python -c "import neonpoly.proxy.session as s; print(s.__file__)"` names a
# .so; then tests/proxy, tests/unit and tests/adversarial.
set -euo pipefail
cd "$(dirname "$0")/.."

clean() {
  find neonpoly -name '*.cpython-*.so' -delete
  rm -f ./*__mypyc.cpython-*.so
  rm -rf build/__native* build/lib.* build/temp.* build/ops.txt build/setup.py
}

if [ "${1:-}" = "--clean" ]; then
  clean
  exit 0
fi

# Left out, and why (each was tried):
#   cache/template.py      subclasses sqlglot's Tokenizer (a class mypyc cannot derive from)
#   cache/invalidation.py  TableGenerations.share() changes an object's class in place
#   proxy/server.py        uvloop's Server.sockets is a list where typeshed says tuple
#   cache/siblings.py      BoardView.frozen() makes its copy with object.__new__
#   stats.py               its report dataclasses cross workers as JSON, decoded by their type
#                          hints (admin/reports.py), which mypyc erases (tuple[X, ...] -> tuple)
#   the package __init__s  nothing runs in them
MODULES=(neonpoly/pgwire.py neonpoly/state.py neonpoly/defaults.py)
for f in neonpoly/proxy/*.py neonpoly/cache/*.py; do
  case "$f" in
    */__init__.py | */template.py | */invalidation.py | */siblings.py | */server.py) ;;
    *) MODULES+=("$f") ;;
  esac
done

clean
.venv/bin/mypyc "${MODULES[@]}"
