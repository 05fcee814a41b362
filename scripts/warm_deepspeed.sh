#!/usr/bin/env bash
# DeepSpeed compiles its CPU shm comm op on the first init_distributed of a machine (about 30 s). Do it once,
# under a timeout, so tests and jobs do not each pay for it or race on its build lock. A compile killed midway
# leaves a `lock` file that hangs every later run: remove locks older than 10 minutes first.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ext=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/torch_extensions}
if [ -d "$ext" ]; then
  find "$ext" -name lock -mmin +10 -print -delete | sed 's/^/[warm] removed stale lock: /' || true
fi
if ls "$ext"/*/deepspeed_shm_comm/*.so >/dev/null 2>&1; then
  exit 0
fi
echo "[warm] building DeepSpeed's CPU comm op once (about 30 s)"
cd "$root"
RANK=0 LOCAL_RANK=0 WORLD_SIZE=1 MASTER_ADDR=127.0.0.1 MASTER_PORT=$((20000 + RANDOM % 20000)) \
  DS_ACCELERATOR=cpu timeout 600 .venv/bin/python -c \
  "import deepspeed; deepspeed.init_distributed(dist_backend='gloo'); print('[warm] DeepSpeed CPU op ready')" 2>&1 \
  | grep -E '^\[warm\]|rror' || true
