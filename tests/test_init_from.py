"""model.init_from: continuing pretraining from a Hugging Face ModernBERT folder (a cloze export, or one written by
transformers itself), through the public CLI; and the folders it refuses, each with one error line and exit 2."""

from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch

from tests.conftest import run_cli
from tests.test_security import Payload

TINY = ["launch.train", "--config", "launch/configs/tiny.yaml", "--nproc", "2"]
MLM_ONLY = "objectives.mix={mlm: 1.0}"


def step_losses(run_dir) -> dict[int, float]:
    """Rank 0's per-step training loss from metrics.jsonl."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if isinstance(row.get("loss"), dict) and "mlm" in row["loss"]:
            out[row["step"]] = row["loss"]["mlm"]
    return out


@pytest.fixture(scope="module")
def export_with_head(tiny_data, tmp_path_factory):
    """A tiny run trained 3 steps (MLM only), exported with its head."""
    base = tmp_path_factory.mktemp("init_export")
    run_cli([*TINY, f"data.path={tiny_data}", f"out_dir={base / 'run'}", "train.max_steps=3", MLM_ONLY],
            check=True)
    run_cli(["launch.export", "--checkpoint", str(base / "run"), "--out", str(base / "export"), "--with-head",
             "--no-card"], check=True)
    return base


def first_batch_loss(folder, data, overrides: list[str]) -> float:
    """Rank 0's loss on the run's first micro-batch (step 0, micro 0, world 2), computed by cloze's own model
    loaded from folder outside any trainer: the rows, the objective and its mask generator as the trainer makes
    them."""
    from data.loader import build_loader
    from launch.config import load_config
    from launch.train.init_from import load_weights, read_init_source
    from launch.train.preflight import preflight
    from model.heads import EncoderForPretraining
    from objectives import build_objective, step_generator
    from objectives.batch import IGNORE_INDEX, TokenInfo

    cfg = load_config("launch/configs/tiny.yaml", [f"data.path={data}", *overrides])
    tok = preflight(cfg, 2).tokenizer
    d, t = cfg.data, cfg.train
    stream = build_loader([(d.path, 1.0)], seq_len=d.seq_len, batch_size=t.micro_batch_size, rank=0, world_size=2,
                          seed=t.seed, num_workers=d.num_workers, on_bad_data=d.on_bad_data,
                          read_stall_s=d.read_stall_s, read_timeout_s=d.read_timeout_s)
    rows, doc_ids = next(iter(stream))
    info = TokenInfo(vocab_size=tok.vocab_size, pad_id=tok.pad_id, cls_id=tok.cls_id, sep_id=tok.sep_id,
                     mask_id=tok.mask_id, special_ids=tuple(tok.special_ids), first_ordinary_id=tok.first_ordinary_id,
                     mode_ids=tuple(sorted(tok.mode_ids.items())), word_start=torch.as_tensor(tok.word_start))
    batch = build_objective("mlm", {}, mode_tokens=cfg.objectives.mode_tokens)(
        rows, doc_ids, step_generator(t.seed, 0, 0, 0), info)
    source = read_init_source(folder, {}, tok)
    model = EncoderForPretraining(source.encoder, attn_backend=t.attention_backend, head_loss=t.head_loss)
    load_weights(model, source)
    model.train()
    positions = (batch.labels.reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)
    with torch.no_grad():
        out = model(input_ids=batch.input_ids, labels=batch.labels, doc_ids=batch.doc_ids, attention=batch.attention,
                    prefix_len=batch.prefix_len, label_positions=positions)
    return float(out.loss)


@pytest.mark.distributed
@pytest.mark.slow
def test_init_from_a_cloze_export_starts_from_its_weights_and_head(export_with_head, tiny_data):
    base = export_with_head
    out = base / "continued"
    args = [*TINY, f"data.path={tiny_data}", f"out_dir={out}", "train.max_steps=3", MLM_ONLY]
    proc = run_cli([*args, f"model.init_from={base / 'export'}"], check=True)
    assert "head included" in proc.stderr, proc.stderr[-2000:]
    continued = step_losses(out)
    fresh = step_losses(base / "run")  # the same seed, data and masks from cloze's random init
    expected = first_batch_loss(base / "export", tiny_data, [MLM_ONLY])
    assert continued[1] == pytest.approx(expected, rel=1e-6, abs=1e-6)
    assert abs(continued[1] - fresh[1]) > 1e-3, "step 1 trained from the random init, not from the export"

    # Resuming takes precedence: launched again, the run finds its checkpoint and says the folder was not loaded.
    proc = run_cli([*args, f"model.init_from={base / 'export'}"], check=True)
    assert "ignored: resuming" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.distributed
@pytest.mark.slow
def test_init_from_a_folder_transformers_wrote_trains_and_exports(tiny_data, tmp_path):
    from transformers import ModernBertConfig, ModernBertForMaskedLM

    from data.hf_tokenizer import write_hf_tokenizer
    from data.manifest import load_manifest

    spm = load_manifest(tiny_data, check_files=False).tokenizer_path
    folder = tmp_path / "hf"
    torch.manual_seed(0)
    ModernBertForMaskedLM(ModernBertConfig(
        vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        global_attn_every_n_layers=2, local_attention=16, max_position_embeddings=256, pad_token_id=0,
        cls_token_id=2, sep_token_id=3, bos_token_id=2, eos_token_id=3,
    )).save_pretrained(folder)
    shutil.copy(spm, folder / "spm.model")
    write_hf_tokenizer(folder / "spm.model", folder, model_max_length=256)

    out = tmp_path / "run"
    plan = run_cli(["launch.train", "--config", "launch/configs/tiny.yaml", "--dry-run", f"data.path={tiny_data}",
                    f"out_dir={out}", f"model.init_from={folder}", "model.num_layers=3"], check=True)
    assert "3 layers" in plan.stdout and "local" in plan.stdout, plan.stdout[-2000:]
    # tiny.yaml's model keys must agree with the folder: its num_layers is overridden to the folder's 3.
    proc = run_cli([*TINY, f"data.path={tiny_data}", f"out_dir={out}", "train.max_steps=3", "model.num_layers=3",
                    f"model.init_from={folder}"], check=True)
    assert "head included" in proc.stderr and "3 layers" in proc.stderr, proc.stderr[-2000:]
    # launch.export verifies the folder it writes against the checkpoint (weights and outputs) before returning.
    run_cli(["launch.export", "--checkpoint", str(out), "--out", str(tmp_path / "export"), "--with-head",
             "--no-card"], check=True)
    written = json.loads((tmp_path / "export" / "config.json").read_text())
    assert written["num_hidden_layers"] == 3 and written["local_attention"] == 16
    assert written["layer_types"] == ["full_attention", "sliding_attention", "full_attention"]


def error_lines(proc) -> list[str]:
    return [ln for ln in proc.stderr.splitlines() if ln.startswith("error")]


@pytest.mark.distributed
def test_init_from_refuses_bad_folders_before_ranks_start(export_with_head, tiny_data, tmp_path):
    export = export_with_head / "export"
    marker = tmp_path / "PWNED"
    pickled = tmp_path / "pickled"
    shutil.copytree(export, pickled)
    (pickled / "model.safetensors").unlink()
    (pickled / "pytorch_model.bin").write_bytes(pickle.dumps({"model.embeddings.tok_embeddings.weight":
                                                              Payload(marker)}))
    foreign = tmp_path / "foreign"
    shutil.copytree(export, foreign)
    config = json.loads((foreign / "config.json").read_text())
    (foreign / "config.json").write_text(json.dumps({**config, "vocab_size": 1200, "pad_token_id": 1}))
    cases = {
        "shape": (export, ["model.hidden_size=128", "model.num_layers=4"],
                  ["model.hidden_size=128", "hidden_size=64", "model.num_layers=4", "num_layers=2"]),
        "tokenizer": (foreign, [], ["vocab_size", "1200", "[PAD] id", "has 1"]),
        "pickle": (pickled, [], ["pytorch_model.bin", "pickle", "safetensors"]),
        "missing": (tmp_path / "nowhere", [], ["model.init_from", "not found"]),
    }
    for name, (folder, extra, needles) in cases.items():
        proc = run_cli([*TINY, f"data.path={tiny_data}", f"out_dir={tmp_path / name}", MLM_ONLY, *extra,
                        f"model.init_from={folder}"])
        assert proc.returncode == 2, (name, proc.stderr[-2000:])
        assert len(error_lines(proc)) == 1 and "Traceback" not in proc.stderr, (name, proc.stderr[-2000:])
        message = proc.stderr[proc.stderr.index("error"):]
        assert all(n in message for n in needles), (name, message)
        assert "[cloze] world" not in proc.stderr, f"{name}: ranks started"  # the trainer's first log line
        assert not (tmp_path / name / "checkpoints").exists()
    assert not marker.exists(), "the payload ran"


def _tokenizer(data):
    from data.manifest import load_manifest
    from data.tokenizer import Tokenizer

    return Tokenizer(load_manifest(data, check_files=False).tokenizer_path)


def _rewrite(src, dst, change) -> None:
    """Copy the folder src to dst with its weights passed through change(dict) -> dict."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    save_file(change(load_file(str(src / "model.safetensors"))), str(dst / "model.safetensors"))


@pytest.mark.distributed  # its fixture trains with 2 ranks; the checks themselves run in this process
def test_init_from_weights_are_checked_against_the_config_shape(export_with_head, tiny_data, tmp_path):
    from safetensors.torch import load_file

    from launch.config import ConfigError
    from launch.train.init_from import load_weights, read_init_source
    from model.heads import EncoderForPretraining

    export, tok = export_with_head / "export", _tokenizer(tiny_data)
    emb = "model.embeddings.tok_embeddings.weight"

    # A ModernBertModel folder (no "model." prefix, no head): the encoder loads, the head keeps cloze's init.
    _rewrite(export, tmp_path / "bare", lambda sd: {k.removeprefix("model."): v for k, v in sd.items()
                                                    if k.startswith("model.")})
    source = read_init_source(tmp_path / "bare", {}, tok)
    assert not source.with_head
    torch.manual_seed(0)
    model = EncoderForPretraining(source.encoder)
    head_before = model.head.dense.weight.detach().clone()
    load_weights(model, source)
    weights = load_file(str(export / "model.safetensors"))
    assert torch.equal(model.encoder.embeddings.tok_embeddings.weight, weights[emb])
    assert torch.equal(model.head.dense.weight, head_before)
    assert not torch.equal(head_before, weights["head.dense.weight"])

    # Missing, unexpected and wrongly shaped weights: one error listing each kind.
    def damage(sd):
        sd = dict(sd)
        del sd[emb]
        sd["model.extra.weight"] = torch.zeros(4)
        sd["model.final_norm.weight"] = torch.ones(65)
        return sd

    _rewrite(export, tmp_path / "damaged", damage)
    with pytest.raises(ConfigError) as e:
        read_init_source(tmp_path / "damaged", {}, tok)
    text = str(e.value)
    assert f"missing weights (1): '{emb}'" in text and "unexpected weights (1): 'model.extra.weight'" in text
    assert "model.final_norm.weight [65] (config.json implies [64])" in text

    # Another SentencePiece model in the folder: named, even where the ids agree.
    _rewrite(export, tmp_path / "other_spm", dict)
    (tmp_path / "other_spm" / "spm.model").write_bytes(b"another model")
    with pytest.raises(ConfigError, match="spm.model is not the data's tokenizer"):
        read_init_source(tmp_path / "other_spm", {}, tok)

    # Weights far larger than the declared shape can take are refused before any header is read.
    _rewrite(export, tmp_path / "large", lambda sd: {**sd, "model.extra.weight": torch.zeros(1 << 20)})
    with pytest.raises(ConfigError, match="more than the .* parameters its config.json declares"):
        read_init_source(tmp_path / "large", {}, tok)
