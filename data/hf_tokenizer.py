"""Hugging Face tokenizer files built from a cloze SentencePiece model.

`transformers.AutoTokenizer.from_pretrained(out_dir)` then encodes like data.tokenizer.Tokenizer:
tok(text)["input_ids"] == [CLS] + sp.encode(text) + [SEP]. The pipeline mirrors how cloze trains the
model (see data/tokenizer.py): no normalisation except ' ' -> '▁', no dummy prefix, the same line segments
(a Split pre-tokenizer), the same grid-rounded piece scores (so float64 Viterbi here picks the path that
SentencePiece's float32 Viterbi picks), byte fallback.

Special tokens: like every HF tokenizer, the literal string "[MASK]" in text is read as the mask token (the
fill-mask pipeline relies on it), where SentencePiece reads it as plain text. Loading with
`split_special_tokens=True` gives SentencePiece's reading for any text: SentencePiece keeps control and byte
pieces out of its lattice, and `tokenizers` cannot, so they get a score that never wins (SCORE_NEVER).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from data.tokenizer import SEGMENT_PATTERN, SPECIAL_TOKENS, WORD_BOUNDARY, Tokenizer

SCORE_NEVER = -1.0e6
"""Unigram log-prob for pieces SentencePiece never matches in text (controls, [UNK], <0xNN> bytes). Any path
that spells the same text with ordinary pieces scores far above it (~-20 per character at worst)."""

HF_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def build_hf_tokenizer(sp: Tokenizer) -> HFTokenizer:
    """The `tokenizers` pipeline equivalent to the SentencePiece model (without the transformers wrapper)."""
    vocab = []
    for i in range(sp.vocab_size):
        never = i in sp.special_ids or sp.is_byte(i)
        vocab.append((sp.id_to_piece(i), SCORE_NEVER if never else sp.piece_score(i)))
    tok = HFTokenizer(models.Unigram(vocab, unk_id=sp.unk_id, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", WORD_BOUNDARY)
    # the segments Tokenizer.encode runs Viterbi on, one at a time
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(SEGMENT_PATTERN), behavior="isolated")
    tok.decoder = decoders.Sequence([decoders.Replace(WORD_BOUNDARY, " "), decoders.ByteFallback(), decoders.Fuse()])
    cls, sep = SPECIAL_TOKENS[sp.cls_id], SPECIAL_TOKENS[sp.sep_id]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}",
        pair=f"{cls} $A {sep} $B:1 {sep}:1",
        special_tokens=[(cls, sp.cls_id), (sep, sp.sep_id)],
    )
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


def write_hf_tokenizer(spm_model: str | os.PathLike, out_dir: str | os.PathLike, model_max_length: int) -> Path:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into out_dir; return out_dir."""
    from transformers import PreTrainedTokenizerFast  # heavy import, only needed here

    if model_max_length < 1:
        raise ValueError(f"model_max_length={model_max_length} must be >= 1")
    sp = Tokenizer(spm_model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = dict(
        pad_token=SPECIAL_TOKENS[sp.pad_id],
        unk_token=SPECIAL_TOKENS[sp.unk_id],
        cls_token=SPECIAL_TOKENS[sp.cls_id],
        sep_token=SPECIAL_TOKENS[sp.sep_id],
        mask_token=SPECIAL_TOKENS[sp.mask_id],
    )
    modes = [SPECIAL_TOKENS[i] for i in sp.mode_ids.values()]
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=build_hf_tokenizer(sp),
        model_max_length=model_max_length,
        additional_special_tokens=modes,
        clean_up_tokenization_spaces=False,
        # token_type_ids are left out: encoders without segment embeddings reject them
        model_input_names=["input_ids", "attention_mask"],
        **names,
    )
    wrapped.save_pretrained(str(out))
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    # The v4 name of the generic fast tokenizer; transformers v5 maps it to its TokenizersBackend.
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["additional_special_tokens"] = modes
    config["clean_up_tokenization_spaces"] = False
    config["model_input_names"] = ["input_ids", "attention_mask"]
    _write_json(config_path, config)
    _write_json(out / "special_tokens_map.json", {**names, "additional_special_tokens": modes})
    return out


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
