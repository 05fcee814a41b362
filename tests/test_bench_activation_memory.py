"""bench/activation_memory.py on tiny CPU sizes: one table of the measured activation bytes against the formula
`--dry-run` uses, without and with checkpointing."""

from __future__ import annotations

from bench.activation_memory import main


def test_activation_memory_bench_prints_one_table_of_measured_against_the_formula(capsys):
    assert main(["--seqs", "64", "--hidden", "32", "--heads", "2", "--layers", "2", "--vocab", "500",
                 "--every", "1"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| ")]
    assert lines[0].startswith("| seq | checkpointing | held formula | held measured | ratio |")
    rows = [[cell.strip() for cell in ln.strip("|").split("|")] for ln in lines[2:]]
    assert [r[:2] for r in rows] == [["64", "none"], ["64", "full"]]
    for r in rows:  # measured / formula for the bytes held after the forward
        assert 0.97 < float(r[4]) < 1.03, r
    assert float(rows[1][7].removesuffix("x")) > 1.0  # checkpointing keeps less
