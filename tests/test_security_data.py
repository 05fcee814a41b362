"""Hostile datasets: a manifest's names never reach a shell and never lead outside the dataset, a compressed or
oversized shard never expands in memory, and a remote source that stalls or never ends fails in bounded time and
memory. Every attack goes through the public path (Location.manifest, build_loader, launch.train) and must end in
one clear error, or a counted skip under on_bad_data='skip'; the marker file a payload would create never exists.
"""

from __future__ import annotations

import http.server
import io
import json
import os
import shutil
import socket
import tarfile
import threading
import time
import tracemalloc
import zlib
from pathlib import Path

import pytest

from data.loader import BadDataError, build_loader
from data.location import MAX_META_BYTES, FetchLimits, Location
from data.manifest import load_manifest
from launch.config import load_config
from tests.conftest import run_cli
from tests.data_helpers import dataset_dir, random_docs
from tests.test_data_hostile import rewrite_shard, rows_for

SEQ = 16
FAST = FetchLimits(stall_s=1.0, deadline_s=2.0)
"""Short limits, so that a dead source fails a test in about two seconds."""


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A small prepared dataset (3 shards); tests change copies of it."""
    root = tmp_path_factory.mktemp("prepared") / "web"
    dataset_dir(root, random_docs(12, seed=4, max_len=30), max_documents=4)
    return root


@pytest.fixture
def data(prepared, tmp_path) -> Path:
    root = tmp_path / "web"
    shutil.copytree(prepared, root)
    return root


def edit_manifest(root: Path, change) -> None:
    manifest = json.loads((root / "manifest.json").read_text())
    change(manifest)
    (root / "manifest.json").write_text(json.dumps(manifest))


def load(spec: str, policy: str = "fail", seed: int = 0, **kw):
    return build_loader([(spec, 1.0)], seq_len=SEQ, batch_size=1, rank=0, world_size=1, seed=seed,
                        on_bad_data=policy, **kw)


def single_line(error: BaseException) -> str:
    text = str(error)
    assert "\n" not in text, text
    return text


# ----- names from the manifest ---------------------------------------------------------------------------------
INJECTIONS = ["x;touch {mark};#.tar", "$(touch {mark}).tar", "`touch {mark}`.tar", "a|touch {mark}.tar",
              "x.tar\ntouch {mark}", "x.tar&&touch {mark}", "-o{mark}.tar", "shard 1.tar"]


@pytest.mark.parametrize("payload", INJECTIONS)
@pytest.mark.parametrize("field", ["shard", "tokenizer"])
def test_manifest_names_never_reach_a_shell(data, tmp_path, payload, field):
    mark = tmp_path / "MARK"
    name = payload.format(mark=mark)
    if field == "shard":
        edit_manifest(data, lambda m: m["shards"][0].update(file=name))
    else:
        name = "tokenizer/" + name
        edit_manifest(data, lambda m: m["tokenizer"].update(path=name))
    spec = f"pipe:cat {data}/{{}}"
    for attempt in (lambda: Location(spec).manifest(), lambda: load(spec), lambda: load(spec, "skip"),
                    lambda: load(str(data))):
        with pytest.raises(ValueError) as e:
            attempt()
        message = single_line(e.value)
        assert "manifest.json" in message and repr(name)[:60] in message, message
        assert "not a plain relative path inside the dataset" in message
    assert not mark.exists(), "a name from the manifest ran in a shell"


def test_pipe_command_is_built_only_from_checked_names(data):
    """Defence in depth: Location itself refuses a name outside the pattern, whoever asks for it."""
    location = Location(f"pipe:cat {data}/{{}}")
    assert location.url("shard-000000.tar") == f"pipe:cat {data}/shard-000000.tar"
    with pytest.raises(ValueError, match="not a plain relative path"):
        location.url("a;b")


@pytest.mark.distributed
def test_launch_train_refuses_a_manifest_with_a_shell_payload(tiny_data, tmp_path):
    data, mark = tmp_path / "data", tmp_path / "MARK"
    shutil.copytree(tiny_data, data)
    name = f"x;touch {mark};#.tar"
    edit_manifest(data, lambda m: m["shards"][0].update(file=name))
    # refused before any rank starts (a pipe: source is refused the same way by build_loader, tested above)
    proc = run_cli(["launch.train", "--config", "launch/configs/tiny.yaml", "--nproc", "2", f"data.path={data}",
                    f"out_dir={tmp_path / 'run'}", "train.max_steps=6"], timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error")]
    assert len(errors) == 1 and "manifest.json" in errors[0] and repr(name) in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not mark.exists()


# ----- the tokenizer path ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/etc/passwd", "../../x/spm.model", "tokenizer/../../spm.model", "./tokenizer/x",
                                  "spm.model", "tokenizer//spm.model", ""])
def test_tokenizer_path_stays_inside_the_dataset(data, path):
    edit_manifest(data, lambda m: m["tokenizer"].update(path=path))
    for attempt in (lambda: load_manifest(data), lambda: load(str(data)), lambda: load(f"pipe:cat {data}/{{}}")):
        with pytest.raises(ValueError, match="tokenizer.path") as e:
            attempt()
        assert "manifest.json" in single_line(e.value)


def _outside_tokenizer(data: Path, tmp_path: Path) -> Path:
    """A copy of the dataset's tokenizer folder outside the dataset (the same file, so its sha256 matches)."""
    outside = tmp_path / "elsewhere"
    shutil.copytree(data / "tokenizer", outside)
    return outside


@pytest.mark.parametrize("link", ["folder", "file", "file_beside"])
def test_tokenizer_symlinks_leading_outside_are_refused(data, tmp_path, link):
    outside = _outside_tokenizer(data, tmp_path)
    if link == "folder":
        shutil.rmtree(data / "tokenizer")
        (data / "tokenizer").symlink_to(outside, target_is_directory=True)
    elif link == "file":
        (data / "tokenizer" / "spm.model").unlink()
        (data / "tokenizer" / "spm.model").symlink_to(outside / "spm.model")
    else:  # copied into every checkpoint with the folder
        (outside / "secret.txt").write_text("not for checkpoints")
        (data / "tokenizer" / "secret.txt").symlink_to(outside / "secret.txt")
    for attempt in (lambda: load_manifest(data), lambda: load(str(data))):
        with pytest.raises(ValueError, match="outside the dataset folder") as e:
            attempt()
        assert str(outside.resolve()) in single_line(e.value)


def test_tokenizer_symlink_inside_the_dataset_is_fine(data):
    (data / "tokenizer" / "spm.model").rename(data / "spm.model.real")
    (data / "tokenizer" / "spm.model").symlink_to(data / "spm.model.real")
    load_manifest(data)
    next(load(str(data)))


@pytest.mark.distributed
def test_launch_train_refuses_a_tokenizer_outside_the_dataset(tiny_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    outside = _outside_tokenizer(data, tmp_path)
    shutil.rmtree(data / "tokenizer")
    (data / "tokenizer").symlink_to(outside, target_is_directory=True)
    proc = run_cli(["launch.train", "--config", "launch/configs/tiny.yaml", "--nproc", "2", f"data.path={data}",
                    f"out_dir={tmp_path / 'run'}", "train.max_steps=6"], timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error")]
    assert len(errors) == 1 and "outside the dataset folder" in errors[0], proc.stderr[-3000:]
    assert not (tmp_path / "run" / "checkpoints").exists()


# ----- shard bombs -----------------------------------------------------------------------------------------------
def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(payload), 0
            tar.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


def _gzip_bomb(expanded: int) -> bytes:
    """A .tar.gz of `<key>.ids` members of 32 KiB of zeros each, `expanded` bytes in all, about a thousandth of
    that compressed: every member is smaller than the compressed file, so only reading plain tar stops it."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip framing
    member = _tar([("0000000000.ids", bytes(32 << 10))])[:512 + (32 << 10)]  # header + data, no end blocks
    out = [packer.compress(member) for _ in range(expanded // len(member))]
    out.append(packer.compress(bytes(1024)) + packer.flush())  # end-of-archive blocks
    return b"".join(out)


def _peak_mib(fn) -> float:
    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak / 2**20


@pytest.mark.parametrize("source", ["local", "pipe"])
def test_compressed_shard_is_not_a_tar_and_never_expands(data, source):
    bomb = _gzip_bomb(160 << 20)
    assert len(bomb) < 1 << 20
    name = rewrite_shard(data, 0, [("0000000000.ids", b"")], raw_bytes=bomb)  # size and sha256 agree with it
    spec = str(data) if source == "local" else f"pipe:cat {data}/{{}}"

    def fail():
        with pytest.raises(BadDataError, match=r"not a readable tar file \(compressed \(gzip\)") as e:
            rows_for(load(spec, seed=1), 200)
        assert name in single_line(e.value)

    assert _peak_mib(fail) < 16  # 160 MiB if it were decompressed
    skipping = load(spec, "skip")
    rows_for(skipping, 200)
    assert skipping.stats()["skipped_shards/not_tar"] >= 1


def test_member_larger_than_its_shard_is_refused(data):
    raw = bytearray(_tar([("0000000000.ids", bytes(20)), ("0000000001.ids", bytes(20))]))
    raw[124:136] = b"\x80" + (10**11).to_bytes(11, "big")  # the first member claims 100 GB (GNU base-256 size)
    raw[148:156] = b"        "
    raw[148:156] = f"{sum(raw[:512]):06o}\0 ".encode()
    name = rewrite_shard(data, 0, [("x.ids", b"")] * 2, raw_bytes=bytes(raw))
    with pytest.raises(BadDataError, match="claims 100000000000 bytes, more than the") as e:
        rows_for(load(str(data), seed=1), 200)
    assert name in single_line(e.value)


def _sparse_tar(members: int, expanded: int) -> bytes:
    """An old-GNU tar of `members` sparse `<key>.ids` members, each storing no byte and expanding to `expanded`
    zero bytes when extracted."""
    out = b""
    for i in range(members):
        header = bytearray(tarfile.TarInfo(f"{i:010d}.ids").tobuf(format=tarfile.GNU_FORMAT)[:512])
        header[156:157] = b"S"  # GNU sparse
        header[124:136] = b"%011o\0" % 0  # bytes stored
        header[386:398] = b"%011o\0" % (expanded - 1)  # one map entry: an empty extent at the end
        header[398:410] = b"%011o\0" % 0
        header[483:495] = b"%011o\0" % expanded  # the size it expands to
        header[148:156] = b"        "
        header[148:156] = b"%06o\0 " % sum(header)
        out += bytes(header)
    out += bytes(1024)
    return out + bytes(-len(out) % 10240)


def test_sparse_members_never_expand(data):
    name = rewrite_shard(data, 0, [("x.ids", b"")] * 16, raw_bytes=_sparse_tar(16, 8 << 20))

    def fail():
        with pytest.raises(BadDataError, match="not a readable tar file") as e:
            rows_for(load(str(data), seed=1), 200)
        assert name in single_line(e.value)

    assert _peak_mib(fail) < 16  # 128 MiB of zeros if the members were extracted


@pytest.mark.parametrize("source", ["local", "pipe"])
def test_shard_declared_huge_is_a_size_skip_never_a_memory_error(data, source):
    edit_manifest(data, lambda m: m["shards"][0].update(bytes=10**11))
    spec = str(data) if source == "local" else f"pipe:cat {data}/{{}}"
    with pytest.raises(BadDataError, match="the manifest says 100000000000 bytes, more than the largest shard") as e:
        rows_for(load(spec, seed=1), 200)
    assert "shard-000000.tar" in single_line(e.value)
    skipping = load(spec, "skip")
    peak = _peak_mib(lambda: rows_for(skipping, 200))
    assert skipping.stats()["skipped_shards/size"] >= 1 and peak < 16


def test_tokenizer_file_over_the_cap_is_refused(data):
    tok = data / "tokenizer" / "spm.model"
    with open(tok, "r+b") as f:
        f.truncate(MAX_META_BYTES + 1)  # sparse: costs no disk
    with pytest.raises(ValueError, match=f"spm.model named by .*manifest.json is larger than {MAX_META_BYTES >> 20}"):
        load(str(data))


def test_local_files_that_could_block_or_never_end(data):
    shard = data / "shard-000000.tar"
    shard.unlink()
    os.mkfifo(shard)  # reading it would wait for a writer forever
    with pytest.raises(BadDataError, match="shard-000000.tar.*not a regular file") as e:
        rows_for(load(str(data), seed=1), 200)
    single_line(e.value)
    manifest = data / "manifest.json"
    with open(manifest, "r+b") as f:
        f.truncate(MAX_META_BYTES + 1)  # sparse: costs no disk
    with pytest.raises(ValueError, match=f"manifest.json: larger than {MAX_META_BYTES >> 20} MiB"):
        load(str(data))
    manifest.unlink()
    manifest.symlink_to("/dev/zero")
    with pytest.raises(ValueError, match="manifest.json not found"):
        load(str(data))


# ----- remote sources that stall or never end --------------------------------------------------------------------
class _Server:
    """A TCP server on 127.0.0.1 that accepts connections and then, per `mode`, says nothing ('silent') or sends an
    HTTP 200 followed by bytes without end ('endless'). It stops itself after `life` seconds at the latest."""

    def __init__(self, mode: str, life: float = 60.0):
        self.mode, self.stop = mode, threading.Event()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.deadline = time.monotonic() + life
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/web"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        held = []
        try:
            while not self.stop.is_set() and time.monotonic() < self.deadline:
                try:
                    conn, _ = self.sock.accept()
                except TimeoutError:
                    continue
                held.append(conn)
                if self.mode == "endless":
                    threading.Thread(target=self._flood, args=(conn,), daemon=True).start()
        finally:
            for conn in held:
                conn.close()
            self.sock.close()

    def _flood(self, conn: socket.socket) -> None:
        chunk = b"x" * (1 << 16)
        try:
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n")
            while not self.stop.is_set() and time.monotonic() < self.deadline:
                conn.sendall(chunk)
        except OSError:  # the client hung up: what it should do
            pass

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)


@pytest.fixture
def server(request):
    srv = _Server(request.param)
    yield srv
    srv.close()


@pytest.mark.parametrize("server", ["silent"], indirect=True)
def test_server_that_never_answers_fails_within_the_deadline(server):
    start = time.monotonic()
    with pytest.raises(ValueError, match="cannot read the manifest") as e:
        Location(server.url, FAST).manifest()
    assert server.url + "/manifest.json" in single_line(e.value) and "no data for 1 s" in str(e.value)
    with pytest.raises(ValueError) as e:
        load(server.url, read_stall_s=1.0, read_timeout_s=2.0)
    assert server.url + "/manifest.json" in single_line(e.value)
    assert time.monotonic() - start < 8


@pytest.mark.parametrize("server", ["endless"], indirect=True)
def test_server_that_never_ends_fails_at_the_size_cap(server):
    start = time.monotonic()
    with pytest.raises(ValueError, match=f"larger than {MAX_META_BYTES >> 20} MiB") as e:
        Location(server.url, FetchLimits(stall_s=5, deadline_s=30)).manifest()
    assert server.url + "/manifest.json" in single_line(e.value)
    assert time.monotonic() - start < 30


def test_redirect_to_a_local_file_is_not_followed(tmp_path):
    secret = tmp_path / "secret.json"
    secret.write_text("{}")

    class Redirect(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(302)
            self.send_header("Location", f"file://{secret}")
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/web"
        with pytest.raises(ValueError, match="cannot read the manifest.*curl exited with status 1: protocol") as e:
            Location(url, FAST).manifest()
        assert url + "/manifest.json" in single_line(e.value)
    finally:
        server.shutdown()
        server.server_close()


def test_endless_pipe_fails_at_the_size_cap():
    with pytest.raises(ValueError, match=f"larger than {MAX_META_BYTES >> 20} MiB"):
        Location("pipe:yes {}", FetchLimits(stall_s=5, deadline_s=30)).manifest()


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    status = Path(f"/proc/{pid}/stat")
    return status.exists() and status.read_text().split(") ", 1)[1].startswith("Z")  # exited, not yet reaped


def test_pipe_command_past_the_deadline_is_killed_with_its_children(data, tmp_path):
    pid_file = tmp_path / "sleeper"
    spec = f"pipe:sleep 600 & echo $! > {pid_file}; sleep 1; head -c 10 /dev/zero; wait; cat {data}/{{}}"
    start = time.monotonic()
    with pytest.raises(ValueError, match="not finished after 2 s") as e:
        load(spec, read_stall_s=5.0, read_timeout_s=2.0)
    assert "pipe:" in single_line(e.value) and "manifest.json" in str(e.value)
    assert time.monotonic() - start < 8
    sleeper = int(pid_file.read_text())
    for _ in range(50):
        if _gone(sleeper):
            break
        time.sleep(0.1)
    assert _gone(sleeper), "the pipe: command's child outlived the deadline"


def test_remote_shard_that_stalls_is_a_missing_shard(data):
    spec = f"pipe:if [ {{}} = shard-000001.tar ]; then sleep 600; fi; cat {data}/{{}}"
    start = time.monotonic()
    with pytest.raises(BadDataError, match="shard-000001.tar.*cannot be read.*no data for 1 s"):
        rows_for(load(spec, read_stall_s=1.0, read_timeout_s=20.0), 400)
    skipping = load(spec, "skip", read_stall_s=1.0, read_timeout_s=20.0)
    rows_for(skipping, 400)
    assert skipping.stats().get("skipped_shards/missing", 0) >= 1
    assert time.monotonic() - start < 20


def test_read_limits_are_config_keys(tmp_path, prepared):
    cfg = load_config("launch/configs/tiny.yaml", [f"data.path={prepared}", f"out_dir={tmp_path}",
                                                   "data.read_stall_s=5", "data.read_timeout_s=60"])
    assert (cfg.data.read_stall_s, cfg.data.read_timeout_s) == (5, 60)
    with pytest.raises(ValueError, match="data.read_stall_s: must be > 0"):
        load_config("launch/configs/tiny.yaml", [f"data.path={prepared}", f"out_dir={tmp_path}",
                                                 "data.read_stall_s=0"])
