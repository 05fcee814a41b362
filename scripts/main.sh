#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv, then prepare -> train (2 ranks) -> export -> downstream proof.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
start=$(date +%s)
bash scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
bash scripts/warm_deepspeed.sh
# the set-up time goes into the job's stage table
exec .venv/bin/python -m launch.demo --setup-seconds "$(( $(date +%s) - start ))" "$@"
