"""`model.init_from`: continue pretraining from a Hugging Face ModernBERT folder (a cloze export, or a folder
transformers' save_pretrained wrote).

The folder is not trusted. Nothing in it is executed or unpickled: config.json is read with a size bound and
json.loads, the weights only from safetensors files whose total size must fit the shape config.json declares, the
tokenizer's special ids from tokenizer.json (bounded, json.loads); a cloze export's spm.model is only hashed (it
must be the data's tokenizer, byte for byte). No transformers model is instantiated.

Two stages. `read_init_source` (preflight: in the launcher before ranks start, and on every rank before the
process group) reads config.json into cloze's EncoderConfig, checks it against the run config's model keys and
the data's tokenizer, and checks every safetensors header against the expected keys and shapes; every mistake is
one ConfigError (exit 2). `load_weights` (every rank, before deepspeed.initialize) copies the tensors into the
freshly initialised model, strictly.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from launch.config import ConfigError, shown

MAX_CONFIG_BYTES = 1 << 20
"""config.json of any ModernBERT is about 2 KB."""
MAX_TOKENIZER_JSON_BYTES = 64 << 20
"""tokenizer.json (and a cloze export's spm.model) of a 256k-piece vocabulary is about 20 MB."""
MAX_HEADER_SLACK = 1 << 20
"""Bytes per safetensors file beyond its tensors' data (the JSON header)."""
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
SPECIALS = (("[PAD]", "pad_id"), ("[CLS]", "cls_id"), ("[SEP]", "sep_id"), ("[MASK]", "mask_id"))
"""Special tokens whose ids the folder and the run's tokenizer must agree on (name, attribute of Tokenizer)."""


@dataclass
class InitSource:
    folder: Path
    encoder: Any
    """model.config.EncoderConfig read from the folder's config.json."""
    with_head: bool
    """The folder is a ModernBertForMaskedLM (its MLM head is loaded too)."""
    weights: list[Path]
    """Its safetensors files, headers already checked."""


def _read_bounded(path: Path, limit: int, what: str) -> bytes:
    """At most limit bytes of a regular file (a device or FIFO behind the name would never end)."""
    if not path.is_file():
        raise ConfigError([f"model.init_from: {path} is not a regular file; point model.init_from at a Hugging "
                           "Face ModernBERT folder"])
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ConfigError([f"model.init_from: {path} is larger than a {what} can be ({limit:,} bytes); point "
                           "model.init_from at a Hugging Face ModernBERT folder"])
    return data


def _read_json(path: Path, limit: int, what: str) -> Any:
    data = _read_bounded(path, limit, what)
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError([f"model.init_from: {path} is not valid JSON ({shown(str(e))})"]) from None


def _tokenizer_ids(folder: Path) -> dict[str, int]:
    """Special token -> id from the folder's tokenizer.json (its added_tokens); empty without that file."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        return {}
    data = _read_json(path, MAX_TOKENIZER_JSON_BYTES, "tokenizer.json")
    added = data.get("added_tokens") if isinstance(data, dict) else None
    ids = {}
    for entry in added if isinstance(added, list) else []:
        if isinstance(entry, dict) and entry.get("content") in dict(SPECIALS) and isinstance(entry.get("id"), int):
            ids[entry["content"]] = entry["id"]
    return ids


def _weight_files(folder: Path) -> list[Path]:
    """The folder's safetensors files; a folder holding pickle-format weights is refused before anything is read."""
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ConfigError([f"model.init_from: {folder} holds pickle-format files ({', '.join(pickles[:5])}); cloze "
                           "loads safetensors weights only and never unpickles a file it did not write: save the "
                           "model with safetensors (save_pretrained's default) or re-export it with launch.export"])
    files = sorted(folder.glob("*.safetensors"))
    if odd := [f.name for f in files if not f.is_file()]:
        raise ConfigError([f"model.init_from: {folder}: {', '.join(odd[:5])} not a regular file"])
    if not files:
        raise ConfigError([f"model.init_from: {folder} has no *.safetensors weights; save the model with "
                           "save_pretrained (safetensors is its default) or export it with launch.export"])
    return files


def _shape_problems(encoder, model_keys: dict[str, Any], source: Path) -> list[str]:
    """One line per model key of the run config that disagrees with the folder's config.json."""
    return [f"model.{key}={shown(value)} but {source} has {key}={shown(getattr(encoder, key))}; remove the key or "
            "make it agree" for key, value in model_keys.items() if getattr(encoder, key) != value]


def _tokenizer_problems(encoder, tok, folder: Path) -> list[str]:
    """One line per difference between the folder's vocabulary / special ids and the run's tokenizer."""
    problems = []
    if encoder.vocab_size != tok.vocab_size:
        problems.append(f"vocab_size: {folder}/config.json has {encoder.vocab_size}, the data's tokenizer "
                        f"{tok.vocab_size}")
    spm = folder / "spm.model"
    if spm.exists() and hashlib.sha256(_read_bounded(spm, MAX_TOKENIZER_JSON_BYTES, "tokenizer model")).hexdigest() \
            != tok.sha256:
        problems.append(f"tokenizer: {spm} is not the data's tokenizer (another SentencePiece model); prepare the "
                        "data with the folder's tokenizer (launch.prepare --tokenizer ...)")
    from_config = {"[PAD]": encoder.pad_token_id, "[CLS]": encoder.cls_token_id, "[SEP]": encoder.sep_token_id,
                   "[MASK]": encoder.mask_token_id}
    from_files = _tokenizer_ids(folder)
    for name, attr in SPECIALS:
        want = getattr(tok, attr)
        for where, ids in ((f"{folder}/config.json", from_config), (f"{folder}/tokenizer.json", from_files)):
            if name in ids and ids[name] != want:
                problems.append(f"{name} id: {where} has {shown(ids[name])}, the data's tokenizer {want}")
    return problems


def _header_problems(files: list[Path], expected: dict[str, tuple[int, ...]], folder: Path) -> list[str]:
    """Keys and shapes of the safetensors headers against what the config's shape implies: missing, unexpected
    and wrongly shaped weights, all listed. File sizes are checked first, so no oversized file is opened."""
    from safetensors import safe_open

    numel = sum(int(torch.Size(s).numel()) for s in expected.values())
    limit = numel * 4 + MAX_HEADER_SLACK * len(files)  # fp32 at most
    total = sum(f.stat().st_size for f in files)
    if total > limit:
        return [f"model.init_from: {folder}'s safetensors files hold {total:,} bytes, more than the "
                f"{numel:,} parameters its config.json declares can take in fp32 ({limit:,}); not this model's "
                "weights"]
    seen: dict[str, tuple[int, ...]] = {}
    problems = []
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as handle:
                for key in handle.keys():
                    if key in seen:
                        problems.append(f"weight {shown(key)} appears in two files")
                    seen[key] = tuple(handle.get_slice(key).get_shape())
        except Exception as e:  # safetensors raises its own error types for a damaged header
            return [f"model.init_from: {f} is not a readable safetensors file ({shown(str(e))})"]
    missing = sorted(set(expected) - set(seen) - {"decoder.weight"})
    unexpected = sorted(set(seen) - set(expected) - {"decoder.weight"})
    wrong = [f"{k} {list(seen[k])} (config.json implies {list(expected[k])})" for k in sorted(set(seen) & set(expected))
             if seen[k] != expected[k]]
    if "decoder.weight" in seen and seen["decoder.weight"] != expected.get("model.embeddings.tok_embeddings.weight"):
        wrong.append(f"decoder.weight {list(seen['decoder.weight'])} (must be tied to the embedding)")
    for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrongly shaped", wrong)):
        if keys:
            problems.append(f"{what} weights ({len(keys)}): " + ", ".join(shown(k) for k in keys[:8])
                            + (" ..." if len(keys) > 8 else ""))
    return [f"model.init_from: {folder}: {p}" for p in problems]


def read_init_source(folder: str | Path, model_keys: dict[str, Any], tok) -> InitSource:
    """Read and check everything but the tensor data; raises one ConfigError listing every problem."""
    from model.hf import encoder_config_from_hf, hf_shapes

    folder = Path(folder)
    config_path = folder / "config.json"
    if not folder.is_dir():
        raise ConfigError([f"model.init_from: folder not found: {folder}"])
    if not config_path.is_file():
        raise ConfigError([f"model.init_from: {folder} has no config.json; point it at a Hugging Face ModernBERT "
                           "folder (save_pretrained or launch.export writes one)"])
    config = _read_json(config_path, MAX_CONFIG_BYTES, "config.json")
    files = _weight_files(folder)
    mask_id = _tokenizer_ids(folder).get("[MASK]")
    try:
        encoder = encoder_config_from_hf(config, mask_token_id=mask_id, source=f"model.init_from: {config_path}")
    except ValueError as e:
        raise ConfigError([str(e)]) from None
    problems = _shape_problems(encoder, model_keys, config_path) + _tokenizer_problems(encoder, tok, folder)
    if problems:
        raise ConfigError(problems, f"model.init_from ({folder})")
    with_head = _is_masked_lm(files)
    header = _header_problems(files, hf_shapes(encoder, with_head), folder)
    if header:
        raise ConfigError(header)
    return InitSource(folder, encoder, with_head, files)


def _is_masked_lm(files: list[Path]) -> bool:
    """A ModernBertForMaskedLM folder keeps the encoder under "model." (a ModernBertModel has no prefix)."""
    from safetensors import safe_open

    with safe_open(str(files[0]), framework="pt") as handle:
        return any(k.startswith("model.") for k in handle.keys())


def load_weights(model: torch.nn.Module, source: InitSource) -> None:
    """Copy the folder's weights into an EncoderForPretraining of source.encoder's shape, strictly: every encoder
    weight (and, for a ModernBertForMaskedLM, every head weight) comes from the folder. Without a head in the
    folder the model's head keeps the init it already has (cloze's normal init)."""
    from safetensors import safe_open

    from model.hf import from_hf_state_dict

    tensors: dict[str, torch.Tensor] = {}
    for f in source.weights:
        with safe_open(str(f), framework="pt") as handle:
            for key in handle.keys():
                tensors[key] = handle.get_tensor(key).to(torch.float32)
    try:
        sd = from_hf_state_dict(tensors, with_head=source.with_head)
    except ValueError as e:
        raise ConfigError([f"model.init_from: {source.folder}: {e}"]) from None
    result = model.load_state_dict(sd, strict=False)
    head_only = {k for k in result.missing_keys if k.startswith("head.")} if not source.with_head else set()
    missing = sorted(set(result.missing_keys) - head_only)
    if missing or result.unexpected_keys:
        raise ConfigError([f"model.init_from: {source.folder}: missing weights {missing}, unexpected weights "
                           f"{sorted(result.unexpected_keys)}"])


def initialise(model: torch.nn.Module, source: InitSource, ckpt_dir: Path, log) -> None:
    """Load the folder's weights into model, unless the run resumes from a checkpoint in ckpt_dir (resuming takes
    precedence: the checkpoint holds the run's own later weights). log: a one-argument function (rank 0 prints)."""
    from launch.train.checkpoint import read_latest

    if read_latest(ckpt_dir, warn=False) is not None:
        log(f"model.init_from {source.folder} ignored: resuming from the checkpoint in {ckpt_dir}")
        return
    load_weights(model, source)
    log(f"model.init_from: weights from {source.folder} ("
        + ("ModernBertForMaskedLM, head included" if source.with_head
           else "ModernBertModel; the MLM head starts from cloze's init") + ")")
