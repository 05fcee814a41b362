"""Corpus readers: turn input paths, directories and globs into a stream of (source, text) documents.

One reader per file suffix, looked up in READERS, so compressed JSONL or parquet can be added later by
registering another reader without touching the callers.
"""

from __future__ import annotations

import fnmatch
import glob
import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

DECODE_ERROR_POLICIES = ("error", "skip")


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
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """(source, reason) for every document left out under decode_errors='skip'."""


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read input file {path}: {e.strerror or e}") from None


Decoder = Callable[[bytes, str], "str | None"]
"""Turns raw bytes of the document named by source into text, or None when the document is skipped."""


def _strict_decode(data: bytes, source: str) -> str:
    """Strict UTF-8; the error names the source and the byte offset so the user can find it."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{source}: not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}); "
            "convert it to UTF-8 or pass --on-decode-error skip"
        ) from None


def _read_whole_file(path: Path, text_field: str, decode: Decoder) -> Iterator[tuple[str, str]]:
    """Plain text and source files: the whole file is one document."""
    del text_field
    source = str(path)
    text = decode(_read_bytes(path), source)
    if text is not None:
        yield source, text


def _read_jsonl(path: Path, text_field: str, decode: Decoder) -> Iterator[tuple[str, str]]:
    """One JSON object per line; blank lines (e.g. a trailing one) are not documents and are passed over."""
    data = _read_bytes(path)
    for lineno, raw in enumerate(data.splitlines(), start=1):
        source = f"{path}:{lineno}"
        line = decode(raw, source)
        if line is None or not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{source}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{source}: expected a JSON object per line, got {type(obj).__name__}")
        if text_field not in obj:
            keys = ", ".join(sorted(obj)[:10]) or "none"
            raise ValueError(
                f"{source}: no field {text_field!r} (fields: {keys}); pass --text-field to pick the text field"
            )
        text = obj[text_field]
        if not isinstance(text, str):
            raise ValueError(f"{source}: field {text_field!r} is {type(text).__name__}, expected a string")
        yield source, text


Reader = Callable[[Path, str, Decoder], Iterator[tuple[str, str]]]

READERS: dict[str, Reader] = {
    ".jsonl": _read_jsonl,
    ".txt": _read_whole_file,
    ".py": _read_whole_file,
    ".md": _read_whole_file,
    ".rst": _read_whole_file,
}
"""Supported suffix -> reader yielding (source, text)."""


def _supported(path: Path) -> bool:
    return path.suffix.lower() in READERS


def _check_supported(path: Path) -> None:
    if not _supported(path):
        raise ValueError(
            f"input file {path}: unsupported extension {path.suffix or '(none)'!r}; "
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


def iter_documents(
    paths: Iterable[Path],
    text_field: str = "text",
    decode_errors: str = "error",
    stats: CorpusStats | None = None,
) -> Iterator[tuple[str, str]]:
    """Yield (source, text) for every document, empty ones included (counted in stats.empty).

    decode_errors='error' raises on the first non-UTF-8 document; 'skip' leaves it out and records it in
    stats.skipped (a file for whole-file formats, a line for JSONL). Raises ValueError at the end when no
    document had any text, listing the inputs.
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

    decode = _strict_decode if decode_errors == "error" else skip_bad
    paths = list(paths)
    nonempty = 0
    for path in paths:
        _check_supported(path)
        stats.files += 1
        for source, text in READERS[path.suffix.lower()](path, text_field, decode):
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
