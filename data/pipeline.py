"""The prepare pipeline behind `python -m launch.prepare`: inputs -> tokenizer -> shards -> manifest.

Output layout in out_dir: tokenizer/spm.model and the HF tokenizer files beside it, shard-NNNNNN.tar,
manifest.json (written last, so its presence means the shards are complete).

Parallelism: SentencePiece encodes a batch of documents on num_threads C++ threads (all cores by default);
reading and the tar writing stay in this process, in input order, so the output is byte-identical whatever
num_threads is.

Long documents are split, never dropped: a document longer than max_document_tokens (by default the most that
fits in one shard of shard_bytes) is written as consecutive samples, so every shard respects its byte bound.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data.corpus import DECODE_ERROR_POLICIES, CorpusStats, expand_inputs, input_bytes, iter_documents
from data.hf_tokenizer import write_hf_tokenizer
from data.manifest import MANIFEST_NAME, Manifest, write_manifest
from data.shards import DEFAULT_SHARD_BYTES, ShardWriter, max_payload_bytes, remove_stale_shards
from data.tokenizer import SPECIAL_TOKENS, Tokenizer, train_tokenizer

TOKENIZER_DIR = "tokenizer"
TOKENIZER_FILE = "spm.model"
BATCH_CHARS = 4 * 1024 * 1024
"""Text handed to SentencePiece per encode call: big enough to keep every thread busy, small in memory."""


@dataclass
class PrepareConfig:
    """Everything launch.prepare needs; the CLI flags map one to one."""

    inputs: list[str]
    """Files, directories (recursive) or globs (`**` allowed)."""
    out_dir: Path
    """Output folder (created); previous shards in it are replaced."""
    tokenizer: Path | None = None
    """An existing cloze SentencePiece model to reuse; None trains one on the inputs."""
    vocab_size: int = 8000
    """Vocabulary size when training a tokenizer."""
    shard_bytes: int = DEFAULT_SHARD_BYTES
    """Upper bound on a shard's file size (a single larger document gets a shard of its own)."""
    max_shard_documents: int | None = None
    """Optional cap on documents per shard."""
    max_document_tokens: int | None = None
    """Longest sample in tokens; longer documents become consecutive samples. None: the most one shard holds."""
    text_field: str = "text"
    """JSONL field or parquet column that holds the text."""
    max_tokenizer_sentences: int = 8000
    """Segments (up to 1024 characters each) sampled to train the tokenizer."""
    exclude: list[str] = field(default_factory=list)
    """fnmatch patterns on absolute paths to leave out, e.g. '*/site-packages/*'."""
    decode_errors: str = "skip"
    """'skip' (report and leave out non-UTF-8 documents) or 'error' (stop at the first one)."""
    num_threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    """Threads for tokenization (does not change the output)."""
    tokenizer_threads: int = 2
    """Threads for tokenizer training; part of what makes the model bytes reproducible, so fixed by default."""
    model_max_length: int = 512
    """model_max_length written into the HF tokenizer config."""
    seed: int = 0
    """Seed for the tokenizer's training sample."""

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        if self.tokenizer is not None:
            self.tokenizer = Path(self.tokenizer)
        if not self.inputs:
            raise ValueError("no inputs given; pass --input PATH_OR_GLOB")
        if self.decode_errors not in DECODE_ERROR_POLICIES:
            raise ValueError(f"decode_errors={self.decode_errors!r}; choose one of {DECODE_ERROR_POLICIES}")
        if self.num_threads < 1 or self.tokenizer_threads < 1:
            raise ValueError(f"num_threads={self.num_threads} and tokenizer_threads={self.tokenizer_threads} "
                             "must be >= 1")
        if self.max_document_tokens is not None and self.max_document_tokens < 1:
            raise ValueError(f"max_document_tokens={self.max_document_tokens} must be >= 1")
        if self.max_tokenizer_sentences < 1:
            raise ValueError(f"max_tokenizer_sentences={self.max_tokenizer_sentences} must be >= 1")
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise ValueError(f"--out {self.out_dir} exists and is not a directory")


@dataclass
class PrepareResult:
    manifest: Manifest
    stats: CorpusStats
    """Counts from the tokenization pass (skipped documents listed)."""
    trained_tokenizer: bool
    seconds: dict[str, float]
    """Wall time per phase: 'tokenizer', 'shards', 'total'."""
    threads: int = 1
    """Tokenization threads used in the shards phase."""


@dataclass(frozen=True)
class ProgressInfo:
    """A snapshot handed to the progress callback now and then."""

    phase: str
    """'tokenizer' (reading the corpus to sample the tokenizer's training text), 'training' (once, when
    SentencePiece starts training) or 'shards' (tokenizing)."""
    documents: int
    """Documents read so far in this phase."""
    tokens: int
    """Tokens written so far (0 in the tokenizer phase)."""
    input_bytes: int
    """On-disk input bytes consumed so far in this phase."""
    total_bytes: int
    """On-disk size of all inputs: input_bytes / total_bytes is the phase's completed fraction."""


Progress = Callable[[ProgressInfo], None]


def _batches(docs: Iterator[tuple[str, str]]) -> Iterator[list[str]]:
    batch: list[str] = []
    size = 0
    for _, text in docs:
        batch.append(text)
        size += len(text)
        if size >= BATCH_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _install_tokenizer(config: PrepareConfig, paths: list[Path], progress: Progress | None) -> tuple[Path, bool]:
    """Copy the given tokenizer into out_dir, or train one; return (path, trained)."""
    target = config.out_dir / TOKENIZER_DIR / TOKENIZER_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    if config.tokenizer is not None:
        if not config.tokenizer.is_file():
            raise ValueError(f"--tokenizer {config.tokenizer}: no such file")
        Tokenizer(config.tokenizer)  # validates before anything is written
        if config.tokenizer.resolve() != target.resolve():
            shutil.copyfile(config.tokenizer, target)
        return target, False
    stats = CorpusStats()

    total = input_bytes(paths)

    def texts() -> Iterator[str]:
        for i, (_, text) in enumerate(iter_documents(paths, config.text_field, config.decode_errors, stats)):
            if progress is not None and i % 200 == 0:
                progress(ProgressInfo("tokenizer", stats.documents, 0, stats.input_bytes, total))
            yield text
        if progress is not None:  # the sample is drawn; SentencePiece now trains without reporting
            progress(ProgressInfo("training", stats.documents, 0, stats.input_bytes, total))

    train_tokenizer(
        texts(),
        target.parent,
        vocab_size=config.vocab_size,
        max_sentences=config.max_tokenizer_sentences,
        num_threads=config.tokenizer_threads,
        seed=config.seed,
    )
    return target, True


def prepare(config: PrepareConfig, progress: Progress | None = None) -> PrepareResult:
    """Run the whole pipeline; raises ValueError with a one-line message on any user-facing problem."""
    start = time.perf_counter()
    paths = expand_inputs(config.inputs, config.exclude)
    config.out_dir.mkdir(parents=True, exist_ok=True)
    # until the new manifest is written, the folder must not look like a finished dataset
    (config.out_dir / MANIFEST_NAME).unlink(missing_ok=True)
    spm_path, trained = _install_tokenizer(config, paths, progress)
    tokenizer = Tokenizer(spm_path)
    write_hf_tokenizer(spm_path, spm_path.parent, config.model_max_length)
    after_tokenizer = time.perf_counter()

    stats = CorpusStats()
    writer = ShardWriter(config.out_dir, tokenizer.id_dtype, config.shard_bytes, config.max_shard_documents)
    longest = max_payload_bytes(config.shard_bytes) // np.dtype(tokenizer.id_dtype).itemsize
    if config.max_document_tokens is not None:
        longest = min(longest, config.max_document_tokens)
    total = input_bytes(paths)
    split = 0
    docs = iter_documents(paths, config.text_field, config.decode_errors, stats)
    for batch in _batches(docs):
        for ids in tokenizer.encode_batch(batch, num_threads=config.num_threads):
            if ids.size > longest:
                split += 1
            for cut in range(0, ids.size, longest):
                writer.add(ids[cut : cut + longest])
        if progress is not None:
            progress(ProgressInfo("shards", stats.documents, writer.tokens, stats.input_bytes, total))
    shards = writer.close()
    manifest = Manifest(
        id_dtype=tokenizer.id_dtype,
        vocab_size=tokenizer.vocab_size,
        tokenizer_relpath=f"{TOKENIZER_DIR}/{TOKENIZER_FILE}",
        tokenizer_sha256=tokenizer.sha256,
        special_ids={name: i for i, name in enumerate(SPECIAL_TOKENS)},
        documents=writer.documents,
        tokens=writer.tokens,
        empty_documents=stats.empty,
        skipped_documents=len(stats.skipped),
        split_documents=split,
        shards=shards,
        root=config.out_dir,
    )
    write_manifest(manifest, config.out_dir)
    remove_stale_shards(config.out_dir, shards)
    end = time.perf_counter()
    seconds = {"tokenizer": after_tokenizer - start, "shards": end - after_tokenizer, "total": end - start}
    return PrepareResult(manifest=manifest, stats=stats, trained_tokenizer=trained, seconds=seconds,
                         threads=config.num_threads)
