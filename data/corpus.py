"""Corpus readers: turn input paths, directories and globs into a stream of (source, text) documents.

One reader per file suffix, looked up in READERS (longest matching suffix wins, so `.jsonl.gz` is not read as
`.gz`). Line-oriented formats are streamed, never read whole, so a multi-gigabyte `.jsonl.zst` costs a buffer of
memory. Readers report the on-disk bytes they have consumed (compressed bytes for compressed files) in
CorpusStats.input_bytes, which is what the progress bar's ETA is computed from.
"""

from __future__ import annotations

import fnmatch
import glob
import io
import json
import os
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

DECODE_ERROR_POLICIES = ("error", "skip")
_PROGRESS_LINES = 512  # how often line readers refresh CorpusStats.input_bytes


@dataclass
class CorpusStats:
    """Counts gathered while reading, so the caller can report what was read and what was left out."""

    files: int = 0
    """Files opened."""
    documents: int = 0
    """Documents yielded, empty ones included."""
    empty: int = 0
    """Documents whose text is the empty string (yielded; the caller decides to skip them)."""
    bytes: int = 0
    """UTF-8 bytes of document text yielded."""
    input_bytes: int = 0
    """On-disk bytes of the input files consumed so far (compressed size for .gz/.zst/.parquet)."""
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """(source, reason) for every document left out under decode_errors='skip'."""


Decoder = Callable[[bytes, str], "str | None"]
"""Turns raw bytes of the document named by source into text, or None when the document is skipped."""


@dataclass
class _Context:
    """What a reader needs besides the path."""

    text_field: str
    decode: Decoder
    stats: CorpusStats


def _strict_decode(data: bytes, source: str) -> str:
    """Strict UTF-8; the error names the source and the byte offset so the user can find it."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{source}: not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}); "
            "convert it to UTF-8 or pass --on-decode-error skip"
        ) from None


def _cannot_read(path: Path, e: OSError) -> ValueError:
    return ValueError(f"cannot read input file {path}: {e.strerror or e}")


def _read_whole_file(path: Path, ctx: _Context) -> Iterator[tuple[str, str]]:
    """Plain text and source files: the whole file is one document."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise _cannot_read(path, e) from None
    ctx.stats.input_bytes += len(data)
    text = ctx.decode(data, str(path))
    if text is not None:
        yield str(path), text


def _open_plain(raw: BinaryIO) -> BinaryIO:
    return raw


def _open_gzip(raw: BinaryIO) -> BinaryIO:
    import gzip

    return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]


def _open_zstd(raw: BinaryIO) -> BinaryIO:
    try:
        import zstandard
    except ImportError:
        raise ValueError("reading .zst files needs the zstandard package: run `bash scripts/setup.sh`") from None
    # read_across_frames: files made by concatenating zstd frames (common for sharded dumps) read as one
    reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
    return io.BufferedReader(reader, 1 << 20)  # type: ignore[arg-type, return-value]


def _jsonl_reader(opener: Callable[[BinaryIO], BinaryIO]) -> Callable[[Path, _Context], Iterator[tuple[str, str]]]:
    def read(path: Path, ctx: _Context) -> Iterator[tuple[str, str]]:
        yield from _read_jsonl(path, ctx, opener)

    return read


def _read_jsonl(path: Path, ctx: _Context, opener: Callable[[BinaryIO], BinaryIO]) -> Iterator[tuple[str, str]]:
    """One JSON object per line; blank lines (e.g. a trailing one) are not documents and are passed over."""
    base = ctx.stats.input_bytes
    try:
        raw = open(path, "rb")  # noqa: SIM115 - closed in the finally below, after the generator is done
    except OSError as e:
        raise _cannot_read(path, e) from None
    lineno = 0
    try:
        stream = opener(raw)
        lines = iter(stream)
        while True:
            try:
                line_bytes = next(lines, None)
            except (OSError, EOFError, zlib.error) as e:  # truncated gzip, bad zstd frame, I/O error
                raise ValueError(f"{path}: cannot read past line {lineno} ({e or type(e).__name__}); the file is "
                                 "damaged or truncated") from None
            except Exception as e:
                if type(e).__module__.startswith("zstandard"):  # ZstdError derives from Exception only
                    raise ValueError(f"{path}: cannot decompress past line {lineno} ({e}); the file is damaged "
                                     "or truncated") from None
                raise
            if line_bytes is None:
                break
            lineno += 1
            if lineno % _PROGRESS_LINES == 0:
                ctx.stats.input_bytes = base + raw.tell()
            source = f"{path}:{lineno}"
            line = ctx.decode(line_bytes.rstrip(b"\r\n"), source)
            if line is None or not line.strip():
                continue
            yield source, _json_text(line, source, ctx.text_field)
    finally:
        ctx.stats.input_bytes = base + os.fstat(raw.fileno()).st_size
        raw.close()


def _json_text(line: str, source: str, text_field: str) -> str:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{source}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{source}: expected a JSON object per line, got {type(obj).__name__}")
    if text_field not in obj:
        keys = ", ".join(sorted(obj)[:10]) or "none"
        raise ValueError(f"{source}: no field {text_field!r} (fields: {keys}); pass --text-field to pick the "
                         "text field")
    text = obj[text_field]
    if not isinstance(text, str):
        raise ValueError(f"{source}: field {text_field!r} is {type(text).__name__}, expected a string")
    return text


def _read_parquet(path: Path, ctx: _Context) -> Iterator[tuple[str, str]]:
    """One document per row of the text column; a null cell is an empty document (counted, not written)."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError("reading .parquet files needs the pyarrow package: run `bash scripts/setup.sh`") from None
    base = ctx.stats.input_bytes
    try:
        size = path.stat().st_size
        pf = pq.ParquetFile(path)
    except OSError as e:
        raise _cannot_read(path, e) from None
    except pa.ArrowException as e:
        raise ValueError(f"{path}: not a readable parquet file ({e})") from None
    names = pf.schema_arrow.names
    if ctx.text_field not in names:
        raise ValueError(f"{path}: no column {ctx.text_field!r} (columns: {', '.join(names[:10])}); "
                         "pass --text-field to pick the text column")
    kind = pf.schema_arrow.field(ctx.text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
        raise ValueError(f"{path}: column {ctx.text_field!r} has type {kind}, expected a string column")
    total = max(pf.metadata.num_rows, 1)
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=1024, columns=[ctx.text_field]):
            for text in batch.column(0).to_pylist():
                row += 1
                yield f"{path}:row{row}", text if text is not None else ""
            ctx.stats.input_bytes = base + size * row // total
    except pa.ArrowException as e:
        raise ValueError(f"{path}: cannot read past row {row} ({e})") from None
    ctx.stats.input_bytes = base + size


Reader = Callable[[Path, _Context], Iterator[tuple[str, str]]]

READERS: dict[str, Reader] = {
    ".jsonl": _jsonl_reader(_open_plain),
    ".jsonl.gz": _jsonl_reader(_open_gzip),
    ".jsonl.zst": _jsonl_reader(_open_zstd),
    ".parquet": _read_parquet,
    ".txt": _read_whole_file,
    ".py": _read_whole_file,
    ".md": _read_whole_file,
    ".rst": _read_whole_file,
}
"""Supported suffix -> reader yielding (source, text)."""


def reader_suffix(path: Path) -> str | None:
    """The READERS key that path's name ends with (the longest one), or None."""
    name = path.name.lower()
    matches = [suffix for suffix in READERS if name.endswith(suffix)]
    return max(matches, key=len) if matches else None


def _supported(path: Path) -> bool:
    return reader_suffix(path) is not None


def _check_supported(path: Path) -> None:
    if not _supported(path):
        raise ValueError(
            f"input file {path}: unsupported extension {''.join(path.suffixes) or '(none)'!r}; "
            f"supported: {', '.join(sorted(READERS))}"
        )


def _walk(directory: Path) -> Iterator[Path]:
    """Supported files under a directory, recursively. Hidden entries (.git, .venv) are left out, as glob does."""
    for root, dirs, files in os.walk(directory, followlinks=False):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if not name.startswith("."):
                path = Path(root) / name
                if _supported(path):
                    yield path


def _has_magic(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def expand_inputs(patterns: Iterable[str], exclude: Iterable[str] = ()) -> list[Path]:
    """Expand files, directories (recursive) and globs (`**` allowed) into a sorted, deduplicated file list.

    Files named explicitly or matched by a glob must have a supported extension; a directory contributes
    only its supported files. `exclude` holds fnmatch patterns tested against each absolute path (`*` also
    matches `/`), e.g. `*/site-packages/*`. A pattern that yields nothing is an error, so a typo never
    silently shrinks the corpus.
    """
    patterns = list(patterns)
    exclude = list(exclude)
    if not patterns:
        raise ValueError("no inputs given; pass --input PATH_OR_GLOB")
    found: dict[str, Path] = {}
    for pattern in patterns:
        matches: list[Path] = []
        candidates = (
            [Path(p) for p in glob.glob(pattern, recursive=True)] if _has_magic(pattern) else [Path(pattern)]
        )
        if not _has_magic(pattern) and not candidates[0].exists():
            raise ValueError(f"input {pattern!r}: no such file or directory")
        for candidate in candidates:
            if candidate.is_dir():
                matches.extend(_walk(candidate))
            else:
                _check_supported(candidate)
                matches.append(candidate)
        kept = [m for m in matches if not any(fnmatch.fnmatch(str(m.absolute()), x) for x in exclude)]
        if not kept:
            why = " (after --exclude)" if matches else ""
            raise ValueError(f"input {pattern!r} matches no supported file{why}; supported: {', '.join(READERS)}")
        for path in kept:
            found.setdefault(os.path.realpath(path), path.absolute())
    return sorted(found.values(), key=str)


def input_bytes(paths: Iterable[Path]) -> int:
    """Total on-disk size of the inputs (what CorpusStats.input_bytes counts towards); unreadable ones count 0."""
    total = 0
    for path in paths:
        try:
            total += path.stat().st_size
        except OSError:
            pass
    return total


def iter_documents(
    paths: Iterable[Path],
    text_field: str = "text",
    decode_errors: str = "error",
    stats: CorpusStats | None = None,
) -> Iterator[tuple[str, str]]:
    """Yield (source, text) for every document, empty ones included (counted in stats.empty).

    text_field names the JSON field or the parquet column holding the text. decode_errors='error' raises on
    the first non-UTF-8 document; 'skip' leaves it out and records it in stats.skipped (a file for whole-file
    formats, a line for JSONL). Raises ValueError at the end when no document had any text, listing the inputs.
    """
    if decode_errors not in DECODE_ERROR_POLICIES:
        raise ValueError(f"decode_errors={decode_errors!r}; choose one of {DECODE_ERROR_POLICIES}")
    stats = stats if stats is not None else CorpusStats()

    def skip_bad(data: bytes, source: str) -> str | None:
        try:
            return _strict_decode(data, source)
        except ValueError as e:
            stats.skipped.append((source, str(e).split(": ", 1)[1].split(";", 1)[0]))
            return None

    ctx = _Context(text_field, _strict_decode if decode_errors == "error" else skip_bad, stats)
    paths = list(paths)
    nonempty = 0
    for path in paths:
        _check_supported(path)
        stats.files += 1
        for source, text in READERS[reader_suffix(path) or ""](path, ctx):
            stats.documents += 1
            stats.bytes += len(text.encode("utf-8"))
            if text:
                nonempty += 1
            else:
                stats.empty += 1
            yield source, text
    if nonempty == 0:
        listed = ", ".join(str(p) for p in paths[:5]) + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")
        raise ValueError(f"empty corpus: no document with any text in {len(paths)} input file(s): {listed}")
