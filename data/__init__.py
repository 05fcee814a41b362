"""Data side of cloze: corpus readers, SentencePiece tokenizer (+ HF export), tar shards + manifest, and the
packed, resumable stream the trainer reads. Never imports objectives/ or model/."""
