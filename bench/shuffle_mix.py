"""How well the loader mixes a corpus whose shards are sorted by topic: each topic's share of the tokens in every
window of 20 consecutive global batches, against its share of the whole corpus.

    .venv/bin/python -m bench.shuffle_mix [--topics 4] [--shards-per-topic 3] [--docs-per-shard 500]
                                          [--windows 1,4,12] [--epochs 2] [--seed 0] [--out FILE.json]

The corpus: `topics` topics, one per shard, `shards-per-topic` shards each, written topic after topic (as a
prepare of a corpus stored in topic order writes them). Documents are short (2-20 tokens), and a topic's tokens
come from its own id range, so every token's topic is known. The loader (data/loader.py, one rank: the order is
the same on any number) reads `epochs` epochs with data.shuffle_window_shards set to each of --windows: 1 is the
in-shard shuffle only; a window holding every shard of the epoch mixes the whole corpus.

Columns per window setting and topic: the topic's global share, the lowest and the highest share over all windows
of 20 consecutive batches, and the largest deviation in points. Within a window of 20 batches (about 3,000
documents here) the sampling noise of a share is well under a point; what a window of W shards adds is the luck
of which shards it holds (a topic's share of a window varies by about sqrt(p(1-p)/W), data/order.py).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data.loader import Loader, LoaderConfig
from data.manifest import Manifest, write_manifest
from data.shards import ShardWriter
from data.tokenizer import SPECIAL_TOKENS, Tokenizer, train_tokenizer

SEQ_LEN, BATCH, SPAN = 128, 16, 20
FIRST_ID = len(SPECIAL_TOKENS)
"""Ordinary ids start after the special ones."""


@dataclass
class Corpus:
    root: Path
    topics: int
    ids_per_topic: int
    shards: int


def topic_sorted_corpus(root: Path, topics: int, shards_per_topic: int, docs_per_shard: int, seed: int) -> Corpus:
    """A prepared folder whose shards hold one topic each, in topic order."""
    (root / "tokenizer").mkdir(parents=True, exist_ok=True)
    words = [f"w{i}" for i in range(400)]
    rng = np.random.default_rng(seed)
    sample = (" ".join(rng.choice(words, size=12)) for _ in range(2000))
    model = train_tokenizer(sample, root / "tokenizer", vocab_size=300)
    tok = Tokenizer(model)
    per_topic = (tok.vocab_size - FIRST_ID) // topics
    writer = ShardWriter(root, tok.id_dtype, max_documents=docs_per_shard)
    for topic in range(topics):
        low = FIRST_ID + topic * per_topic
        for _ in range(shards_per_topic * docs_per_shard):
            writer.add(rng.integers(low, low + per_topic, size=int(rng.integers(2, 21))).astype(tok.id_dtype))
    shards = writer.close()
    manifest = Manifest(id_dtype=tok.id_dtype, vocab_size=tok.vocab_size, tokenizer_relpath="tokenizer/spm.model",
                        tokenizer_sha256=tok.sha256, special_ids={t: i for i, t in enumerate(SPECIAL_TOKENS)},
                        documents=writer.documents, tokens=writer.tokens, empty_documents=0, skipped_documents=0,
                        shards=shards, root=root)
    write_manifest(manifest, root)
    assert len(shards) == topics * shards_per_topic, "one topic per shard"
    return Corpus(root, topics, per_topic, len(shards))


def topic_tokens(corpus: Corpus, window_shards: int, epochs: int, seed: int) -> np.ndarray:
    """Tokens per topic in each global batch, [batches, topics], over `epochs` epochs of the corpus."""
    loader = Loader(LoaderConfig([(str(corpus.root), 1.0)], SEQ_LEN, BATCH, seed=seed,
                                 shuffle_window_shards=window_shards))
    total = loader.manifest.tokens + 2 * loader.manifest.documents
    counts = []
    for _ in range(epochs * total // (SEQ_LEN * BATCH)):
        ids = next(loader)[0].numpy().reshape(-1)
        ids = ids[ids >= FIRST_ID]
        counts.append(np.bincount((ids - FIRST_ID) // corpus.ids_per_topic, minlength=corpus.topics))
    loader.close()
    return np.asarray(counts)


def window_shares(counts: np.ndarray, span: int = SPAN) -> tuple[np.ndarray, np.ndarray]:
    """(global share per topic, share per topic in every window of `span` consecutive batches [windows, topics])."""
    sums = np.cumsum(np.vstack([np.zeros(counts.shape[1], dtype=np.int64), counts]), axis=0)
    windows = sums[span:] - sums[:-span]
    return counts.sum(0) / counts.sum(), windows / windows.sum(1, keepdims=True)


def measure(corpus: Corpus, window_shards: int, epochs: int, seed: int) -> dict:
    overall, shares = window_shares(topic_tokens(corpus, window_shards, epochs, seed))
    return {"window_shards": window_shards, "windows_of_batches": len(shares),
            "topics": [{"topic": t, "global": float(overall[t]), "min": float(shares[:, t].min()),
                        "max": float(shares[:, t].max()),
                        "max_deviation_points": float(100 * np.abs(shares[:, t] - overall[t]).max())}
                       for t in range(corpus.topics)]}


def table(results: list[dict]) -> str:
    lines = [f"{'window shards':>13} {'topic':>5} {'global %':>8} {'min %':>6} {'max %':>6} {'max dev (pts)':>13}"]
    for r in results:
        for t in r["topics"]:
            lines.append(f"{r['window_shards']:>13} {t['topic']:>5} {100 * t['global']:>8.1f} {100 * t['min']:>6.1f} "
                         f"{100 * t['max']:>6.1f} {t['max_deviation_points']:>13.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.shuffle_mix", description=__doc__.split("\n\n")[0])
    p.add_argument("--topics", type=int, default=4)
    p.add_argument("--shards-per-topic", type=int, default=3)
    p.add_argument("--docs-per-shard", type=int, default=500)
    p.add_argument("--windows", default="1,4,12", help="data.shuffle_window_shards values, comma-separated")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="also write the results as JSON")
    args = p.parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="cloze-shuffle-mix-"))
    try:
        corpus = topic_sorted_corpus(folder, args.topics, args.shards_per_topic, args.docs_per_shard, args.seed)
        results = [measure(corpus, int(w), args.epochs, args.seed) for w in args.windows.split(",")]
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"{corpus.shards} shards, one topic each, in topic order; share of each topic's tokens in every window of "
          f"{SPAN} consecutive global batches ({BATCH} x {SEQ_LEN} tokens), {args.epochs} epochs")
    print(table(results))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
