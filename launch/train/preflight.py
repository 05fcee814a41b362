"""Checks that need the world size and the data, run before any process group or engine exists (and, with
`--nproc`, before any rank is spawned), so a mistake costs seconds, not a queue wait plus a hang."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from launch.config import ConfigError, RunConfig, warn
from launch.train.engine_config import resolve_deepspeed_config, resolve_precision

if TYPE_CHECKING:
    from data.manifest import Manifest


@dataclass
class Preflight:
    ds_config: dict
    precision: str
    manifest: object
    tokenizer: object
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
    tok = Tokenizer(tok_path)
    if tok.sha256 != manifest.tokenizer_sha256:
        raise ConfigError([f"tokenizer {tok_path} does not match the hash in {cfg.data.path}/manifest.json "
                           f"(replaced after prepare?); re-run launch.prepare"])
    problems = _check_sources(cfg, manifest) + _check_cache(cfg)
    if problems:
        raise ConfigError(problems)
    return Preflight(ds_config, precision, manifest, tok, _init_source(cfg, tok))


def _check_sources(cfg: RunConfig, first: Manifest) -> list[str]:
    """Every training source and the eval set, opened and checked before any rank starts (data.location.
    check_source): readable manifest and tokenizer, the run's tokenizer, at least one shard, and (local) every
    shard present at its size. Any number of shards serves any world size: every rank reads the one global row
    sequence (data/rows.py) and the eval set is split by batches. All problems, one line each, naming the key."""
    from data.location import FetchLimits, Location, check_source

    d = cfg.data
    limits = FetchLimits(stall_s=d.read_stall_s, deadline_s=d.read_timeout_s)
    roles = [(f"data.sources.{spec}", spec) for spec in d.sources] or [("data.path", d.path)]
    if cfg.eval.path:
        roles.append(("eval.path", cfg.eval.path))
    problems, shard_problems = [], []
    for key, spec in roles:
        manifest, problem, shards = check_source(Location(spec, limits))
        if problem:
            problems.append(f"{key}: {problem}")
            continue
        assert manifest is not None
        if (manifest.tokenizer_sha256, manifest.vocab_size) != (first.tokenizer_sha256, first.vocab_size):
            problems.append(f"{key}: {spec} was prepared with another tokenizer than data.path ({d.path}); prepare "
                            f"it with `launch.prepare --tokenizer {Path(first.tokenizer_path)}`")
        shard_problems += [f"{key}: {p}" for p in shards]
    if shard_problems and d.on_bad_data == "fail":
        shown = shard_problems[:10] + ([f"... and {len(shard_problems) - 10} more"] if len(shard_problems) > 10
                                       else [])
        problems += shown + ["re-run `python -m launch.prepare` to rebuild the dataset, or set data.on_bad_data=skip "
                             "to train without these shards (they are counted in the run summary)"]
    elif shard_problems:
        warn(f"{len(shard_problems)} shard(s) will be skipped (data.on_bad_data=skip): "
             + "; ".join(shard_problems[:3]) + (" ..." if len(shard_problems) > 3 else ""))
    return problems


def _check_cache(cfg: RunConfig) -> list[str]:
    """data.cache_dir, when set: a folder this user can create and write (it is created now, private)."""
    from data.cache import ShardCache

    d = cfg.data
    if not d.cache_dir:
        return []
    specs = [*d.sources, d.path, cfg.eval.path]
    if not any(s.startswith(("http://", "https://", "pipe:")) for s in specs):
        warn(f"data.cache_dir={d.cache_dir} is unused: it caches http(s) and pipe: sources, and every source is local")
        return []
    cache = ShardCache(Path(d.cache_dir), int(d.cache_max_gb * 2**30))
    try:
        cache.prepare()
    except OSError as e:
        return [f"data.cache_dir: cannot create {d.cache_dir} ({e.strerror or e}); choose a folder on local disk"]
    if not os.access(cache.folder, os.W_OK | os.X_OK) or not cache.folder.is_dir():
        return [f"data.cache_dir: {d.cache_dir} is not a writable folder; choose another"]
    return []


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
