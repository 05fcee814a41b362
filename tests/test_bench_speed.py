"""bench/gpu_speed.py on the CPU: a tiny shape end to end (the real trainer in a subprocess, the real transformers
peer), one table, and the numbers in its JSON checked against each other."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from bench.gpu_speed import SHAPES, main, masked_batch, peer_flops_per_token
from data.tokenizer import Tokenizer
from model.config import EncoderConfig
from objectives.mixer import Mixer
from tests.conftest import ROOT, run_cli


@pytest.fixture(scope="module")
def tiny(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("speed") / "speed.json"
    proc = run_cli(["bench.gpu_speed", "--tiny", "--device", "cpu", "--data", str(tiny_data), "--shapes",
                    "tiny-bert-64", "--variant", "cloze+auto=train.attention_backend=auto", "--out", str(out)],
                   timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


@pytest.mark.slow
def test_one_table_of_cloze_against_its_peer(tiny):
    printed, result = tiny
    assert printed.count("| system | shape | tokens/s | MFU | peak memory | vs peer |") == 1
    rows = {r["system"]: r for r in result["rows"]}
    assert list(rows) == ["cloze", "cloze+auto", "BertForMaskedLM"]
    peer = rows["BertForMaskedLM"]
    assert peer["vs_peer"] == 1.0
    for r in rows.values():
        assert r["shape"] == "tiny-bert-64" and r["tokens_per_s"] > 0 and r["peak_memory_gib"] is None
        assert r["vs_peer"] == pytest.approx(r["tokens_per_s"] / peer["tokens_per_s"], rel=1e-12)
        assert r["mfu"] == pytest.approx(r["useful_tflops"] / result["matmul_peak_tflops"], rel=1e-12)
        assert f"| {r['system']} | tiny-bert-64 | {r['tokens_per_s'] / 1e3:,.1f}k |" in printed
    # cloze's rate comes from its log windows after the warm-up: 4 timed steps in windows of 2
    assert rows["cloze"]["windows"] == 2 and rows["cloze+auto"]["command"].endswith("train.attention_backend=auto")
    # The trainer's own count (pairs within documents, the head on the labelled positions of whichever objectives
    # ran) stays near the whole-row count at the mix's mean labelled share.
    enc = EncoderConfig(vocab_size=1000, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128)
    full = rows["cloze"]["tokens_per_s"] * enc.flops_per_token(64, 0.235) / 1e12
    assert 0.5 < rows["cloze"]["useful_tflops"] / full < 1.5
    assert "n/a (CPU)" in printed and "512 tokens per step" in printed


def test_the_default_seed_runs_every_objective_inside_the_warmup():
    """The cloze rows time only windows after the warm-up (2 steps tiny, 10 full): every objective has run (and on
    a GPU compiled its own shapes) by then."""
    mix = yaml.safe_load((ROOT / "launch/configs/tiny.yaml").read_text())["objectives"]["mix"]
    mixer = Mixer(mix, seed=26)
    assert {mixer.choose(step) for step in range(4)} == set(mix)


def test_peer_masking_is_15_percent_with_80_10_10(tiny_data):
    tok = Tokenizer(tiny_data / "tokenizer" / "spm.model")
    inputs, labels = masked_batch(torch.Generator().manual_seed(0), 200, 1000, 1000, tok, torch.device("cpu"))
    labelled = labels != -100
    # 200k positions: the labelled share has std 0.0008; 0.005 is > 6 std.
    assert abs(labelled.float().mean().item() - 0.15) < 0.005
    # ~30k labels: std of the 80% share 0.0023, of the 10% shares 0.0017; the tolerances are > 5 std.
    assert abs((inputs[labelled] == tok.mask_id).float().mean().item() - 0.8) < 0.012
    assert abs((inputs[labelled] == labels[labelled]).float().mean().item() - 0.1) < 0.009
    assert bool((inputs[~labelled] >= tok.first_ordinary_id).all())


def test_peer_flop_counts():
    bert = SHAPES["bert-512"]
    want = 6 * 12 * (4 * 768**2 + 2 * 768 * 3072) + 12 * 12 * 512 * 768 + 6 * 0.15 * (768**2 + 768 * 32768)
    assert peer_flops_per_token(bert, 32768, 0.15) == pytest.approx(want)
    assert 3 * bert.hidden * bert.intermediate == 2 * bert.hidden * bert.peer_intermediate  # same MLP parameters
    mb = SHAPES["modernbert-1024"]  # ModernBERT has cloze's layer layout: cloze's own count
    enc = EncoderConfig(vocab_size=32768, hidden_size=768, num_layers=22, num_heads=12, intermediate_size=1152)
    assert peer_flops_per_token(mb, 32768, 0.15) == enc.flops_per_token(1024, 0.15)


@pytest.mark.parametrize("args, message", [
    (["--tiny", "--shapes", "bert-512"], "--shapes: unknown ['bert-512'] with --tiny"),
    (["--tiny", "--steps", "3"], "multiples of --log-every 2"),
    (["--tiny", "--variant", "fast=train.compile=true"], "--variant 'fast=train.compile=true': expected"),
    (["--tiny", "--tokens-per-step", "100"], "is not a multiple of seq_len"),
])
def test_user_mistakes_are_one_line_errors(args, message, tmp_path, capsys):
    assert main(["--device", "cpu", "--data", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_a_folder_without_a_manifest_is_one_line_error(tmp_path, capsys):
    assert main(["--tiny", "--device", "cpu", "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "manifest.json not found; run `python -m launch.prepare" in err and err.count("\n") == 1
