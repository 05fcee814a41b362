"""Packing: documents framed as [CLS] ids [SEP], concatenated and cut into rows of exactly seq_len tokens.

No padding anywhere: a document that does not fit continues at the start of the next row. Each row carries
per-token document ids (0 for whatever document the row starts in, +1 at every document start), so attention
can be kept inside a document. Rows are cut from one concatenation per call, so the cost per token is a few
vectorised numpy passes, not Python per token.

The position of a packer is the document it is in the middle of (its reader position and the token offset
inside the framed document), or none: then the next row starts with the reader's next document.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from data.reader import Position

NextDoc = Callable[[], tuple[np.ndarray, Position]]
"""Returns the next document's ids (no specials) and its reader position."""


class Packer:
    """Rows of seq_len tokens from a stream of documents."""

    def __init__(self, next_doc: NextDoc, seq_len: int, cls_id: int, sep_id: int):
        if seq_len < 1:
            raise ValueError(f"seq_len={seq_len} must be >= 1")
        self.next_doc, self.seq_len, self.cls_id, self.sep_id = next_doc, seq_len, cls_id, sep_id
        self.head: np.ndarray | None = None
        """The framed document the next row starts in, when a previous row cut it."""
        self.head_position: Position | None = None
        self.offset = 0
        """Tokens of head already emitted (0 < offset < len(head) whenever head is set)."""

    def frame(self, ids: np.ndarray) -> np.ndarray:
        doc = np.empty(ids.size + 2, dtype=np.int64)
        doc[0], doc[-1] = self.cls_id, self.sep_id
        doc[1:-1] = ids
        return doc

    def resume(self, offset: int) -> None:
        """Restore a cut document: the reader must sit at its position; offset tokens of it were already emitted."""
        if offset <= 0:
            return
        ids, position = self.next_doc()
        doc = self.frame(ids)
        if offset >= doc.size:
            raise ValueError(f"loader state offset {offset} lies beyond its document ({doc.size} tokens at "
                             f"{position}); the state does not belong to this data")
        self.head, self.head_position, self.offset = doc, position, offset

    def skip(self, n: int) -> None:
        """Move past the next n rows without building them: afterwards the packer stands exactly where rows(n)
        would have left it (the same documents read, the same one cut)."""
        need = n * self.seq_len
        if need <= 0:
            return
        if self.head is not None:
            rest = self.head.size - self.offset
            if rest > need:
                self.offset += need
                return
            need -= rest
            self.head, self.head_position, self.offset = None, None, 0
        while need > 0:
            ids, position = self.next_doc()
            size = ids.size + 2
            if size > need:
                self.head, self.head_position, self.offset = self.frame(ids), position, need
            need -= size

    def rows(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The next n rows: (ids, doc_ids), both int64 [n, seq_len]."""
        need = n * self.seq_len
        pieces: list[np.ndarray] = []
        starts: list[int] = []
        filled = 0
        if self.head is not None:
            rest = self.head[self.offset :]
            take = min(rest.size, need)
            pieces.append(rest[:take])
            filled = take
            if take < rest.size:
                self.offset += take
            else:
                self.head, self.head_position, self.offset = None, None, 0
        while filled < need:
            ids, position = self.next_doc()
            doc = self.frame(ids)
            starts.append(filled)
            take = min(doc.size, need - filled)
            pieces.append(doc[:take] if take < doc.size else doc)
            filled += take
            if take < doc.size:
                self.head, self.head_position, self.offset = doc, position, take
        flat = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
        is_start = np.zeros(need, dtype=np.int64)
        is_start[starts] = 1
        is_start = is_start.reshape(n, self.seq_len)
        doc_ids = np.cumsum(is_start, axis=1)
        doc_ids -= is_start[:, :1]
        return flat.reshape(n, self.seq_len).copy() if len(pieces) == 1 else flat.reshape(n, self.seq_len), doc_ids
