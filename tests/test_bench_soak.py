"""bench/soak.py, briefly: a random rank SIGKILLed while the tiny config trains on 2 ranks, the job restarted, and
one table comparing every step's loss with an uninterrupted run of the same steps."""

from __future__ import annotations

import pytest

from tests.conftest import run_cli


@pytest.mark.slow
@pytest.mark.distributed
def test_soak_bench_kills_restarts_and_matches_the_uninterrupted_run(tiny_data):
    proc = run_cli(["bench.soak", "--duration", "12", "--kill-after", "3", "5", "--checkpoint-every", "5",
                    "--data", str(tiny_data)], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("| ")]
    assert lines[0].startswith("| duration | kills | steps | steps recomputed |")
    (row,) = [[cell.strip() for cell in ln.strip("|").split("|")] for ln in lines[2:]]
    assert int(row[1]) >= 1 and int(row[2]) % 5 == 0  # killed at least once; finished at a checkpoint
    assert row[5] == row[6] == "0"  # no step saw other data, none is missing
    assert "samples lost or duplicated: 0" in proc.stdout
