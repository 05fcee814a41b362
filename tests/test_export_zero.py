"""Export from real 2-rank DeepSpeed checkpoints of ZeRO stages 0, 1, 2 and 3, trained in fp32 and in bf16.

The reference is not export's own consolidation: a separate 2-rank job (this file, run as a module under torchrun)
rebuilds each engine the way the trainer does, restores the checkpoint with DeepSpeed's `engine.load_checkpoint`
and reads every fp32 master weight with DeepSpeed's `safe_get_full_fp32_param` (the optimizer's own copies for
stage 0 in bf16). cloze's EncoderForPretraining on those weights is "cloze's model" below.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import run_cli

pytestmark = pytest.mark.distributed

CONFIG = "launch/configs/tiny.yaml"
RUNS = {"z0-bf16": (0, "bf16"), "z1-fp32": (1, "fp32"), "z2-bf16": (2, "bf16"), "z3-fp32": (3, "fp32")}
"""Run name -> (ZeRO stage, training precision): every stage, both precisions, each path of the consolidation."""
STEPS = 10
ATOL = {"fp32": 1e-4, "bf16": 2e-2}
"""The issue's bounds. fp32: both sides run the same ops in fp32 (observed ~5e-7). bf16: both sides run in bf16 on
the same bf16-rounded weights and differ by one rounding of a value (observed <= 1.6e-2 for |h| < 4)."""
TEXTS = ["def add(a, b):\n    return a + b\n", "import os\nprint(os.getcwd())  # where\n",
         "Café 東京 🙂   spaces\tand tabs", "class Foo(object):\n    pass\n"]


def train_overrides(out: Path, data: Path, stage: int, precision: str) -> list[str]:
    return [f"out_dir={out}", f"data.path={data}", f"train.zero_stage={stage}", f"train.precision={precision}",
            f"train.max_steps={STEPS}", "train.log_every=2", "train.warmup_steps=1", f"eval.path={data}",
            "eval.every=5", "eval.batches=1"]


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("zero")
    for name, (stage, precision) in RUNS.items():
        run_cli(["launch.train", "--config", CONFIG, "--nproc", "2",
                 *train_overrides(root / name, tiny_data, stage, precision)], check=True)
    return {name: root / name for name in RUNS}


@pytest.fixture(scope="module")
def masters(runs, tiny_data, tmp_path_factory) -> dict[str, dict[str, torch.Tensor]]:
    """Run name -> the fp32 master weights DeepSpeed restores from the checkpoint (EncoderForPretraining keys)."""
    from launch.train.dist import free_port

    out = tmp_path_factory.mktemp("masters")
    # one positional JSON argument: torchrun would take abbreviated options after the module name as its own
    spec = {"data": str(tiny_data), "out": str(out), "runs": {name: str(runs[name]) for name in RUNS}}
    (out / "spec.json").write_text(json.dumps(spec))
    run_cli(["torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
             "--master_port", str(free_port()), "-m", "tests.test_export_zero", str(out / "spec.json")], check=True)
    weights = {name: load_file(out / f"{name}.safetensors") for name in RUNS}
    for w in weights.values():
        w["head.decoder.weight"] = w["encoder.embeddings.tok_embeddings.weight"]  # tied (saved once)
    return weights


@pytest.fixture(scope="module")
def exports(runs, tmp_path_factory) -> dict[tuple[str, str, bool], Path]:
    """(run, dtype, with_head) -> export folder. One fp32 encoder-only export goes through the CLI; the others call
    the same function in-process (it verifies against transformers too), which saves an interpreter start each."""
    from launch.export.main import export

    root = tmp_path_factory.mktemp("exports")
    made = {}
    for i, name in enumerate(RUNS):
        out = root / f"{name}-fp32"
        if i == 0:
            proc = run_cli(["launch.export", "--checkpoint", str(runs[name]), "--out", str(out)], check=True)
            assert "verified" in proc.stderr, proc.stderr
        else:
            export(runs[name], out)
        made[(name, "fp32", False)] = out
        made[(name, "bf16", False)] = export(runs[name], root / f"{name}-bf16", dtype="bf16")
        made[(name, "fp32", True)] = export(runs[name], root / f"{name}-head", with_head=True, card=False)
    return made


def cloze_model(weights: dict[str, torch.Tensor], run: Path, dtype=torch.float32):
    from model.config import EncoderConfig
    from model.heads import EncoderForPretraining

    tag = (run / "checkpoints" / "latest").read_text().strip()
    info = json.loads((run / "checkpoints" / tag / "run.json").read_text())
    model = EncoderForPretraining(EncoderConfig.from_dict(info["encoder"]))
    model.load_state_dict(weights, strict=True)
    return model.to(dtype).eval()


@pytest.mark.parametrize("name", RUNS)
def test_exported_weights_equal_deepspeed_masters(name, masters, exports):
    from model.hf import from_hf_state_dict

    exported = from_hf_state_dict(load_file(exports[(name, "fp32", False)] / "model.safetensors"), with_head=False)
    want = {k: v for k, v in masters[name].items() if k.startswith("encoder.")}
    assert exported.keys() == want.keys()
    for k in want:
        assert exported[k].dtype == torch.float32
        assert torch.equal(exported[k], want[k]), k  # consolidation copies fp32 masters: bit for bit
    head = from_hf_state_dict(load_file(exports[(name, "fp32", True)] / "model.safetensors"), with_head=True)
    assert all(torch.equal(head[k], masters[name][k]) for k in masters[name]), "with-head export differs"


@pytest.mark.parametrize("name", RUNS)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_hidden_states_equal_cloze(name, dtype, masters, exports, runs):
    from transformers import AutoModel, AutoTokenizer

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    path = exports[(name, dtype, False)]
    hf, info = AutoModel.from_pretrained(path, output_loading_info=True, dtype=torch_dtype)
    assert not any(info.values()), info
    assert type(hf).__name__ == "ModernBertModel" and hf.dtype == torch_dtype
    ours = cloze_model(masters[name], runs[name], torch_dtype)
    tok = AutoTokenizer.from_pretrained(path)
    batch = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        theirs = hf.eval()(**batch).last_hidden_state.float()
        worst = 0.0
        for i in range(len(TEXTS)):
            n = int(batch["attention_mask"][i].sum())  # padded rows: compare the real tokens only
            mine = ours.encoder(batch["input_ids"][i : i + 1, :n])[0].float()
            worst = max(worst, (theirs[i, :n] - mine).abs().max().item())
    print(f"{name} {dtype}: max |hidden export - cloze| = {worst:.2e}")
    assert worst <= ATOL[dtype], (name, dtype, worst)


@pytest.mark.parametrize("name", RUNS)
def test_fill_mask_predicts_clozes_top_tokens(name, masters, exports, runs):
    from transformers import pipeline

    path = exports[(name, "fp32", True)]
    fill = pipeline("fill-mask", model=str(path), top_k=5, device="cpu")
    ours = cloze_model(masters[name], runs[name])
    for text in ("def add(a, b):\n    return a [MASK] b\n", "import [MASK]\n", "for x in [MASK](10):\n"):
        got = [p["token"] for p in fill(text)]
        ids = fill.tokenizer(text, return_tensors="pt")["input_ids"]
        pos = (ids[0] == fill.tokenizer.mask_token_id).nonzero().item()
        with torch.no_grad():
            logits = ours.logits_for(ids)[0, pos]
        want = logits.topk(5).indices.tolist()
        # A near-tie among the top 5 could swap order by float noise (~1e-6); require clear gaps for order.
        gaps = (logits[want[:-1]] - logits[want[1:]]).abs()
        if bool((gaps > 1e-4).all()):
            assert got == want, (text, got, want)
        else:
            assert got[0] == want[0] and set(got) == set(want), (text, got, want)


def test_sharded_export_equals_single_file(runs, exports, tmp_path):
    from transformers import AutoModel

    from launch.export.main import export

    name = "z3-fp32"
    out = export(runs[name], tmp_path / "sharded", max_shard_size="60KB", card=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 3 and all(re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", f) for f in files), files
    assert not (out / "model.safetensors").exists()
    # every shard but those holding one oversized tensor stays under the limit
    for f in files:
        tensors = load_file(out / f)
        assert len(tensors) == 1 or (out / f).stat().st_size <= 60_000 + 4096, f
    single = load_file(exports[(name, "fp32", False)] / "model.safetensors")
    merged = {k: v for f in files for k, v in load_file(out / f).items()}
    assert merged.keys() == single.keys() and all(torch.equal(merged[k], single[k]) for k in single)
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in single.values())
    hf, info = AutoModel.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info


def test_sentence_transformers_mean_pooling(exports):
    pytest.importorskip("sentence_transformers")
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer

    path = exports[("z2-bf16", "fp32", False)]
    st = SentenceTransformer(str(path), device="cpu")
    sentences = ["My invoice was charged twice.", "The app crashes on login.", "Love the new dashboard!", ""]
    first, second = st.encode(sentences), st.encode(sentences)
    assert first.shape == (len(sentences), AutoModel.from_pretrained(path).config.hidden_size)
    assert (first == second).all(), "encoding the same sentences twice differs"
    tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    batch = tok(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    mean = (hidden * mask).sum(1) / mask.sum(1)
    # same fp32 ops in a different batch order: float noise only
    assert torch.allclose(torch.from_numpy(first), mean, atol=1e-5), (torch.from_numpy(first) - mean).abs().max()


def test_model_card_documents_the_run(runs, exports):
    name = "z1-fp32"
    path = exports[(name, "fp32", False)]
    card = (path / "README.md").read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", card)
    assert images, "the model card shows no image"
    for image in images:
        png = path / image
        assert png.is_file(), f"README.md references {image}, which is not in the export"
        head = png.read_bytes()[:24]
        assert head[:8] == b"\x89PNG\r\n\x1a\n"
        width, height = struct.unpack(">II", head[16:24])
        assert width >= 400 and height >= 300, (width, height)
    tag = (runs[name] / "checkpoints" / "latest").read_text().strip()
    info = json.loads((runs[name] / "checkpoints" / tag / "run.json").read_text())
    manifest = json.loads((Path(info["manifest"]) / "manifest.json").read_text())
    for fact in (f"{info['step']:,}", f"{info['tokens_seen']:,}", f"{manifest['totals']['tokens']:,}", "mlm",
                 "span", "causal", "mlm_loss", "Intended use", "Limitations",
                 "AutoModel.from_pretrained", "ZeRO stage | 1", "| precision | fp32"):
        assert fact in card, f"model card lacks {fact!r}"
    assert json.loads((path / "training_config.json").read_text()) == info["config"]


# -- the reference worker: `torchrun --nproc_per_node 2 -m tests.test_export_zero SPEC.json` ---------------------

def _masters_of(engine, stage: int) -> dict[str, torch.Tensor]:
    """Every fp32 master weight by name. Collective under ZeRO-3 (each rank must call it, in the same order)."""
    from deepspeed.utils import safe_get_full_fp32_param

    opt = engine.optimizer
    stage0_bf16 = {id(p): m for g16, g32 in zip(getattr(opt, "fp16_groups", []), getattr(opt, "fp32_groups", []))
                   for p, m in zip(g16, g32)} if stage == 0 else {}
    out = {}
    for name, p in engine.module.named_parameters():
        full = safe_get_full_fp32_param(p)
        if full is None:
            full = stage0_bf16.get(id(p), p)
        out[name] = full.detach().float().reshape(getattr(p, "ds_shape", p.shape)).clone()
    out["head.decoder.weight"] = out["encoder.embeddings.tok_embeddings.weight"]  # tied: one parameter
    return out


def _worker(spec_file: str) -> None:
    import deepspeed

    from launch.config import load_config
    from launch.train.dist import bootstrap_env
    from launch.train.optim import build_optimizer, build_scheduler
    from launch.train.preflight import preflight
    from model.config import EncoderConfig
    from model.heads import EncoderForPretraining

    spec = json.loads(Path(spec_file).read_text())
    env = bootstrap_env()
    deepspeed.init_distributed(dist_backend="gloo")
    for name, run in spec["runs"].items():
        stage, precision = RUNS[name]
        cfg = load_config(CONFIG, train_overrides(Path(run), Path(spec["data"]), stage, precision))
        pre = preflight(cfg, env.world_size)
        ckpt = Path(run) / "checkpoints"
        tag = (ckpt / "latest").read_text().strip()
        encoder = json.loads((ckpt / tag / "run.json").read_text())["encoder"]
        model = EncoderForPretraining(EncoderConfig.from_dict(encoder))
        optimizer = build_optimizer(model, cfg.train)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                               lr_scheduler=build_scheduler(optimizer, cfg.train),
                                               config=pre.ds_config)
        path, _ = engine.load_checkpoint(str(ckpt), tag=tag)
        assert path is not None, f"DeepSpeed could not load {ckpt / tag}"
        weights = _masters_of(engine, stage)
        if env.rank == 0:
            weights.pop("head.decoder.weight")  # safetensors refuses shared storage; the fixture re-ties it
            save_file(weights, str(Path(spec["out"]) / f"{name}.safetensors"))
        engine.destroy() if hasattr(engine, "destroy") else None
        torch.distributed.barrier()


if __name__ == "__main__":
    import sys

    from launch.train.dist import exit_skipping_teardown

    _worker(sys.argv[1])
    torch.distributed.destroy_process_group()
    exit_skipping_teardown(0)  # as launch.train does: the interpreter's teardown now and then aborts a rank
