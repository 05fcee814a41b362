"""Checks that need the world size and the data, run before any process group or engine exists (and, with
`--nproc`, before any rank is spawned), so a mistake costs seconds, not a queue wait plus a hang."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from launch.config import ConfigError, RunConfig, warn
from launch.train.engine_config import resolve_deepspeed_config, resolve_precision


@dataclass
class Preflight:
    ds_config: dict
    precision: str
    manifest: object
    tokenizer: object
    tokenizer_dir: Path
    init_from: object = None
    """launch.train.init_from.InitSource when model.init_from is set: the checked folder whose shape the model takes."""


def preflight(cfg: RunConfig, world_size: int) -> Preflight:
    from data.manifest import load_manifest
    from data.tokenizer import Tokenizer

    precision = resolve_precision(cfg.train.precision, torch.cuda.is_available())
    ds_config = resolve_deepspeed_config(cfg, world_size, precision)
    manifest = load_manifest(cfg.data.path, check_files=False)
    tok_path = Path(manifest.tokenizer_path)
    if not tok_path.is_file():
        raise ConfigError([f"tokenizer {tok_path} named by {cfg.data.path}/manifest.json is missing; re-run "
                           f"launch.prepare"])
    _check_shard_files(cfg, manifest)
    tok = Tokenizer(tok_path)
    if tok.sha256 != manifest.tokenizer_sha256:
        raise ConfigError([f"tokenizer {tok_path} does not match the hash in {cfg.data.path}/manifest.json "
                           f"(replaced after prepare?); re-run launch.prepare"])
    if len(manifest.shards) < world_size:
        raise ConfigError([f"{cfg.data.path} has {len(manifest.shards)} shards for {world_size} ranks; each rank "
                           f"needs at least one: re-run launch.prepare with a smaller --shard-bytes"])
    return Preflight(ds_config, precision, manifest, tok, tok_path.parent, _init_source(cfg, tok))


def _init_source(cfg: RunConfig, tok):
    """model.init_from's folder, checked against the model keys and the tokenizer (None when unset)."""
    if not cfg.model.init_from:
        return None
    from launch.train.init_from import read_init_source

    source = read_init_source(cfg.model.init_from, cfg.model.encoder_kwargs(), tok)
    max_pos = source.encoder.max_position_embeddings
    if cfg.data.seq_len > max_pos:
        raise ConfigError([f"data.seq_len={cfg.data.seq_len} exceeds max_position_embeddings={max_pos} of "
                           f"model.init_from's {source.folder}/config.json"])
    return source


def _check_shard_files(cfg: RunConfig, manifest) -> None:
    """Missing or wrongly sized shards, found by a stat() of each before anything starts. Under on_bad_data='fail'
    that is an error listing every one; under 'skip' a warning, and the loader leaves them out and counts them."""
    from data.manifest import shard_file_problems

    problems = shard_file_problems(manifest)
    if not problems:
        return
    if cfg.data.on_bad_data == "fail":
        shown = problems[:10] + ([f"... and {len(problems) - 10} more"] if len(problems) > 10 else [])
        raise ConfigError([f"{cfg.data.path}: {p}" for p in shown]
                          + ["re-run `python -m launch.prepare` to rebuild the dataset, or set data.on_bad_data=skip "
                             "to train without these shards (they are counted in the run summary)"])
    warn(f"{cfg.data.path}: {len(problems)} of {len(manifest.shards)} shards will be skipped "
         f"(data.on_bad_data=skip): " + "; ".join(problems[:3]) + (" ..." if len(problems) > 3 else ""))
