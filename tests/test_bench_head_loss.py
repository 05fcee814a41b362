"""bench/head_loss.py on tiny CPU sizes: one table of the fused decoder loss against the plain one, the gradients
within fp32 rounding of each other, and the fused path keeping less for backward (the plain path's log-softmax
alone is rows x vocab x 4 bytes)."""

from __future__ import annotations

import json

from bench.head_loss import main


def test_head_loss_bench_prints_one_table_of_fused_against_plain(tmp_path, capsys):
    out = tmp_path / "head.json"
    assert main(["--device", "cpu", "--rows", "256", "--hidden", "32", "--vocab", "2000", "--dtype", "fp32",
                 "--iters", "1", "--no-compile", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("| path | ms fwd+bwd | ratio vs plain |") == 1
    assert printed.count("\n| ") == 4  # header, rule, plain, fused
    rows = {r["path"]: r for r in json.loads(out.read_text())["table"]}
    assert set(rows) == {"plain", "fused"}
    assert rows["plain"]["ratio"] == 1.0 and rows["fused"]["ratio"] == rows["plain"]["ms"] / rows["fused"]["ms"]
    assert rows["fused"]["max_grad_diff"] < 1e-5
    assert abs(rows["fused"]["loss"] - rows["plain"]["loss"]) < 1e-5 * rows["plain"]["loss"]
    assert rows["plain"]["kept_bytes"] >= 256 * 2000 * 4 > 4 * rows["fused"]["kept_bytes"]
