#!/usr/bin/env bash
# The whole test suite on a fresh machine: set up .venv (runtime and test requirements), lint with ruff, warm
# DeepSpeed's CPU op cache, run pytest.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
bash scripts/setup.sh --test
# Lint first: a finding fails the run in a second, before any test starts.
.venv/bin/ruff check .
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
bash scripts/warm_deepspeed.sh
# The SLURM tests run against a real local cluster (munge, slurmctld, two slurmd as nodes n1 and n2); starting
# it needs root (apt-get, daemons). Elsewhere those tests skip and say why.
if [ "$(id -u)" = 0 ]; then
  bash scripts/slurm_cluster.sh start
  trap 'bash scripts/slurm_cluster.sh stop' EXIT
  export CLOZE_REQUIRE_SLURM=1
fi
# Two pytest workers (CLOZE_TEST_WORKERS; 0 runs in one process): the suite's time is mostly 2-rank jobs starting
# up and waiting on each other, which leaves a second job room on 2 cores. Each test module runs whole in one
# worker (its fixtures are built once); the Slurm modules run together, one test at a time (tests/conftest.py).
.venv/bin/python -m pytest -n "${CLOZE_TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder "$@"
