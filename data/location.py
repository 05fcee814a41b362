"""Where a prepared dataset lives, and fetching its files with a size bound and, when remote, a deadline.

A source is named by one string:
- a local folder (or `file://` URL) holding manifest.json and the shards;
- an `http://` / `https://` base URL: files are fetched from `<url>/manifest.json`, `<url>/shard-000000.tar`, ...;
- a `pipe:` command with `{}` where the file name goes, e.g. `pipe:aws s3 cp s3://bucket/web/{} -` (any command
  that writes the file to stdout); it runs through the shell, so it must come from the user's own config.

A manifest or tokenizer is read whole into memory, at most limit + 1 bytes of it. A remote shard is streamed into
a file (a temporary one, or an entry of the node's shard cache, data/cache.py) and hashed as it arrives, so a fetch
holds one chunk in memory, never the shard; it is verified before a single sample of it is used.

Names come from the manifest, which is not trusted: each must match manifest.NAME_RE, and it reaches a pipe:
command's shell only through shlex.quote. http(s) files are fetched by curl with an argument list (no
shell), no decompression and no protocol but http(s), also on redirects. A remote read that sends nothing for
FetchLimits.stall_s seconds, or has not finished after FetchLimits.deadline_s, is stopped (curl or the pipe:
command and everything it started are killed) and is a FetchError naming the URL.
"""

from __future__ import annotations

import hashlib
import math
import os
import selectors
import shlex
import signal
import stat
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from data.manifest import (
    MANIFEST_NAME,
    MAX_META_BYTES,
    Manifest,
    check_name,
    file_sha256,
    load_manifest,
    parse_manifest,
    read_at_most,
    shard_file_problems,
)

if TYPE_CHECKING:
    from data.cache import ShardCache

REMOTE_PREFIXES = ("http://", "https://", "pipe:")
_CHUNK = 1 << 20
_STDERR_KEEP = 2000  # bytes of a failing command's stderr kept for its error message


class FetchError(OSError):
    """A file of a dataset could not be read (missing, refused, stalled, too slow, the command failed); names the
    file's URL."""


@dataclass(frozen=True)
class FetchLimits:
    """Time bounds of remote reads (http(s) and pipe: sources); local files have none."""

    stall_s: float = 30.0
    """A read that receives no byte for this long is stopped (a dead server, a hung command)."""
    deadline_s: float = 300.0
    """A read of one file (a shard, the manifest, the tokenizer) that has not finished after this long is
    stopped, however slowly bytes still arrive."""

    def __post_init__(self) -> None:
        if not (self.stall_s > 0 and self.deadline_s > 0):
            raise ValueError(f"read stall timeout {self.stall_s} s and read deadline {self.deadline_s} s must be > 0")


@dataclass(frozen=True)
class Location:
    """A dataset's place: local folder, http(s) base URL, or pipe: command template."""

    spec: str
    """The string the user gave (path, URL or pipe: template)."""
    limits: FetchLimits = field(default_factory=FetchLimits, compare=False)
    """Stall timeout and deadline of remote reads."""
    cache: ShardCache | None = field(default=None, compare=False)
    """Where verified remote shards are kept between epochs (None: fetched at every read); local sources never
    use it."""

    def __post_init__(self) -> None:
        if not self.spec:
            raise ValueError("empty data source; give a folder, an http(s):// URL or a pipe: command with {}")
        if self.spec.startswith("pipe:") and "{}" not in self.spec:
            raise ValueError(f"data source {self.spec!r}: a pipe: source needs {{}} where the file name goes, "
                             "e.g. 'pipe:cat /data/web/{}'")

    @property
    def is_local(self) -> bool:
        return not self.spec.startswith(REMOTE_PREFIXES)

    @property
    def folder(self) -> Path:
        """The local folder (only for local sources)."""
        assert self.is_local
        spec = self.spec[len("file://"):] if self.spec.startswith("file://") else self.spec
        return Path(spec)

    @property
    def label(self) -> str:
        """A short name for metrics: the last path component ('web' for /data/web or http://host/web/)."""
        if self.spec.startswith("pipe:"):
            head = self.spec.split("{}", 1)[0].rstrip("/")
            return head.rsplit("/", 1)[-1] or "pipe"
        if self.is_local:
            return self.folder.resolve().name or "data"
        tail = self.spec.rstrip("/").rsplit("/", 1)[-1]
        return tail or "data"

    def url(self, relpath: str) -> str:
        """What is read for a file of this dataset: a local path, a URL, or the shell command (the name quoted)."""
        check_name(relpath, "file name")
        if self.is_local:
            return str(self.folder / relpath)
        if self.spec.startswith("pipe:"):
            return "pipe:" + self.spec[len("pipe:"):].replace("{}", shlex.quote(relpath))
        return self.spec.rstrip("/") + "/" + relpath

    def read(self, relpath: str, limit: int) -> bytes:
        """The whole file, or its first limit + 1 bytes when it is longer than limit (so a file that is too big
        is found without holding all of it); FetchError (naming the URL) when it cannot be had in time."""
        data = bytearray()
        self.stream(relpath, limit, data.extend)
        return bytes(data)

    def fetch(self, relpath: str, out: BinaryIO, limit: int) -> tuple[int, str]:
        """Write the file (at most limit + 1 bytes, as read) to `out` chunk by chunk; (bytes written, their hex
        sha256). Memory holds one chunk, whatever the file's size."""
        digest = hashlib.sha256()

        def sink(chunk: bytes) -> None:
            digest.update(chunk)
            out.write(chunk)

        return self.stream(relpath, limit, sink), digest.hexdigest()

    def stream(self, relpath: str, limit: int, sink: Callable[[bytes], None]) -> int:
        """Hand the file's bytes, at most limit + 1 of them, to sink in chunks; the number handed. FetchError
        (naming the URL) when the file cannot be had in time."""
        url = self.url(relpath)
        if self.is_local:
            return _stream_local(url, limit + 1, sink)
        if url.startswith("pipe:"):
            argv = ["/bin/sh", "-c", url[len("pipe:"):]]
        else:
            argv = _curl_argv(url, self.limits)
        return _stream_command(argv, url, limit + 1, self.limits, sink)

    def tokenizer_sha256(self, manifest: Manifest) -> str:
        """The hash of the tokenizer file the manifest names (a remote one read whole, at most MAX_META_BYTES);
        ValueError naming it when it is missing, too large, or (local) leads outside the dataset."""
        if self.is_local:
            tok = manifest.tokenizer_path  # refuses a path or symlink leading outside the dataset
            if not tok.is_file():
                raise ValueError(f"tokenizer {tok} named by {self.url(MANIFEST_NAME)} is missing; re-run "
                                 "launch.prepare")
            return file_sha256(tok)
        url = self.url(manifest.tokenizer_relpath)
        try:
            raw = self.read(manifest.tokenizer_relpath, limit=MAX_META_BYTES)
        except FetchError as e:
            raise ValueError(f"cannot read the tokenizer of data source {self.spec!r}: {e}") from None
        if len(raw) > MAX_META_BYTES:
            raise ValueError(f"tokenizer {url} is larger than {MAX_META_BYTES >> 20} MiB, not one cloze wrote")
        return hashlib.sha256(raw).hexdigest()

    def manifest(self, check_files: bool = True) -> Manifest:
        """The dataset's manifest. Local: load_manifest (file checks unless check_files=False); remote: fetched
        (at most MAX_META_BYTES) and parsed, its shards are verified one by one as they are read."""
        if self.is_local:
            return load_manifest(self.folder, check_files=check_files)
        where = self.url(MANIFEST_NAME)
        try:
            raw = self.read(MANIFEST_NAME, limit=MAX_META_BYTES)
        except FetchError as e:
            raise ValueError(f"cannot read the manifest of data source {self.spec!r}: {e}; check the URL "
                             "(the folder given to launch.prepare --out must be served as is)") from None
        if len(raw) > MAX_META_BYTES:
            raise ValueError(f"{where}: larger than {MAX_META_BYTES >> 20} MiB, not a manifest cloze wrote")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e})") from None
        return parse_manifest(text, where)


def check_source(location: Location) -> tuple[Manifest | None, str, list[str]]:
    """Open a source's manifest and check what can be checked before training: the manifest itself, its tokenizer
    file against the manifest's hash (a remote one is fetched), that it lists shards and none is empty, and (local)
    a stat() of every shard (manifest.shard_file_problems). Returns (manifest or None when it cannot be read,
    problems with the source as a whole, problems with single shards); no shard is read."""
    try:
        manifest = location.manifest(check_files=False)
    except ValueError as e:
        return None, str(e), []
    where = location.url(MANIFEST_NAME)
    if not manifest.shards:
        return manifest, f"{where} lists no shards; re-run `python -m launch.prepare`", []
    empty = [s.file for s in manifest.shards if s.samples == 0]
    if empty:
        return manifest, f"{where}: shard(s) {', '.join(empty[:5])} hold no documents; re-run launch.prepare", []
    try:
        digest = location.tokenizer_sha256(manifest)
    except (ValueError, FetchError) as e:
        return manifest, str(e), []
    if digest != manifest.tokenizer_sha256:
        return manifest, (f"tokenizer {location.url(manifest.tokenizer_relpath)} does not match the hash in {where} "
                          "(replaced after prepare?); re-run launch.prepare"), []
    return manifest, "", shard_file_problems(manifest) if location.is_local else []


def _stream_local(path: str, want: int, sink: Callable[[bytes], None]) -> int:
    """Up to `want` bytes of a regular file, in chunks; a fifo or device (which could block or never end) is
    refused without waiting on it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a fifo opens without waiting for a writer
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise FetchError(f"{path}: not a regular file")
            if want <= _CHUNK:
                data = read_at_most(f, want)
                sink(data)
                return len(data)
            done = 0
            while done < want and (chunk := f.read(min(_CHUNK, want - done))):
                sink(chunk)
                done += len(chunk)
            return done
    except FetchError:
        raise
    except OSError as e:
        raise FetchError(f"{path}: {e.strerror or e}") from None


def _curl_argv(url: str, limits: FetchLimits) -> list[str]:
    """curl reading url to stdout: fail on HTTP errors, no URL globbing, http(s) only (redirects too), no
    decompression (no --compressed), and its own stall and time limits (the caller enforces them as well)."""
    # a second past the caller's own limits, so that the caller's clearer message is the one normally seen
    stall, deadline = str(math.ceil(limits.stall_s) + 1), str(math.ceil(limits.deadline_s) + 1)
    return ["curl", "--silent", "--show-error", "--fail", "--globoff", "--location", "--max-redirs", "5",
            "--proto", "=http,https", "--proto-redir", "=http,https", "--connect-timeout", stall,
            "--speed-limit", "1", "--speed-time", stall, "--max-time", deadline, "--retry", "2", "--retry-delay", "1",
            "--", url]


def _stream_command(argv: list[str], url: str, want: int, limits: FetchLimits,
                    sink: Callable[[bytes], None]) -> int:
    """Up to `want` bytes of argv's stdout, handed to sink as they arrive; the number handed. The command runs in
    a session of its own, so that when it stalls, overruns the deadline or has given enough, it is killed with
    everything it started."""
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)
    except OSError as e:
        raise FetchError(f"{url}: cannot run {argv[0]} ({e.strerror or e})") from None
    assert proc.stdout is not None and proc.stderr is not None
    err = bytearray()
    done = 0
    start = last = time.monotonic()
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            sel.register(proc.stderr, selectors.EVENT_READ)
            while sel.get_map() and done < want:
                now = time.monotonic()
                if now - start >= limits.deadline_s:
                    raise FetchError(f"{url}: not finished after {limits.deadline_s:g} s (the read deadline; "
                                     f"{done} bytes received)")
                if now - last >= limits.stall_s:
                    raise FetchError(f"{url}: no data for {limits.stall_s:g} s (the server or command stalled; "
                                     f"{done} bytes received)")
                wait = min(start + limits.deadline_s, last + limits.stall_s) - now
                for key, _ in sel.select(wait):
                    is_out = key.fileobj is proc.stdout
                    chunk = os.read(key.fd, min(_CHUNK, want - done) if is_out else 4096)
                    if not chunk:
                        sel.unregister(key.fileobj)
                    elif is_out:
                        sink(chunk)
                        done += len(chunk)
                        last = time.monotonic()
                    else:
                        err = (err + chunk)[-_STDERR_KEEP:]
        if done >= want:  # enough to know the file is too long; the rest is never read
            return done
        status = proc.wait(max(0.1, start + limits.deadline_s - time.monotonic()))
    except subprocess.TimeoutExpired:
        raise FetchError(f"{url}: not finished after {limits.deadline_s:g} s (the read deadline)") from None
    finally:
        _kill(proc)
    if status != 0:
        raise FetchError(f"{url}: {_failure(argv[0], status, err)}")
    return done


def _kill(proc: subprocess.Popen) -> None:
    """Stop a command still running, with its whole session (a pipe: shell's children included); close its pipes.
    (Only while it runs: once reaped, its process group id is no longer known to be its own.)"""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


_CURL_EXITS = {1: "protocol not allowed", 6: "host not found", 7: "could not connect",
               22: "HTTP error, e.g. 404 not found", 28: "timed out", 35: "TLS handshake failed",
               56: "connection reset"}


def _failure(program: str, status: int, stderr: bytes) -> str:
    """A short reason: the exit status, curl's meaning of it, and the command's last stderr line."""
    tool = "curl" if program == "curl" else "the command"
    hint = f": {_CURL_EXITS[status]}" if tool == "curl" and status in _CURL_EXITS else ""
    lines = stderr.decode("utf-8", errors="replace").strip().splitlines()
    said = f" ({lines[-1].strip()[:300]})" if lines else ""
    return f"{tool} exited with status {status}{hint}{said}"


def same_dataset(a: Location, b: Location) -> bool:
    """True when both name the same local folder or the same URL template."""
    if a.is_local and b.is_local:
        return os.path.realpath(a.folder) == os.path.realpath(b.folder)
    return a.spec.rstrip("/") == b.spec.rstrip("/")
