"""The export's tokenizer: `AutoTokenizer` on the exported folder gives SentencePiece's ids on a held-out set.

The tokenizer is the one `launch.prepare` trained on the session corpus (stdlib json/email/logging/urllib/http);
the held-out text is other stdlib packages it never saw, plus the edge cases the issue names: Unicode, runs of
whitespace, very long words and empty strings. Both the copied files and the ones export rebuilds from spm.model
when a checkpoint lacks them are checked; spm.model itself is never shipped (plain SentencePiece on it encodes
multi-line text differently from training).
"""

from __future__ import annotations

import shutil
import sysconfig
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data.tokenizer import Tokenizer
from launch.export.main import TOKENIZER_FILES, write_tokenizer

HELD_OUT_PACKAGES = ("asyncio", "unittest", "concurrent")
"""stdlib packages outside tests/conftest.py's CORPUS_PACKAGES: text the tokenizer was not trained on."""

EDGE_CASES = [
    "",
    " ",
    "\n",
    "\t",
    "Ünïcödé façade, naïve café; Straße; ﬁnancial ligature; ＦＵＬＬ width; e\u0301 combining",
    "東京都の天気は晴れ。中文文本，한국어 텍스트, العربية من اليمين, עברית, ελληνικά, кириллица",
    "emoji 🙂🎉, flags 🇫🇷🇯🇵, family 👨‍👩‍👧 (zero-width joiners), skin tone 👍🏽, keycap 1️⃣",
    "zero\u200bwidth space, no-break\u00a0space, ideographic\u3000space, soft\u00adhyphen",
    "a b  c   d    e     f" + " " * 64 + "g",
    "\t\tmixed \t tabs\t \t and  spaces  \n\n\n\n  blank lines\n",
    "   leading and trailing   ",
    "windows\r\nline\r\nendings\r\n\r\n",
    "x" * 5000,
    "".join(chr(0x4E00 + (i * 7919) % 20000) for i in range(3000)),  # 3000 CJK characters, no spaces
    "antidisestablishmentarianism" * 90,  # the 1024-character cut falls inside a word
    "ü" * 1023 + "é" * 10,  # the cut falls right after a 2-byte character
    "_" * 1024 + "\n" + "=" * 2049,
    "literal <0x41> byte-piece spelling, ▁ the word marker, [CLS] and [MODE_MLM] as plain text",
]


def held_out_texts() -> list[str]:
    """Whole files and their single lines from packages the tokenizer never saw (a deterministic selection)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = []
    for pkg in HELD_OUT_PACKAGES:
        for f in sorted((stdlib / pkg).glob("*.py"))[:4]:
            text = f.read_text(encoding="utf-8")
            texts.append(text)
            texts.extend(text.splitlines(keepends=True)[:80])
    return texts


@pytest.fixture(scope="module", params=["copied", "rebuilt"])
def exported(request, tiny_data, tmp_path_factory) -> tuple[Path, Path]:
    """The tokenizer files as export writes them: copied from the checkpoint's tokenizer/ folder, or rebuilt from
    spm.model alone."""
    src = tiny_data / "tokenizer"
    if request.param == "rebuilt":
        only_spm = tmp_path_factory.mktemp("spm-only")
        shutil.copy2(src / "spm.model", only_spm / "spm.model")
        src = only_spm
    out = tmp_path_factory.mktemp(f"tok-{request.param}")
    write_tokenizer(src, out, model_max_length=256)
    assert sorted(p.name for p in out.iterdir()) == sorted(TOKENIZER_FILES), "only the tokenizers conversion ships"
    return out, tiny_data / "tokenizer" / "spm.model"


@pytest.fixture(scope="module")
def tokenizers(exported):
    from transformers import AutoTokenizer

    out, training_model = exported
    return (Tokenizer(training_model), AutoTokenizer.from_pretrained(out),
            AutoTokenizer.from_pretrained(out, split_special_tokens=True))


def assert_parity(tokenizers, text: str) -> None:
    sp, hf, hf_split = tokenizers
    ids = sp.encode(text)
    got = hf(text, verbose=False)["input_ids"]
    assert got == [hf.cls_token_id, *ids, hf.sep_token_id], f"ids differ on {text[:60]!r}"
    assert hf.decode(got, skip_special_tokens=True) == sp.decode(ids) == text, f"round trip differs on {text[:60]!r}"
    if "[" in text:
        # HF reads a literal "[CLS]" as the special token (fill-mask needs "[MASK]" that way); with
        # split_special_tokens it reads text exactly as SentencePiece does
        assert hf_split(text, verbose=False)["input_ids"] == [hf.cls_token_id, *ids, hf.sep_token_id]


def test_special_tokens(tokenizers):
    sp, hf, _ = tokenizers
    assert (hf.pad_token_id, hf.unk_token_id, hf.cls_token_id, hf.sep_token_id, hf.mask_token_id) == (
        sp.pad_id, sp.unk_id, sp.cls_id, sp.sep_id, sp.mask_id)
    assert len(hf) == sp.vocab_size


@pytest.mark.parametrize("index", range(len(EDGE_CASES)))
def test_parity_on_edge_cases(tokenizers, index):
    text = EDGE_CASES[index]
    if "[CLS]" in text:
        sp, _, hf_split = tokenizers
        assert hf_split(text)["input_ids"] == [sp.cls_id, *sp.encode(text), sp.sep_id]
    else:
        assert_parity(tokenizers, text)


def test_parity_on_held_out_source(tokenizers):
    texts = held_out_texts()
    assert len(texts) > 300 and sum(map(len, texts)) > 100_000, "too little held-out text"
    for text in texts:
        assert_parity(tokenizers, text)
    sp, hf, _ = tokenizers
    batch = hf(texts[:50], verbose=False)["input_ids"]  # the batched path gives the same ids
    assert batch == [[sp.cls_id, *sp.encode(t), sp.sep_id] for t in texts[:50]]


# Random text over alphabets where tokenizers tend to disagree: ASCII with runs of whitespace, accented Latin, CJK,
# emoji (4-byte UTF-8), byte-fallback characters the vocabulary lacks, control characters.
ALPHABET = st.sampled_from(list("abcXYZ019_()[]{}:.,#'\"\\/") + [" ", "  ", "    ", "\t", "\n", "\r\n"]
                           + list("éüßçøñ") + list("東京語中文") + ["🙂", "👩‍💻", "\u200b", "\u00a0", "\x00", "\x7f"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(ALPHABET, max_size=80), repeat=st.integers(1, 30))
def test_parity_on_random_text(tokenizers, parts, repeat):
    assert_parity(tokenizers, "".join(parts) * repeat)
