"""The training data loader: build_loader(sources, ...) -> Loader, an endless, exactly resumable iterator.

    loader = build_loader([("runs/web", 0.7), ("https://host/code", 0.3)], seq_len=512, batch_size=32,
                          rank=rank, world_size=world, seed=0, num_workers=2, on_bad_data="skip")
    input_ids, doc_ids = next(loader)          # int64 [batch_size, seq_len], forever
    state = loader.state_dict()                # JSON; load_state_dict(state) continues at the next batch

Order. There is one global sequence of packed rows, a function of the data and the seed only (data/order.py:
shards permuted per epoch, documents shuffled across windows of data.shuffle_window_shards shards; data/rows.py:
packing and the mixture). Each global step of batch_size x world_size rows is dealt out in contiguous slices,
one per rank. The world size, num_workers and the batch size decide only who gets which rows, never which rows
come next. `shapes` changes seq_len and batch_size at named global rows (sequence-length phases): each source's
packing continues where it stands, at the new length, so no document is lost or repeated at a switch.

Workers. With num_workers > 0 each worker process walks the same global sequence and builds the batches of every
num_workers-th step of this rank; batches are taken from the workers in strict round robin, so the batch
sequence never depends on timing.

Exact resume, on any layout. Every batch travels with the state of the global sequence right after it: the
cursor (global rows handed out), each source's position and the bad-data counters. The loader keeps the state
attached to the last batch it handed out (batches prefetched by workers but never handed out are not in it);
that is state_dict(). It is the same on every rank, so load_state_dict() of any rank's state continues at the
exact next global row on any world size, num_workers or batch size (load_reshaped takes every old rank's state,
checks that they agree, and does the same). What must stay: the sources, the seed, seq_len and the rows and
lengths of the shape knots, shuffle_documents, shuffle_window_shards and the source-mix schedule (its knots are
global rows). States saved
by an older cloze (version 2, whose order depended on the world size) are refused.

Failures. An exception in a worker comes back in the main process as one clear error (BadDataError, a
ValueError, for bad data under on_bad_data='fail'); a worker that dies is reported by torch's DataLoader within
seconds; close() (also on error, and at exit) shuts the workers down.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data.cache import ShardCache
from data.location import FetchError, FetchLimits, Location, same_dataset
from data.manifest import MAX_META_BYTES, Manifest, file_sha256
from data.order import MixSchedule, SourceOrder
from data.reader import ON_BAD_DATA, BadDataError, Source
from data.reshape import agreed_state
from data.rows import POSITION_KEYS, RowSpec, RowStream, initial_state

STATE_VERSION = 3
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
    """Number of ranks; rank r gets the r-th slice of every global step's rows."""
    seed: int = 0
    """Seeds the per-epoch shard orders and the document order inside each window."""
    num_workers: int = 0
    """Worker processes per rank (0: read in the main process). Not part of the data order."""
    on_bad_data: str = "fail"
    """'fail': the first bad shard or sample stops the loader with an error naming it; 'skip': leave it out and
    count it in stats()."""
    shuffle_documents: bool = True
    """Visit each shard's documents in a seeded per-epoch permutation (prepare writes them in corpus order, so
    near-duplicates sit side by side); False reads them in file order. Part of the data order."""
    shuffle_window_shards: int = 4
    """Documents are shuffled across windows of this many consecutive shards of the epoch's shard order (1: inside
    each shard only). Memory: every reader (each rank, or each of its workers) holds one window per source, i.e.
    up to shuffle_window_shards x the shard size (launch.prepare --shard-bytes) per source. Part of the data
    order."""
    worker_processes: bool = True
    """False serves the batches from the main process: the same batches, no processes (for debugging and for
    tests that compare against the processes)."""
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
    schedule: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    """Source-mix knots after row 0: (global row, {source: weight}), the source named as in `sources`, a source
    left out weighs 0 there; the weights of `sources` are the mix at row 0 (data/order.py, MixSchedule). Rows
    strictly increase. Part of the data order."""
    schedule_between: str = "linear"
    """'linear': the weights move row by row from knot to knot; 'hold': each knot's weights hold until the next."""
    shapes: list[tuple[int, int, int]] = field(default_factory=list)
    """Shape knots after row 0: (global row, seq_len, batch_size); seq_len and batch_size above are the shape at
    row 0. From a knot's row on, rows have its seq_len and each batch its batch_size rows. A knot's row must be
    where a global step starts: a whole number of the previous shape's steps (batch_size x world_size rows)
    after the previous knot. The rows and lengths are part of the data order; the batch sizes are not."""
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
        if not (isinstance(self.shuffle_window_shards, int) and self.shuffle_window_shards >= 1):
            raise ValueError(f"shuffle_window_shards={self.shuffle_window_shards!r} must be an integer >= 1")
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
        self._check_schedule()
        self._check_shapes()

    def _check_shapes(self) -> None:
        checked: list[tuple[int, int, int]] = []
        row, batch = 0, self.batch_size
        for item in self.shapes:
            if not (isinstance(item, (tuple, list)) and len(item) == 3 and all(
                    isinstance(x, int) and not isinstance(x, bool) for x in item)):
                raise ValueError(f"shape knot {item!r} must be a (global row, seq_len, batch_size) triple of ints")
            at, knot_seq, knot_batch = item
            step_rows = batch * self.world_size
            if at <= row or (at - row) % step_rows:
                raise ValueError(f"shape knot at global row {at} must lie after row {row} by a whole number of "
                                 f"global steps of {step_rows} rows (batch_size {batch} x world_size "
                                 f"{self.world_size}): a global step is never cut by a change of shape")
            if knot_seq < 1 or knot_batch < 1:
                raise ValueError(f"shape knot {item!r}: seq_len and batch_size must be >= 1")
            checked.append((at, knot_seq, knot_batch))
            row, batch = at, knot_batch
        self.shapes = checked

    def _check_schedule(self) -> None:
        specs = [spec for spec, _ in self.sources]
        if self.schedule_between not in ("linear", "hold"):
            raise ValueError(f"schedule_between={self.schedule_between!r}; choose linear or hold")
        checked = []
        for item in self.schedule:
            if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[1], dict)):
                raise ValueError(f"source-mix knot {item!r} must be a (global row, {{source: weight}}) pair")
            row, weights = item
            if unknown := sorted(set(map(str, weights)) - set(specs)):
                raise ValueError(f"source-mix knot at row {row} names {unknown}, not among the sources {specs}")
            checked.append((row, {str(k): float(v) for k, v in weights.items()}))
        self.schedule = checked
        self.mix_schedule()  # refuses rows out of order and bad weights now, not at the first batch

    def mix_schedule(self) -> MixSchedule:
        """The row mixture: the sources' weights, then the schedule's knots."""
        knots = [(row, [w.get(spec, 0.0) for spec, _ in self.sources]) for row, w in self.schedule]
        return MixSchedule([w for _, w in self.sources], knots, self.schedule_between)


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


class _WorkerData(IterableDataset):
    """What each worker process runs: the global sequence from the start state, building every num_workers-th
    step (its own, counted from the start) and walking past the others."""

    def __init__(self, loader: Loader, state: dict[str, Any]):
        self.sources, self.orders, self.schedule = loader.sources, loader.orders, loader.schedule
        self.spec, self.state = loader.spec(), state

    def __iter__(self):
        info = get_worker_info()
        assert info is not None, "_WorkerData runs only inside DataLoader workers"
        try:
            stream = RowStream(self.sources, self.orders, self.schedule, self.spec, self.state)
            step = 0
            while True:
                if step % info.num_workers == info.id:
                    ids, docs = stream.next_batch()
                    yield ids, docs, info.id, stream.state(), stream.drain_opened()
                else:
                    stream.skip_batch()
                step += 1
        except Exception as e:  # noqa: BLE001 - handed to the main process in the batch's slot, raised there
            yield None, None, info.id, {"type": type(e).__name__, "bad_data": isinstance(e, BadDataError),
                                        "value_error": isinstance(e, ValueError), "message": str(e)}, []


class Loader:
    """Endless iterator of (input_ids, doc_ids), int64 [batch_size, seq_len] (the shape of the step's phase, when
    `shapes` has knots); see the module docstring."""

    def __init__(self, config: LoaderConfig):
        self.config = cfg = config
        self.sources = _open_sources(cfg)
        self.orders = [SourceOrder(len(s.manifest.shards), cfg.seed, s.index, cfg.shuffle_window_shards,
                                   cfg.shuffle_documents) for s in self.sources]
        self.schedule = cfg.mix_schedule()
        self.consumed_shards: list[str] = []
        """Shard files the global sequence opened up to the last handed-out batch, in order ('<label>/<file>' with
        several sources, the file name with one); the same on every rank. A shard reopened after load_state_dict
        appears again."""
        self._state = initial_state(len(self.sources))
        self._next = 0  # the worker whose batch comes next
        self._stream: RowStream | None = None  # in-process reading
        self._workers: Any = None  # DataLoader iterator

    @property
    def manifest(self):
        """The first source's manifest."""
        return self.sources[0].manifest

    def spec(self) -> RowSpec:
        cfg, special = self.config, self.sources[0].manifest.special_ids
        return RowSpec(rank=cfg.rank, world_size=cfg.world_size, seq_len=cfg.seq_len, batch_size=cfg.batch_size,
                       on_bad_data=cfg.on_bad_data, cls_id=special["[CLS]"], sep_id=special["[SEP]"],
                       shapes=tuple(cfg.shapes))

    # ----- iteration --------------------------------------------------------------------------------------------
    def __iter__(self) -> Loader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.config.num_workers > 0 and self.config.worker_processes:
            return self._next_from_workers()
        if self._stream is None:
            self._stream = RowStream(self.sources, self.orders, self.schedule, self.spec(), self._state)
        ids, docs = self._stream.next_batch()
        self._handed_out(self._stream.state(), self._stream.drain_opened())
        return ids, docs

    def _next_from_workers(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._workers is None:
            data = _WorkerData(self, dict(self._state))
            loader = DataLoader(data, batch_size=None, num_workers=self.config.num_workers,
                                prefetch_factor=self.config.prefetch_batches, timeout=self.config.timeout_s)
            self._workers, self._next = iter(loader), 0
        try:
            ids, docs, worker, state, opened = next(self._workers)
        except (ConnectionError, EOFError) as exc:
            # A batch a worker queued before it died carries its tensors as file descriptors that only the live
            # worker can hand over: reading it fails here rather than in DataLoader's own dead-worker check.
            self.close()
            where = f"data loader worker (rank {self.config.rank})"
            raise RuntimeError(f"{where} died while handing over a batch ({type(exc).__name__}: {exc}); "
                               "a restarted run resumes from its last checkpoint") from exc
        except Exception:
            self.close()
            raise
        if ids is None:
            self.close()
            where = f"data loader worker (rank {self.config.rank}, worker {worker})"
            message = f"{where}: {state['message']}"
            if state["bad_data"]:
                raise BadDataError(message)
            if state["value_error"]:
                raise ValueError(message)
            raise RuntimeError(f"{where} failed with {state['type']}: {state['message']}")
        assert worker == self._next, f"batch from worker {worker}, expected {self._next}: round robin broken"
        self._next = (worker + 1) % self.config.num_workers
        self._handed_out(state, opened)
        return ids, docs

    def _handed_out(self, state: dict[str, Any], opened: list[str]) -> None:
        self._state = state
        if len(self.sources) == 1:
            opened = [name.split("/", 1)[1] for name in opened]
        self.consumed_shards.extend(opened)

    # ----- position -----------------------------------------------------------------------------------------
    def fingerprint(self) -> dict[str, Any]:
        """What the global order depends on besides the data's bytes: a saved state resumes only a loader with
        the same fingerprint."""
        cfg = self.config
        return {"seed": cfg.seed, "shuffle_documents": cfg.shuffle_documents,
                "shuffle_window_shards": cfg.shuffle_window_shards, "seq_len": cfg.seq_len,
                "sources": [[s.label, s.weight, len(s.manifest.shards)] for s in self.sources],
                "schedule": self._schedule_fingerprint(),
                "seq_len_knots": [[row, seq] for row, seq, _ in cfg.shapes] or None}

    def _schedule_fingerprint(self) -> dict[str, Any] | None:
        """The source-mix knots as normalised weights per source, or None for a fixed mix (as older states,
        which lack the key, read)."""
        mix = self.schedule
        if not mix.scheduled:
            return None
        return {"between": mix.between, "knots": [[row, list(w)] for row, w in mix.knots[1:]]}

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position: load_state_dict() of it continues with the next global row, on any world
        size, num_workers or batch size. `layout` records who saved it (not needed to resume)."""
        cfg = self.config
        return {"version": STATE_VERSION, **self.fingerprint(),
                "layout": {"rank": cfg.rank, "world_size": cfg.world_size, "num_workers": cfg.num_workers,
                           "batch_size": cfg.batch_size},
                "rows": self._state["rows"], "positions": [dict(p) for p in self._state["positions"]],
                "counters": dict(self._state["counters"])}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from state_dict() of a loader over the same sources, seed, seq_len and shuffle settings, with
        any rank, world size, num_workers and batch size."""
        version = state.get("version") if isinstance(state, dict) else None
        if isinstance(version, int) and version < STATE_VERSION:
            raise ValueError(f"loader state version {version} was saved by an older cloze whose data order depended "
                             "on the world size; this cloze cannot continue it: finish that run with the older "
                             "cloze, or start afresh in a new out_dir")
        if version != STATE_VERSION:
            got = version if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"loader state version {got!r} is not {STATE_VERSION} (saved by another cloze?)")
        for key, value in self.fingerprint().items():
            saved = state.get(key)
            if saved != value:
                if key == "schedule":
                    raise ValueError(f"loader state was saved with the source-mix schedule {saved!r:.200}, this loader "
                                     f"has {value!r:.200} (knots in global rows); resume with the same data.schedule, "
                                     "train.max_steps and global batch (micro x accum x world)")
                if key == "seq_len_knots":
                    raise ValueError(f"loader state was saved with sequence-length phases starting at global rows "
                                     f"{saved!r:.200} ([row, seq_len]), this loader has {value!r:.200}; resume with "
                                     "the same data.seq_len_phases, train.max_steps and global batch")
                raise ValueError(f"loader state was saved with {key}={saved!r}, this loader has {value!r}; resume "
                                 "with the same data sources, seed, seq_len, shuffle_documents and "
                                 "shuffle_window_shards")
        checked = self._checked(state)
        self.close()
        self._state = checked
        if self.config.num_workers == 0 or not self.config.worker_processes:
            # build now, so a state that does not fit the data fails here and not at the next batch
            self._stream = RowStream(self.sources, self.orders, self.schedule, self.spec(), self._state)

    def load_reshaped(self, old_states: list[dict[str, Any]]) -> dict[str, int]:
        """Resume from the state_dict() of every rank of a run with another world size or num_workers: the states
        must agree (one global position, data/reshape.py); the loader continues at its next global row. Returns
        {source label: epoch in progress}."""
        self.load_state_dict(agreed_state(old_states))
        return self.epochs()

    def _checked(self, state: dict[str, Any]) -> dict[str, Any]:
        """The position part of a state after shape and range checks, so a damaged state fails at load time in
        every mode."""
        problem = ""
        rows, positions, counters = state.get("rows"), state.get("positions"), state.get("counters")
        if not isinstance(rows, int) or rows < 0:
            problem = f"bad row cursor {rows!r}"
        elif not isinstance(positions, list) or len(positions) != len(self.sources):
            problem = "wrong number of sources"
        elif not (isinstance(counters, dict) and all(isinstance(v, int) for v in counters.values())):
            problem = "bad counters"
        else:
            for order, pos in zip(self.orders, positions, strict=True):
                if not (isinstance(pos, dict) and all(isinstance(pos.get(k), int) and pos[k] >= 0
                                                      for k in POSITION_KEYS)):
                    problem = f"bad position {pos!r}"
                elif pos["window"] >= order.windows_per_epoch:
                    problem = f"position {pos!r} is past the epoch's last window"
            if not problem and sum(p["rows"] for p in positions) != rows:
                problem = f"the sources' rows do not add up to the cursor {rows}"
        if problem:
            raise ValueError(f"loader state points outside the data or is damaged ({problem}); was it saved for "
                             "this dataset?")
        for pos in positions:
            if "tokens" in pos and not (isinstance(pos["tokens"], int) and pos["tokens"] >= pos["rows"]):
                raise ValueError(f"loader state is damaged (bad token count in {pos!r:.200}); was it saved for "
                                 "this dataset?")
        seq_len = self.config.seq_len  # a state without token counts was saved by a run without shapes
        return {"rows": rows, "positions": [{**{k: p[k] for k in POSITION_KEYS},
                                             "tokens": p.get("tokens", p["rows"] * seq_len)} for p in positions],
                "counters": {str(k): int(v) for k, v in counters.items()}}

    # ----- reporting ----------------------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        """The epoch in progress: the least advanced over sources (the same on every rank at every batch)."""
        return min(self.epochs().values())

    def epochs(self) -> dict[str, int]:
        """Per source label: the epoch of the next document its rows are cut from."""
        return {source.label: int(pos["epoch"]) for source, pos in zip(self.sources, self._state["positions"],
                                                                        strict=True)}

    def rows(self) -> int:
        """Global rows handed out up to the last batch, by all ranks together (the cursor)."""
        return int(self._state["rows"])

    def stats(self) -> dict[str, int]:
        """Counters up to the last handed-out batch. Every rank reads the same global sequence, so the counts of
        the whole run come from rank 0 only (summing over ranks gives them once): skipped_shards/<reason>,
        skipped_samples/<reason> (only those that happened), tokens/<source> (tokens of the global rows handed
        out, whatever their lengths). Every rank: epoch/<source>."""
        out: dict[str, int] = {}
        if self.config.rank == 0:
            out.update({k: int(v) for k, v in self._state["counters"].items()})
            for source, pos in zip(self.sources, self._state["positions"], strict=True):
                out[f"tokens/{source.label}"] = int(pos["tokens"])
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
        self._stream = None

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
    shuffle_window_shards: int = 4,
    read_stall_s: float = 30.0,
    read_timeout_s: float = 300.0,
    cache_dir: str = "",
    cache_max_bytes: int = 64 << 30,
    schedule: list[tuple[int, dict[str, float]]] | None = None,
    schedule_between: str = "linear",
    shapes: list[tuple[int, int, int]] | None = None,
) -> Loader:
    """The trainer's entry point; a single source is [(path, 1.0)]. See LoaderConfig for the arguments."""
    return Loader(LoaderConfig(sources=list(sources), seq_len=seq_len, batch_size=batch_size, rank=rank,
                               world_size=world_size, seed=seed, num_workers=num_workers, on_bad_data=on_bad_data,
                               shuffle_documents=shuffle_documents, shuffle_window_shards=shuffle_window_shards,
                               read_stall_s=read_stall_s, read_timeout_s=read_timeout_s, cache_dir=cache_dir,
                               cache_max_bytes=cache_max_bytes, schedule=list(schedule or []),
                               schedule_between=schedule_between, shapes=list(shapes or [])))


__all__ = ["BadDataError", "Loader", "LoaderConfig", "build_loader"]
