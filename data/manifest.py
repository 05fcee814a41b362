"""manifest.json: what launch.prepare wrote, and the contract the loader checks shards against.

Paths inside are relative to the manifest's folder, so a prepared dataset can be moved or copied as a whole.
Nothing time- or machine-dependent is recorded: the same inputs give a byte-identical manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

FORMAT = "cloze-shards"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
ID_DTYPES = ("uint16", "uint32")
_RERUN = "re-run `python -m launch.prepare` to rebuild the dataset"
NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*(/[A-Za-z0-9_][A-Za-z0-9._-]*)*")
"""Every file name a manifest gives (shards, tokenizer): a relative path of parts made of letters, digits, '.',
'_' and '-', none starting with '.' or '-' (so no '.' or '..' part, nothing a command could take for an option).
They are joined onto the dataset's folder, URL or pipe: command, so nothing in them may mean anything to a shell,
a URL parser or a path lookup."""
MAX_NAME_CHARS = 255
MAX_META_BYTES = 64 * 1024 * 1024
"""Largest manifest.json or tokenizer file cloze reads (a prepared one is a few KB and about a MB)."""


def check_name(name: str, what: str) -> str:
    """name when it is a plain relative path inside the dataset (NAME_RE), else ValueError naming it; `what` says
    which field it came from."""
    if len(name) > MAX_NAME_CHARS or not NAME_RE.fullmatch(name):
        raise ValueError(f"{what} {name[:MAX_NAME_CHARS]!r} is not a plain relative path inside the dataset (only "
                         "letters, digits, '.', '_', '-', and '/' between names; no name may start with '.' or '-')")
    return name


@dataclass(frozen=True)
class ShardInfo:
    """One tar shard as written."""

    file: str
    """File name relative to the manifest's folder."""
    samples: int
    """Documents (tar members `<key>.ids`) in the shard."""
    tokens: int
    """Token ids in the shard, specials not included."""
    bytes: int
    """Exact file size."""
    sha256: str
    """Hex SHA-256 of the file."""

    def __post_init__(self) -> None:
        if self.samples < 0 or self.tokens < 0 or self.bytes <= 0:
            raise ValueError(f"shard {self.file}: negative counts or empty file in the manifest")
        check_name(self.file, "shard file name")
        if len(self.sha256) != 64 or any(c not in "0123456789abcdef" for c in self.sha256):
            raise ValueError(f"shard {self.file}: sha256 {self.sha256[:80]!r} is not 64 lowercase hex digits")


@dataclass
class Manifest:
    """The parsed manifest; `root` is the folder it lives in (not stored in the file)."""

    id_dtype: str
    """numpy dtype name of the ids in every shard, little-endian ('uint16' or 'uint32')."""
    vocab_size: int
    """Every id is below this."""
    tokenizer_relpath: str
    """SentencePiece model, relative to root (the manifest's tokenizer.path), in a subfolder of its own: the
    trainer copies that folder into every checkpoint."""
    tokenizer_sha256: str
    """Hex SHA-256 of that model file."""
    special_ids: dict[str, int]
    """Token name ('[CLS]', ...) -> id."""
    documents: int
    """Documents written (non-empty)."""
    tokens: int
    """Token ids written, specials not included."""
    empty_documents: int
    """Documents skipped because they had no text."""
    skipped_documents: int
    """Documents skipped because they could not be decoded."""
    shards: list[ShardInfo]
    """In write order."""
    split_documents: int = 0
    """Input documents longer than a shard allows, written as several consecutive samples (none dropped)."""
    root: Path = field(default=Path("."), compare=False)
    """Folder of manifest.json; shard and tokenizer paths are relative to it (for a remote dataset: unused)."""

    def __post_init__(self) -> None:
        check_name(self.tokenizer_relpath, "tokenizer.path")
        if "/" not in self.tokenizer_relpath:
            raise ValueError(f"tokenizer.path {self.tokenizer_relpath!r} must lie in a subfolder of the dataset "
                             "(launch.prepare writes tokenizer/spm.model): its folder is copied into every checkpoint")
        if self.id_dtype not in ID_DTYPES:
            raise ValueError(f"id_dtype={self.id_dtype!r} must be one of {ID_DTYPES}")
        if self.vocab_size < 1 or (self.id_dtype == "uint16" and self.vocab_size > 2**16):
            raise ValueError(f"vocab_size={self.vocab_size} does not fit id_dtype {self.id_dtype}")
        if sum(s.samples for s in self.shards) != self.documents:
            raise ValueError(f"documents={self.documents} differs from the sum of the shards' samples")
        if sum(s.tokens for s in self.shards) != self.tokens:
            raise ValueError(f"tokens={self.tokens} differs from the sum of the shards' tokens")
        if min(self.empty_documents, self.skipped_documents, self.split_documents) < 0:
            raise ValueError("negative document counts in the totals")

    @property
    def shard_paths(self) -> list[Path]:
        return [self.root / s.file for s in self.shards]

    @property
    def tokenizer_path(self) -> Path:
        """The SentencePiece model file (root / tokenizer_relpath); the HF tokenizer files sit beside it.

        ValueError when the file, its folder or a symlink in that folder resolves outside root (the folder is
        copied into every checkpoint, so a manifest must not be able to make that copy read files from elsewhere),
        or when the file is larger than MAX_META_BYTES."""
        path = self.root / self.tokenizer_relpath
        inside = os.path.realpath(self.root)
        self._check_inside(path.parent, path, inside)
        self._check_inside(path, path, inside)
        for folder, dirs, files in os.walk(path.parent):  # what copying the folder would read (walk follows none)
            for name in dirs + files:
                if os.path.islink(os.path.join(folder, name)):
                    self._check_inside(Path(folder, name), path, inside)
        if path.is_file() and path.stat().st_size > MAX_META_BYTES:
            raise ValueError(f"tokenizer {path} named by {self.root / MANIFEST_NAME} is larger than "
                             f"{MAX_META_BYTES >> 20} MiB, not a tokenizer cloze wrote; {_RERUN}")
        return path

    def _check_inside(self, link: Path, path: Path, inside: str) -> None:
        real = os.path.realpath(link)
        if os.path.commonpath([inside, real]) != inside:
            raise ValueError(f"tokenizer {path} named by {self.root / MANIFEST_NAME}: {link} resolves to {real}, "
                             f"outside the dataset folder {inside}; {_RERUN}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "id_dtype": self.id_dtype,
            "vocab_size": self.vocab_size,
            "tokenizer": {"path": self.tokenizer_relpath, "sha256": self.tokenizer_sha256},
            "special_ids": dict(self.special_ids),
            "totals": {
                "documents": self.documents,
                "tokens": self.tokens,
                "empty_documents": self.empty_documents,
                "skipped_documents": self.skipped_documents,
                "split_documents": self.split_documents,
                "shards": len(self.shards),
            },
            "shards": [asdict(s) for s in self.shards],
        }


def write_manifest(manifest: Manifest, out_dir: str | os.PathLike) -> Path:
    """Write out_dir/manifest.json atomically (a reader never sees half a manifest)."""
    path = Path(out_dir) / MANIFEST_NAME
    tmp = path.with_name(MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(manifest.to_dict(), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def read_at_most(f: BinaryIO, want: int) -> bytes:
    """Up to `want` bytes of f, read in chunks: memory follows what the file holds, not what was asked for
    (f.read(want) would allocate `want` bytes up front)."""
    data = bytearray()
    while len(data) < want and (chunk := f.read(min(1 << 20, want - len(data)))):
        data += chunk
    return bytes(data)


def _get(obj: Any, key: str, kind: type | tuple[type, ...], where: str, path: Path | str) -> Any:
    """obj[key] checked for presence and type; errors name the field as `where.key`."""
    name = f"{where}.{key}" if where else key
    if not isinstance(obj, dict) or key not in obj:
        raise ValueError(f"{path}: missing field {name!r}; {_RERUN}")
    value = obj[key]
    # bool is an int subclass; a count of `true` is still wrong
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        want = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise ValueError(f"{path}: field {name!r} should be {want}, got {type(value).__name__}; {_RERUN}")
    return value


def load_manifest(dir_or_file: str | os.PathLike, verify_hashes: bool = False, check_files: bool = True) -> Manifest:
    """Read and validate a local manifest: fields, tokenizer hash, every shard present with its recorded size.

    verify_hashes also re-hashes every shard (reads all data; off by default because it costs a full pass).
    check_files=False checks only the manifest itself; the loader does that and verifies each shard as it
    reads it, so that its on_bad_data policy decides what a missing or damaged shard means.
    """
    path = Path(dir_or_file)
    if path.is_dir() or not path.suffix:
        path = path / MANIFEST_NAME
    if not path.is_file():
        raise ValueError(f"manifest {path} not found; run `python -m launch.prepare --out {path.parent} ...` first")
    if path.stat().st_size > MAX_META_BYTES:
        raise ValueError(f"{path}: larger than {MAX_META_BYTES >> 20} MiB, not a manifest cloze wrote; {_RERUN}")
    try:
        with open(path, "rb") as f:
            text = read_at_most(f, MAX_META_BYTES + 1).decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); {_RERUN}") from None
    manifest = parse_manifest(text, str(path), root=path.parent)
    if check_files:
        _check_files(manifest, path, verify_hashes)
    return manifest


def parse_manifest(text: str, where: str, root: Path = Path(".")) -> Manifest:
    """Validate manifest.json's text (read from `where`, a path or URL named in errors) into a Manifest."""
    path = where
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); {_RERUN}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object; {_RERUN}")
    if _get(raw, "format", str, "", path) != FORMAT:
        raise ValueError(f"{path}: field 'format' is {raw['format']!r}, expected {FORMAT!r}")
    version = _get(raw, "format_version", int, "", path)
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {version} is not supported (this cloze reads {FORMAT_VERSION}); "
                         f"{_RERUN}")
    tokenizer = _get(raw, "tokenizer", dict, "", path)
    totals = _get(raw, "totals", dict, "", path)
    special = _get(raw, "special_ids", dict, "", path)
    for key in special:
        _get(special, key, int, "special_ids", path)
    shards = []
    for i, entry in enumerate(_get(raw, "shards", list, "", path)):
        where = f"shards[{i}]"
        fields = {key: _get(entry, key, kind, where, path)
                  for key, kind in (("file", str), ("samples", int), ("tokens", int), ("bytes", int), ("sha256", str))}
        try:
            shards.append(ShardInfo(**fields))
        except ValueError as e:
            raise ValueError(f"{path}: {where}: {e}; {_RERUN}") from None
    if len({s.file for s in shards}) != len(shards):
        raise ValueError(f"{path}: a shard file is listed twice; {_RERUN}")
    split = _get(totals, "split_documents", int, "totals", path) if "split_documents" in totals else 0
    try:
        manifest = Manifest(
            id_dtype=_get(raw, "id_dtype", str, "", path),
            vocab_size=_get(raw, "vocab_size", int, "", path),
            tokenizer_relpath=_get(tokenizer, "path", str, "tokenizer", path),
            tokenizer_sha256=_get(tokenizer, "sha256", str, "tokenizer", path),
            special_ids=dict(special),
            documents=_get(totals, "documents", int, "totals", path),
            tokens=_get(totals, "tokens", int, "totals", path),
            empty_documents=_get(totals, "empty_documents", int, "totals", path),
            skipped_documents=_get(totals, "skipped_documents", int, "totals", path),
            split_documents=split,
            shards=shards,
            root=root,
        )
    except ValueError as e:
        if str(e).startswith(str(path)):
            raise
        raise ValueError(f"{path}: {e}; {_RERUN}") from None
    if _get(totals, "shards", int, "totals", path) != len(shards):
        raise ValueError(f"{path}: totals.shards={totals['shards']} but {len(shards)} shards are listed; {_RERUN}")
    return manifest


def shard_file_problems(manifest: Manifest) -> list[str]:
    """What a stat() of every shard finds wrong (missing, or not the recorded size), one message per shard; no
    shard is read. Content checks (sha256, tar structure, token ids) happen as the loader reads each shard."""
    problems = []
    for info, shard in zip(manifest.shards, manifest.shard_paths, strict=True):
        if not shard.is_file():
            problems.append(f"shard {shard} is missing")
        elif (size := shard.stat().st_size) != info.bytes:
            problems.append(f"shard {shard} has {size} bytes, the manifest says {info.bytes} (truncated or replaced?)")
    return problems


def _check_files(manifest: Manifest, path: Path, verify_hashes: bool) -> None:
    tok = manifest.tokenizer_path
    if not tok.is_file():
        raise ValueError(f"{path}: tokenizer {tok} is missing; {_RERUN}")
    if file_sha256(tok) != manifest.tokenizer_sha256:
        raise ValueError(f"{path}: tokenizer {tok} changed since the shards were written (sha256 differs); {_RERUN}")
    problems = shard_file_problems(manifest)
    if problems:
        raise ValueError(f"{path}: {problems[0]}; {_RERUN}")
    for info, shard in zip(manifest.shards, manifest.shard_paths, strict=True):
        if verify_hashes and file_sha256(shard) != info.sha256:
            raise ValueError(f"{path}: shard {shard} does not match its sha256 (corrupted?); {_RERUN}")
