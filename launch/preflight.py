"""Checks that need the world size and the data, run before any process group or engine exists (and, with
`--nproc`, before any rank is spawned), so a mistake costs seconds, not a queue wait plus a hang."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from launch.config import ConfigError, RunConfig
from launch.engine_config import resolve_deepspeed_config, resolve_precision


@dataclass
class Preflight:
    ds_config: dict
    precision: str
    manifest: object
    tokenizer: object
    tokenizer_dir: Path


def preflight(cfg: RunConfig, world_size: int) -> Preflight:
    from data.manifest import load_manifest
    from data.tokenizer import Tokenizer

    precision = resolve_precision(cfg.train.precision, torch.cuda.is_available())
    ds_config = resolve_deepspeed_config(cfg, world_size, precision)
    manifest = load_manifest(cfg.data.path)
    tok_path = Path(manifest.tokenizer_path)
    tok = Tokenizer(tok_path)
    if tok.sha256 != manifest.tokenizer_sha256:
        raise ConfigError([f"tokenizer {tok_path} does not match the hash in {cfg.data.path}/manifest.json "
                           f"(replaced after prepare?); re-run launch.prepare"])
    if len(manifest.shards) < world_size:
        raise ConfigError([f"{cfg.data.path} has {len(manifest.shards)} shards for {world_size} ranks; each rank "
                           f"needs at least one: re-run launch.prepare with a smaller --shard-bytes"])
    return Preflight(ds_config, precision, manifest, tok, tok_path.parent)
