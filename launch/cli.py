"""Shared CLI behaviour: a user mistake is one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable

from launch.config import ConfigError

USER_ERRORS = (ConfigError, ValueError, FileNotFoundError, NotADirectoryError, PermissionError)

PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator was aborted",
             "Socket Timeout", "recvBytes", "sendBytes")
"""Signs, in a collective's error, that another rank has left the job (its own error is the one that matters)."""


def _exit_code(code: int) -> int:
    """Under `launch.train --nproc`, torchrun reports any failing rank as exit 1; the rank leaves its own code in
    CLOZE_EXIT_FILE so the parent can return it (2: a user mistake, 3: halted)."""
    path = os.environ.get("CLOZE_EXIT_FILE")
    if path:
        try:
            with open(path, "a") as f:
                f.write(f"{code}\n")
        except OSError:
            pass
    return code


def run_cli(main: Callable[[], int]) -> int:
    try:
        return main()
    except USER_ERRORS as e:
        if os.environ.get("CLOZE_DEBUG"):
            raise
        text = str(e)
        rank = os.environ.get("RANK")
        prefix = f"error (rank {rank}): " if rank not in (None, "0") else "error: "
        print(prefix + text, file=sys.stderr, flush=True)
        return _exit_code(2)
    except RuntimeError as e:
        if os.environ.get("CLOZE_DEBUG"):
            raise
        if type(e).__name__ == "TrainingHalted":
            print(f"error: training halted: {e}", file=sys.stderr, flush=True)
            return _exit_code(3)
        text = str(e)
        if "RANK" in os.environ and any(sign in text for sign in PEER_GONE):
            # A collective failed because a peer died or exited: say so in one line, not with a traceback that
            # would hide the peer's own error (printed above by that rank).
            first = re.sub(r"^\[[^\]]*\]\s*", "", text.strip().splitlines()[0]).split(". ")[0][:160]
            print(f"error (rank {os.environ['RANK']}): another rank left the job while this one waited in a "
                  f"collective ({first}); that rank's own message above says why", file=sys.stderr, flush=True)
            return _exit_code(1)
        raise
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
