#!/usr/bin/env bash
# Idempotent set-up: creates .venv (if missing) and installs the pinned runtime requirements into it; with --test,
# the test tools of requirements-test.txt too. Re-running is cheap: pip is skipped when the requirement files have
# not changed since the last install. torch comes from the CPU wheel pip's find-links point at (see requirements.txt).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
hash_of() { cat "$@" | sha256sum | cut -d' ' -f1; }
runtime_hash=$(hash_of requirements.txt)
case "${1:-}" in
  "") install=requirements.txt stamp=.venv/.requirements.sha256 want=$runtime_hash ;;
  # requirements-test.txt includes requirements.txt
  --test) install=requirements-test.txt stamp=.venv/.requirements-test.sha256
          want=$(hash_of requirements.txt requirements-test.txt) ;;
  *) echo "usage: scripts/setup.sh [--test]  (--test: the test tools too)" >&2; exit 2 ;;
esac
py=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating virtual environment in $root/.venv"
  "$py" -m venv .venv
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing the pinned $install (first time: a few minutes)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r "$install"
  echo "$runtime_hash" > .venv/.requirements.sha256  # the runtime set is installed either way
  echo "$want" > "$stamp"
fi
