"""`python -m launch.export --checkpoint RUN_OR_CHECKPOINT_DIR --out DIR`: the encoder as a Hugging Face folder.

A thin CLI around the Hugging Face folder writer. The checkpoint is read by launch/train/checkpoint.py (ZeRO
stages 0-3 consolidated to fp32 one tensor at a time, every file through the restricted unpickler); the prediction
head is dropped (unless --with-head), and the folder gets config.json (transformers' ModernBERT), safetensors
weights (sharded above --max-shard-size), the tokenizer files, sentence-transformers' mean-pooling config,
training_config.json, a model card with loss curves and cloze_export.json (the marker by which a later --overwrite
recognises the folder). Unless --no-verify, the folder is then loaded with stock `transformers` and compared with
cloze's own model on the same weights. Everything is written to a temporary folder beside --out and renamed into
place only when complete, so a failed export leaves nothing at --out. --out may not be, contain or lie inside the
checkpoint's run directory, and --overwrite replaces only an earlier export, never another folder.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from launch.train.checkpoint import (
    check_checkpoint,
    check_shapes,
    consolidate,
    lazy_state_dict,
    materialise,
    read_run_info,
    resolve_checkpoint,
    training_precision,
)

if TYPE_CHECKING:
    from model.config import EncoderConfig

TOLERANCE = {"fp32": 1e-4, "bf16": 2e-2}
"""Bound on |export - cloze| of hidden states, per dtype of the export (the issue's acceptance bounds)."""
RELATIVE = {"fp32": 1e-5, "bf16": 2.0**-7}
"""Plus this fraction of |cloze|, as in torch.allclose: one bf16 rounding step is 2**-7 of the value, so a hidden
state beyond +-2 (or an MLM logit) may differ by more than 2e-2 when both sides round it once, correctly."""
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
"""The tokenizer files an export ships: the `tokenizers` conversion, which encodes exactly as training did. The
SentencePiece model is left out: SentencePiece on spm.model alone encodes multi-line text differently from the ids
the model was trained on (cloze encodes whole-line segments one by one), and no file in an export may do that."""
DEFAULT_MAX_SHARD = "2GB"
EXPORT_MARKER = "cloze_export.json"
"""Written into every export: with config.json beside it, it is how `--overwrite` knows a folder is one that
launch.export wrote (the only kind of folder it replaces)."""
MARKER_FORMAT = "cloze-export"

VERIFY_TEXTS = [
    "def add(a, b):\n    \"\"\"Return the sum of a and b.\"\"\"\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog. Café, naïve, 東京, 🙂.",
    "import os\n\nfor name in os.listdir('.'):\n\tprint(name)   # runs of   spaces\n",
    "",
    "x" * 1500 + " " + "Übergrößenträger" * 40,
]
"""Texts the verify step encodes with both tokenizers and runs through both models: code, Unicode, emoji, tabs
and runs of spaces, the empty string, and words longer than SentencePiece's 1024-character segment."""


# -- writing the folder ------------------------------------------------------------------------------------------

def parse_size(text: str) -> int:
    """'2GB', '500MB', '64KB', '1000' -> bytes (decimal units, as transformers uses)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB)?\s*", str(text), flags=re.IGNORECASE)
    if not m or float(m[1]) <= 0:
        raise ValueError(f"--max-shard-size {text!r}: expected a positive size such as 2GB, 500MB or 64KB")
    unit = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}[(m[2] or "B").upper()]
    return int(float(m[1]) * unit)


def hf_key_sources(lazy: dict[str, Any], with_head: bool) -> list[tuple[str, str]]:
    """(Hugging Face key, cloze key) pairs in cloze's order, by model/hf.py's mapping and its checks, without
    reading any weight: each entry is stood in for by a 1-element index tensor (tied entries share one)."""
    from model.hf import to_hf_state_dict

    index: dict[int, torch.Tensor] = {}
    stand_in = {k: index.setdefault(id(v), torch.tensor([len(index)])) for k, v in lazy.items()}
    tied = ("head.decoder.weight", "encoder.embeddings.tok_embeddings.weight")
    if with_head and all(k in lazy for k in tied) and stand_in[tied[0]] is not stand_in[tied[1]]:
        # stored as two tensors (not DeepSpeed's shared-param record): compare their values once
        if torch.equal(materialise(lazy[tied[0]]), materialise(lazy[tied[1]])):
            stand_in[tied[0]] = stand_in[tied[1]]
    first = {id(t): k for k, t in reversed(stand_in.items())}
    return [(hf, first[id(t)]) for hf, t in to_hf_state_dict(stand_in, with_head).items()]


def write_weights(lazy: dict[str, Any], out: Path, with_head: bool, dtype: torch.dtype, max_shard: int) -> list[str]:
    """model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json when the weights
    exceed max_shard bytes. At most one shard's tensors are in memory at a time. Returns the file names."""
    from safetensors.torch import save_file

    pairs = hf_key_sources(lazy, with_head)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    shards: list[list[tuple[str, str]]] = [[]]
    size = 0
    for hf, src in pairs:
        n = lazy[src].shape.numel() * itemsize
        if shards[-1] and size + n > max_shard:
            shards.append([])
            size = 0
        shards[-1].append((hf, src))
        size += n
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    total = 0
    for name, shard in zip(names, shards):
        # clone: views of one ZeRO flat buffer share storage, which safetensors refuses (and would save whole)
        tensors = {hf: lazy[src].contiguous().to(dtype).clone() for hf, src in shard}
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        del tensors
    if len(names) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": {hf: n for n, s in zip(names, shards) for hf, _ in s}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names


def write_hf_model(weights: dict[str, Any], cfg: EncoderConfig, out: Path, with_head: bool = False,
                   dtype: torch.dtype = torch.float32, max_shard: int | None = None) -> list[str]:
    """The model part of a Hugging Face folder: config.json and the safetensors weights (write_weights) of an
    EncoderForPretraining state dict, whose values may be tensors or lazy_state_dict's entries. Returns the weight
    files' names."""
    from model.hf import hf_config

    out.mkdir(parents=True, exist_ok=True)
    files = write_weights(weights, out, with_head, dtype, parse_size(DEFAULT_MAX_SHARD) if max_shard is None
                          else max_shard)
    (out / "config.json").write_text(json.dumps(hf_config(cfg, with_head, dtype), indent=2) + "\n")
    return files


def write_tokenizer(src: Path, out: Path, model_max_length: int) -> None:
    """Copy the checkpoint's `tokenizers` conversion of its SentencePiece model (TOKENIZER_FILES), or rebuild it
    from src/spm.model when a checkpoint lacks any of them. spm.model itself stays out of the export."""
    if all((src / name).is_file() for name in TOKENIZER_FILES):
        for name in TOKENIZER_FILES:
            shutil.copy2(src / name, out / name)
        return
    from data.hf_tokenizer import write_hf_tokenizer

    write_hf_tokenizer(src / "spm.model", out, model_max_length=model_max_length)


def write_sentence_transformers(out: Path, hidden_size: int, max_seq_length: int) -> None:
    """sentence-transformers' module list: the transformer, then mean pooling over non-padding tokens. The
    long-standing names and keys are used; sentence-transformers 6 maps them to its current modules."""
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    (out / "modules.json").write_text(json.dumps(modules, indent=2) + "\n")
    (out / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": max_seq_length, "do_lower_case": False}, indent=2) + "\n")
    (out / "1_Pooling").mkdir()
    pooling = {"word_embedding_dimension": hidden_size, "pooling_mode_cls_token": False,
               "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False,
               "pooling_mode_mean_sqrt_len_tokens": False, "include_prompt": True}
    (out / "1_Pooling" / "config.json").write_text(json.dumps(pooling, indent=2) + "\n")


def write_export(checkpoint: str | Path, out: Path, with_head: bool, dtype: str, max_shard: int) -> dict:
    """Write the whole export into `out` (an empty or new folder); return what the model card needs."""
    from model.config import EncoderConfig

    ckpt_dir, tag = resolve_checkpoint(checkpoint)
    info = read_run_info(ckpt_dir, tag)
    try:
        cfg = EncoderConfig.from_dict(info["encoder"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{ckpt_dir / tag / 'run.json'}: no valid encoder config ({e})") from None
    check_checkpoint(ckpt_dir, tag, info)
    from data.tokenizer import Tokenizer

    vocab = Tokenizer(ckpt_dir / tag / "tokenizer" / "spm.model").vocab_size
    if vocab != cfg.vocab_size:
        raise ValueError(f"{ckpt_dir / tag / 'tokenizer'} has {vocab} pieces but run.json's encoder has vocab_size "
                         f"{cfg.vocab_size}: the tokenizer belongs to another run")
    lazy = lazy_state_dict(ckpt_dir, tag, int(info["zero_stage"]), cfg)
    check_shapes(lazy, cfg, ckpt_dir / tag)
    files = write_hf_model(lazy, cfg, out, with_head, DTYPES[dtype], max_shard)
    del lazy
    from launch.export.modelcard import trained_seq_len

    seq_len = trained_seq_len(info) or cfg.max_position_embeddings
    write_tokenizer(ckpt_dir / tag / "tokenizer", out, model_max_length=cfg.max_position_embeddings)
    if not with_head:
        write_sentence_transformers(out, cfg.hidden_size, seq_len)
    (out / "training_config.json").write_text(json.dumps(info.get("config", {}), indent=2, default=str) + "\n")
    marker = {"format": MARKER_FORMAT, "version": 1, "checkpoint_tag": tag, "step": info.get("step"),
              "with_head": with_head, "dtype": dtype}
    (out / EXPORT_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return {"ckpt_dir": ckpt_dir, "tag": tag, "info": info, "files": files,
            "precision": training_precision(ckpt_dir, tag, int(info["zero_stage"]))}


def run_dir_of(ckpt_dir: Path) -> Path:
    """The run directory of a checkpoints folder (<run>/checkpoints); a folder of step_* dirs named otherwise is
    its own run directory."""
    return ckpt_dir.parent if ckpt_dir.name == "checkpoints" else ckpt_dir


def is_cloze_export(folder: Path) -> bool:
    """A real folder (not a link) holding config.json and the marker launch.export writes, with its format."""
    marker = folder / EXPORT_MARKER
    if folder.is_symlink() or not folder.is_dir() or marker.is_symlink() or not marker.is_file():
        return False
    if not (folder / "config.json").is_file() or marker.stat().st_size > 65536:
        return False
    try:
        return json.loads(marker.read_text()).get("format") == MARKER_FORMAT
    except (ValueError, AttributeError, OSError):  # not JSON, not an object, unreadable
        return False


def check_out_of_run(out: Path, run_dir: Path) -> None:
    """Refuse an --out that is, contains or lies inside the checkpoint's run directory: writing or replacing it
    would lose the run. Paths only, so launch.submit checks it too, before the run exists."""
    out_abs, run_abs = out.resolve(), run_dir.resolve()
    if out_abs == run_abs or out_abs in run_abs.parents or run_abs in out_abs.parents:
        where = ("is" if out_abs == run_abs else "contains" if out_abs in run_abs.parents else "lies inside")
        raise ValueError(f"--out {out} {where} the run directory {run_dir} of the checkpoint; export beside the "
                         f"run instead, e.g. --out {run_dir.parent / (run_dir.name + '-export')}")


def check_out(out: Path, run_dir: Path) -> None:
    """check_out_of_run, and refuse an existing --out that is not an export (--overwrite replaces only exports)."""
    check_out_of_run(out, run_dir)
    if (out.exists() or out.is_symlink()) and not is_cloze_export(out):
        raise ValueError(f"--out {out} exists and is not a cloze export (no {EXPORT_MARKER} and config.json); "
                         f"--overwrite replaces only a folder launch.export wrote: choose a new folder, or remove "
                         f"this one yourself")


def export(checkpoint: str | Path, out: str | Path, with_head: bool = False, dtype: str = "fp32",
           max_shard_size: str | int = DEFAULT_MAX_SHARD, overwrite: bool = False, verify_export: bool = True,
           card: bool = True) -> Path:
    """Export, verify and document into a temporary folder beside `out`, then rename it to `out`."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose one of {sorted(DTYPES)}")
    max_shard = max_shard_size if isinstance(max_shard_size, int) else parse_size(max_shard_size)
    out = Path(out)
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise ValueError(f"--out {out} already exists; choose a new folder or pass --overwrite to replace it")
    ckpt_dir, _ = resolve_checkpoint(checkpoint)  # a wrong path fails before anything is created
    check_out(out, run_dir_of(ckpt_dir))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        meta = write_export(checkpoint, tmp, with_head, dtype, max_shard)
        # the tag directory, not `checkpoint`: a run still training may move `latest` meanwhile
        result = verify(tmp, meta["ckpt_dir"] / meta["tag"]) if verify_export else None
        if card:
            from launch.export.modelcard import write_model_card

            write_model_card(tmp, meta["ckpt_dir"], meta["tag"], meta["info"], with_head=with_head, dtype=dtype,
                             verification=result, precision=meta["precision"])
        if out.exists():  # --overwrite of a folder check_out found to be an export: swap, then drop the old one
            check_out(out, run_dir_of(meta["ckpt_dir"]))  # again: the export took a while
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"[cloze] exported {meta['ckpt_dir'] / meta['tag']} -> {out} "
          f"({'with' if with_head else 'without'} MLM head, {dtype}, {len(meta['files'])} weight file(s))",
          file=sys.stderr)
    if result:
        print(f"[cloze] verified: transformers {result['architecture']} loads {out} with no missing or unexpected "
              f"weights; hidden states equal cloze's within {result['max_abs_diff']:.1e} (bound "
              f"{result['tolerance']:.0e}) on {result['texts']} texts; AutoTokenizer ids equal SentencePiece's",
              file=sys.stderr)
    return out


# -- verification --------------------------------------------------------------------------------------------------

def verify(out: str | Path, checkpoint: str | Path) -> dict:
    """Load the export with stock transformers and compare it with cloze's model on the checkpoint's fp32 weights:
    AutoTokenizer ids equal SentencePiece's on VERIFY_TEXTS; hidden states (and MLM logits, with the head) agree
    within TOLERANCE + RELATIVE x |value| for the export's dtype. cloze runs in that dtype too, so both sides round
    alike. Holds two copies of the model in memory."""
    from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoTokenizer

    from data.tokenizer import Tokenizer
    from model.config import EncoderConfig
    from model.heads import EncoderForPretraining

    out = Path(out)
    ckpt_dir, tag = resolve_checkpoint(checkpoint)
    info = read_run_info(ckpt_dir, tag)
    config = AutoConfig.from_pretrained(out)
    with_head = config.architectures == ["ModernBertForMaskedLM"]
    dtype = {v: k for k, v in DTYPES.items()}[getattr(config, "dtype", None) or torch.float32]
    ours = EncoderForPretraining(EncoderConfig.from_dict(info["encoder"]))
    ours.load_state_dict(consolidate(ckpt_dir, tag, int(info["zero_stage"])), strict=True)
    ours.to(DTYPES[dtype]).eval()
    loader = AutoModelForMaskedLM if with_head else AutoModel
    hf, loading = loader.from_pretrained(out, output_loading_info=True, attn_implementation="sdpa",
                                         dtype=DTYPES[dtype], use_safetensors=True)
    hf.eval()
    problems = {k: v for k, v in loading.items() if v}
    if problems:
        raise ValueError(f"{out}: transformers reported weight problems on load: {problems}")
    tok = AutoTokenizer.from_pretrained(out)
    sp = Tokenizer(ckpt_dir / tag / "tokenizer" / "spm.model")  # the training tokenizer; exports ship no spm.model
    for text in VERIFY_TEXTS:
        want = [tok.cls_token_id, *sp.encode(text), tok.sep_token_id]
        got = tok(text, verbose=False)["input_ids"]  # verbose: no warning for the text beyond model_max_length
        if got != want:
            raise ValueError(f"{out}: AutoTokenizer ids differ from SentencePiece on {text[:30]!r}: {got} vs {want}")
    texts = [t for t in VERIFY_TEXTS if t][:3]
    enc = tok(texts, padding=True, return_tensors="pt")
    max_diff, excess = 0.0, 0.0
    with torch.no_grad():
        theirs = (hf.model if with_head else hf)(**enc).last_hidden_state.float()
        logits = hf(**enc).logits.float() if with_head else None
        for i in range(len(texts)):
            n = int(enc["attention_mask"][i].sum())
            ids = enc["input_ids"][i : i + 1, :n]
            pairs = [(theirs[i, :n], ours.encoder(ids)[0].float())]
            if with_head:
                pairs.append((logits[i, :n], ours.logits_for(ids)[0].float()))
            for a, b in pairs:
                max_diff = max(max_diff, (a - b).abs().max().item())
                excess = max(excess, ((a - b).abs() - RELATIVE[dtype] * b.abs()).max().item())
    if not excess <= TOLERANCE[dtype]:
        raise ValueError(f"{out}: outputs differ from cloze's model by {max_diff:.2e}, more than "
                         f"{TOLERANCE[dtype]:.0e} + {RELATIVE[dtype]:.1e} x |value| ({dtype}); the export is wrong, "
                         "please report it")
    return {"max_abs_diff": max_diff, "tolerance": TOLERANCE[dtype], "texts": len(texts), "dtype": dtype,
            "architecture": type(hf).__name__}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m launch.export", description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, help="run dir, its checkpoints/ dir, or one step_XXXXXXXX dir")
    ap.add_argument("--out", required=True, help="output folder beside the run; must not exist (see --overwrite)")
    ap.add_argument("--with-head", action="store_true",
                    help="keep the MLM head (ModernBertForMaskedLM), e.g. for pipeline('fill-mask')")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weight dtype of the export")
    ap.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD,
                    help=f"safetensors shards of at most this size (default {DEFAULT_MAX_SHARD})")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace --out if it is an earlier export (swapped in when complete); any other folder is "
                         "refused")
    ap.add_argument("--no-verify", action="store_true",
                    help="skip loading the export back with transformers (verify holds two fp32 copies in memory)")
    ap.add_argument("--no-card", action="store_true", help="skip the model card (README.md and loss_curves.png)")
    args = ap.parse_args(argv)
    export(args.checkpoint, args.out, with_head=args.with_head, dtype=args.dtype, max_shard_size=args.max_shard_size,
           overwrite=args.overwrite, verify_export=not args.no_verify, card=not args.no_card)
    return 0

