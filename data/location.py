"""Where a prepared dataset lives, and fetching its files through WebDataset's opener.

A source is named by one string:
- a local folder (or `file://` URL) holding manifest.json and the shards;
- an `http://` / `https://` base URL: files are fetched from `<url>/manifest.json`, `<url>/shard-000000.tar`, ...;
- a `pipe:` command with `{}` where the file name goes, e.g. `pipe:aws s3 cp s3://bucket/web/{} -` (any command
  that writes the file to stdout); WebDataset runs it through the shell, so it must come from a trusted config.

Every file is opened with webdataset.gopen, so anything WebDataset opens works, and read whole into memory: a
shard is hashed before a single sample of it is used.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from webdataset.gopen import gopen

from data.manifest import MANIFEST_NAME, Manifest, load_manifest, parse_manifest

REMOTE_PREFIXES = ("http://", "https://", "pipe:")


class FetchError(OSError):
    """A file of a dataset could not be read (missing, refused, the command failed); names the file's URL."""


@dataclass(frozen=True)
class Location:
    """A dataset's place: local folder, http(s) base URL, or pipe: command template."""

    spec: str
    """The string the user gave (path, URL or pipe: template)."""

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
        """What gopen opens for a file of this dataset (a local path for local sources)."""
        if self.is_local:
            return str(self.folder / relpath)
        if self.spec.startswith("pipe:"):
            return self.spec.replace("{}", relpath)
        return self.spec.rstrip("/") + "/" + relpath

    def read(self, relpath: str, limit: int | None = None) -> bytes:
        """The whole file, or its first limit + 1 bytes when it is longer than limit (so a shard that is too big
        is found without holding all of it); FetchError (naming the URL) when it cannot be had."""
        url = self.url(relpath)
        want = -1 if limit is None else limit + 1
        if self.is_local:
            try:
                with open(url, "rb") as f:
                    return f.read(want)
            except OSError as e:
                raise FetchError(f"{url}: {e.strerror or e}") from None
        stream = None
        try:
            stream = gopen(url, "rb")
            data = stream.read(want)
            stream.close()  # a pipe's exit status (curl's 22 for an HTTP error) is checked here
            stream = None
        except (OSError, ValueError) as e:
            raise FetchError(f"{url}: {_first_line(e)}") from None
        finally:
            if stream is not None:
                try:
                    stream.close()
                except Exception:  # noqa: BLE001 - already failing; the first error is the one reported
                    pass
        return data

    def manifest(self, check_files: bool = True) -> Manifest:
        """The dataset's manifest. Local: load_manifest (file checks unless check_files=False); remote: fetched
        and parsed, its shards are verified one by one as they are read."""
        if self.is_local:
            return load_manifest(self.folder, check_files=check_files)
        try:
            text = self.read(MANIFEST_NAME).decode("utf-8")
        except FetchError as e:
            raise ValueError(f"cannot read the manifest of data source {self.spec!r}: {e}; check the URL "
                             "(the folder given to launch.prepare --out must be served as is)") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"{self.url(MANIFEST_NAME)}: not valid JSON ({e})") from None
        return parse_manifest(text, self.url(MANIFEST_NAME))


_CURL_EXITS = {6: "host not found", 7: "could not connect", 22: "HTTP error, e.g. 404 not found", 28: "timed out",
               35: "TLS handshake failed", 56: "connection reset"}


def _first_line(e: BaseException) -> str:
    """A short reason; WebDataset's pipe errors carry the whole argument tuple, reduced here to the exit status."""
    text = str(e).strip() or type(e).__name__
    status = re.search(r"\bexit (\d+) \(read\)", text)
    if status:
        code = int(status[1])
        tool = "curl" if "'curl'" in text else "the command"
        hint = f": {_CURL_EXITS[code]}" if tool == "curl" and code in _CURL_EXITS else ""
        return f"{tool} exited with status {code}{hint}"
    return text.splitlines()[0][:300]


def same_dataset(a: Location, b: Location) -> bool:
    """True when both name the same local folder or the same URL template."""
    if a.is_local and b.is_local:
        return os.path.realpath(a.folder) == os.path.realpath(b.folder)
    return a.spec.rstrip("/") == b.spec.rstrip("/")
