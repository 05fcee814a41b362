#!/usr/bin/env bash
# The whole test suite on a fresh machine: set up .venv, warm DeepSpeed's CPU op cache, run pytest.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
bash scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
bash scripts/warm_deepspeed.sh
exec .venv/bin/python -m pytest "$@"
