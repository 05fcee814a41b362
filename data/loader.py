"""The training data loader: build_loader(sources, ...) -> Loader, an endless, exactly resumable iterator.

    loader = build_loader([("runs/web", 0.7), ("https://host/code", 0.3)], seq_len=512, batch_size=32,
                          rank=rank, world_size=world, seed=0, num_workers=2, on_bad_data="skip")
    input_ids, doc_ids = next(loader)          # int64 [batch_size, seq_len], forever
    state = loader.state_dict()                # JSON; load_state_dict(state) continues at the next batch

Layout. Each rank serves `partitions` = max(1, num_workers) disjoint partitions of every source's shards
(data/plan.py); with num_workers > 0 each partition is a worker process, and batches are taken from the
partitions in strict round robin, so the batch sequence is a pure function of (data, seed, rank, world size,
num_workers, seq_len, batch_size, shuffle_documents) and never of timing. Shards < ranks is an error; shards <
ranks x workers gives a warning and fewer workers (every worker needs a shard of every source).

Exact resume. Every batch travels with its partition's state right after it. The loader remembers, per
partition, the state attached to the last batch it handed out, and which partition is next; that is
state_dict(). Batches prefetched by workers but never handed out are not in it, so a restarted loader produces
exactly the batches an uninterrupted one would have, across epoch boundaries and with any number of workers.

Document order. Shards are written in corpus order, so near-duplicates sit side by side; each shard's documents
are read in a permutation seeded by (seed, source, epoch, shard) (SourcePlan.documents; shuffle_documents=False
keeps file order). It is part of the position, so resume stays exact.

Another world size or num_workers. A saved position only fits the layout it was saved under; load_reshaped(every
old rank's state) restarts, per source, the earliest epoch any old rank was still reading, with the new split
(data/reshape.py): nothing skipped, at most about an epoch read again.

Failures. An exception in a worker comes back in the main process as one clear error (BadDataError, a
ValueError, for bad data under on_bad_data='fail'); a worker that dies is reported by torch's DataLoader within
seconds; close() (also on error, and at exit) shuts the workers down.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data.cache import ShardCache
from data.location import FetchError, FetchLimits, Location, same_dataset
from data.manifest import MAX_META_BYTES, Manifest, file_sha256
from data.partition import PartitionSpec, PartitionStream, epoch_rows, initial_state
from data.plan import MixSchedule, SourcePlan
from data.reader import ON_BAD_DATA, BadDataError, Source
from data.reshape import reshaped_states

STATE_VERSION = 2
_RERUN = "re-run `python -m launch.prepare`"


@dataclass
class LoaderConfig:
    """Everything build_loader takes; checked on construction."""

    sources: list[tuple[str, float]]
    """(dataset, weight) pairs: a folder written by launch.prepare, an http(s):// URL of one, or a pipe: command
    with {} for the file name. Weights are shares of rows (so of tokens), normalised to sum to 1."""
    seq_len: int
    """Tokens per row."""
    batch_size: int
    """Rows per batch."""
    rank: int = 0
    """This process's rank."""
    world_size: int = 1
    """Number of ranks; each reads a disjoint part of every source."""
    seed: int = 0
    """Seeds the per-epoch shard orders and the document order inside each shard."""
    num_workers: int = 0
    """Worker processes per rank (0: read in the main process). Part of the data order: resume with the same."""
    on_bad_data: str = "fail"
    """'fail': the first bad shard or sample stops the loader with an error naming it; 'skip': leave it out and
    count it in stats()."""
    shuffle_documents: bool = True
    """Visit each shard's documents in a seeded per-epoch permutation (prepare writes them in corpus order, so
    near-duplicates sit side by side); False reads them in file order. Part of the data order."""
    worker_processes: bool = True
    """False serves the num_workers partitions from the main process in the same order: the same batches, no
    processes (for debugging and for tests that compare against the processes)."""
    prefetch_batches: int = 2
    """Batches each worker prepares ahead."""
    timeout_s: float = 1800.0
    """Longest wait for one batch from a worker before giving up with an error (0: wait forever)."""
    read_stall_s: float = 30.0
    """A remote read (http(s), pipe:) that receives nothing for this long is stopped: a shard then counts as
    missing (on_bad_data decides), a manifest or tokenizer is an error."""
    read_timeout_s: float = 300.0
    """A remote read of one file (a shard, the manifest, the tokenizer) not finished after this long is stopped,
    with the same consequences."""
    cache_dir: str = ""
    """Folder of the node's shard cache for http(s) and pipe: sources (data/cache.py); empty: no cache."""
    cache_max_bytes: int = 64 << 30
    """The cache's size bound."""
    labels: list[str] = field(default_factory=list)
    """Filled in: one unique short name per source (its folder's or URL's last component)."""

    def __post_init__(self) -> None:
        if not self.sources:
            raise ValueError("no data sources; give at least one (path, weight)")
        checked = []
        for item in self.sources:
            if not (isinstance(item, (tuple, list)) and len(item) == 2):
                raise ValueError(f"data source {item!r} must be a (path, weight) pair")
            spec, weight = str(item[0]), float(item[1])
            if not (math.isfinite(weight) and weight > 0):
                raise ValueError(f"data source {spec!r}: weight {item[1]!r} must be a number > 0")
            checked.append((spec, weight))
        self.sources = checked
        if self.seq_len < 1 or self.batch_size < 1:
            raise ValueError(f"seq_len={self.seq_len} and batch_size={self.batch_size} must be >= 1")
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank={self.rank} must lie in [0, world_size={self.world_size})")
        if self.num_workers < 0:
            raise ValueError(f"num_workers={self.num_workers} must be >= 0")
        if self.on_bad_data not in ON_BAD_DATA:
            raise ValueError(f"on_bad_data={self.on_bad_data!r}; choose one of {ON_BAD_DATA}")
        if self.prefetch_batches < 1 or self.timeout_s < 0:
            raise ValueError(f"prefetch_batches={self.prefetch_batches} must be >= 1 and timeout_s >= 0")
        if not (self.read_stall_s > 0 and self.read_timeout_s > 0):
            raise ValueError(f"read_stall_s={self.read_stall_s} and read_timeout_s={self.read_timeout_s} must be > 0")
        locations = [Location(spec) for spec, _ in self.sources]
        for i, a in enumerate(locations):
            for b in locations[:i]:
                if same_dataset(a, b):
                    raise ValueError(f"data source {a.spec!r} is listed twice; give it one weight")
        labels: list[str] = []
        for loc in locations:
            label = loc.label
            while label in labels:
                label += "_"
            labels.append(label)
        self.labels = labels


def _open_sources(cfg: LoaderConfig) -> list[Source]:
    """Manifests of every source, checked against each other and against their tokenizer files."""
    sources = []
    limits = FetchLimits(stall_s=cfg.read_stall_s, deadline_s=cfg.read_timeout_s)
    cache = ShardCache(Path(cfg.cache_dir), cfg.cache_max_bytes) if cfg.cache_dir else None
    for i, ((spec, weight), label) in enumerate(zip(cfg.sources, cfg.labels, strict=True)):
        location = Location(spec, limits, cache)
        manifest = location.manifest(check_files=False)
        digest = _tokenizer_sha256(location, manifest)
        if digest != manifest.tokenizer_sha256:
            raise ValueError(f"data source {spec!r}: tokenizer {location.url(manifest.tokenizer_relpath)} does not "
                             f"match the tokenizer hash in its manifest (replaced after prepare?); {_RERUN}")
        empty = [s.file for s in manifest.shards if s.samples == 0]
        if empty:
            raise ValueError(f"data source {spec!r}: shard(s) {', '.join(empty[:5])} hold no documents; {_RERUN}")
        sources.append(Source(index=i, label=label, weight=weight, location=location, manifest=manifest))
    first = sources[0].manifest
    for src in sources[1:]:
        m = src.manifest
        if (m.tokenizer_sha256, m.vocab_size, m.special_ids) != (first.tokenizer_sha256, first.vocab_size,
                                                                 first.special_ids):
            raise ValueError(f"data sources {sources[0].location.spec!r} and {src.location.spec!r} were prepared with "
                             "different tokenizers; prepare every source with the same --tokenizer")
    for name in ("[CLS]", "[SEP]"):
        if name not in first.special_ids:
            raise ValueError(f"data source {sources[0].location.spec!r}: manifest special_ids lack {name}; {_RERUN}")
    return sources


def _tokenizer_sha256(location: Location, manifest: Manifest) -> str:
    """The hash of the tokenizer file the manifest names (a remote one read whole, at most MAX_META_BYTES)."""
    spec = location.spec
    if location.is_local:
        tok = manifest.tokenizer_path  # refuses a path or symlink leading outside the dataset
        if not tok.is_file():
            raise ValueError(f"data source {spec!r}: tokenizer {tok} is missing; {_RERUN}")
        return file_sha256(tok)
    try:
        raw = location.read(manifest.tokenizer_relpath, limit=MAX_META_BYTES)
    except FetchError as e:
        raise ValueError(f"data source {spec!r}: cannot read its tokenizer: {e}") from None
    if len(raw) > MAX_META_BYTES:
        raise ValueError(f"data source {spec!r}: tokenizer {location.url(manifest.tokenizer_relpath)} is larger "
                         f"than {MAX_META_BYTES >> 20} MiB; {_RERUN}")
    return hashlib.sha256(raw).hexdigest()


def _partitions(cfg: LoaderConfig, sources: list[Source]) -> int:
    """Partitions per rank: num_workers (at least 1), fewer when some source has too few shards."""
    fewest = min(sources, key=lambda s: len(s.manifest.shards))
    n = len(fewest.manifest.shards)
    if n < cfg.world_size:
        raise ValueError(
            f"data source {fewest.location.spec!r} has {n} shard(s) for {cfg.world_size} ranks; every rank needs its "
            f"own: {_RERUN} with a smaller --shard-bytes (at least {cfg.world_size} shards)")
    wanted = max(1, cfg.num_workers)
    usable = min(wanted, n // cfg.world_size)
    if usable < wanted:
        warnings.warn(
            f"data source {fewest.location.spec!r} has {n} shards for {cfg.world_size} ranks x {cfg.num_workers} "
            f"loader workers; only {usable} worker(s) per rank get shards, so {usable} are used. For more, "
            f"{_RERUN} with a smaller --shard-bytes (at least {cfg.world_size * wanted} shards)", stacklevel=3)
    return usable


class _WorkerData(IterableDataset):
    """What each worker process runs: the partition (worker id + rotation) % partitions, from its start state."""

    def __init__(self, loader: Loader, states: list[dict[str, Any]], rotation: int):
        self.sources, self.plans, self.schedule = loader.sources, loader.plans, loader.schedule
        self.specs = [loader.spec(p) for p in range(loader.partitions)]
        self.states, self.rotation = states, rotation

    def __iter__(self):
        info = get_worker_info()
        assert info is not None, "_WorkerData runs only inside DataLoader workers"
        part = (info.id + self.rotation) % len(self.specs)
        try:
            stream = PartitionStream(self.sources, self.plans, self.schedule, self.specs[part], self.states[part])
            while True:
                ids, docs = stream.next_batch()
                yield ids, docs, part, stream.state(), stream.drain_opened()
        except Exception as e:  # noqa: BLE001 - handed to the main process in the batch's slot, raised there
            yield None, None, part, {"type": type(e).__name__, "bad_data": isinstance(e, BadDataError),
                                     "value_error": isinstance(e, ValueError), "message": str(e)}, []


class Loader:
    """Endless iterator of (input_ids, doc_ids), int64 [batch_size, seq_len]; see the module docstring."""

    def __init__(self, config: LoaderConfig):
        self.config = cfg = config
        self.sources = _open_sources(cfg)
        self.partitions = _partitions(cfg, self.sources)
        self.plans = [SourcePlan(s.framed_tokens(), cfg.seed, s.index, cfg.world_size, self.partitions, cfg.seq_len,
                                 cfg.shuffle_documents) for s in self.sources]
        self.schedule = MixSchedule([s.weight for s in self.sources])
        self.consumed_shards: list[str] = []
        """Shard files the handed-out batches were read from, in the order they were opened ('<label>/<file>'
        with several sources, the file name with one); a shard reopened after load_state_dict appears again."""
        self._states = [initial_state(len(self.sources)) for _ in range(self.partitions)]
        self._next = 0
        self._streams: list[PartitionStream] | None = None  # in-process partitions
        self._workers: Any = None  # DataLoader iterator

    @property
    def manifest(self):
        """The first source's manifest."""
        return self.sources[0].manifest

    def spec(self, part: int) -> PartitionSpec:
        cfg, special = self.config, self.sources[0].manifest.special_ids
        return PartitionSpec(rank=cfg.rank, part=part, seq_len=cfg.seq_len, batch_size=cfg.batch_size,
                             on_bad_data=cfg.on_bad_data, cls_id=special["[CLS]"], sep_id=special["[SEP]"])

    # ----- iteration --------------------------------------------------------------------------------------------
    def __iter__(self) -> Loader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.config.num_workers > 0 and self.config.worker_processes:
            return self._next_from_workers()
        if self._streams is None:
            self._streams = [PartitionStream(self.sources, self.plans, self.schedule, self.spec(p), self._states[p])
                             for p in range(self.partitions)]
        part = self._next
        stream = self._streams[part]
        ids, docs = stream.next_batch()
        self._handed_out(part, stream.state(), stream.drain_opened())
        return ids, docs

    def _next_from_workers(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._workers is None:
            data = _WorkerData(self, [dict(s) for s in self._states], rotation=self._next)
            loader = DataLoader(data, batch_size=None, num_workers=self.partitions,
                                prefetch_factor=self.config.prefetch_batches, timeout=self.config.timeout_s)
            self._workers = iter(loader)
        try:
            ids, docs, part, state, opened = next(self._workers)
        except Exception:
            self.close()
            raise
        if ids is None:
            self.close()
            where = f"data loader worker (rank {self.config.rank}, partition {part})"
            message = f"{where}: {state['message']}"
            if state["bad_data"]:
                raise BadDataError(message)
            if state["value_error"]:
                raise ValueError(message)
            raise RuntimeError(f"{where} failed with {state['type']}: {state['message']}")
        assert part == self._next, f"batch from partition {part}, expected {self._next}: round robin broken"
        self._handed_out(part, state, opened)
        return ids, docs

    def _handed_out(self, part: int, state: dict[str, Any], opened: list[str]) -> None:
        self._states[part] = state
        self._next = (part + 1) % self.partitions
        if len(self.sources) == 1:
            opened = [name.split("/", 1)[1] for name in opened]
        self.consumed_shards.extend(opened)

    # ----- position -----------------------------------------------------------------------------------------
    def _fingerprint(self) -> dict[str, Any]:
        cfg = self.config
        return {"seed": cfg.seed, "shuffle_documents": cfg.shuffle_documents, "rank": cfg.rank,
                "world_size": cfg.world_size, "partitions": self.partitions,
                "seq_len": cfg.seq_len, "batch_size": cfg.batch_size,
                "sources": [[s.label, s.weight, len(s.manifest.shards)] for s in self.sources]}

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position: load_state_dict() of it continues with the next batch this loader would
        hand out."""
        return {"version": STATE_VERSION, **self._fingerprint(), "next_partition": self._next,
                "partition_states": [dict(s) for s in self._states]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from state_dict() of a loader over the same sources, seed, ranks, workers and shapes."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            got = state.get("version") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"loader state version {got!r} is not {STATE_VERSION} (saved by another cloze?)")
        for key, value in self._fingerprint().items():
            saved = state.get(key)
            if saved != value:
                hint = (" (a new world size or num_workers: pass every old rank's state to load_reshaped)"
                        if key in ("world_size", "partitions") else "")
                raise ValueError(f"loader state was saved with {key}={saved!r}, this loader has {value!r}; resume "
                                 f"with the same data, seed, ranks, num_workers, seq_len and batch size{hint}")
        parts = state.get("partition_states")
        nxt = state.get("next_partition")
        if not isinstance(parts, list) or len(parts) != self.partitions or nxt not in range(self.partitions):
            raise ValueError("loader state is damaged: partition_states / next_partition do not fit this loader")
        for part, saved in enumerate(parts):
            self._check_positions(part, saved)
        self._start_from([dict(s) for s in parts], int(nxt))

    def load_reshaped(self, old_states: list[dict[str, Any]]) -> dict[str, int]:
        """Resume from the state_dict() of every rank of a run with another world size or num_workers (same
        sources, seed, seq_len and batch size): per source, restart the earliest epoch any old rank was still
        reading, from its beginning, with this loader's split (data/reshape.py). Returns {source label: epoch
        restarted}; every rank of the new world gets the same."""
        states, epochs = reshaped_states(self, old_states, STATE_VERSION)
        for part, state in enumerate(states):
            self._check_positions(part, state)
        self._start_from(states, 0)
        return epochs

    def _start_from(self, states: list[dict[str, Any]], next_partition: int) -> None:
        self.close()
        self._states, self._next = states, next_partition
        if self.config.num_workers == 0 or not self.config.worker_processes:
            # build now, so a state that does not fit the data fails here and not at the next batch
            self._streams = [PartitionStream(self.sources, self.plans, self.schedule, self.spec(p), self._states[p])
                             for p in range(self.partitions)]

    def _check_positions(self, part: int, saved: Any) -> None:
        """Cheap shape and range checks, so a damaged state fails at load time in every mode."""
        problem = ""
        positions = saved.get("sources") if isinstance(saved, dict) else None
        if not isinstance(positions, list) or len(positions) != len(self.sources):
            problem = "wrong number of sources"
        else:
            for plan, pos in zip(self.plans, positions, strict=True):
                keys = ("epoch", "shard", "member", "offset", "rows")
                if (not isinstance(pos, dict) or not all(isinstance(pos.get(k), int) and pos[k] >= 0 for k in keys)
                        or not isinstance(pos.get("shift", 0), int) or epoch_rows(pos) < 0):
                    problem = f"bad position {pos!r}"
                elif pos["shard"] >= len(plan.shards(pos["epoch"], self.config.rank, part)):
                    problem = f"position {pos!r} is past the partition's shards"
        counters = saved.get("counters", {}) if isinstance(saved, dict) else None
        if not problem and not (isinstance(counters, dict) and all(isinstance(v, int) for v in counters.values())):
            problem = "bad counters"
        if problem:
            raise ValueError(f"loader state for partition {part} points outside the data or is damaged ({problem}); "
                             "was it saved for this dataset?")

    # ----- reporting ----------------------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        """The epoch in progress: the least advanced over sources and partitions (data/plan.py's equal-rows rule,
        so the same on every rank at every batch)."""
        return min(self.epochs().values())

    def epochs(self) -> dict[str, int]:
        """Per source label: its epoch in progress (the least advanced partition's)."""
        out = {}
        for s, (source, plan) in enumerate(zip(self.sources, self.plans, strict=True)):
            out[source.label] = min(plan.epoch_of_row(p, epoch_rows(self._states[p]["sources"][s]))
                                    for p in range(self.partitions))
        return out

    def stats(self) -> dict[str, int]:
        """Counters up to the last handed-out batch: skipped_shards/<reason>, skipped_samples/<reason> (only
        those that happened), tokens/<source> (tokens in rows handed out), epoch/<source>."""
        out: dict[str, int] = {}
        for state in self._states:
            for key, value in state.get("counters", {}).items():
                out[key] = out.get(key, 0) + int(value)
        for s, source in enumerate(self.sources):
            rows = sum(int(state["sources"][s]["rows"]) for state in self._states)
            out[f"tokens/{source.label}"] = rows * self.config.seq_len
        out.update({f"epoch/{label}": epoch for label, epoch in self.epochs().items()})
        return out

    # ----- shutdown -------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop worker processes (if any); the loader can still be iterated again (workers restart)."""
        workers, self._workers = self._workers, None
        if workers is not None:
            shutdown = getattr(workers, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
        self._streams = None

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown; nothing left to report to
            pass


def build_loader(
    sources: list[tuple[str, float]],
    seq_len: int,
    batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    num_workers: int = 0,
    on_bad_data: str = "fail",
    shuffle_documents: bool = True,
    read_stall_s: float = 30.0,
    read_timeout_s: float = 300.0,
    cache_dir: str = "",
    cache_max_bytes: int = 64 << 30,
) -> Loader:
    """The trainer's entry point; a single source is [(path, 1.0)]. See LoaderConfig for the arguments."""
    return Loader(LoaderConfig(sources=list(sources), seq_len=seq_len, batch_size=batch_size, rank=rank,
                               world_size=world_size, seed=seed, num_workers=num_workers, on_bad_data=on_bad_data,
                               shuffle_documents=shuffle_documents, read_stall_s=read_stall_s,
                               read_timeout_s=read_timeout_s, cache_dir=cache_dir,
                               cache_max_bytes=cache_max_bytes))


__all__ = ["BadDataError", "Loader", "LoaderConfig", "build_loader"]
