"""`launch.train --nproc N` starts its ranks through this wrapper around torchrun.

It runs torchrun's own launcher (`torch.distributed.run.run`), but when a rank fails it prints one line per failed
rank instead of torchrun's traceback and error box: the rank has already printed its own one-line error, and a
traceback of the launcher would bury it. CLOZE_DEBUG=1 keeps torchrun's full report.
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(argv))
    except ChildFailedError as e:
        if os.environ.get("CLOZE_DEBUG"):
            raise
        for rank, failure in sorted(e.failures.items()):
            how = f"signal {failure.signal_name()}" if failure.exitcode < 0 else f"exit code {failure.exitcode}"
            print(f"[cloze] rank {rank} stopped ({how}); its own message is above", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
