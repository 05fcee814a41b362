"""Shared helpers for the data tests: a deterministic synthetic corpus and a tokenizer trained once per process.

Holds no tests itself; the test_data_* modules import it.
"""

from __future__ import annotations

import atexit
import functools
import random
import shutil
import tempfile
from pathlib import Path

WORDS = (
    "alpha beta gamma delta value index result count name data token shard stream epoch batch row "
    "self return import from class def if else for while with yield lambda none true false print"
).split()
UNICODE_BITS = ("café", "naïve", "Ünïcödé", "日本語", "中文", "😀", "ß", "→")
TEST_VOCAB = 450


def synthetic_document(rng: random.Random) -> str:
    """Python-like text: indentation, blank lines, comments, runs of spaces, the odd tab and non-ASCII word."""
    lines = []
    for _ in range(rng.randrange(1, 5)):
        lines.append(f"def {rng.choice(WORDS)}_{rng.choice(WORDS)}({rng.choice(WORDS)}, {rng.choice(WORDS)}):")
        for _ in range(rng.randrange(1, 7)):
            indent = "    " * rng.randrange(1, 4)
            tail = f"  # {rng.choice(WORDS)} {rng.choice(UNICODE_BITS)}" if rng.random() < 0.2 else ""
            sep = "\t" if rng.random() < 0.05 else " "
            lines.append(f"{indent}{rng.choice(WORDS)} ={sep}{rng.choice(WORDS)}.{rng.choice(WORDS)}"
                         f"({rng.randrange(1000)}){tail}")
        lines.append("")
    return "\n".join(lines) + "\n"


def synthetic_corpus(n_docs: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [synthetic_document(rng) for _ in range(n_docs)]


def write_text_files(folder: Path, docs: list[str], suffix: str = ".py") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, doc in enumerate(docs):
        path = folder / f"doc{i:04d}{suffix}"
        path.write_text(doc, encoding="utf-8")
        paths.append(path)
    return paths


@functools.cache
def trained_model() -> Path:
    """A TEST_VOCAB-piece model trained on synthetic_corpus(400), shared by every data test in this process."""
    from data.tokenizer import train_tokenizer

    folder = Path(tempfile.mkdtemp(prefix="cloze-test-tok-"))
    atexit.register(shutil.rmtree, folder, True)
    return train_tokenizer(synthetic_corpus(400), folder, vocab_size=TEST_VOCAB)


def random_docs(n: int, seed: int = 0, high: int = TEST_VOCAB, max_len: int = 700):
    """n documents of random ordinary ids (never a special id), lengths 1..max_len-1."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return [rng.integers(9, high, size=int(rng.integers(1, max_len))) for _ in range(n)]


def dataset_dir(root: Path, docs, **writer_kwargs):
    """A complete prepared folder (shards, tokenizer copy, manifest) holding docs; returns its Manifest."""
    from data.manifest import Manifest, write_manifest
    from data.shards import ShardWriter
    from data.tokenizer import SPECIAL_TOKENS, Tokenizer

    (root / "tokenizer").mkdir(parents=True, exist_ok=True)
    shutil.copy(trained_model(), root / "tokenizer" / "spm.model")
    tok = Tokenizer(root / "tokenizer" / "spm.model")
    writer = ShardWriter(root, "uint16", **writer_kwargs)
    for d in docs:
        writer.add(d)
    shards = writer.close()
    manifest = Manifest(id_dtype="uint16", vocab_size=tok.vocab_size, tokenizer_relpath="tokenizer/spm.model",
                        tokenizer_sha256=tok.sha256, special_ids={t: i for i, t in enumerate(SPECIAL_TOKENS)},
                        documents=writer.documents, tokens=writer.tokens, empty_documents=0, skipped_documents=0,
                        shards=shards, root=root)
    write_manifest(manifest, root)
    return manifest


def shard_documents(docs, manifest) -> list[list]:
    """docs split into the manifest's shards, in file order (ShardWriter writes them in the order given)."""
    starts = [0]
    for shard in manifest.shards:
        starts.append(starts[-1] + shard.samples)
    return [list(docs[a:b]) for a, b in zip(starts, starts[1:])]


def reading_order(order, by_shard, epochs) -> list:
    """The global document order of one source in the given epochs (data/order.py): each window's documents,
    its shards' members taken shard after shard, in the window's seeded order. Entries of by_shard may be strings
    (a bad member, named by its skip reason): they stay in the list, so callers can see where the reader meets
    them. A shard given as None (skipped whole) contributes nothing."""
    out = []
    for epoch in epochs:
        for w in range(order.windows_per_epoch):
            members = [m for i in order.window(epoch, w) for m in (by_shard[i] or [])]
            out.extend(members[j] for j in order.documents(epoch, w, len(members)))
    return out


def framed(docs):
    """[CLS]=2, ids, [SEP]=3 per document, concatenated; string entries (bad members) are left out."""
    import numpy as np

    return np.concatenate([np.concatenate([[2], np.asarray(d), [3]]) for d in docs if not isinstance(d, str)])


def web_and_code(root: Path):
    """Two sources for mixing tests: 'web' (60 docs in 12 shards of 5, ids in [9, 200), lengths varying a lot so
    ranks and workers hold different token counts) and 'code' (40 docs in 8 shards, ids in [200, 450), so a row's
    source can be told from its ids). Each is (root, docs, dataset_dir result)."""
    web_docs = random_docs(60, seed=1, high=200, max_len=160)
    code_docs = [d + 191 for d in random_docs(40, seed=2, high=259, max_len=120)]
    return ((root / "web", web_docs, dataset_dir(root / "web", web_docs, max_documents=5)),
            (root / "code", code_docs, dataset_dir(root / "code", code_docs, max_documents=5)))


def per_rank_batches(configs, steps: int, state=None) -> list[list[tuple]]:
    """Per rank, the first `steps` batches (ids, doc ids as numpy arrays) of one Loader per config, each loaded
    from `state` first when given; the loaders are closed."""
    from data.loader import Loader

    loaders = [Loader(c) for c in configs]
    try:
        for loader in loaders:
            if state is not None:
                loader.load_state_dict(state)
        return [[tuple(t.numpy() for t in next(loader)) for _ in range(steps)] for loader in loaders]
    finally:
        for loader in loaders:
            loader.close()
