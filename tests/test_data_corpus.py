"""data/corpus.py: input expansion and document reading, including every error path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data.corpus import CorpusStats, expand_inputs, iter_documents


def _touch(path: Path, text: str = "x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_expand_files_dirs_globs_sorted_and_deduplicated(tmp_path):
    a = _touch(tmp_path / "b" / "a.py")
    b = _touch(tmp_path / "b" / "deep" / "z.md")
    c = _touch(tmp_path / "c.txt")
    _touch(tmp_path / "b" / "notes.bin")  # unsupported inside a directory walk: left out, no error
    _touch(tmp_path / "b" / ".hidden" / "h.py")  # hidden folders are not walked
    got = expand_inputs([str(tmp_path / "b"), str(tmp_path / "**" / "*.py"), str(c), str(c)])
    assert got == sorted([a.absolute(), b.absolute(), c.absolute()], key=str)


def test_recursive_glob_and_exclude(tmp_path):
    keep = _touch(tmp_path / "lib" / "x" / "m.py")
    _touch(tmp_path / "lib" / "site-packages" / "pkg" / "n.py")
    got = expand_inputs([str(tmp_path / "lib" / "**" / "*.py")], exclude=["*/site-packages/*"])
    assert got == [keep.absolute()]


def test_pattern_matching_nothing_names_it(tmp_path):
    with pytest.raises(ValueError, match=r"nothing\*\.py|matches no supported file") as e:
        expand_inputs([str(tmp_path / "nothing*.py")])
    assert "nothing*.py" in str(e.value)
    with pytest.raises(ValueError, match="no such file or directory") as e:
        expand_inputs([str(tmp_path / "missing.txt")])
    assert "missing.txt" in str(e.value)
    with pytest.raises(ValueError, match="no inputs"):
        expand_inputs([])


def test_exclude_that_removes_everything_says_so(tmp_path):
    _touch(tmp_path / "a.py")
    with pytest.raises(ValueError, match="after --exclude"):
        expand_inputs([str(tmp_path / "*.py")], exclude=["*"])


def test_unsupported_extension_names_file_and_supported(tmp_path):
    bad = _touch(tmp_path / "data.csv")
    with pytest.raises(ValueError) as e:
        expand_inputs([str(bad)])
    assert "data.csv" in str(e.value) and ".jsonl" in str(e.value) and ".py" in str(e.value)
    with pytest.raises(ValueError, match="data.csv"):
        expand_inputs([str(tmp_path / "*")])


def test_iter_documents_formats_and_counts(tmp_path):
    py = _touch(tmp_path / "a.py", "def f():\n    return 1\n")
    empty = _touch(tmp_path / "b.txt", "")
    jl = tmp_path / "c.jsonl"
    jl.write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "", "id": 2}) + "\n"
                  + json.dumps({"body": "x", "text": "three"}) + "\n", encoding="utf-8")
    stats = CorpusStats()
    docs = list(iter_documents([py, empty, jl], stats=stats))
    assert docs == [
        (str(py), "def f():\n    return 1\n"),
        (str(empty), ""),
        (f"{jl}:1", "one"),
        (f"{jl}:3", ""),
        (f"{jl}:4", "three"),
    ]
    assert (stats.files, stats.documents, stats.empty) == (3, 5, 2)


def test_custom_text_field(tmp_path):
    jl = tmp_path / "c.jsonl"
    jl.write_text(json.dumps({"content": "hello"}) + "\n", encoding="utf-8")
    assert list(iter_documents([jl], text_field="content")) == [(f"{jl}:1", "hello")]


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"body": "x"}', "no field 'text'"),
        ('{"text": 5}', "expected a string"),
    ],
)
def test_bad_jsonl_line_names_file_and_line(tmp_path, line, fragment):
    jl = tmp_path / "bad.jsonl"
    jl.write_text('{"text": "fine"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=fragment) as e:
        list(iter_documents([jl]))
    assert f"{jl}:2" in str(e.value)


def test_invalid_utf8_error_or_skip(tmp_path):
    good = _touch(tmp_path / "good.py", "x = 1\n")
    bad = tmp_path / "latin1.py"
    bad.write_bytes("caf\xe9 = 1\n".encode("latin-1"))
    with pytest.raises(ValueError, match="not valid UTF-8") as e:
        list(iter_documents([good, bad]))
    assert "latin1.py" in str(e.value) and "offset 3" in str(e.value)
    stats = CorpusStats()
    assert list(iter_documents([good, bad], decode_errors="skip", stats=stats)) == [(str(good), "x = 1\n")]
    assert [s for s, _ in stats.skipped] == [str(bad)]


def test_invalid_utf8_jsonl_line_is_skipped_alone(tmp_path):
    jl = tmp_path / "mixed.jsonl"
    jl.write_bytes(b'{"text": "a"}\n{"text": "caf\xe9"}\n{"text": "c"}\n')
    stats = CorpusStats()
    got = [t for _, t in iter_documents([jl], decode_errors="skip", stats=stats)]
    assert got == ["a", "c"]
    assert stats.skipped[0][0] == f"{jl}:2"


def test_unreadable_file_is_named(tmp_path):
    link = tmp_path / "dangling.py"
    link.symlink_to(tmp_path / "gone.py")  # glob lists it, reading it fails
    paths = expand_inputs([str(tmp_path / "*.py")])
    with pytest.raises(ValueError, match="cannot read input file") as e:
        list(iter_documents(paths))
    assert "dangling.py" in str(e.value)


def test_empty_corpus_lists_inputs(tmp_path):
    a = _touch(tmp_path / "a.txt", "")
    b = _touch(tmp_path / "b.md", "")
    with pytest.raises(ValueError, match="empty corpus") as e:
        list(iter_documents([a, b]))
    assert "a.txt" in str(e.value) and "b.md" in str(e.value)


def test_unknown_decode_policy_rejected(tmp_path):
    with pytest.raises(ValueError, match="decode_errors"):
        list(iter_documents([_touch(tmp_path / "a.py")], decode_errors="ignore"))


def _jsonl_bytes(texts, field="text") -> bytes:
    return "".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts)).encode()


def test_compressed_jsonl_and_parquet_read_like_jsonl(tmp_path):
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    texts = [f"document {i} café\n    indented" for i in range(700)] + [""]
    plain = tmp_path / "a.jsonl"
    plain.write_bytes(_jsonl_bytes(texts))
    gz = tmp_path / "b.jsonl.gz"
    gz.write_bytes(gzip.compress(_jsonl_bytes(texts)))
    zst = tmp_path / "c.JSONL.ZST"  # suffixes match case-insensitively
    # two concatenated frames, as sharded dumps often are
    half = len(texts) // 2
    c = zstandard.ZstdCompressor()
    zst.write_bytes(c.compress(_jsonl_bytes(texts[:half])) + c.compress(_jsonl_bytes(texts[half:])))
    pq_path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"id": list(range(len(texts))), "body": texts[:-1] + [None]}), pq_path,
                   row_group_size=100)
    assert expand_inputs([str(tmp_path)]) == [plain, gz, zst, pq_path]
    for path, field in ((plain, "text"), (gz, "text"), (zst, "text"), (pq_path, "body")):
        stats = CorpusStats()
        docs = list(iter_documents([path], text_field=field, stats=stats))
        assert [t for _, t in docs] == texts, path
        assert stats.empty == 1 and stats.input_bytes == path.stat().st_size
    assert docs[3][0] == f"{pq_path}:row4"


def test_new_formats_name_their_problems(tmp_path):
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(gzip.compress(_jsonl_bytes(["x" * 50] * 2000))[:300])
    with pytest.raises(ValueError, match="truncated") as e:
        list(iter_documents([cut]))
    assert "cut.jsonl.gz" in str(e.value)
    garbage = tmp_path / "g.jsonl.zst"
    garbage.write_bytes(b"definitely not zstd" * 10)
    with pytest.raises(ValueError, match="g.jsonl.zst.*(damaged|decompress)"):
        list(iter_documents([garbage]))
    table = tmp_path / "t.parquet"
    pq.write_table(pa.table({"content": ["a"], "n": [1]}), table)
    with pytest.raises(ValueError, match="no column 'text' \\(columns: content, n\\).*--text-field"):
        list(iter_documents([table]))
    with pytest.raises(ValueError, match="column 'n' has type int64"):
        list(iter_documents([table], text_field="n"))
    fake = tmp_path / "fake.parquet"
    fake.write_bytes(b"PAR1 nope")
    with pytest.raises(ValueError, match="fake.parquet: not a readable parquet file"):
        list(iter_documents([fake]))
