"""bench/zero_memory.py at world size 2: one table of the model-state bytes a live DeepSpeed engine holds per rank
under ZeRO 1, 2 and 3 against the formula `--dry-run` uses."""

from __future__ import annotations

import pytest

from tests.conftest import run_cli


@pytest.mark.slow
@pytest.mark.distributed
def test_zero_memory_bench_prints_one_table_of_measured_against_the_formula():
    proc = run_cli(["bench.zero_memory", "--worlds", "2", "--hidden", "64", "--layers", "2", "--vocab", "500"],
                   timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("| ")]
    assert lines[0].startswith("| stage | world | params | weights measured | weights formula |")
    rows = [[cell.strip() for cell in ln.strip("|").split("|")] for ln in lines[2:]]
    assert [r[:2] for r in rows] == [["1", "2"], ["2", "2"], ["3", "2"]]
    for r in rows:  # the optimizer state each rank owns is the formula's half of it
        assert r[7] == "1.00", r
    assert rows[2][3] != rows[0][3]  # ZeRO-3 partitions the weights too
