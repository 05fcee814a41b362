"""Data side of cloze: corpus readers, SentencePiece tokenizer (+ HF export), tar shards + manifest, and the
loader the trainer reads (data.loader.build_loader: packed rows, several sources mixed by weight, worker
processes, exact resume, bad-data policy). Never imports objectives/ or model/."""
