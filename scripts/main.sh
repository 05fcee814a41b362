#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv, then prepare -> train (2 ranks) -> export -> verify.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
bash scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
bash scripts/warm_deepspeed.sh
exec .venv/bin/python -m launch.demo "$@"
