"""python -m launch.prepare: tokenize a corpus into WebDataset shards plus manifest.json.

    python -m launch.prepare --input 'corpus/**/*.py' web.jsonl.zst --out runs/data [--tokenizer EXISTING.model]

Inputs: .txt/.py/.md/.rst (one document per file), .jsonl, .jsonl.gz, .jsonl.zst (--text-field) and .parquet
(--text-field names the column). Progress goes to stderr, the summary to stdout; a user mistake is one
`error: ...` line and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from data.pipeline import PrepareConfig, PrepareResult, ProgressInfo, prepare
from data.shards import DEFAULT_SHARD_BYTES

PROGRESS_EVERY_S = 2.0
"""Seconds between progress lines when stderr is not a terminal (a log file)."""
PROGRESS_TTY_EVERY_S = 0.25
"""Seconds between redraws of the progress bar on a terminal."""
BAR_WIDTH = 24


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m launch.prepare", description=__doc__.splitlines()[0])
    ap.add_argument("--input", action="extend", nargs="+", required=True, metavar="PATH_OR_GLOB",
                    help="files, directories (recursive) or globs with ** (quote them); several after one flag, "
                         "or the flag repeated")
    ap.add_argument("--out", required=True, type=Path, help="output folder")
    ap.add_argument("--tokenizer", type=Path, help="reuse this cloze SentencePiece model instead of training one")
    ap.add_argument("--vocab-size", type=int, default=8000)
    ap.add_argument("--shard-bytes", type=int, default=DEFAULT_SHARD_BYTES, help="upper bound on a shard's size")
    ap.add_argument("--max-shard-documents", type=int, default=None, help="upper bound on documents per shard")
    ap.add_argument("--max-document-tokens", type=int, default=None,
                    help="split longer documents into consecutive samples (default: the most one shard holds)")
    ap.add_argument("--text-field", default="text", help="JSONL field or parquet column holding the text")
    ap.add_argument("--max-tokenizer-sentences", type=int, default=8000,
                    help="segments (<= 1024 characters) sampled to train the tokenizer")
    ap.add_argument("--exclude", action="extend", nargs="+", default=[], metavar="PATTERN",
                    help="fnmatch patterns on absolute paths to leave out, e.g. '*/site-packages/*'; several after "
                         "one flag, or the flag repeated")
    ap.add_argument("--on-decode-error", choices=("skip", "error"), default="skip",
                    help="a document that is not UTF-8: skip it with a warning (default) or stop")
    ap.add_argument("--threads", type=int, default=None, help="tokenization threads (default: all cores)")
    ap.add_argument("--model-max-length", type=int, default=512, help="model_max_length in the HF tokenizer config")
    ap.add_argument("--seed", type=int, default=0, help="seed of the tokenizer's training sample")
    return ap


def _count(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n:.0f}"


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def progress_line(info: ProgressInfo, elapsed: float) -> str:
    """One progress bar line: fraction of the input read, documents/s, tokens/s and the ETA of the phase."""
    fraction = min(info.input_bytes / info.total_bytes, 1.0) if info.total_bytes else 0.0
    filled = int(fraction * BAR_WIDTH)
    bar = "#" * filled + "-" * (BAR_WIDTH - filled)
    elapsed = max(elapsed, 1e-9)
    eta = _clock(elapsed * (1 - fraction) / fraction) if fraction > 0 else "?"
    what = "reading for the tokenizer" if info.phase == "tokenizer" else "tokenizing"
    line = (f"[prepare] {what} {fraction:4.0%} |{bar}| {info.documents:,} docs ({_count(info.documents / elapsed)}/s)")
    if info.phase == "shards":
        line += f", {_count(info.tokens)} tokens ({_count(info.tokens / elapsed)}/s)"
    return line + f", ETA {eta}"


class _Progress:
    """Progress bar on stderr: redrawn in place on a terminal, one line every few seconds otherwise."""

    def __init__(self) -> None:
        self.phase = ""
        self.start = self.last = time.perf_counter()
        self.printed = False
        self.tty = sys.stderr.isatty()

    def __call__(self, info: ProgressInfo) -> None:
        now = time.perf_counter()
        if info.phase != self.phase:  # rates and ETA are per phase
            self.done()
            self.phase, self.start, self.last = info.phase, now, now
            if info.phase == "training":
                print(f"[prepare] training the tokenizer on a sample of {info.documents:,} documents "
                      "(no progress is reported while it trains)", file=sys.stderr, flush=True)
                return
        if now - self.last < (PROGRESS_TTY_EVERY_S if self.tty else PROGRESS_EVERY_S):
            return
        self.last = now
        self.printed = True
        line = progress_line(info, now - self.start)
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def done(self) -> None:
        if self.tty and self.printed:
            print(file=sys.stderr)
        self.printed = False


def summary(result: PrepareResult, out: Path) -> str:
    m, s = result.manifest, result.seconds
    lines = [
        f"prepared {out}",
        f"  documents      {m.documents:,} written, {m.empty_documents:,} empty skipped, "
        f"{m.skipped_documents:,} undecodable skipped, {m.split_documents:,} split (too long for one sample)",
        f"  tokens         {m.tokens:,} (vocab {m.vocab_size:,}, {m.id_dtype})",
        f"  shards         {len(m.shards):,} ({sum(x.bytes for x in m.shards) / 1e6:.1f} MB)",
        f"  tokenizer      {m.tokenizer_path} ({'trained' if result.trained_tokenizer else 'reused'}, "
        f"sha256 {m.tokenizer_sha256[:12]})",
        f"  wall time      {s['total']:.1f} s (tokenizer {s['tokenizer']:.1f} s, shards {s['shards']:.1f} s)",
        f"  tokenizing     {m.tokens / max(s['shards'], 1e-9):,.0f} tokens/s on {result.threads} thread(s)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    progress = _Progress()
    try:
        extra = {} if args.threads is None else {"num_threads": args.threads}
        config = PrepareConfig(
            inputs=args.input,
            out_dir=args.out,
            tokenizer=args.tokenizer,
            vocab_size=args.vocab_size,
            shard_bytes=args.shard_bytes,
            max_shard_documents=args.max_shard_documents,
            max_document_tokens=args.max_document_tokens,
            text_field=args.text_field,
            max_tokenizer_sentences=args.max_tokenizer_sentences,
            exclude=args.exclude,
            decode_errors=args.on_decode_error,
            model_max_length=args.model_max_length,
            seed=args.seed,
            **extra,
        )
        result = prepare(config, progress)
    except (ValueError, OSError) as e:
        progress.done()
        if os.environ.get("CLOZE_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        progress.done()
        print("interrupted", file=sys.stderr)
        return 130
    progress.done()
    for source, reason in result.stats.skipped:
        print(f"warning: skipped {source}: {reason}", file=sys.stderr)
    print(summary(result, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
