"""bench/gpu_speed.py on the CPU: every row of `--tiny` end to end (the real trainer in a subprocess, the real
transformers peers), and the numbers in its JSON checked against each other and against the trainer's own logs."""

from __future__ import annotations

import json
import math

import pytest
import torch

from bench.gpu_speed import GPU_VARIANTS, first_step_with_every_objective, main, row_order
from bench.gpu_speed_peers import PEER_NAMES, Specials, bert_flops_per_token, masked_batch, peer_flops_per_token
from bench.gpu_speed_report import table
from bench.gpu_speed_shapes import FULL_SHAPES, MIX, TINY_SHAPES, SpeedConfig
from model.config import EncoderConfig
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("speed")
    data, out = tmp / "data", tmp / "speed.json"
    # No manifest in `data` yet: the run prepares it first, as it would on a GPU machine without the carried data.
    proc = run_cli(["bench.gpu_speed", "--tiny", "--device", "cpu", "--data", str(data), "--out", str(out)],
                   timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"proc": proc, "result": json.loads(out.read_text()), "data": data}


def test_the_run_prepares_missing_data_and_prepare_only_reports_it(tiny, capsys):
    info = tiny["result"]["data"]
    assert info["prepared_here"] and info["vocab_size"] == 1000 and info["shards"] >= 2 and info["tokens"] > 50_000
    assert info["prepare_s"] > 0 and (tiny["data"] / "manifest.json").is_file()
    assert main(["--prepare-only", "--tiny", "--device", "cpu", "--data", str(tiny["data"])]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["prepared_here"] is False and again["tokens"] == info["tokens"]  # found and reused, not rebuilt


def test_every_row_ran_with_finite_numbers(tiny):
    rows = tiny["result"]["rows"]
    want = {(system, s.name) for s in TINY_SHAPES.values() for system in ("cloze", PEER_NAMES[s.peer])}
    assert {(r["system"], r["shape"]) for r in rows} == want and len(rows) == len(want)
    for r in rows:
        assert "error" not in r, r
        for key in ("tokens_per_s", "mfu", "flops_per_token", "labelled_fraction", "ratio_to_peer"):
            assert math.isfinite(r[key]) and r[key] > 0, (r["system"], r["shape"], key, r[key])
        assert r["peak_memory_gib"] is None  # CPU: not measured, and the table says so
        assert r["tokens_per_step"] == r["micro_batch"] * r["grad_accum"] * r["seq_len"]
    peak = tiny["result"]["matmul_peak"]
    assert peak["source"] == "measured" and peak["used_tflops"] == peak["measured_tflops"] > 0
    assert tiny["result"]["machine"]["torch"] == torch.__version__


def test_ratio_mfu_and_verdict_follow_from_the_numbers(tiny):
    result = tiny["result"]
    peak = result["matmul_peak"]["used_tflops"] * 1e12
    by = {(r["shape"], r["system"] == "cloze"): r for r in result["rows"]}
    for shape in TINY_SHAPES.values():
        cloze, peer = by[(shape.name, True)], by[(shape.name, False)]
        assert cloze["ratio_to_peer"] == pytest.approx(cloze["tokens_per_s"] / peer["tokens_per_s"], rel=1e-12)
        assert peer["ratio_to_peer"] == 1.0
        # peers: whole rows, every attention pair useful; cloze: the trainer's own per-micro-batch count, which
        # leaves out pairs across packed documents, so it lies below the full-square count of flops_per_token
        assert peer["mfu"] == pytest.approx(peer["tokens_per_s"] * peer["flops_per_token"] / peak, rel=1e-12)
        assert cloze["mfu"] == pytest.approx(cloze["useful_tflops"] * 1e12 / peak, rel=1e-12)
        assert 0.5 < cloze["useful_tflops"] * 1e12 / (cloze["tokens_per_s"] * cloze["flops_per_token"]) <= 1.0 + 1e-6
        checks = cloze["checks"]
        assert checks["ratio"] == (cloze["ratio_to_peer"] >= shape.target_ratio)
        assert checks["mfu"] == (cloze["mfu"] >= 0.5)
        assert ("tokens_per_s" in checks) == bool(shape.target_tokens_per_s)
        assert cloze["met"] == all(checks.values())


def test_cloze_rate_is_the_trainers_own_windows_after_warmup(tiny):
    for r in (r for r in tiny["result"]["rows"] if r["system"] == "cloze"):
        # The warm-up lasts until every objective has run and spans whole log windows.
        assert r["warmup"] >= first_step_with_every_objective(r["config"]["train"]["seed"], r["grad_accum"])
        assert r["warmup"] % 2 == 0 and r["steps"] % 2 == 0
        assert all(c["batches"] > 0 for c in r["objectives"].values()) and set(r["objectives"]) == set(MIX)
        timed = [w for w in r["windows"] if w["step"] > r["warmup"]]
        assert len(timed) == r["steps"] // 2
        harmonic = len(timed) / sum(1 / w["tokens_per_s"] for w in timed)
        assert r["tokens_per_s"] == pytest.approx(harmonic, rel=1e-9)
        for w in r["windows"]:
            # TensorBoard keeps float32, the progress line prints 0.1k: they must agree to that rounding.
            assert abs(w["tokens_per_s"] - w["progress_line"]) <= 50 + 1e-3 * w["tokens_per_s"], w
        enc = EncoderConfig(vocab_size=1000, hidden_size=64, num_layers=r["config"]["model"]["num_layers"],
                            num_heads=4, intermediate_size=r["config"]["model"]["intermediate_size"])
        assert r["flops_per_token"] == pytest.approx(enc.flops_per_token(r["seq_len"], r["labelled_fraction"]))
        # mix 0.8 / 0.1 / 0.1 at 15% / 15% / ~100% labels: the share lies between MLM's and the expected 0.235
        assert 0.12 < r["labelled_fraction"] < 0.5
        assert r["config"]["train"]["zero_stage"] == 2 and r["config"]["objectives"]["mix"] == MIX


def test_one_table_is_printed(tiny):
    out = tiny["proc"].stdout
    assert out.count("| system | shape | tokens/s | MFU |") == 1
    assert sum(line.startswith("| cloze |") for line in out.splitlines()) == len(TINY_SHAPES)
    assert "n/a (CPU)" in out and "measured float32" in out


def test_rows_past_the_budget_are_skipped_and_recorded(tiny, tmp_path, capsys):
    out = tmp_path / "s.json"
    assert main(["--tiny", "--device", "cpu", "--data", str(tiny["data"]), "--out", str(out), "--shapes",
                 "tiny-bert-64", "--budget-s", "0.001", "--work", str(tmp_path / "work")]) == 1
    assert "rows without a result" in capsys.readouterr().err
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 2 and all(r["error"].startswith("skipped:") for r in rows)


def test_peer_masking_is_15_percent_with_80_10_10():
    specials = Specials(pad_id=0, cls_id=2, sep_id=3, mask_id=4, first_ordinary_id=9)
    gen = torch.Generator().manual_seed(0)
    inputs, labels = masked_batch(gen, 200, 1000, 1000, specials, torch.device("cpu"))
    labelled = labels != -100
    n = labelled.sum().item()
    # 200k positions: the labelled share has std sqrt(.15 * .85 / 2e5) = 0.0008; 0.005 is > 6 std.
    assert abs(n / labels.numel() - 0.15) < 0.005
    masked = (inputs[labelled] == 4).float().mean().item()
    kept = (inputs[labelled] == labels[labelled]).float().mean().item()
    # ~30k labels: std of the 80% share is 0.0023, of the 10% shares 0.0017; tolerances are > 5 std. A random
    # replacement equals the original with probability 1/991, which moves "kept" by 0.0001 only.
    assert abs(masked - 0.8) < 0.012 and abs(kept - 0.1) < 0.009
    assert bool((inputs[~labelled] >= 9).all()) and bool(((inputs >= 9) | (inputs == 4)).all())


def test_flop_counts():
    bert = FULL_SHAPES["bert-512"]
    # 6 * 12 * (4 * 768^2 + 2 * 768 * 3072) + 12 * 12 * 512 * 768 + 6 * 0.15 * (768^2 + 768 * 32768)
    assert bert_flops_per_token(12, 768, 3072, 32768, 512, 0.15) == pytest.approx(
        6 * 12 * (4 * 768**2 + 2 * 768 * 3072) + 12 * 12 * 512 * 768 + 6 * 0.15 * (768**2 + 768 * 32768))
    # GeGLU 2048 has the parameters (and FLOPs) of BERT's 3072 MLP
    assert 3 * bert.hidden * bert.intermediate == 2 * bert.hidden * bert.peer_intermediate
    # ModernBERT has cloze's layer layout: the same count, with the peer's labelled share
    mb = FULL_SHAPES["modernbert-1024"]
    enc = EncoderConfig(vocab_size=32768, hidden_size=768, num_layers=22, num_heads=12, intermediate_size=1152)
    assert peer_flops_per_token("modernbert", mb, 32768, 0.15) == enc.flops_per_token(1024, 0.15)


def test_each_shapes_comparison_runs_before_any_other_lever_row_and_the_table_groups_by_shape():
    """A budget that runs out skips lever rows before a shape's first variant and peer (one device call)."""
    shapes = list(FULL_SHAPES.values())
    cfg = SpeedConfig(out=None, shapes=shapes, data=None, device="cpu", tiny=False, tokens_per_step=65536, steps=1,
                      warmup=0, log_every=1, workers=0, peak_tflops=0, systems=["cloze", "peer"], budget_s=1,
                      work=None, variants=dict(GPU_VARIANTS))
    first, second = GPU_VARIANTS
    order = [(shape.name, system) for shape, system in row_order(cfg)]
    assert order == [(s.name, x) for s in shapes for x in (first, "peer")] + [(s.name, second) for s in shapes]
    assert row_order(SpeedConfig(**{**cfg.__dict__, "systems": ["peer"]})) == [(s, "peer") for s in shapes]
    rows = [{"system": x if x.startswith("cloze") else PEER_NAMES[FULL_SHAPES[n].peer], "shape": n,
             "error": "skipped: test"} for n, x in order]
    printed = table({"rows": rows, "matmul_peak": {"used_tflops": 1, "source": "x", "dtype": "bf16", "n": 1,
                                                    "measured_tflops": 1},
                     "machine": {"device_name": "d", "torch": "t", "transformers": "t"}}, FULL_SHAPES)
    lines = [ln.split(" | ")[:2] for ln in printed.splitlines()[2:] if ln.startswith("| ")]
    assert lines == [[f"| {x if x.startswith('cloze') else PEER_NAMES[s.peer]}", s.name]
                     for s in shapes for x in (first, second, "peer")]


def test_user_mistakes_are_one_line_errors(capsys):
    with pytest.raises(ValueError, match="not a multiple of the sequence length"):
        SpeedConfig(out=None, shapes=[TINY_SHAPES["tiny-modernbert-128"]], data=None, device="cpu", tiny=True,
                    tokens_per_step=100, steps=1, warmup=0, log_every=1, workers=0, peak_tflops=0, systems=["peer"],
                    budget_s=1, work=None)
    assert main(["--tiny", "--shapes", "bert-512", "--out", "x.json", "--device", "cpu"]) == 2
    assert "unknown ['bert-512'] for --tiny" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["--device", "cuda", "--out", "x.json"]) == 2
        assert "torch sees no GPU" in capsys.readouterr().err


def test_a_cloze_variant_row_carries_its_overrides(tiny, tmp_path):
    out = tmp_path / "v.json"
    assert main(["--tiny", "--device", "cpu", "--data", str(tiny["data"]), "--out", str(out), "--shapes",
                 "tiny-bert-64", "--systems", "cloze", "--cloze-variant", "cloze+auto=train.attention_backend=auto",
                 "--work", str(tmp_path / "work")]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["system"] == "cloze+auto" and row["command"].endswith("train.attention_backend=auto")
    assert row["tokens_per_s"] > 0 and row["mfu"] > 0
    with pytest.raises(ValueError, match="must start with 'cloze'"):
        SpeedConfig(out=None, shapes=[TINY_SHAPES["tiny-bert-64"]], data=None, device="cpu", tiny=True,
                    tokens_per_step=512, steps=1, warmup=0, log_every=1, workers=0, peak_tflops=0, systems=["cloze"],
                    budget_s=1, work=None, variants={"fast": []})


def test_head_loss_bench_runs_and_its_rows_agree(tmp_path, capsys):
    """bench/head_loss.py on tiny CPU sizes: one table, every path's gradients within fp32 rounding of the plain
    path's, and the fused path keeping less for backward than the plain one (whose log-softmax alone is rows x
    vocab x 4 bytes)."""
    from bench.head_loss import main as head_loss_main

    out = tmp_path / "head.json"
    assert head_loss_main(["--device", "cpu", "--rows", "256", "--hidden", "32", "--vocab", "2000", "--dtype",
                           "fp32", "--iters", "1", "--no-compile", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("\n| ") == 4  # header, rule, plain, fused
    rows = {r["path"]: r for r in json.loads(out.read_text())["table"]}
    assert set(rows) == {"plain", "fused"}
    assert rows["plain"]["ratio"] == 1.0 and rows["fused"]["ratio"] > 0
    assert rows["fused"]["max_grad_diff"] < 1e-5
    assert abs(rows["fused"]["loss"] - rows["plain"]["loss"]) < 1e-5 * rows["plain"]["loss"]
    assert rows["plain"]["kept_bytes"] >= 256 * 2000 * 4 > 4 * rows["fused"]["kept_bytes"]
