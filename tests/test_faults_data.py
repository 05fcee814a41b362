"""Hostile shards through the full trainer (2 ranks, DeepSpeed): `fail` stops with one line naming the shard and
exit code 2; `skip` trains on, counts what it skipped and reports the counts in the run summary.

Every kind of damage the loader tests cover (tests/test_data_hostile.py) is planted here in a prepared dataset:
a flipped byte (only the manifest's sha256 sees it), a truncated file, bytes that are not a tar, a missing file, a
pickle member that would create a file if anything unpickled it, and token ids beyond the vocabulary. Except for
the flipped byte and the truncation, the manifest is rewritten to agree with the damaged bytes, so only the
loader's checks of the content itself can find the problem.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import webdataset

from tests.conftest import corpus_files, run_cli
from tests.test_data_hostile import rewrite_shard

pytestmark = pytest.mark.distributed

KINDS = ("sha256", "size", "not_tar", "missing", "member", "vocab")
"""The damage planted, by the reason the loader counts it under."""


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory):
    """The test corpus in about 20 small shards, so that losing a few still leaves every rank plenty to read."""
    out = tmp_path_factory.mktemp("many") / "data"
    inputs = [arg for p in corpus_files() for arg in ("--input", f"{p}/**/*.py")]
    run_cli(["launch.prepare", *inputs, "--out", str(out), "--vocab-size", "1000", "--shard-bytes", "60000"],
            check=True)
    assert len(list(out.glob("shard-*.tar"))) >= 12
    return out


def plant(root, index: int, kind: str, canary) -> str:
    """Damage shard `index` of the dataset at `root` in the way named by `kind`; return the shard's file name."""
    manifest = json.loads((root / "manifest.json").read_text())
    entry = manifest["shards"][index]
    path = root / entry["file"]
    if kind == "sha256":
        raw = bytearray(path.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        path.write_bytes(bytes(raw))
    elif kind == "size":
        path.write_bytes(path.read_bytes()[: entry["bytes"] // 2])
    elif kind == "not_tar":
        rewrite_shard(root, index, [("x.ids", b"")] * 3, raw_bytes=b"not a tar file, whatever the name says\n" * 300)
    elif kind == "missing":
        path.unlink()
    elif kind in ("member", "vocab"):
        # Keep the shard's own good documents and add one bad member among them.
        members = [(f"{s['__key__']}.ids", s["ids"]) for s in webdataset.WebDataset(str(path), shardshuffle=False)]
        if kind == "member":
            bad = ("9999999999.pickle", f"cos\nsystem\n(S'touch {canary}'\ntR.".encode())
        else:
            bad = ("9999999999.ids", np.asarray([9, manifest["vocab_size"] + 5], dtype="<u2").tobytes())
        rewrite_shard(root, index, [*members[:3], bad, *members[3:]])
    else:
        raise AssertionError(kind)
    return entry["file"]


def train(data, out, *extra):
    return run_cli(["launch.train", "--config", "launch/configs/tiny.yaml", "--nproc", "2", f"data.path={data}",
                    f"out_dir={out}", "train.log_every=50", *extra])


@pytest.mark.parametrize("kind", KINDS)
def test_fail_policy_names_the_shard_and_exits_2(many_shards, tmp_path, kind):
    data, canary = tmp_path / "data", tmp_path / "UNPICKLED"
    shutil.copytree(many_shards, data)
    # Damage the same way every shard but the last, so the first read meets it and the test stays short.
    n = len(json.loads((data / "manifest.json").read_text())["shards"])
    names = {plant(data, i, kind, canary) for i in range(n - 1)}
    proc = train(data, tmp_path / "fail", "train.max_steps=400")
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.startswith("error")), None)
    assert start is not None, proc.stderr[-3000:]
    # Missing and wrongly sized shards are found by a stat() before any rank starts: one error listing them all
    # (an indented line per shard). The others are found by the rank that reads the shard: one line.
    block = "\n".join([lines[start]] + [ln for ln in lines[start + 1:] if ln.startswith("  - ")])
    assert any(name in block for name in names) and "on_bad_data" in block and "skip" in block, block
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]  # one line per rank, no launcher traceback
    assert not (tmp_path / "fail" / "summary.json").exists()
    assert not canary.exists(), "a pickle member was unpickled"


def test_skip_policy_counts_every_kind_and_reports(many_shards, tmp_path):
    data, canary = tmp_path / "data", tmp_path / "UNPICKLED"
    shutil.copytree(many_shards, data)
    for i, kind in enumerate(KINDS):
        plant(data, 2 * i, kind, canary)
    proc = train(data, tmp_path / "skip", "data.on_bad_data=skip", "train.max_steps=300")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "skip" / "summary.json").read_text())
    assert summary["steps"] == 300
    counts = summary["data"]
    tokens = sum(v for k, v in counts.items() if k.startswith("tokens/"))
    assert tokens >= 300 * 16 * 64, counts  # 300 steps of 16 rows x 64 tokens were trained on
    for kind in KINDS:
        level = "samples" if kind in ("member", "vocab") else "shards"
        assert counts.get(f"skipped_{level}/{kind}", 0) >= 1, (kind, counts)
    assert "data skipped so far" in proc.stderr
    assert not canary.exists(), "a pickle member was unpickled"
