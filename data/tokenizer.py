"""SentencePiece tokenizer: training with fixed special tokens, and a small wrapper the rest of cloze uses.

Design choices (the default corpus is Python source):
- Unigram model: its Viterbi segmentation can be reproduced exactly by the `tokenizers` Unigram model, which
  makes the Hugging Face export (data/hf_tokenizer.py) match token for token.
- No text normalisation ("identity", no NFKC), no dummy prefix, no collapsing of spaces: every space becomes
  '▁' and runs of spaces survive, so indentation round-trips. Whitespace-only pieces ('▁▁▁▁') are allowed so an
  indentation level costs one token.
- Newlines are ordinary characters: pieces such as '\n', '):\n' or '\n\n' are learned. Text is cut into
  segments of whole lines (as many as fit in MAX_SEGMENT_CHARS characters; a longer line is cut every
  MAX_SEGMENT_CHARS characters) and each segment is encoded on its own, so no piece crosses a segment end.
  Training samples the same segments. decode(encode(t)) == t for any text (a literal '▁' comes back as ' ').
- Pieces may mix scripts and punctuation ('_base', 'try:', '▁None\n'): split_by_unicode_script is off, which
  on the Python stdlib gives ~3.9 bytes per token instead of ~3.4, at about twice the training time.
- Exactness: SentencePiece sums Viterbi scores in float32, `tokenizers` in float64, so near-ties (runs of
  spaces: '▁'+'▁▁▁▁' vs '▁▁▁▁'+'▁') could break differently. Piece scores are rounded to multiples of
  SCORE_GRID and clipped at MIN_SCORE; with segments of at most MAX_SEGMENT_CHARS pieces every path sum is
  then exact in both, so both pick the same path.
- The special tokens are SentencePiece control symbols (plus [PAD]/[UNK] in the pad/unk slots) at ids 0..8:
  no raw text ever encodes to them, the literal string "[MASK]" included.
- byte_fallback: characters outside the vocabulary become <0xNN> byte pieces instead of [UNK]. The characters
  that spell special and byte pieces are always kept as single-character pieces (REQUIRED_CHARS), which the
  HF export needs to spell such literal text the way SentencePiece does.
- Determinism: our own seeded reservoir sample, no SentencePiece input shuffling, a fixed thread count (the
  thread count changes the floating-point sums of the EM step and is stored in the model), fixed RNG seed.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import os
import random
import re
from collections.abc import Iterable, Sequence
from functools import cached_property
from pathlib import Path

import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

SPECIAL_TOKENS = (
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    "[MODE_MLM]",
    "[MODE_SPAN]",
    "[MODE_CLM]",
    "[MODE_PREFIX]",
)
"""Special tokens; token SPECIAL_TOKENS[i] has id i in every cloze tokenizer."""

MODE_TOKENS = {"mlm": "[MODE_MLM]", "span": "[MODE_SPAN]", "causal": "[MODE_CLM]", "prefix": "[MODE_PREFIX]"}
"""Objective name -> the mode token that announces it."""

MODEL_TYPES = ("unigram",)
"""Supported SentencePiece model types (see the module docstring for why only unigram)."""

NUM_BYTE_PIECES = 256
WORD_BOUNDARY = "\u2581"
"""SentencePiece's visible space ('▁')."""

MAX_SEGMENT_CHARS = 1024
"""Longest segment encoded in one Viterbi pass (see the module docstring)."""
SEGMENT_PATTERN = rf"[\s\S]{{0,{MAX_SEGMENT_CHARS - 1}}}\n|[^\n]{{1,{MAX_SEGMENT_CHARS}}}"
"""The longest run of whole lines (ending in '\n') within MAX_SEGMENT_CHARS characters, else up to
MAX_SEGMENT_CHARS characters of an overlong or unterminated line. data/hf_tokenizer.py gives the same pattern to
the `tokenizers` Split pre-tokenizer; both are backtracking engines, so both cut in the same places."""
_SEGMENT_RE = re.compile(SEGMENT_PATTERN)

SCORE_GRID = 1.0 / 256
MIN_SCORE = -50.0
"""With |score| <= 50 (unknown characters: 60) and at most 1024 pieces, a path sum stays below 2**16 in
magnitude; on a 2**-8 grid that is exact in float32's 24-bit mantissa."""

REQUIRED_CHARS = "".join(sorted(set("".join(SPECIAL_TOKENS) + "<0x>0123456789ABCDEF")))
"""Characters kept in the vocabulary whatever their frequency."""


def segment(text: str) -> list[str]:
    """Cut text into the segments SentencePiece encodes one by one; "".join(segment(t)) == t."""
    return _SEGMENT_RE.findall(text)


def sample_training_sentences(texts: Iterable[str], max_sentences: int, seed: int) -> list[str]:
    """A uniform, seeded sample (reservoir sampling) of at most max_sentences segments; memory stays bounded.

    Segments are sampled whole; newlines inside them teach the newline pieces.
    """
    rng = random.Random(seed)
    reservoir: list[str] = []
    seen = 0
    for text in texts:
        for seg in _SEGMENT_RE.finditer(text):
            if len(reservoir) < max_sentences:
                reservoir.append(seg.group())
            else:
                j = rng.randrange(seen + 1)
                if j < max_sentences:
                    reservoir[j] = seg.group()
            seen += 1
    return reservoir


def _quantize_scores(model: bytes) -> bytes:
    """Round normal pieces' scores onto SCORE_GRID (see the module docstring)."""
    proto = sentencepiece_model_pb2.ModelProto.FromString(model)
    normal = sentencepiece_model_pb2.ModelProto.SentencePiece.NORMAL
    for piece in proto.pieces:
        if piece.type == normal:
            piece.score = round(max(piece.score, MIN_SCORE) / SCORE_GRID) * SCORE_GRID
    return proto.SerializeToString(deterministic=True)


def train_tokenizer(
    texts: Iterable[str],
    out_dir: str | os.PathLike,
    vocab_size: int = 8000,
    model_type: str = "unigram",
    max_sentences: int = 8000,
    character_coverage: float = 0.9999,
    num_threads: int = 2,
    seed: int = 0,
) -> Path:
    """Train a SentencePiece model on a sample of `texts`; write out_dir/spm.model and return its path.

    The sample is max_sentences segments (up to 1024 characters each, ~7 MB by default), which
    trains in well under a minute on 2 cores. Same texts and arguments -> the same model bytes.
    """
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type={model_type!r} is not supported; use one of {MODEL_TYPES}")
    min_vocab = len(SPECIAL_TOKENS) + NUM_BYTE_PIECES + 1
    if not min_vocab <= vocab_size <= 2**31 - 1:
        raise ValueError(f"vocab_size={vocab_size} must be at least {min_vocab} (9 specials + 256 byte pieces + 1)")
    if max_sentences < 1:
        raise ValueError(f"max_sentences={max_sentences} must be >= 1")
    if not 0.0 < character_coverage <= 1.0:
        raise ValueError(f"character_coverage={character_coverage} must lie in (0, 1]")
    if num_threads < 1:
        raise ValueError(f"num_threads={num_threads} must be >= 1")
    sentences = sample_training_sentences(texts, max_sentences, seed)
    if not sentences:
        raise ValueError("cannot train a tokenizer: the texts are empty")
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=model,
            model_type=model_type,
            vocab_size=vocab_size,
            pad_id=0,
            pad_piece=SPECIAL_TOKENS[0],
            unk_id=1,
            unk_piece=SPECIAL_TOKENS[1],
            bos_id=-1,
            eos_id=-1,
            control_symbols=list(SPECIAL_TOKENS[2:]),
            byte_fallback=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            split_by_unicode_script=False,
            character_coverage=character_coverage,
            num_threads=num_threads,
            shuffle_input_sentence=False,
            input_sentence_size=0,
            required_chars=REQUIRED_CHARS,
            # bytes, and a character is at most 4 UTF-8 bytes: no segment is ever dropped for length
            max_sentence_length=4 * MAX_SEGMENT_CHARS + 16,
            minloglevel=2,
        )
    except RuntimeError as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        limit = re.search(r"value <= (\d+)", msg)
        if "Vocabulary size" in msg:
            most = f"at most {limit[1]} pieces fit" if limit else msg
            raise ValueError(f"cannot train a {vocab_size}-piece tokenizer on this corpus ({most}); "
                             "use a smaller --vocab-size or more text") from None
        raise ValueError(f"SentencePiece training failed: {msg}") from None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "spm.model"
    tmp = path.with_suffix(".model.tmp")
    tmp.write_bytes(_quantize_scores(model.getvalue()))
    os.replace(tmp, path)
    return path


def _check_model(proto: sentencepiece_model_pb2.ModelProto, path: Path) -> None:
    """Refuse models whose specials or normalisation differ from what cloze trains: ids are baked into
    objectives and checkpoints, and the HF export reproduces exactly this normalisation."""
    pieces = [p.piece for p in proto.pieces[: len(SPECIAL_TOKENS)]]
    if pieces != list(SPECIAL_TOKENS):
        raise ValueError(
            f"tokenizer {path}: ids 0..{len(SPECIAL_TOKENS) - 1} are {pieces}, expected {list(SPECIAL_TOKENS)}; "
            "it was not trained by cloze, leave out --tokenizer to train one"
        )
    kinds = sentencepiece_model_pb2.ModelProto.SentencePiece
    want = [kinds.CONTROL, kinds.UNKNOWN] + [kinds.CONTROL] * (len(SPECIAL_TOKENS) - 2)
    types = [p.type for p in proto.pieces[: len(SPECIAL_TOKENS)]]
    norm, spec = proto.normalizer_spec, proto.trainer_spec
    problems = []
    if types != want:
        problems.append("special tokens are not control symbols")
    if spec.model_type != spec.UNIGRAM:
        problems.append("model type is not unigram")
    if not spec.byte_fallback:
        problems.append("byte_fallback is off")
    if norm.precompiled_charsmap or norm.name not in ("identity", ""):
        problems.append(f"normalization is {norm.name!r}, not 'identity'")
    if norm.add_dummy_prefix or norm.remove_extra_whitespaces or not norm.escape_whitespaces:
        problems.append("whitespace handling differs (dummy prefix / extra-whitespace removal / escaping)")
    if norm.normalization_rule_tsv or proto.denormalizer_spec.precompiled_charsmap:
        problems.append("custom normalization rules")
    normal = [p.score for p in proto.pieces if p.type == kinds.NORMAL]
    if any(s < MIN_SCORE or s / SCORE_GRID != round(s / SCORE_GRID) for s in normal):
        problems.append("piece scores are not on cloze's score grid")
    if any(c not in {p.piece for p in proto.pieces} for c in REQUIRED_CHARS):
        problems.append("some required characters are missing")
    if problems:
        raise ValueError(
            f"tokenizer {path}: {'; '.join(problems)}; it was not trained by cloze, leave out --tokenizer to train one"
        )


MAX_MODEL_BYTES = 256 << 20
"""Largest SentencePiece model read (a 256k-piece model is ~5 MB): a manifest may name any path."""


def _read_model(path: Path) -> bytes:
    """The bytes of a regular file of at most MAX_MODEL_BYTES; ValueError for anything else (a device, a FIFO, a
    folder, a file too large), so a hostile path can neither hang the read nor fill memory."""
    import stat

    info = path.stat()
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"tokenizer model {path} is not a regular file")
    if info.st_size > MAX_MODEL_BYTES:
        raise ValueError(f"tokenizer model {path} has {info.st_size:,} bytes, more than a SentencePiece model's "
                         f"{MAX_MODEL_BYTES:,}; it is not a tokenizer")
    with path.open("rb") as f:
        data = f.read(MAX_MODEL_BYTES + 1)
    if len(data) > MAX_MODEL_BYTES:
        raise ValueError(f"tokenizer model {path} grew past {MAX_MODEL_BYTES:,} bytes while read")
    return data


class Tokenizer:
    """A cloze SentencePiece model: encode/decode without specials, plus the ids objectives need."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            data = _read_model(self.path)
        except FileNotFoundError:
            raise ValueError(f"tokenizer model {self.path} not found; run launch.prepare or fix the path") from None
        except OSError as e:
            raise ValueError(f"cannot read tokenizer model {self.path}: {e.strerror or e}") from None
        proto = sentencepiece_model_pb2.ModelProto()
        try:
            proto.ParseFromString(data)
        except Exception:  # protobuf raises its own DecodeError type; any failure means "not a model"
            raise ValueError(f"tokenizer model {self.path} is not a SentencePiece model file") from None
        if not proto.pieces:
            raise ValueError(f"tokenizer model {self.path} is not a SentencePiece model file")
        _check_model(proto, self.path)
        self._sp = spm.SentencePieceProcessor(model_proto=data)
        self.sha256 = hashlib.sha256(data).hexdigest()
        """Hex SHA-256 of the model file; shards record it so they never meet a different tokenizer."""
        self.model_bytes = data
        """The model file as read and checked: what a checkpoint keeps (never a re-read of the path)."""

    pad_id: int = 0
    unk_id: int = 1
    cls_id: int = 2
    sep_id: int = 3
    mask_id: int = 4
    special_ids: tuple[int, ...] = tuple(range(len(SPECIAL_TOKENS)))
    """Every special id: never a prediction target, never a random replacement."""
    first_ordinary_id: int = len(SPECIAL_TOKENS)
    """Ids from here to vocab_size-1 are ordinary pieces (byte pieces included)."""

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def mode_ids(self) -> dict[str, int]:
        """Objective name ('mlm', 'span', 'causal', 'prefix') -> id of its mode token."""
        return {name: SPECIAL_TOKENS.index(tok) for name, tok in MODE_TOKENS.items()}

    @property
    def id_dtype(self) -> str:
        """Smallest unsigned numpy dtype name that holds every id."""
        return "uint16" if self.vocab_size <= 2**16 else "uint32"

    def encode(self, text: str) -> list[int]:
        """Token ids of text, no special tokens (segment by segment, see the module docstring)."""
        return [i for ids in self._sp.encode(segment(text), out_type=int, num_threads=1) for i in ids]

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[np.ndarray]:
        """encode() for many texts at once, as int64 arrays; SentencePiece spreads the segments over
        num_threads C++ threads."""
        segments: list[str] = []
        bounds = [0]
        for text in texts:
            segments.extend(segment(text))
            bounds.append(len(segments))
        encoded = self._sp.encode(segments, out_type=int, num_threads=num_threads)
        lengths = np.fromiter((len(ids) for ids in encoded), dtype=np.int64, count=len(encoded))
        flat = np.fromiter(itertools.chain.from_iterable(encoded), dtype=np.int64, count=int(lengths.sum()))
        ends = np.concatenate([[0], np.cumsum(lengths)])
        return [flat[ends[a] : ends[b]] for a, b in itertools.pairwise(bounds)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(token_id)

    def piece_score(self, token_id: int) -> float:
        return self._sp.get_score(token_id)

    def is_byte(self, token_id: int) -> bool:
        return self._sp.is_byte(token_id)

    @cached_property
    def word_start(self) -> np.ndarray:
        """bool [vocab_size]: pieces that begin a word ('▁'-prefixed), for whole-word masking. Specials
        count as word starts (each stands alone); byte pieces do not (they continue a character)."""
        starts = np.zeros(self.vocab_size, dtype=bool)
        for i in range(self.vocab_size):
            starts[i] = self._sp.id_to_piece(i).startswith(WORD_BOUNDARY)
        starts[: len(SPECIAL_TOKENS)] = True
        return starts

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"
