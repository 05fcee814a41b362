"""python -m launch.prepare end to end: layout, contents, reproducibility, and one-line errors."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from data.manifest import load_manifest
from data.stream import PackedStream
from data.tokenizer import Tokenizer
from launch.prepare import main
from tests.data_helpers import synthetic_corpus, trained_model, write_text_files

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[str]]:
    """Input folder: 60 .py files, a JSONL file, an empty .txt and a Latin-1 file; returns (folder, texts in
    the order prepare reads them, empty and undecodable ones left out)."""
    folder = tmp_path_factory.mktemp("corpus")
    docs = synthetic_corpus(60, seed=21)
    write_text_files(folder / "src", docs)
    lines = [json.dumps({"text": t}) for t in ("first json doc", "second: café 日本")]
    (folder / "extra.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (folder / "empty.txt").write_text("", encoding="utf-8")
    (folder / "latin1.py").write_bytes("x = 'caf\xe9'\n".encode("latin-1"))
    return folder, ["first json doc", "second: café 日本", *docs]  # sorted paths: extra.jsonl < src/...


def _run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def _prepare(capsys, corpus_dir: Path, out: Path, *extra) -> tuple[int, str, str]:
    return _run(capsys, "--input", corpus_dir, "--out", out, "--vocab-size", 450, "--shard-bytes", 20480, *extra)


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_prepare_layout_contents_and_summary(corpus, tmp_path, capsys):
    folder, texts = corpus
    out = tmp_path / "out"
    code, stdout, stderr = _prepare(capsys, folder, out)
    assert code == 0, stderr
    for name in ("spm.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (out / "tokenizer" / name).is_file()
    manifest = load_manifest(out, verify_hashes=True)
    assert len(manifest.shards) > 1 and (out / "shard-000000.tar").is_file()
    assert (manifest.documents, manifest.empty_documents, manifest.skipped_documents) == (len(texts), 1, 1)
    assert "latin1.py" in stderr and "warning: skipped" in stderr
    for word in ("documents", "empty skipped", "tokens", "shards", "wall time"):
        assert word in stdout
    # the shards hold exactly the documents, in input order, encoded by the recorded tokenizer
    tok = Tokenizer(manifest.tokenizer_path)
    decoded = []
    for path in manifest.shard_paths:
        with tarfile.open(path) as tar:
            decoded += [tok.decode(np.frombuffer(tar.extractfile(m).read(), "<u2")) for m in tar.getmembers()]
    assert decoded == texts
    # and the loader reads them
    ids, _ = next(PackedStream(out, seq_len=32, batch_size=2, rank=1, world_size=2))
    assert ids.shape == (2, 32)


def test_two_runs_are_byte_identical_and_tokenizer_reuse(corpus, tmp_path, capsys):
    folder, _ = corpus
    assert _prepare(capsys, folder, tmp_path / "a")[0] == 0
    assert _prepare(capsys, folder, tmp_path / "b", "--threads", 1)[0] == 0
    a, b = _tree(tmp_path / "a"), _tree(tmp_path / "b")
    assert a.keys() == b.keys() and a == b
    # reusing the trained model gives the same shards again
    reused = tmp_path / "c"
    assert _prepare(capsys, folder, reused, "--tokenizer", tmp_path / "a" / "tokenizer" / "spm.model")[0] == 0
    assert _tree(reused) == a


def test_rerun_with_bigger_shards_removes_stale_ones(corpus, tmp_path, capsys):
    folder, _ = corpus
    out = tmp_path / "out"
    model = trained_model()
    assert _prepare(capsys, folder, out, "--tokenizer", model)[0] == 0
    before = len(load_manifest(out).shards)
    assert _run(capsys, "--input", folder, "--out", out, "--tokenizer", model)[0] == 0
    assert len(load_manifest(out).shards) == 1 < before
    assert sorted(p.name for p in out.glob("shard-*.tar")) == ["shard-000000.tar"]


@pytest.mark.parametrize(
    ("make_args", "fragment"),
    [
        (lambda d, t: ["--input", t / "missing.py", "--out", t / "o"], "missing.py"),
        (lambda d, t: ["--input", t / "none*.py", "--out", t / "o"], "none*.py"),
        (lambda d, t: ["--input", d / "empty.txt", "--out", t / "o"], "empty corpus"),
        (lambda d, t: ["--input", d, "--out", t / "o", "--tokenizer", t / "nope.model"], "nope.model"),
        (lambda d, t: ["--input", d / "latin1.py", d / "src", "--out", t / "o", "--on-decode-error", "error"],
         "latin1.py"),
        (lambda d, t: ["--input", d / "src", "--out", t / "o", "--vocab-size", 60000], "--vocab-size"),
    ],
)
def test_errors_are_one_line_exit_2(corpus, tmp_path, capsys, make_args, fragment):
    folder, _ = corpus
    args = make_args(folder, tmp_path)
    if args[1] == folder / "latin1.py":  # two inputs: repeat the flag
        args = ["--input", args[1], "--input", args[2], *args[3:]]
    code, _, err = _run(capsys, *args)
    assert code == 2
    lines = [x for x in err.strip().splitlines() if not x.startswith("[prepare] ")]  # progress lines aside
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], err
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_cli_process_unsupported_file_no_traceback(tmp_path):
    bad = tmp_path / "table.csv"
    bad.write_text("a,b\n")
    proc = subprocess.run([sys.executable, "-m", "launch.prepare", "--input", str(bad), "--out", str(tmp_path / "o")],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "table.csv" in proc.stderr and "Traceback" not in proc.stderr


def test_hf_tokenizer_in_output_matches(corpus, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    folder, texts = corpus
    out = tmp_path / "out"
    assert _prepare(capsys, folder, out, "--tokenizer", trained_model(), "--model-max-length", 128)[0] == 0
    hf = transformers.AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    tok = Tokenizer(out / "tokenizer" / "spm.model")
    assert hf.model_max_length == 128
    for text in texts[:5]:
        assert hf(text)["input_ids"] == [2, *tok.encode(text), 3]


def test_several_inputs_after_one_flag_and_repeated_flags(corpus, tmp_path, capsys):
    folder, texts = corpus
    model = trained_model()
    one = ["--input", folder / "extra.jsonl", folder / "src"]
    two = ["--input", folder / "extra.jsonl", "--input", folder / "src"]
    for args, out in ((one, tmp_path / "one"), (two, tmp_path / "two")):
        assert _run(capsys, *args, "--out", out, "--tokenizer", model)[0] == 0
    assert _tree(tmp_path / "one") == _tree(tmp_path / "two")
    assert load_manifest(tmp_path / "one").documents == len(texts)


def test_long_documents_are_split_and_shards_stay_bounded(tmp_path, capsys):
    tok = Tokenizer(trained_model())
    long_text = "".join(synthetic_corpus(120, seed=3))  # one document of ~100 kB
    short = synthetic_corpus(3, seed=4)
    folder = tmp_path / "in"
    write_text_files(folder, [long_text, *short])
    out = tmp_path / "out"
    limit = 20480
    code, stdout, _ = _run(capsys, "--input", folder, "--out", out, "--tokenizer", trained_model(),
                           "--shard-bytes", limit)
    assert code == 0 and "1 split" in stdout
    manifest = load_manifest(out, verify_hashes=True)
    assert manifest.split_documents == 1 and all(s.bytes <= limit for s in manifest.shards)
    samples = []
    for path in manifest.shard_paths:
        with tarfile.open(path) as tar:
            samples += [np.frombuffer(tar.extractfile(m).read(), "<u2") for m in tar.getmembers()]
    want = tok.encode(long_text)
    pieces = len(samples) - len(short)
    assert pieces > 1 and np.array_equal(np.concatenate(samples[:pieces]), want)  # split, nothing dropped
    # --max-document-tokens caps samples below what a shard allows
    capped = tmp_path / "capped"
    assert _run(capsys, "--input", folder, "--out", capped, "--tokenizer", trained_model(),
                "--max-document-tokens", 100)[0] == 0
    m = load_manifest(capped)
    assert m.documents == sum(-(-len(tok.encode(t)) // 100) for t in [long_text, *short])


def test_progress_bar_reports_rates_and_eta(corpus, tmp_path):
    from data.pipeline import PrepareConfig, prepare
    from launch.prepare import progress_line

    folder, _ = corpus
    seen = []
    prepare(PrepareConfig(inputs=[str(folder)], out_dir=tmp_path / "o", tokenizer=trained_model()), seen.append)
    shards = [p for p in seen if p.phase == "shards"]
    assert shards and shards[-1].input_bytes == shards[-1].total_bytes > 0
    assert shards[-1].tokens == load_manifest(tmp_path / "o").tokens
    snapshot = dataclasses.replace(shards[-1], documents=100, tokens=50_000, input_bytes=1000, total_bytes=4000)
    line = progress_line(snapshot, elapsed=10.0)
    assert line == ("[prepare] tokenizing  25% |######------------------| 100 docs (10/s), 50.0k tokens (5.0k/s), "
                    "ETA 0:00:30")
