"""PackedStream: the single-source, in-process loader that evaluation (and older callers) use.

    PackedStream(path, seq_len=512, batch_size=8, rank=r, world_size=w, seed=0)

is build_loader([(path, 1.0)], ..., num_workers=0): the same packing, shard order, exact resume and bad-data
checks (data/loader.py). Kept as a name so callers that want "the stream of this one dataset" need not know
about mixtures and workers.
"""

from __future__ import annotations

import os

from data.loader import Loader, LoaderConfig


class PackedStream(Loader):
    """Endless iterator of (input_ids, doc_ids), int64 [batch_size, seq_len], over one prepared dataset."""

    def __init__(
        self,
        data_dir: str | os.PathLike,
        seq_len: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        on_bad_data: str = "fail",
    ):
        super().__init__(LoaderConfig(sources=[(str(data_dir), 1.0)], seq_len=seq_len, batch_size=batch_size,
                                      rank=rank, world_size=world_size, seed=seed, on_bad_data=on_bad_data))
        self.vocab_size = self.manifest.vocab_size
