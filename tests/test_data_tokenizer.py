"""data/tokenizer.py: special ids, control symbols, byte fallback, whitespace, determinism, errors."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
from hypothesis import given, settings
from hypothesis import strategies as st

from data.tokenizer import (
    MAX_MODEL_BYTES,
    MAX_SEGMENT_CHARS,
    REQUIRED_CHARS,
    SCORE_GRID,
    SPECIAL_TOKENS,
    Tokenizer,
    segment,
    train_tokenizer,
)
from tests.data_helpers import TEST_VOCAB, synthetic_corpus, trained_model

# Any Unicode text except lone surrogates (not encodable as UTF-8, so not valid corpus text).
ANY_TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=300)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(trained_model())


def test_special_tokens_have_fixed_ids(tok):
    assert [tok.id_to_piece(i) for i in range(9)] == list(SPECIAL_TOKENS)
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 1, 2, 3, 4)
    assert tok.special_ids == tuple(range(9))
    assert tok.first_ordinary_id == 9
    assert tok.mode_ids == {"mlm": 5, "span": 6, "causal": 7, "prefix": 8}
    assert tok.vocab_size == TEST_VOCAB
    assert tok.id_dtype == "uint16"


def test_literal_special_strings_never_become_special_ids(tok):
    text = " ".join(SPECIAL_TOKENS) + "[MASK][CLS]x[SEP]"
    ids = tok.encode(text)
    assert min(ids) >= tok.first_ordinary_id
    assert tok.decode(ids) == text


def test_byte_fallback_instead_of_unk(tok):
    text = "Ω 𝔘nseen ☃ ∮ क"  # characters absent from the training corpus
    ids = tok.encode(text)
    assert tok.unk_id not in ids
    assert any(tok.is_byte(i) for i in ids)
    assert tok.decode(ids) == text


def test_whitespace_and_newlines_round_trip(tok):
    text = "def f(a,  b):\n\n\tif a:\n        return   b  \n\r\n   \n\n\n"
    assert tok.decode(tok.encode(text)) == text
    # indentation costs less than one token per space: whitespace-only pieces exist
    assert len(tok.encode("        x")) < 8


@settings(max_examples=150, deadline=None)
@given(ANY_TEXT)
def test_decode_inverts_encode_for_any_text(text):
    t = Tokenizer(trained_model())
    ids = t.encode(text)
    assert all(t.first_ordinary_id <= i < t.vocab_size for i in ids)
    # '▁' in the input is SentencePiece's own space marker and comes back as a space
    assert t.decode(ids) == text.replace("\u2581", " ")


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=st.sampled_from("ab \n\t"), max_size=3000))
def test_segments_cover_text_and_are_bounded(text):
    parts = segment(text)
    assert "".join(parts) == text
    assert all(0 < len(p) <= MAX_SEGMENT_CHARS for p in parts)
    # every segment but an overlong line's pieces and the tail ends at a newline
    assert all(p.endswith("\n") or "\n" not in p for p in parts)


def test_encode_batch_matches_encode(tok):
    docs = synthetic_corpus(20, seed=3) + ["", "x" * 5000]
    batch = tok.encode_batch(docs, num_threads=2)
    assert [b.tolist() for b in batch] == [tok.encode(d) for d in docs]
    assert all(b.dtype == np.int64 for b in batch)


def test_word_start(tok):
    ws = tok.word_start
    assert ws.shape == (tok.vocab_size,) and ws.dtype == bool
    assert ws[: tok.first_ordinary_id].all()
    for i in range(tok.first_ordinary_id, tok.vocab_size):
        assert ws[i] == tok.id_to_piece(i).startswith("\u2581")
    assert ws.sum() > tok.first_ordinary_id  # some ordinary pieces start words


def test_sha256_and_score_grid(tok):
    assert tok.sha256 == hashlib.sha256(trained_model().read_bytes()).hexdigest()
    for i in range(tok.first_ordinary_id, tok.vocab_size):
        if not tok.is_byte(i):
            score = tok.piece_score(i)
            assert score / SCORE_GRID == round(score / SCORE_GRID)
    for ch in REQUIRED_CHARS:  # needed by the HF export; '[' etc. are kept even when rare
        assert len(tok.encode(ch)) == 1 and not tok.is_byte(tok.encode(ch)[0])


def test_training_is_deterministic_and_sampled(tmp_path):
    docs = synthetic_corpus(150, seed=1)
    a = train_tokenizer(docs, tmp_path / "a", vocab_size=400, max_sentences=60)
    b = train_tokenizer(docs, tmp_path / "b", vocab_size=400, max_sentences=60)
    assert a.read_bytes() == b.read_bytes()
    c = train_tokenizer(docs, tmp_path / "c", vocab_size=400, max_sentences=60, seed=1)
    assert c.read_bytes() != a.read_bytes()  # the seed picks a different sample


def test_training_errors(tmp_path):
    docs = synthetic_corpus(30)
    with pytest.raises(ValueError, match="at least 266"):
        train_tokenizer(docs, tmp_path, vocab_size=100)
    with pytest.raises(ValueError, match="smaller --vocab-size"):
        train_tokenizer(docs, tmp_path, vocab_size=50000)
    with pytest.raises(ValueError, match="not supported"):
        train_tokenizer(docs, tmp_path, model_type="bpe")
    with pytest.raises(ValueError, match="empty"):
        train_tokenizer([""], tmp_path, vocab_size=400)


def test_loading_errors_name_the_file(tmp_path):
    missing = tmp_path / "none.model"
    with pytest.raises(ValueError, match="not found") as e:
        Tokenizer(missing)
    assert "none.model" in str(e.value)
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"\xff\x00 this is not a protobuf")
    with pytest.raises(ValueError, match="junk.model"):
        Tokenizer(junk)
    # a stock SentencePiece model (<unk>, <s>, </s>, NFKC) is refused with a pointer to the fix
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(synthetic_corpus(50)), model_writer=model,
                                   vocab_size=200, minloglevel=2)
    stock = tmp_path / "stock.model"
    stock.write_bytes(model.getvalue())
    with pytest.raises(ValueError, match="not trained by cloze") as e:
        Tokenizer(stock)
    assert "stock.model" in str(e.value)


def test_model_with_scores_off_the_grid_is_refused(tmp_path):
    # the HF export's exactness depends on grid scores, so a hand-edited model must not slip through
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto.FromString(trained_model().read_bytes())
    normal = next(p for p in proto.pieces if p.type == p.NORMAL)
    normal.score += 0.001
    edited = tmp_path / "edited.model"
    edited.write_bytes(proto.SerializeToString())
    with pytest.raises(ValueError, match="score grid") as e:
        Tokenizer(edited)
    assert "edited.model" in str(e.value)


@pytest.mark.parametrize("what", ["device", "fifo", "folder", "too_large"])
def test_a_tokenizer_path_that_is_not_a_bounded_regular_file_is_refused_at_once(tmp_path, what):
    """A manifest names the tokenizer file: a device, a FIFO (a read would block forever), a folder or an
    oversized file is refused before any read, with the path named."""
    import os

    path = tmp_path / "spm.model"
    if what == "device":
        path = Path("/dev/zero")
    elif what == "fifo":
        os.mkfifo(path)
    elif what == "folder":
        path.mkdir()
    else:
        with path.open("wb") as f:
            f.truncate(MAX_MODEL_BYTES + 1)  # sparse: no disk used
    with pytest.raises(ValueError, match="not a regular file|more than a SentencePiece model") as e:
        Tokenizer(path)
    assert str(path) in str(e.value)


def test_the_model_bytes_are_the_file_read_and_hashed(tmp_path):
    tok = Tokenizer(trained_model())
    assert hashlib.sha256(tok.model_bytes).hexdigest() == tok.sha256
    assert tok.model_bytes == Path(trained_model()).read_bytes()
